//! Provider targets: their secrets, and periodic reachability probes.
//!
//! A target whose secret is missing is unavailable, never a crash: it is skipped when routing
//! and reported unreachable in health with the reason.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use kt_contract::{ProviderDoc, Reachability};

use crate::config::ProviderTarget;

/// A target with its secret looked up.
#[derive(Clone, Debug)]
pub struct ResolvedTarget {
    pub target: ProviderTarget,
    pub api_key: Option<String>,
    /// Why the target cannot be used, when it cannot.
    pub unavailable: Option<String>,
}

impl ResolvedTarget {
    /// `{base_url}/{path}` without doubled slashes.
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}/{}",
            self.target.base_url.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }
}

/// Looks up every target's secret through `lookup` (the process environment in production).
pub fn resolve(
    targets: &[ProviderTarget],
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Vec<ResolvedTarget> {
    targets
        .iter()
        .map(|target| {
            let (api_key, unavailable) = match &target.secret_key_ref {
                None => (None, None),
                Some(secret) => match lookup(&secret.env).filter(|v| !v.is_empty()) {
                    Some(key) => (Some(key), None),
                    None => (None, Some(format!("secret {} is not set", secret.env))),
                },
            };
            ResolvedTarget {
                target: target.clone(),
                api_key,
                unavailable,
            }
        })
        .collect()
}

/// The latest probe of one target.
#[derive(Clone, Debug)]
pub struct ProbeState {
    pub reachable: bool,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
}

/// Probe results by target id; written by the probe loop, read by health.
#[derive(Debug, Default)]
pub struct Probes {
    states: RwLock<HashMap<String, ProbeState>>,
}

impl Probes {
    pub fn get(&self, id: &str) -> Option<ProbeState> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Replaces all results: targets gone from the config disappear.
    pub fn replace(&self, results: HashMap<String, ProbeState>) {
        *self.states.write().unwrap_or_else(|p| p.into_inner()) = results;
    }

    /// The contract's view of one target.
    pub fn doc(&self, target: &ResolvedTarget) -> ProviderDoc {
        if target.unavailable.is_some() {
            return ProviderDoc {
                status: Reachability::Unreachable,
                latency_ms: None,
            };
        }
        match self.get(&target.target.id) {
            Some(state) if state.reachable => ProviderDoc {
                status: Reachability::Reachable,
                latency_ms: state.latency_ms,
            },
            _ => ProviderDoc {
                status: Reachability::Unreachable,
                latency_ms: None,
            },
        }
    }
}

/// Probes one target: `GET {base_url}/models`. Any HTTP answer below 500 counts as reachable
/// (a 401 still proves the provider is there).
pub async fn probe(
    client: &reqwest::Client,
    target: &ResolvedTarget,
    timeout: Duration,
) -> ProbeState {
    if let Some(why) = &target.unavailable {
        return ProbeState {
            reachable: false,
            latency_ms: None,
            error: Some(why.clone()),
        };
    }
    let started = Instant::now();
    let mut request = client.get(target.url("models")).timeout(timeout);
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    match request.send().await {
        Ok(response) if response.status().as_u16() < 500 => ProbeState {
            reachable: true,
            latency_ms: Some(crate::events::millis(started.elapsed())),
            error: None,
        },
        Ok(response) => ProbeState {
            reachable: false,
            latency_ms: None,
            error: Some(format!("answered {}", response.status())),
        },
        Err(e) => ProbeState {
            reachable: false,
            latency_ms: None,
            error: Some(if e.is_timeout() {
                "probe timed out".into()
            } else {
                "connection failed".into()
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretKeyRef;

    fn target(secret: Option<&str>) -> ProviderTarget {
        ProviderTarget {
            id: "t".into(),
            provider: "openai".into(),
            model: "m".into(),
            base_url: "http://127.0.0.1:1/v1/".into(),
            secret_key_ref: secret.map(|env| SecretKeyRef { env: env.into() }),
        }
    }

    #[test]
    fn missing_secret_makes_a_target_unavailable_not_an_error() {
        let lookup = |name: &str| (name == "PRESENT").then(|| "sk-123".to_owned());
        let resolved = resolve(
            &[
                target(Some("PRESENT")),
                target(Some("ABSENT")),
                target(None),
            ],
            &lookup,
        );
        assert_eq!(resolved[0].api_key.as_deref(), Some("sk-123"));
        assert!(resolved[0].unavailable.is_none());
        assert_eq!(
            resolved[1].unavailable.as_deref(),
            Some("secret ABSENT is not set")
        );
        assert!(resolved[2].unavailable.is_none() && resolved[2].api_key.is_none());
        assert_eq!(
            resolved[0].url("/chat/completions"),
            "http://127.0.0.1:1/v1/chat/completions"
        );
        let probes = Probes::default();
        assert_eq!(probes.doc(&resolved[1]).status, Reachability::Unreachable);
    }

    #[tokio::test]
    async fn an_unreachable_provider_probes_unreachable() {
        // Bind then drop a listener: nothing listens on that port afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut t = target(None);
        t.base_url = format!("http://127.0.0.1:{port}/v1");
        let resolved = &resolve(&[t], &|_| None)[0];
        kt_daemon::install_crypto_provider();
        let state = probe(&reqwest::Client::new(), resolved, Duration::from_secs(2)).await;
        assert!(!state.reachable);
        assert!(state.error.is_some());
    }
}
