//! How gateways are shown: one row type for the table and for `-o json|yaml`.

use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use kt_proto::v1::{AgentState, GatewayState, HealthStatus};
use serde::Serialize;

/// Output formats shared by the listing verbs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// One gateway as an operator reads it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GatewayRow {
    pub gateway: String,
    pub groups: Vec<String>,
    pub region: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// connected | unreachable | disconnected | gone
    pub agent: &'static str,
    /// healthy | degraded | unhealthy | unknown (unknown whenever the agent is not connected)
    pub status: &'static str,
    pub config_version: Option<String>,
    pub config_hash: Option<String>,
    /// The config the coordinator wants it to run (its pin, or what rollouts settled).
    pub desired_version: Option<String>,
    pub desired_hash: Option<String>,
    /// in_sync | converging | drifted | unknown
    pub sync: &'static str,
    /// RFC 3339 time since when it drifted, when it does.
    pub drifted_since: Option<String>,
    /// The rollout (or "reconcile") moving it, while one does.
    pub converging_by: Option<String>,
    pub pinned: bool,
    /// The coordinator replica holding the agent's session (replicated control planes).
    pub replica: Option<String>,
    pub last_reload_error: Option<String>,
    pub providers_reachable: usize,
    pub providers_total: usize,
    pub requests_processed: u64,
    /// RFC 3339 time of the last heartbeat, or null when never seen.
    pub last_seen: Option<String>,
    pub last_seen_seconds_ago: Option<u64>,
    pub agent_version: String,
    pub error: Option<String>,
    /// Set when sessions of two agent processes keep replacing each other: two agents use
    /// this gateway's certificate.
    pub duplicate_agent: Option<String>,
    /// RFC 3339 expiry of the certificate the agent connected with last, when known.
    pub agent_cert_not_after: Option<String>,
    /// RFC 3339 start of that certificate's validity, when known.
    pub agent_cert_not_before: Option<String>,
    /// The coordinator's last refusal of a renewal, since the last renewal.
    pub renewal_refused: Option<String>,
    /// Set when the agent identity is revoked (`ktctl agent revoke`); `agent` then says
    /// `revoked`.
    pub revoked: Option<RevokedView>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RevokedView {
    pub at: String,
    pub by: String,
    pub reason: String,
}

impl GatewayRow {
    pub fn from_state(state: &GatewayState, now_unix_ms: u64) -> Self {
        let agent = AgentState::try_from(state.agent_state).unwrap_or(AgentState::Unspecified);
        let health = state.health.as_ref();
        let status = match (agent, health) {
            (AgentState::Connected, Some(h)) => {
                HealthStatus::try_from(h.status).map_or("unknown", HealthStatus::label)
            }
            _ => "unknown",
        };
        let config = health.and_then(|h| h.config.as_ref());
        let non_empty = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        let last_seen_ms = Some(state.last_heartbeat_unix_ms).filter(|ms| *ms > 0);
        GatewayRow {
            gateway: state.gateway_id.clone(),
            groups: state.groups.clone(),
            region: state.labels.get("region").cloned(),
            labels: state.labels.clone().into_iter().collect(),
            agent: if state.revoked.is_some() {
                "revoked"
            } else {
                agent.label()
            },
            status,
            config_version: config.and_then(|c| non_empty(&c.version)),
            config_hash: config.and_then(|c| non_empty(&c.hash)),
            desired_version: state.desired.as_ref().and_then(|d| non_empty(&d.version)),
            desired_hash: state.desired.as_ref().and_then(|d| non_empty(&d.hash)),
            sync: sync_label(state.sync),
            drifted_since: Some(state.drifted_since_unix_ms)
                .filter(|ms| *ms > 0)
                .map(kt_daemon::clock::rfc3339),
            converging_by: non_empty(&state.converging_by),
            pinned: state.pinned,
            replica: non_empty(&state.replica),
            last_reload_error: config.and_then(|c| non_empty(&c.last_reload_error)),
            providers_reachable: health
                .map_or(0, |h| h.providers.values().filter(|p| p.reachable).count()),
            providers_total: health.map_or(0, |h| h.providers.len()),
            requests_processed: health.map_or(0, |h| h.requests_processed),
            last_seen: last_seen_ms.map(kt_daemon::clock::rfc3339),
            agent_cert_not_after: Some(state.agent_cert_not_after_unix_ms)
                .filter(|ms| *ms > 0)
                .map(kt_daemon::clock::rfc3339),
            agent_cert_not_before: Some(state.agent_cert_not_before_unix_ms)
                .filter(|ms| *ms > 0)
                .map(kt_daemon::clock::rfc3339),
            renewal_refused: non_empty(&state.renewal_refused),
            revoked: state.revoked.as_ref().map(|r| RevokedView {
                at: kt_daemon::clock::rfc3339(r.revoked_unix_ms),
                by: r.revoked_by.clone(),
                reason: r.reason.clone(),
            }),
            last_seen_seconds_ago: last_seen_ms.map(|ms| now_unix_ms.saturating_sub(ms) / 1000),
            agent_version: state.agent_version.clone(),
            error: health.and_then(|h| non_empty(&h.error)),
            duplicate_agent: duplicate_agent(state),
        }
    }

