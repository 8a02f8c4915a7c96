//! The daemons' config files, written by serialising their own config types (so a field that
//! changes there cannot be written wrong here), and the example policy a local fleet runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use kt_agent::config::AgentConfig;
pub use kt_agent::config::EnrollmentSettings;
use kt_agent::config::{
    CoordinatorSettings, EventsSettings, GatewaySettings, ReconnectSettings, ReloadSettings,
};
use kt_coordinator::config::{
    CoordinatorConfig, EnrollmentConfig, EventsConfig, GroupSpec, GroupsFile, IssuingCaFiles,
    LivenessConfig,
};
pub use kt_coordinator::config::{EtcdStorage, NatsEvents, Storage};
use kt_proto::tls::TlsFiles;

/// Liveness settings written into a coordinator config.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub heartbeat_interval: Duration,
    pub unreachable_after: Duration,
    pub disconnected_after: Duration,
}

impl Liveness {
    /// Snappy settings for a local fleet: a dead agent shows within seconds.
    pub const DEV: Liveness = Liveness {
        heartbeat_interval: Duration::from_secs(1),
        unreachable_after: Duration::from_secs(3),
        disconnected_after: Duration::from_secs(10),
    };
}

/// YAML text of a config value.
pub fn to_yaml<T: serde::Serialize>(value: &T) -> String {
    serde_yaml::to_string(value).unwrap_or_else(|e| format!("# cannot be written: {e}\n"))
}

/// The TLS files of `name` (`coordinator`, `agent-<id>`, ...) in a directory of PEM files.
fn tls_files(pki: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: pki.join("ca.crt"),
        cert: pki.join(format!("{name}.crt")),
        key: pki.join(format!("{name}.key")),
    }
}

/// A coordinator's config: listening on `listen`, its state in `data_dir`.
pub fn coordinator(
    listen: SocketAddr,
    pki: &Path,
    data_dir: &Path,
    groups_file: &Path,
    liveness: Liveness,
) -> CoordinatorConfig {
    CoordinatorConfig {
        listen,
        tls: tls_files(pki, "coordinator"),
        data_dir: data_dir.to_owned(),
        groups_file: Some(groups_file.to_owned()),
        liveness: LivenessConfig {
            heartbeat_interval: liveness.heartbeat_interval,
            unreachable_after: liveness.unreachable_after,
            disconnected_after: liveness.disconnected_after,
            reconnect_spread: liveness.heartbeat_interval,
            ..LivenessConfig::default()
        },
        events: EventsConfig::default(),
        metrics_listen: None,
        connections: Default::default(),
        storage: Default::default(),
        enrollment: enrollment(pki),
    }
}

/// Enrollment by the issuing CA of a two-tier PKI (`pki::init`); none with a single CA.
fn enrollment(pki: &Path) -> Option<EnrollmentConfig> {
    let (cert, key) = (
        pki.join(crate::pki::ISSUING_CERT),
        pki.join(crate::pki::ISSUING_KEY),
    );
    key.exists().then(|| EnrollmentConfig {
        issuing_ca: IssuingCaFiles { cert, key },
        agent_cert_ttl: Duration::from_secs(24 * 3600),
    })
}

/// `coordinator.yaml` text.
pub fn coordinator_config(
    listen: SocketAddr,
    pki: &Path,
    data_dir: &Path,
    groups_file: &Path,
    liveness: Liveness,
) -> String {
    to_yaml(&coordinator(listen, pki, data_dir, groups_file, liveness))
}

/// `groups.yaml` text with one group listing `gateways`.
pub fn groups_file(group: &str, gateways: &[String]) -> String {
    let spec = GroupSpec {
        gateways: gateways.to_vec(),
        ..GroupSpec::default()
    };
    to_yaml(&GroupsFile {
        groups: BTreeMap::from([(group.to_owned(), spec)]),
    })
}

/// What an agent config says.
#[derive(Clone, Debug)]
pub struct AgentSpec<'a> {
    pub gateway_id: &'a str,
    pub coordinator: SocketAddr,
    /// Other coordinator replicas, tried in turn after `coordinator`.
    pub more_coordinators: &'a [SocketAddr],
    pub pki: &'a Path,
    /// The gateway's listen address: health at `/health`, reload at `/admin/reload`.
    pub gateway: SocketAddr,
    pub health_interval: Duration,
    pub labels: &'a [(&'a str, &'a str)],
    /// The gateway's config file, which the agent then manages (offers are applied to it).
    pub config_path: Option<&'a Path>,
    /// The `kt-gateway` binary whose `validate` checks offered configs.
    pub validator: &'a Path,
    /// The gateway's decision events file, which the agent then forwards.
    pub events_file: Option<&'a Path>,
    /// Where the gateway writes its probe token (`--probe-token-file`).
    pub probe_token_file: Option<&'a Path>,
    /// The agent's event buffer bound (its default when `None`).
    pub max_buffered_events: Option<u64>,
    pub state_dir: &'a Path,
    /// Where the agent serves `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// Where a launched gateway reads its shadow config (`--shadow-config`): beside its config.
pub fn shadow_config_path(config_path: &Path) -> PathBuf {
    config_path.with_file_name("shadow-config.yaml")
}

