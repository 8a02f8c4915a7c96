//! Policy rollouts through the real `ktctl`, coordinator, agents and gateways.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kt_e2e::{TestFleet, all_healthy, output_text, wait_for};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(30);

async fn fleet(n: usize) -> TestFleet {
    let fleet = TestFleet::start(n);
    fleet
        .wait_for_health("fleet healthy", PATIENCE, all_healthy(n))
        .await;
    fleet
}

/// Writes a variant of the policy the gateways run, with `version`, edited by `edit`.
fn policy(fleet: &TestFleet, version: &str, edit: impl Fn(String) -> String) -> String {
    let text = std::fs::read_to_string(&fleet.gateways[0].policy).expect("policy");
    let text = edit(text.replace("version: 1.0.0", &format!("version: {version}")));
    let path = fleet.dir.path().join(format!("policy-{version}.yaml"));
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

/// `ktctl config push --file FILE --group test FLAGS...`
fn push(fleet: &TestFleet, file: &str, flags: &[&str]) -> std::process::Output {
    let mut args = vec!["config", "push", "--file", file, "--group", kt_e2e::GROUP];
    args.extend_from_slice(flags);
    fleet.ktctl(&args)
}

fn hashes(fleet: &TestFleet) -> Vec<String> {
    fleet
        .health()
        .1
        .iter()
        .map(|r| r["config_hash"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The (first) evaluation of gate `name` in a rollout's JSON.
fn gate(r: &Value, name: &str) -> Value {
    r["gates"]
        .as_array()
        .and_then(|gates| gates.iter().find(|g| g["gate"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} gate in {r:#}"))
}

fn rollout(fleet: &TestFleet, id: &str) -> Value {
    let out = fleet.ktctl(&["rollout", "status", id, "-o", "json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("rollout status: {}", output_text(&out)))
}

/// Sends allowed chat requests ("what is the weather today") to every gateway until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
}

impl Traffic {
    fn start(fleet: &TestFleet) -> Self {
        kt_daemon::install_crypto_provider();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let client = reqwest::Client::new();
        for gateway in &fleet.gateways {
            let url = gateway.url("/v1/chat/completions");
            let (stop, sent, client) = (stop.clone(), sent.clone(), client.clone());
            tokio::spawn(async move {
                let body = serde_json::json!({ "model": "mock-small", "messages": [{ "role": "user", "content": "what is the weather today" }] });
                // Bounded: at most two minutes of one request every 10 ms per gateway.
                for _ in 0..12_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let _ = client.post(&url).json(&body).send().await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        Traffic { stop, sent }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_push_moves_one_gateway_at_a_time() {
    let fleet = fleet(3).await;
    let before = hashes(&fleet);
    let file = policy(&fleet, "1.1.0", |t| t);
    let out = push(
        &fleet,
        &file,
        &[
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            "--pause-between",
            "1s",
            "--min-healthy-time",
            "300ms",
            "--rollback-on-error",
            "--reason",
            "e2e",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    // Progress reads in order: a batch's gate lines before the line saying it passed them.
    let printed = output_text(&out);
    let at = |needle: &str| {
        printed
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{printed}"))
    };
    assert!(
        at("gate health      batch 1 passed") < at("batch 1 passed its gates"),
        "{printed}"
    );
    let r = rollout(&fleet, "r-1");
    assert_eq!(r["state"], "succeeded");
    // Batches of one, in order, each applied only after the previous batch's pause.
    let applied_at = |gateway: &str| {
        r["history"]
            .as_array()
            .and_then(|h| {
                h.iter()
                    .find(|t| t["what"] == format!("{gateway}: applied (ok)"))
            })
            .and_then(|t| t["at_unix_ms"].as_u64())
            .unwrap_or_else(|| panic!("no apply of {gateway}: {r:#}"))
    };
    let times = [
        applied_at("gw-test-01"),
        applied_at("gw-test-02"),
        applied_at("gw-test-03"),
    ];
    assert!(times[0] < times[1] && times[1] < times[2], "{times:?}");
    assert!(
        times[1] - times[0] >= 1_300 && times[2] - times[1] >= 1_300,
        "bake + pause between batches: {times:?}"
    );
    let after = hashes(&fleet);
    assert!(
        after.iter().all(|h| h == &after[0]) && after[0] != before[0],
        "all on the new hash: {after:?}"
    );
    let stored = fleet.ktctl(&["config", "show", "1.1.0"]);
    assert_eq!(
        String::from_utf8_lossy(&stored.stdout),
        std::fs::read_to_string(&file).expect("file")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_config_never_reaches_the_other_gateways() {
    let fleet = fleet(3).await;
    let before = hashes(&fleet);
    // A config that does not validate is refused before anything is stored or offered, with
    // every problem named by file and line (before: stored, listed, offered, rejected).
    let invalid = policy(&fleet, "1.1.0", |t| {
        t.replace("    - dlp-filter\n", "    - dlp-filter\n    - teleport\n")
            .replacen("  name: ", "  colour: red\n  name: ", 1)
    });
    let out = push(&fleet, &invalid, &["--rollback-on-error"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let printed = output_text(&out);
    assert!(
        printed.contains(&format!("{invalid}: "))
            && printed.contains("teleport")
            && printed.contains("colour"),
        "{printed}"
    );
    // The coordinator refuses it too, for any other client.
    let mut client = fleet.operator().await;
    let refused = client
        .push_config(kt_proto::v1::PushConfigRequest {
            content: std::fs::read(&invalid).expect("read"),
            spec: Some(kt_proto::v1::RolloutSpec {
                group: kt_e2e::GROUP.into(),
                strategy: kt_proto::v1::Strategy::Rolling as i32,
                size: 1,
                max_block_rate_delta: -1.0,
                max_error_rate: -1.0,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("teleport"), "{refused:?}");
    let versions = output_text(&fleet.ktctl(&["config", "versions"]));
    assert!(!versions.contains("1.1.0"), "{versions}");

    // A valid config a gateway refuses by its own rule (a lower version than it runs): the
    // first gateway answers REJECTED, the rest never receive it, and the version says so.
    let bad = policy(&fleet, "0.9.0", |t| t);
    let out = push(
        &fleet,
        &bad,
        &["--min-healthy-time", "100ms", "--rollback-on-error"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "rolled back: {}",
        output_text(&out)
    );
    let r = rollout(&fleet, "r-1");
    let states: Vec<&str> = r["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .map(|b| b[0]["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, ["rejected", "not_offered", "not_offered"]);
    assert!(
        r["batches"][0][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("only a rollback may go back")),
        "{r:#}"
    );
    assert_eq!(hashes(&fleet), before, "nothing changed anywhere");
    let versions = fleet.ktctl(&["config", "versions", "-o", "json"]);
    let versions: Value = serde_json::from_slice(&versions.stdout).expect("json");
    let rejected = versions
        .as_array()
        .expect("list")
        .iter()
        .find(|v| v["version"] == "0.9.0")
        .expect("0.9.0 stored");
    assert_eq!(
        rejected["rejected_by"][0]["gateway_id"], "gw-test-01",
        "{rejected}"
    );

    // Without --rollback-on-error the rollout pauses for a human instead.
    let out = push(&fleet, &bad, &["--min-healthy-time", "100ms"]);
    assert_eq!(out.status.code(), Some(4), "paused: {}", output_text(&out));
    assert_eq!(rollout(&fleet, "r-2")["state"], "paused");
    let out = fleet.ktctl(&["rollout", "abort", "r-2", "--reason", "bad config"]);
    assert!(out.status.success(), "{}", output_text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verdict_mix_gate_rolls_back_a_policy_that_blocks_everything() {
    let fleet = fleet(3).await;
    let before = hashes(&fleet);
    let traffic = Traffic::start(&fleet);
    assert!(
        wait_for(PATIENCE, || traffic.sent.load(Ordering::Relaxed) > 100).await,
        "traffic flows"
    );
    // Valid, but it blocks every request of the traffic above.
    let blocker = policy(&fleet, "1.1.0", |t| {
        t.replace(
            "      - ignore all previous instructions",
            "      - the weather",
        )
    });
    let out = push(
        &fleet,
        &blocker,
        &[
            "--batch-size",
            "1",
            "--min-healthy-time",
            "3s",
            "--max-block-rate-delta",
            "0.2",
            "--min-sample",
            "20",
            "--rollback-on-error",
        ],
    );
    drop(traffic);
    assert_eq!(
        out.status.code(),
        Some(2),
        "rolled back: {}",
        output_text(&out)
    );
    let r = rollout(&fleet, "r-1");
    // The flags' and the prose's words, not the wire's.
    let printed = output_text(&out);
    assert!(
        printed.contains("gate verdict-mix") && printed.contains("rolled back"),
        "{printed}"
    );
    assert!(!printed.contains("rolled_back"), "{printed}");
    let gate = gate(&r, "verdict_mix");
    assert_eq!(gate["decision"], "failed", "{gate:#}");
    assert!(gate["value"].as_f64().is_some_and(|v| v > 0.5), "{gate:#}");
    assert_eq!(r["batches"][0][0]["state"], "rolled_back", "{r:#}");
    assert_eq!(r["batches"][1][0]["state"], "not_offered");
    // A rollback is complete only once reported: as the push returns, every gateway already
    // shows the previous version, in sync with its desired config (no window showing the new).
    let (_, rows) = fleet.health();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row["config_hash"], before[0], "{row:#}");
        assert_eq!(row["desired_hash"], before[0], "{row:#}");
        assert_eq!(row["sync"], "in_sync", "{row:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_promote_pause_resume_and_abort() {
    let fleet = fleet(3).await;
    let before = hashes(&fleet);
    let file = policy(&fleet, "1.1.0", |t| t);
    let out = push(
        &fleet,
        &file,
        &[
            "--strategy",
            "canary",
            "--canary-size",
            "1",
            "--min-healthy-time",
            "200ms",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "canary waits for promotion: {}",
        output_text(&out)
    );
    assert_eq!(rollout(&fleet, "r-1")["state"], "awaiting_promotion");
    let (_, rows) = fleet.health();
    assert_eq!(
        rows.iter()
            .filter(|r| r["config_hash"] != before[0])
            .count(),
        1,
        "only the canary moved"
    );

    // Abort: the canary returns to the baseline.
    let out = fleet.ktctl(&["rollout", "abort", "r-1"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = fleet.ktctl(&["rollout", "status", "r-1", "--watch"]);
    assert_eq!(out.status.code(), Some(2), "aborted: {}", output_text(&out));
    fleet
        .wait_for_health("back on the baseline", PATIENCE, |_, rows| {
            rows.iter().all(|r| r["config_hash"] == before[0])
        })
        .await;

    // Promote a second canary; pause and resume on the way.
    let out = push(
        &fleet,
        &file,
        &[
            "--strategy",
            "canary",
            "--canary-size",
            "1",
            "--min-healthy-time",
            "200ms",
            "--pause-between",
            "3s",
            "--detach",
        ],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let out = fleet.ktctl(&["rollout", "status", "r-2", "--watch"]);
    assert_eq!(out.status.code(), Some(4), "{}", output_text(&out));
    assert!(
        fleet
            .ktctl(&["rollout", "promote", "r-2", "--reason", "canary looks fine"])
            .status
            .success()
    );
    let out = fleet.ktctl(&["rollout", "pause", "r-2"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(rollout(&fleet, "r-2")["state"], "paused");
    assert!(fleet.ktctl(&["rollout", "resume", "r-2"]).status.success());
    let out = fleet.ktctl(&["rollout", "status", "r-2", "--watch"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let r = rollout(&fleet, "r-2");
    let by_operator = r["history"].as_array().expect("history").iter().any(|t| {
        t["what"]
            .as_str()
            .is_some_and(|w| w.contains("promoted: canary looks fine"))
            && t["by"]
                .as_str()
                .is_some_and(|b| b.ends_with("/operator/tester"))
    });
    assert!(
        by_operator,
        "operator actions are recorded with identity and reason: {r:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_rollout_resumes_it() {
    let mut fleet = fleet(3).await;
    let file = policy(&fleet, "1.1.0", |t| t);
    // The operator follows the rollout with `config push` (no --detach) while the coordinator
    // dies under it: before, push exited with an HTTP/2 protocol error.
    let push = std::process::Command::new(kt_e2e::bin("ktctl"))
        .arg("--config")
        .arg(&fleet.ktctl_config)
        .args(["config", "push", "--file", &file, "--group", kt_e2e::GROUP])
        .args(["--min-healthy-time", "1s", "--pause-between", "1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ktctl config push");
    // Wait until the second batch is under way.
    let reached = wait_for(PATIENCE, || {
        fleet
            .ktctl(&["rollout", "status", "r-1", "-o", "json"])
            .status
            .success()
            && rollout(&fleet, "r-1")["current_batch"].as_u64() == Some(1)
    })
    .await;
    assert!(reached, "second batch never started");
    if let Some(proc) = fleet.coordinator.proc.take() {
        drop(proc); // SIGKILL
    }
    fleet.coordinator.start_again();
    // The push reconnects and follows the resumed rollout to its end.
    let out = push.wait_with_output().expect("push ends");
    assert_eq!(
        out.status.code(),
        Some(0),
        "resumed and finished: {}",
        output_text(&out)
    );
    let printed = output_text(&out);
    assert!(printed.contains("lost the coordinator"), "{printed}");
    assert!(printed.contains("succeeded"), "{printed}");
    let out = fleet.ktctl(&["rollout", "status", "r-1", "--watch"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    // Succeeded means reported: every gateway runs 1.1.0, and that is what it should run.
    let (_, rows) = fleet.health();
    for r in &rows {
        assert_eq!(r["config_version"], "1.1.0", "{r:#}");
        assert_eq!(r["desired_version"], "1.1.0", "{r:#}");
        assert_eq!(r["sync"], "in_sync", "{r:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_during_an_apply_leaves_a_valid_config() {
    let mut fleet = fleet(1).await;
    let file = policy(&fleet, "1.1.0", |t| t);
    let out = push(&fleet, &file, &["--min-healthy-time", "100ms", "--detach"]);
    assert!(out.status.success(), "{}", output_text(&out));
    fleet.agents[0].kill();
    // Whatever the agent had done, the gateway serves a whole, valid config.
    let health: Value = reqwest::get(fleet.gateways[0].url("/health"))
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert!(
        ["1.0.0", "1.1.0"].contains(&health["config"]["version"].as_str().unwrap_or("")),
        "{health}"
    );
    let validate = std::process::Command::new(kt_e2e::bin("kt-gateway"))
        .arg("validate")
        .arg(&fleet.gateways[0].policy)
        .output()
        .expect("validate");
    assert!(validate.status.success(), "{}", output_text(&validate));
    // When the agent returns, the rollout completes.
    fleet.agents[0].start_again();
    let out = fleet.ktctl(&["rollout", "status", "r-1", "--watch"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_rollouts_are_refused_and_a_dry_run_changes_nothing() {
    let fleet = fleet(2).await;
    let before = hashes(&fleet);
    let file = policy(&fleet, "1.1.0", |t| t);
    let plan = push(&fleet, &file, &["--dry-run"]);
    assert!(plan.status.success(), "{}", output_text(&plan));
    let plan_text = output_text(&plan);
    assert!(
        plan_text.contains("dry run")
            && plan_text.contains("gw-test-01")
            && plan_text.contains("+  version: 1.1.0"),
        "{plan_text}"
    );
    let listed = fleet.ktctl(&["rollout", "list", "-o", "json"]);
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&listed.stdout)
            .expect("json")
            .len(),
        0,
        "a dry run stores no rollout"
    );
    assert_eq!(hashes(&fleet), before);

    let out = push(&fleet, &file, &["--min-healthy-time", "60s", "--detach"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let other = policy(&fleet, "1.2.0", |t| t);
    let refused = push(&fleet, &other, &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        output_text(&refused).contains("r-1"),
        "names the rollout in the way: {}",
        output_text(&refused)
    );
    let superseding = push(
        &fleet,
        &other,
        &["--min-healthy-time", "100ms", "--supersede"],
    );
    assert_eq!(
        superseding.status.code(),
        Some(0),
        "{}",
        output_text(&superseding)
    );
    assert_eq!(rollout(&fleet, "r-1")["state"], "superseded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_by_label_selector_target_rollouts_and_persist() {
    let mut fleet = fleet(3).await;
    let before = hashes(&fleet);
    let groups = fleet.dir.path().join("more-groups.yaml");
    std::fs::write(
        &groups,
        "groups:\n  eu:\n    selector: {region: eu}\n  canaries:\n    gateways: [gw-test-03]\n",
    )
    .expect("write");
    let out = fleet.ktctl(&[
        "groups",
        "apply",
        "-f",
        groups.to_str().expect("utf-8"),
        "--reason",
        "regions",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let members = |fleet: &TestFleet| -> Vec<(String, Value)> {
        let out = fleet.ktctl(&["groups", "list", "-o", "json"]);
        let rows: Vec<Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", output_text(&out)));
        rows.into_iter()
            .map(|g| {
                (
                    g["name"].as_str().unwrap_or_default().to_owned(),
                    g["members"].clone(),
                )
            })
            .collect()
    };
    let listed = members(&fleet);
    assert!(
        listed.contains(&("eu".to_owned(), serde_json::json!(["gw-test-02"]))),
        "{listed:?}"
    );
    assert!(
        listed.contains(&("canaries".to_owned(), serde_json::json!(["gw-test-03"]))),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|(name, _)| name == kt_e2e::GROUP),
        "the file's group stays: {listed:?}"
    );

    let bad = fleet.dir.path().join("bad-groups.yaml");
    std::fs::write(&bad, "groups:\n  eu:\n    members: [x]\n").expect("write");
    let refused = fleet.ktctl(&["groups", "apply", "-f", bad.to_str().expect("utf-8")]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        output_text(&refused).contains("members") && output_text(&refused).contains("line 3"),
        "{}",
        output_text(&refused)
    );

    let file = policy(&fleet, "1.1.0", |t| t);
    let out = fleet.ktctl(&[
        "config",
        "push",
        "--file",
        &file,
        "--group",
        "eu",
        "--min-healthy-time",
        "100ms",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    fleet
        .wait_for_health("only eu moved", PATIENCE, |_, rows| {
            rows.iter()
                .all(|r| (r["config_version"] == "1.1.0") == (r["region"] == "eu"))
        })
        .await;
    let file = policy(&fleet, "1.2.0", |t| t);
    let out = fleet.ktctl(&[
        "config",
        "push",
        "--file",
        &file,
        "--selector",
        "region=us",
        "--strategy",
        "all-at-once",
        "--min-healthy-time",
        "100ms",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    fleet
        .wait_for_health("us moved", PATIENCE, |_, rows| {
            rows.iter().all(|r| {
                r["config_version"]
                    == if r["region"] == "us" {
                        "1.2.0"
                    } else {
                        "1.1.0"
                    }
            })
        })
        .await;
    assert_ne!(hashes(&fleet), before);

    fleet.coordinator.stop();
    fleet.coordinator.start_again();
    // Selector membership needs the agents' labels, which come back with their hellos.
    let kept = wait_for(PATIENCE, || {
        members(&fleet).contains(&("eu".to_owned(), serde_json::json!(["gw-test-02"])))
    })
    .await;
    assert!(kept, "groups survive a restart: {:?}", members(&fleet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_diff_undo_and_no_silent_downgrade() {
    let fleet = fleet(2).await;
    let before = hashes(&fleet);
    let file = policy(&fleet, "1.1.0", |t| t);
    let out = push(&fleet, &file, &["--min-healthy-time", "100ms"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));

    let diff = fleet.ktctl(&["config", "diff", "1.0.0", "1.1.0"]);
    let diff_text = output_text(&diff);
    assert!(
        diff.status.success()
            && diff_text.contains("-  version: 1.0.0")
            && diff_text.contains("+  version: 1.1.0"),
        "{diff_text}"
    );
    let history = fleet.ktctl(&["rollout", "history", "--group", kt_e2e::GROUP]);
    let history_text = output_text(&history);
    assert!(
        history_text.contains("r-1")
            && history_text.contains("succeeded")
            && history_text.contains("1.0.0 ("),
        "{history_text}"
    );

    // Pushing the lower version is refused by the agents: only a rollback may go back.
    // The gateways' files now hold 1.1.0: write the 1.0.0 bytes back out from it.
    let old = fleet.dir.path().join("policy-1.0.0-again.yaml");
    std::fs::write(
        &old,
        std::fs::read_to_string(&file)
            .expect("file")
            .replace("version: 1.1.0", "version: 1.0.0"),
    )
    .expect("write");
    let old = old.display().to_string();
    let out = push(
        &fleet,
        &old,
        &["--min-healthy-time", "100ms", "--rollback-on-error"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("only a rollback may go back"),
        "{}",
        output_text(&out)
    );

    let out = fleet.ktctl(&[
        "rollout",
        "undo",
        "--group",
        kt_e2e::GROUP,
        "--min-healthy-time",
        "100ms",
        "--reason",
        "back to known good",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    fleet
        .wait_for_health("back on 1.0.0", PATIENCE, |_, rows| {
            rows.iter().all(|r| r["config_hash"] == before[0])
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_rate_gate_rolls_back_a_policy_whose_provider_fails() {
    let fleet = fleet(3).await;
    let before = hashes(&fleet);
    // A provider that answers every chat request with 500 (but its model list, the probe, works).
    let failing =
        kt_e2e::MockProvider::start(&fleet.dir.path().join("failing"), &["--error-every", "1"]);
    let good = format!("http://{}/v1", fleet.provider.addr);
    let file = policy(&fleet, "1.1.0", |t| {
        t.replace(&good, &format!("http://{}/v1", failing.addr))
    });
    let traffic = Traffic::start(&fleet);
    assert!(
        wait_for(PATIENCE, || traffic.sent.load(Ordering::Relaxed) > 100).await,
        "traffic flows"
    );
    let out = push(
        &fleet,
        &file,
        &[
            "--min-healthy-time",
            "3s",
            "--max-error-rate",
            "0.1",
            "--min-sample",
            "20",
            "--rollback-on-error",
        ],
    );
    drop(traffic);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    let r = rollout(&fleet, "r-1");
    let gate = gate(&r, "error_rate");
    assert_eq!(gate["decision"], "failed", "{gate:#}");
    fleet
        .wait_for_health("back on the previous hash", PATIENCE, |_, rows| {
            rows.iter().all(|r| r["config_hash"] == before[0])
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_agent_dies_after_applying_is_not_called_healthy() {
    let mut fleet = fleet(2).await;
    let file = policy(&fleet, "1.1.0", |t| t);
    let out = push(&fleet, &file, &["--min-healthy-time", "5s", "--detach"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let first = rollout(&fleet, "r-1")["batches"][0][0]["gateway"]
        .as_str()
        .expect("first batch")
        .to_owned();
    let applied = wait_for(PATIENCE, || {
        rollout(&fleet, "r-1")["batches"][0][0]["state"] == "applied"
    })
    .await;
    assert!(applied, "{:#}", rollout(&fleet, "r-1"));
    // Its agent dies during the bake: nothing says the gateway stayed healthy (before, the
    // health gate passed it and the rollout went on).
    let index = fleet
        .gateways
        .iter()
        .position(|g| g.id == first)
        .expect("the first batch's gateway");
    fleet.agents[index].kill();
    let out = fleet.ktctl(&["rollout", "status", "r-1", "--watch"]);
    assert_eq!(out.status.code(), Some(4), "paused: {}", output_text(&out));
    let r = rollout(&fleet, "r-1");
    let health = gate(&r, "health");
    assert_eq!(health["decision"], "inconclusive", "{r:#}");
    assert!(
        health["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&first)),
        "{health}"
    );
    assert_eq!(
        r["batches"][1][0]["state"], "pending",
        "the next batch waits: {r:#}"
    );
}
