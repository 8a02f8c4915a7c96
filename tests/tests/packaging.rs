//! What `deploy/` ships and what the daemons do for a service manager: the systemd units
//! (verified with `systemd-analyze verify` in a temporary root, and checked structurally), `Type=notify` readiness, and `systemctl reload`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kt_ctl::dev::AgentSpec;
use kt_e2e::{
    AgentNode, GatewayNode, MockProvider, Pki, Proc, TEST_LIVENESS, bin, ktctl, wait_for,
};
use kt_launch::process::on_path;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

const UNITS: [&str; 3] = [
    "kt-coordinator.service",
    "kt-gateway@.service",
    "kt-agent@.service",
];

/// `Key=value` lines of a unit file, in order.
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn systemd_units_are_hardened_notify_services_that_validate_first() {
    for unit in UNITS {
        let text = std::fs::read_to_string(deploy().join("systemd").join(unit)).expect(unit);
        let d = directives(&text);
        let value = |key: &str| d.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        for (key, expected) in [
            ("Type", "notify"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("User", "kt-fleet"),
        ] {
            assert_eq!(value(key), Some(expected), "{unit}: {key}");
        }
        assert!(
            value("ExecStartPre").is_some_and(|v| v.contains(" validate")),
            "{unit}: validates before starting"
        );
        assert!(value("Restart").is_some(), "{unit}: a restart policy");
        let reloads = value("ExecReload");
        if unit == "kt-agent@.service" {
            assert_eq!(reloads, None, "the agent restarts instead");
            assert_eq!(value("WantedBy"), Some("kt-gateway@%i.service"));
            assert!(
                value("After").is_some_and(|v| v.contains("kt-gateway@%i.service")),
                "starts after its gateway"
            );
            for key in ["BindsTo", "PartOf"] {
                assert_eq!(value(key), None, "the agent must outlive a stopped gateway");
            }
        } else {
            assert_eq!(reloads, Some("/bin/kill -HUP $MAINPID"), "{unit}");
        }
    }
}

#[test]
fn systemd_analyze_verifies_the_units_installed_in_a_temporary_root() {
    // Never skipped: scripts/install-test-deps (part of the README's test command) installs it.
    let Some(analyze) = on_path("systemd-analyze") else {
        panic!(
            "systemd-analyze is missing: run scripts/install-test-deps (Debian package systemd)"
        );
    };
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units).expect("units dir");
    for unit in UNITS {
        std::fs::copy(deploy().join("systemd").join(unit), units.join(unit)).expect("copy unit");
    }
    // With the enrollment drop-in, as a host that enrolls itself installs it.
    let drop_in = "kt-agent@.service.d/enroll.conf";
    std::fs::create_dir_all(units.join("kt-agent@.service.d")).expect("drop-in dir");
    std::fs::copy(deploy().join("systemd").join(drop_in), units.join(drop_in)).expect("copy");
    // The binaries the units run, and the system's own units they refer to (targets).
    std::fs::create_dir_all(root.join("usr/bin")).expect("bin dir");
    for binary in ["kt-coordinator", "kt-gateway", "kt-agent"] {
        std::fs::copy(bin(binary), root.join("usr/bin").join(binary)).expect("copy binary");
    }
    std::fs::create_dir_all(root.join("bin")).expect("bin dir");
    std::fs::copy(on_path("kill").expect("kill"), root.join("bin/kill")).expect("copy kill");
    copy_dir(
        Path::new("/usr/lib/systemd/system"),
        &root.join("usr/lib/systemd/system"),
    );

    let out = std::process::Command::new(analyze)
        .arg(format!("--root={}", root.display()))
        .args([
            "verify",
            "kt-coordinator.service",
            "kt-gateway@gw-01.service",
            "kt-agent@gw-01.service",
        ])
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if kind.is_symlink() {
            if let Ok(link) = std::fs::read_link(entry.path()) {
                let _ = std::os::unix::fs::symlink(link, target);
            }
        } else {
            let _ = std::fs::copy(entry.path(), target);
        }
    }
}

