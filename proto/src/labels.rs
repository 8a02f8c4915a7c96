//! Lowercase names of protocol enums, as logs, metrics labels and the CLI show them.

use crate::v1::{
    AgentState, ConfigPhase, GateDecision, HealthStatus, RolloutState, RolloutTargetState,
};

impl AgentState {
    pub fn label(self) -> &'static str {
        match self {
            AgentState::Connected => "connected",
            AgentState::Unreachable => "unreachable",
            AgentState::Disconnected => "disconnected",
            AgentState::Gone => "gone",
            AgentState::Unspecified => "unknown",
        }
    }
}

impl HealthStatus {
    pub fn label(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
            HealthStatus::Unspecified => "unknown",
        }
    }
}

impl ConfigPhase {
    pub fn label(self) -> &'static str {
        match self {
            ConfigPhase::Applied => "applied",
            ConfigPhase::Rejected => "rejected",
            ConfigPhase::Failed => "failed",
            ConfigPhase::Superseded => "superseded",
            ConfigPhase::StaleEpoch => "stale_epoch",
            ConfigPhase::Unspecified => "unknown",
        }
    }

    /// The label of a phase as carried on the wire (an unknown number is "unknown").
    pub fn label_of(phase: i32) -> &'static str {
        ConfigPhase::try_from(phase).map_or("unknown", ConfigPhase::label)
    }
}

impl RolloutState {
    pub fn label(self) -> &'static str {
        match self {
            RolloutState::Planned => "planned",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::AwaitingPromotion => "awaiting_promotion",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::Succeeded => "succeeded",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Failed => "failed",
            RolloutState::Aborted => "aborted",
            RolloutState::TimedOut => "timed_out",
            RolloutState::Superseded => "superseded",
            RolloutState::Unspecified => "unknown",
        }
    }
}

impl RolloutTargetState {
    pub fn label(self) -> &'static str {
        match self {
            RolloutTargetState::Pending => "pending",
            RolloutTargetState::Offered => "offered",
            RolloutTargetState::Applied => "applied",
            RolloutTargetState::Rejected => "rejected",
            RolloutTargetState::Failed => "failed",
            RolloutTargetState::Unchanged => "unchanged",
            RolloutTargetState::RollingBack => "rolling_back",
            RolloutTargetState::RolledBack => "rolled_back",
            RolloutTargetState::NotOffered => "not_offered",
            RolloutTargetState::Unspecified => "unknown",
        }
    }
}

impl GateDecision {
    pub fn label(self) -> &'static str {
        match self {
            GateDecision::Passed => "passed",
            GateDecision::Failed => "failed",
            GateDecision::Inconclusive => "inconclusive",
            GateDecision::Unspecified => "unknown",
        }
    }
}
