//! The engine's side of intent: it keeps each gateway's desired config in front of the fleet
//! task, adopts what a gateway runs when nothing else says what it should, re-offers desired
//! configs to drifted gateways that must not drift (`drift: enforce`, pins), pins, and turns
//! config sources into rollouts. Intent moves only once stored.

use std::collections::{BTreeMap, BTreeSet};

use kt_proto::v1::{
    AgentState, ConfigOffer, ConfigPhase, ConfigRef, ConfigStatus, GatewayState, SyncState,
};

use crate::config::{DriftPolicy, Group, GroupStrategy};
use crate::fleet::Hold;
use crate::intent::{Desired, GroupIntent};
use crate::rollout::engine::{Engine, EngineError, Push, short};
use crate::rollout::model::{
    ConfigId, Outcome, Phase, RolloutRecord, Size, Spec, Strategy, Target,
};
use crate::rollout::step::{reports_running, running_config};
use crate::store::StoredConfig;

pub use crate::sources::SourceReading;

/// The identity that acts for a config source, in audits and rollout histories.
const SOURCE_IDENTITY: &str = "coordinator (config source)";

/// Offer ids of re-offers start with this (rollouts' start with their id, `r-<n>`).
const REOFFER_PREFIX: &str = "reconcile/";

/// How long a re-offer may stay unanswered before the gateway is free again.
const REOFFER_DEADLINE_MS: u64 = 120_000;
const REOFFER_BACKOFF_FIRST_MS: u64 = 2_000;
const REOFFER_BACKOFF_MAX_MS: u64 = 300_000;

/// What `ktctl groups list` shows of a group's intent and source.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub source_hash: String,
    pub source_error: String,
    pub desired: Option<ConfigId>,
    pub held: Option<(String, String)>,
    pub waiting: String,
}

/// Re-offers in flight and their backoff, per gateway.
#[derive(Debug, Default)]
pub struct Reoffers {
    by_gateway: BTreeMap<String, Reoffer>,
}

#[derive(Debug, Default)]
struct Reoffer {
    attempts: u32,
    next_at: u64,
    /// The offer id and when it went out, while unanswered.
    in_flight: Option<(String, u64)>,
}

fn backoff_ms(attempts: u32) -> u64 {
    REOFFER_BACKOFF_FIRST_MS
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(REOFFER_BACKOFF_MAX_MS)
}

/// A group's declared rollout defaults as a rollout spec.
pub fn spec_of(group: &Group) -> Spec {
    let r = &group.rollout;
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Spec {
        target: Target::Group(group.name.clone()),
        strategy: match r.strategy {
            GroupStrategy::Rolling => Strategy::Rolling,
            GroupStrategy::Canary => Strategy::Canary {
                auto_promote: false,
            },
            GroupStrategy::AllAtOnce => Strategy::AllAtOnce,
        },
        size: match r.batch_size {
            crate::config::BatchSize::Count(n) => Size::Count(n),
            crate::config::BatchSize::Percent(p) => Size::Percent(p),
        },
        pause_between_ms: ms(r.pause_between),
        min_healthy_time_ms: ms(r.min_healthy_time),
        apply_deadline_ms: ms(r.apply_deadline),
        progress_deadline_ms: ms(r.progress_deadline),
        max_block_rate_delta: r.max_block_rate_delta,
        max_error_rate: r.max_error_rate,
        min_sample: r.min_sample.max(1),
        continue_on_inconclusive: r.continue_on_inconclusive,
        rollback_on_error: r.rollback_on_error,
    }
}

impl Engine {
    /// Gateways whose record changed: one never told what to run adopts what it runs (stored
    /// first), and the fleet task learns every desired config that differs from what it shows.
    pub(crate) async fn check_desired(&mut self, now: u64) {
        if self.unchecked.is_empty() {
            return;
        }
        let unchecked = std::mem::take(&mut self.unchecked);
        let adopt: Vec<_> = unchecked
            .iter()
            .filter_map(|g| self.observed.fleet.get(g))
            .filter(|s| {
                self.intent
                    .desired_of(&s.gateway_id, s.groups.iter().map(String::as_str))
                    .is_none()
            })
            .filter_map(|s| {
                let config = running_config(s)?;
                let cause = "adopted: what it ran when first seen".to_owned();
                Some((
                    s.gateway_id.clone(),
                    Some(Desired {
                        config,
                        cause,
                        at: now,
                    }),
                ))
            })
            .collect();
        if !adopt.is_empty() {
            match self.store.put_desired(&adopt).await {
                Ok(()) => self.intent.apply(&adopt),
                Err(error) => tracing::error!(%error, "cannot store adopted desired configs"),
            }
        }
        self.publish_desired(unchecked.into_iter(), true).await;
    }

