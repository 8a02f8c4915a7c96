//! Shadow runs, carried by the leader's engine: a candidate config is offered to each target
//! gateway as its shadow (deciding nothing), kept there until the run ends (its duration, its
//! sample size, or an operator's stop), then removed; the flip matrix of the run is stored
//! with it. Level-triggered like the rest of the engine: what each gateway's `/health` shows
//! decides the next offer, so a leader that takes over carries a run on from its record.

use std::collections::BTreeMap;
use std::sync::Arc;

use kt_daemon::unix_ms_now;
use kt_proto::v1::{ConfigOffer, ConfigPhase, ConfigRef, ConfigStatus, ShadowGateway, ShadowRun};
use tokio::sync::{mpsc, oneshot};

use super::flips::FlipTally;
use crate::events::{EventLog, Filter};
use crate::rollout::engine::{Command, Engine, EngineError, short};
use crate::rollout::model::Target;
use crate::rollout::plan::{content_hash, version_label};
use crate::store::StoredConfig;

/// Longest shadow run.
pub const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;

/// How long an offer may stay unanswered before it is made again.
const OFFER_TIMEOUT_MS: u64 = 60_000;
const APPLY_DEADLINE_MS: u64 = 30_000;

/// How often a run with a sample size counts what it compared so far.
const SAMPLE_CHECK_MS: u64 = 3_000;

/// After a run ends, how long its report waits for events still on their way, at most.
const REPORT_GRACE_MS: u64 = 10_000;
/// ... and once every gateway dropped it, how long for the last events to be forwarded.
const SETTLED_GRACE_MS: u64 = 3_000;
/// A final report that could not be read is tried again after this.
const REPORT_RETRY_MS: u64 = 10_000;

/// A shadow run as the operator asked for it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StartShadow {
    pub content: Vec<u8>,
    pub target: Target,
    pub duration_ms: u64,
    pub sample: u64,
    pub reason: String,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

#[derive(Debug)]
pub enum ShadowCommand {
    Start {
        start: StartShadow,
        identity: String,
        reply: Reply<ShadowRun>,
    },
    Stop {
        id: String,
        identity: String,
        reply: Reply<ShadowRun>,
    },
    Get {
        id: String,
        reply: Reply<ShadowRun>,
    },
    List {
        reply: Reply<Vec<ShadowRun>>,
    },
    /// A run with a sample size compared this many requests so far.
    Compared {
        id: String,
        compared: u64,
    },
    /// A run's final report, read from the events.
    Report {
        id: String,
        report: Option<kt_proto::v1::FlipReport>,
    },
}

/// The engine's shadow runs and what is in flight for them.
#[derive(Default)]
pub struct ShadowRuns {
    runs: BTreeMap<String, ShadowRun>,
    /// Offers (and removals) in flight, by run and gateway: (offer id, sent at).
    in_flight: BTreeMap<(String, String), (String, u64)>,
    /// Runs whose sample count or final report is being read.
    reading: std::collections::BTreeSet<String>,
    /// Runs whose final report could not be read, and when to try again.
    retry_at: BTreeMap<String, u64>,
    last_sample_check: u64,
    offers_made: u64,
    /// Where reports are read from; without it no report is made.
    events: Option<Arc<dyn EventLog>>,
    /// The engine's own queue, for readers' results (weak: the engine must not keep itself open).
    own: Option<mpsc::WeakSender<Command>>,
    /// Said in every report when `events` holds only part of the fleet's events.
    scope: Option<String>,
}

impl ShadowRuns {
    pub fn new(runs: Vec<ShadowRun>) -> Self {
        ShadowRuns {
            runs: runs.into_iter().map(|r| (r.id.clone(), r)).collect(),
            ..Default::default()
        }
    }

    pub fn reading_from(
        &mut self,
        events: Arc<dyn EventLog>,
        scope: Option<String>,
        own: mpsc::WeakSender<Command>,
    ) {
        self.events = Some(events);
        self.scope = scope;
        self.own = Some(own);
    }
}

fn running(run: &ShadowRun) -> bool {
    run.state == "running"
}

