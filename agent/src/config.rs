//! The agent's config file (`agent.yaml`), parsed strictly and validated into typed values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kt_daemon::yaml::{ConfigFileError, read_yaml_file};
use kt_proto::tls::TlsFiles;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub coordinator: CoordinatorSettings,
    pub tls: TlsFiles,
    pub gateway: GatewaySettings,
    /// Free-form labels such as `region` and `env`, sent in every hello.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub reconnect: ReconnectSettings,
    /// Where the agent keeps the previous and last-known-good configs and its event buffer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub events: EventsSettings,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP, read-only); none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The agent gets its certificate with a join token, writes it to `tls`, and renews it
    /// itself; none when certificates are issued by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<EnrollmentSettings>,
}

/// `enrollment:`: what a first boot needs to get an identity.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentSettings {
    /// The join token (`ktctl token create`), e.g. from systemd's `LoadCredential=`.
    pub token_file: PathBuf,
    /// `sha256:<hex>` of the deployment's root CA certificate (`ktctl pki fingerprint`): the
    /// only coordinator the token is sent to is one whose chain ends in it.
    pub ca_fingerprint: String,
    /// The gateway id to ask for; may be left out with a token for one gateway id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<String>,
}

/// The smallest event buffer: one event of the largest size the coordinator takes fits.
const MIN_BUFFERED_BYTES: u64 = 64 << 10;

