//! Simulated agents: each runs the real agent's session code (`kt_agent::session::run`) with its
//! own certificate and its own mutual-TLS connection. Only the gateway is simulated: its health
//! is a value the scenario sets, and a config offer is "applied" by answering `APPLIED` after a
//! configurable reload time.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kt_agent::config::AgentConfig;
use kt_agent::metrics::Metrics;
use kt_agent::session::{self, ConfigLink, Observers, SessionSettings};
use kt_proto::identity::{GatewayId, Role};
use kt_proto::v1::{ConfigInfo, ConfigPhase, ConfigRef, ConfigStatus, GatewayHealth, HealthStatus};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::fleet::agent_id;

pub const INITIAL_HASH: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// What simulated agents applied: when, and how many bytes of offers they received.
#[derive(Debug, Default)]
pub struct Applied {
    pub at: Vec<Instant>,
    pub offer_bytes: u64,
}

/// One simulated agent: its health (set by the scenario) and its stop switch.
pub struct SimAgent {
    pub health: watch::Sender<GatewayHealth>,
    cancel: CancellationToken,
}

impl SimAgent {
    /// The simulated gateway turns degraded, or healthy again, observed now: the agent sends a
    /// status update and watchers see the change.
    pub fn toggle_health(&self) {
        self.health.send_modify(|h| {
            h.status = if h.status == HealthStatus::Healthy as i32 {
                HealthStatus::Degraded as i32
            } else {
                HealthStatus::Healthy as i32
            };
            h.observed_at_unix_ms = kt_daemon::unix_ms_now();
        });
    }
}

pub struct SimFleet {
    pub agents: Vec<SimAgent>,
    /// Shared by every simulated agent: counters add up across the fleet.
    pub metrics: Arc<Metrics>,
    pub applied: Arc<Mutex<Applied>>,
}

pub struct SimSettings {
    /// Coordinator replicas: agent i starts with replica i mod n, then tries the others.
    pub coordinators: Vec<SocketAddr>,
    pub reload: Duration,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

pub fn healthy(hash: &str) -> GatewayHealth {
    GatewayHealth {
        status: HealthStatus::Healthy as i32,
        reachable: true,
        version: "sim".into(),
        config: Some(ConfigInfo {
            version: "1.0.0".into(),
            hash: hash.into(),
            ..Default::default()
        }),
        observed_at_unix_ms: kt_daemon::unix_ms_now(),
        ..Default::default()
    }
}

impl SimFleet {
    /// Starts `n` agents; each connects at once (the scenario measures how long that takes).
    pub fn start(n: usize, pki: &Path, settings: &SimSettings) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let applied = Arc::new(Mutex::new(Applied::default()));
        let mut agents = Vec::with_capacity(n);
        for i in 0..n {
            agents.push(start_agent(i, pki, settings, &metrics, &applied)?);
        }
        Ok(SimFleet {
            agents,
            metrics,
            applied,
        })
    }

    /// Open sessions now.
    pub fn connected(&self) -> i64 {
        self.metrics.connected.get()
    }

    pub fn stop(self) {
        for agent in &self.agents {
            agent.cancel.cancel();
        }
    }
}

fn start_agent(
    i: usize,
    pki: &Path,
    settings: &SimSettings,
    metrics: &Arc<Metrics>,
    applied: &Arc<Mutex<Applied>>,
) -> anyhow::Result<SimAgent> {
    let id = agent_id(i);
    let region = ["us", "eu", "ap"][i % 3];
    let n = settings.coordinators.len().max(1);
    let first = *settings
        .coordinators
        .get(i % n)
        .ok_or_else(|| anyhow::anyhow!("no coordinator"))?;
    let others: Vec<SocketAddr> = settings
        .coordinators
        .iter()
        .cycle()
        .skip(i % n + 1)
        .take(n - 1)
        .copied()
        .collect();
    let spec = kt_launch::configs::AgentSpec {
        gateway_id: &id,
        more_coordinators: &others,
        coordinator: first,
        pki,
        // Nothing listens there: the simulated gateway's health is set by the scenario.
        gateway: "127.0.0.1:9".parse()?,
        health_interval: Duration::from_secs(5),
        labels: &[("fleet", "sim"), ("region", region)],
        config_path: None,
        validator: Path::new("kt-gateway"),
        events_file: None,
        probe_token_file: None,
        max_buffered_events: None,
        state_dir: Path::new("."),
        metrics_listen: None,
    };
    let mut config: AgentConfig = kt_launch::configs::agent(&spec);
    config.state_dir = None;
    config.reconnect.min_delay = settings.min_delay;
    config.reconnect.max_delay = settings.max_delay;
    let tls = config.tls.load(Role::Agent)?;
    let gateway = GatewayId::new(&id).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
    let session_settings = Arc::new(SessionSettings {
        gateway,
        config,
        tls,
        boot_id: format!("{:016x}", rand::random::<u64>()),
        last_good_tls: Default::default(),
        renewal: None,
    });
    let (health_tx, health_rx) = watch::channel(healthy(INITIAL_HASH));
    let (offer_tx, offers) = mpsc::channel(16);
    let (status_tx, statuses) = mpsc::channel(16);
    let link = ConfigLink {
        offers: Some(offer_tx),
        statuses,
        unsent: Default::default(),
    };
    let observers = Observers {
        prober: None,
        forwarding: None,
        metrics: metrics.clone(),
    };
    let cancel = CancellationToken::new();
    tokio::spawn(apply_offers(
        offers,
        status_tx,
        health_tx.clone(),
        settings.reload,
        applied.clone(),
    ));
    tokio::spawn(session::run(
        session_settings,
        health_rx,
        link,
        observers,
        cancel.clone(),
    ));
    Ok(SimAgent {
        health: health_tx,
        cancel,
    })
}

/// The simulated gateway's side of an apply: "reload" (wait), then answer APPLIED and run it.
async fn apply_offers(
    mut offers: mpsc::Receiver<kt_proto::v1::ConfigOffer>,
    statuses: mpsc::Sender<ConfigStatus>,
    health: watch::Sender<GatewayHealth>,
    reload: Duration,
    applied: Arc<Mutex<Applied>>,
) {
    while let Some(offer) = offers.recv().await {
        let bytes = offer.encoded_len() as u64;
        if !reload.is_zero() {
            tokio::time::sleep(reload).await;
        }
        let config = offer.config.clone().unwrap_or_default();
        {
            let mut applied = applied.lock().unwrap_or_else(|p| p.into_inner());
            applied.at.push(Instant::now());
            applied.offer_bytes += bytes;
        }
        health.send_modify(|h| {
            h.config = Some(ConfigInfo {
                version: config.version.clone(),
                hash: config.hash.clone(),
                ..Default::default()
            });
        });
        let status = ConfigStatus {
            offer_id: offer.offer_id,
            config: offer.config,
            phase: ConfigPhase::Applied as i32,
            running: Some(ConfigRef {
                version: config.version,
                hash: config.hash,
            }),
            error: String::new(),
            shadow: offer.shadow,
        };
        if statuses.send(status).await.is_err() {
            return;
        }
    }
}
