//! kt-coordinator: holds the fleet's state and serves agents and operators over mutual TLS.
//!
//! [`Coordinator::new`] checks everything that can be checked before listening (config,
//! certificates, groups, data directory); [`Coordinator::run`] serves on an already-bound
//! listener until cancelled, so tests can bind port 0.

pub mod cluster;
pub mod config;
pub mod etcd;
pub mod events;
pub mod fleet;
pub mod grpc;
pub mod intent;
pub mod issuer;
pub mod listener;
pub mod metrics;
pub mod probes;
pub mod reconcile;
pub mod revocations;
pub mod rollout;
pub mod server_tls;
pub mod shadow;
pub mod sources;
pub mod store;
pub mod tokens;

use std::time::Duration;

use kt_daemon::yaml::ConfigFileError;
use kt_proto::identity::Role;
use kt_proto::tls::{PeerTls, TlsError};
use kt_proto::v1::agent_service_server::AgentServiceServer;
use kt_proto::v1::enrollment_service_server::EnrollmentServiceServer;
use kt_proto::v1::operator_service_server::OperatorServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{CoordinatorConfig, Group, Storage, load_groups};
use crate::fleet::Fleet;
use crate::grpc::agent::AgentApi;
use crate::grpc::enrollment::EnrollmentApi;
use crate::grpc::operator::OperatorApi;
use crate::rollout::engine::Engine;
use crate::store::{SqliteStore, Store};
use std::sync::Arc;

/// Why the coordinator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigFileError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("storage.etcd.tls: {}: {source}", path.display())]
    EtcdTls {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("enrollment.issuing_ca: {0}")]
    Issuer(String),
    #[error("data directory {}: {source}", path.display())]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A coordinator whose inputs have all been checked.
