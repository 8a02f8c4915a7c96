//! Bad config files and certificates: a clear error naming the problem, exit code 64, nothing started.

use std::time::Duration;

use kt_e2e::{Pki, Proc};

fn run_to_exit(binary: &str, args: &[String], dir: &std::path::Path) -> (Option<i32>, String) {
    let proc = Proc::spawn(binary, args, dir.join(format!("{binary}.log")));
    let log = proc.log.clone();
    let status = proc.wait_exit(Duration::from_secs(10));
    (
        status.code(),
        std::fs::read_to_string(log).unwrap_or_default(),
    )
}

#[test]
fn unknown_keys_name_file_line_and_key_with_exit_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "kt-coordinator",
            "coordinator.yaml",
            "tls: {ca: a, cert: b, key: c}\ndata_dir: d\nlisten_address: x\n",
            "listen_address",
            "line 3",
        ),
        (
            "kt-agent",
            "agent.yaml",
            "coordinator:\n  endpoints: [\"https://127.0.0.1:1\"]\n  retries: 3\n",
            "retries",
            "line 3",
        ),
        (
            "kt-gateway",
            "policy.yaml",
            "pack: {name: p, version: 1.0.0}\npolicies: {chain: []}\ncolour: blue\n",
            "colour",
            "line 3",
        ),
    ];
    for (binary, file, text, key, line) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("write");
        let (code, log) = run_to_exit(
            binary,
            &["--config".into(), path.display().to_string()],
            dir.path(),
        );
        assert_eq!(code, Some(64), "{binary}: {log}");
        assert!(
            log.contains(file) && log.contains(key) && log.contains(line),
            "{binary} said: {log}"
        );
    }
}

#[test]
fn missing_and_wrong_role_certificates_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path().join("pki"));
    let p = |name: &str| pki.dir.join(name).display().to_string();

    // A coordinator given the operator's certificate.
    let config = dir.path().join("coordinator.yaml");
    std::fs::write(
        &config,
        format!(
            "tls: {{ca: {}, cert: {}, key: {}}}\ndata_dir: {}\n",
            p("ca.crt"),
            p("operator-tester.crt"),
            p("operator-tester.key"),
            dir.path().join("data").display()
        ),
    )
    .expect("write");
    let (code, log) = run_to_exit(
        "kt-coordinator",
        &["--config".into(), config.display().to_string()],
        dir.path(),
    );
    assert_eq!(code, Some(64), "{log}");
    assert!(
        log.contains("operator-tester.crt") && log.contains("expected role coordinator"),
        "{log}"
    );

    // An agent whose certificate file does not exist.
    let agent = dir.path().join("agent.yaml");
    std::fs::write(
        &agent,
        format!(
            "coordinator: {{endpoints: [\"https://127.0.0.1:1\"]}}\ntls: {{ca: {}, cert: {}, key: {}}}\ngateway: {{health_url: \"http://127.0.0.1:2/health\"}}\n",
            p("ca.crt"),
            p("agent-nobody.crt"),
            p("agent-nobody.key")
        ),
    )
    .expect("write");
    let (code, log) = run_to_exit(
        "kt-agent",
        &["--config".into(), agent.display().to_string()],
        dir.path(),
    );
    assert_eq!(code, Some(64), "{log}");
    assert!(
        log.contains("agent-nobody.crt") && log.contains("cannot read"),
        "{log}"
    );
}