/// A coordinator started as systemd would: with `$NOTIFY_SOCKET`.
struct NotifiedCoordinator {
    proc: Proc,
    notify: UnixDatagram,
    groups: PathBuf,
    ktctl_config: PathBuf,
    pki: Pki,
    addr: std::net::SocketAddr,
}

/// Starts a coordinator as systemd would (with `$NOTIFY_SOCKET`), with `env` besides, and
/// serving metrics on `metrics` if given.
fn start_coordinator(
    dir: &Path,
    metrics: Option<std::net::SocketAddr>,
    env: &[(&str, &str)],
) -> NotifiedCoordinator {
    let pki = Pki::new(dir.join("pki"));
    let groups = dir.join("groups.yaml");
    std::fs::write(&groups, "groups:\n  first:\n    gateways: [gw-a]\n").expect("groups");
    let config = dir.join("coordinator.yaml");
    let mut text = kt_ctl::dev::coordinator_config(
        "127.0.0.1:0".parse().expect("addr"),
        &pki.dir,
        &dir.join("data"),
        &groups,
        TEST_LIVENESS,
    );
    if let Some(addr) = metrics {
        text.push_str(&format!("metrics_listen: \"{addr}\"\n"));
    }
    std::fs::write(&config, text).expect("config");
    let socket = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&socket).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let ready = dir.join("coordinator.addr");
    let socket_arg = socket.display().to_string();
    let mut env = env.to_vec();
    env.push(("NOTIFY_SOCKET", socket_arg.as_str()));
    let mut proc = Proc::spawn_with_env(
        "kt-coordinator",
        &[
            "--config".into(),
            config.display().to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ],
        &env,
        dir.join("coordinator.log"),
    );
    let addr = proc.wait_ready(&ready);
    let ktctl_config = dir.join("ktctl.yaml");
    kt_ctl::ktconfig::KtctlConfig {
        current_context: Some("test".into()),
        contexts: vec![pki.context(addr, "tester")],
    }
    .save(&ktctl_config)
    .expect("ktctl config");
    NotifiedCoordinator {
        proc,
        notify,
        groups,
        ktctl_config,
        pki,
        addr,
    }
}

