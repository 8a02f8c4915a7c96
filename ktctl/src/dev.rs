//! The local dev fleet: layout, config files and the processes `ktctl dev` starts and stops.
//!
//! Everything lives in one directory (by default under the user's state directory, see
//! [`default_dir`]): the PKI, each process's config and log, `dev.json` (the processes
//! started, with their pids) and `ktctl.yaml`. Processes are stopped by their recorded pid,
//! and only after checking that the pid still runs the binary that was started.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub use kt_launch::configs::{
    AgentConfig, AgentSpec, EXAMPLE_POLICY, EnrollmentSettings, EtcdStorage, Liveness,
    MOCK_PROVIDER_SECRET, NatsEvents, Storage, agent, agent_config, coordinator,
    coordinator_config, enroll_on_first_boot, example_policy, groups_file, to_yaml,
};
pub use kt_launch::process::{
    find_binary, free_loopback_addr, is_running, log_tail, spawn, stop, wait_ready,
};

pub const KTCTL_CONFIG_FILE: &str = "ktctl.yaml";
pub const STATE_FILE: &str = "dev.json";
pub const DEV_GROUP: &str = "dev";
pub const DEV_OPERATOR: &str = "dev";

/// The default dev fleet directory: `$XDG_STATE_HOME/kt-fleet/dev`, else
/// `~/.local/state/kt-fleet/dev`.
pub fn default_dir() -> PathBuf {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(state).join("kt-fleet").join("dev");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/kt-fleet/dev"),
        None => std::env::temp_dir().join("kt-fleet-dev"),
    }
}

/// The file naming the dev fleet `dev up` started last, so that plain `ktctl` (and `dev status`,
/// `dev down`) find a fleet started with `--dir` too; like kubectl's current context.
fn current_pointer() -> PathBuf {
    default_dir().with_file_name("current-dev-fleet")
}

/// The directory of the dev fleet `dev up` started last, if it still has one.
pub fn current_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string(current_pointer()).ok()?;
    let dir = PathBuf::from(text.trim());
    DevState::path(&dir).is_file().then_some(dir)
}

/// Records `dir` as the current dev fleet.
pub fn set_current(dir: &Path) -> std::io::Result<()> {
    let pointer = current_pointer();
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(pointer, format!("{}\n", dir.display()))
}

/// Forgets `dir` as the current dev fleet, if it is.
pub fn clear_current(dir: &Path) {
    if current_dir().is_some_and(|current| current == dir) {
        let _ = std::fs::remove_file(current_pointer());
    }
}

/// The three process kinds of a fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Debian's etcd, for `dev up --ha`.
    Etcd,
    /// Debian's nats-server, one per region, for `dev up --ha`.
    Nats,
    Coordinator,
    /// The mock LLM provider (`kt-gateway mock-provider`).
    Provider,
    Gateway,
    Agent,
}

impl Role {
    pub fn binary(self) -> &'static str {
        match self {
            Role::Etcd => "etcd",
            Role::Nats => "nats-server",
            Role::Coordinator => "kt-coordinator",
            Role::Provider | Role::Gateway => "kt-gateway",
            Role::Agent => "kt-agent",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Etcd => "etcd",
            Role::Nats => "nats",
            Role::Coordinator => "coordinator",
            Role::Provider => "provider",
            Role::Gateway => "gateway",
            Role::Agent => "agent",
        }
    }
}

/// One process `ktctl dev up` started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevProcess {
    pub role: Role,
    /// The gateway id, for gateways and agents.
    pub id: Option<String>,
    pub pid: u32,
    /// The listen address, for processes that listen.
    pub address: Option<String>,
    pub binary: PathBuf,
    pub log: PathBuf,
}

/// `dev.json`: what was started, in start order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevState {
    pub processes: Vec<DevProcess>,
}

impl DevState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// `Ok(None)` when no dev fleet was started in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is corrupt", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Written after every start, so a failed `dev up` can still be cleaned up by `dev down`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        kt_daemon::fs::write_atomic(&path, &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(DevState::load(dir.path()).expect("load"), None);
        let state = DevState {
            processes: vec![DevProcess {
                role: Role::Gateway,
                id: Some("gw-dev-01".into()),
                pid: 42,
                address: Some("127.0.0.1:1".into()),
                binary: "/bin/true".into(),
                log: "x.log".into(),
            }],
        };
        state.save(dir.path()).expect("save");
        assert_eq!(DevState::load(dir.path()).expect("load"), Some(state));
        std::fs::write(DevState::path(dir.path()), "{").expect("corrupt");
        assert!(DevState::load(dir.path()).is_err());
    }
}