    /// Tells the fleet task the desired config of `gateways`. After intent moved, every one is
    /// sent (what the fleet last echoed may be behind what was sent before); when only checking,
    /// `unless_shown` skips those whose record already shows their desired config.
    pub(crate) async fn publish_desired(
        &self,
        gateways: impl Iterator<Item = String>,
        unless_shown: bool,
    ) {
        let changes: Vec<_> = gateways
            .filter_map(|g| {
                let state = self.observed.fleet.get(&g)?;
                let (desired, pinned) = match self
                    .intent
                    .desired_of(&g, state.groups.iter().map(String::as_str))
                {
                    Some((c, pinned)) => (
                        Some(ConfigRef {
                            version: c.version.clone(),
                            hash: c.hash.clone(),
                        }),
                        pinned,
                    ),
                    None => (None, false),
                };
                let shown = state.desired == desired && state.pinned == pinned;
                (!(unless_shown && shown)).then_some((g, desired, pinned))
            })
            .collect();
        self.fleet.set_desired(changes).await;
    }

    fn in_active_rollout(&self, gateway: &str) -> Option<&RolloutRecord> {
        self.rollouts
            .values()
            .find(|r| r.is_active() && r.gateways.contains_key(gateway))
    }

    /// Offers each drifted gateway that must not drift its desired config again, with
    /// backoff, unless a rollout holds it. Each re-offer is audited.
    pub(crate) async fn enforce_desired(&mut self, now: u64) {
        let drifted = |s: &GatewayState| s.sync == SyncState::Drifted as i32;
        let in_flight = self
            .reoffers
            .by_gateway
            .values()
            .any(|r| r.in_flight.is_some());
        if !in_flight && !self.observed.fleet.values().any(drifted) {
            return;
        }
        let enforced: BTreeSet<String> = self
            .fleet
            .groups()
            .into_iter()
            .filter(|g| g.drift == DriftPolicy::Enforce)
            .map(|g| g.name)
            .collect();
        // Re-offers nobody answered free their gateway.
        let mut released = Vec::new();
        for (gateway, r) in &mut self.reoffers.by_gateway {
            if r.in_flight
                .as_ref()
                .is_some_and(|(_, at)| now > at + REOFFER_DEADLINE_MS)
            {
                r.in_flight = None;
                released.push((gateway.clone(), None));
            }
        }
        self.fleet.set_held(released).await;
        let due: Vec<(String, ConfigRef, ConfigId)> = self
            .observed
            .fleet
            .values()
            .filter(|s| drifted(s))
            .filter(|s| s.agent_state == AgentState::Connected as i32)
            .filter(|s| s.pinned || s.groups.iter().any(|g| enforced.contains(g)))
            .filter(|s| {
                self.reoffers
                    .by_gateway
                    .get(&s.gateway_id)
                    .is_none_or(|r| r.in_flight.is_none() && now >= r.next_at)
            })
            .filter_map(|s| Some((s.gateway_id.clone(), s.desired.clone()?, running_config(s)?)))
            .collect();
        for (gateway, desired, running) in due {
            if self.in_active_rollout(&gateway).is_some() {
                continue; // the rollout owns it
            }
            self.reoffer(gateway, desired, running, now).await;
        }
    }

