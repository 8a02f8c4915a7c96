//! The `ha` scenario: etcd and three coordinator replicas on this machine, N simulated agents
//! spread over them. Measures an all-at-once rollout through the replicated path (push through
//! a follower, offers and answers through etcd: time from the push to each APPLIED), then kills
//! the leader in the middle of a rolling rollout and measures how long until a new leader is
//! elected and until the rollout moves again (its record written by the new leader).

use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use kt_proto::v1::{PushConfigRequest, RolloutRequest, RolloutSpec, Strategy};
use serde_json::json;

use crate::fleet::{self, Coordinator, CoordinatorSettings, Etcd};
use crate::scenarios::{CONNECT_TIMEOUT, Outcome, POLICY, Run, all_connected, spread};
use crate::sim::{SimFleet, SimSettings};

const REPLICAS: usize = 3;
const PATIENCE: Duration = Duration::from_secs(300);

pub async fn ha(run: &Run<'_>) -> anyhow::Result<Outcome> {
    let etcd = Etcd::start(run.work)?;
    let mut coordinators = Vec::new();
    for i in 1..=REPLICAS {
        let mut storage = etcd.storage.clone();
        storage.replica = Some(format!("replica-{i}"));
        coordinators.push(Coordinator::start(
            run.work,
            run.pki,
            &CoordinatorSettings {
                heartbeat_interval: run.heartbeat,
                reconnect_spread: run.reconnect_spread,
                name: format!("replica-{i}"),
                storage: kt_launch::configs::Storage::Etcd(storage),
                events_nats: None,
            },
        )?);
    }
    let sim = SimFleet::start(
        run.agents,
        run.pki,
        &SimSettings {
            coordinators: coordinators.iter().map(|c| c.addr).collect(),
            reload: Duration::ZERO,
            min_delay: Duration::from_millis(500),
            max_delay: run.max_delay,
        },
    )?;
    let connected = all_connected(&sim, run.agents, CONNECT_TIMEOUT)
        .await
        .ok_or_else(|| anyhow::anyhow!("not every agent connected"))?;
    let mut etcd_client = etcd.client().await?;
    let leader = current_leader(&mut etcd_client).await?;
    // Operators talk to a follower: the push travels to the leader through etcd.
    let follower = (leader.0 + 1) % REPLICAS;
    let mut operator = fleet::operator(run.pki, coordinators[follower].addr).await?;
    // Every replica sees every agent (fleet records through etcd) before anything is pushed.
    let replicated = Instant::now() + CONNECT_TIMEOUT;
    let mut seen = 0;
    while Instant::now() < replicated {
        seen = kt_ctl::client::list_gateways(&mut operator, "sim")
            .await
            .map(|all| {
                all.iter()
                    .filter(|g| g.agent_state == kt_proto::v1::AgentState::Connected as i32)
                    .count()
            })
            .unwrap_or(0);
        if seen >= run.agents {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(
        seen >= run.agents,
        "the follower sees {seen} of {} agents",
        run.agents
    );

    // 1. All at once, to every agent.
    let started = Instant::now();
    let pushed = operator
        .push_config(push("1.1.0", Strategy::AllAtOnce, 0))
        .await?
        .into_inner();
    let accepted = started.elapsed();
    let first = pushed.rollout.map(|r| r.id).unwrap_or_default();
    let deadline = started + PATIENCE;
    while Instant::now() < deadline && applied(&sim) < run.agents {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = wait_done(&mut operator, &first, deadline).await;
    let rollout_done = started.elapsed();
    let mut latencies: Vec<f64> = sim
        .applied
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .at
        .iter()
        .map(|at| at.duration_since(started).as_secs_f64() * 1000.0)
        .collect();
    let (p50, p99, max) = spread(&mut latencies);

    // 2. The leader killed while a rolling rollout runs.
    let leader = current_leader(&mut etcd_client).await?;
    let survivor = (leader.0 + 1) % REPLICAS;
    let mut operator = fleet::operator(run.pki, coordinators[survivor].addr).await?;
    let batch = (run.agents / 10).max(1) as u32;
    let rolling = operator
        .push_config(push("1.2.0", Strategy::Rolling, batch))
        .await?
        .into_inner()
        .rollout
        .ok_or_else(|| anyhow::anyhow!("no rollout"))?;
    let number: u64 = rolling
        .id
        .strip_prefix("r-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("rollout id {:?}", rolling.id))?;
    let key = format!("/kt-fleet/rollout/{number:020}");
    // Kill it once the second batch is under way.
    let moving = Instant::now() + PATIENCE;
    while Instant::now() < moving {
        let r = operator
            .get_rollout(RolloutRequest {
                id: rolling.id.clone(),
            })
            .await?
            .into_inner();
        if r.current_batch >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let revision = etcd_client
        .get(key.clone(), None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let mut watch = etcd_client
        .watch(
            key,
            Some(WatchOptions::new().with_start_revision(revision + 1)),
        )
        .await?;
    coordinators[leader.0].kill();
    let killed = Instant::now();
    let mut elected = None;
    let mut taken_over = None;
    let mut moved = None;
    while killed.elapsed() < PATIENCE && (elected.is_none() || moved.is_none()) {
        if elected.is_none()
            && let Ok(now) = current_leader(&mut etcd_client).await
            && now.1 > leader.1
        {
            elected = Some(killed.elapsed());
        }
        // The new leader writes the takeover into the rollout's history first, then progress.
        if let Ok(Ok(Some(answer))) =
            tokio::time::timeout(Duration::from_millis(50), watch.message()).await
        {
            for event in answer.events() {
                let Some(kv) = event.kv().filter(|_| event.event_type() == EventType::Put) else {
                    continue;
                };
                let record: serde_json::Value =
                    serde_json::from_slice(kv.value()).unwrap_or_default();
                let history = record["history"].as_array().cloned().unwrap_or_default();
                let takeover = history.iter().rposition(|t| {
                    t["what"]
                        .as_str()
                        .is_some_and(|w| w.contains("taken over by leader"))
                });
                if let Some(at) = takeover {
                    taken_over.get_or_insert(killed.elapsed());
                    if at + 1 < history.len() {
                        moved.get_or_insert(killed.elapsed());
                    }
                }
            }
        }
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let (elected, taken_over, moved) = (ms(elected), ms(taken_over), ms(moved));
    sim.stop();
    Ok(Outcome {
        json: json!({
            "scenario": "ha", "agents": run.agents, "replicas": REPLICAS,
            "connect_ms": connected.as_secs_f64() * 1000.0,
            "rollout": {
                "applied": latencies.len(),
                "push_accepted_ms": accepted.as_secs_f64() * 1000.0,
                "applied_ms": { "p50": p50, "p99": p99, "max": max },
                "state": state, "done_ms": rollout_done.as_secs_f64() * 1000.0,
            },
            "takeover": {
                "leader_elected_ms": elected, "takeover_recorded_ms": taken_over,
                "rollout_moved_ms": moved,
            },
        }),
        summary: format!(
            "ha: {} agents over {REPLICAS} replicas on etcd; all-at-once rollout pushed through a follower: \
             {} APPLIED, push to APPLIED p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms; rollout {state} \
             after {:.0} ms. Leader killed mid-rollout: new leader after {} ms, takeover in the \
             rollout's history after {} ms, its next step after {} ms",
            run.agents,
            latencies.len(),
            rollout_done.as_secs_f64() * 1000.0,
            elected.map_or("-".into(), |v| format!("{v:.0}")),
            taken_over.map_or("-".into(), |v| format!("{v:.0}")),
            moved.map_or("-".into(), |v| format!("{v:.0}")),
        ),
    })
}

fn push(version: &str, strategy: Strategy, batch_size: u32) -> PushConfigRequest {
    PushConfigRequest {
        content: POLICY
            .replacen("version: 1.0.0", &format!("version: {version}"), 1)
            .into_bytes(),
        spec: Some(RolloutSpec {
            group: "sim".into(),
            strategy: strategy as i32,
            size: batch_size,
            min_healthy_time_ms: 1000,
            pause_between_ms: 1000,
            max_block_rate_delta: -1.0,
            max_error_rate: -1.0,
            rollback_on_error: true,
            ..Default::default()
        }),
        reason: format!("kt-bench ha {version}"),
        ..Default::default()
    }
}

fn applied(sim: &SimFleet) -> usize {
    sim.applied.lock().map(|a| a.at.len()).unwrap_or(0)
}

/// The rollout's end state, or "running" at the deadline.
async fn wait_done(
    operator: &mut kt_proto::v1::operator_service_client::OperatorServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
    deadline: Instant,
) -> &'static str {
    while Instant::now() < deadline {
        if let Ok(r) = operator
            .get_rollout(RolloutRequest { id: id.to_owned() })
            .await
        {
            let state = r.into_inner().state();
            if state != kt_proto::v1::RolloutState::Running {
                return state.label();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    "running"
}

/// The replica leading now (its index) and its epoch.
async fn current_leader(client: &mut etcd_client::Client) -> anyhow::Result<(usize, i64)> {
    let answer = client.leader("/kt-fleet/election").await?;
    let kv = answer.kv().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let name = String::from_utf8_lossy(kv.value()).into_owned();
    let index = name
        .strip_prefix("replica-")
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1))
        .ok_or_else(|| anyhow::anyhow!("leader {name:?} is not a bench replica"))?;
    Ok((index, kv.create_revision()))
}
