//! Desired state: what each gateway should run, kept by the coordinator across restarts,
//! compared with what it runs (in sync, converging, drifted), enforced when a group says so,
//! and fed by groups' config sources. Real processes throughout.

use std::time::Duration;

use kt_e2e::{TestFleet, all_healthy, output_text, row, wait_for};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(40);

async fn fleet(n: usize) -> TestFleet {
    let fleet = TestFleet::start(n);
    fleet
        .wait_for_health("fleet healthy and in sync", PATIENCE, |code, rows| {
            all_healthy(n)(code, rows) && rows.iter().all(|r| r["sync"] == "in_sync")
        })
        .await;
    fleet
}

/// The gateways' first policy (`original`, version 1.0.0) with another version label.
fn variant(original: &str, version: &str) -> String {
    assert!(original.contains("version: 1.0.0"));
    original.replace("version: 1.0.0", &format!("version: {version}"))
}

fn write(fleet: &TestFleet, name: &str, text: &str) -> String {
    let path = fleet.dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

fn hash(text: &str) -> String {
    kt_gateway::config::content_hash(text.as_bytes())
}

/// A gateway's `health -o json` row, once the coordinator is reachable.
fn gateway_row(fleet: &TestFleet, id: &str) -> Value {
    let (_, rows) = fleet.health();
    row(&rows, id).cloned().unwrap_or(Value::Null)
}

/// Rewrites the coordinator's groups file and has it read again (SIGHUP).
fn set_groups(fleet: &TestFleet, text: &str) {
    std::fs::write(&fleet.coordinator.groups, text).expect("groups");
    fleet
        .coordinator
        .proc
        .as_ref()
        .expect("running")
        .signal(nix::sys::signal::Signal::SIGHUP);
}

/// Reloads a gateway's config file as someone editing it by hand would.
async fn reload(fleet: &TestFleet, index: usize) {
    let url = fleet.gateways[index].url("/admin/reload");
    let answer = reqwest::Client::new()
        .post(&url)
        .send()
        .await
        .expect("reload");
    assert!(answer.status().is_success(), "{url}: {}", answer.status());
}

fn groups(fleet: &TestFleet) -> Vec<Value> {
    let out = fleet.ktctl(&["groups", "list", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("groups: {}", output_text(&out)))
}

fn group(fleet: &TestFleet, name: &str) -> Value {
    groups(fleet)
        .into_iter()
        .find(|g| g["name"] == name)
        .unwrap_or(Value::Null)
}

fn rollouts(fleet: &TestFleet) -> Vec<Value> {
    let out = fleet.ktctl(&["rollout", "list", "-o", "json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("rollouts: {}", output_text(&out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_survives_a_restart_and_drift_is_shown_then_enforced() {
    let mut fleet = fleet(2).await;
    let original = std::fs::read_to_string(&fleet.gateways[0].policy).expect("policy");
    let next = variant(&original, "1.1.0");
    let file = write(&fleet, "policy-1.1.0.yaml", &next);
    let out = fleet.ktctl(&[
        "config",
        "push",
        "--file",
        &file,
        "--group",
        kt_e2e::GROUP,
        "--strategy",
        "all-at-once",
        "--min-healthy-time",
        "0s",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    // Complete means reported: right after the push returns, both run it, as desired.
    let (_, rows) = fleet.health();
    for r in &rows {
        assert_eq!(r["config_hash"], hash(&next), "{r:#}");
        assert_eq!(r["desired_hash"], hash(&next), "{r:#}");
        assert_eq!(r["sync"], "in_sync", "{r:#}");
    }

    // While the coordinator is down, gw-test-01 is put back on the old file by hand.
    fleet.coordinator.stop();
    std::fs::write(&fleet.gateways[0].policy, &original).expect("hand edit");
    reload(&fleet, 0).await;
    fleet.coordinator.start_again();
    fleet
        .wait_for_health(
            "gw-test-01 drifted, its desired config kept",
            PATIENCE,
            |_, rows| {
                row(rows, "gw-test-01").is_some_and(|r| {
                    r["sync"] == "drifted"
                        && r["config_hash"] == hash(&original)
                        && r["desired_hash"] == hash(&next)
                        && r["drifted_since"].is_string()
                }) && row(rows, "gw-test-02").is_some_and(|r| r["sync"] == "in_sync")
            },
        )
        .await;
    let doctor = fleet.ktctl(&["doctor", "--checks", "config"]);
    let said = output_text(&doctor);
    assert!(said.contains("drifted: runs 1.0.0"), "{said}");

    // A drift seen while the coordinator runs: a hand edit of gw-test-02.
    std::fs::write(&fleet.gateways[1].policy, &original).expect("hand edit");
    reload(&fleet, 1).await;
    fleet
        .wait_for_health("gw-test-02 drifted too", PATIENCE, |_, rows| {
            row(rows, "gw-test-02").is_some_and(|r| r["sync"] == "drifted")
        })
        .await;

    // Under `drift: enforce`, both are offered their desired config again.
    set_groups(
        &fleet,
        "groups:\n  test:\n    gateways: [gw-test-01, gw-test-02]\n    drift: enforce\n",
    );
    fleet
        .wait_for_health("both back on their desired config", PATIENCE, |_, rows| {
            rows.iter()
                .all(|r| r["sync"] == "in_sync" && r["config_hash"] == hash(&next))
        })
        .await;
    assert_eq!(
        std::fs::read_to_string(&fleet.gateways[0].policy).expect("policy"),
        next
    );
    let log = fleet.coordinator.proc.as_ref().expect("running").log_text();
    assert!(log.contains("offered again"), "re-offers are logged");

    // A pin moves one gateway's desired config (and, pinned, it is moved there); unpinning
    // returns it to what its rollouts settled.
    let out = fleet.ktctl(&[
        "config",
        "pin",
        "--gateway",
        "gw-test-02",
        "1.0.0",
        "--reason",
        "test",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    fleet
        .wait_for_health("gw-test-02 runs its pin", PATIENCE, |_, rows| {
            row(rows, "gw-test-02").is_some_and(|r| {
                r["pinned"] == true && r["sync"] == "in_sync" && r["config_hash"] == hash(&original)
            })
        })
        .await;
    let out = fleet.ktctl(&["config", "unpin", "--gateway", "gw-test-02"]);
    assert!(out.status.success(), "{}", output_text(&out));
    fleet
        .wait_for_health(
            "gw-test-02 back on the group's version",
            PATIENCE,
            |_, rows| {
                row(rows, "gw-test-02").is_some_and(|r| {
                    r["pinned"] == false
                        && r["sync"] == "in_sync"
                        && r["config_hash"] == hash(&next)
                })
            },
        )
        .await;
    let unknown = fleet.ktctl(&["config", "pin", "--gateway", "gw-test-02", "9.9.9"]);
    assert!(!unknown.status.success());
    assert!(
        output_text(&unknown).contains("no stored config version"),
        "{}",
        output_text(&unknown)
    );
    let row = gateway_row(&fleet, "gw-test-02");
    assert_eq!(row["sync"], "in_sync", "{row:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_sources_start_rollouts_with_the_groups_defaults_in_order() {
    let fleet = fleet(2).await;
    let original = std::fs::read_to_string(&fleet.gateways[0].policy).expect("policy");
    let source = write(&fleet, "source.yaml", &original);
    let groups_text = format!(
        "groups:
  staging:
    gateways: [gw-test-01]
    config_source: {source}
    source_poll_interval: 200ms
    rollout: {{strategy: rolling, batch_size: 1, min_healthy_time: 2s, rollback_on_error: true}}
  production:
    gateways: [gw-test-02]
    config_source: {source}
    source_poll_interval: 200ms
    after: staging
    rollout: {{strategy: all-at-once, batch_size: 100%, min_healthy_time: 0s, max_block_rate_delta: 0.5, continue_on_inconclusive: true, rollback_on_error: true}}
"
    );
    set_groups(&fleet, &groups_text);
    // The source's first content is what both run: each group settles on it.
    assert!(
        wait_for(PATIENCE, || {
            ["staging", "production"].iter().all(|g| {
                let g = group(&fleet, g);
                g["source_hash"] == hash(&original) && g["desired"]["hash"] == hash(&original)
            })
        })
        .await,
        "{:#?}",
        groups(&fleet)
    );
    let before = rollouts(&fleet).len();

    // An invalid source starts nothing and says where it is wrong.
    let broken = original.replace("version: 1.0.0", "version: 1.0.9\n  colour: blue");
    std::fs::write(&source, &broken).expect("write");
    assert!(
        wait_for(PATIENCE, || {
            let error = group(&fleet, "staging")["source_error"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            error.contains("source.yaml") && error.contains("colour") && error.contains("line")
        })
        .await,
        "{:#?}",
        groups(&fleet)
    );
    let listed = output_text(&fleet.ktctl(&["groups", "list"]));
    assert!(listed.contains("config source not used"), "{listed}");
    let doctor = output_text(&fleet.ktctl(&["doctor", "--checks", "config"]));
    assert!(doctor.contains("config source not used"), "{doctor}");
    assert_eq!(
        rollouts(&fleet).len(),
        before,
        "an invalid source starts nothing"
    );

    // A valid change: staging first, with its declared defaults; production only once
    // staging's gateway reports the new content running.
    let v110 = variant(&original, "1.1.0");
    std::fs::write(&source, &v110).expect("write");
    let finished = |group: &str, hash: &str| {
        rollouts(&fleet).into_iter().find(|r| {
            r["target"].as_str().is_some_and(|t| t.contains(group))
                && r["config"]["hash"] == hash
                && r["state"] == "succeeded"
        })
    };
    assert!(
        wait_for(PATIENCE, || finished("production", &hash(&v110)).is_some()).await,
        "{:#?}",
        rollouts(&fleet)
    );
    let staging = finished("staging", &hash(&v110)).expect("staging rolled out first");
    let production = finished("production", &hash(&v110)).expect("production");
    assert_eq!(staging["created_by"], "coordinator (config source)");
    assert_eq!(staging["spec"]["strategy"], "rolling", "{staging:#}");
    assert_eq!(staging["spec"]["min_healthy_time_ms"], 2000, "{staging:#}");
    assert_eq!(
        production["spec"]["strategy"], "all-at-once",
        "{production:#}"
    );
    assert_eq!(
        production["spec"]["max_block_rate_delta"], 0.5,
        "{production:#}"
    );
    let staging_done = staging["history"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|t| t["at_unix_ms"].as_u64())
        .expect("history");
    let production_started = production["created_at_unix_ms"].as_u64().expect("created");
    assert!(
        production_started >= staging_done,
        "production started at {production_started}, before staging finished at {staging_done}"
    );

    // Undoing production holds 1.1.0 back from the source until the source changes.
    let undo = fleet.ktctl(&[
        "rollout",
        "undo",
        "--group",
        "production",
        "--min-healthy-time",
        "0s",
    ]);
    assert!(undo.status.success(), "{}", output_text(&undo));
    let count = rollouts(&fleet).len();
    let held = group(&fleet, "production");
    assert_eq!(held["held"]["hash"], hash(&v110), "{held:#}");
    assert_eq!(held["desired"]["hash"], hash(&original), "{held:#}");
    // Many polls of the unchanged source later, nothing was re-applied.
    let reapplied = wait_for(Duration::from_secs(3), || rollouts(&fleet).len() > count).await;
    assert!(
        !reapplied,
        "the source re-applied an undone version: {:#?}",
        rollouts(&fleet)
    );
    assert_eq!(
        gateway_row(&fleet, "gw-test-02")["config_hash"],
        hash(&original)
    );

    // A new content goes out again, to both, in order.
    let v120 = variant(&original, "1.2.0");
    std::fs::write(&source, &v120).expect("write");
    assert!(
        wait_for(PATIENCE, || {
            let (_, rows) = fleet.health();
            rows.iter()
                .all(|r| r["config_hash"] == hash(&v120) && r["sync"] == "in_sync")
        })
        .await,
        "both on 1.2.0 from the source: {:#?}\n{:#?}",
        groups(&fleet),
        rollouts(&fleet)
            .iter()
            .map(|r| (
                r["id"].clone(),
                r["target"].clone(),
                r["state"].clone(),
                r["message"].clone()
            ))
            .collect::<Vec<_>>()
    );
    assert!(group(&fleet, "production")["held"].is_null());
}
