//! A rollout's durable record: everything needed to resume it after a restart, with absolute
//! deadlines (Unix milliseconds), so time spent down counts as time passed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigId {
    pub version: String,
    pub hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Group(String),
    Selector(BTreeMap<String, String>),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Group(g) => write!(f, "group {g}"),
            Target::Selector(s) => {
                let parts: Vec<String> = s.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "selector {}", parts.join(","))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Rolling,
    Canary { auto_promote: bool },
    AllAtOnce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Count(u32),
    Percent(u32),
}

impl Size {
    /// How many of `total` gateways one batch holds (at least one).
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            Size::Count(n) => n as usize,
            Size::Percent(p) => (total * p as usize).div_ceil(100),
        };
        n.clamp(1, total.max(1))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub target: Target,
    pub strategy: Strategy,
    pub size: Size,
    pub pause_between_ms: u64,
    pub min_healthy_time_ms: u64,
    pub apply_deadline_ms: u64,
    pub progress_deadline_ms: u64,
    /// The verdict-mix gate, when set.
    pub max_block_rate_delta: Option<f64>,
    /// The error-rate gate, when set: the largest fraction of 5xx answers in a bake.
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    pub min_sample: u64,
    pub continue_on_inconclusive: bool,
    pub rollback_on_error: bool,
}

/// Where one gateway is in the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Pending,
    Offered,
    Applied,
    /// Refused before anything changed; never offered again by this rollout.
    Rejected,
    /// Applied, then reverted by the agent.
    Failed,
    /// Already ran the version when the rollout started.
    Unchanged,
    RollingBack,
    RolledBack,
}

impl TargetState {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Offered => "offered",
            TargetState::Applied => "applied",
            TargetState::Rejected => "rejected",
            TargetState::Failed => "failed",
            TargetState::Unchanged => "unchanged",
            TargetState::RollingBack => "rolling_back",
            TargetState::RolledBack => "rolled_back",
        }
    }

    /// Whether the rollout may have changed what this gateway runs.
    pub fn touched(self) -> bool {
        matches!(
            self,
            TargetState::Offered
                | TargetState::Applied
                | TargetState::Failed
                | TargetState::RollingBack
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayProgress {
    pub baseline: ConfigId,
    pub state: TargetState,
    pub error: String,
    /// The offer in flight, and when it was sent.
    pub offer_id: Option<String>,
    pub offered_at: Option<u64>,
    pub offers_sent: u32,
}

/// What the rollout does now. Timed steps carry absolute deadlines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Applying,
    Baking {
        until: u64,
    },
    Pausing {
        until: u64,
    },
    AwaitingPromotion,
    /// Waiting for a human; `resume` is where `resume` goes.
    Paused {
        resume: Box<Phase>,
    },
    /// Returning touched gateways to their baselines; then the rollout ends as `then`.
    RollingBack {
        then: Outcome,
    },
    Done(Outcome),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    RolledBack,
    Failed,
    Aborted,
    TimedOut,
    Superseded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::RolledBack => "rolled_back",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
            Outcome::TimedOut => "timed_out",
            Outcome::Superseded => "superseded",
        }
    }
}

/// What a gate decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Passed,
    Failed,
    /// No evidence either way: too few requests, a gateway nobody observed.
    Inconclusive,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Passed => "passed",
            Decision::Failed => "failed",
            Decision::Inconclusive => "inconclusive",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    pub batch: usize,
    pub gate: String,
    pub decision: Decision,
    pub value: f64,
    pub threshold: f64,
    pub detail: String,
    pub at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at: u64,
    pub what: String,
    pub by: String,
}

/// Verdict counters at the start of a bake, per gateway: the gate reads deltas from them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: u64,
    pub block: u64,
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub errors: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub number: u64,
    pub id: String,
    pub spec: Spec,
    pub config: ConfigId,
    pub batches: Vec<Vec<String>>,
    pub gateways: BTreeMap<String, GatewayProgress>,
    pub phase: Phase,
    pub current_batch: usize,
    pub progress_deadline: u64,
    pub bake_counts: BTreeMap<String, Counts>,
    pub gates: Vec<GateRecord>,
    pub history: Vec<Transition>,
    pub created_by: String,
    pub reason: String,
    pub created_at: u64,
    pub message: String,
    /// A plan shown by `--dry-run`, never stored nor run.
    #[serde(default)]
    pub dry_run: bool,
    /// Offers go out marked as rollbacks (`ktctl rollout undo`): a lower version is accepted.
    #[serde(default)]
    pub rollback: bool,
    /// How many batches passed their gates: their gateways' desired config is the rollout's.
    #[serde(default)]
    pub passed_batches: usize,
    /// Every offer of the current step was answered; waiting for the gateways to report the
    /// config running and healthy (said once in the history).
    #[serde(default)]
    pub confirming: bool,
    /// What started it when no operator did (a group's config source).
    #[serde(default)]
    pub source: Option<String>,
}

impl RolloutRecord {
    pub fn is_active(&self) -> bool {
        !matches!(self.phase, Phase::Done(_))
    }

    pub fn state_name(&self) -> &'static str {
        if self.dry_run {
            return "planned";
        }
        match &self.phase {
            Phase::Applying | Phase::Baking { .. } | Phase::Pausing { .. } => "running",
            Phase::AwaitingPromotion => "awaiting_promotion",
            Phase::Paused { .. } => "paused",
            Phase::RollingBack { .. } => "rolling_back",
            Phase::Done(outcome) => outcome.as_str(),
        }
    }

    pub fn record(&mut self, at: u64, by: &str, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(rollout = %self.id, %by, "{what}");
        self.history.push(Transition {
            at,
            what,
            by: by.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes() {
        assert_eq!(Size::Count(1).of(3), 1);
        assert_eq!(Size::Count(5).of(3), 3);
        assert_eq!(Size::Percent(50).of(3), 2);
        assert_eq!(Size::Percent(1).of(3), 1);
        assert_eq!(Size::Percent(100).of(10), 10);
        assert_eq!(Size::Count(0).of(4), 1);
    }
}
