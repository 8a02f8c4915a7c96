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

#[tokio::test]
async fn fleet_watch_lines_up_and_does_not_repeat_unchanged_rows() {
    let mut fleet = TestFleet::start(2);
    fleet
        .wait_for_health(
            "the fleet is healthy",
            Duration::from_secs(60),
            all_healthy(2),
        )
        .await;
    let log = fleet.dir.path().join("watch.out");
    let args: Vec<String> = [
        "--config",
        &fleet.ktctl_config.display().to_string(),
        "fleet",
        "watch",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let watch = kt_e2e::Proc::spawn("ktctl", &args, log.clone());
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        kt_e2e::wait_for(Duration::from_secs(30), || read().lines().count() >= 3).await,
        "{}",
        read()
    );
    // A change worth a line: gw-test-01's gateway stops.
    fleet.gateways[0].stop();
    assert!(
        kt_e2e::wait_for(Duration::from_secs(60), || read()
            .lines()
            .any(|l| l.contains("gw-test-01") && l.contains("unhealthy")))
        .await,
        "{}",
        read()
    );
    drop(watch);
    let text = read();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let header = lines[0];
    let column = header.find("GATEWAY").expect("header");
    for line in &lines[1..] {
        assert_eq!(line.find("gw-test-"), Some(column), "misaligned:\n{text}");
    }
    // No row repeats the one before it for the same gateway (time and counters aside).
    let shown = |l: &str| -> String {
        let fields: Vec<&str> = l.split_whitespace().skip(1).collect();
        fields[..fields.len().saturating_sub(1)].join(" ")
    };
    for gateway in ["gw-test-01", "gw-test-02"] {
        let rows: Vec<String> = lines[1..]
            .iter()
            .filter(|l| l.contains(gateway))
            .map(|l| shown(l))
            .collect();
        for pair in rows.windows(2) {
            assert_ne!(pair[0], pair[1], "repeated row:\n{text}");
        }
    }
}

#[test]
fn pki_init_makes_a_root_and_an_issuing_ca_and_says_to_keep_the_root_key_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_str().expect("utf-8");
    let run = |args: &[&str]| {
        Command::new(bin("ktctl"))
            .args(args)
            .output()
            .expect("ktctl")
    };
    let init = run(&["pki", "init", "--dir", pki_arg]);
    assert!(init.status.success(), "{}", kt_e2e::output_text(&init));
    let said = String::from_utf8_lossy(&init.stdout);
    assert!(
        said.contains("root-ca.key") && said.contains("offline"),
        "{said}"
    );
    for file in ["ca.crt", "root-ca.key", "issuing-ca.crt", "issuing-ca.key"] {
        assert!(pki.join(file).is_file(), "{file}");
    }
    let again = run(&["pki", "init", "--dir", pki_arg]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "{}",
        kt_e2e::output_text(&again)
    );
    let issue = run(&[
        "pki", "issue", "--dir", pki_arg, "--role", "operator", "--id", "alice",
    ]);
    assert!(issue.status.success(), "{}", kt_e2e::output_text(&issue));
    let chain = std::fs::read_to_string(pki.join("operator-alice.crt")).expect("cert");
    let issuing = std::fs::read_to_string(pki.join("issuing-ca.crt")).expect("issuing");
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(chain.ends_with(&issuing), "the issuing CA follows the leaf");
}