/// Bounds of the on-disk event buffer; past them the oldest events give way to a gap record.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSettings {
    pub max_buffered_events: u64,
    /// The bodies' total size: a number of bytes or e.g. `512MiB`.
    #[serde(deserialize_with = "kt_daemon::size::deserialize")]
    pub max_buffered_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for EventsSettings {
    fn default() -> Self {
        EventsSettings {
            max_buffered_events: 1_000_000,
            max_buffered_bytes: 1 << 30,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// `https://host:port` URLs, tried in turn.
    pub endpoints: Vec<String>,
    /// The name the coordinator's certificate must carry; defaults to the endpoint's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// The gateway's health document URL, e.g. `http://127.0.0.1:41002/health`.
    pub health_url: String,
    /// How often the gateway's health is read.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    /// How long one health read may take.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub health_timeout: Duration,
    /// The gateway's decision events file (JSON lines), followed and forwarded when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_file: Option<PathBuf>,
    /// The gateway's config file. Without it the agent only reports, and refuses config offers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<PathBuf>,
    /// The gateway's shadow config file (`kt-gateway --shadow-config`): shadow offers are
    /// written there. Without it the agent refuses shadow offers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_config_path: Option<PathBuf>,
    /// The gateway's own validation, `{file}` standing for the offered config,
    /// e.g. `[kt-gateway, validate, "{file}"]`.
    #[serde(default)]
    pub validate_command: Vec<String>,
    /// How to make the gateway load a new config file: exactly one of the three.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadSettings>,
    /// Where the gateway's OpenAI-compatible API answers (synthetic probes go there), e.g.
    /// `http://127.0.0.1:41002`; defaults to the health URL's scheme, host and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// The file where the gateway writes its probe token at start (`kt-gateway
    /// --probe-token-file`): synthetic probes carry it, so the gateway keeps them out of its
    /// counters and the rollout gates'. Without it probes run as ordinary requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_token_file: Option<PathBuf>,
}

impl GatewaySettings {
    /// The gateway's API base URL, without a trailing slash.
    pub fn api_base(&self) -> String {
        self.api_url
            .clone()
            .or_else(|| crate::probe::origin(&self.health_url))
            .unwrap_or_else(|| self.health_url.clone())
            .trim_end_matches('/')
            .to_owned()
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadSettings {
    /// `POST` to this URL (kt-gateway: `http://127.0.0.1:41002/admin/reload`).
    pub url: Option<String>,
    /// Send SIGHUP to the pid in this file.
    pub pid_file: Option<PathBuf>,
    /// Run this command.
    pub command: Option<Vec<String>>,
}

/// How a reload is triggered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    Url(String),
    Signal { pid_file: PathBuf },
    Command(Vec<String>),
}

/// Everything needed to apply configs, when the agent manages its gateway's config.
#[derive(Clone, Debug)]
pub struct ApplySettings {
    pub config_path: PathBuf,
    /// Where shadow offers go; `None`: they are refused.
    pub shadow_path: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub validate_command: Vec<String>,
    pub reload: Reload,
}

/// Full-jitter exponential backoff between connection attempts.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectSettings {
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for ReconnectSettings {
    fn default() -> Self {
        ReconnectSettings {
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: AgentConfig = read_yaml_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.tls.ca,
            &mut config.tls.cert,
            &mut config.tls.key,
        ] {
            *p = base.join(&*p);
        }
        // Relative paths are relative to the config file's directory.
        let optional = [
            config.state_dir.as_mut(),
            config.gateway.config_path.as_mut(),
            config.gateway.shadow_config_path.as_mut(),
            config.gateway.events_file.as_mut(),
            config.gateway.probe_token_file.as_mut(),
            config.enrollment.as_mut().map(|e| &mut e.token_file),
        ];
        for p in optional.into_iter().flatten() {
            *p = base.join(&*p);
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigFileError> {
        // The coordinator refuses a hello with labels out of these bounds: refuse them here first.
        kt_proto::bounds::check_labels(self.labels.iter())
            .map_err(|problem| ConfigFileError::invalid(path, "labels", problem))?;
        if self.coordinator.endpoints.is_empty() {
            return Err(ConfigFileError::invalid(
                path,
                "coordinator.endpoints",
                "at least one endpoint is required",
            ));
        }
        for (i, endpoint) in self.coordinator.endpoints.iter().enumerate() {
            if !endpoint.starts_with("https://") {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("coordinator.endpoints[{i}]"),
                    format!("{endpoint:?} must be an https:// URL (agents speak mutual TLS only)"),
                ));
            }
            if host_of(endpoint).is_none() {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("coordinator.endpoints[{i}]"),
                    format!("{endpoint:?} has no host"),
                ));
            }
        }
        if !self.gateway.health_url.starts_with("http://")
            && !self.gateway.health_url.starts_with("https://")
        {
            return Err(ConfigFileError::invalid(
                path,
                "gateway.health_url",
                "must be an http(s) URL",
            ));
        }
        if self.gateway.health_interval < Duration::from_millis(50) {
            return Err(ConfigFileError::invalid(
                path,
                "gateway.health_interval",
                "must be at least 50ms",
            ));
        }
        if let Some(reload) = &self.gateway.reload {
            let set = usize::from(reload.url.is_some())
                + usize::from(reload.pid_file.is_some())
                + usize::from(reload.command.as_ref().is_some_and(|c| !c.is_empty()));
            if set != 1 {
                return Err(ConfigFileError::invalid(
                    path,
                    "gateway.reload",
                    "set exactly one of url, pid_file and command",
                ));
            }
        }
        if self.gateway.config_path.is_some()
            && (self.gateway.reload.is_none() || self.state_dir.is_none())
        {
            return Err(ConfigFileError::invalid(
                path,
                "gateway.config_path",
                "managing the gateway's config also needs gateway.reload and state_dir",
            ));
        }
        if self.gateway.events_file.is_some() && self.state_dir.is_none() {
            return Err(ConfigFileError::invalid(
                path,
                "gateway.events_file",
                "forwarding events also needs state_dir (for the event buffer)",
            ));
        }
        if self.events.max_buffered_events == 0 {
            return Err(ConfigFileError::invalid(
                path,
                "events.max_buffered_events",
                "must be positive",
            ));
        }
        if self.events.max_buffered_bytes < MIN_BUFFERED_BYTES {
            return Err(ConfigFileError::invalid(
                path,
                "events.max_buffered_bytes",
                "must be at least 64KiB (one event can be as large)",
            ));
        }
        if let Some(enrollment) = &self.enrollment {
            kt_proto::leaf::parse_fingerprint(&enrollment.ca_fingerprint)
                .map_err(|why| ConfigFileError::invalid(path, "enrollment.ca_fingerprint", why))?;
            if let Some(id) = &enrollment.gateway_id {
                kt_proto::identity::GatewayId::new(id).map_err(|why| {
                    ConfigFileError::invalid(path, "enrollment.gateway_id", why.to_string())
                })?;
            }
        }
        let r = &self.reconnect;
        if r.min_delay.is_zero() || r.max_delay < r.min_delay {
            return Err(ConfigFileError::invalid(
                path,
                "reconnect",
                "min_delay must be positive and max_delay at least min_delay",
            ));
        }
        Ok(())
    }

    /// The apply settings, when this agent manages its gateway's config.
    pub fn apply_settings(&self) -> Option<ApplySettings> {
        let reload = self.gateway.reload.as_ref()?;
        let reload = match (&reload.url, &reload.pid_file, &reload.command) {
            (Some(url), _, _) => Reload::Url(url.clone()),
            (_, Some(pid_file), _) => Reload::Signal {
                pid_file: pid_file.clone(),
            },
            (_, _, Some(command)) => Reload::Command(command.clone()),
            _ => return None,
        };
        Some(ApplySettings {
            config_path: self.gateway.config_path.clone()?,
            shadow_path: self.gateway.shadow_config_path.clone(),
            state_dir: self.state_dir.clone()?,
            validate_command: self.gateway.validate_command.clone(),
            reload,
        })
    }

    /// The TLS server name for `endpoint`.
    pub fn server_name(&self, endpoint: &str) -> String {
        self.coordinator
            .server_name
            .clone()
            .or_else(|| host_of(endpoint))
            .unwrap_or_default()
    }
}

/// The host part of `https://host:port/...` (IPv6 literals lose their brackets).
pub fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    Some(host.to_owned()).filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
coordinator:
  endpoints: [\"https://127.0.0.1:41001\"]
tls: {ca: ca.crt, cert: agent.crt, key: agent.key}
gateway:
  health_url: http://127.0.0.1:41002/health
labels: {region: eu, env: prod}
";

    fn load(text: &str) -> Result<AgentConfig, ConfigFileError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).expect("write");
        AgentConfig::load(&path)
    }

    #[test]
    fn valid_config_with_defaults() {
        let config = load(VALID).expect("valid");
        assert_eq!(config.labels["region"], "eu");
        assert_eq!(config.gateway.health_interval, Duration::from_secs(5));
        assert_eq!(config.server_name("https://127.0.0.1:41001"), "127.0.0.1");
    }

    #[test]
    fn plaintext_endpoint_and_unknown_keys_are_refused() {
        let msg = load(&VALID.replace("https://", "http://"))
            .expect_err("plaintext")
            .to_string();
        assert!(msg.contains("coordinator.endpoints[0]"), "{msg}");
        let msg = load(&format!("{VALID}colour: red\n"))
            .expect_err("unknown")
            .to_string();
        assert!(msg.contains("colour") && msg.contains("line 7"), "{msg}");
    }

    #[test]
    fn apply_settings_need_reload_and_state_dir() {
        let managed = format!(
            "{VALID}state_dir: state\n"
        )
        .replace(
            "  health_url: http://127.0.0.1:41002/health\n",
            "  health_url: http://127.0.0.1:41002/health\n  config_path: policy.yaml\n  validate_command: [kt-gateway, validate, \"{file}\"]\n  reload: {url: \"http://127.0.0.1:41002/admin/reload\"}\n",
        );
        let config = load(&managed).expect("valid");
        let apply = config.apply_settings().expect("managed");
        assert_eq!(
            apply.reload,
            Reload::Url("http://127.0.0.1:41002/admin/reload".into())
        );
        assert!(apply.config_path.ends_with("policy.yaml") && apply.state_dir.ends_with("state"));

        let no_reload = managed.replace(
            "  reload: {url: \"http://127.0.0.1:41002/admin/reload\"}\n",
            "",
        );
        assert!(
            load(&no_reload)
                .expect_err("needs reload")
                .to_string()
                .contains("gateway.config_path")
        );
        let two = managed.replace("reload: {url:", "reload: {command: [x], url:");
        assert!(
            load(&two)
                .expect_err("two ways")
                .to_string()
                .contains("exactly one")
        );
        assert!(load(VALID).expect("report only").apply_settings().is_none());
    }

    #[test]
    fn hosts_of_urls() {
        assert_eq!(
            host_of("https://coord.example:443").as_deref(),
            Some("coord.example")
        );
        assert_eq!(host_of("https://[::1]:41001").as_deref(), Some("::1"));
        assert_eq!(host_of("https://localhost").as_deref(), Some("localhost"));
        assert_eq!(host_of("https://:1"), None);
    }
}
