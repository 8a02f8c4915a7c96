//! Events across replicas on NATS JetStream (`events.nats`): Debian's nats-server and etcd on
//! loopback with mutual TLS, three coordinator replicas, agents spread over them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kt_e2e::ha::{HaFleet, NatsRegion};
use kt_e2e::proxy::CutProxy;
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
    let history: Vec<String> = stored_events(&fleet, 2, "10m")
        .iter()
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

    // cluster status and doctor show the bus: the stream, and the leader's count caught up.
    let mut status = Value::Null;
    let caught_up = wait_for(PATIENCE, || {
        status = cluster_status(&fleet, 1);
        status["bus"]["reachable"] == true
            && status["bus"]["counting_lag"] == 0
            && status["bus"]["last_seq"].as_u64() > Some(0)
    })
    .await;
    assert!(caught_up, "cluster status: {status:#}");
    assert_eq!(doctor_mark(&fleet, 1, "event bus"), "pass");
}

fn cluster_status(fleet: &HaFleet, i: usize) -> Value {
    let out = fleet.ktctl(i, &["cluster", "status", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The mark of doctor's connectivity check `subject`, asked of replica `i`.
fn doctor_mark(fleet: &HaFleet, i: usize, subject: &str) -> String {
    let out = fleet.ktctl(i, &["doctor", "--checks", "connectivity", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["subject"] == subject)
        .map(|c| c["mark"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| format!("no {subject} check in {report}"))
}

/// Decision events appended to every gateway's file in rounds, beside the test (bounded: it
/// stops by itself after `rounds`).
struct Traffic {
    thread: Option<std::thread::JoinHandle<()>>,
    per_gateway: u64,
}

impl Traffic {
    fn start(fleet: &HaFleet, rounds: u64, chunk: u64, pause: Duration) -> Self {
        let files: Vec<(PathBuf, String)> = fleet
            .gateways
            .iter()
            .map(|g| (g.events.clone(), g.id.clone()))
            .collect();
        let thread = std::thread::spawn(move || {
            for round in 0..rounds {
                for (file, id) in &files {
                    append_events(file, id, round * chunk + 1, chunk);
                }
                std::thread::sleep(pause);
            }
        });
        Traffic {
            thread: Some(thread),
            per_gateway: rounds * chunk,
        }
    }

    fn finish(&mut self) -> u64 {
        if let Some(thread) = self.thread.take() {
            thread.join().expect("traffic");
        }
        self.per_gateway
    }
}

/// The replica leading now, once one does, by index.
async fn leader_index(fleet: &HaFleet, not: Option<&str>) -> (usize, String) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some((name, _)) = fleet.leader().await
            && Some(name.as_str()) != not
        {
            return (fleet.index_of(&name), name);
        }
        assert!(std::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per gateway: (requests, blocks), from `events stats --all-time` on replica `i`.
fn counters(fleet: &HaFleet, i: usize) -> BTreeMap<String, (u64, u64)> {
    let out = fleet.ktctl(i, &["events", "stats", "--all-time", "-o", "json"]);
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .map(|r| {
            let key = r["gateway"].as_str().unwrap_or_default().to_owned();
            (
                key,
                (
                    r["total"].as_u64().unwrap_or(0),
                    r["block"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// Every event the stream holds from `since` ago, read through replica `i` (`--no-follow`).
fn stored_events(fleet: &HaFleet, i: usize, since: &str) -> Vec<Value> {
    let out = fleet.ktctl(
        i,
        &[
            "events",
            "tail",
            "--json",
            "--all-gateways",
            "--since",
            since,
            "--no-follow",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Per gateway: (requests, blocks), counted from scratch from everything the stream holds,
/// read through replica `i`.
fn counted_from_the_stream(fleet: &HaFleet, i: usize) -> BTreeMap<String, (u64, u64)> {
    let mut counted: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in stored_events(fleet, i, "1h") {
        let entry = counted
            .entry(e["gateway_id"].as_str().unwrap_or_default().to_owned())
            .or_default();
        entry.0 += 1;
        entry.1 += u64::from(e["verdict"] == "block");
    }
    counted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_while_their_replica_is_killed_arrive_once() {
    let n = 6;
    let mut fleet = HaFleet::with_nats(3, n);
    all_connected(&fleet, 0, n).await;
    let (_, rows) = fleet.health(0);
    let holder = rows
        .iter()
        .find(|r| r["gateway"] == "gw-test-01")
        .and_then(|r| r["replica"].as_str())
        .map(|name| fleet.index_of(name))
        .expect("gw-test-01's replica");
    let watcher = (holder + 1) % 3;
    let tail = Tail::start(
        &fleet,
        watcher,
        "tail",
        &["--all-gateways", "--since", "1m"],
    );
    let mut traffic = Traffic::start(&fleet, 40, 25, Duration::from_millis(100));
    // Mid-stream, the replica holding gw-test-01's session dies without a word.
    let first = wait_for(PATIENCE, || tail.ids().len() >= 100).await;
    assert!(first, "events flow before the kill");
    fleet.coordinators[holder].kill();
    let per = traffic.finish();
    let want = expected(&fleet.ids(), per);
    receives_each_once(&tail, &want, "tail after the kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_after_the_leader_is_killed_equal_a_count_of_the_stream() {
    let n = 6;
    let mut fleet = HaFleet::with_nats(3, n);
    all_connected(&fleet, 0, n).await;
    let (leader, name) = leader_index(&fleet, None).await;
    let mut traffic = Traffic::start(&fleet, 40, 25, Duration::from_millis(100));
    // The leader dies while it counts: some batches are counted past its last checkpoint.
    let counting = wait_for(PATIENCE, || {
        counters(&fleet, leader).values().map(|c| c.0).sum::<u64>() >= 300
    })
    .await;
    assert!(
        counting,
        "the leader counts: {:?}",
        counters(&fleet, leader)
    );
    fleet.coordinators[leader].kill();
    let (successor, _) = leader_index(&fleet, Some(&name)).await;
    let per = traffic.finish();
    let want: BTreeMap<String, (u64, u64)> = fleet
        .ids()
        .into_iter()
        .map(|g| (g, (per, per / 10)))
        .collect();
    let mut last = BTreeMap::new();
    let settled = wait_for(PATIENCE, || {
        last = counters(&fleet, successor);
        last == want
    })
    .await;
    let from_scratch = counted_from_the_stream(&fleet, successor);
    assert_eq!(from_scratch, want, "the stream holds every event once");
    assert!(
        settled,
        "counters after the takeover {last:?}, counted from the stream {from_scratch:?}"
    );
    // Every replica shows the same counters (followers take the leader's checkpoints).
    for i in (0..3).filter(|i| *i != leader) {
        let same = wait_for(PATIENCE, || counters(&fleet, i) == want).await;
        assert!(same, "replica {}: {:?}", i + 1, counters(&fleet, i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_nats_restarts_under_traffic() {
    let n = 3;
    let mut fleet = HaFleet::with_nats(2, n);
    all_connected(&fleet, 0, n).await;
    let mut traffic = Traffic::start(&fleet, 60, 20, Duration::from_millis(100));
    let tail = Tail::start(&fleet, 0, "tail", &["--all-gateways", "--since", "1m"]);
    let flowing = wait_for(PATIENCE, || tail.ids().len() >= 60).await;
    assert!(flowing, "events flow before the restart");
    // SIGKILL, then the same server on the same store: what JetStream acknowledged is there.
    fleet.nats = None;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.start_nats();
    let per = traffic.finish();
    // The tail broke with the server; a new one reads everything from the stream.
    let after = Tail::start(&fleet, 1, "after", &["--all-gateways", "--since", "10m"]);
    receives_each_once(
        &after,
        &expected(&fleet.ids(), per),
        "tail after the restart",
    )
    .await;
}

/// The event ids in `tail` of gateways whose id starts with `prefix`.
fn ids_of(tail: &Tail, prefix: &str) -> usize {
    tail.ids()
        .iter()
        .filter(|id| id.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_cut_apart_keep_their_own_events_and_catch_up_on_the_others() {
    let n = 2;
    let shared = tempfile::tempdir().expect("tempdir");
    let pki = shared.path().join("nats-pki");
    // us links to eu through a proxy: the link between the regions, cut at will. eu
    // advertises the proxy, so a reconnecting link goes through it too.
    let eu_leaf = kt_launch::process::free_loopback_addr().expect("port");
    let link = CutProxy::start(eu_leaf);
    let eu = HaFleet::in_region(
        1,
        n,
        NatsRegion {
            name: "eu".into(),
            pki: Some(pki.clone()),
            others: vec!["us".into()],
            remotes: Vec::new(),
            leaf: Some((eu_leaf, link.addr)),
        },
    );
    let us = HaFleet::in_region(
        1,
        n,
        NatsRegion {
            name: "us".into(),
            pki: Some(pki),
            others: vec!["eu".into()],
            remotes: vec![link.addr],
            leaf: None,
        },
    );
    all_connected(&eu, 0, n).await;
    all_connected(&us, 0, n).await;
    let eu_tail = Tail::start(&eu, 0, "tail-eu", &["--all-gateways", "--since", "1m"]);
    let us_tail = Tail::start(&us, 0, "tail-us", &["--all-gateways", "--since", "1m"]);

    let mut eu_traffic = Traffic::start(&eu, 30, 10, Duration::from_millis(1000));
    let mut us_traffic = Traffic::start(&us, 30, 10, Duration::from_millis(1000));
    // Both regions' events reach both tails while the link is up.
    let crossing = wait_for(PATIENCE, || {
        ids_of(&eu_tail, "gw-us-") > 0 && ids_of(&us_tail, "gw-eu-") > 0
    })
    .await;
    assert!(
        crossing,
        "events cross the link: eu sees {} of us, us sees {} of eu",
        ids_of(&eu_tail, "gw-us-"),
        ids_of(&us_tail, "gw-eu-")
    );

    // The link goes down for 20 s under traffic: each region goes on with its own events.
    link.block();
    let cut_at = std::time::Instant::now();
    let (eu_own, us_own) = (ids_of(&eu_tail, "gw-eu-"), ids_of(&us_tail, "gw-us-"));
    let own_go_on = wait_for(Duration::from_secs(20), || {
        ids_of(&eu_tail, "gw-eu-") >= eu_own + 50 && ids_of(&us_tail, "gw-us-") >= us_own + 50
    })
    .await;
    assert!(
        own_go_on,
        "each region ingests and tails its own events while cut off"
    );
    // What was on the way at the cut has landed by now; from here nothing crosses.
    let (eu_seen_us, us_seen_eu) = (ids_of(&eu_tail, "gw-us-"), ids_of(&us_tail, "gw-eu-"));
    let (us_own, eu_own) = (ids_of(&us_tail, "gw-us-"), ids_of(&eu_tail, "gw-eu-"));
    while cut_at.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        (ids_of(&eu_tail, "gw-us-"), ids_of(&us_tail, "gw-eu-")),
        (eu_seen_us, us_seen_eu),
        "nothing crosses a cut link"
    );
    assert!(
        ids_of(&us_tail, "gw-us-") > us_own && ids_of(&eu_tail, "gw-eu-") > eu_own,
        "while each region's own events went on"
    );
    link.unblock();

    // After the link returns, each tail catches up: every event of both regions, once.
    let per = eu_traffic.finish();
    assert_eq!(us_traffic.finish(), per);
    let mut all = eu.ids();
    all.extend(us.ids());
    let want = expected(&all, per);
    receives_each_once(&eu_tail, &want, "eu's tail").await;
    receives_each_once(&us_tail, &want, "us's tail").await;
    // cluster status shows the link from the other region, caught up.
    let status = cluster_status(&eu, 0);
    assert_eq!(status["bus"]["links"][0]["region"], "us", "{status:#}");
    assert_eq!(status["bus"]["links"][0]["lag"], 0, "{status:#}");
}

/// A shadow run on a replicated control plane: started on one replica, carried by the leader
/// through etcd (offers and answers), its report read from the stream on any replica with
/// every gateway's events, stopped on a third replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_run_across_replicas_counts_every_gateways_requests() {
    let n = 3;
    let fleet = HaFleet::with_nats(3, n);
    all_connected(&fleet, 0, n).await;
    let policy = std::fs::read_to_string(fleet.policy("1.1.0")).expect("policy");
    let candidate = fleet.dir.path().join("weather.yaml");
    std::fs::write(
        &candidate,
        policy.replace(
            "      - ignore all previous instructions\n",
            "      - ignore all previous instructions\n      - the weather\n",
        ),
    )
    .expect("candidate");
    let candidate = candidate.display().to_string();
    let out = fleet.ktctl(
        1,
        &[
            "config",
            "shadow",
            "--file",
            &candidate,
            "--group",
            kt_e2e::GROUP,
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", kt_e2e::output_text(&out));
    let run: Value = serde_json::from_slice(&out.stdout).expect("run");
    let id = run["id"].as_str().expect("id").to_owned();
    let report = |i: usize| -> Value {
        let out = fleet.ktctl(i, &["shadow", "report", &id, "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let mut last = Value::Null;
    let loaded = wait_for(PATIENCE, || {
        last = report(2);
        last["gateways"]
            .as_array()
            .is_some_and(|g| g.len() == n && g.iter().all(|g| g["state"] == "loaded"))
    })
    .await;
    assert!(loaded, "not loaded everywhere: {last:#}");

    let client = reqwest::Client::new();
    let prompts = ["what is the weather in Lyon", "write a haiku about autumn"];
    let rounds = 4;
    for _ in 0..rounds {
        for gateway in &fleet.gateways {
            for prompt in prompts {
                let response = client
                    .post(gateway.url("/v1/chat/completions"))
                    .json(&kt_e2e::user_prompt(prompt))
                    .send()
                    .await
                    .expect("gateway answers");
                assert_eq!(response.status(), 200, "the shadow decides nothing");
            }
        }
    }
    let sent = (rounds * n * prompts.len()) as u64;
    let counted = wait_for(PATIENCE, || {
        last = report(0);
        last["report"]["compared"] == sent
    })
    .await;
    assert!(counted, "replica 1 never compared {sent}: {last:#}");

    let out = fleet.ktctl(2, &["shadow", "stop", &id]);
    assert!(out.status.success(), "{}", kt_e2e::output_text(&out));
    let out = fleet.ktctl(1, &["shadow", "report", &id, "--watch", "-o", "json"]);
    assert!(out.status.success(), "{}", kt_e2e::output_text(&out));
    let run: Value = serde_json::from_slice(&out.stdout).expect("run");
    let report = &run["report"];
    assert_eq!(report["stored"], true, "{run:#}");
    assert_eq!(
        report["scope"], "",
        "the stream holds every gateway's events"
    );
    assert_eq!(report["compared"], sent, "{report:#}");
    let flips = report["cells"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["active"] == "allow" && c["shadow"] == "block")
        })
        .cloned()
        .unwrap_or_else(|| panic!("no allow -> block: {report:#}"));
    assert_eq!(flips["count"], sent / 2, "{report:#}");
    let removed = wait_for(PATIENCE, || {
        last = serde_json::from_slice(
            &fleet
                .ktctl(0, &["shadow", "status", &id, "-o", "json"])
                .stdout,
        )
        .unwrap_or(Value::Null);
        last["gateways"]
            .as_array()
            .is_some_and(|g| g.iter().all(|g| g["state"] == "removed"))
    })
    .await;
    assert!(removed, "shadow not removed everywhere: {last:#}");
}
