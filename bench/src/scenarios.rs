//! The scenarios. Each starts a real coordinator, runs simulated agents against it, and returns
//! one JSON result (printed as one line) and a human summary.

use std::path::Path;
use std::time::{Duration, Instant};

use kt_proto::v1::{
    EventFilter, FleetUpdate, PushConfigRequest, RolloutRequest, RolloutSpec, Strategy,
    TailEventsRequest, WatchFleetRequest, fleet_update, tail_events_response,
};
use serde_json::{Value, json};

use crate::fleet::{self, Coordinator, CoordinatorSettings};
use crate::sim::{SimFleet, SimSettings};

/// What every scenario is given.
pub struct Run<'a> {
    pub pki: &'a Path,
    pub work: &'a Path,
    pub agents: usize,
    pub heartbeat: Duration,
    pub duration: Duration,
    pub reconnect_spread: Duration,
    pub max_delay: Duration,
}

pub struct Outcome {
    pub json: Value,
    pub summary: String,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// p50, p99 and max of `values` (sorted here).
pub(crate) fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        percentile(values, 50.0),
        percentile(values, 99.0),
        values.last().copied().unwrap_or(0.0),
    )
}

impl Run<'_> {
    fn coordinator(&self) -> anyhow::Result<Coordinator> {
        Coordinator::start(
            self.work,
            self.pki,
            &CoordinatorSettings {
                heartbeat_interval: self.heartbeat,
                reconnect_spread: self.reconnect_spread,
                name: "coordinator".into(),
                storage: Default::default(),
                events_nats: None,
            },
        )
    }

    fn sim(&self, coordinator: &Coordinator, reload: Duration) -> anyhow::Result<SimFleet> {
        SimFleet::start(
            self.agents,
            self.pki,
            &SimSettings {
                coordinators: vec![coordinator.addr],
                reload,
                min_delay: Duration::from_millis(500),
                max_delay: self.max_delay,
            },
        )
    }
}