fn next_notification(notify: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn group_names(ktctl_config: &Path) -> Vec<String> {
    let out = ktctl(ktctl_config, &["groups", "list", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_coordinator_notifies_readiness_and_reloads_its_groups_on_sighup() {
    kt_daemon::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start_coordinator(dir.path(), None, &[]);
    assert_eq!(next_notification(&c.notify), "READY=1");
    assert_eq!(group_names(&c.ktctl_config), ["first"]);

    // systemctl reload: the edited file is read again.
    std::fs::write(
        &c.groups,
        "groups:\n  first:\n    gateways: [gw-a]\n  second:\n    selector: {region: eu}\n",
    )
    .expect("groups");
    c.proc.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = wait_for(Duration::from_secs(10), || {
        group_names(&c.ktctl_config) == ["first", "second"]
    })
    .await;
    assert!(reloaded, "{:?}", group_names(&c.ktctl_config));

    // A file that does not parse changes nothing, and the coordinator keeps running.
    std::fs::write(&c.groups, "groups:\n  third: [not a group\n").expect("groups");
    c.proc.signal(nix::sys::signal::Signal::SIGHUP);
    let logged = wait_for(Duration::from_secs(10), || {
        c.proc.log_text().contains("groups file not reloaded")
    })
    .await;
    assert!(logged, "{}", c.proc.log_text());
    assert_eq!(group_names(&c.ktctl_config), ["first", "second"]);

    c.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(next_notification(&c.notify), "STOPPING=1");
    assert!(c.proc.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn every_binary_has_a_version_and_ktctl_ships_completions_and_man_pages() {
    for binary in ["kt-coordinator", "kt-gateway", "kt-agent", "ktctl"] {
        let out = std::process::Command::new(bin(binary))
            .arg("--version")
            .output()
            .expect(binary);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with(&format!("{binary} 0.")),
            "{binary}: {text}"
        );
    }
    let ktctl_bin = bin("ktctl");
    for (shell, marker) in [
        ("bash", "complete -F _ktctl"),
        ("zsh", "#compdef ktctl"),
        ("fish", "complete -c ktctl"),
    ] {
        let out = std::process::Command::new(&ktctl_bin)
            .args(["completion", shell])
            .output()
            .expect("completion");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains(marker), "{shell}");
        assert!(
            script.contains("doctor"),
            "{shell}: every subcommand completes"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(&ktctl_bin)
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .expect("man");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "ktctl.1",
        "ktctl-doctor.1",
        "ktctl-config-push.1",
        "ktctl-events-tail.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).expect(page);
        assert!(text.contains(".TH"), "{page} is a man page");
    }
}

/// A loopback address no one listens on now.
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// The value of a sample line `name value` (or `name{labels} value`) in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let client = reqwest::Client::new();
    match client.get(format!("http://{addr}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test]
async fn coordinator_and_agent_metrics_count_sessions_heartbeats_and_events() {
    kt_daemon::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let (coordinator_metrics, agent_metrics) = (free_addr(), free_addr());
    let c = start_coordinator(
        &dir.path().join("coordinator"),
        Some(coordinator_metrics),
        &[],
    );
    let provider = MockProvider::start(&dir.path().join("provider"), &[]);
    let gw_dir = dir.path().join("gw-a");
    let gateway = GatewayNode::start(gw_dir.clone(), "gw-a", provider.addr);
    c.pki.issue_agent("gw-a");
    let _agent = AgentNode::start(
        &gw_dir,
        &AgentSpec {
            gateway_id: "gw-a",
            more_coordinators: &[],
            coordinator: c.addr,
            pki: &c.pki.dir,
            gateway: gateway.addr,
            health_interval: Duration::from_millis(200),
            labels: &[("region", "eu")],
            config_path: Some(&gateway.policy),
            validator: &bin("kt-gateway"),
            events_file: Some(&gateway.events),
            probe_token_file: Some(&gateway.probe_token()),
            max_buffered_events: None,
            state_dir: &gw_dir.join("agent-state"),
            metrics_listen: Some(agent_metrics),
        },
    );
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let body = serde_json::json!({"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]});
        client
            .post(gateway.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .expect("request");
    }
    // Polled until every count is there, with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (c_text, a_text) = (
            scrape(coordinator_metrics).await,
            scrape(agent_metrics).await,
        );
        let counted = sample(&c_text, "kt_coordinator_agents{state=\"connected\"}") == Some(1.0)
            && sample(&c_text, "kt_coordinator_heartbeats_total").is_some_and(|n| n > 0.0)
            && sample(&c_text, "kt_coordinator_events_stored_total") == Some(5.0)
            && sample(&a_text, "kt_agent_connected") == Some(1.0)
            && sample(&a_text, "kt_agent_heartbeats_sent_total").is_some_and(|n| n > 0.0)
            && sample(&a_text, "kt_agent_events_buffered_total") == Some(5.0)
            && sample(&a_text, "kt_agent_events_acknowledged_total") == Some(5.0)
            && sample(&a_text, "kt_agent_events_backlog") == Some(0.0);
        if counted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "coordinator:\n{c_text}\nagent:\n{a_text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a coordinator with `env`, waits until it says READY (sent after it logged that it
/// listens; the ready file is written before), stops it; returns its log.
fn coordinator_log(dir: &Path, env: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir).expect("dir");
    let c = start_coordinator(dir, None, env);
    assert_eq!(next_notification(&c.notify), "READY=1");
    let log = c.proc.log_text();
    c.proc.terminate();
    log
}

#[test]
fn daemons_log_json_on_request_filtered_like_rust_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = coordinator_log(
        &dir.path().join("json"),
        &[("KT_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
    );
    let lines: Vec<serde_json::Value> = json
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "coordinator listening"),
        "{json}"
    );
    let quiet = coordinator_log(&dir.path().join("warn"), &[("RUST_LOG", "warn")]);
    assert!(!quiet.contains("coordinator listening"), "{quiet}");
    let text = coordinator_log(&dir.path().join("text"), &[("RUST_LOG", "info")]);
    assert!(
        text.contains("coordinator listening") && !text.trim_start().starts_with('{'),
        "{text}"
    );
}