fn gateway_state<'a>(run: &'a mut ShadowRun, gateway: &str) -> Option<&'a mut ShadowGateway> {
    run.gateways.iter_mut().find(|g| g.gateway_id == gateway)
}

/// The events of a run's gateways.
pub fn filter_of(run: &ShadowRun) -> Filter {
    Filter {
        gateways: Some(run.gateways.iter().map(|g| g.gateway_id.clone()).collect()),
        ..Filter::default()
    }
}

/// Reads a run's flip matrix from `events` (through now, or through the end of an ended run's
/// grace); `scope` says when they are only part of the fleet's.
pub async fn read_report(
    events: &dyn EventLog,
    scope: Option<&str>,
    run: &ShadowRun,
) -> Option<kt_proto::v1::FlipReport> {
    let hash = run.config.as_ref().map_or("", |c| c.hash.as_str());
    // An ended run's events are those stored before its report is read at the latest: a later
    // run of the same config on the same gateways must not count into it.
    let until = match run.ended_at_unix_ms {
        0 => 0,
        ended => ended + REPORT_GRACE_MS,
    };
    let tally = FlipTally::new(hash, until, run.sample);
    let tally = events
        .flips(filter_of(run), run.started_at_unix_ms, tally)
        .await?;
    let mut report = tally.finish();
    report.scope = scope.unwrap_or_default().to_owned();
    Some(report)
}

impl Engine {
    pub(crate) async fn on_shadow_command(&mut self, command: ShadowCommand) {
        match command {
            ShadowCommand::Start {
                start,
                identity,
                reply,
            } => {
                let _ = reply.send(self.start_shadow(start, identity).await);
            }
            ShadowCommand::Stop {
                id,
                identity,
                reply,
            } => {
                let result = self.stop_shadow(&id, &identity).await;
                let _ = reply.send(result);
            }
            ShadowCommand::Get { id, reply } => {
                let found = self.shadows.runs.get(&id).cloned();
                let _ = reply.send(found.ok_or_else(|| no_run(&id)));
            }
            ShadowCommand::List { reply } => {
                // Without reports: a listing stays small however large the fleet.
                let runs = self.shadows.runs.values().map(|r| ShadowRun {
                    report: None,
                    ..r.clone()
                });
                let _ = reply.send(Ok(runs.collect()));
            }
            ShadowCommand::Compared { id, compared } => {
                self.shadows.reading.remove(&id);
                let ended = self
                    .shadows
                    .runs
                    .get(&id)
                    .is_some_and(|r| running(r) && r.sample > 0 && compared >= r.sample);
                if ended {
                    let why = format!("{compared} requests compared (the sample asked for)");
                    self.end_shadow(&id, "completed", why).await;
                }
            }
            ShadowCommand::Report { id, report } => {
                self.shadows.reading.remove(&id);
                let Some(mut run) = self.shadows.runs.get(&id).cloned() else {
                    return;
                };
                let Some(report) = report else {
                    tracing::warn!(shadow_run = %id, "the final report could not be read from the events; trying again");
                    let retry_at = unix_ms_now() + REPORT_RETRY_MS;
                    self.shadows.retry_at.insert(id, retry_at);
                    return;
                };
                run.report = Some(kt_proto::v1::FlipReport {
                    stored: true,
                    ..report
                });
                self.put_shadow(run).await;
            }
        }
    }