/// An agent's config. It reaches the coordinator by IP and checks its IP SAN.
pub fn agent(spec: &AgentSpec<'_>) -> AgentConfig {
    let validator: PathBuf =
        std::fs::canonicalize(spec.validator).unwrap_or_else(|_| spec.validator.to_owned());
    let managed = spec.config_path.is_some();
    AgentConfig {
        coordinator: CoordinatorSettings {
            endpoints: std::iter::once(&spec.coordinator)
                .chain(spec.more_coordinators)
                .map(|addr| format!("https://{addr}"))
                .collect(),
            server_name: None,
        },
        tls: tls_files(spec.pki, &format!("agent-{}", spec.gateway_id)),
        gateway: GatewaySettings {
            health_url: format!("http://{}/health", spec.gateway),
            health_interval: spec.health_interval,
            health_timeout: Duration::from_secs(2),
            events_file: spec.events_file.map(Path::to_owned),
            config_path: spec.config_path.map(Path::to_owned),
            shadow_config_path: spec.config_path.map(shadow_config_path),
            validate_command: if managed {
                vec![
                    validator.display().to_string(),
                    "validate".into(),
                    "{file}".into(),
                ]
            } else {
                Vec::new()
            },
            reload: managed.then(|| ReloadSettings {
                url: Some(format!("http://{}/admin/reload", spec.gateway)),
                ..ReloadSettings::default()
            }),
            api_url: None,
            probe_token_file: spec.probe_token_file.map(Path::to_owned),
        },
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        reconnect: ReconnectSettings {
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        },
        state_dir: Some(spec.state_dir.to_owned()),
        events: EventsSettings {
            max_buffered_events: spec
                .max_buffered_events
                .unwrap_or(EventsSettings::default().max_buffered_events),
            ..EventsSettings::default()
        },
        metrics_listen: spec.metrics_listen,
        enrollment: None,
    }
}

/// Makes `config` an agent's that enrolls at first boot with `token` (written, private, to
/// `dir/join-token`), pinning the root `root_fingerprint`; its certificate files go to
/// `dir/tls/`, not there yet.
pub fn enroll_on_first_boot(
    config: &mut AgentConfig,
    dir: &Path,
    token: &str,
    root_fingerprint: &str,
) -> std::io::Result<()> {
    let token_file = dir.join("join-token");
    std::fs::create_dir_all(dir)?;
    kt_daemon::fs::write_private(&token_file, token.as_bytes())?;
    config.tls = TlsFiles {
        ca: dir.join("tls/ca.crt"),
        cert: dir.join("tls/agent.crt"),
        key: dir.join("tls/agent.key"),
    };
    config.enrollment = Some(EnrollmentSettings {
        token_file,
        ca_fingerprint: root_fingerprint.to_owned(),
        gateway_id: None,
    });
    Ok(())
}

/// `agent.yaml` text.
pub fn agent_config(spec: &AgentSpec<'_>) -> String {
    to_yaml(&agent(spec))
}

/// The example policy config every dev gateway starts with.
pub const EXAMPLE_POLICY: &str = include_str!("../../deploy/examples/policy-config.yaml");
/// Where the example policy expects its provider.
const EXAMPLE_PROVIDER_URL: &str = "http://127.0.0.1:41003/v1";
/// The secret the example policy's provider target reads; the mock provider accepts any value.
pub const MOCK_PROVIDER_SECRET: (&str, &str) = ("MOCK_PROVIDER_KEY", "dev-not-a-secret");

/// The example policy pointed at a mock provider listening on `provider`, probed every second.
pub fn example_policy(provider: SocketAddr) -> String {
    EXAMPLE_POLICY
        .replace(EXAMPLE_PROVIDER_URL, &format!("http://{provider}/v1"))
        .replace("probe_interval: 5s", "probe_interval: 1s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_policy_points_at_the_mock_provider() {
        let text = example_policy("127.0.0.1:5555".parse().expect("addr"));
        assert!(text.contains("http://127.0.0.1:5555/v1"), "{text}");
        assert!(text.contains("probe_interval: 1s"), "{text}");
    }

    /// What is written is what the daemons read back, checked by their own loaders.
    #[test]
    fn written_configs_load_as_the_daemons_load_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = "127.0.0.1:4100".parse().expect("addr");
        let groups = dir.path().join("groups.yaml");
        std::fs::write(&groups, groups_file("dev", &["gw-1".into(), "gw-2".into()])).expect("w");
        let loaded = kt_coordinator::config::load_groups(&groups).expect("groups load");
        assert_eq!(loaded[0].gateways.len(), 2);

        let path = dir.path().join("coordinator.yaml");
        let text = coordinator_config(
            addr,
            dir.path(),
            &dir.path().join("data"),
            &groups,
            Liveness::DEV,
        );
        std::fs::write(&path, text).expect("write");
        let config = CoordinatorConfig::load(&path).expect("coordinator config loads");
        assert_eq!(config.liveness.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(config.groups_file.as_deref(), Some(groups.as_path()));

        let spec = AgentSpec {
            gateway_id: "gw-1",
            more_coordinators: &[],
            coordinator: addr,
            pki: dir.path(),
            gateway: addr,
            health_interval: Duration::from_millis(300),
            labels: &[("region", "eu")],
            config_path: Some(&dir.path().join("policy.yaml")),
            validator: Path::new("/bin/true"),
            events_file: None,
            probe_token_file: None,
            max_buffered_events: Some(10),
            state_dir: &dir.path().join("state"),
            metrics_listen: None,
        };
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, agent_config(&spec)).expect("write");
        let config = AgentConfig::load(&path).expect("agent config loads");
        assert_eq!(config.events.max_buffered_events, 10);
        assert_eq!(config.labels["region"], "eu");
        assert!(
            config.apply_settings().is_some(),
            "the agent manages the config"
        );
    }
}
