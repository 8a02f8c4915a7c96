//! `ktctl` as a shell user meets it: pipes, exit codes.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use kt_e2e::{TestFleet, all_healthy, bin};

#[tokio::test]
async fn ktctl_ends_quietly_when_its_output_pipe_is_closed() {
    let fleet = TestFleet::start(1);
    fleet
        .wait_for_health(
            "the fleet is healthy",
            Duration::from_secs(60),
            all_healthy(1),
        )
        .await;
    let commands: [&[&str]; 4] = [
        &["doctor"],
        &["gateway", "health"],
        &["gateway", "list", "-o", "yaml"],
        &[
            "events",
            "tail",
            "--all-gateways",
            "--since",
            "1h",
            "--limit",
            "1",
        ],
    ];
    for args in commands {
        // `ktctl ... | head -0`: the reader is gone before ktctl writes its first line.
        let mut child = Command::new(bin("ktctl"))
            .arg("--config")
            .arg(&fleet.ktctl_config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ktctl");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            out.status.signal() == Some(nix::libc::SIGPIPE) || out.status.success(),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}