/// Waits until `n` sessions are open; the time it took, or `None` at the deadline.
pub(crate) async fn all_connected(sim: &SimFleet, n: usize, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if sim.connected() >= n as i64 {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

/// Waits until the coordinator knows what every gateway should run (each adopted what it ran
/// at first report), so that watchers count health changes only.
async fn all_settled(
    operator: &mut kt_proto::v1::operator_service_client::OperatorServiceClient<
        tonic::transport::Channel,
    >,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        let gateways = kt_ctl::client::list_gateways(operator, "").await?;
        let settled = gateways
            .iter()
            .filter(|g| g.sync == kt_proto::v1::SyncState::InSync as i32)
            .count();
        if settled >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("not every gateway got a desired config within {timeout:?}")
}

pub async fn connect(run: &Run<'_>) -> anyhow::Result<Outcome> {
    let coordinator = run.coordinator()?;
    let before = coordinator.stats();
    let started = Instant::now();
    let sim = run.sim(&coordinator, Duration::ZERO)?;
    let spawned = started.elapsed();
    let took = all_connected(&sim, run.agents, CONNECT_TIMEOUT).await;
    let after = coordinator.stats();
    let connected = sim.connected();
    let failures = sim.metrics.connect_failures.get();
    let cpu = match (before, after) {
        (Some(b), Some(a)) => (a.cpu - b.cpu).as_secs_f64(),
        _ => 0.0,
    };
    let rss = after.map_or(0, |a| a.rss_bytes);
    let seconds = took.map(|t| t.as_secs_f64());
    sim.stop();
    Ok(Outcome {
        json: json!({
            "scenario": "connect", "agents": run.agents, "connected": connected,
            "seconds_to_all_connected": seconds, "failed_attempts": failures,
            "agents_started_in_seconds": spawned.as_secs_f64(),
            "coordinator_cpu_seconds": cpu, "coordinator_rss_mib": mib(rss),
        }),
        summary: format!(
            "connect: {connected} of {} agents connected in {}; {failures} failed attempts \
             (refused or failed handshakes, retried with backoff); coordinator used {cpu:.1} s of CPU, \
             {:.0} MiB resident",
            run.agents,
            seconds.map_or("(not all, timed out)".into(), |s| format!("{s:.1} s")),
            mib(rss)
        ),
    })
}

pub async fn steady(run: &Run<'_>) -> anyhow::Result<Outcome> {
    let coordinator = run.coordinator()?;
    let sim = run.sim(&coordinator, Duration::ZERO)?;
    let connected_in = all_connected(&sim, run.agents, CONNECT_TIMEOUT)
        .await
        .ok_or_else(|| anyhow::anyhow!("not every agent connected"))?;
    // Let the connect burst settle, then measure a window of heartbeats and health changes.
    tokio::time::sleep(run.heartbeat.min(Duration::from_secs(5))).await;
    let before = coordinator
        .stats()
        .ok_or_else(|| anyhow::anyhow!("no coordinator"))?;
    let heartbeats_before = sim.metrics.heartbeats_sent.get();
    let buckets_before = heartbeat_buckets(&coordinator).await;
    let started = Instant::now();
    let mut peak_rss = before.rss_bytes;
    let mut changes = 0u64;
    let per_second = (run.agents / 100).max(1);
    let mut next = 0usize;
    while started.elapsed() < run.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // 1% of the agents change health every second: status updates on top of heartbeats.
        for _ in 0..per_second {
            let agent = &sim.agents[next % sim.agents.len()];
            agent.toggle_health();
            next += 1;
            changes += 1;
        }
        if let Some(s) = coordinator.stats() {
            peak_rss = peak_rss.max(s.rss_bytes);
        }
    }
    let elapsed = started.elapsed();
    let after = coordinator
        .stats()
        .ok_or_else(|| anyhow::anyhow!("no coordinator"))?;
    let heartbeats = sim.metrics.heartbeats_sent.get() - heartbeats_before;
    let cores = (after.cpu - before.cpu).as_secs_f64() / elapsed.as_secs_f64();
    let latency = heartbeat_latency(&buckets_before, &heartbeat_buckets(&coordinator).await);
    sim.stop();
    Ok(Outcome {
        json: json!({
            "scenario": "steady", "agents": run.agents,
            "heartbeat_interval_s": run.heartbeat.as_secs_f64(),
            "window_seconds": elapsed.as_secs_f64(), "connected_in_seconds": connected_in.as_secs_f64(),
            "heartbeats": heartbeats, "health_changes": changes,
            "coordinator_cores": cores, "coordinator_rss_mib": mib(after.rss_bytes),
            "coordinator_peak_rss_mib": mib(peak_rss),
            "heartbeat_processing_ms": latency,
        }),
        summary: format!(
            "steady: {} agents at {:.0} s heartbeats for {:.0} s: {heartbeats} heartbeats and {changes} \
             health changes; coordinator {:.3} cores, {:.0} MiB resident (peak {:.0} MiB); heartbeat \
             processing {}",
            run.agents,
            run.heartbeat.as_secs_f64(),
            elapsed.as_secs_f64(),
            cores,
            mib(after.rss_bytes),
            mib(peak_rss),
            latency
        ),
    })
}

/// The coordinator's heartbeat processing histogram: cumulative counts by upper bound.
async fn heartbeat_buckets(coordinator: &Coordinator) -> Vec<(f64, f64)> {
    let text = scrape(coordinator.metrics_addr).await;
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("kt_coordinator_heartbeat_processing_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// p50 and p99 of the heartbeats processed between two scrapes, as histogram bucket bounds.
fn heartbeat_latency(before: &[(f64, f64)], after: &[(f64, f64)]) -> Value {
    let window: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, c)| *c);
            (*bound, count - earlier)
        })
        .collect();
    let total = window.last().map_or(0.0, |b| b.1);
    let quantile = |q: f64| {
        window
            .iter()
            .find(|(_, count)| *count >= q * total)
            .map(|(bound, _)| bound * 1000.0)
    };
    json!({ "count": total, "p50_at_most": quantile(0.5), "p99_at_most": quantile(0.99) })
}

/// The coordinator's metrics page (empty when it cannot be read).
async fn scrape(addr: std::net::SocketAddr) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

pub(crate) const POLICY: &str = include_str!("../../deploy/examples/policy-config.yaml");

