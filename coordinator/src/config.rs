//! The coordinator's config file, parsed strictly and validated into typed values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kt_proto::identity::GatewayId;
use kt_proto::tls::TlsFiles;
use kt_proto::yaml::{ConfigFileError, read_yaml_file};
use serde::Deserialize;

/// `coordinator.yaml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where agents and operators connect.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// Where the coordinator keeps its state.
    pub data_dir: PathBuf,
    /// The groups file (`groups: {name: {gateways: [...], config_source: ...}}`).
    #[serde(default)]
    pub groups_file: Option<PathBuf>,
    #[serde(default)]
    pub liveness: LivenessConfig,
    #[serde(default)]
    pub events: EventsConfig,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP, read-only); none when unset.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Limits on incoming connections and their TLS handshakes.
    #[serde(default)]
    pub connections: kt_proto::conn::ConnectionLimits,
}

/// How long and how many decision events the coordinator keeps for `--since` and stats.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    pub max_events: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention: Duration::from_secs(24 * 3600),
            max_events: 5_000_000,
        }
    }
}

/// How the coordinator judges agent liveness; all durations like `15s` or `2m`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// The heartbeat interval assigned to agents in the welcome.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long: `unreachable`.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// No heartbeat for this long: `disconnected`.
    #[serde(with = "humantime_serde")]
    pub disconnected_after: Duration,
    /// No heartbeat for this long: `gone`.
    #[serde(with = "humantime_serde")]
    pub gone_after: Duration,
    /// Announced in the welcome: an agent that loses its session waits a random delay up to
    /// this long before reconnecting, so a coordinator restart is not met by every agent at once.
    #[serde(with = "humantime_serde")]
    pub reconnect_spread: Duration,
}

fn default_reconnect_spread() -> Duration {
    Duration::from_secs(5)
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat_interval: Duration::from_secs(15),
            unreachable_after: Duration::from_secs(45),
            disconnected_after: Duration::from_secs(120),
            gone_after: Duration::from_secs(24 * 3600),
            reconnect_spread: default_reconnect_spread(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 41001))
}

impl CoordinatorConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: CoordinatorConfig = read_yaml_file(path)?;
        config.resolve_paths(path);
        config.validate(path)?;
        Ok(config)
    }

    /// Relative paths in the file are relative to the file's directory, as operators expect.
    fn resolve_paths(&mut self, path: &Path) {
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.data_dir,
        ] {
            *p = base.join(&*p);
        }
        if let Some(groups) = &mut self.groups_file {
            *groups = base.join(&*groups);
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigFileError> {
        let l = &self.liveness;
        if l.heartbeat_interval < Duration::from_millis(50) {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.heartbeat_interval",
                "must be at least 50ms",
            ));
        }
        if l.unreachable_after <= l.heartbeat_interval {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.unreachable_after",
                "must be longer than liveness.heartbeat_interval",
            ));
        }
        if l.disconnected_after <= l.unreachable_after {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.disconnected_after",
                "must be longer than liveness.unreachable_after",
            ));
        }
        if l.gone_after <= l.disconnected_after {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.gone_after",
                "must be longer than liveness.disconnected_after",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroupsFile {
    groups: BTreeMap<String, RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    gateways: Vec<String>,
    /// Gateways whose labels all match are members too.
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    config_source: Option<PathBuf>,
}

/// A named set of gateways (listed, or matched by labels) and the config they should run.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub gateways: Vec<GatewayId>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub config_source: Option<PathBuf>,
}

impl Group {
    /// Whether a gateway with these labels belongs to this group.
    pub fn contains<'a>(&self, gateway: &str, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.gateways.iter().any(|g| g.as_str() == gateway)
            || (!self.selector.is_empty()
                && self
                    .selector
                    .iter()
                    .all(|(k, v)| label(k) == Some(v.as_str())))
    }
}

/// Loads a groups file; every gateway id must be valid.
pub fn load_groups(path: &Path) -> Result<Vec<Group>, ConfigFileError> {
    let raw: RawGroupsFile = read_yaml_file(path)?;
    groups_from_raw(path, raw)
}

/// Parses groups sent by an operator (`ktctl groups apply`); `source` names them in errors.
pub fn parse_groups(source: &Path, text: &str) -> Result<Vec<Group>, ConfigFileError> {
    let raw: RawGroupsFile = kt_proto::yaml::parse_yaml(source, text)?;
    groups_from_raw(source, raw)
}

fn groups_from_raw(path: &Path, raw: RawGroupsFile) -> Result<Vec<Group>, ConfigFileError> {
    let base = path.parent().unwrap_or(Path::new("."));
    raw.groups
        .into_iter()
        .map(|(name, group)| {
            let gateways = group
                .gateways
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    GatewayId::new(id).map_err(|e| {
                        ConfigFileError::invalid(
                            path,
                            format!("groups.{name}.gateways[{i}]"),
                            e.to_string(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            if let Err(why) = GatewayId::new(&name) {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("groups.{name}"),
                    format!("invalid group name: {why}"),
                ));
            }
            Ok(Group {
                gateways,
                selector: group.selector,
                config_source: group.config_source.map(|p| base.join(p)),
                name,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.yaml",
            "tls: {ca: ca.crt, cert: c.crt, key: c.key}\ndata_dir: data\n",
        );
        let config = CoordinatorConfig::load(&path).expect("valid");
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.data_dir, dir.path().join("data"));
        assert_eq!(config.liveness, LivenessConfig::default());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.yaml",
            "tls: {ca: a, cert: b, key: c}\ndata_dir: d\nliveness:\n  heartbeat: 1s\n",
        );
        let msg = CoordinatorConfig::load(&path)
            .expect_err("unknown key")
            .to_string();
        assert!(msg.contains("c.yaml"), "{msg}");
        assert!(msg.contains("heartbeat"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn liveness_order_is_enforced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.yaml",
            "tls: {ca: a, cert: b, key: c}\ndata_dir: d\nliveness: {heartbeat_interval: 10s, unreachable_after: 5s}\n",
        );
        let msg = CoordinatorConfig::load(&path)
            .expect_err("bad order")
            .to_string();
        assert!(msg.contains("liveness.unreachable_after"), "{msg}");
    }

    #[test]
    fn groups_file_parses_and_rejects_bad_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "groups.yaml",
            "groups:\n  production:\n    gateways: [gw-prod-01, gw-prod-02]\n    config_source: policies/production.yaml\n  eu:\n    gateways: [gw-eu-01]\n",
        );
        let groups = load_groups(&path).expect("valid");
        assert_eq!(groups.len(), 2);
        let prod = groups
            .iter()
            .find(|g| g.name == "production")
            .expect("production");
        assert_eq!(prod.gateways.len(), 2);
        assert_eq!(
            prod.config_source,
            Some(dir.path().join("policies/production.yaml"))
        );

        let bad = write(
            dir.path(),
            "bad.yaml",
            "groups:\n  x:\n    gateways: [Not_Valid]\n",
        );
        let msg = load_groups(&bad).expect_err("bad id").to_string();
        assert!(msg.contains("groups.x.gateways[0]"), "{msg}");
    }
}
