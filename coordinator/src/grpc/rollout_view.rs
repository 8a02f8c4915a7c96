//! Conversions between rollout domain types and the `kt.fleet.v1` messages operators see.

use std::time::Duration;

use kt_proto::v1;

use crate::rollout::model::{
    ConfigId, Decision, Phase, RolloutRecord, Size, Spec, Strategy, Target, TargetState,
};

/// Defaults for fields an operator left unset (zero).
const DEFAULT_APPLY_DEADLINE: Duration = Duration::from_secs(60);
const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
const DEFAULT_MIN_SAMPLE: u64 = 50;

pub fn config_ref(c: &ConfigId) -> v1::ConfigRef {
    v1::ConfigRef {
        version: c.version.clone(),
        hash: c.hash.clone(),
    }
}

/// Validates a requested spec into the domain type.
pub fn spec_from_proto(spec: &v1::RolloutSpec) -> Result<Spec, String> {
    let target = match (spec.group.is_empty(), spec.selector.is_empty()) {
        (false, true) => Target::Group(spec.group.clone()),
        (true, false) => Target::Selector(spec.selector.clone().into_iter().collect()),
        (false, false) => return Err("give a group or a selector, not both".into()),
        (true, true) => return Err("a rollout needs a group or a selector".into()),
    };
    let strategy = match v1::Strategy::try_from(spec.strategy).unwrap_or(v1::Strategy::Unspecified)
    {
        v1::Strategy::Rolling | v1::Strategy::Unspecified => Strategy::Rolling,
        v1::Strategy::Canary => Strategy::Canary {
            auto_promote: spec.auto_promote,
        },
        v1::Strategy::AllAtOnce => Strategy::AllAtOnce,
    };
    if spec.size_percent && !(1..=100).contains(&spec.size) {
        return Err(format!(
            "a batch size of {}% is not between 1% and 100%",
            spec.size
        ));
    }
    let size = if spec.size_percent {
        Size::Percent(spec.size)
    } else {
        Size::Count(spec.size.max(1))
    };
    let max_block_rate_delta =
        (spec.max_block_rate_delta >= 0.0).then_some(spec.max_block_rate_delta);
    let max_error_rate = (spec.max_error_rate >= 0.0).then_some(spec.max_error_rate);
    if max_error_rate.is_some_and(|r| !(0.0..=1.0).contains(&r) || r.is_nan()) {
        return Err("max error rate must be between 0 and 1".into());
    }
    if max_block_rate_delta.is_some_and(|d| !(0.0..=1.0).contains(&d) || d.is_nan()) {
        return Err("max block rate delta must be between 0 and 1".into());
    }
    let or = |ms: u64, default: Duration| {
        if ms == 0 {
            u64::try_from(default.as_millis()).unwrap_or(u64::MAX)
        } else {
            ms
        }
    };
    Ok(Spec {
        target,
        strategy,
        size,
        pause_between_ms: spec.pause_between_ms,
        min_healthy_time_ms: spec.min_healthy_time_ms,
        apply_deadline_ms: or(spec.apply_deadline_ms, DEFAULT_APPLY_DEADLINE),
        progress_deadline_ms: or(spec.progress_deadline_ms, DEFAULT_PROGRESS_DEADLINE),
        max_block_rate_delta,
        max_error_rate,
        min_sample: if spec.min_sample == 0 {
            DEFAULT_MIN_SAMPLE
        } else {
            spec.min_sample
        },
        continue_on_inconclusive: spec.continue_on_inconclusive,
        rollback_on_error: spec.rollback_on_error,
    })
}

pub fn spec_to_proto(spec: &Spec) -> v1::RolloutSpec {
    let (group, selector) = match &spec.target {
        Target::Group(g) => (g.clone(), Default::default()),
        Target::Selector(s) => (String::new(), s.clone().into_iter().collect()),
    };
    let (strategy, auto_promote) = match spec.strategy {
        Strategy::Rolling => (v1::Strategy::Rolling, false),
        Strategy::Canary { auto_promote } => (v1::Strategy::Canary, auto_promote),
        Strategy::AllAtOnce => (v1::Strategy::AllAtOnce, false),
    };
    let (size, size_percent) = match spec.size {
        Size::Count(n) => (n, false),
        Size::Percent(p) => (p, true),
    };
    v1::RolloutSpec {
        group,
        selector,
        strategy: strategy as i32,
        size,
        size_percent,
        auto_promote,
        pause_between_ms: spec.pause_between_ms,
        min_healthy_time_ms: spec.min_healthy_time_ms,
        apply_deadline_ms: spec.apply_deadline_ms,
        progress_deadline_ms: spec.progress_deadline_ms,
        max_block_rate_delta: spec.max_block_rate_delta.unwrap_or(-1.0),
        max_error_rate: spec.max_error_rate.unwrap_or(-1.0),
        min_sample: spec.min_sample,
        continue_on_inconclusive: spec.continue_on_inconclusive,
        rollback_on_error: spec.rollback_on_error,
    }
}

