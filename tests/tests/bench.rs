//! Smoke runs of every `kt-bench` scenario with a small simulated fleet, so the tool cannot rot.
//! The big runs (10,000 agents) are in BENCHMARKS.md, not here.

use serde_json::Value;

/// Runs `kt-bench SCENARIO ARGS...` with its own certificate cache; returns its JSON line.
fn bench(args: &[&str]) -> Value {
    let certs = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(kt_e2e::bin("kt-bench"))
        .args(args)
        .arg("--certs")
        .arg(certs.path())
        .output()
        .expect("run kt-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stdout}\n{stderr}");
    let line = stdout.lines().last().unwrap_or_default();
    let json: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    assert!(!stderr.trim().is_empty(), "a human summary");
    json
}

#[test]
fn connect_and_steady() {
    let connect = bench(&["connect", "--agents", "200"]);
    assert_eq!(connect["connected"], 200, "{connect}");
    assert!(
        connect["seconds_to_all_connected"].as_f64().is_some(),
        "{connect}"
    );

    let steady = bench(&[
        "steady",
        "--agents",
        "200",
        "--heartbeat",
        "1s",
        "--duration",
        "3s",
    ]);
    assert!(
        steady["heartbeats"].as_u64().is_some_and(|n| n >= 400),
        "{steady}"
    );
    assert!(
        steady["coordinator_rss_mib"]
            .as_f64()
            .is_some_and(|m| m > 1.0),
        "{steady}"
    );
    assert!(
        steady["heartbeat_processing_ms"]["count"]
            .as_f64()
            .is_some_and(|n| n > 0.0),
        "{steady}"
    );
}

#[test]
fn rollout_reaches_every_agent() {
    let rollout = bench(&["rollout", "--agents", "200"]);
    assert_eq!(rollout["applied"], 200, "{rollout}");
    assert_eq!(rollout["rollout_state"], "succeeded", "{rollout}");
    assert!(
        rollout["offer_bytes"]
            .as_u64()
            .is_some_and(|b| b > 200 * 100),
        "{rollout}"
    );
}

#[test]
fn ha_rolls_out_through_etcd_and_survives_the_leader() {
    let ha = bench(&[
        "ha",
        "--agents",
        "60",
        "--heartbeat",
        "1s",
        "--reconnect-spread",
        "1s",
    ]);
    assert_eq!(ha["rollout"]["applied"], 60, "{ha}");
    assert_eq!(ha["rollout"]["state"], "succeeded", "{ha}");
    for measured in [
        "leader_elected_ms",
        "takeover_recorded_ms",
        "rollout_moved_ms",
    ] {
        assert!(
            ha["takeover"][measured].as_f64().is_some(),
            "{measured}: {ha}"
        );
    }
}

#[test]
fn storm_recovers_every_agent() {
    let storm = bench(&[
        "storm",
        "--agents",
        "200",
        "--heartbeat",
        "1s",
        "--reconnect-spread",
        "2s",
    ]);
    assert!(storm["seconds_to_recover"].as_f64().is_some(), "{storm}");
    let per_second: u64 = storm["reconnects_per_second"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert!(per_second >= 200, "every agent reconnected: {storm}");
}

#[test]
fn events_and_watch() {
    for bus in ["embedded", "nats"] {
        let events = bench(&[
            "events",
            "--duration",
            "2s",
            "--rate",
            "10000",
            "--bus",
            bus,
        ]);
        assert_eq!(events["bus"], bus, "{events}");
        assert_eq!(events["sent"], events["planned"], "{events}");
        assert_eq!(
            events["received_per_subscriber"][0], events["planned"],
            "{events}"
        );
    }

    let watch = bench(&[
        "watch",
        "--agents",
        "100",
        "--watchers",
        "3",
        "--duration",
        "2s",
    ]);
    let changes = watch["health_changes"].as_u64().unwrap_or(0);
    assert!(changes > 0, "{watch}");
    for n in watch["updates_per_watcher"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert_eq!(
            n.as_u64(),
            Some(changes),
            "every watcher saw every change: {watch}"
        );
    }
}
