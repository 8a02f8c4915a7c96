//! The rollout engine: one task owns every rollout. It persists each transition before acting
//! on it (an offer is sent only once the record saying so is stored), so a coordinator killed
//! at any moment resumes exactly where it stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kt_daemon::unix_ms_now;
use kt_proto::v1::{ConfigOffer, ConfigPhase, ConfigStatus, GatewayState};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::model::{ConfigId, Outcome, Phase, RolloutRecord, Spec, Target, TargetState};
use super::plan::{content_hash, diff, plan, version_label};
use super::step::{self, Effect, Observed};
use crate::cluster::Epoch;
use crate::cluster::offers::OfferRoute;
use crate::events::EventLog;
use crate::events::counters::DecisionCounters;
use crate::fleet::{FleetChange, FleetHandle, Hold};
use crate::intent::Intent;
use crate::metrics::{GateLabels, Metrics};
use crate::reconcile::{GroupStatus, Reoffers, SourceReading};
use crate::shadow::runs::{ShadowCommand, ShadowRuns, StartShadow};
use kt_proto::v1::ShadowRun;

use crate::store::{Store, StoreError, StoredConfig};

/// Answers handled together at most (see `handle_queued`).
const ANSWER_BATCH: usize = 4096;

/// How often active rollouts look at the fleet and the clock.
const TICK: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("coordinator is shutting down")]
    Closed,
    /// Replicated control plane: no leader answered.
    #[error("{0}")]
    NoLeader(String),
}

/// A push, as the operator asked for it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Push {
    pub content: Vec<u8>,
    pub spec: Spec,
    pub reason: String,
    pub dry_run: bool,
    pub supersede: bool,
    pub rollback: bool,
    /// The config source that started it, when no operator did.
    pub source: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Abort,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

#[derive(Debug)]
pub enum Command {
    Push {
        push: Push,
        identity: String,
        reply: Reply<(RolloutRecord, String)>,
    },
    Control {
        id: String,
        action: Action,
        identity: String,
        reason: String,
        reply: Reply<RolloutRecord>,
    },
    Get {
        id: String,
        reply: Reply<RolloutRecord>,
    },
    List {
        reply: Reply<Vec<RolloutRecord>>,
    },
    Watch {
        id: String,
        reply: Reply<(RolloutRecord, broadcast::Receiver<RolloutRecord>)>,
    },
    /// An agent answered an offer.
    Answer {
        gateway: String,
        status: ConfigStatus,
    },
    /// Pins a gateway to a stored version (`config`: a hash, a prefix of one, or a version
    /// label), or removes its pin.
    Pin {
        gateway: String,
        config: Option<String>,
        identity: String,
        reason: String,
        reply: Reply<()>,
    },
    /// A group's config source as just read.
    Source {
        group: String,
        reading: SourceReading,
    },
    /// What each group should run, and its source.
    Groups {
        reply: Reply<BTreeMap<String, GroupStatus>>,
    },
    Shadow(ShadowCommand),
}

#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

impl EngineHandle {
    /// A handle whose commands arrive on the returned receiver, for whatever serves them in the
    /// engine's place (a replica forwarding them to the leader through etcd).
    pub fn channel() -> (Self, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(1024);
        (EngineHandle { tx }, rx)
    }
}