pub struct Coordinator {
    config: CoordinatorConfig,
    tls: PeerTls,
    /// Signs agent certificates when `enrollment:` is set.
    issuer: Option<Arc<issuer::AgentIssuer>>,
    groups: Vec<Group>,
    /// The embedded store; none with `storage: etcd`, which is reached once running.
    embedded: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How long open sessions get to close after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Coordinator {
    pub fn new(config: CoordinatorConfig) -> Result<Self, StartError> {
        let tls = config.tls.load(Role::Coordinator)?;
        let issuer = match &config.enrollment {
            Some(enrollment) => Some(Arc::new(
                issuer::AgentIssuer::load(enrollment, &tls).map_err(StartError::Issuer)?,
            )),
            None => None,
        };
        let groups = match &config.groups_file {
            Some(path) => load_groups(path)?,
            None => Vec::new(),
        };
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let embedded: Option<Arc<dyn Store>> = match &config.storage {
            Storage::Embedded => Some(Arc::new(SqliteStore::open(&config.data_dir)?)),
            Storage::Etcd(etcd) => {
                // Read now, so a missing or unreadable file is named before anything starts.
                for path in [&etcd.tls.ca, &etcd.tls.cert, &etcd.tls.key] {
                    std::fs::read(path).map_err(|source| StartError::EtcdTls {
                        path: path.clone(),
                        source,
                    })?;
                }
                None
            }
        };
        Ok(Coordinator {
            config,
            tls,
            issuer,
            groups,
            embedded,
        })
    }

    /// The embedded event store and bus of one coordinator (or a replica without NATS).
    fn embedded_events(
        &self,
        tasks: &TaskTracker,
        decisions: &events::counters::DecisionCounters,
        metrics: &Arc<metrics::Metrics>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<(Arc<dyn events::EventLog>, Arc<dyn events::tail::Tails>)> {
        let (bus, bus_handle, publish) = events::bus::Bus::new(metrics.clone());
        tasks.spawn(bus.run(cancel.child_token()));
        let retention = events::store::Retention {
            max_age: self.config.events.retention,
            max_events: self.config.events.max_events,
        };
        let (event_store, events_handle) = events::store::EventStore::open(
            &self.config.data_dir,
            retention,
            publish,
            decisions.clone(),
            metrics.clone(),
        )?;
        // The event store's SQLite transactions (fsync'd group commits) run on a thread of their
        // own, never on a runtime worker that sessions and operators need.
        let runtime = tokio::runtime::Handle::current();
        let events_cancel = cancel.child_token();
        tasks.spawn_blocking(move || runtime.block_on(event_store.run(events_cancel)));
        let log: Arc<dyn events::EventLog> = Arc::new(events_handle);
        let tails = events::tail::EmbeddedTails {
            log: log.clone(),
            bus: Arc::new(bus_handle),
        };
        Ok((log, Arc::new(tails)))
    }

    pub fn trust_domain(&self) -> &str {
        self.tls.identity.trust_domain()
    }

    /// Serves on `listener` until `cancel` fires, then stops accepting and closes sessions.
    pub async fn run(self, listener: TcpListener, cancel: CancellationToken) -> anyhow::Result<()> {
        let trust_domain = self.trust_domain().to_owned();
        let tasks = TaskTracker::new();
        let metrics = Arc::new(metrics::Metrics::default());
        let mut replica = match &self.config.storage {
            Storage::Embedded => None,
            Storage::Etcd(etcd) => {
                let name = etcd.replica_name(self.config.listen);
                let address = listener.local_addr()?;
                let connect = || cluster::replica::Replica::connect(etcd, name.clone(), address);
                let Some(replica) = until_answered("connect to etcd", connect, &cancel).await
                else {
                    return Ok(());
                };
                tracing::info!(replica = %name, endpoints = %etcd.endpoints.join(","), prefix = %etcd.prefix, "state in etcd");
                Some(replica)
            }
        };
        let event_stream = match (&self.config.events.nats, &mut replica) {
            (Some(nats), Some(replica)) => {
                let stream = events::nats::EventStream::connect(nats, &replica.name).await?;
                let ensure = || stream.ensure_stream();
                if until_answered("set up the event stream", ensure, &cancel)
                    .await
                    .is_none()
                {
                    return Ok(());
                }
                tracing::info!(stream = %nats.stream, region = %nats.region, urls = %nats.urls.join(","), "events on NATS JetStream");
                replica.events = Some(stream.clone());
                Some(stream)
            }
            _ => None,
        };
        let store: Arc<dyn Store> = match (&self.embedded, &replica) {
            (Some(store), _) => store.clone(),
            (None, Some(replica)) => Arc::new(replica.store.clone()),
            (None, None) => anyhow::bail!("no store"),
        };
        let groups = match &replica {
            None => merge_groups(store.as_ref(), &self.groups).await?,
            // etcd may be slow or away at start: agents are served once it answers.
            Some(_) => {
                let merge = || merge_groups(store.as_ref(), &self.groups);
                match until_answered("read the groups", merge, &cancel).await {
                    Some(groups) => groups,
                    None => return Ok(()),
                }
            }
        };
        let (fleet, handle) = Fleet::new(self.config.liveness.clone(), &groups);
        let fleet = match &replica {
            Some(replica) => fleet.with_replica(replica.name.clone()),
            None => fleet,
        };
        tasks.spawn(
            fleet
                .with_metrics(metrics.clone())
                .run(cancel.child_token()),
        );
        // The event store loads the decision counters the engine's gates read: open it first.
        let decisions = events::counters::DecisionCounters::default();
        let (events_handle, tails): (Arc<dyn events::EventLog>, Arc<dyn events::tail::Tails>) =
            match event_stream {
                Some(stream) => (
                    Arc::new(events::nats::log::StreamLog::new(stream.clone())),
                    Arc::new(events::nats::tail::StreamTails { stream }),
                ),
                None => self.embedded_events(&tasks, &decisions, &metrics, &cancel)?,
            };
        if let Some(replica) = &mut replica {
            replica.event_log = Some(events_handle.clone());
        }
        let engine_handle = match &replica {
            // The leader runs the engine and the config sources; every replica forwards.
            Some(replica) => replica.start(
                &tasks,
                handle.clone(),
                decisions.clone(),
                metrics.clone(),
                self.config.liveness.heartbeat_interval,
                &cancel,
            ),
            None => {
                let (engine, engine_handle) = Engine::new(
                    store.clone(),
                    handle.clone(),
                    decisions.clone(),
                    metrics.clone(),
                )
                .await?;
                let engine = engine.reading_events(events_handle.clone(), None, &engine_handle);
                tasks.spawn(engine.run(cancel.child_token()));
                // Installed before serving, so an early SIGHUP cannot take its default action.
                let source_hangup = if self.config.groups_file.is_some() {
                    Some(tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::hangup(),
                    )?)
                } else {
                    None
                };
                tasks.spawn(sources::watch(
                    handle.clone(),
                    engine_handle.clone(),
                    source_hangup,
                    cancel.child_token(),
                ));
                engine_handle
            }
        };

        let revocations = match &replica {
            None => revocations::Revocations::load(store.as_ref()).await?,
            Some(_) => {
                let load = || revocations::Revocations::load(store.as_ref());
                match until_answered("read the agent revocations", load, &cancel).await {
                    Some(revocations) => revocations,
                    None => return Ok(()),
                }
            }
        };
        if replica.is_some() {
            // Another replica may revoke: follow the store.
            tasks.spawn(revocations::follow(
                revocations.clone(),
                store.clone(),
                cancel.child_token(),
            ));
        }
        let renewal_refusals = issuer::RenewalRefusals::default();
        let probes = probes::Probes::default();
        let enrollment = EnrollmentApi {
            issuer: self.issuer.clone(),
            store: store.clone(),
            fleet: handle.clone(),
            revocations: revocations.clone(),
            ca_file: self.config.tls.ca.clone(),
            binding: Default::default(),
            metrics: metrics.clone(),
            audited_refusals: std::sync::Mutex::new(grpc::enrollment::AuditWindow::new(
                std::time::Instant::now(),
            )),
        };
        let agents = AgentApi {
            fleet: handle.clone(),
            engine: engine_handle.clone(),
            store: store.clone(),
            events: events_handle.clone(),
            probes: probes.clone(),
            metrics: metrics.clone(),
            trust_domain: trust_domain.clone(),
            liveness: self.config.liveness.clone(),
            cancel: cancel.clone(),
            next_session: Arc::new(1.into()),
            known_configs: Arc::default(),
            issuer: self.issuer.clone(),
            revocations: revocations.clone(),
            renewal_refusals: renewal_refusals.clone(),
            ca_file: self.config.tls.ca.clone(),
        };
        let fleet_for_reload = handle.clone();
        if let Some(addr) = self.config.metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics_listen {addr}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics on /metrics");
            let encode = scrape(metrics.clone(), handle.clone(), engine_handle.clone());
            tasks.spawn(kt_daemon::metrics_http::serve(
                listener,
                encode,
                cancel.child_token(),
            ));
        }
        // Until events travel between replicas, say what a replica's tail shows.
        let tail_scope = match (&replica, &self.config.events.nats) {
            (Some(replica), None) => Some(format!(
                "replica {} shows the events of the agents connected to it only; tail every replica for the whole fleet (ktctl cluster status lists them), or set events.nats",
                replica.name
            )),
            _ => None,
        };
        let operators = OperatorApi {
            fleet: handle,
            engine: engine_handle,
            store: store.clone(),
            events: events_handle,
            tails,
            tail_scope,
            decisions,
            probes,
            trust_domain,
            cancel: cancel.clone(),
            replica,
            revocations,
            renewal_refusals,
        };
        let tls = server_tls::ServerTls::new(
            self.tls
                .rustls_server_config()
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?,
        );
        // Installed before serving, so an early SIGHUP cannot take its default action (exit).
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tasks.spawn(server_tls::reload_on_change(
            self.config.tls.clone(),
            self.trust_domain().to_owned(),
            tls.clone(),
            hangup,
            cancel.child_token(),
        ));
        let admission = kt_daemon::conn::Admission::new(self.config.connections.clone());
        let incoming = listener::incoming(
            listener,
            tls,
            admission,
            metrics.clone(),
            cancel.child_token(),
        );
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(AgentServiceServer::new(agents))
            .add_service(OperatorServiceServer::new(operators))
            .add_service(EnrollmentServiceServer::new(enrollment))
            .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());

