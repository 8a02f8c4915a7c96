//! Lowercase names of protocol enums, as logs, metrics labels and the CLI show them.

use crate::v1::{AgentState, ConfigPhase, HealthStatus};

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
            ConfigPhase::Unspecified => "unknown",
        }
    }

    /// The label of a phase as carried on the wire (an unknown number is "unknown").
    pub fn label_of(phase: i32) -> &'static str {
        ConfigPhase::try_from(phase).map_or("unknown", ConfigPhase::label)
    }
}