    async fn reoffer(&mut self, gateway: String, desired: ConfigRef, running: ConfigId, now: u64) {
        // The backoff counts from here, whatever happens next, so nothing repeats every tick.
        let entry = self.reoffers.by_gateway.entry(gateway.clone()).or_default();
        entry.attempts += 1;
        entry.next_at = now + backoff_ms(entry.attempts);
        let attempt = entry.attempts;
        let content = match self.store.get_config(&desired.hash).await {
            Ok(Some(stored)) => stored.content,
            Ok(None) => {
                tracing::error!(gateway_id = %gateway, hash = %desired.hash, "no stored copy of the desired config to offer");
                return;
            }
            Err(error) => {
                tracing::error!(%error, "cannot read the desired config");
                return;
            }
        };
        let offer_id = format!("{REOFFER_PREFIX}{gateway}/{attempt}");
        let why = format!(
            "drifted: runs {} {}, desired {} {}; offered again (attempt {})",
            running.version,
            short(&running.hash),
            desired.version,
            short(&desired.hash),
            attempt
        );
        if let Err(error) = self
            .store
            .audit(now, "coordinator", "reconcile", &gateway, &why)
            .await
        {
            tracing::error!(%error, "cannot audit a re-offer; not offering");
            return;
        }
        tracing::info!(gateway_id = %gateway, "{why}");
        let offer = ConfigOffer {
            offer_id: offer_id.clone(),
            config: Some(desired),
            content,
            // Back to what it should run, whichever version label that has.
            rollback: true,
            apply_deadline_ms: 60_000,
            epoch: self.epoch.number,
            epoch_cluster: self.epoch.cluster.clone(),
            shadow: false,
        };
        if self.offers.send(gateway.clone(), offer).await {
            entry.in_flight = Some((offer_id, now));
            let hold = Hold {
                by: "reconcile".into(),
                in_flight: true,
            };
            self.fleet.set_held(vec![(gateway, Some(hold))]).await;
        }
    }

    /// An answer to a re-offer; false when `status` answers none.
    pub(crate) async fn reoffer_answered(
        &mut self,
        gateway: &str,
        status: &ConfigStatus,
        phase: ConfigPhase,
    ) -> bool {
        if !status.offer_id.starts_with(REOFFER_PREFIX) {
            return false;
        }
        let Some(entry) = self.reoffers.by_gateway.get_mut(gateway) else {
            return true;
        };
        if entry
            .in_flight
            .as_ref()
            .is_none_or(|(id, _)| *id != status.offer_id)
        {
            return true;
        }
        entry.in_flight = None;
        if phase == ConfigPhase::Applied {
            self.reoffers.by_gateway.remove(gateway);
            tracing::info!(gateway_id = %gateway, "re-offered desired config applied");
        } else {
            tracing::warn!(gateway_id = %gateway, phase = phase.as_str_name(), error = %status.error, "re-offered desired config not applied; will offer again after a backoff");
        }
        self.fleet.set_held(vec![(gateway.to_owned(), None)]).await;
        true
    }

    /// Pins `gateway` to a stored version (or unpins it); a pinned gateway is offered its pin
    /// like a drifted one under `enforce`.
    pub(crate) async fn pin(
        &mut self,
        gateway: &str,
        config: Option<String>,
        identity: &str,
        reason: &str,
    ) -> Result<(), EngineError> {
        kt_proto::identity::GatewayId::new(gateway)
            .map_err(|e| EngineError::Invalid(format!("gateway id {gateway:?}: {e}")))?;
        let now = kt_daemon::unix_ms_now();
        let Some(wanted) = config else {
            if !self.intent.pins.contains_key(gateway) {
                return Err(EngineError::NotFound(format!("{gateway} is not pinned")));
            }
            self.store.put_pin(gateway, None).await?;
            self.store
                .audit(now, identity, "unpin", gateway, reason)
                .await?;
            self.intent.pins.remove(gateway);
            self.publish_desired(std::iter::once(gateway.to_owned()), false)
                .await;
            return Ok(());
        };
        let versions = self.store.list_configs().await?;
        let stored = find_version(&versions, &wanted)?;
        let pin = Desired {
            config: ConfigId {
                version: stored.version.clone(),
                hash: stored.hash.clone(),
            },
            cause: format!("pinned by {identity}"),
            at: now,
        };
        self.store.put_pin(gateway, Some(&pin)).await?;
        let what = format!("{} {}: {reason}", stored.version, short(&stored.hash));
        self.store
            .audit(now, identity, "pin", gateway, &what)
            .await?;
        self.intent.pins.insert(gateway.to_owned(), pin);
        self.reoffers.by_gateway.remove(gateway);
        self.publish_desired(std::iter::once(gateway.to_owned()), false)
            .await;
        Ok(())
    }

