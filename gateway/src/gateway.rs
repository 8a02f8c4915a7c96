//! The gateway's running state: the current policy config, reloads, probes and counters.
//!
//! The config is swapped as a whole `Arc`, so a request keeps the config it started with
//! while a reload installs a new one; a config that fails validation is never installed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kt_contract::{CacheDoc, ConfigDoc, HealthDoc, HealthStatus, Reachability, VerdictsDoc};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cache::ResponseCache;
use crate::config::{ConfigErrors, PolicyConfig};
use crate::events::EventSink;
use crate::metrics::{Metrics, ReloadLabels};
use crate::policy::Verdict;
use crate::probe_token::ProbeToken;
use crate::providers::{self, Probes, ResolvedTarget};

/// Looks up a secret by name; the process environment in production.
pub type SecretLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A loaded config with what was derived from it.
#[derive(Debug)]
pub struct LoadedConfig {
    pub config: PolicyConfig,
    pub loaded_at: OffsetDateTime,
    pub targets: Vec<ResolvedTarget>,
    pub cache: ResponseCache,
}

impl LoadedConfig {
    fn new(config: PolicyConfig, secrets: &SecretLookup) -> Self {
        let targets = providers::resolve(&config.providers, secrets.as_ref());
        let cache = ResponseCache::new(config.cache.clone());
        LoadedConfig {
            config,
            loaded_at: OffsetDateTime::now_utc(),
            targets,
            cache,
        }
    }
}

/// Cheap to clone; every clone sees the same state.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("gateway_id", &self.shared.gateway_id)
            .finish_non_exhaustive()
    }
}

struct Shared {
    config_path: PathBuf,
    gateway_id: String,
    started: Instant,
    secrets: SecretLookup,
    /// Written by `reload`, read by every request.
    current: RwLock<Arc<LoadedConfig>>,
    /// Set by a failed reload, cleared by a successful one.
    last_reload_error: RwLock<Option<String>>,
    /// Wakes the probe loop after a reload.
    reloaded: Notify,
    probes: Probes,
    requests_processed: AtomicU64,
    /// Requests answered with a 5xx status.
    errors: AtomicU64,
    verdicts: [AtomicU64; 4],
    metrics: Arc<Metrics>,
    events: EventSink,
    http: reqwest::Client,
    /// Marks the agent's synthetic probes; without one, no request is synthetic.
    probe_token: Option<ProbeToken>,
    /// The shadow config, when `--shadow-config` names one.
    shadow: crate::shadow::ShadowSlot,
}