    async fn start_shadow(
        &mut self,
        start: StartShadow,
        identity: String,
    ) -> Result<ShadowRun, EngineError> {
        let version = version_label(&start.content).map_err(EngineError::Invalid)?;
        let duration_ms = match start.duration_ms {
            0 => 15 * 60 * 1000,
            d if d > MAX_DURATION_MS => {
                return Err(EngineError::Invalid(
                    "a shadow run lasts at most 24h".into(),
                ));
            }
            d => d,
        };
        let gateways = self.resolve(&start.target, &self.observed.fleet)?;
        let busy: Vec<String> = self
            .shadows
            .runs
            .values()
            .filter(|r| running(r))
            .filter(|r| r.gateways.iter().any(|g| gateways.contains(&g.gateway_id)))
            .map(|r| r.id.clone())
            .collect();
        if !busy.is_empty() {
            return Err(EngineError::Conflict(format!(
                "shadow run {} is still running on some of these gateways; stop it first (ktctl shadow stop ID)",
                busy.join(", ")
            )));
        }
        let now = unix_ms_now();
        // Ids are the start time (two runs started in one millisecond take the next free one).
        let mut id_ms = now;
        while self.shadows.runs.contains_key(&format!("s-{id_ms:x}")) {
            id_ms += 1;
        }
        let config = ConfigRef {
            version: version.clone(),
            hash: content_hash(&start.content),
        };
        self.store
            .put_config(&StoredConfig {
                hash: config.hash.clone(),
                version,
                content: start.content,
                author: identity.clone(),
                created_at_unix_ms: now,
                message: format!("shadow: {}", start.reason),
            })
            .await?;
        let run = ShadowRun {
            id: format!("s-{id_ms:x}"),
            config: Some(config),
            state: "running".into(),
            started_by: identity.clone(),
            reason: start.reason,
            target: start.target.to_string(),
            started_at_unix_ms: now,
            ends_at_unix_ms: now + duration_ms,
            ended_at_unix_ms: 0,
            sample: start.sample,
            gateways: gateways
                .into_iter()
                .map(|gateway_id| ShadowGateway {
                    gateway_id,
                    state: "pending".into(),
                    error: String::new(),
                })
                .collect(),
            report: None,
            message: String::new(),
        };
        let what = format!(
            "shadow {} {} on {}",
            run.id,
            short(
                &run.config
                    .as_ref()
                    .map(|c| c.hash.clone())
                    .unwrap_or_default()
            ),
            run.target
        );
        self.store
            .audit(now, &identity, "shadow start", &run.id, &what)
            .await?;
        if !self.put_shadow(run.clone()).await {
            return Err(EngineError::Invalid(
                "the shadow run could not be stored".into(),
            ));
        }
        tracing::info!(shadow_run = %run.id, target = %run.target, gateways = run.gateways.len(), "shadow run started");
        self.offer_shadows(now).await;
        Ok(self.shadows.runs.get(&run.id).cloned().unwrap_or(run))
    }

    async fn stop_shadow(&mut self, id: &str, identity: &str) -> Result<ShadowRun, EngineError> {
        let run = self.shadows.runs.get(id).ok_or_else(|| no_run(id))?;
        if !running(run) {
            return Err(EngineError::Conflict(format!(
                "shadow run {id} already ended ({})",
                run.state
            )));
        }
        self.store
            .audit(unix_ms_now(), identity, "shadow stop", id, "stopped")
            .await?;
        self.end_shadow(id, "stopped", format!("stopped by {identity}"))
            .await;
        self.shadows.runs.get(id).cloned().ok_or_else(|| no_run(id))
    }

    /// Stores `run` and makes it the current record; false when it could not be stored.
    async fn put_shadow(&mut self, run: ShadowRun) -> bool {
        if let Err(error) = self.store.put_shadow_run(&run).await {
            tracing::error!(shadow_run = %run.id, %error, "cannot store the shadow run");
            return false;
        }
        self.shadows.runs.insert(run.id.clone(), run);
        true
    }

    async fn end_shadow(&mut self, id: &str, state: &str, why: String) {
        let Some(mut run) = self.shadows.runs.get(id).cloned() else {
            return;
        };
        run.state = state.into();
        run.ended_at_unix_ms = unix_ms_now();
        run.message = why;
        for g in &mut run.gateways {
            if g.state != "refused" {
                g.state = "removing".into();
            }
        }
        tracing::info!(shadow_run = %id, state, message = %run.message, "shadow run ended");
        self.put_shadow(run).await;
        self.offer_shadows(unix_ms_now()).await;
    }

    /// Moves every shadow run on: ends those past their time, follows each gateway's shadow
    /// as its health shows it, offers (or removes) shadows where needed, reads reports.
    pub(crate) async fn tick_shadows(&mut self, now: u64) {
        let due: Vec<String> = self
            .shadows
            .runs
            .values()
            .filter(|r| running(r) && now >= r.ends_at_unix_ms)
            .map(|r| r.id.clone())
            .collect();
        for id in due {
            self.end_shadow(&id, "completed", "its duration passed".into())
                .await;
        }
        self.offer_shadows(now).await;
        self.read_shadows(now);
    }

