//! The shadow config (gateway contract): a second policy file, loaded and validated like the
//! active one and reloaded with it, whose chain runs on the same input as the active chain and
//! decides nothing. Its verdict goes into the decision event (`shadow`), never into what the
//! client gets or what the provider receives. A shadow file that is absent means no shadow; one
//! that does not validate leaves the previous shadow (or none) in place and says why in
//! `/health`.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use kt_contract::ShadowDoc;
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::PolicyConfig;
use crate::policy::{Input, Verdict};

#[derive(Debug)]
pub struct ShadowConfig {
    pub config: PolicyConfig,
    pub loaded_at: OffsetDateTime,
}

/// What the shadow chain decided on one request.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShadowOutcome {
    pub config_hash: String,
    pub verdict: &'static str,
    /// The policy whose verdict it was; empty for `allow`.
    pub policy: String,
    pub reason_code: String,
}

/// Runs the shadow chain on `input` (which it may rewrite: give it its own copy).
pub fn evaluate(shadow: &ShadowConfig, input: &mut Input<'_>) -> ShadowOutcome {
    let config = &shadow.config;
    if !config.enabled {
        return ShadowOutcome {
            config_hash: config.hash.clone(),
            verdict: Verdict::Allow.as_str(),
            policy: String::new(),
            reason_code: String::new(),
        };
    }
    let decision = config.chain.evaluate(input);
    let policy = decision
        .evaluated
        .iter()
        .find(|o| o.result == decision.verdict && decision.verdict != Verdict::Allow)
        .map(|o| o.name.to_owned())
        .unwrap_or_default();
    ShadowOutcome {
        config_hash: config.hash.clone(),
        verdict: decision.verdict.as_str(),
        policy,
        reason_code: decision.reason_code,
    }
}

/// Where the shadow comes from and what is loaded now.
#[derive(Debug, Default)]
pub struct ShadowSlot {
    path: RwLock<Option<PathBuf>>,
    current: RwLock<Option<Arc<ShadowConfig>>>,
    last_error: RwLock<Option<String>>,
}

impl ShadowSlot {
    /// Reads shadows from `path` from now on (`--shadow-config`), and loads it.
    pub fn set_path(&self, path: PathBuf) -> Result<(), String> {
        *self.path.write().unwrap_or_else(|p| p.into_inner()) = Some(path);
        self.reload()
    }

    pub fn current(&self) -> Option<Arc<ShadowConfig>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the shadow file again: absent, no shadow; valid, the new shadow; invalid, the
    /// shadow stays as it was and the error is kept for `/health`.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = self.path.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let mut last_error = self.last_error.write().unwrap_or_else(|p| p.into_inner());
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !path.exists() {
            if current.take().is_some() {
                tracing::info!(path = %path.display(), "shadow config removed: single evaluation");
            }
            *last_error = None;
            return Ok(());
        }
        match PolicyConfig::load(&path) {
            Ok(config) => {
                tracing::info!(version = %config.version, hash = %config.hash, "shadow config loaded");
                *current = Some(Arc::new(ShadowConfig {
                    config,
                    loaded_at: OffsetDateTime::now_utc(),
                }));
                *last_error = None;
                Ok(())
            }
            Err(errors) => {
                tracing::warn!(error = %errors, "shadow config refused; the shadow stays as it was");
                *last_error = Some(errors.to_string());
                Err(errors.to_string())
            }
        }
    }

    /// `/health`'s `shadow`: none without a shadow and without an error.
    pub fn doc(&self) -> Option<ShadowDoc> {
        let current = self.current();
        let last_reload_error = self
            .last_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.is_none() && last_reload_error.is_none() {
            return None;
        }
        Some(ShadowDoc {
            version: current
                .as_ref()
                .map(|s| s.config.version.clone())
                .unwrap_or_default(),
            hash: current
                .as_ref()
                .map(|s| s.config.hash.clone())
                .unwrap_or_default(),
            loaded_at: current
                .as_ref()
                .and_then(|s| {
                    s.loaded_at
                        .format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default(),
            last_reload_error,
        })
    }
}
