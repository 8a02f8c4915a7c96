//! The rollout engine: one task owns every rollout. It persists each transition before acting
//! on it (an offer is sent only once the record saying so is stored), so a coordinator killed
//! at any moment resumes exactly where it stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kt_proto::unix_ms_now;
use kt_proto::v1::{ConfigOffer, ConfigPhase, ConfigStatus, GatewayState};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::model::{ConfigId, Outcome, Phase, RolloutRecord, Spec, Target, TargetState};
use super::plan::{content_hash, diff, plan, version_label};
use super::step::{self, Effect, Observed};
use crate::events::counters::DecisionCounters;
use crate::fleet::FleetHandle;
use crate::metrics::{GateLabels, Metrics};
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
}

/// A push, as the operator asked for it.
#[derive(Debug)]
pub struct Push {
    pub content: Vec<u8>,
    pub spec: Spec,
    pub reason: String,
    pub dry_run: bool,
    pub supersede: bool,
    pub rollback: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
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

    /// Forwards an agent's answer; dropped only when the engine is gone.
    pub async fn answer(&self, gateway: String, status: ConfigStatus) {
        let _ = self.tx.send(Command::Answer { gateway, status }).await;
    }
}

pub struct Engine {
    store: Arc<dyn Store>,
    fleet: FleetHandle,
    decisions: DecisionCounters,
    metrics: Arc<Metrics>,
    rollouts: BTreeMap<String, RolloutRecord>,
    commands: mpsc::Receiver<Command>,
    changes: broadcast::Sender<RolloutRecord>,
}

