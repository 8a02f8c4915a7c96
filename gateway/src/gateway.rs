//! The gateway's running state: the current policy config, reloads and counters.
//!
//! The config is swapped as a whole `Arc`, so a request keeps the config it started with
//! while a reload installs a new one; a config that fails validation is never installed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use kt_proto::contract::{ConfigDoc, HealthDoc, HealthStatus, VerdictsDoc};
use time::OffsetDateTime;

use crate::config::{ConfigErrors, PolicyConfig};

/// A loaded config and when it was loaded.
#[derive(Debug)]
pub struct LoadedConfig {
    pub config: PolicyConfig,
    pub loaded_at: OffsetDateTime,
}

/// Cheap to clone; every clone sees the same state.
#[derive(Clone, Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config_path: PathBuf,
    gateway_id: Option<String>,
    started: Instant,
    /// Written by `reload`, read by every request.
    current: RwLock<Arc<LoadedConfig>>,
    /// Set by a failed reload, cleared by a successful one.
    last_reload_error: RwLock<Option<String>>,
    requests_processed: AtomicU64,
}

impl Gateway {
    /// Loads the config at `config_path`; fails if it is invalid (nothing starts).
    pub fn load(config_path: PathBuf, gateway_id: Option<String>) -> Result<Self, ConfigErrors> {
        let config = PolicyConfig::load(&config_path)?;
        Ok(Gateway {
            shared: Arc::new(Shared {
                config_path,
                gateway_id,
                started: Instant::now(),
                current: RwLock::new(Arc::new(LoadedConfig {
                    config,
                    loaded_at: OffsetDateTime::now_utc(),
                })),
                last_reload_error: RwLock::new(None),
                requests_processed: AtomicU64::new(0),
            }),
        })
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<LoadedConfig> {
        match self.shared.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the config file: validates first, then swaps; keeps the old config if invalid.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let result = PolicyConfig::load(&self.shared.config_path);
        let mut last_error = self
            .shared
            .last_reload_error
            .write()
            .unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(config) => {
                tracing::info!(version = %config.version, hash = %config.hash, "config reloaded");
                let loaded = Arc::new(LoadedConfig {
                    config,
                    loaded_at: OffsetDateTime::now_utc(),
                });
                *self
                    .shared
                    .current
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = loaded;
                *last_error = None;
                Ok(())
            }
            Err(errors) => {
                tracing::warn!(error = %errors, "config reload refused, keeping the running config");
                *last_error = Some(errors.to_string());
                Err(errors)
            }
        }
    }

    pub fn count_request(&self) {
        self.shared
            .requests_processed
            .fetch_add(1, Ordering::Relaxed);
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
        HealthDoc {
            status: HealthStatus::Healthy,
            uptime_seconds: self.shared.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            gateway_id: self.shared.gateway_id.clone(),
            config: ConfigDoc {
                version: config.version.clone(),
                hash: config.hash.clone(),
                loaded_at: current
                    .loaded_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                last_reload_error,
            },
            providers: Default::default(),
            policies_loaded: if config.enabled {
                u32::try_from(config.chain.len()).unwrap_or(u32::MAX)
            } else {
                0
            },
            requests_processed: self.shared.requests_processed.load(Ordering::Relaxed),
            verdicts: VerdictsDoc::default(),
            cache: Default::default(),
        }
    }
}
