//! A replicated control plane (`storage: etcd`): three coordinator replicas on Debian's etcd,
//! gateways spread over them, the leader killed or cut off in the middle of a rollout. Real
//! processes throughout; etcd on loopback with mutual TLS and a CA of its own.

use std::time::{Duration, Instant};

use kt_e2e::ha::HaFleet;
use kt_e2e::{output_text, row, wait_for};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(60);

/// Waits until replica `i` shows all `n` gateways connected and healthy.
async fn all_connected(fleet: &HaFleet, i: usize, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_for(PATIENCE, || {
        let (code, rows) = fleet.health(i);
        last = rows;
        code == 0
            && last.len() == n
            && last
                .iter()
                .all(|r| r["agent"] == "connected" && r["status"] == "healthy")
    })
    .await;
    assert!(
        ok,
        "replica {} never showed all {n} healthy: {last:#?}",
        i + 1
    );
    last
}

fn rollout(fleet: &HaFleet, i: usize, id: &str) -> Value {
    let out = fleet.ktctl(i, &["rollout", "status", id, "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_rollout_is_replaced_and_the_rollout_finishes() {
    let n = 6;
    let mut fleet = HaFleet::start(3, n);
    let rows = all_connected(&fleet, 0, n).await;
    // Every replica sees the same fleet, and the sessions are spread over all three.
    let mut replicas: Vec<&str> = rows.iter().filter_map(|r| r["replica"].as_str()).collect();
    replicas.sort_unstable();
    replicas.dedup();
    assert_eq!(
        replicas.len(),
        3,
        "sessions spread over the replicas: {rows:#?}"
    );
    all_connected(&fleet, 1, n).await;
    all_connected(&fleet, 2, n).await;

    let (leader, epoch) = fleet.leader().await.expect("a leader");
    let leader_index = fleet.index_of(&leader);
    // Push through a replica that is not the leader: the request travels through etcd.
    let follower = (leader_index + 1) % 3;
    let file = fleet.policy("1.1.0");
    let out = fleet.ktctl(
        follower,
        &[
            "config",
            "push",
            "--file",
            &file,
            "--group",
            kt_e2e::GROUP,
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            "--min-healthy-time",
            "1s",
            "--pause-between",
            "1s",
            "--detach",
        ],
    );
    assert!(out.status.success(), "push: {}", output_text(&out));

    // Kill the leader once the second batch is under way.
    let reached = wait_for(PATIENCE, || {
        rollout(&fleet, follower, "r-1")["current_batch"].as_u64() >= Some(1)
    })
    .await;
    assert!(
        reached,
        "second batch never started: {:#}",
        rollout(&fleet, follower, "r-1")
    );
    fleet.coordinators[leader_index].kill();
    let killed = Instant::now();

    // Another replica leads, with a higher epoch, and moves the same rollout on.
    let mut new_leader = None;
    let elected = wait_for(PATIENCE, || {
        new_leader = futures_lite_leader(&fleet);
        new_leader
            .as_ref()
            .is_some_and(|(name, e)| *name != leader && *e > epoch)
    })
    .await;
    assert!(elected, "no new leader after the kill");
    let (new_leader, _) = new_leader.expect("new leader");
    let survivor = fleet.index_of(&new_leader);
    let before = rollout(&fleet, survivor, "r-1");
    let moved = wait_for(PATIENCE, || {
        let now = rollout(&fleet, survivor, "r-1");
        now["history"] != before["history"] || now["state"] != before["state"]
    })
    .await;
    assert!(moved, "the rollout never moved after the takeover");
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "the rollout moved again {takeover:?} after the kill"
    );

    // It finishes; every gateway runs exactly what the rollout intended.
    let out = fleet.ktctl(survivor, &["rollout", "status", "r-1", "--watch"]);
    assert_eq!(out.status.code(), Some(0), "rollout: {}", output_text(&out));
    let r = rollout(&fleet, survivor, "r-1");
    let history = r["history"].to_string();
    assert!(
        history.contains("taken over by leader"),
        "the takeover is in the history: {r:#}"
    );
    // Every surviving replica shows the same fleet: all on 1.1.0, which is what they should run.
    for i in (0..3).filter(|i| *i != leader_index) {
        let mut last = Vec::new();
        let same = wait_for(PATIENCE, || {
            let (code, rows) = fleet.health(i);
            last = rows;
            code == 0
                && fleet.ids().iter().all(|id| {
                    row(&last, id).is_some_and(|r| {
                        r["agent"] == "connected"
                            && r["config_version"] == "1.1.0"
                            && r["desired_version"] == "1.1.0"
                            && r["sync"] == "in_sync"
                            && r["replica"] != leader.as_str()
                    })
                })
        })
        .await;
        assert!(same, "replica {} shows: {last:#?}", i + 1);
    }
}

/// The current leader, read from etcd on a runtime of its own (wait_for's condition is sync).
fn futures_lite_leader(fleet: &HaFleet) -> Option<(String, i64)> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(fleet.leader())
        })
        .join()
        .ok()
        .flatten()
    })
}
