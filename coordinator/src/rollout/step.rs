//! The rollout state machine: one pure step from a record, the fleet as it is now, and the time,
//! to a new record and the effects to carry out. Pure, so every rule is unit-tested.

use std::collections::{BTreeMap, HashMap};

use kt_proto::v1::{AgentState, GatewayState, HealthStatus};

use crate::events::counters::GatewayTallies;

use super::model::{
    ConfigId, Counts, Decision, GateRecord, Outcome, Phase, RolloutRecord, Strategy, TargetState,
};

/// What the engine must do after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Offer `config` to `gateway`.
    Offer {
        gateway: String,
        offer_id: String,
        config: ConfigId,
        rollback: bool,
        apply_deadline_ms: u64,
    },
}

/// Grace added to the apply deadline before an unanswered offer counts as failed.
const ANSWER_GRACE_MS: u64 = 5_000;

pub fn connected(fleet: &BTreeMap<String, GatewayState>, gateway: &str) -> bool {
    fleet
        .get(gateway)
        .is_some_and(|g| g.agent_state == AgentState::Connected as i32)
}

/// The gateways of `batch` that applied the rollout's config.
fn applied<'a>(r: &'a RolloutRecord, batch: &'a [String]) -> impl Iterator<Item = &'a String> {
    batch.iter().filter(|g| {
        r.gateways
            .get(*g)
            .is_some_and(|p| p.state == TargetState::Applied)
    })
}

/// The config a gateway last reported running, if it reported one.
pub fn running_config(state: &GatewayState) -> Option<ConfigId> {
    state
        .health
        .as_ref()
        .and_then(|h| h.config.as_ref())
        .filter(|c| !c.hash.is_empty())
        .map(|c| ConfigId {
            version: c.version.clone(),
            hash: c.hash.clone(),
        })
}

/// Whether `gateway` last reported `hash` running, healthy or degraded: what completes an apply
/// or a rollback (an answer says the agent applied it; this says the coordinator saw it run).
pub fn reports_running(fleet: &BTreeMap<String, GatewayState>, gateway: &str, hash: &str) -> bool {
    fleet
        .get(gateway)
        .and_then(|g| g.health.as_ref())
        .is_some_and(|h| {
            h.reachable
                && (h.status == HealthStatus::Healthy as i32
                    || h.status == HealthStatus::Degraded as i32)
                && h.config.as_ref().is_some_and(|c| c.hash == hash)
        })
}

/// Says once in the history what the rollout waits for, until it stops waiting.
fn waiting_for_reports(r: &mut RolloutRecord, now: u64, what: String) {
    if !r.confirming {
        r.confirming = true;
        r.record(now, "coordinator", what);
    }
}

/// Whether `gateway`'s current session opened after `offered_at`: an offer sent on an earlier
/// session may have been lost with it (the agent restarted before answering).
fn session_since(
    fleet: &BTreeMap<String, GatewayState>,
    gateway: &str,
    offered_at: Option<u64>,
) -> bool {
    let since = fleet.get(gateway).map_or(0, |g| g.connected_since_unix_ms);
    offered_at.is_some_and(|at| since > at)
}

/// What a step sees of the fleet: each gateway's state, and the decisions counted from each
/// gateway's events per config hash (see `events::counters`).
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub fleet: BTreeMap<String, GatewayState>,
    pub decisions: HashMap<String, GatewayTallies>,
}

/// The decisions the gates compare for `gateway`, counted from its events: those made on the
/// rollout's config once it applied it, those made on any other config while it waits.
fn counts(r: &RolloutRecord, observed: &Observed, gateway: &str) -> Counts {
    let on_new = r
        .gateways
        .get(gateway)
        .is_some_and(|p| p.state == TargetState::Applied);
    observed
        .decisions
        .get(gateway)
        .into_iter()
        .flatten()
        .filter(|(hash, _)| (**hash == r.config.hash) == on_new)
        .fold(Counts::default(), |sum, (_, t)| Counts {
            total: sum.total + t.decided(),
            block: sum.block + t.block,
            requests: sum.requests + t.requests,
            errors: sum.errors + t.errors,
        })
}

/// Advances `r` as far as the fleet allows now; returns the effects and whether `r` changed.
pub fn step(r: &mut RolloutRecord, observed: &Observed, now: u64) -> (Vec<Effect>, bool) {
    let before = r.clone();
    let mut effects = Vec::new();
    // A few passes, so that one tick can go e.g. from "all applied" through a zero-length bake.
    for _ in 0..8 {
        let phase_before = r.phase.clone();
        advance(r, observed, now, &mut effects);
        if r.phase == phase_before {
            break;
        }
    }
    let changed = *r != before;
    (effects, changed)
}

fn advance(r: &mut RolloutRecord, observed: &Observed, now: u64, effects: &mut Vec<Effect>) {
    let fleet = &observed.fleet;
    let running = matches!(
        r.phase,
        Phase::Applying | Phase::Baking { .. } | Phase::Pausing { .. } | Phase::RollingBack { .. }
    );
    if running && now > r.progress_deadline {
        let reason = format!(
            "progress deadline passed ({} ms without finishing)",
            r.spec.progress_deadline_ms
        );
        if matches!(r.phase, Phase::RollingBack { .. }) {
            r.message = format!("rollback incomplete: {reason}");
            r.phase = Phase::Done(Outcome::TimedOut);
            r.record(now, "coordinator", r.message.clone());
        } else {
            fail(r, now, reason, Outcome::TimedOut);
        }
        return;
    }
    match r.phase.clone() {
        Phase::Applying => applying(r, observed, now, effects),
        Phase::Baking { until } => baking(r, observed, now, until),
        Phase::Pausing { until } => {
            if now >= until {
                r.current_batch += 1;
                r.phase = Phase::Applying;
                r.record(
                    now,
                    "coordinator",
                    format!("batch {} starting", r.current_batch + 1),
                );
            }
        }
        Phase::RollingBack { then } => rolling_back(r, fleet, now, then, effects),
        Phase::AwaitingPromotion | Phase::Paused { .. } | Phase::Done(_) => {}
    }
}

/// Offer ids name the rollout, the gateway and the attempt: an answer to an older attempt is
/// recognised as stale.
fn offer_id(rollout: &str, gateway: &str, n: u32) -> String {
    format!("{rollout}/{gateway}/{n}")
}