pub async fn rollout(run: &Run<'_>) -> anyhow::Result<Outcome> {
    let coordinator = run.coordinator()?;
    let sim = run.sim(&coordinator, Duration::ZERO)?;
    all_connected(&sim, run.agents, CONNECT_TIMEOUT)
        .await
        .ok_or_else(|| anyhow::anyhow!("not every agent connected"))?;
    let mut operator = fleet::operator(run.pki, coordinator.addr).await?;
    let content = POLICY.replacen("version: 1.0.0", "version: 1.1.0", 1);
    let started = Instant::now();
    let pushed = operator
        .push_config(PushConfigRequest {
            content: content.into_bytes(),
            spec: Some(RolloutSpec {
                group: "sim".into(),
                strategy: Strategy::AllAtOnce as i32,
                max_block_rate_delta: -1.0,
                max_error_rate: -1.0,
                rollback_on_error: true,
                ..Default::default()
            }),
            reason: "kt-bench rollout".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let accepted = started.elapsed();
    let id = pushed.rollout.map(|r| r.id).unwrap_or_default();
    let deadline = started + Duration::from_secs(300);
    while Instant::now() < deadline {
        let done = sim.applied.lock().map(|a| a.at.len()).unwrap_or(0);
        if done >= run.agents {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The coordinator's side: the rollout ends once it has every answer.
    let mut state = kt_proto::v1::RolloutState::Unspecified;
    while Instant::now() < deadline {
        state = operator
            .get_rollout(RolloutRequest { id: id.clone() })
            .await?
            .into_inner()
            .state();
        if state != kt_proto::v1::RolloutState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let finished = started.elapsed();
    let state = state.label();
    let (mut latencies, bytes) = {
        let applied = sim
            .applied
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        let l: Vec<f64> = applied
            .at
            .iter()
            .map(|at| at.duration_since(started).as_secs_f64() * 1000.0)
            .collect();
        (l, applied.offer_bytes)
    };
    let (p50, p99, max) = spread(&mut latencies);
    sim.stop();
    Ok(Outcome {
        json: json!({
            "scenario": "rollout", "agents": run.agents, "applied": latencies.len(),
            "push_accepted_ms": accepted.as_secs_f64() * 1000.0,
            "applied_ms": { "p50": p50, "p99": p99, "max": max },
            "rollout_state": state, "rollout_done_ms": finished.as_secs_f64() * 1000.0,
            "offer_bytes": bytes,
        }),
        summary: format!(
            "rollout: all-at-once to {} agents: {} answered APPLIED; time from push to APPLIED p50 \
             {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (simulated reload: 0); rollout {state} \
             after {:.0} ms; {:.1} MiB of offers sent",
            run.agents,
            latencies.len(),
            finished.as_secs_f64() * 1000.0,
            mib(bytes)
        ),
    })
}

pub async fn storm(run: &Run<'_>) -> anyhow::Result<Outcome> {
    let mut coordinator = run.coordinator()?;
    let sim = run.sim(&coordinator, Duration::ZERO)?;
    all_connected(&sim, run.agents, CONNECT_TIMEOUT)
        .await
        .ok_or_else(|| anyhow::anyhow!("not every agent connected"))?;
    // Steady state first: the memory to compare the storm with.
    let mut steady_rss = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        steady_rss = steady_rss.max(coordinator.stats().map_or(0, |s| s.rss_bytes));
    }
    let opened_before = sim.metrics.sessions_opened.get();
    let cut = Instant::now();
    coordinator.kill();
    coordinator.start_again()?;
    let restarted_in = cut.elapsed();
    let limit = run.reconnect_spread + Duration::from_secs(60);
    let mut per_second = Vec::new();
    let mut last = opened_before;
    let mut peak_rss = 0u64;
    let mut recovered = None;
    while cut.elapsed() < limit + Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let opened = sim.metrics.sessions_opened.get();
        per_second.push(opened - last);
        last = opened;
        peak_rss = peak_rss.max(coordinator.stats().map_or(0, |s| s.rss_bytes));
        if sim.connected() >= run.agents as i64 {
            recovered = Some(cut.elapsed());
            break;
        }
    }
    let failures = sim.metrics.connect_failures.get();
    let ratio = peak_rss as f64 / steady_rss.max(1) as f64;
    let busiest = per_second.iter().copied().max().unwrap_or(0);
    let mean = if per_second.is_empty() {
        0.0
    } else {
        per_second.iter().sum::<u64>() as f64 / per_second.len() as f64
    };
    sim.stop();
    let seconds = recovered.map(|r| r.as_secs_f64());
    Ok(Outcome {
        json: json!({
            "scenario": "storm", "agents": run.agents,
            "reconnect_spread_s": run.reconnect_spread.as_secs_f64(),
            "coordinator_restarted_in_s": restarted_in.as_secs_f64(),
            "seconds_to_recover": seconds, "limit_s": limit.as_secs_f64(),
            "reconnects_per_second": per_second, "busiest_second": busiest, "mean_per_second": mean,
            "failed_attempts": failures,
            "steady_rss_mib": mib(steady_rss), "peak_rss_mib": mib(peak_rss), "rss_ratio": ratio,
        }),
        summary: format!(
            "storm: {} agents cut at once (coordinator killed and restarted in {:.1} s); all back in {} \
             (limit: spread {:.0} s + 60 s); reconnects per second: mean {mean:.0}, busiest {busiest}; \
             {failures} failed attempts; coordinator memory steady {:.0} MiB, peak {:.0} MiB ({ratio:.2}x)",
            run.agents,
            restarted_in.as_secs_f64(),
            seconds.map_or("(not all, timed out)".into(), |s| format!("{s:.1} s")),
            run.reconnect_spread.as_secs_f64(),
            mib(steady_rss),
            mib(peak_rss)
        ),
    })
}

/// Tail subscribers and event senders for the `events` scenario.
pub struct EventsSettings {
    pub senders: usize,
    pub subscribers: usize,
    pub rate: u64,
    pub bus: Bus,
}

/// Where the coordinator keeps and fans out events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Bus {
    /// The embedded store and bus of one coordinator.
    Embedded,
    /// One coordinator on etcd with `events.nats`: batches published to JetStream, tails read
    /// from it.
    Nats,
}

pub async fn events(run: &Run<'_>, settings: &EventsSettings) -> anyhow::Result<Outcome> {
    // Kept to the end of the run; dropped (killed) after the coordinator.
    let (_etcd, _nats, coordinator) = match settings.bus {
        Bus::Embedded => (None, None, run.coordinator()?),
        Bus::Nats => {
            let etcd = fleet::Etcd::start(run.work)?;
            let nats = fleet::Nats::start(run.work)?;
            let coordinator = Coordinator::start(
                run.work,
                run.pki,
                &CoordinatorSettings {
                    heartbeat_interval: run.heartbeat,
                    reconnect_spread: run.reconnect_spread,
                    name: "coordinator".into(),
                    storage: kt_launch::configs::Storage::Etcd(etcd.storage.clone()),
                    events_nats: Some(nats.spec.events(&[])),
                },
            )?;
            (Some(etcd), Some(nats), coordinator)
        }
    };
    let mut tails = Vec::new();
    for _ in 0..settings.subscribers {
        let mut operator = fleet::operator(run.pki, coordinator.addr).await?;
        let stream = operator
            .tail_events(TailEventsRequest {
                filter: Some(EventFilter::default()),
                ..Default::default()
            })
            .await?
            .into_inner();
        tails.push(tokio::spawn(receive_events(
            stream,
            run.duration + Duration::from_secs(20),
        )));
    }
    let per_sender = settings.rate / settings.senders.max(1) as u64;
    let total = per_sender * settings.senders as u64 * run.duration.as_secs().max(1);
    let started = Instant::now();
    let mut senders = Vec::new();
    for i in 0..settings.senders {
        let channel = crate::events::agent_channel(run.pki, coordinator.addr, i).await?;
        senders.push(tokio::spawn(crate::events::send(
            channel,
            per_sender,
            run.duration,
        )));
    }
    let mut sent = 0u64;
    for s in senders {
        sent += s.await??;
    }
    let mut results = Vec::new();
    for t in tails {
        results.push(t.await?);
    }
    // From the first send to the last receipt of the slowest subscriber.
    let wall = results
        .iter()
        .filter_map(|r| r.last)
        .max()
        .map_or(started.elapsed(), |last| last.duration_since(started));
    let received: Vec<u64> = results.iter().map(|r| r.received).collect();
    let missed: u64 = results.iter().map(|r| r.missed).sum();
    let mut latencies: Vec<f64> = results.into_iter().flat_map(|r| r.latencies_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let p99 = percentile(&latencies, 99.0);
    let p50 = percentile(&latencies, 50.0);
    let rate = received.iter().copied().min().unwrap_or(0) as f64 / wall.as_secs_f64();
    Ok(Outcome {
        json: json!({
            "scenario": "events", "bus": format!("{:?}", settings.bus).to_lowercase(), "senders": settings.senders, "subscribers": settings.subscribers,
            "offered_rate": settings.rate, "planned": total, "sent": sent, "received_per_subscriber": received,
            "missed": missed, "events_per_second": rate, "latency_ms": { "p50": p50, "p99": p99 },
        }),
        summary: format!(
            "events ({:?} bus): {} senders offering {}/s for {:.0} s, {} subscribers: {sent} sent, each subscriber got \
             {received:?} ({missed} missed); {rate:.0} events/s end to end, latency p50 {p50:.1} ms, p99 {p99:.1} ms",
            settings.bus,
            settings.senders,
            settings.rate,
            run.duration.as_secs_f64(),
            settings.subscribers
        ),
    })
}

struct Received {
    received: u64,
    missed: u64,
    latencies_ms: Vec<f64>,
    last: Option<Instant>,
}

async fn receive_events(
    mut stream: tonic::Streaming<kt_proto::v1::TailEventsResponse>,
    limit: Duration,
) -> Received {
    let mut r = Received {
        received: 0,
        missed: 0,
        latencies_ms: Vec::new(),
        last: None,
    };
    let deadline = tokio::time::Instant::now() + limit;
    // Ends when the events stop coming for two seconds (the senders are done), or at the limit.
    while let Ok(Ok(Some(item))) = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + Duration::from_secs(2)),
        stream.message(),
    )
    .await
    {
        match item.item {
            Some(tail_events_response::Item::Event(e)) => {
                r.received += 1;
                r.last = Some(Instant::now());
                if let Some(sent) = crate::events::sent_us(&e.event) {
                    let now = crate::events::now_us();
                    r.latencies_ms
                        .push(now.saturating_sub(sent) as f64 / 1000.0);
                }
            }
            Some(tail_events_response::Item::Missed(n)) => r.missed += n,
            _ => {}
        }
    }
    r
}

pub async fn watch(
    run: &Run<'_>,
    watchers: usize,
    changes_per_second: usize,
) -> anyhow::Result<Outcome> {
    let coordinator = run.coordinator()?;
    let sim = run.sim(&coordinator, Duration::ZERO)?;
    all_connected(&sim, run.agents, CONNECT_TIMEOUT)
        .await
        .ok_or_else(|| anyhow::anyhow!("not every agent connected"))?;
    let mut operator = fleet::operator(run.pki, coordinator.addr).await?;
    all_settled(&mut operator, run.agents, CONNECT_TIMEOUT).await?;
    // Once every change is made, how many there were: watchers read until they saw them all
    // (or, if some never come, until a generous deadline), however slow the machine.
    let (total, expected) = tokio::sync::watch::channel(None);
    let mut watches = Vec::new();
    for _ in 0..watchers {
        let mut operator = fleet::operator(run.pki, coordinator.addr).await?;
        let stream = operator
            .watch_fleet(WatchFleetRequest::default())
            .await?
            .into_inner();
        watches.push(tokio::spawn(receive_updates(
            stream,
            expected.clone(),
            run.duration + WATCH_PATIENCE,
        )));
    }
    let started = Instant::now();
    let mut changes = 0u64;
    let mut next = 0usize;
    let tick = Duration::from_millis(100);
    let per_tick = (changes_per_second / 10).max(1);
    while started.elapsed() < run.duration {
        tokio::time::sleep(tick).await;
        for _ in 0..per_tick {
            let agent = &sim.agents[next % sim.agents.len()];
            agent.toggle_health();
            next += 1;
            changes += 1;
        }
    }
    let _ = total.send(Some(changes));
    let mut received = Vec::new();
    let mut latencies = Vec::new();
    for w in watches {
        let (n, l) = w.await?;
        received.push(n);
        latencies.extend(l);
    }
    let (p50, p99, max) = spread(&mut latencies);
    sim.stop();
    Ok(Outcome {
        json: json!({
            "scenario": "watch", "agents": run.agents, "watchers": watchers, "health_changes": changes,
            "updates_per_watcher": received, "update_latency_ms": { "p50": p50, "p99": p99, "max": max },
        }),
        summary: format!(
            "watch: {watchers} operators watching {} agents while {changes} health changes happened: each \
             watcher got {received:?} updates; latency from the agent's observation to the watcher p50 \
             {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            run.agents
        ),
    })
}

/// How long after the last change a watcher waits for the updates still under way.
const WATCH_PATIENCE: Duration = Duration::from_secs(60);

/// Counts health updates until `expected` (known once every change is made) have arrived, or
/// the deadline passes.
async fn receive_updates(
    mut stream: tonic::Streaming<FleetUpdate>,
    mut expected: tokio::sync::watch::Receiver<Option<u64>>,
    limit: Duration,
) -> (u64, Vec<f64>) {
    let mut count = 0;
    let mut latencies = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if expected.borrow().is_some_and(|n| count >= n) {
            break;
        }
        let update = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            changed = expected.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            message = stream.message() => match message {
                Ok(Some(update)) => update,
                _ => break,
            },
        };
        if let Some(fleet_update::Update::Changed(state)) = update.update {
            let observed = state.health.map_or(0, |h| h.observed_at_unix_ms);
            if observed > 0 {
                count += 1;
                latencies.push(kt_daemon::unix_ms_now().saturating_sub(observed) as f64);
            }
        }
    }
    (count, latencies)
}