impl Gateway {
    /// Loads the config at `config_path`; fails if it is invalid (nothing starts).
    pub fn load(
        config_path: PathBuf,
        gateway_id: String,
        events: EventSink,
        secrets: SecretLookup,
        probe_token: Option<ProbeToken>,
    ) -> Result<Self, ConfigErrors> {
        let config = PolicyConfig::load(&config_path)?;
        // The provider client speaks TLS through rustls with ring, like every kt process.
        kt_daemon::install_crypto_provider();
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ConfigErrors {
                source: "http client".into(),
                errors: vec![e.to_string()],
            })?;
        let current = LoadedConfig::new(config, &secrets);
        Ok(Gateway {
            shared: Arc::new(Shared {
                config_path,
                gateway_id,
                started: Instant::now(),
                secrets,
                current: RwLock::new(Arc::new(current)),
                last_reload_error: RwLock::new(None),
                reloaded: Notify::new(),
                probes: Probes::default(),
                requests_processed: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                verdicts: Default::default(),
                metrics: Arc::new(Metrics::default()),
                events,
                http,
                probe_token,
                shadow: Default::default(),
            }),
        })
    }

    /// Evaluates the shadow config at `path` beside the active one from now on (absent: none
    /// yet). A shadow that does not validate is refused, and never stops the gateway.
    pub fn set_shadow_path(&self, path: PathBuf) -> Result<(), String> {
        self.shared.shadow.set_path(path)
    }

    /// The shadow config in force now, if any.
    pub fn shadow(&self) -> Option<Arc<crate::shadow::ShadowConfig>> {
        self.shared.shadow.current()
    }

    /// Whether a request is the agent's synthetic probe: its `x-kt-synthetic` header must carry
    /// this gateway's probe token. Anyone else's header is ignored (and counted).
    pub fn is_synthetic(&self, presented: Option<&[u8]>) -> bool {
        let Some(presented) = presented else {
            return false;
        };
        let genuine = self
            .shared
            .probe_token
            .as_ref()
            .is_some_and(|token| token.matches(presented));
        if !genuine {
            self.shared.metrics.synthetic_refused.inc();
        }
        genuine
    }

    pub fn gateway_id(&self) -> &str {
        &self.shared.gateway_id
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.shared.http
    }

    /// The metrics, for tasks that outlive a borrow (the accept loop).
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn events(&self) -> &EventSink {
        &self.shared.events
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<LoadedConfig> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the config file: validates first, then swaps; keeps the old config if invalid.
    /// The shadow config is read again too (its refusal is its own, in `/health`).
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let _ = self.shared.shadow.reload();
        let result = PolicyConfig::load(&self.shared.config_path);
        let mut last_error = self
            .shared
            .last_reload_error
            .write()
            .unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(config) => {
                tracing::info!(version = %config.version, hash = %config.hash, "config reloaded");
                let loaded = Arc::new(LoadedConfig::new(config, &self.shared.secrets));
                *self
                    .shared
                    .current
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = loaded;
                *last_error = None;
                self.shared
                    .metrics
                    .reloads
                    .get_or_create(&ReloadLabels { result: "ok" })
                    .inc();
                self.shared.reloaded.notify_one();
                Ok(())
            }
            Err(errors) => {
                tracing::warn!(error = %errors, "config reload refused, keeping the running config");
                *last_error = Some(errors.to_string());
                self.shared
                    .metrics
                    .reloads
                    .get_or_create(&ReloadLabels { result: "rejected" })
                    .inc();
                Err(errors)
            }
        }
    }

    pub fn count_request(&self) {
        self.shared
            .requests_processed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request answered with a server error (5xx).
    pub fn count_error(&self) {
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_verdict(&self, verdict: Verdict) {
        let index = match verdict {
            Verdict::Allow => 0,
            Verdict::Block => 1,
            Verdict::Redact => 2,
            Verdict::Escalate => 3,
        };
        self.shared.verdicts[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Probes every provider target now and then every `probe_interval`, or at once after a
    /// reload, until cancelled.
    pub async fn run_probes(self, cancel: CancellationToken) {
        loop {
            let current = self.current();
            let timeout = current.config.probe_interval.min(Duration::from_secs(2));
            let mut probes = tokio::task::JoinSet::new();
            for target in current.targets.clone() {
                let client = self.shared.http.clone();
                probes.spawn(async move {
                    (
                        target.target.id.clone(),
                        providers::probe(&client, &target, timeout).await,
                    )
                });
            }
            let mut results = HashMap::new();
            while let Some(joined) = probes.join_next().await {
                if let Ok((id, state)) = joined {
                    results.insert(id, state);
                }
            }
            self.shared.probes.replace(results);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.shared.reloaded.notified() => {}
                _ = tokio::time::sleep(current.config.probe_interval) => {}
            }
        }
    }

    /// The contract's health document.
    pub fn health(&self) -> HealthDoc {
        let current = self.current();
        let config = &current.config;
        let last_reload_error = self
            .shared
            .last_reload_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let providers: std::collections::BTreeMap<_, _> = current
            .targets
            .iter()
            .map(|t| (t.target.id.clone(), self.shared.probes.doc(t)))
            .collect();
        let reachable = providers
            .values()
            .filter(|p| p.status == Reachability::Reachable)
            .count();
        // No reachable provider means nothing can be served.
        let status = if reachable == 0 {
            HealthStatus::Unhealthy
        } else if reachable < providers.len() {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        let (entries, hit_rate_pct) = current.cache.stats();
        let count = |i: usize| self.shared.verdicts[i].load(Ordering::Relaxed);
        HealthDoc {
            status,
            uptime_seconds: self.shared.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            gateway_id: Some(self.shared.gateway_id.clone()),
            config: ConfigDoc {
                version: config.version.clone(),
                hash: config.hash.clone(),
                loaded_at: current
                    .loaded_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                last_reload_error,
            },
            providers,
            policies_loaded: if config.enabled {
                u32::try_from(config.chain.len()).unwrap_or(u32::MAX)
            } else {
                0
            },
            pack_enabled: config.enabled,
            requests_processed: self.shared.requests_processed.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            verdicts: VerdictsDoc {
                allow: count(0),
                block: count(1),
                redact: count(2),
                escalate: count(3),
            },
            cache: CacheDoc {
                entries,
                hit_rate_pct,
            },
            shadow: self.shared.shadow.doc(),
        }
    }
}