fn applying(r: &mut RolloutRecord, observed: &Observed, now: u64, effects: &mut Vec<Effect>) {
    let fleet = &observed.fleet;
    let Some(batch) = r.batches.get(r.current_batch).cloned() else {
        finish(r, now, Outcome::Succeeded, "every batch applied");
        return;
    };
    let mut problem = None;
    for gateway in &batch {
        let config = r.config.clone();
        let rollback = r.rollback;
        let deadline = r.spec.apply_deadline_ms;
        let id = r.id.clone();
        let Some(progress) = r.gateways.get_mut(gateway) else {
            continue;
        };
        match progress.state {
            TargetState::Pending if connected(fleet, gateway) => {
                progress.offers_sent += 1;
                let offer_id = offer_id(&id, gateway, progress.offers_sent);
                progress.offer_id = Some(offer_id.clone());
                progress.offered_at = Some(now);
                progress.state = TargetState::Offered;
                effects.push(Effect::Offer {
                    gateway: gateway.clone(),
                    offer_id,
                    config,
                    rollback,
                    apply_deadline_ms: deadline,
                });
            }
            // Disconnected gateways are pending, not failed: offer again when they return. A
            // gateway whose agent connected anew since the offer (a restart) may never have
            // received it: offer again too (an agent answers an offer of what it runs at once).
            TargetState::Offered
                if !connected(fleet, gateway)
                    || session_since(fleet, gateway, progress.offered_at) =>
            {
                progress.state = TargetState::Pending
            }
            TargetState::Offered
                if progress
                    .offered_at
                    .is_some_and(|at| now > at + deadline + ANSWER_GRACE_MS) =>
            {
                problem = Some(format!(
                    "{gateway} did not answer within the apply deadline ({deadline} ms)"
                ));
            }
            TargetState::Rejected | TargetState::Failed => {
                problem = Some(format!("{gateway}: {}", progress.error));
            }
            _ => {}
        }
    }
    if let Some(reason) = problem {
        fail(r, now, reason, Outcome::RolledBack);
        return;
    }
    let done = batch.iter().all(|g| {
        r.gateways.get(g).is_some_and(|p| {
            matches!(
                p.state,
                TargetState::Applied | TargetState::Unchanged | TargetState::Rejected
            )
        })
    });
    if !done {
        return;
    }
    let unconfirmed = applied(r, &batch)
        .filter(|g| !reports_running(fleet, g, &r.config.hash))
        .count();
    if unconfirmed > 0 {
        let what = format!(
            "batch {}: every offer answered APPLIED; waiting for {unconfirmed} gateway(s) to report {} running and healthy",
            r.current_batch + 1,
            r.config.version
        );
        waiting_for_reports(r, now, what);
        return;
    }
    r.confirming = false;
    {
        gate(
            r,
            "applied",
            Decision::Passed,
            batch.len() as f64,
            batch.len() as f64,
            "every gateway of the batch answered APPLIED and reports it running and healthy",
            now,
        );
        r.bake_counts = r
            .gateways
            .keys()
            .map(|g| (g.clone(), counts(r, observed, g)))
            .collect();
        let until = now + r.spec.min_healthy_time_ms;
        r.phase = Phase::Baking { until };
        r.record(
            now,
            "coordinator",
            format!(
                "batch {} applied, baking for {} ms",
                r.current_batch + 1,
                r.spec.min_healthy_time_ms
            ),
        );
    }
}

fn baking(r: &mut RolloutRecord, observed: &Observed, now: u64, until: u64) {
    let fleet = &observed.fleet;
    let batch = r.batches.get(r.current_batch).cloned().unwrap_or_default();
    let unhealthy: Vec<&String> = applied(r, &batch)
        .filter(|g| {
            connected(fleet, g)
                && fleet
                    .get(*g)
                    .and_then(|s| s.health.as_ref())
                    .is_some_and(|h| h.status == HealthStatus::Unhealthy as i32)
        })
        .collect();
    if !unhealthy.is_empty() {
        let list: Vec<&str> = unhealthy.iter().map(|s| s.as_str()).collect();
        let detail = format!("unhealthy on the new version: {}", list.join(", "));
        gate(
            r,
            "health",
            Decision::Failed,
            list.len() as f64,
            0.0,
            &detail,
            now,
        );
        fail(
            r,
            now,
            format!("health gate: {detail}"),
            Outcome::RolledBack,
        );
        return;
    }
    if now < until {
        return;
    }
    // The last batch completes the rollout: every gateway it changed must still report the
    // config running before the gates decide (one edited by hand meanwhile holds it up).
    let last = r.current_batch + 1 >= r.batches.len();
    if last {
        let all: Vec<String> = r.batches.iter().flatten().cloned().collect();
        let unconfirmed: Vec<&String> = applied(r, &all)
            .filter(|g| !reports_running(fleet, g, &r.config.hash))
            .collect();
        if !unconfirmed.is_empty() {
            let what = format!(
                "waiting for {} to report {} running and healthy",
                unconfirmed
                    .iter()
                    .map(|g| g.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                r.config.version
            );
            waiting_for_reports(r, now, what);
            return;
        }
        r.confirming = false;
    }
    let decision = match health_evidence(r, fleet, &batch, until, now) {
        None => return, // a connected gateway's next report is due: bake until it arrives
        Some(GateDecision::Passed) => match error_gate(r, observed, &batch, now) {
            GateDecision::Passed => verdict_gate(r, observed, &batch, now),
            other => other,
        },
        Some(other) => other,
    };
    match decision {
        GateDecision::Failed(reason) => {
            fail(r, now, reason, Outcome::RolledBack);
            return;
        }
        GateDecision::Inconclusive(reason) if !r.spec.continue_on_inconclusive => {
            r.message = format!("paused: {reason}");
            r.record(now, "coordinator", r.message.clone());
            r.phase = Phase::Paused {
                resume: Box::new(next_after_batch(r, now)),
            };
            return;
        }
        _ => {}
    }
    r.passed_batches = r.current_batch + 1;
    r.phase = next_after_batch(r, now);
    match &r.phase {
        Phase::Done(_) => {
            let message = "every batch applied and passed its gates".to_owned();
            r.message = message.clone();
            r.record(now, "coordinator", message);
        }
        Phase::AwaitingPromotion => r.record(
            now,
            "coordinator",
            "canary passed its gates, waiting for promotion",
        ),
        _ => r.record(
            now,
            "coordinator",
            format!("batch {} passed its gates", r.current_batch + 1),
        ),
    }
}

/// The health gate at the end of a bake: it passes only when every applied gateway of the batch
/// was observed during the bake (a heartbeat or status at or after the bake started, from a
/// connected agent). `None` while a report may still come: a connected gateway's next one, or an
/// unreachable agent's return (until liveness calls it disconnected); inconclusive for a gateway
/// whose agent is gone, since nothing says it stayed healthy.
fn health_evidence(
    r: &mut RolloutRecord,
    fleet: &BTreeMap<String, GatewayState>,
    batch: &[String],
    until: u64,
    now: u64,
) -> Option<GateDecision> {
    let start = until.saturating_sub(r.spec.min_healthy_time_ms);
    let applied: Vec<&String> = applied(r, batch).collect();
    let mut unobserved = Vec::new();
    for g in &applied {
        let state = fleet.get(*g);
        if state.is_some_and(|s| s.last_heartbeat_unix_ms >= start) && connected(fleet, g) {
            continue;
        }
        let may_report = state.is_some_and(|s| {
            s.agent_state == AgentState::Connected as i32
                || s.agent_state == AgentState::Unreachable as i32
        });
        if may_report {
            return None;
        }
        let agent = state
            .and_then(|s| AgentState::try_from(s.agent_state).ok())
            .map_or("never seen", AgentState::label);
        unobserved.push(format!("{g} (agent {agent})"));
    }
    if unobserved.is_empty() {
        let detail = format!(
            "every batch gateway reported healthy during the bake ({} observed)",
            applied.len()
        );
        gate(r, "health", Decision::Passed, 0.0, 0.0, &detail, now);
        return Some(GateDecision::Passed);
    }
    let detail = format!(
        "no observation during the bake of {}",
        unobserved.join(", ")
    );
    gate(
        r,
        "health",
        Decision::Inconclusive,
        unobserved.len() as f64,
        0.0,
        &detail,
        now,
    );
    Some(GateDecision::Inconclusive(format!(
        "health gate inconclusive: {detail}"
    )))
}

/// Where a rollout goes once the current batch passed.
fn next_after_batch(r: &RolloutRecord, now: u64) -> Phase {
    let last = r.current_batch + 1 >= r.batches.len();
    if last {
        Phase::Done(Outcome::Succeeded)
    } else if r.current_batch == 0
        && matches!(
            r.spec.strategy,
            Strategy::Canary {
                auto_promote: false
            }
        )
    {
        Phase::AwaitingPromotion
    } else {
        Phase::Pausing {
            until: now + r.spec.pause_between_ms,
        }
    }
}

enum GateDecision {
    Passed,
    Failed(String),
    Inconclusive(String),
}

/// Requests and counters of `gateways` over the bake window.
fn window<'a>(
    r: &RolloutRecord,
    observed: &Observed,
    gateways: impl Iterator<Item = &'a String>,
) -> Counts {
    gateways.fold(Counts::default(), |sum, g| {
        let start = r.bake_counts.get(g).copied().unwrap_or_default();
        let end = counts(r, observed, g);
        Counts {
            total: sum.total + end.total.saturating_sub(start.total),
            block: sum.block + end.block.saturating_sub(start.block),
            requests: sum.requests + end.requests.saturating_sub(start.requests),
            errors: sum.errors + end.errors.saturating_sub(start.errors),
        }
    })
}