    /// A group's rollout ended: a success is what the group should run; a rollback, an abort or
    /// a failure holds that version back from the group's config source until it changes.
    pub(crate) async fn settle_group(&mut self, r: &RolloutRecord) {
        let Target::Group(group) = &r.spec.target else {
            return;
        };
        let mut intent = self.intent.groups.get(group).cloned().unwrap_or_default();
        let Phase::Done(outcome) = r.phase else {
            return;
        };
        match outcome {
            Outcome::Succeeded => {
                if r.rollback
                    && let Some(previous) =
                        intent.desired.as_ref().filter(|p| p.hash != r.config.hash)
                {
                    intent.held = Some((previous.hash.clone(), format!("undone by {}", r.id)));
                } else if !r.rollback {
                    intent.held = None;
                }
                intent.desired = Some(r.config.clone());
            }
            Outcome::RolledBack | Outcome::Aborted | Outcome::Failed | Outcome::TimedOut => {
                let why = format!(
                    "{} {}: {}",
                    r.id,
                    outcome.as_str().replace('_', " "),
                    r.message
                );
                intent.held = Some((r.config.hash.clone(), why));
            }
            Outcome::Superseded => return,
        }
        self.put_group_intent(group, intent).await;
    }

    async fn put_group_intent(&mut self, group: &str, intent: GroupIntent) {
        if let Err(error) = self.store.put_group_intent(group, &intent).await {
            tracing::error!(%group, %error, "cannot store the group's intent");
            return;
        }
        self.intent.groups.insert(group.to_owned(), intent);
        let members: Vec<String> = self
            .observed
            .fleet
            .values()
            .filter(|s| s.groups.iter().any(|g| g == group))
            .map(|s| s.gateway_id.clone())
            .collect();
        self.publish_desired(members.into_iter(), false).await;
    }

    /// Starts a rollout for every group whose config source says something new, once nothing
    /// stands in the way (an active rollout on the group, the `after` group not there yet).
    pub(crate) async fn consider_sources(&mut self, now: u64) {
        let pending: Vec<String> = self
            .sources
            .iter()
            .filter(|(group, reading)| {
                reading.error.is_empty()
                    && self
                        .intent
                        .groups
                        .get(*group)
                        .is_none_or(|i| i.source_hash != reading.hash)
            })
            .map(|(group, _)| group.clone())
            .collect();
        if pending.is_empty() {
            return;
        }
        let groups: BTreeMap<String, Group> = self
            .fleet
            .groups()
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        for name in pending {
            let Some(group) = groups.get(&name) else {
                continue; // removed meanwhile
            };
            let waiting = self.source_blocked(group);
            if let Some(reading) = self.sources.get_mut(&name) {
                reading.waiting = waiting.clone().unwrap_or_default();
            }
            if waiting.is_none() {
                self.start_from_source(group, now).await;
            }
        }
    }

