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
    let (new_leader, _) = successor(&fleet, &leader, epoch).await;
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

/// The current leader, read from etcd.
fn current_leader(fleet: &HaFleet) -> Option<(String, i64)> {
    aside(fleet.leader())
}

/// Waits until a replica other than `leader` leads with an epoch above `epoch`; that one.
async fn successor(fleet: &HaFleet, leader: &str, epoch: i64) -> (String, i64) {
    let mut successor = None;
    let elected = wait_for(PATIENCE, || {
        successor = current_leader(fleet).filter(|(name, e)| name != leader && *e > epoch);
        successor.is_some()
    })
    .await;
    assert!(elected, "nobody took over from {leader}");
    successor.expect("successor")
}

/// Runs `work` to its end on a runtime of its own, in a thread beside the test's: the
/// conditions `wait_for` polls are not async.
fn aside<T: Send>(work: impl std::future::Future<Output = Option<T>> + Send) -> Option<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(work)
        })
        .join()
        .ok()
        .flatten()
    })
}

/// Pushes `version` to the test group through replica `i`, rolling one gateway at a time.
fn push(fleet: &HaFleet, i: usize, version: &str, min_healthy: &str) -> std::process::Output {
    push_to(fleet, i, kt_e2e::GROUP, version, min_healthy)
}

fn push_to(
    fleet: &HaFleet,
    i: usize,
    group: &str,
    version: &str,
    min_healthy: &str,
) -> std::process::Output {
    let file = fleet.policy(version);
    fleet.ktctl(
        i,
        &[
            "config",
            "push",
            "--file",
            &file,
            "--group",
            group,
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            "--min-healthy-time",
            min_healthy,
            "--pause-between",
            "1s",
            "--detach",
        ],
    )
}