impl EngineHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| EngineError::Closed)?;
        rx.await.map_err(|_| EngineError::Closed)?
    }

    pub async fn push(
        &self,
        push: Push,
        identity: String,
    ) -> Result<(RolloutRecord, String), EngineError> {
        self.call(|reply| Command::Push {
            push,
            identity,
            reply,
        })
        .await
    }

    pub async fn control(
        &self,
        id: String,
        action: Action,
        identity: String,
        reason: String,
    ) -> Result<RolloutRecord, EngineError> {
        self.call(|reply| Command::Control {
            id,
            action,
            identity,
            reason,
            reply,
        })
        .await
    }

    pub async fn get(&self, id: String) -> Result<RolloutRecord, EngineError> {
        self.call(|reply| Command::Get { id, reply }).await
    }

    pub async fn list(&self) -> Result<Vec<RolloutRecord>, EngineError> {
        self.call(|reply| Command::List { reply }).await
    }

    pub async fn watch(
        &self,
        id: String,
    ) -> Result<(RolloutRecord, broadcast::Receiver<RolloutRecord>), EngineError> {
        self.call(|reply| Command::Watch { id, reply }).await
    }

    pub async fn pin(
        &self,
        gateway: String,
        config: Option<String>,
        identity: String,
        reason: String,
    ) -> Result<(), EngineError> {
        self.call(|reply| Command::Pin {
            gateway,
            config,
            identity,
            reason,
            reply,
        })
        .await
    }

    pub async fn groups(&self) -> Result<BTreeMap<String, GroupStatus>, EngineError> {
        self.call(|reply| Command::Groups { reply }).await
    }

    pub async fn start_shadow(
        &self,
        start: StartShadow,
        identity: String,
    ) -> Result<ShadowRun, EngineError> {
        self.call(|reply| {
            Command::Shadow(ShadowCommand::Start {
                start,
                identity,
                reply,
            })
        })
        .await
    }

    pub async fn stop_shadow(
        &self,
        id: String,
        identity: String,
    ) -> Result<ShadowRun, EngineError> {
        self.call(|reply| {
            Command::Shadow(ShadowCommand::Stop {
                id,
                identity,
                reply,
            })
        })
        .await
    }

    pub async fn get_shadow(&self, id: String) -> Result<ShadowRun, EngineError> {
        self.call(|reply| Command::Shadow(ShadowCommand::Get { id, reply }))
            .await
    }

    pub async fn list_shadows(&self) -> Result<Vec<ShadowRun>, EngineError> {
        self.call(|reply| Command::Shadow(ShadowCommand::List { reply }))
            .await
    }

    /// Hands over a config source's reading; false when the engine is gone.
    pub async fn source(&self, group: String, reading: SourceReading) -> bool {
        self.tx
            .send(Command::Source { group, reading })
            .await
            .is_ok()
    }

    /// Forwards an agent's answer; dropped only when the engine is gone.
    pub async fn answer(&self, gateway: String, status: ConfigStatus) {
        let _ = self.tx.send(Command::Answer { gateway, status }).await;
    }
}

pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) fleet: FleetHandle,
    decisions: DecisionCounters,
    metrics: Arc<Metrics>,
    pub(crate) rollouts: BTreeMap<String, RolloutRecord>,
    commands: mpsc::Receiver<Command>,
    changes: broadcast::Sender<RolloutRecord>,
    /// The fleet as its subscription reports it (no copy per step), with the decision counters
    /// as of the last tick.
    pub(crate) observed: Observed,
    /// What every gateway and group should run; written to the store before it changes here.
    pub(crate) intent: Intent,
    /// Gateways whose record changed since their desired config was last checked.
    pub(crate) unchecked: std::collections::BTreeSet<String>,
    /// Re-offers to drifted gateways (`drift: enforce`, pins), with their backoff.
    pub(crate) reoffers: Reoffers,
    /// Each group's config source as last read.
    pub(crate) sources: BTreeMap<String, SourceReading>,
    /// Stamped on every offer, so agents can refuse a deposed leader's.
    pub(crate) epoch: Epoch,
    /// Where offers go: the session here, or etcd for the replica holding it.
    pub(crate) offers: OfferRoute,
    pub(crate) shadows: ShadowRuns,
}

impl Engine {
    /// Loads every stored rollout. Offers that were in flight are offered again: an agent answers
    /// an offer of what it already runs with APPLIED at once, so repeating one is harmless.
    pub async fn new(
        store: Arc<dyn Store>,
        fleet: FleetHandle,
        decisions: DecisionCounters,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, EngineHandle), StoreError> {
        let intent = store.load_intent().await?;
        let mut rollouts = BTreeMap::new();
        for mut r in store.list_rollouts().await? {
            if r.is_active() {
                for p in r.gateways.values_mut() {
                    if p.state == TargetState::Offered {
                        p.state = TargetState::Pending;
                    } else if p.state == TargetState::RollingBack {
                        p.state = TargetState::Applied;
                    }
                }
                tracing::info!(rollout = %r.id, state = r.state_name(), "resuming rollout");
            }
            rollouts.insert(r.id.clone(), r);
        }
        let shadows = ShadowRuns::new(store.list_shadow_runs().await?);
        let (tx, commands) = mpsc::channel(1024);
        let (changes, _) = broadcast::channel(1024);
        Ok((
            Engine {
                store,
                fleet: fleet.clone(),
                decisions,
                metrics,
                rollouts,
                commands,
                changes,
                observed: Observed::default(),
                intent,
                unchecked: Default::default(),
                reoffers: Reoffers::default(),
                sources: BTreeMap::new(),
                epoch: Epoch::default(),
                offers: OfferRoute::Local(fleet.clone()),
                shadows,
            },
            EngineHandle { tx },
        ))
    }

    /// A leader's engine: stamps `epoch` on every offer and sends them by `offers`; the history
    /// of each active rollout says who took it over (written with its next transition).
    pub fn leading(mut self, epoch: Epoch, offers: OfferRoute, replica: &str) -> Self {
        let now = unix_ms_now();
        for r in self.rollouts.values_mut().filter(|r| r.is_active()) {
            r.record(
                now,
                replica,
                format!(
                    "taken over by leader {replica} (epoch {}); offers in flight are made again",
                    epoch.number
                ),
            );
        }
        self.epoch = epoch;
        self.offers = offers;
        self
    }