        if let Some(path) = self.config.groups_file.clone() {
            // Installed before serving, so an early SIGHUP cannot take its default action (exit).
            let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let store = store.clone();
            tasks.spawn(reload_groups_on_hangup(
                path,
                hangup,
                store,
                fleet_for_reload,
                cancel.child_token(),
            ));
        }
        let mut server = std::pin::pin!(server);
        tokio::select! {
            result = &mut server => result?,
            _ = cancel.cancelled() => {
                if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                    tracing::warn!("connections still open after the grace period, closing them");
                }
            }
        }
        tasks.close();
        tasks.wait().await;
        Ok(())
    }
}

/// Groups applied by operators are kept; the groups file, when there is one, wins for the names
/// it defines (it is the configuration management's word).
async fn merge_groups(
    store: &dyn Store,
    from_file: &[Group],
) -> Result<Vec<Group>, crate::store::StoreError> {
    let mut groups = store.list_groups().await?;
    groups.retain(|stored| !from_file.iter().any(|g| g.name == stored.name));
    store.put_groups(from_file).await?;
    groups.extend(from_file.iter().cloned());
    Ok(groups)
}

/// Runs `attempt` until it succeeds, a second apart, saying what fails (the first time and then
/// at powers of two); `None` once `cancel` fires.
async fn until_answered<T, E, F, Fut>(
    what: &str,
    mut attempt: F,
    cancel: &CancellationToken,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut failures = 0u32;
    loop {
        let error = tokio::select! {
            _ = cancel.cancelled() => return None,
            result = attempt() => match result {
                Ok(value) => return Some(value),
                Err(error) => error,
            },
        };
        failures += 1;
        if failures.is_power_of_two() {
            tracing::warn!(failures, %error, "cannot {what} yet; trying again every second");
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// `systemctl reload` (SIGHUP) reads the groups file again. The file's groups replace those of
/// the same names, as at start; a file that does not parse changes nothing.
async fn reload_groups_on_hangup(
    path: std::path::PathBuf,
    mut hangup: tokio::signal::unix::Signal,
    store: Arc<dyn Store>,
    fleet: fleet::FleetHandle,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            received = hangup.recv() => if received.is_none() { return },
        }
        let groups = match load_groups(&path) {
            Ok(groups) => groups,
            Err(error) => {
                tracing::error!(%error, "groups file not reloaded: the groups stay as they were");
                continue;
            }
        };
        let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        if let Err(error) = store.put_groups(&groups).await {
            tracing::error!(%error, "cannot store the reloaded groups");
            continue;
        }
        if fleet.apply_groups(groups).await.is_err() {
            return; // shutting down
        }
        let _ = store
            .audit(
                kt_daemon::unix_ms_now(),
                "coordinator",
                "groups reload",
                &names.join(","),
                &format!("SIGHUP: {}", path.display()),
            )
            .await;
        tracing::info!(groups = %names.join(","), file = %path.display(), "groups file reloaded");
    }
}

/// What a scrape encodes: the counters, with the gauges of states read from the fleet and the
/// rollout engine first.
fn scrape(
    metrics: Arc<metrics::Metrics>,
    fleet: fleet::FleetHandle,
    engine: rollout::engine::EngineHandle,
) -> kt_daemon::metrics_http::Encode {
    Arc::new(move || {
        let (metrics, fleet, engine) = (metrics.clone(), fleet.clone(), engine.clone());
        Box::pin(async move {
            if let Ok(Ok(gateways)) = fleet.list(None).await {
                let states = gateways.iter().map(|g| {
                    kt_proto::v1::AgentState::try_from(g.agent_state)
                        .map_or("unknown", kt_proto::v1::AgentState::label)
                });
                metrics::Metrics::set_states(&metrics.agents, &AGENT_STATES, states);
            }
            if let Ok(rollouts) = engine.list().await {
                let states = rollouts.iter().map(|r| r.state_name());
                metrics::Metrics::set_states(&metrics.rollouts, &[], states);
            }
            metrics.encode()
        })
    })
}

const AGENT_STATES: [&str; 4] = ["connected", "unreachable", "disconnected", "gone"];