fn history_text(r: &Value) -> Vec<String> {
    r["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|t| t["what"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_stops_before_its_lease_ends_and_its_epoch_is_refused() {
    let n = 4;
    let fleet = HaFleet::start(3, n);
    let rows = all_connected(&fleet, 0, n).await;
    let (leader, epoch) = current_leader(&fleet).expect("a leader");
    let cut = fleet.index_of(&leader);
    let other = (cut + 1) % 3;
    // The rollout moves the gateways whose sessions other replicas hold: the cut-off replica's
    // own agents can be reached by nobody else until the partition heals (a bake that cannot see
    // them would rightly be inconclusive).
    let movable: Vec<String> = rows
        .iter()
        .filter(|r| r["replica"] != leader.as_str())
        .filter_map(|r| r["gateway"].as_str().map(str::to_owned))
        .collect();
    assert!(movable.len() >= 2, "{rows:#?}");
    let groups = fleet.dir.path().join("movable.yaml");
    std::fs::write(
        &groups,
        kt_launch::configs::groups_file("movable", &movable),
    )
    .expect("groups");
    let out = fleet.ktctl(
        other,
        &["groups", "apply", "-f", &groups.display().to_string()],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let known = wait_for(PATIENCE, || {
        let out = fleet.ktctl(cut, &["groups", "list", "-o", "json"]);
        String::from_utf8_lossy(&out.stdout).contains("movable")
    })
    .await;
    assert!(known, "the leader never learned the group");
    let out = push_to(&fleet, other, "movable", "1.1.0", "8s");
    assert!(out.status.success(), "push: {}", output_text(&out));
    // Cut the leader off from etcd while batch 1 bakes.
    let baking = wait_for(PATIENCE, || {
        history_text(&rollout(&fleet, other, "r-1"))
            .iter()
            .any(|h| h.contains("baking"))
    })
    .await;
    assert!(baking, "batch 1 never baked");
    fleet.etcd_proxies[cut].block();

    // The first moment another replica leads, the cut-off one has already stopped acting.
    let log_of = |i: usize| {
        fleet.coordinators[i]
            .proc
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    };
    let (successor, new_epoch) = successor(&fleet, &leader, epoch).await;
    let stopped = log_of(cut);
    assert!(
        stopped.contains("stopping as leader before it can end"),
        "the cut-off leader had not stopped when another was elected: {stopped}"
    );
    let survivor = fleet.index_of(&successor);

    // The new leader carries the rollout on with the gateways it can reach.
    let mut taken_over = Vec::new();
    let moved = wait_for(PATIENCE, || {
        taken_over = history_text(&rollout(&fleet, survivor, "r-1"));
        let from = taken_over
            .iter()
            .position(|h| h.contains("taken over by leader"));
        from.is_some_and(|from| taken_over[from..].iter().any(|h| h.contains(": applied")))
    })
    .await;
    assert!(
        moved,
        "the new leader never applied a batch: {taken_over:#?}"
    );
    let from = taken_over
        .iter()
        .position(|h| h.contains("taken over by leader"))
        .expect("takeover");
    let target = taken_over[from..]
        .iter()
        .find_map(|h| {
            h.split(": applied")
                .next()
                .filter(|_| h.contains(": applied"))
        })
        .expect("a gateway the new leader moved")
        .to_owned();

    // A deposed leader's offer still in flight: stamped with the old epoch, of a config nobody
    // rolled out. The replica holding the session delivers it; the agent refuses it.
    let mut etcd = fleet.etcd_client().await;
    let cluster = etcd
        .get("/kt-fleet/election", None)
        .await
        .expect("etcd")
        .header()
        .map(|h| format!("{:x}", h.cluster_id()))
        .expect("cluster id");
    let sneaky = std::fs::read_to_string(fleet.policy("9.9.9")).expect("policy");
    let hash = kt_gateway::config::content_hash(sneaky.as_bytes());
    let meta = serde_json::json!({
        "hash": hash, "version": "9.9.9", "author": "deposed", "created_at_unix_ms": 1, "message": "",
    });
    etcd.put(
        format!("/kt-fleet/config-content/{hash}"),
        sneaky.as_bytes(),
        None,
    )
    .await
    .expect("put");
    etcd.put(
        format!("/kt-fleet/config-meta/{hash}"),
        meta.to_string(),
        None,
    )
    .await
    .expect("put");
    let offer = kt_proto::v1::ConfigOffer {
        offer_id: "deposed-leader-offer".into(),
        config: Some(kt_proto::v1::ConfigRef {
            version: "9.9.9".into(),
            hash: hash.clone(),
        }),
        content: Vec::new(),
        rollback: true,
        apply_deadline_ms: 10_000,
        epoch: u64::try_from(epoch).expect("epoch"),
        epoch_cluster: cluster,
        shadow: false,
    };
    assert!(new_epoch > epoch);
    etcd.put(
        format!("/kt-fleet/offer/{target}"),
        prost::Message::encode_to_vec(&offer),
        None,
    )
    .await
    .expect("inject");
    let mut answer = None;
    let refused = wait_for(PATIENCE, || {
        answer = read_answer(&fleet, &target);
        answer
            .as_ref()
            .is_some_and(|a| a.offer_id == "deposed-leader-offer")
    })
    .await;
    assert!(refused, "no answer to the injected offer: {answer:?}");
    let answer = answer.expect("answer");
    assert_eq!(
        answer.phase,
        kt_proto::v1::ConfigPhase::StaleEpoch as i32,
        "{answer:?}"
    );
    assert!(answer.error.contains("deposed leader"), "{answer:?}");
    let (_, rows) = fleet.health(survivor);
    let r = row(&rows, &target).expect("row");
    assert_eq!(
        r["config_version"], "1.1.0",
        "the stale offer changed nothing: {r:#}"
    );

    // The rollout finishes; healed, the cut-off replica rejoins and sees the same fleet.
    let out = fleet.ktctl(survivor, &["rollout", "status", "r-1", "--watch"]);
    assert_eq!(out.status.code(), Some(0), "rollout: {}", output_text(&out));
    fleet.etcd_proxies[cut].unblock();
    let mut last = Vec::new();
    let same = wait_for(PATIENCE, || {
        let (code, rows) = fleet.health(cut);
        last = rows;
        code == 0
            && last.len() == n
            && last.iter().all(|r| {
                let moved = movable.iter().any(|m| r["gateway"] == m.as_str());
                let version = if moved { "1.1.0" } else { "1.0.0" };
                r["config_version"] == version
                    && r["desired_version"] == version
                    && r["sync"] == "in_sync"
            })
    })
    .await;
    assert!(same, "after the partition healed: {last:#?}");
}

/// The agent's last answer for `gateway`, as the replica holding its session wrote it.
fn read_answer(fleet: &HaFleet, gateway: &str) -> Option<kt_proto::v1::ConfigStatus> {
    aside(async {
        let mut etcd = fleet.etcd_client().await;
        let got = etcd
            .get(format!("/kt-fleet/answer/{gateway}"), None)
            .await
            .ok()?;
        let kv = got.kvs().first()?;
        <kt_proto::v1::ConfigStatus as prost::Message>::decode(kv.value()).ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_a_killed_replica_reconnect_to_the_others() {
    let n = 6;
    let mut fleet = HaFleet::start(3, n);
    let rows = all_connected(&fleet, 0, n).await;
    // Kill a replica that is not the leader and holds sessions.
    let (leader, _) = current_leader(&fleet).expect("a leader");
    let victim = (fleet.index_of(&leader) + 1) % 3;
    let victim_name = format!("replica-{}", victim + 1);
    let held: Vec<String> = rows
        .iter()
        .filter(|r| r["replica"] == victim_name.as_str())
        .filter_map(|r| r["gateway"].as_str().map(str::to_owned))
        .collect();
    assert!(!held.is_empty(), "the victim holds no session: {rows:#?}");
    // Events stay with the replica an agent is connected to, and a tail says so.
    let note = first_stderr_line(&fleet, victim, &["events", "tail", "--all-gateways"]);
    assert!(
        note.contains("shows the events of the agents connected to it only"),
        "{note}"
    );
    // `cluster status` lists the replicas, the leader and the agents each holds.
    let mut status = Value::Null;
    let listed = wait_for(PATIENCE, || {
        status = cluster_status(&fleet, victim);
        status["replicas"].as_array().is_some_and(|r| r.len() == 3)
    })
    .await;
    assert!(listed, "{status:#}");
    assert_eq!(status["leader"], leader.as_str(), "{status:#}");
    assert_eq!(status["etcd"]["reachable"], true, "{status:#}");
    let agents: u64 = status["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["agents"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(agents, n as u64, "{status:#}");
    fleet.coordinators[victim].kill();
    let survivor = (victim + 1) % 3;
    let mut last = Vec::new();
    let back = wait_for(PATIENCE, || {
        let (_, rows) = fleet.health(survivor);
        last = rows;
        last.len() == n
            && last
                .iter()
                .all(|r| r["agent"] == "connected" && r["replica"] != victim_name.as_str())
    })
    .await;
    assert!(
        back,
        "the victim's agents {held:?} did not come back: {last:#?}"
    );
    // Its lease ends with it: two replicas left, and doctor's control plane check passes.
    let gone = wait_for(PATIENCE, || {
        status = cluster_status(&fleet, survivor);
        status["replicas"].as_array().is_some_and(|r| r.len() == 2)
    })
    .await;
    assert!(gone, "{status:#}");
    let out = fleet.ktctl(survivor, &["doctor", "--checks", "connectivity", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let check = report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["subject"] == "control plane")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(check["mark"], "pass", "{}", output_text(&out));
}

fn cluster_status(fleet: &HaFleet, i: usize) -> Value {
    let out = fleet.ktctl(i, &["cluster", "status", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_pauses_while_etcd_is_down_and_finishes_when_it_returns() {
    let n = 4;
    let mut fleet = HaFleet::start(3, n);
    all_connected(&fleet, 0, n).await;
    let out = push(&fleet, 0, "1.1.0", "1s");
    assert!(out.status.success(), "push: {}", output_text(&out));
    let started = wait_for(PATIENCE, || {
        history_text(&rollout(&fleet, 0, "r-1"))
            .iter()
            .any(|h| h.contains("baking"))
    })
    .await;
    assert!(started, "the rollout never started");
    let (leader, _) = current_leader(&fleet).expect("a leader");
    let leader = fleet.index_of(&leader);
    fleet.etcd = None; // SIGKILL
    let down = Instant::now();
    // The leader stops within its lease; after that nothing moves.
    let stopped = wait_for(PATIENCE, || {
        fleet.coordinators[leader].proc.as_ref().is_some_and(|p| {
            p.log_text()
                .contains("stopping as leader before it can end")
        })
    })
    .await;
    assert!(stopped, "the leader never stopped acting");
    let versions = |fleet: &HaFleet| -> Vec<String> {
        fleet
            .gateways
            .iter()
            .map(|g| {
                std::fs::read_to_string(&g.policy)
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.trim_start().starts_with("version:"))
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let frozen = versions(&fleet);
    // Agents stay connected, and the rollout's status says why it does not move.
    let (code, rows) = fleet.health(1);
    assert_eq!(code, 0, "{rows:#?}");
    assert!(rows.iter().all(|r| r["agent"] == "connected"), "{rows:#?}");
    let out = fleet.ktctl(1, &["rollout", "status", "r-1"]);
    let said = output_text(&out);
    assert!(!out.status.success() && said.contains("etcd"), "{said}");
    let out = fleet.ktctl(1, &["cluster", "status"]);
    let said = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("etcd") && said.contains("UNREACHABLE"),
        "{said}"
    );
    // 20 s of etcd down in all.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(down.elapsed())).await;
    assert_eq!(
        versions(&fleet),
        frozen,
        "gateways moved while etcd was down"
    );
    fleet.start_etcd();
    let out = fleet.ktctl(2, &["rollout", "status", "r-1", "--watch"]);
    assert_eq!(out.status.code(), Some(0), "rollout: {}", output_text(&out));
    let rows = all_connected(&fleet, 2, n).await;
    for r in &rows {
        assert_eq!(r["config_version"], "1.1.0", "{r:#}");
    }
}

/// The first line `ktctl ARGS` writes to stderr (within a deadline); the process is killed then.
fn first_stderr_line(fleet: &HaFleet, i: usize, args: &[&str]) -> String {
    use std::io::BufRead;
    let mut child = std::process::Command::new(kt_e2e::bin("ktctl"))
        .arg("--config")
        .arg(fleet.ktctl_config(i))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ktctl");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stderr).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(PATIENCE).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_gracefully_hands_over_at_once() {
    let mut fleet = HaFleet::start(3, 2);
    all_connected(&fleet, 0, 2).await;
    let (leader, epoch) = current_leader(&fleet).expect("a leader");
    let index = fleet.index_of(&leader);
    let stopping = fleet.coordinators[index].proc.take().expect("running");
    let asked = Instant::now();
    // SIGTERM: the leader resigns and revokes its lease on the way out.
    stopping.terminate();
    successor(&fleet, &leader, epoch).await;
    let handover = asked.elapsed();
    // A leader that did not resign would be replaced only when its lease ends.
    assert!(
        handover < kt_e2e::ha::LEASE_TTL / 2,
        "took {handover:?} (lease {:?})",
        kt_e2e::ha::LEASE_TTL
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_kept_in_etcd_and_the_same_on_every_replica() {
    let fleet = HaFleet::start(3, 0);
    let created = fleet.ktctl(
        0,
        &["token", "create", "--gateway-id", "gw-new-01", "-o", "json"],
    );
    assert!(created.status.success(), "{}", output_text(&created));
    let created: Value = serde_json::from_slice(&created.stdout).expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let revoked = fleet.ktctl(1, &["token", "revoke", &id]);
    assert!(revoked.status.success(), "{}", output_text(&revoked));
    for replica in 0..3 {
        let out = fleet.ktctl(replica, &["token", "list", "-o", "json"]);
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(
            rows.iter()
                .any(|r| r["id"] == id.as_str() && r["state"] == "revoked"),
            "replica {replica}: {}",
            output_text(&out)
        );
    }
}

/// Enrollment and revocation with the state in etcd: a one-use token raced on two replicas
/// enrolls exactly one agent (the use is taken with a compare-and-set in etcd), and an agent
/// revoked on one replica loses its session on another within the time replicas take to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_enrolls_once_across_replicas_and_a_revocation_reaches_every_replica() {
    use kt_e2e::raw;
    let fleet = HaFleet::start(2, 0);
    let token = kt_e2e::create_token(&fleet.ktctl_config(0), &["--gateway-id", "gw-new-01"]);
    let fingerprint = fleet.pki.root_fingerprint();
    let racers: Vec<std::thread::JoinHandle<std::process::Output>> = (0..2)
        .map(|i| {
            let host = fleet.dir.path().join(format!("host-{i}"));
            std::fs::create_dir_all(&host).expect("dir");
            std::fs::write(host.join("join-token"), &token).expect("token");
            let coordinator = format!("https://{}", fleet.coordinators[i].addr);
            let fingerprint = fingerprint.clone();
            std::thread::spawn(move || {
                std::process::Command::new(kt_e2e::bin("kt-agent"))
                    .args(["enroll", "--coordinator", &coordinator, "--ca-fingerprint"])
                    .arg(&fingerprint)
                    .arg("--token-file")
                    .arg(host.join("join-token"))
                    .arg("--dir")
                    .arg(&host)
                    .output()
                    .expect("kt-agent enroll")
            })
        })
        .collect();
    let outcomes: Vec<std::process::Output> = racers
        .into_iter()
        .map(|racer| racer.join().expect("racer"))
        .collect();
    let enrolled = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(
        enrolled,
        1,
        "exactly one enrollment: {:?}",
        outcomes.iter().map(output_text).collect::<Vec<_>>()
    );
    let loser = outcomes
        .iter()
        .find(|o| !o.status.success())
        .expect("loser");
    assert!(
        output_text(loser).contains("used up"),
        "{}",
        output_text(loser)
    );

    // A session on replica 2, revoked through replica 1.
    fleet.pki.issue_agent("gw-raw");
    let hello = kt_proto::v1::Hello {
        gateway_id: "gw-raw".into(),
        boot_id: "raw".into(),
        ..Default::default()
    };
    let mut session = raw::open(fleet.coordinators[1].addr, &fleet.pki.dir, "gw-raw", hello)
        .await
        .expect("a session on replica 2");
    let revoked = fleet.ktctl(
        0,
        &["agent", "revoke", "gw-raw", "--reason", "decommissioned"],
    );
    assert!(revoked.status.success(), "{}", output_text(&revoked));
    let at = Instant::now();
    let ended = session.ended(Duration::from_secs(20)).await;
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("decommissioned"), "{ended:?}");
    // Replicas read revocations every 300 ms; a loaded machine gets slack, not a free pass.
    assert!(at.elapsed() < Duration::from_secs(3), "{:?}", at.elapsed());
}