/// The share of the batch's requests answered with a server error during the bake.
fn error_gate(
    r: &mut RolloutRecord,
    observed: &Observed,
    batch: &[String],
    now: u64,
) -> GateDecision {
    let Some(threshold) = r.spec.max_error_rate else {
        return GateDecision::Passed;
    };
    let c = window(r, observed, applied(r, batch));
    let rate = if c.requests == 0 {
        0.0
    } else {
        c.errors as f64 / c.requests as f64
    };
    let detail = format!(
        "{} of {} requests failed ({:.1}%)",
        c.errors,
        c.requests,
        rate * 100.0
    );
    if c.requests < r.spec.min_sample {
        gate(
            r,
            "error_rate",
            Decision::Inconclusive,
            rate,
            threshold,
            &detail,
            now,
        );
        return GateDecision::Inconclusive(format!(
            "error-rate gate inconclusive: fewer than {} requests; {detail}",
            r.spec.min_sample
        ));
    }
    if rate > threshold {
        gate(
            r,
            "error_rate",
            Decision::Failed,
            rate,
            threshold,
            &detail,
            now,
        );
        return GateDecision::Failed(format!(
            "error-rate gate: {detail}, limit {:.1}%",
            threshold * 100.0
        ));
    }
    gate(
        r,
        "error_rate",
        Decision::Passed,
        rate,
        threshold,
        &detail,
        now,
    );
    GateDecision::Passed
}

/// The verdict mix: the block rate of the batch (new version) against the target gateways still
/// on the old version, over the bake window.
fn verdict_gate(
    r: &mut RolloutRecord,
    observed: &Observed,
    batch: &[String],
    now: u64,
) -> GateDecision {
    let Some(threshold) = r.spec.max_block_rate_delta else {
        return GateDecision::Passed;
    };
    let new = window(r, observed, applied(r, batch));
    let old = window(
        r,
        observed,
        r.gateways
            .iter()
            .filter(|(_, p)| p.state == TargetState::Pending)
            .map(|(g, _)| g),
    );
    let rate = |c: Counts| {
        if c.total == 0 {
            0.0
        } else {
            c.block as f64 / c.total as f64
        }
    };
    let detail = format!(
        "new version: {} blocked of {} ({:.1}%), old version: {} blocked of {} ({:.1}%)",
        new.block,
        new.total,
        rate(new) * 100.0,
        old.block,
        old.total,
        rate(old) * 100.0
    );
    if new.total < r.spec.min_sample || old.total < r.spec.min_sample {
        let why = format!(
            "verdict-mix gate inconclusive: fewer than {} requests on a side; {detail}",
            r.spec.min_sample
        );
        gate(
            r,
            "verdict_mix",
            Decision::Inconclusive,
            rate(new) - rate(old),
            threshold,
            &detail,
            now,
        );
        return GateDecision::Inconclusive(why);
    }
    let delta = rate(new) - rate(old);
    if delta > threshold {
        gate(
            r,
            "verdict_mix",
            Decision::Failed,
            delta,
            threshold,
            &detail,
            now,
        );
        GateDecision::Failed(format!(
            "verdict-mix gate: block rate rose by {:.1} points (limit {:.1}); {detail}",
            delta * 100.0,
            threshold * 100.0
        ))
    } else {
        gate(
            r,
            "verdict_mix",
            Decision::Passed,
            delta,
            threshold,
            &detail,
            now,
        );
        GateDecision::Passed
    }
}

fn gate(
    r: &mut RolloutRecord,
    gate: &str,
    decision: Decision,
    value: f64,
    threshold: f64,
    detail: &str,
    now: u64,
) {
    r.gates.push(GateRecord {
        batch: r.current_batch,
        gate: gate.to_owned(),
        decision,
        value,
        threshold,
        detail: detail.to_owned(),
        at: now,
    });
}

