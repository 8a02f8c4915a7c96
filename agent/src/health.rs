//! Polls the gateway's health document and publishes the latest observation.
//!
//! The latest value lives in a `watch` channel: the session reads it for hellos and status
//! updates, and a slow session never delays polling.

use std::time::Duration;

use kt_contract::{HealthDoc, HealthStatus, Reachability};
use kt_daemon::unix_ms_now;
use kt_proto::v1;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::GatewaySettings;

/// Health documents larger than this are refused: a gateway's health is a few KiB.
const MAX_HEALTH_BYTES: usize = 1024 * 1024;

pub struct HealthPoller {
    settings: GatewaySettings,
    client: reqwest::Client,
    latest: watch::Sender<v1::GatewayHealth>,
    poll_now: std::sync::Arc<tokio::sync::Notify>,
}

impl HealthPoller {
    pub fn new(
        settings: GatewaySettings,
    ) -> anyhow::Result<(Self, watch::Receiver<v1::GatewayHealth>)> {
        let client = reqwest::Client::builder()
            .timeout(settings.health_timeout)
            .connect_timeout(settings.health_timeout)
            .build()?;
        let (latest, rx) = watch::channel(unobserved());
        Ok((
            HealthPoller {
                settings,
                client,
                latest,
                poll_now: Default::default(),
            },
            rx,
        ))
    }