    fn members<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a GatewayState> + 'a {
        self.observed
            .fleet
            .values()
            .filter(move |s| s.groups.iter().any(|g| g == group))
    }

    /// What keeps `group`'s source from starting a rollout now, if anything.
    fn source_blocked(&self, group: &Group) -> Option<String> {
        let members = |name| self.members(name);
        let active = members(&group.name).find_map(|s| self.in_active_rollout(&s.gateway_id));
        if let Some(r) = active {
            return Some(format!("rollout {} is active on the group", r.id));
        }
        let after = group.after.as_deref()?;
        let hash = &self.sources.get(&group.name)?.hash;
        let total = members(after).count();
        let there = members(after)
            .filter(|s| reports_running(&self.observed.fleet, &s.gateway_id, hash))
            .count();
        if total == 0
            || there < total
            || members(after).any(|s| self.in_active_rollout(&s.gateway_id).is_some())
        {
            return Some(format!(
                "waiting for group {after} to run {} healthy ({there} of {total} gateways)",
                short(hash)
            ));
        }
        None
    }

    async fn start_from_source(&mut self, group: &Group, now: u64) {
        let Some(reading) = self.sources.get(&group.name).cloned() else {
            return;
        };
        let push = Push {
            content: reading.content.to_vec(),
            spec: spec_of(group),
            reason: format!("config source {} changed", reading.path),
            dry_run: false,
            supersede: false,
            rollback: false,
            source: Some(reading.path.clone()),
        };
        let no_member = match self.push(push, SOURCE_IDENTITY.to_owned()).await {
            Ok((r, _)) => {
                tracing::info!(group = %group.name, rollout = %r.id, version = %reading.version, "config source changed: rollout started");
                false
            }
            Err(EngineError::Invalid(why)) if why.starts_with("no gateways match") => true,
            Err(error) => {
                self.source_failed(&group.name, &error);
                return;
            }
        };
        // Read after the push: a rollout that ended at once (every member already ran it) has
        // settled the group's desired config already.
        let mut intent = self
            .intent
            .groups
            .get(&group.name)
            .cloned()
            .unwrap_or_default();
        if no_member {
            // What the group should run is set directly, for the members to come.
            let stored = StoredConfig {
                hash: reading.hash.clone(),
                version: reading.version.clone(),
                content: reading.content.to_vec(),
                author: SOURCE_IDENTITY.into(),
                created_at_unix_ms: now,
                message: format!("config source {}", reading.path),
            };
            if let Err(error) = self.store.put_config(&stored).await {
                self.source_failed(&group.name, &error);
                return;
            }
            intent.desired = Some(ConfigId {
                version: reading.version.clone(),
                hash: reading.hash.clone(),
            });
        }
        intent.source_hash = reading.hash.clone();
        intent.held = None;
        self.put_group_intent(&group.name, intent).await;
        if let Some(reading) = self.sources.get_mut(&group.name) {
            reading.waiting.clear();
        }
    }

    fn source_failed(&mut self, group: &str, error: &dyn std::fmt::Display) {
        tracing::warn!(%group, %error, "config source: no rollout started");
        if let Some(reading) = self.sources.get_mut(group) {
            reading.waiting = format!("cannot start a rollout: {error}");
        }
    }

    pub(crate) fn group_statuses(&self) -> BTreeMap<String, GroupStatus> {
        self.fleet
            .groups()
            .into_iter()
            .map(|g| {
                let intent = self.intent.groups.get(&g.name);
                let reading = self.sources.get(&g.name);
                let status = GroupStatus {
                    source_hash: reading.map(|r| r.hash.clone()).unwrap_or_default(),
                    source_error: reading.map(|r| r.error.clone()).unwrap_or_default(),
                    desired: intent.and_then(|i| i.desired.clone()),
                    held: intent.and_then(|i| i.held.clone()),
                    waiting: reading.map(|r| r.waiting.clone()).unwrap_or_default(),
                };
                (g.name, status)
            })
            .collect()
    }
}

/// A stored version named by its hash, a unique prefix of it, or its version label (the
/// newest with that label).
fn find_version<'a>(
    stored: &'a [StoredConfig],
    wanted: &str,
) -> Result<&'a StoredConfig, EngineError> {
    if let Some(exact) = stored.iter().find(|c| c.hash == wanted) {
        return Ok(exact);
    }
    let prefix = if wanted.starts_with("sha256:") {
        wanted.to_owned()
    } else {
        format!("sha256:{wanted}")
    };
    let by_prefix: Vec<&StoredConfig> = stored
        .iter()
        .filter(|c| c.hash.starts_with(&prefix))
        .collect();
    match by_prefix.as_slice() {
        [one] => return Ok(one),
        [] => {}
        _ => {
            return Err(EngineError::Invalid(format!(
                "{wanted} matches {} stored versions; give more of the hash",
                by_prefix.len()
            )));
        }
    }
    // Newest first, as listed.
    stored.iter().find(|c| c.version == wanted).ok_or_else(|| {
        EngineError::NotFound(format!(
            "no stored config version {wanted:?} (see `ktctl config versions`)"
        ))
    })
}