/// A failed gate, a refused config or a deadline: roll back, or pause for a human.
pub fn fail(r: &mut RolloutRecord, now: u64, reason: String, rolled_back_as: Outcome) {
    r.message = reason.clone();
    if r.spec.rollback_on_error {
        r.record(
            now,
            "coordinator",
            format!("{reason}; rolling back every touched gateway"),
        );
        r.phase = Phase::RollingBack {
            then: rolled_back_as,
        };
        r.confirming = false;
    } else if rolled_back_as == Outcome::TimedOut {
        r.record(now, "coordinator", reason);
        r.phase = Phase::Done(Outcome::TimedOut);
    } else {
        r.record(
            now,
            "coordinator",
            format!("{reason}; paused for a human (no --rollback-on-error)"),
        );
        // Resuming continues with the next step; a rejected gateway is never offered again.
        r.phase = Phase::Paused {
            resume: Box::new(Phase::Applying),
        };
        for p in r.gateways.values_mut() {
            if p.state == TargetState::Failed {
                p.state = TargetState::Rejected;
            }
        }
    }
}

fn rolling_back(
    r: &mut RolloutRecord,
    fleet: &BTreeMap<String, GatewayState>,
    now: u64,
    then: Outcome,
    effects: &mut Vec<Effect>,
) {
    let id = r.id.clone();
    let deadline = r.spec.apply_deadline_ms;
    for (gateway, p) in r.gateways.iter_mut() {
        let running = fleet.get(gateway).and_then(running_config).map(|c| c.hash);
        match p.state {
            TargetState::Offered | TargetState::Applied | TargetState::Failed => {
                if p.baseline.hash.is_empty()
                    || running.as_deref() == Some(p.baseline.hash.as_str())
                        && p.state == TargetState::Failed
                {
                    p.state = TargetState::RolledBack;
                } else if connected(fleet, gateway) {
                    p.offers_sent += 1;
                    let offer_id = offer_id(&id, gateway, p.offers_sent);
                    p.offer_id = Some(offer_id.clone());
                    p.offered_at = Some(now);
                    p.state = TargetState::RollingBack;
                    effects.push(Effect::Offer {
                        gateway: gateway.clone(),
                        offer_id,
                        config: p.baseline.clone(),
                        rollback: true,
                        apply_deadline_ms: deadline,
                    });
                }
            }
            TargetState::RollingBack
                if !connected(fleet, gateway) || session_since(fleet, gateway, p.offered_at) =>
            {
                p.state = TargetState::Applied
            }
            TargetState::RollingBack
                if p.offered_at
                    .is_some_and(|at| now > at + deadline + ANSWER_GRACE_MS) =>
            {
                p.error = "no answer to the rollback offer".into();
                p.state = TargetState::Applied;
            }
            _ => {}
        }
    }
    if r.gateways.values().any(|p| p.state.touched()) {
        return;
    }
    // Answered is not done: each gateway rolled back must report its previous config running.
    let unconfirmed: Vec<&str> = r
        .gateways
        .iter()
        .filter(|(g, p)| {
            p.state == TargetState::RolledBack
                && !p.baseline.hash.is_empty()
                && !reports_running(fleet, g, &p.baseline.hash)
        })
        .map(|(g, _)| g.as_str())
        .collect();
    if !unconfirmed.is_empty() {
        let what = format!(
            "every rollback offer answered; waiting for {} to report the previous version running and healthy",
            unconfirmed.join(", ")
        );
        waiting_for_reports(r, now, what);
        return;
    }
    r.confirming = false;
    let what = format!(
        "rollback complete: every touched gateway reports its previous version running ({})",
        then.as_str().replace('_', " ")
    );
    r.record(now, "coordinator", what);
    r.phase = Phase::Done(then);
}

fn finish(r: &mut RolloutRecord, now: u64, outcome: Outcome, why: &str) {
    r.phase = Phase::Done(outcome);
    r.record(now, "coordinator", why);
}

/// An operator's pause.
pub fn pause(r: &mut RolloutRecord, now: u64, by: &str, reason: &str) -> Result<(), String> {
    match r.phase.clone() {
        phase @ (Phase::Applying | Phase::Baking { .. } | Phase::Pausing { .. }) => {
            r.phase = Phase::Paused {
                resume: Box::new(phase),
            };
            r.record(now, by, format!("paused by operator{}", suffix(reason)));
            Ok(())
        }
        _ => Err(format!(
            "rollout {} is {}, not running",
            r.id,
            r.state_name()
        )),
    }
}

pub fn resume(r: &mut RolloutRecord, now: u64, by: &str, reason: &str) -> Result<(), String> {
    match r.phase.clone() {
        Phase::Paused { resume } => {
            // A bake interrupted by a pause starts over: the gates need a whole window.
            r.phase = match *resume {
                Phase::Baking { .. } => Phase::Baking {
                    until: now + r.spec.min_healthy_time_ms,
                },
                Phase::Applying => Phase::Applying,
                // Paused after its batch's gates were inconclusive: resuming accepts the batch.
                other => {
                    r.passed_batches = r.current_batch + 1;
                    other
                }
            };
            r.progress_deadline = now + r.spec.progress_deadline_ms;
            r.message.clear();
            r.record(now, by, format!("resumed{}", suffix(reason)));
            Ok(())
        }
        _ => Err(format!(
            "rollout {} is {}, not paused",
            r.id,
            r.state_name()
        )),
    }
}

pub fn promote(r: &mut RolloutRecord, now: u64, by: &str, reason: &str) -> Result<(), String> {
    match r.phase {
        Phase::AwaitingPromotion => {
            r.current_batch += 1;
            r.phase = Phase::Applying;
            r.progress_deadline = now + r.spec.progress_deadline_ms;
            r.record(now, by, format!("canary promoted{}", suffix(reason)));
            Ok(())
        }
        _ => Err(format!(
            "rollout {} is {}, not waiting for promotion",
            r.id,
            r.state_name()
        )),
    }
}

/// Abort: the desired state returns to the baseline for every touched gateway.
pub fn abort(r: &mut RolloutRecord, now: u64, by: &str, reason: &str) -> Result<(), String> {
    if !r.is_active() || matches!(r.phase, Phase::RollingBack { .. }) {
        return Err(format!(
            "rollout {} is {}, nothing to abort",
            r.id,
            r.state_name()
        ));
    }
    r.message = format!("aborted by {by}{}", suffix(reason));
    r.record(
        now,
        by,
        format!(
            "aborted{}; returning touched gateways to their previous version",
            suffix(reason)
        ),
    );
    r.progress_deadline = now + r.spec.progress_deadline_ms;
    r.phase = Phase::RollingBack {
        then: Outcome::Aborted,
    };
    r.confirming = false;
    Ok(())
}

