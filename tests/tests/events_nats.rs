//! Events across replicas on NATS JetStream (`events.nats`): Debian's nats-server and etcd on
//! loopback with mutual TLS, three coordinator replicas, agents spread over them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kt_e2e::ha::HaFleet;
use kt_e2e::{Proc, bin, wait_for};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(90);

/// Waits until replica `i` shows all `n` gateways connected.
async fn all_connected(fleet: &HaFleet, i: usize, n: usize) {
    let mut last = Vec::new();
    let ok = wait_for(PATIENCE, || {
        let (code, rows) = fleet.health(i);
        last = rows;
        code == 0 && last.len() == n && last.iter().all(|r| r["agent"] == "connected")
    })
    .await;
    assert!(
        ok,
        "replica {} never showed all {n} connected: {last:#?}",
        i + 1
    );
}

/// Appends `count` decision events numbered from `from` to a gateway's events file; every
/// tenth is a block.
fn append_events(path: &Path, gateway: &str, from: u64, count: u64) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("events file");
    let mut text = String::new();
    for n in from..from + count {
        let verdict = if n % 10 == 0 { "block" } else { "allow" };
        let line = json!({ "id": format!("{gateway}-{n}"), "gateway_id": gateway, "verdict": verdict,
            "reason_code": "", "config_version": "1.0.0", "config_hash": "sha256:t", "status": 200,
            "policies_evaluated": [] });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    file.write_all(text.as_bytes()).expect("append");
}

/// `ktctl events tail` on replica `i`, running until dropped; its JSON lines go to a file.
struct Tail {
    _proc: Proc,
    out: PathBuf,
}

impl Tail {
    fn start(fleet: &HaFleet, i: usize, name: &str, args: &[&str]) -> Self {
        let out = fleet.dir.path().join(format!("{name}.jsonl"));
        let mut all: Vec<String> = vec![
            "--config".into(),
            fleet.ktctl_config(i).display().to_string(),
            "events".into(),
            "tail".into(),
            "--json".into(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let proc = Proc::spawn_path(&bin("ktctl"), &all, &[], out.clone());
        Tail { _proc: proc, out }
    }

    /// The event ids received so far, in order (stderr lines are not JSON and are skipped).
    fn ids(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Every id of `per` events from each of `ids`, numbered from 1.
fn expected(ids: &[String], per: u64) -> BTreeSet<String> {
    ids.iter()
        .flat_map(|g| (1..=per).map(move |n| format!("{g}-{n}")))
        .collect()
}

/// Waits until `tail` has received exactly `want`, each once; fails with what is missing or
/// doubled.
async fn receives_each_once(tail: &Tail, want: &BTreeSet<String>, what: &str) {
    let done = wait_for(PATIENCE, || tail.ids().len() >= want.len()).await;
    let got = tail.ids();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &got {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = want
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .take(10)
        .collect();
    assert!(
        done && doubled.is_empty() && missing.is_empty() && got.len() == want.len(),
        "{what}: {} of {} received; doubled {doubled:?}; missing (first 10) {missing:?}",
        got.len(),
        want.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_on_every_replica_receives_every_agents_events_once() {
    let n = 6;
    let fleet = HaFleet::with_nats(3, n);
    all_connected(&fleet, 0, n).await;
    // The sessions are spread: each replica holds some agents, and sees only their events
    // without the stream.
    let (_, rows) = fleet.health(0);
    let holders: BTreeSet<&str> = rows.iter().filter_map(|r| r["replica"].as_str()).collect();
    assert_eq!(
        holders.len(),
        3,
        "sessions spread over the replicas: {rows:#?}"
    );

    // A live tail on each replica (from a minute back, so nothing falls before it starts).
    let tails: Vec<Tail> = (0..3)
        .map(|i| {
            Tail::start(
                &fleet,
                i,
                &format!("tail-{}", i + 1),
                &["--all-gateways", "--since", "1m"],
            )
        })
        .collect();
    let per = 300;
    for (gateway, id) in fleet.gateways.iter().zip(fleet.ids()) {
        append_events(&gateway.events, &id, 1, per);
    }
    let want = expected(&fleet.ids(), per);
    for (i, tail) in tails.iter().enumerate() {
        receives_each_once(tail, &want, &format!("live tail on replica {}", i + 1)).await;
    }
    // History reads the same stream: a tail that starts now gets it all.
    let limit = want.len().to_string();
    let out = fleet.ktctl(
        2,
        &[
            "events",
            "tail",
            "--json",
            "--all-gateways",
            "--since",
            "10m",
            "--limit",
            &limit,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(history.len(), want.len(), "history holds each event once");
    assert_eq!(history.iter().cloned().collect::<BTreeSet<_>>(), want);

    // The leader counts the stream: all-time counters on any replica agree with the events.
    let counted = wait_for(PATIENCE, || {
        (0..3).all(|i| {
            let out = fleet.ktctl(i, &["events", "stats", "--all-time", "-o", "json"]);
            let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            rows.len() == n
                && rows
                    .iter()
                    .all(|r| r["total"] == per && r["block"] == per / 10)
        })
    })
    .await;
    let out = fleet.ktctl(0, &["events", "stats", "--all-time", "-o", "json"]);
    assert!(
        counted,
        "counters: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
