//! The agent's config file (`agent.yaml`), parsed strictly and validated into typed values.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kt_proto::tls::TlsFiles;
use kt_proto::yaml::{ConfigFileError, read_yaml_file};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
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
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// `https://host:port` URLs, tried in turn.
    pub endpoints: Vec<String>,
    /// The name the coordinator's certificate must carry; defaults to the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
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
}

/// Full-jitter exponential backoff between connection attempts.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
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
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigFileError> {
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
fn host_of(url: &str) -> Option<String> {
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