fn suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// The desired configs a transition from `before` to `after` moves: a batch that passed its
/// gates settles its gateways on the rollout's config; the gateways that already ran it settle
/// when the rollout succeeds; a rollback returns every touched gateway to its baseline.
pub fn desired_moves(
    before: Option<&RolloutRecord>,
    after: &RolloutRecord,
    now: u64,
) -> Vec<crate::intent::DesiredChange> {
    use crate::intent::Desired;
    let settle = |config: &ConfigId, cause: String| {
        Some(Desired {
            config: config.clone(),
            cause,
            at: now,
        })
    };
    let mut moves = Vec::new();
    let rolling_back = |r: &RolloutRecord| matches!(r.phase, Phase::RollingBack { .. });
    if rolling_back(after) && !before.is_some_and(rolling_back) {
        for (gateway, p) in &after.gateways {
            if p.state.touched() && !p.baseline.hash.is_empty() {
                let cause = format!("{} rolled back", after.id);
                moves.push((gateway.clone(), settle(&p.baseline, cause)));
            }
        }
        return moves;
    }
    let from = before.map_or(0, |b| b.passed_batches);
    for (i, batch) in after
        .batches
        .iter()
        .enumerate()
        .take(after.passed_batches)
        .skip(from)
    {
        for gateway in applied(after, batch) {
            let cause = format!("{} batch {} passed its gates", after.id, i + 1);
            moves.push((gateway.clone(), settle(&after.config, cause)));
        }
    }
    let succeeded = |r: &RolloutRecord| r.phase == Phase::Done(Outcome::Succeeded);
    if succeeded(after) && !before.is_some_and(succeeded) {
        for (gateway, p) in &after.gateways {
            if p.state == TargetState::Unchanged {
                let cause = format!("{} succeeded (already running it)", after.id);
                moves.push((gateway.clone(), settle(&after.config, cause)));
            }
        }
    }
    moves
}