impl Engine {
    /// Loads every stored rollout. Offers that were in flight are offered again: an agent answers
    /// an offer of what it already runs with APPLIED at once, so repeating one is harmless.
    pub fn new(
        store: Arc<dyn Store>,
        fleet: FleetHandle,
        decisions: DecisionCounters,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, EngineHandle), StoreError> {
        let mut rollouts = BTreeMap::new();
        for mut r in store.list_rollouts()? {
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
        let (tx, commands) = mpsc::channel(1024);
        let (changes, _) = broadcast::channel(1024);
        Ok((
            Engine {
                store,
                fleet,
                decisions,
                metrics,
                rollouts,
                commands,
                changes,
            },
            EngineHandle { tx },
        ))
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.tick().await,
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_queued(command).await,
                    None => return,
                },
            }
        }
    }

    /// The fleet now, with the decisions counted from events.
    async fn observe(&self) -> Observed {
        let fleet = match self.fleet.list(None).await {
            Ok(Ok(gateways)) => gateways
                .into_iter()
                .map(|g| (g.gateway_id.clone(), g))
                .collect(),
            _ => BTreeMap::new(),
        };
        Observed {
            fleet,
            decisions: self.decisions.snapshot(),
        }
    }

    async fn tick(&mut self) {
        if !self.rollouts.values().any(RolloutRecord::is_active) {
            return;
        }
        let observed = self.observe().await;
        let now = unix_ms_now();
        let ids: Vec<String> = self
            .rollouts
            .values()
            .filter(|r| r.is_active())
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            self.advance(&id, &observed, now).await;
        }
    }

    /// Steps one rollout; persists, then carries out the effects, then publishes.
    async fn advance(&mut self, id: &str, observed: &Observed, now: u64) {
        let Some(mut r) = self.rollouts.get(id).cloned() else {
            return;
        };
        let (effects, changed) = step::step(&mut r, observed, now);
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

    /// Stores `r` and makes it the current record; false (and the old record kept) when it
    /// cannot be stored, in which case the transition must not take effect.
    async fn commit(&mut self, r: RolloutRecord) -> bool {
        if let Err(error) = self.store.put_rollout(&r) {
            tracing::error!(rollout = %r.id, %error, "cannot persist rollout transition");
            return false;
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
                    decision: g.decision.clone(),
                })
                .inc();
        }
        if let Phase::Done(_) = r.phase {
            for gateway in r.gateways.keys() {
                self.fleet.set_desired(gateway.clone(), None).await;
            }
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
        let desired = kt_proto::v1::ConfigRef {
            version: config.version.clone(),
            hash: config.hash.clone(),
        };
        self.fleet
            .set_desired(gateway.clone(), Some(desired.clone()))
            .await;
        let offer = ConfigOffer {
            offer_id,
            config: Some(desired),
            content,
            rollback,
            apply_deadline_ms,
        };
        if !self.fleet.offer(gateway.clone(), offer).await {
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
    fn remember_rejection(&self, gateway: &str, phase: ConfigPhase, status: &ConfigStatus) {
        let Some(config) = status
            .config
            .as_ref()
            .filter(|_| phase == ConfigPhase::Rejected)
        else {
            return;
        };
        if let Err(error) =
            self.store
                .mark_rejected(&config.hash, gateway, &status.error, unix_ms_now())
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
            let phase = ConfigPhase::try_from(status.phase).unwrap_or(ConfigPhase::Unspecified);
            self.remember_rejection(&gateway, phase, &status);
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
                tracing::debug!(gateway_id = %gateway, offer_id = %status.offer_id, "answer to no active offer");
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
        let observed = self.observe().await;
        for id in ids {
            self.advance(&id, &observed, now).await;
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
        }
    }

    fn find(&self, id: &str) -> Result<&RolloutRecord, EngineError> {
        self.rollouts
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no rollout {id}")))
    }

    async fn push(
        &mut self,
        push: Push,
        identity: String,
    ) -> Result<(RolloutRecord, String), EngineError> {
        let version = version_label(&push.content).map_err(EngineError::Invalid)?;
        let config = ConfigId {
            version: version.clone(),
            hash: content_hash(&push.content),
        };
        let observed = self.observe().await;
        let gateways = self.resolve(&push.spec.target, &observed.fleet)?;
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

        let (progress, batches) = plan(&push.spec, &gateways, &observed.fleet, &config);
        let diff_text = self.diff_against_baseline(&progress, &push.content, &config);
        let number = if push.dry_run {
            0
        } else {
            self.store.next_rollout_number()?
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
        };
        if push.dry_run {
            return Ok((r, diff_text));
        }

        self.store.put_config(&StoredConfig {
            hash: config.hash.clone(),
            version,
            content: push.content,
            author: identity.clone(),
            created_at_unix_ms: now,
            message: push.reason.clone(),
        })?;
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
        self.store.audit(
            now,
            &identity,
            "push",
            &r.spec.target.to_string(),
            &push.reason,
        )?;
        self.store.put_rollout(&r)?;
        self.rollouts.insert(r.id.clone(), r.clone());
        let _ = self.changes.send(r.clone());
        let id = r.id.clone();
        self.advance(&id, &observed, now).await;
        let r = self.rollouts.get(&id).cloned().unwrap_or(r);
        Ok((r, diff_text))
    }

    fn resolve(
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
    fn diff_against_baseline(
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
        let old = match self.store.get_config(baseline) {
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
        self.store.audit(now, identity, &action_name, id, reason)?;
        if !self.commit(r).await {
            return Err(EngineError::Store(StoreError::from(
                "the rollout could not be stored; nothing changed".to_owned(),
            )));
        }
        let observed = self.observe().await;
        self.advance(id, &observed, now).await;
        self.find(id).cloned()
    }
}

fn short(hash: &str) -> &str {
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

    impl Store for FailingWrites {
        fn put_config(&self, config: &StoredConfig) -> Result<(), StoreError> {
            self.inner.put_config(config)
        }
        fn get_config(&self, hash: &str) -> Result<Option<StoredConfig>, StoreError> {
            self.inner.get_config(hash)
        }
        fn list_configs(&self) -> Result<Vec<StoredConfig>, StoreError> {
            self.inner.list_configs()
        }
        fn put_rollout(&self, rollout: &RolloutRecord) -> Result<(), StoreError> {
            let left = self.writes_left.load(Ordering::SeqCst);
            if left == 0 {
                return Err(StoreError::from("disk I/O error".to_owned()));
            }
            self.writes_left.store(left - 1, Ordering::SeqCst);
            self.inner.put_rollout(rollout)
        }
        fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
            self.inner.list_rollouts()
        }
        fn next_rollout_number(&self) -> Result<u64, StoreError> {
            self.inner.next_rollout_number()
        }
        fn audit(
            &self,
            at_unix_ms: u64,
            identity: &str,
            action: &str,
            target: &str,
            reason: &str,
        ) -> Result<(), StoreError> {
            self.inner
                .audit(at_unix_ms, identity, action, target, reason)
        }
        fn mark_rejected(
            &self,
            hash: &str,
            gateway: &str,
            reason: &str,
            at_unix_ms: u64,
        ) -> Result<(), StoreError> {
            self.inner.mark_rejected(hash, gateway, reason, at_unix_ms)
        }
        fn rejections(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, StoreError> {
            self.inner.rejections()
        }
        fn put_groups(&self, groups: &[Group]) -> Result<(), StoreError> {
            self.inner.put_groups(groups)
        }
        fn list_groups(&self) -> Result<Vec<Group>, StoreError> {
            self.inner.list_groups()
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
        let groups = [Group {
            name: "g".into(),
            gateways: vec![gateway.clone()],
            selector: BTreeMap::new(),
            config_source: None,
        }];
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
            boot_id: "boot".into(),
            health: Some(health),
            peer_address: "127.0.0.1:1".into(),
            cert_not_after_unix_ms: 0,
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
        };
        let (created, _) = handle.push(push, "op".into()).await.expect("created");
        // push steps the rollout before it answers: an offer would be queued by now.
        assert!(
            offers.try_recv().is_err(),
            "an offer went out for a transition that was never stored"
        );
        let stored = store.inner.list_rollouts().expect("list");
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