    /// Healthy and connected: what `gateway health` gates its exit code on.
    pub fn is_ok(&self) -> bool {
        self.agent == "connected" && self.status == "healthy" && self.duplicate_agent.is_none()
    }

    /// `1.0.0 (abc123)`: what it runs.
    pub fn config_human(&self) -> String {
        match (&self.config_version, &self.config_hash) {
            (Some(v), Some(h)) => format!("{v} ({})", short_hash(h)),
            (Some(v), None) => v.clone(),
            _ => "-".into(),
        }
    }

    /// `1.1.0 (def456)`, `pinned` marked: what it should run.
    pub fn desired_human(&self) -> String {
        let pinned = if self.pinned { " pinned" } else { "" };
        match (&self.desired_version, &self.desired_hash) {
            (Some(v), Some(h)) => format!("{v} ({}){pinned}", short_hash(h)),
            _ => "-".into(),
        }
    }

    /// `in sync`, `converging (r-3)`, `drifted`.
    pub fn sync_human(&self) -> String {
        match (self.sync, &self.converging_by) {
            ("converging", Some(by)) => format!("converging ({by})"),
            (sync, _) => sync.replace('_', " "),
        }
    }

    pub fn last_seen_human(&self) -> String {
        match self.last_seen_seconds_ago {
            None => "never".into(),
            Some(s) if s < 120 => format!("{s}s ago"),
            Some(s) if s < 7200 => format!("{}m ago", s / 60),
            Some(s) => format!("{}h ago", s / 3600),
        }
    }
}

pub fn sync_label(sync: i32) -> &'static str {
    use kt_proto::v1::SyncState;
    match SyncState::try_from(sync) {
        Ok(SyncState::InSync) => "in_sync",
        Ok(SyncState::Converging) => "converging",
        Ok(SyncState::Drifted) => "drifted",
        _ => "unknown",
    }
}

/// What to say when two agents seem to use one gateway's certificate.
pub fn duplicate_agent(state: &GatewayState) -> Option<String> {
    (state.session_replacements >= kt_proto::identity::DUPLICATE_AGENT_REPLACEMENTS).then(|| {
        format!(
            "two agents seem to use this gateway's certificate: sessions from {} replaced each other {} times in the last 10 min",
            state.replacement_peers.join(", "),
            state.session_replacements
        )
    })
}

/// A table without borders, in the style of kubectl.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header(header.iter().map(Cell::new));
    table
}

pub fn short_hash(hash: &str) -> String {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    hex.chars().take(12).collect()
}

/// Prints `value` as pretty JSON or YAML.
pub fn print_structured<T: Serialize>(value: &T, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        Output::Table => anyhow::bail!("a table is not a structured output"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kt_proto::v1::{ConfigInfo, GatewayHealth, ProviderHealth};

    use super::*;

    fn state(agent: AgentState, status: HealthStatus) -> GatewayState {
        GatewayState {
            gateway_id: "gw-1".into(),
            labels: [("region".to_owned(), "eu".to_owned())]
                .into_iter()
                .collect(),
            groups: vec!["prod".into()],
            agent_state: agent as i32,
            last_heartbeat_unix_ms: 1_700_000_000_000,
            health: Some(GatewayHealth {
                status: status as i32,
                reachable: true,
                config: Some(ConfigInfo {
                    version: "1.0.0".into(),
                    hash: "sha256:abc".into(),
                    ..Default::default()
                }),
                providers: [
                    (
                        "a".to_owned(),
                        ProviderHealth {
                            reachable: true,
                            latency_ms: 1.0,
                        },
                    ),
                    (
                        "b".to_owned(),
                        ProviderHealth {
                            reachable: false,
                            latency_ms: 0.0,
                        },
                    ),
                ]
                .into_iter()
                .collect(),
                requests_processed: 42,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn connected_healthy_row() {
        let row = GatewayRow::from_state(
            &state(AgentState::Connected, HealthStatus::Healthy),
            1_700_000_005_000,
        );
        assert!(row.is_ok());
        assert_eq!(row.region.as_deref(), Some("eu"));
        assert_eq!((row.providers_reachable, row.providers_total), (1, 2));
        assert_eq!(row.last_seen_seconds_ago, Some(5));
        assert_eq!(row.last_seen.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert_eq!(row.config_version.as_deref(), Some("1.0.0"));
    }

    #[test]
    fn not_connected_means_unknown_status_and_not_ok() {
        let row = GatewayRow::from_state(&state(AgentState::Unreachable, HealthStatus::Healthy), 0);
        assert_eq!(row.status, "unknown");
        assert!(!row.is_ok());
        let row = GatewayRow::from_state(&state(AgentState::Connected, HealthStatus::Unhealthy), 0);
        assert!(!row.is_ok());
    }
}