    /// Compares each target gateway's shadow with what its run wants, and offers where they
    /// differ and nothing is in flight.
    async fn offer_shadows(&mut self, now: u64) {
        let mut changed = Vec::new();
        let mut offers = Vec::new();
        let mut in_flight_done = Vec::new();
        // A gateway a running run targets is that run's: an ended run stops removing there.
        let taken: std::collections::BTreeSet<&str> = self
            .shadows
            .runs
            .values()
            .filter(|r| running(r))
            .flat_map(|r| r.gateways.iter().map(|g| g.gateway_id.as_str()))
            .collect();
        for run in self.shadows.runs.values() {
            if run
                .gateways
                .iter()
                .all(|g| matches!(g.state.as_str(), "refused" | "removed"))
            {
                continue;
            }
            let mut next = run.clone();
            let wanted = run.config.clone().unwrap_or_default();
            for g in &run.gateways {
                let Some(state) = self.observed.fleet.get(&g.gateway_id) else {
                    continue;
                };
                // Only a reading of the gateway says what shadow it runs.
                let Some(health) = state.health.as_ref().filter(|h| h.reachable) else {
                    continue;
                };
                let shadow = health.shadow.as_ref().map_or("", |s| s.hash.as_str());
                let connected = state.agent_state == kt_proto::v1::AgentState::Connected as i32;
                let capable = state
                    .agent_capabilities
                    .iter()
                    .any(|c| c == kt_proto::capability::SHADOW_CONFIG);
                let mut set = |s: &str, error: &str| {
                    if let Some(n) = gateway_state(&mut next, &g.gateway_id)
                        && (n.state != s || n.error != error)
                    {
                        n.state = s.into();
                        n.error = error.into();
                    }
                };
                match g.state.as_str() {
                    "refused" | "removed" => {}
                    "removing"
                        if shadow != wanted.hash || taken.contains(g.gateway_id.as_str()) =>
                    {
                        set("removed", "");
                        in_flight_done.push((run.id.clone(), g.gateway_id.clone()));
                    }
                    "removing" => {
                        if connected && self.may_offer(&run.id, &g.gateway_id, now) {
                            offers.push((run.id.clone(), g.gateway_id.clone(), true));
                        }
                    }
                    _ if shadow == wanted.hash => {
                        set("loaded", "");
                        in_flight_done.push((run.id.clone(), g.gateway_id.clone()));
                    }
                    _ if !connected => {}
                    _ if !capable => set(
                        "refused",
                        "its agent does not apply shadow configs (no gateway.shadow_config_path, or an older kt-agent)",
                    ),
                    _ => {
                        if self.may_offer(&run.id, &g.gateway_id, now) {
                            set("offered", "");
                            offers.push((run.id.clone(), g.gateway_id.clone(), false));
                        }
                    }
                }
            }
            if next != *run {
                changed.push(next);
            }
        }
        for key in in_flight_done {
            self.shadows.in_flight.remove(&key);
        }
        for run in changed {
            self.put_shadow(run).await;
        }
        for (run, gateway, remove) in offers {
            self.offer_shadow(run, gateway, remove, now).await;
        }
    }

    fn may_offer(&self, run: &str, gateway: &str, now: u64) -> bool {
        self.shadows
            .in_flight
            .get(&(run.to_owned(), gateway.to_owned()))
            .is_none_or(|(_, at)| now >= at + OFFER_TIMEOUT_MS)
    }