    /// Notified, the poller reads the health document at once (after an apply, so the
    /// coordinator hears what runs now without waiting for the next interval).
    pub fn poll_now(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.poll_now.clone()
    }

    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.poll_now.notified() => tick.reset(),
            }
            let previous = self.latest.borrow().clone();
            let observed = match self.fetch().await {
                Ok(doc) => from_doc(doc),
                Err(error) => {
                    tracing::debug!(url = %self.settings.health_url, %error, "gateway health unavailable");
                    unreachable_now(&previous, error)
                }
            };
            if previous.reachable != observed.reachable || previous.status != observed.status {
                tracing::info!(
                    status = v1::HealthStatus::try_from(observed.status).map(|s| s.as_str_name()).unwrap_or("?"),
                    reachable = observed.reachable,
                    error = %observed.error,
                    "gateway health changed"
                );
            }
            self.latest.send_replace(observed);
        }
    }

    async fn fetch(&self) -> Result<HealthDoc, String> {
        let response = self
            .client
            .get(&self.settings.health_url)
            .send()
            .await
            .map_err(|e| format!("cannot reach gateway: {}", kt_daemon::error_chain(&e)))?;
        let status = response.status();
        let body = read_limited(response).await?;
        let doc: HealthDoc = serde_json::from_slice(&body)
            .map_err(|e| format!("gateway health is not valid JSON ({status}): {e}"))?;
        Ok(doc)
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading gateway health: {e}"))?
    {
        if body.len() + chunk.len() > MAX_HEALTH_BYTES {
            return Err(format!(
                "gateway health is larger than {MAX_HEALTH_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Before the first poll: nothing is known yet.
fn unobserved() -> v1::GatewayHealth {
    v1::GatewayHealth {
        status: v1::HealthStatus::Unspecified as i32,
        error: "not observed yet".into(),
        ..Default::default()
    }
}

/// The gateway could not be read: unhealthy, keeping the last known config and shadow
/// identities, since the files the gateway last loaded are still what it would run.
fn unreachable_now(previous: &v1::GatewayHealth, error: String) -> v1::GatewayHealth {
    v1::GatewayHealth {
        status: v1::HealthStatus::Unhealthy as i32,
        reachable: false,
        error,
        config: previous.config.clone(),
        shadow: previous.shadow.clone(),
        observed_at_unix_ms: unix_ms_now(),
        ..Default::default()
    }
}

/// Converts the contract's JSON into the wire type.
pub fn from_doc(doc: HealthDoc) -> v1::GatewayHealth {
    let status = match doc.status {
        HealthStatus::Healthy => v1::HealthStatus::Healthy,
        HealthStatus::Degraded => v1::HealthStatus::Degraded,
        HealthStatus::Unhealthy => v1::HealthStatus::Unhealthy,
    };
    v1::GatewayHealth {
        status: status as i32,
        reachable: true,
        error: String::new(),
        uptime_seconds: doc.uptime_seconds,
        version: doc.version,
        config: Some(v1::ConfigInfo {
            version: doc.config.version,
            hash: doc.config.hash,
            loaded_at: doc.config.loaded_at,
            last_reload_error: doc.config.last_reload_error.unwrap_or_default(),
        }),
        providers: doc
            .providers
            .into_iter()
            .map(|(name, p)| {
                let health = v1::ProviderHealth {
                    reachable: p.status == Reachability::Reachable,
                    latency_ms: p.latency_ms.unwrap_or_default(),
                };
                (name, health)
            })
            .collect(),
        policies_loaded: doc.policies_loaded,
        requests_processed: doc.requests_processed,
        errors: doc.errors,
        verdicts: Some(v1::VerdictCounts {
            allow: doc.verdicts.allow,
            block: doc.verdicts.block,
            redact: doc.verdicts.redact,
            escalate: doc.verdicts.escalate,
        }),
        cache: Some(v1::CacheStats {
            entries: doc.cache.entries,
            hit_rate_pct: doc.cache.hit_rate_pct,
        }),
        observed_at_unix_ms: unix_ms_now(),
        shadow: doc.shadow.map(|s| v1::ConfigInfo {
            version: s.version,
            hash: s.hash,
            loaded_at: s.loaded_at,
            last_reload_error: s.last_reload_error.unwrap_or_default(),
        }),
    }
}

/// Whether two observations differ in something worth a status update: counters, uptime,
/// latencies and timestamps change all the time and travel with heartbeats or not at all.
pub fn materially_different(a: &v1::GatewayHealth, b: &v1::GatewayHealth) -> bool {
    fn essence(h: &v1::GatewayHealth) -> v1::GatewayHealth {
        v1::GatewayHealth {
            uptime_seconds: 0,
            requests_processed: 0,
            errors: 0,
            verdicts: None,
            cache: None,
            observed_at_unix_ms: 0,
            providers: h
                .providers
                .iter()
                .map(|(name, p)| {
                    (
                        name.clone(),
                        v1::ProviderHealth {
                            reachable: p.reachable,
                            latency_ms: 0.0,
                        },
                    )
                })
                .collect(),
            ..h.clone()
        }
    }
    essence(a) != essence(b)
}

/// How long a heartbeat interval the coordinator may assign before the agent caps it.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_json_converts_with_defaults_for_missing_fields() {
        let doc: HealthDoc = serde_json::from_str(
            r#"{"status":"degraded","config":{"version":"1.0.0","hash":"sha256:ab"},
                "providers":{"openai":{"status":"reachable","latency_ms":12.5},"local":{"status":"unreachable"}},
                "future_field": 1}"#,
        )
        .expect("lenient parse");
        let health = from_doc(doc);
        assert_eq!(health.status, v1::HealthStatus::Degraded as i32);
        assert!(health.reachable);
        assert_eq!(
            health.config.as_ref().map(|c| c.version.as_str()),
            Some("1.0.0")
        );
        assert!(health.providers["openai"].reachable);
        assert!(!health.providers["local"].reachable);
    }

    #[test]
    fn only_material_changes_count() {
        let base = from_doc(HealthDoc {
            status: HealthStatus::Healthy,
            ..Default::default()
        });
        let mut busier = base.clone();
        busier.requests_processed += 10;
        busier.uptime_seconds += 5;
        busier.observed_at_unix_ms += 1000;
        assert!(!materially_different(&base, &busier));
        let mut sick = base.clone();
        sick.status = v1::HealthStatus::Unhealthy as i32;
        assert!(materially_different(&base, &sick));
    }

    #[test]
    fn unreachable_keeps_config_identity() {
        let mut previous = from_doc(HealthDoc::default());
        previous.config = Some(v1::ConfigInfo {
            version: "2.0.0".into(),
            ..Default::default()
        });
        previous.shadow = Some(v1::ConfigInfo {
            hash: "sha256:shadow".into(),
            ..Default::default()
        });
        let now = unreachable_now(&previous, "connection refused".into());
        assert!(!now.reachable);
        assert_eq!(now.status, v1::HealthStatus::Unhealthy as i32);
        assert_eq!(now.config, previous.config);
        assert_eq!(
            now.shadow, previous.shadow,
            "the shadow file is still there"
        );
    }
}
