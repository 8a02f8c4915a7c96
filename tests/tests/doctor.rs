//! `ktctl doctor` on a dev fleet: quiet when all is well, and exactly the problems that were
//! caused, with hints, when a gateway is stopped and the provider made unreachable.

use std::path::Path;
use std::time::Duration;

use kt_ctl::dev::{self, DevState, Role};
use kt_e2e::{DevFleetGuard, wait_for};
use serde_json::Value;

/// ktctl with private state and config homes: `dev up` records its fleet there, not in the
/// real home.
fn ktctl(args: &[&str]) -> std::process::Output {
    let home = std::env::temp_dir().join(format!("kt-doctor-test-{}", std::process::id()));
    kt_e2e::newcomer_ktctl(&home, &[], args)
}

/// Runs `ktctl doctor --json`: the exit code and the document.
fn doctor(config: &Path) -> (i32, Value) {
    let out = ktctl(&[
        "--config",
        config.to_str().expect("utf-8 path"),
        "doctor",
        "--json",
    ]);
    let document = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), document)
}

/// `(section, subject)` of every check with `mark`.
fn marked(document: &Value, mark: &str) -> Vec<(String, String)> {
    document["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["mark"] == mark)
        .map(|c| {
            (
                c["section"].as_str().unwrap_or_default().to_owned(),
                c["subject"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn stop_process(dir: &Path, role: Role, id: Option<&str>) {
    let state = DevState::load(dir).expect("state").expect("a dev fleet");
    let p = state
        .processes
        .iter()
        .find(|p| p.role == role && p.id.as_deref() == id)
        .expect("the process");
    assert!(
        dev::stop(p.pid, &p.binary, Duration::from_secs(5)),
        "stopped"
    );
}

#[tokio::test]
async fn doctor_passes_a_healthy_fleet_and_names_exactly_what_broke() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fleet");
    let _guard = DevFleetGuard(dir.clone());
    let up = ktctl(&["dev", "up", "--dir", dir.to_str().expect("utf-8 path")]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let config = dir.join(dev::KTCTL_CONFIG_FILE);

    let mut last = (0, Value::Null);
    let healthy = wait_for(Duration::from_secs(20), || {
        last = doctor(&config);
        last.0 == 0 && marked(&last.1, "warn").is_empty()
    })
    .await;
    assert!(healthy, "a fresh dev fleet: {:#}", last.1);
    let passed = marked(&last.1, "pass");
    for section in [
        "connectivity",
        "certs",
        "agents",
        "gateways",
        "providers",
        "config",
        "events",
        "policy",
    ] {
        assert!(
            passed.iter().any(|(s, _)| s == section),
            "{section} was checked: {:#}",
            last.1
        );
    }
    assert!(passed.contains(&("policy".to_owned(), "gw-dev-02".to_owned())));

    // The probes went through the real chain; their events say they were synthetic, and the
    // decision counters the rollout gates read leave them out.
    let config_arg = config.to_str().expect("utf-8 path");
    let tail = ktctl(&[
        "--config",
        config_arg,
        "events",
        "tail",
        "--all-gateways",
        "--since",
        "1h",
        "--json",
        "--limit",
        "6",
    ]);
    let events: Vec<Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(events.len(), 6, "{}", String::from_utf8_lossy(&tail.stderr));
    assert!(events.iter().all(|e| e["synthetic"] == true), "{events:#?}");
    let stats = ktctl(&[
        "--config",
        config_arg,
        "events",
        "stats",
        "--all-time",
        "-o",
        "json",
    ]);
    let rows: Vec<Value> = serde_json::from_slice(&stats.stdout).expect("stats json");
    assert!(rows.iter().all(|r| r["total"] == 0), "{rows:#?}");

    stop_process(&dir, Role::Gateway, Some("gw-dev-02"));
    stop_process(&dir, Role::Provider, None);
    let expected = vec![
        ("gateways".to_owned(), "gw-dev-02".to_owned()),
        ("providers".to_owned(), "mock".to_owned()),
    ];
    let reported = wait_for(Duration::from_secs(30), || {
        last = doctor(&config);
        marked(&last.1, "fail") == expected
    })
    .await;
    assert!(reported, "exactly the two problems: {:#}", last.1);
    assert_eq!(last.0, 1, "a failed check exits 1");
    assert!(marked(&last.1, "warn").is_empty(), "{:#}", last.1);
    assert_eq!(last.1["summary"]["errors"], 2);
    let hints: Vec<&str> = last.1["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["mark"] == "fail")
        .filter_map(|c| c["hint"].as_str())
        .collect();
    assert_eq!(hints.len(), 2, "one hint per problem: {:#}", last.1);
    assert!(hints[0].contains("start the gateway"), "{hints:?}");
    assert!(
        hints[1].contains("unreachable from every region"),
        "{hints:?}"
    );
}