    /// Offers `run`'s shadow to `gateway`, or (`remove`) tells it to drop its shadow.
    async fn offer_shadow(&mut self, run: String, gateway: String, remove: bool, now: u64) {
        let found = self.shadows.runs.get(&run).filter(|_| !remove);
        let (config, content) = match found {
            Some(run) => {
                let config = run.config.clone().unwrap_or_default();
                match self.store.get_config(&config.hash).await {
                    Ok(Some(stored)) => (Some(config), stored.content),
                    Ok(None) => {
                        tracing::error!(shadow_run = %run.id, hash = %config.hash, "no stored copy of the shadow config");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the shadow config");
                        return;
                    }
                }
            }
            None => (None, Vec::new()),
        };
        self.shadows.offers_made += 1;
        let offer_id = format!(
            "shadow/{run}/{}/{}",
            if remove { "remove" } else { "load" },
            self.shadows.offers_made
        );
        let offer = ConfigOffer {
            offer_id: offer_id.clone(),
            config,
            content,
            rollback: false,
            apply_deadline_ms: APPLY_DEADLINE_MS,
            epoch: self.epoch.number,
            epoch_cluster: self.epoch.cluster.clone(),
            shadow: true,
        };
        if self.offers.send(gateway.clone(), offer).await {
            self.shadows
                .in_flight
                .insert((run, gateway), (offer_id, now));
        }
    }

    /// An agent answered a shadow offer.
    pub(crate) async fn shadow_answered(&mut self, gateway: &str, status: &ConfigStatus) {
        let phase = ConfigPhase::try_from(status.phase).unwrap_or(ConfigPhase::Unspecified);
        self.shadows
            .in_flight
            .retain(|(_, g), (id, _)| g != gateway || *id != status.offer_id);
        let removal = status.config.as_ref().is_none_or(|c| c.hash.is_empty());
        let refused = matches!(phase, ConfigPhase::Rejected | ConfigPhase::Failed);
        tracing::info!(gateway_id = %gateway, offer_id = %status.offer_id, phase = phase.as_str_name(), error = %status.error, "shadow offer answered");
        if removal || !refused {
            return; // what the gateway shows in its health moves the run on
        }
        let hash = status.config.as_ref().map_or("", |c| c.hash.as_str());
        let run = self
            .shadows
            .runs
            .values()
            .find(|r| running(r) && r.config.as_ref().is_some_and(|c| c.hash == hash));
        let Some(mut run) = run.cloned() else {
            return;
        };
        if let Some(g) = gateway_state(&mut run, gateway) {
            g.state = "refused".into();
            g.error = status.error.clone();
        }
        self.put_shadow(run).await;
    }

    /// Starts the readers that are due: a count of what a sampled run compared, and the final
    /// report of a run that ended (once its gateways dropped the shadow, or after a grace).
    fn read_shadows(&mut self, now: u64) {
        let (Some(events), Some(own)) = (self.shadows.events.clone(), self.shadows.own.clone())
        else {
            return;
        };
        let scope = self.shadows.scope.clone();
        let check_samples = now >= self.shadows.last_sample_check + SAMPLE_CHECK_MS;
        if check_samples {
            self.shadows.last_sample_check = now;
        }
        for run in self.shadows.runs.values() {
            if self.shadows.reading.contains(&run.id)
                || self
                    .shadows
                    .retry_at
                    .get(&run.id)
                    .is_some_and(|at| now < *at)
            {
                continue;
            }
            let sampled = running(run) && run.sample > 0 && check_samples;
            let settled = run
                .gateways
                .iter()
                .all(|g| matches!(g.state.as_str(), "refused" | "removed"));
            let waited = now.saturating_sub(run.ended_at_unix_ms);
            let report_due = !running(run)
                && run.report.is_none()
                && ((settled && waited >= SETTLED_GRACE_MS) || waited >= REPORT_GRACE_MS);
            if !sampled && !report_due {
                continue;
            }
            self.shadows.reading.insert(run.id.clone());
            let (events, own, run) = (events.clone(), own.clone(), run.clone());
            let scope = scope.clone();
            tokio::spawn(async move {
                let report = read_report(events.as_ref(), scope.as_deref(), &run).await;
                let command = if report_due {
                    ShadowCommand::Report { id: run.id, report }
                } else {
                    let compared = report.map_or(0, |r| r.compared);
                    ShadowCommand::Compared {
                        id: run.id,
                        compared,
                    }
                };
                if let Some(own) = own.upgrade() {
                    let _ = own.send(Command::Shadow(command)).await;
                }
            });
        }
    }
}

fn no_run(id: &str) -> EngineError {
    EngineError::NotFound(format!("no shadow run {id}"))
}
