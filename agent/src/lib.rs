//! kt-agent: the sidecar beside a governed LLM gateway.
//!
//! It reads its gateway id from its own certificate, polls the gateway's health
//! ([`health`]) and keeps a control session open with the coordinator ([`session`]).

pub mod apply;
pub mod backoff;
pub mod certs;
pub mod config;
pub mod enroll;
pub mod epoch;
pub mod events;
pub mod health;
pub mod metrics;
pub mod probe;
pub mod renewal;
pub mod session;

use kt_proto::identity::{Identity, Role};
use kt_proto::tls::TlsError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::apply::Applier;
use crate::config::AgentConfig;
use crate::health::HealthPoller;
use crate::session::{ConfigLink, SessionSettings};
use tokio::sync::mpsc;

/// An agent whose config and certificates have been checked.
pub struct Agent {
    settings: SessionSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0} is not an agent identity")]
    NotAnAgent(Identity),
}

impl Agent {
    pub fn new(config: AgentConfig) -> Result<Self, StartError> {
        // An agent that manages its certificate finishes (or drops) a renewal cut short, and
        // leaves judging the certificate's validity period to the coordinator's clock.
        let tls = if config.enrollment.is_some() {
            certs::recover(&config.tls).map_err(|e| {
                StartError::Tls(TlsError::Invalid {
                    path: config.tls.cert.clone(),
                    what: format!("cannot finish a renewal: {e}"),
                })
            })?;
            config.tls.load_ignoring_clock(Role::Agent)?
        } else {
            config.tls.load(Role::Agent)?
        };
        let Identity::Agent { gateway, .. } = tls.identity.clone() else {
            return Err(StartError::NotAnAgent(tls.identity));
        };
        let renewal = config
            .enrollment
            .is_some()
            .then(|| renewal::Renewal::from_current(config.tls.clone(), &tls));
        Ok(Agent {
            settings: SessionSettings {
                gateway,
                config,
                tls,
                boot_id: format!("{:016x}", rand::random::<u64>()),
                last_good_tls: Default::default(),
                renewal,
            },
        })
    }

    /// The certificate was just obtained by enrolling and lives `lifetime` from now: its
    /// renewal is scheduled from that, not from the certificate's dates against this host's
    /// clock.
    pub fn enrolled_now(&self, lifetime: std::time::Duration) {
        if let Some(renewal) = &self.settings.renewal {
            renewal.enrolled(lifetime);
        }
    }

    pub fn gateway_id(&self) -> &kt_proto::identity::GatewayId {
        &self.settings.gateway
    }

    /// Runs until `cancel` fires; says goodbye to the coordinator on the way out.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let (poller, health) = HealthPoller::new(self.settings.config.gateway.clone())?;
        let tasks = TaskTracker::new();
        let (status_tx, statuses) = mpsc::channel(64);
        let offers = match self.settings.config.apply_settings() {
            Some(apply) => {
                let applier = Applier::new(apply, self.settings.config.gateway.health_url.clone())?
                    .with_health_poll(poller.poll_now());
                let (offer_tx, offer_rx) = mpsc::channel(16);
                tasks.spawn(applier.run(offer_rx, status_tx, health.clone(), cancel.child_token()));
                Some(offer_tx)
            }
            None => None,
        };
        let link = ConfigLink {
            offers,
            statuses,
            unsent: Default::default(),
        };
        let settings = std::sync::Arc::new(self.settings);
        let mut forwarding = None;
        let metrics = std::sync::Arc::new(metrics::Metrics::default());
        if let (Some(file), Some(state_dir)) = (
            settings.config.gateway.events_file.clone(),
            settings.config.state_dir.clone(),
        ) {
            let limits = events::spool::Limits {
                max_events: settings.config.events.max_buffered_events,
                max_bytes: settings.config.events.max_buffered_bytes,
                max_age: settings.config.events.max_age,
            };
            std::fs::create_dir_all(&state_dir)?;
            let spool = events::spool::Spool::open(&state_dir, limits)
                .map_err(|e| anyhow::anyhow!("event buffer in {}: {e}", state_dir.display()))?;
            let spool = std::sync::Arc::new(std::sync::Mutex::new(spool));
            let appended = std::sync::Arc::new(tokio::sync::Notify::new());
            let report = events::ForwardingReport::new(metrics.clone());
            tasks.spawn(events::run_tailer(
                file,
                spool.clone(),
                appended.clone(),
                report.clone(),
                cancel.child_token(),
            ));
            tasks.spawn(events::send::run(
                settings.clone(),
                spool,
                appended,
                report.clone(),
                cancel.child_token(),
            ));
            forwarding = Some(report);
        }
        let prober = probe::Prober::new(
            settings.config.gateway.api_base(),
            settings.config.gateway.probe_token_file.clone(),
        )?;
        if let Some(addr) = settings.config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics_listen {addr}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics on /metrics");
            let encode = scrape(metrics.clone(), forwarding.clone());
            tasks.spawn(kt_daemon::metrics_http::serve(
                listener,
                encode,
                cancel.child_token(),
            ));
        }
        let observers = session::Observers {
            prober: Some(prober),
            forwarding,
            metrics,
        };
        tasks.spawn(poller.run(cancel.child_token()));
        tasks.spawn(session::run(
            settings,
            health,
            link,
            observers,
            cancel.child_token(),
        ));
        tasks.close();
        tasks.wait().await;
        Ok(())
    }
}

/// What a scrape encodes: the counters, with the forwarding gauges read first.
fn scrape(
    metrics: std::sync::Arc<metrics::Metrics>,
    forwarding: Option<events::ForwardingReport>,
) -> kt_daemon::metrics_http::Encode {
    std::sync::Arc::new(move || {
        if let Some(report) = &forwarding {
            report.scrape(kt_daemon::unix_ms_now());
        }
        let text = metrics.encode();
        Box::pin(async move { text })
    })
}