    /// Shadow runs read their reports from `events` (`scope`: when they are only part of the
    /// fleet's, which); `handle` is this engine's own.
    pub fn reading_events(
        mut self,
        events: Arc<dyn EventLog>,
        scope: Option<String>,
        handle: &EngineHandle,
    ) -> Self {
        self.shadows
            .reading_from(events, scope, handle.tx.downgrade());
        self
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let Ok(mut fleet_changes) = self.resubscribe().await else {
            return;
        };
        self.publish_holds_at_start().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.tick().await,
                change = fleet_changes.recv() => match change {
                    Ok(change) => self.on_fleet_change(change),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "the engine fell behind the fleet: reading it whole again");
                        match self.resubscribe().await {
                            Ok(receiver) => fleet_changes = receiver,
                            Err(_) => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_queued(command).await,
                    None => return,
                },
            }
        }
    }

    /// Takes the fleet whole (at start, or after falling behind) and follows its changes.
    async fn resubscribe(
        &mut self,
    ) -> Result<broadcast::Receiver<FleetChange>, crate::fleet::FleetClosed> {
        let (snapshot, receiver) = self.fleet.subscribe().await?;
        self.observed.fleet = snapshot
            .into_iter()
            .map(|g| (g.gateway_id.clone(), g))
            .collect();
        self.unchecked = self.observed.fleet.keys().cloned().collect();
        Ok(receiver)
    }

    fn on_fleet_change(&mut self, change: FleetChange) {
        match change {
            FleetChange::State(state) => {
                self.unchecked.insert(state.gateway_id.clone());
                self.observed.fleet.insert(state.gateway_id.clone(), *state);
            }
            FleetChange::Heartbeat {
                gateway,
                at_unix_ms,
            } => {
                if let Some(state) = self.observed.fleet.get_mut(gateway.as_str()) {
                    state.last_heartbeat_unix_ms = at_unix_ms;
                }
            }
        }
    }

    /// Rollouts resumed at start hold their gateways again; a new leader's takeover line is
    /// written at once, so the history shows who carries each rollout on from when.
    async fn publish_holds_at_start(&mut self) {
        if self.epoch.number > 0 {
            for r in self.rollouts.values().filter(|r| r.is_active()) {
                if let Err(error) = self.store.put_rollout(r, &[]).await {
                    tracing::warn!(rollout = %r.id, %error, "takeover not recorded");
                }
            }
        }
        let mut holds = Vec::new();
        for r in self.rollouts.values().filter(|r| r.is_active()) {
            for gateway in r.gateways.keys() {
                holds.push((gateway.clone(), hold_of(r, gateway)));
            }
        }
        self.fleet.set_held(holds).await;
    }

    async fn tick(&mut self) {
        let now = unix_ms_now();
        self.check_desired(now).await;
        if self.rollouts.values().any(RolloutRecord::is_active) {
            self.observed.decisions = self.decisions.snapshot();
            let ids: Vec<String> = self
                .rollouts
                .values()
                .filter(|r| r.is_active())
                .map(|r| r.id.clone())
                .collect();
            for id in ids {
                self.advance(&id, now).await;
            }
        }
        self.enforce_desired(now).await;
        self.consider_sources(now).await;
        self.tick_shadows(now).await;
    }

    /// Steps one rollout; persists, then carries out the effects, then publishes.
    pub(crate) async fn advance(&mut self, id: &str, now: u64) {
        let Some(mut r) = self.rollouts.get(id).cloned() else {
            return;
        };
        let (effects, changed) = step::step(&mut r, &self.observed, now);
        // A transition acts only once it is stored: an offer of a transition that could not be
        // stored is not made (the next step tries again from the stored record).
        if changed && !self.commit(r.clone()).await {
            return;
        }
        // An all-at-once rollout offers one config to every gateway: read it once.
        let mut contents: std::collections::HashMap<String, Vec<u8>> = Default::default();
        for effect in effects {
            self.carry_out(&r, effect, &mut contents).await;
        }
    }

    /// Stores `r` with the desired configs its transition moves, and makes it the current
    /// record; false (and the old record kept) when it cannot be stored, in which case the
    /// transition must not take effect. The fleet learns the new desired configs and holds
    /// before anyone learns of the transition, so no listing shows one without the other.
    pub(crate) async fn commit(&mut self, r: RolloutRecord) -> bool {
        let now = unix_ms_now();
        let before = self.rollouts.get(&r.id);
        let moves = step::desired_moves(before, &r, now);
        let holds: Vec<(String, Option<Hold>)> = r
            .gateways
            .keys()
            .filter_map(|g| {
                let hold = hold_of(&r, g);
                let was = before.and_then(|b| hold_of(b, g));
                (hold != was).then(|| (g.clone(), hold))
            })
            .collect();
        let finished = !r.is_active() && before.is_none_or(RolloutRecord::is_active);
        if let Err(error) = self.store.put_rollout(&r, &moves).await {
            tracing::error!(rollout = %r.id, %error, "cannot persist rollout transition");
            return false;
        }
        self.intent.apply(&moves);
        self.publish_desired(moves.into_iter().map(|(g, _)| g), false)
            .await;
        self.fleet.set_held(holds).await;
        if finished {
            self.settle_group(&r).await;
        }
        let counted = self
            .rollouts
            .get(&r.id)
            .map_or(0, |before| before.gates.len());
        for g in r.gates.iter().skip(counted) {
            self.metrics
                .gate_evaluations
                .get_or_create(&GateLabels {
                    gate: g.gate.clone(),
                    decision: g.decision.as_str().to_owned(),
                })
                .inc();
        }
        let _ = self.changes.send(r.clone());
        self.rollouts.insert(r.id.clone(), r);
        true
    }

    async fn carry_out(
        &mut self,
        r: &RolloutRecord,
        effect: Effect,
        contents: &mut std::collections::HashMap<String, Vec<u8>>,
    ) {
        let Effect::Offer {
            gateway,
            offer_id,
            config,
            rollback,
            apply_deadline_ms,
        } = effect;
        let stored = match contents.get(&config.hash) {
            Some(content) => Ok(Some(content.clone())),
            None => self
                .store
                .get_config(&config.hash)
                .await
                .map(|found| found.map(|c| c.content)),
        };
        let content = match stored {
            Ok(Some(content)) => {
                contents.insert(config.hash.clone(), content.clone());
                content
            }
            Ok(None) => {
                tracing::error!(rollout = %r.id, gateway_id = %gateway, hash = %config.hash, "no stored copy of the config to offer");
                let status = ConfigStatus {
                    offer_id: offer_id.clone(),
                    phase: ConfigPhase::Failed as i32,
                    error: format!(
                        "the coordinator has no copy of {} {}",
                        config.version, config.hash
                    ),
                    ..Default::default()
                };
                Box::pin(self.on_answers(vec![(gateway, status)])).await;
                return;
            }
            Err(error) => {
                tracing::error!(%error, "cannot read config version");
                return;
            }
        };
        let offer = ConfigOffer {
            offer_id,
            config: Some(kt_proto::v1::ConfigRef {
                version: config.version.clone(),
                hash: config.hash.clone(),
            }),
            content,
            rollback,
            apply_deadline_ms,
            epoch: self.epoch.number,
            epoch_cluster: self.epoch.cluster.clone(),
            shadow: false,
        };
        if !self.offers.send(gateway.clone(), offer).await {
            // Not delivered: the next tick sees the gateway disconnected and makes it pending.
            tracing::debug!(rollout = %r.id, gateway_id = %gateway, "offer not delivered");
        }
    }

    /// Handles `first` and every command already queued behind it, answers together: with
    /// thousands of agents answering an all-at-once rollout, each batch of answers is persisted
    /// and acted on once, not once per answer.
    async fn handle_queued(&mut self, first: Command) {
        let mut answers = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Answer { gateway, status } => {
                    answers.push((gateway, status));
                    if answers.len() < ANSWER_BATCH {
                        next = self.commands.try_recv().ok();
                    }
                }
                other => {
                    self.on_answers(std::mem::take(&mut answers)).await;
                    self.handle(other).await;
                    next = self.commands.try_recv().ok();
                }
            }
        }
        self.on_answers(answers).await;
    }

    /// A gateway that refused a config (its own validation failed) marks the version, so
    /// `ktctl config versions` says it was rejected and by whom.
    async fn remember_rejection(&self, gateway: &str, phase: ConfigPhase, status: &ConfigStatus) {
        let Some(config) = status
            .config
            .as_ref()
            .filter(|_| phase == ConfigPhase::Rejected)
        else {
            return;
        };
        if let Err(error) = self
            .store
            .mark_rejected(&config.hash, gateway, &status.error, unix_ms_now())
            .await
        {
            tracing::warn!(gateway_id = %gateway, %error, "cannot mark the rejected config");
        }
    }

    /// Records agents' answers in their rollouts, persists each changed rollout once, then
    /// advances them.
    async fn on_answers(&mut self, answers: Vec<(String, ConfigStatus)>) {
        if answers.is_empty() {
            return;
        }
        let now = unix_ms_now();
        let mut changed: BTreeMap<String, RolloutRecord> = BTreeMap::new();
        for (gateway, status) in answers {
            if status.shadow {
                self.shadow_answered(&gateway, &status).await;
                continue;
            }
            let phase = ConfigPhase::try_from(status.phase).unwrap_or(ConfigPhase::Unspecified);
            self.remember_rejection(&gateway, phase, &status).await;
            let owner = self
                .rollouts
                .values()
                .find(|r| {
                    r.is_active()
                        && r.gateways.get(&gateway).is_some_and(|p| {
                            p.offer_id.as_deref() == Some(status.offer_id.as_str())
                        })
                })
                .map(|r| r.id.clone());
            let Some(id) = owner else {
                if !self.reoffer_answered(&gateway, &status, phase).await {
                    tracing::debug!(gateway_id = %gateway, offer_id = %status.offer_id, "answer to no active offer");
                }
                continue;
            };
            if let Some(r) = changed.get_mut(&id) {
                step::answer(r, &gateway, &status.offer_id, phase, &status.error, now);
            } else if let Some(mut r) = self.rollouts.get(&id).cloned()
                && step::answer(
                    &mut r,
                    &gateway,
                    &status.offer_id,
                    phase,
                    &status.error,
                    now,
                )
            {
                changed.insert(id, r);
            }
        }
        if changed.is_empty() {
            return;
        }
        let ids: Vec<String> = changed.keys().cloned().collect();
        for r in changed.into_values() {
            self.commit(r).await;
        }
        for id in ids {
            self.advance(&id, now).await;
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Push {
                push,
                identity,
                reply,
            } => {
                let result = self.push(push, identity).await;
                let _ = reply.send(result);
            }
            Command::Control {
                id,
                action,
                identity,
                reason,
                reply,
            } => {
                let result = self.control(&id, action, &identity, &reason).await;
                let _ = reply.send(result);
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.find(&id).cloned());
            }
            Command::List { reply } => {
                let _ = reply.send(Ok(self.rollouts.values().cloned().collect()));
            }
            Command::Watch { id, reply } => {
                let receiver = self.changes.subscribe();
                let _ = reply.send(self.find(&id).cloned().map(|r| (r, receiver)));
            }
            Command::Answer { gateway, status } => self.on_answers(vec![(gateway, status)]).await,
            Command::Pin {
                gateway,
                config,
                identity,
                reason,
                reply,
            } => {
                let result = self.pin(&gateway, config, &identity, &reason).await;
                let _ = reply.send(result);
            }
            Command::Source { group, reading } => {
                self.sources.insert(group, reading);
                self.consider_sources(unix_ms_now()).await;
            }
            Command::Groups { reply } => {
                let _ = reply.send(Ok(self.group_statuses()));
            }
            Command::Shadow(command) => self.on_shadow_command(command).await,
        }
    }

    fn find(&self, id: &str) -> Result<&RolloutRecord, EngineError> {
        self.rollouts
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no rollout {id}")))
    }

    pub(crate) async fn push(
        &mut self,
        push: Push,
        identity: String,
    ) -> Result<(RolloutRecord, String), EngineError> {
        let version = version_label(&push.content).map_err(EngineError::Invalid)?;
        let config = ConfigId {
            version: version.clone(),
            hash: content_hash(&push.content),
        };
        let gateways = self.resolve(&push.spec.target, &self.observed.fleet)?;
        let now = unix_ms_now();

        let in_the_way: Vec<&RolloutRecord> = self
            .rollouts
            .values()
            .filter(|r| r.is_active() && r.gateways.keys().any(|g| gateways.contains(g)))
            .collect();
        if !in_the_way.is_empty() && !push.supersede && !push.dry_run {
            let ids: Vec<&str> = in_the_way.iter().map(|r| r.id.as_str()).collect();
            return Err(EngineError::Conflict(format!(
                "rollout {} is still active on some of these gateways; wait, abort it, or push with --supersede",
                ids.join(", ")
            )));
        }
        let superseded: Vec<String> = in_the_way.iter().map(|r| r.id.clone()).collect();

        let (progress, batches) = plan(&push.spec, &gateways, &self.observed.fleet, &config);
        let diff_text = self
            .diff_against_baseline(&progress, &push.content, &config)
            .await;
        let number = if push.dry_run {
            0
        } else {
            self.store.next_rollout_number().await?
        };
        let mut r = RolloutRecord {
            number,
            id: if push.dry_run {
                "dry-run".into()
            } else {
                format!("r-{number}")
            },
            progress_deadline: now + push.spec.progress_deadline_ms,
            spec: push.spec,
            config: config.clone(),
            phase: if batches.is_empty() {
                Phase::Done(Outcome::Succeeded)
            } else {
                Phase::Applying
            },
            batches,
            gateways: progress,
            current_batch: 0,
            bake_counts: BTreeMap::new(),
            gates: Vec::new(),
            history: Vec::new(),
            created_by: identity.clone(),
            reason: push.reason.clone(),
            created_at: now,
            message: String::new(),
            dry_run: push.dry_run,
            rollback: push.rollback,
            passed_batches: 0,
            confirming: false,
            source: push.source.clone(),
        };
        if push.dry_run {
            return Ok((r, diff_text));
        }

        self.store
            .put_config(&StoredConfig {
                hash: config.hash.clone(),
                version,
                content: push.content,
                author: identity.clone(),
                created_at_unix_ms: now,
                message: push.reason.clone(),
            })
            .await?;
        for id in superseded {
            if let Some(mut old) = self.rollouts.get(&id).cloned() {
                old.phase = Phase::Done(Outcome::Superseded);
                old.message = format!("superseded by {}", r.id);
                old.record(now, &identity, old.message.clone());
                if !self.commit(old).await {
                    return Err(EngineError::Store(StoreError::from(format!(
                        "cannot store that {id} was superseded; nothing was pushed"
                    ))));
                }
            }
        }
        let what = format!(
            "created: {} {} to {}{}",
            config.version,
            short(&config.hash),
            r.spec.target,
            reason_suffix(&push.reason)
        );
        r.record(now, &identity, what);
        if r.batches.is_empty() {
            r.record(
                now,
                "coordinator",
                "every target gateway already runs this version",
            );
        }
        self.store
            .audit(
                now,
                &identity,
                "push",
                &r.spec.target.to_string(),
                &push.reason,
            )
            .await?;
        if !self.commit(r.clone()).await {
            return Err(EngineError::Store(StoreError::from(
                "the rollout could not be stored; nothing was pushed".to_owned(),
            )));
        }
        let id = r.id.clone();
        self.observed.decisions = self.decisions.snapshot();
        self.advance(&id, now).await;
        let r = self.rollouts.get(&id).cloned().unwrap_or(r);
        Ok((r, diff_text))
    }

    pub(crate) fn resolve(
        &self,
        target: &Target,
        fleet: &BTreeMap<String, GatewayState>,
    ) -> Result<Vec<String>, EngineError> {
        let gateways: Vec<String> = match target {
            Target::Group(group) => {
                if !self.fleet.group_exists(group) {
                    return Err(EngineError::NotFound(format!("no group named {group:?}")));
                }
                fleet
                    .values()
                    .filter(|g| self.fleet.in_group(g, group))
                    .map(|g| g.gateway_id.clone())
                    .collect()
            }
            Target::Selector(selector) => fleet
                .values()
                .filter(|g| selector.iter().all(|(k, v)| g.labels.get(k) == Some(v)))
                .map(|g| g.gateway_id.clone())
                .collect(),
        };
        if gateways.is_empty() {
            return Err(EngineError::Invalid(format!("no gateways match {target}")));
        }
        Ok(gateways)
    }

    /// A diff from the config most target gateways run now to the pushed one.
    async fn diff_against_baseline(
        &self,
        progress: &BTreeMap<String, super::model::GatewayProgress>,
        content: &[u8],
        config: &ConfigId,
    ) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for p in progress.values() {
            *counts.entry(p.baseline.hash.as_str()).or_default() += 1;
        }
        let Some((baseline, _)) = counts.into_iter().max_by_key(|(_, n)| *n) else {
            return String::new();
        };
        let old = match self.store.get_config(baseline).await {
            Ok(Some(stored)) => String::from_utf8_lossy(&stored.content).into_owned(),
            _ => {
                return format!(
                    "(no stored copy of the running config {baseline}: diff unavailable)\n"
                );
            }
        };
        diff(
            &old,
            &String::from_utf8_lossy(content),
            &format!("running {}", short(baseline)),
            &format!("pushed {}", short(&config.hash)),
        )
    }

    async fn control(
        &mut self,
        id: &str,
        action: Action,
        identity: &str,
        reason: &str,
    ) -> Result<RolloutRecord, EngineError> {
        let mut r = self.find(id)?.clone();
        let now = unix_ms_now();
        let result = match action {
            Action::Pause => step::pause(&mut r, now, identity, reason),
            Action::Resume => step::resume(&mut r, now, identity, reason),
            Action::Promote => step::promote(&mut r, now, identity, reason),
            Action::Abort => step::abort(&mut r, now, identity, reason),
        };
        result.map_err(EngineError::Conflict)?;
        let action_name = format!("{action:?}").to_lowercase();
        self.store
            .audit(now, identity, &action_name, id, reason)
            .await?;
        if !self.commit(r).await {
            return Err(EngineError::Store(StoreError::from(
                "the rollout could not be stored; nothing changed".to_owned(),
            )));
        }
        self.observed.decisions = self.decisions.snapshot();
        self.advance(id, now).await;
        self.find(id).cloned()
    }
}