/// An agent's answer to an offer of this rollout.
pub fn answer(
    r: &mut RolloutRecord,
    gateway: &str,
    offer_id: &str,
    phase: kt_proto::v1::ConfigPhase,
    error: &str,
    now: u64,
) -> bool {
    use kt_proto::v1::ConfigPhase;
    let Some(p) = r.gateways.get_mut(gateway) else {
        return false;
    };
    if p.offer_id.as_deref() != Some(offer_id) {
        return false;
    }
    let before = p.state;
    p.state = match (p.state, phase) {
        (TargetState::Offered, ConfigPhase::Applied) => TargetState::Applied,
        (TargetState::Offered, ConfigPhase::Rejected) => TargetState::Rejected,
        (TargetState::Offered, ConfigPhase::Failed) => TargetState::Failed,
        (
            TargetState::Offered | TargetState::RollingBack,
            ConfigPhase::Superseded | ConfigPhase::StaleEpoch,
        ) => before,
        (TargetState::RollingBack, ConfigPhase::Applied) => TargetState::RolledBack,
        (TargetState::RollingBack, ConfigPhase::Rejected | ConfigPhase::Failed) => {
            TargetState::RolledBack
        }
        (state, _) => state,
    };
    if !error.is_empty() {
        p.error = error.to_owned();
    }
    let changed = p.state != before;
    if changed {
        let what = format!(
            "{gateway}: {} ({})",
            p.state.as_str().replace('_', " "),
            if error.is_empty() { "ok" } else { error }
        );
        r.record(now, gateway, what);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::counters::Tally;
    use crate::rollout::model::{GatewayProgress, Size, Spec, Target};
    use kt_proto::v1::{ConfigInfo, ConfigPhase, GatewayHealth};

    const OLD: &str = "sha256:old";
    const NEW: &str = "sha256:new";

    fn spec(strategy: Strategy) -> Spec {
        Spec {
            target: Target::Group("g".into()),
            strategy,
            size: Size::Count(1),
            pause_between_ms: 1_000,
            min_healthy_time_ms: 2_000,
            apply_deadline_ms: 10_000,
            progress_deadline_ms: 600_000,
            max_block_rate_delta: None,
            max_error_rate: None,
            min_sample: 10,
            continue_on_inconclusive: false,
            rollback_on_error: true,
        }
    }

    fn rollout(spec: Spec, gateways: &[&str]) -> RolloutRecord {
        let batches = match spec.strategy {
            Strategy::AllAtOnce => vec![gateways.iter().map(|g| (*g).to_owned()).collect()],
            Strategy::Canary { .. } => vec![
                vec![gateways[0].to_owned()],
                gateways[1..].iter().map(|g| (*g).to_owned()).collect(),
            ],
            Strategy::Rolling => gateways.iter().map(|g| vec![(*g).to_owned()]).collect(),
        };
        RolloutRecord {
            number: 1,
            id: "r-1".into(),
            config: ConfigId {
                version: "2.0.0".into(),
                hash: NEW.into(),
            },
            batches,
            gateways: gateways
                .iter()
                .map(|g| {
                    let progress = GatewayProgress {
                        baseline: ConfigId {
                            version: "1.0.0".into(),
                            hash: OLD.into(),
                        },
                        state: TargetState::Pending,
                        error: String::new(),
                        offer_id: None,
                        offered_at: None,
                        offers_sent: 0,
                    };
                    ((*g).to_owned(), progress)
                })
                .collect(),
            phase: Phase::Applying,
            current_batch: 0,
            progress_deadline: spec.progress_deadline_ms,
            spec,
            bake_counts: BTreeMap::new(),
            gates: vec![],
            history: vec![],
            created_by: "op".into(),
            reason: String::new(),
            created_at: 0,
            message: String::new(),
            dry_run: false,
            rollback: false,
            passed_batches: 0,
            confirming: false,
            source: None,
        }
    }

    /// Steps `r` against `f` with each gateway reporting what the rollout made it run (the new
    /// config once applied, its baseline otherwise), as agents' status reports would.
    fn step_seen(r: &mut RolloutRecord, f: &Observed, now: u64) -> (Vec<Effect>, bool) {
        let mut seen = f.clone();
        for (gateway, state) in &mut seen.fleet {
            let Some(p) = r.gateways.get(gateway) else {
                continue;
            };
            let hash = match p.state {
                TargetState::Applied | TargetState::RollingBack => NEW,
                _ => OLD,
            };
            if let Some(config) = state.health.as_mut().and_then(|h| h.config.as_mut()) {
                config.hash = hash.into();
            }
        }
        step(r, &seen, now)
    }

    /// Gateways `(id, connected, requests, blocked)`, all on the old config.
    fn fleet(gateways: &[(&str, bool, u64, u64)]) -> Observed {
        on_new(gateways, &[])
    }

    /// As [`fleet`], with the decisions of the gateways in `new` made on the new config.
    fn on_new(gateways: &[(&str, bool, u64, u64)], new: &[&str]) -> Observed {
        let fleet = gateways
            .iter()
            .map(|(id, up, _, _)| {
                let state = GatewayState {
                    gateway_id: (*id).to_owned(),
                    agent_state: if *up {
                        AgentState::Connected
                    } else {
                        AgentState::Disconnected
                    } as i32,
                    // Heartbeats keep arriving from connected agents: each step sees a fresh one.
                    last_heartbeat_unix_ms: if *up { u64::MAX } else { 0 },
                    health: Some(GatewayHealth {
                        status: HealthStatus::Healthy as i32,
                        reachable: true,
                        config: Some(ConfigInfo {
                            hash: OLD.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                ((*id).to_owned(), state)
            })
            .collect();
        let decisions = gateways
            .iter()
            .map(|(id, _, total, block)| {
                let hash = if new.contains(id) { NEW } else { OLD };
                let tally = Tally {
                    allow: total - block,
                    block: *block,
                    requests: *total,
                    ..Default::default()
                };
                ((*id).to_owned(), [(hash.to_owned(), tally)].into())
            })
            .collect();
        Observed { fleet, decisions }
    }

    #[test]
    fn gates_count_each_side_on_its_own_config() {
        let mut r = rollout(spec(Strategy::Rolling), &["a", "b"]);
        let mut observed = fleet(&[("a", true, 10, 1), ("b", true, 20, 2)]);
        observed.decisions.get_mut("a").map(|t| {
            t.insert(
                NEW.into(),
                Tally {
                    block: 5,
                    allow: 2,
                    requests: 8,
                    errors: 1,
                    ..Default::default()
                },
            )
        });
        let pending = counts(&r, &observed, "a");
        assert_eq!((pending.total, pending.block), (10, 1), "old config only");
        r.gateways.get_mut("a").expect("a").state = TargetState::Applied;
        let applied = counts(&r, &observed, "a");
        assert_eq!(
            (
                applied.total,
                applied.block,
                applied.requests,
                applied.errors
            ),
            (7, 5, 8, 1),
            "new config only"
        );
    }

    fn offers(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|Effect::Offer { gateway, .. }| gateway.clone())
            .collect()
    }

    fn apply_all(r: &mut RolloutRecord, effects: &[Effect], now: u64) {
        for Effect::Offer {
            gateway, offer_id, ..
        } in effects
        {
            answer(r, gateway, offer_id, ConfigPhase::Applied, "", now);
        }
    }

    #[test]
    fn rolling_goes_one_gateway_at_a_time_with_bake_and_pause() {
        let mut r = rollout(spec(Strategy::Rolling), &["a", "b", "c"]);
        let f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0), ("c", true, 0, 0)]);
        let mut order = Vec::new();
        let mut now = 0;
        while r.is_active() && now < 100_000 {
            let (effects, _) = step_seen(&mut r, &f, now);
            order.extend(offers(&effects));
            apply_all(&mut r, &effects, now);
            now += 100;
        }
        assert_eq!(order, ["a", "b", "c"]);
        assert_eq!(r.phase, Phase::Done(Outcome::Succeeded));
        // Each batch: bake 2 s; between batches: pause 1 s.
        assert!(
            (2 * 3000 + 2000..=2 * 3000 + 2000 + 1000).contains(&now),
            "took {now} ms"
        );
    }

    #[test]
    fn an_answer_is_not_enough_the_gateway_must_report_the_config_running() {
        let mut s = spec(Strategy::AllAtOnce);
        s.min_healthy_time_ms = 0;
        let mut r = rollout(s, &["a"]);
        let f = fleet(&[("a", true, 0, 0)]);
        let (effects, _) = step(&mut r, &f, 0);
        apply_all(&mut r, &effects, 0);
        // Answered APPLIED, but the gateway still reports the old config: wait, and say so once.
        step(&mut r, &f, 100);
        step(&mut r, &f, 200);
        assert_eq!(r.phase, Phase::Applying);
        let waiting = r
            .history
            .iter()
            .filter(|t| t.what.contains("waiting for 1 gateway(s) to report"))
            .count();
        assert_eq!(waiting, 1, "{:?}", r.history);
        // Its report arrives: the batch is complete, and so is the rollout.
        step_seen(&mut r, &f, 300);
        assert_eq!(r.phase, Phase::Done(Outcome::Succeeded));
        let whats: Vec<&str> = r.history.iter().map(|t| t.what.as_str()).collect();
        let answered = whats
            .iter()
            .position(|w| w.contains("every offer answered"))
            .expect("answered");
        let applied = whats
            .iter()
            .position(|w| w.contains("batch 1 applied"))
            .expect("applied");
        assert!(answered < applied, "{whats:?}");
        assert_eq!(r.passed_batches, 1);
        let moves = desired_moves(None, &r, 300);
        assert_eq!(moves.len(), 1);
        assert_eq!(
            moves[0].1.as_ref().map(|d| d.config.hash.as_str()),
            Some(NEW)
        );
    }

    #[test]
    fn a_rollback_is_complete_only_once_the_previous_config_is_reported_running() {
        let mut r = rollout(spec(Strategy::Rolling), &["a", "b"]);
        let f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]);
        let (effects, _) = step_seen(&mut r, &f, 0);
        apply_all(&mut r, &effects, 0);
        step_seen(&mut r, &f, 100);
        let before = r.clone();
        abort(&mut r, 200, "op", "changed my mind").expect("abort");
        let moves = desired_moves(Some(&before), &r, 200);
        assert_eq!(moves.len(), 1, "a returns to its baseline: {moves:?}");
        assert_eq!(
            moves[0].1.as_ref().map(|d| d.config.hash.as_str()),
            Some(OLD)
        );
        let (effects, _) = step_seen(&mut r, &f, 300);
        let Effect::Offer { offer_id, .. } = &effects[0];
        answer(&mut r, "a", offer_id, ConfigPhase::Applied, "", 400);
        // a answered, but still reports the new config.
        let mut still_new = f.clone();
        if let Some(c) = still_new
            .fleet
            .get_mut("a")
            .and_then(|s| s.health.as_mut())
            .and_then(|h| h.config.as_mut())
        {
            c.hash = NEW.into();
        }
        step(&mut r, &still_new, 500);
        assert!(
            matches!(r.phase, Phase::RollingBack { .. }),
            "{:?}",
            r.phase
        );
        step(&mut r, &f, 600);
        assert_eq!(r.phase, Phase::Done(Outcome::Aborted));
    }

    #[test]
    fn disconnected_gateways_wait_instead_of_failing() {
        let mut r = rollout(spec(Strategy::AllAtOnce), &["a", "b"]);
        let (effects, _) = step_seen(&mut r, &fleet(&[("a", true, 0, 0), ("b", false, 0, 0)]), 0);
        assert_eq!(offers(&effects), ["a"]);
        apply_all(&mut r, &effects, 0);
        let (effects, _) = step_seen(
            &mut r,
            &fleet(&[("a", true, 0, 0), ("b", false, 0, 0)]),
            60_000,
        );
        assert!(effects.is_empty());
        assert_eq!(r.phase, Phase::Applying, "still waiting for b");
        let (effects, _) = step_seen(
            &mut r,
            &fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]),
            61_000,
        );
        assert_eq!(offers(&effects), ["b"]);
    }

    #[test]
    fn a_rejection_rolls_back_touched_gateways_and_stops() {
        let mut r = rollout(spec(Strategy::Rolling), &["a", "b"]);
        let f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]);
        let (effects, _) = step_seen(&mut r, &f, 0);
        let Effect::Offer { offer_id, .. } = &effects[0];
        answer(
            &mut r,
            "a",
            offer_id,
            ConfigPhase::Rejected,
            "validation failed",
            10,
        );
        let (effects, _) = step_seen(&mut r, &f, 20);
        // Nothing changed on a (rejected), so there is nothing to roll back, and b never got it.
        assert!(effects.is_empty(), "{effects:?}");
        assert_eq!(r.phase, Phase::Done(Outcome::RolledBack));
        assert_eq!(r.gateways["b"].offers_sent, 0);
        assert!(r.message.contains("validation failed"));
    }

    #[test]
    fn without_rollback_a_failure_pauses_for_a_human() {
        let mut s = spec(Strategy::Rolling);
        s.rollback_on_error = false;
        let mut r = rollout(s, &["a", "b"]);
        let f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]);
        let (effects, _) = step_seen(&mut r, &f, 0);
        let Effect::Offer { offer_id, .. } = &effects[0];
        answer(&mut r, "a", offer_id, ConfigPhase::Rejected, "bad", 10);
        step_seen(&mut r, &f, 20);
        assert!(matches!(r.phase, Phase::Paused { .. }));
        assert_eq!(r.state_name(), "paused");
    }

    #[test]
    fn verdict_gate_trips_on_a_block_rate_jump_and_rolls_back() {
        let mut s = spec(Strategy::Rolling);
        s.max_block_rate_delta = Some(0.2);
        let mut r = rollout(s, &["a", "b", "c"]);
        let (effects, _) = step_seen(
            &mut r,
            &fleet(&[
                ("a", true, 100, 0),
                ("b", true, 100, 0),
                ("c", true, 100, 0),
            ]),
            0,
        );
        apply_all(&mut r, &effects, 0);
        step_seen(
            &mut r,
            &fleet(&[
                ("a", true, 100, 0),
                ("b", true, 100, 0),
                ("c", true, 100, 0),
            ]),
            100,
        );
        assert!(matches!(r.phase, Phase::Baking { .. }));
        // During the bake a blocks everything on the new config, b and c block nothing.
        let baked = on_new(
            &[
                ("a", true, 100, 100),
                ("b", true, 200, 0),
                ("c", true, 200, 0),
            ],
            &["a"],
        );
        let (effects, _) = step_seen(&mut r, &baked, 3_000);
        assert!(
            matches!(r.phase, Phase::RollingBack { .. }),
            "{:?}",
            r.phase
        );
        let gate = r
            .gates
            .iter()
            .find(|g| g.gate == "verdict_mix")
            .expect("gate recorded");
        assert_eq!((gate.decision, gate.value), (Decision::Failed, 1.0));
        // The step that tripped the gate already offered the rollback to the touched gateway.
        assert_eq!(effects.len(), 1);
        let Effect::Offer {
            gateway,
            rollback,
            config,
            offer_id,
            ..
        } = &effects[0];
        assert_eq!(
            (gateway.as_str(), *rollback, config.hash.as_str()),
            ("a", true, OLD)
        );
        answer(&mut r, "a", offer_id, ConfigPhase::Applied, "", 3_100);
        step_seen(&mut r, &baked, 3_200);
        assert_eq!(r.phase, Phase::Done(Outcome::RolledBack));
        assert_eq!(
            r.gateways["b"].offers_sent, 0,
            "b never received the bad config"
        );
    }

    /// A rolling rollout over `a` and `b` whose first batch (`a`) applied at 1 s and bakes until 3 s.
    fn baking_first_batch(s: Spec) -> RolloutRecord {
        let mut r = rollout(s, &["a", "b"]);
        let f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]);
        let (effects, _) = step_seen(&mut r, &f, 1_000);
        apply_all(&mut r, &effects, 1_000);
        step_seen(&mut r, &f, 1_000);
        assert_eq!(r.phase, Phase::Baking { until: 3_000 });
        r
    }

    #[test]
    fn the_health_gate_does_not_pass_a_gateway_nobody_observed() {
        // a's agent died right after answering APPLIED: while it is only unreachable it may
        // come back and report, so the bake goes on...
        let mut r = baking_first_batch(spec(Strategy::Rolling));
        let mut gone = fleet(&[("a", false, 0, 0), ("b", true, 0, 0)]);
        gone.fleet.get_mut("a").expect("a").agent_state = AgentState::Unreachable as i32;
        step_seen(&mut r, &gone, 3_000);
        assert_eq!(r.phase, Phase::Baking { until: 3_000 });
        // ...and once liveness calls it disconnected, nothing says a stayed healthy.
        gone.fleet.get_mut("a").expect("a").agent_state = AgentState::Disconnected as i32;
        step_seen(&mut r, &gone, 6_000);
        assert!(matches!(r.phase, Phase::Paused { .. }), "{:?}", r.phase);
        let gate = r.gates.iter().find(|g| g.gate == "health").expect("gate");
        assert_eq!(gate.decision, Decision::Inconclusive);
        assert!(
            gate.detail.contains("a (agent disconnected)"),
            "{}",
            gate.detail
        );
        assert!(
            r.message.contains("health gate inconclusive"),
            "{}",
            r.message
        );
        assert_eq!(r.gateways["b"].offers_sent, 0);

        // With --continue-on-inconclusive the rollout goes on, and says why.
        let mut s = spec(Strategy::Rolling);
        s.continue_on_inconclusive = true;
        let mut r = baking_first_batch(s);
        step_seen(&mut r, &gone, 6_000);
        assert!(matches!(r.phase, Phase::Pausing { .. }), "{:?}", r.phase);
        assert_eq!(
            r.gates.last().map(|g| g.decision),
            Some(Decision::Inconclusive)
        );
    }

    #[test]
    fn the_health_gate_waits_for_a_connected_gateways_report_within_the_bake() {
        let mut r = baking_first_batch(spec(Strategy::Rolling));
        // Connected, but its last heartbeat came before the bake started.
        let mut quiet = fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]);
        quiet.fleet.get_mut("a").expect("a").last_heartbeat_unix_ms = 900;
        step_seen(&mut r, &quiet, 3_000);
        assert_eq!(r.phase, Phase::Baking { until: 3_000 });
        assert!(r.gates.iter().all(|g| g.gate != "health"));
        // Its heartbeat arrives: evidence, and the gate passes.
        quiet.fleet.get_mut("a").expect("a").last_heartbeat_unix_ms = 3_100;
        step_seen(&mut r, &quiet, 3_100);
        let gate = r.gates.iter().find(|g| g.gate == "health").expect("gate");
        assert_eq!(gate.decision, Decision::Passed);
        assert!(matches!(r.phase, Phase::Pausing { .. }), "{:?}", r.phase);
    }

    #[test]
    fn an_offer_lost_with_a_restarted_agent_is_made_again() {
        let mut r = rollout(spec(Strategy::Rolling), &["a", "b"]);
        let mut f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]);
        let (effects, _) = step_seen(&mut r, &f, 1_000);
        assert_eq!(offers(&effects), ["a"]);
        // a's agent restarts between two steps: never seen disconnected, but a new session.
        f.fleet.get_mut("a").expect("a").connected_since_unix_ms = 1_500;
        let (effects, _) = step_seen(&mut r, &f, 2_000);
        let (effects, _) = if effects.is_empty() {
            step_seen(&mut r, &f, 2_200)
        } else {
            (effects, true)
        };
        assert_eq!(offers(&effects), ["a"], "offered again on the new session");
        assert_eq!(r.gateways["a"].offers_sent, 2);
        // The new offer is not repeated while the session stays the same.
        let (effects, _) = step_seen(&mut r, &f, 2_400);
        assert!(effects.is_empty());
    }

    #[test]
    fn too_little_traffic_is_inconclusive_and_pauses() {
        let mut s = spec(Strategy::Rolling);
        s.max_block_rate_delta = Some(0.2);
        let mut r = rollout(s, &["a", "b"]);
        let f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0)]);
        let (effects, _) = step_seen(&mut r, &f, 0);
        apply_all(&mut r, &effects, 0);
        step_seen(&mut r, &f, 100);
        step_seen(&mut r, &f, 3_000);
        assert_eq!(r.state_name(), "paused");
        assert_eq!(
            r.gates.last().map(|g| g.decision),
            Some(Decision::Inconclusive)
        );
        resume(&mut r, 3_100, "op", "").expect("resume");
        assert!(
            matches!(r.phase, Phase::Pausing { .. }),
            "continues with the next batch: {:?}",
            r.phase
        );
    }

    #[test]
    fn canary_waits_for_promotion_and_abort_rolls_back() {
        let mut r = rollout(
            spec(Strategy::Canary {
                auto_promote: false,
            }),
            &["a", "b", "c"],
        );
        let f = fleet(&[("a", true, 0, 0), ("b", true, 0, 0), ("c", true, 0, 0)]);
        let (effects, _) = step_seen(&mut r, &f, 0);
        assert_eq!(offers(&effects), ["a"]);
        apply_all(&mut r, &effects, 0);
        step_seen(&mut r, &f, 100);
        step_seen(&mut r, &f, 3_000);
        assert_eq!(r.phase, Phase::AwaitingPromotion);
        promote(&mut r, 3_100, "op", "").expect("promote");
        let (effects, _) = step_seen(&mut r, &f, 3_200);
        assert_eq!(offers(&effects), ["b", "c"]);
        abort(&mut r, 3_300, "op", "changed my mind").expect("abort");
        let (effects, _) = step_seen(&mut r, &f, 3_400);
        let mut back = offers(&effects);
        back.sort();
        assert_eq!(back, ["a", "b", "c"], "every touched gateway goes back");
        for Effect::Offer {
            gateway,
            offer_id,
            rollback,
            ..
        } in &effects
        {
            assert!(*rollback);
            answer(&mut r, gateway, offer_id, ConfigPhase::Applied, "", 3_500);
        }
        step_seen(&mut r, &f, 3_600);
        assert_eq!(r.phase, Phase::Done(Outcome::Aborted));
    }

    #[test]
    fn the_progress_deadline_acts() {
        let mut s = spec(Strategy::AllAtOnce);
        s.rollback_on_error = false;
        let mut r = rollout(s, &["a"]);
        step_seen(&mut r, &fleet(&[("a", false, 0, 0)]), 0);
        step_seen(&mut r, &fleet(&[("a", false, 0, 0)]), 600_001);
        assert_eq!(r.phase, Phase::Done(Outcome::TimedOut));
    }

    #[test]
    fn an_unanswered_offer_fails_after_the_apply_deadline() {
        let mut r = rollout(spec(Strategy::AllAtOnce), &["a"]);
        let f = fleet(&[("a", true, 0, 0)]);
        step_seen(&mut r, &f, 0);
        step_seen(&mut r, &f, 10_000 + ANSWER_GRACE_MS + 1);
        assert!(
            matches!(r.phase, Phase::RollingBack { .. }),
            "{:?}",
            r.phase
        );
        assert!(r.message.contains("apply deadline"));
    }

    #[test]
    fn stale_answers_are_ignored() {
        let mut r = rollout(spec(Strategy::AllAtOnce), &["a"]);
        step_seen(&mut r, &fleet(&[("a", true, 0, 0)]), 0);
        assert!(!answer(&mut r, "a", "r-1/a/0", ConfigPhase::Applied, "", 1));
        assert_eq!(r.gateways["a"].state, TargetState::Offered);
        assert!(answer(
            &mut r,
            "a",
            &offer_id("r-1", "a", 1),
            ConfigPhase::Applied,
            "",
            2
        ));
    }
}