pub fn to_proto(r: &RolloutRecord) -> v1::Rollout {
    let step = match &r.phase {
        _ if r.dry_run => format!("plan: {} batches", r.batches.len()),
        Phase::Applying => format!(
            "applying batch {} of {}",
            r.current_batch + 1,
            r.batches.len()
        ),
        Phase::Baking { until } => format!(
            "baking batch {} until {}",
            r.current_batch + 1,
            kt_daemon::clock::hms(*until)
        ),
        Phase::Pausing { until } => format!("pausing until {}", kt_daemon::clock::hms(*until)),
        Phase::AwaitingPromotion => "canary passed; waiting for `ktctl rollout promote`".into(),
        Phase::Paused { .. } => "paused; `ktctl rollout resume` or `abort`".into(),
        Phase::RollingBack { .. } => "returning touched gateways to their previous version".into(),
        Phase::Done(_) => String::new(),
    };
    v1::Rollout {
        id: r.id.clone(),
        state: rollout_state(r) as i32,
        spec: Some(spec_to_proto(&r.spec)),
        config: Some(config_ref(&r.config)),
        batches: r
            .batches
            .iter()
            .map(|batch| v1::RolloutBatch {
                gateways: batch
                    .iter()
                    .filter_map(|g| r.gateways.get(g).map(|p| (g, p)))
                    .map(|(g, p)| v1::RolloutTarget {
                        gateway_id: g.clone(),
                        baseline: Some(config_ref(&p.baseline)),
                        // A rollout that ended before offering a gateway anything never will.
                        state: target_state(p.state, r.is_active()) as i32,
                        error: p.error.clone(),
                    })
                    .collect(),
            })
            .collect(),
        current_batch: u32::try_from(r.current_batch).unwrap_or(u32::MAX),
        step,
        gates: r
            .gates
            .iter()
            .map(|g| v1::GateEvaluation {
                batch: u32::try_from(g.batch).unwrap_or(u32::MAX),
                gate: g.gate.clone(),
                decision: gate_decision(g.decision) as i32,
                value: g.value,
                threshold: g.threshold,
                detail: g.detail.clone(),
                at_unix_ms: g.at,
            })
            .collect(),
        history: r
            .history
            .iter()
            .map(|t| v1::RolloutTransition {
                at_unix_ms: t.at,
                what: t.what.clone(),
                by: t.by.clone(),
            })
            .collect(),
        created_by: r.created_by.clone(),
        reason: r.reason.clone(),
        created_at_unix_ms: r.created_at,
        message: r.message.clone(),
    }
}

fn rollout_state(r: &RolloutRecord) -> v1::RolloutState {
    use crate::rollout::model::Outcome;
    use v1::RolloutState as S;
    if r.dry_run {
        return S::Planned;
    }
    match &r.phase {
        Phase::Applying | Phase::Baking { .. } | Phase::Pausing { .. } => S::Running,
        Phase::AwaitingPromotion => S::AwaitingPromotion,
        Phase::Paused { .. } => S::Paused,
        Phase::RollingBack { .. } => S::RollingBack,
        Phase::Done(Outcome::Succeeded) => S::Succeeded,
        Phase::Done(Outcome::RolledBack) => S::RolledBack,
        Phase::Done(Outcome::Failed) => S::Failed,
        Phase::Done(Outcome::Aborted) => S::Aborted,
        Phase::Done(Outcome::TimedOut) => S::TimedOut,
        Phase::Done(Outcome::Superseded) => S::Superseded,
    }
}

/// A rollout that ended before offering a gateway anything never will: `not offered`.
fn target_state(state: TargetState, active: bool) -> v1::RolloutTargetState {
    use v1::RolloutTargetState as S;
    match state {
        TargetState::Pending if !active => S::NotOffered,
        TargetState::Pending => S::Pending,
        TargetState::Offered => S::Offered,
        TargetState::Applied => S::Applied,
        TargetState::Rejected => S::Rejected,
        TargetState::Failed => S::Failed,
        TargetState::Unchanged => S::Unchanged,
        TargetState::RollingBack => S::RollingBack,
        TargetState::RolledBack => S::RolledBack,
    }
}

fn gate_decision(decision: Decision) -> v1::GateDecision {
    match decision {
        Decision::Passed => v1::GateDecision::Passed,
        Decision::Failed => v1::GateDecision::Failed,
        Decision::Inconclusive => v1::GateDecision::Inconclusive,
    }
}