/// Whether `r` holds `gateway` while it converges: from its first offer until the rollout ends
/// (a gateway rolled back stays held until it reports its previous config running).
pub(crate) fn hold_of(r: &RolloutRecord, gateway: &str) -> Option<Hold> {
    let p = r.gateways.get(gateway)?;
    let held = r.is_active() && (p.state.touched() || p.state == TargetState::RolledBack);
    held.then(|| Hold {
        by: r.id.clone(),
        in_flight: matches!(p.state, TargetState::Offered | TargetState::RollingBack),
    })
}

pub(crate) fn short(hash: &str) -> &str {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    &hex[..hex.len().min(12)]
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use kt_proto::identity::GatewayId;
    use kt_proto::v1::coordinator_message::Body;
    use kt_proto::v1::{ConfigInfo, GatewayHealth, HealthStatus};

    use super::*;
    use crate::config::{Group, LivenessConfig};
    use crate::fleet::{Command as FleetCommand, Fleet, HelloInfo};
    use crate::rollout::model::{Size, Strategy};
    use crate::store::SqliteStore;

    /// The real store, whose rollout writes fail once `writes_left` is used up (a full or broken
    /// disk).
    struct FailingWrites {
        inner: SqliteStore,
        writes_left: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for FailingWrites {
        async fn put_config(&self, config: &StoredConfig) -> Result<(), StoreError> {
            self.inner.put_config(config).await
        }
        async fn get_config(&self, hash: &str) -> Result<Option<StoredConfig>, StoreError> {
            self.inner.get_config(hash).await
        }
        async fn list_configs(&self) -> Result<Vec<StoredConfig>, StoreError> {
            self.inner.list_configs().await
        }
        async fn put_rollout(
            &self,
            rollout: &RolloutRecord,
            desired: &[crate::intent::DesiredChange],
        ) -> Result<(), StoreError> {
            let left = self.writes_left.load(Ordering::SeqCst);
            if left == 0 {
                return Err(StoreError::from("disk I/O error".to_owned()));
            }
            self.writes_left.store(left - 1, Ordering::SeqCst);
            self.inner.put_rollout(rollout, desired).await
        }
        async fn put_desired(
            &self,
            desired: &[crate::intent::DesiredChange],
        ) -> Result<(), StoreError> {
            self.inner.put_desired(desired).await
        }
        async fn put_pin(
            &self,
            gateway: &str,
            pin: Option<&crate::intent::Desired>,
        ) -> Result<(), StoreError> {
            self.inner.put_pin(gateway, pin).await
        }
        async fn put_group_intent(
            &self,
            group: &str,
            intent: &crate::intent::GroupIntent,
        ) -> Result<(), StoreError> {
            self.inner.put_group_intent(group, intent).await
        }
        async fn load_intent(&self) -> Result<crate::intent::Intent, StoreError> {
            self.inner.load_intent().await
        }
        async fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
            self.inner.list_rollouts().await
        }
        async fn next_rollout_number(&self) -> Result<u64, StoreError> {
            self.inner.next_rollout_number().await
        }
        async fn audit(
            &self,
            at_unix_ms: u64,
            identity: &str,
            action: &str,
            target: &str,
            reason: &str,
        ) -> Result<(), StoreError> {
            self.inner
                .audit(at_unix_ms, identity, action, target, reason)
                .await
        }
        async fn mark_rejected(
            &self,
            hash: &str,
            gateway: &str,
            reason: &str,
            at_unix_ms: u64,
        ) -> Result<(), StoreError> {
            self.inner
                .mark_rejected(hash, gateway, reason, at_unix_ms)
                .await
        }
        async fn rejections(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, StoreError> {
            self.inner.rejections().await
        }
        async fn put_groups(&self, groups: &[Group]) -> Result<(), StoreError> {
            self.inner.put_groups(groups).await
        }
        async fn list_groups(&self) -> Result<Vec<Group>, StoreError> {
            self.inner.list_groups().await
        }
        async fn put_token(&self, token: &crate::tokens::JoinToken) -> Result<(), StoreError> {
            self.inner.put_token(token).await
        }
        async fn list_tokens(&self) -> Result<Vec<crate::tokens::JoinToken>, StoreError> {
            self.inner.list_tokens().await
        }
        async fn replace_token(
            &self,
            current: &crate::tokens::JoinToken,
            next: &crate::tokens::JoinToken,
        ) -> Result<bool, StoreError> {
            self.inner.replace_token(current, next).await
        }
        async fn put_revocation(
            &self,
            revocation: &crate::revocations::AgentRevocation,
        ) -> Result<(), StoreError> {
            self.inner.put_revocation(revocation).await
        }
        async fn delete_revocation(&self, gateway: &str) -> Result<(), StoreError> {
            self.inner.delete_revocation(gateway).await
        }
        async fn list_revocations(
            &self,
        ) -> Result<Vec<crate::revocations::AgentRevocation>, StoreError> {
            self.inner.list_revocations().await
        }
        async fn put_shadow_run(&self, run: &kt_proto::v1::ShadowRun) -> Result<(), StoreError> {
            self.inner.put_shadow_run(run).await
        }
        async fn list_shadow_runs(&self) -> Result<Vec<kt_proto::v1::ShadowRun>, StoreError> {
            self.inner.list_shadow_runs().await
        }
    }

    /// A fleet task with one connected gateway `gw-1` in group `g`; offers to it arrive on the
    /// returned receiver.
    async fn one_gateway(
        cancel: &CancellationToken,
    ) -> (
        FleetHandle,
        mpsc::Receiver<Result<kt_proto::v1::CoordinatorMessage, tonic::Status>>,
    ) {
        let gateway = GatewayId::new("gw-1").expect("id");
        let groups = [Group::of_gateways("g", vec![gateway.clone()])];
        let (fleet, handle) = Fleet::new(LivenessConfig::default(), &groups);
        tokio::spawn(fleet.run(cancel.child_token()));
        let (outbound, offers) = mpsc::channel(16);
        let health = GatewayHealth {
            status: HealthStatus::Healthy as i32,
            reachable: true,
            config: Some(ConfigInfo {
                version: "1.0.0".into(),
                hash: "sha256:old".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let hello = HelloInfo {
            labels: BTreeMap::new(),
            agent_version: "test".into(),
            capabilities: Vec::new(),
            boot_id: "boot".into(),
            health: Some(health),
            peer_address: "127.0.0.1:1".into(),
            cert_not_after_unix_ms: 0,
            cert_not_before_unix_ms: 0,
        };
        handle
            .send(FleetCommand::Connected {
                gateway,
                session: 1,
                hello,
                outbound,
                replaced: CancellationToken::new(),
            })
            .await
            .expect("fleet");
        (handle, offers)
    }

    #[tokio::test]
    async fn a_transition_that_cannot_be_stored_offers_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The rollout's creation is stored; the write of its first step (the offer) fails.
        let store = Arc::new(FailingWrites {
            inner: SqliteStore::open(dir.path()).expect("store"),
            writes_left: AtomicUsize::new(1),
        });
        let cancel = CancellationToken::new();
        let (fleet, mut offers) = one_gateway(&cancel).await;
        let (engine, handle) = Engine::new(
            store.clone(),
            fleet,
            DecisionCounters::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .expect("engine");
        tokio::spawn(engine.run(cancel.child_token()));
        let push = Push {
            content: b"pack: {name: x, version: 1.1.0}\n".to_vec(),
            spec: Spec {
                target: Target::Group("g".into()),
                strategy: Strategy::Rolling,
                size: Size::Count(1),
                pause_between_ms: 0,
                min_healthy_time_ms: 0,
                apply_deadline_ms: 10_000,
                progress_deadline_ms: 600_000,
                max_block_rate_delta: None,
                max_error_rate: None,
                min_sample: 1,
                continue_on_inconclusive: false,
                rollback_on_error: true,
            },
            reason: String::new(),
            dry_run: false,
            supersede: false,
            rollback: false,
            source: None,
        };
        let (created, _) = handle.push(push, "op".into()).await.expect("created");
        // push steps the rollout before it answers: an offer would be queued by now.
        assert!(
            offers.try_recv().is_err(),
            "an offer went out for a transition that was never stored"
        );
        let stored = store.inner.list_rollouts().await.expect("list");
        assert_eq!(stored[0].gateways["gw-1"].state, TargetState::Pending);

        // Once the disk works again, the next step (from the stored record) makes the offer.
        store.writes_left.store(usize::MAX, Ordering::SeqCst);
        let offer = tokio::time::timeout(Duration::from_secs(30), offers.recv())
            .await
            .expect("offered once writes work")
            .expect("channel open")
            .expect("a message");
        assert!(
            matches!(offer.body, Some(Body::Offer(ref o)) if o.offer_id.starts_with(&created.id)),
            "{offer:?}"
        );
        cancel.cancel();
    }
}
