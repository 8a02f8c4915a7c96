//! One replica of a replicated control plane: the tasks every replica runs (its lease, its
//! fleet records, offer delivery, operator requests) and the duties of a leader's term (the
//! rollout engine, config sources, taking requests and answers).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::election::{self, Leadership};
use super::keys::{Keys, kind};
use super::offers::{self, OfferRoute};
use super::requests::{self, Forwarder};
use super::store::EtcdStore;
use super::{fleet_sync, lease};
use crate::config::EtcdStorage;
use crate::events::counters::DecisionCounters;
use crate::events::nats::{EventStream, counting};
use crate::fleet::{Command, FleetHandle};
use crate::metrics::Metrics;
use crate::rollout::engine::{Engine, EngineHandle};
use crate::store::Store;

/// What a replica needs from etcd, connected.
#[derive(Clone)]
pub struct Replica {
    pub client: Client,
    pub keys: Keys,
    pub name: String,
    pub settings: EtcdStorage,
    pub store: EtcdStore,
    /// Where agents and operators reach this replica (registered for `cluster status`).
    pub address: std::net::SocketAddr,
    /// The event stream (`events.nats`): the leader counts decisions from it.
    pub events: Option<EventStream>,
    /// Where the leader's shadow runs read their reports.
    pub event_log: Option<Arc<dyn crate::events::EventLog>>,
}

impl Replica {
    pub async fn connect(
        settings: &EtcdStorage,
        name: String,
        address: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        let client =
            crate::etcd::connect(&settings.endpoints, &settings.tls, settings.request_timeout)
                .await?;
        let keys = Keys::new(&settings.prefix);
        let store = EtcdStore::new(
            client.clone(),
            keys.clone(),
            name.clone(),
            settings.request_timeout,
        );
        Ok(Replica {
            client,
            keys,
            name,
            settings: settings.clone(),
            store,
            address,
            events: None,
            event_log: None,
        })
    }

    /// Starts every task of this replica on `tasks`; returns the engine handle its operators and
    /// agents use (commands travel to the leader through etcd).
    pub fn start(
        &self,
        tasks: &TaskTracker,
        fleet: FleetHandle,
        decisions: DecisionCounters,
        metrics: Arc<Metrics>,
        heartbeat_interval: Duration,
        cancel: &CancellationToken,
    ) -> EngineHandle {
        let (grants_tx, grants) = watch::channel(None);
        let timeout = self.settings.request_timeout;
        tasks.spawn(lease::keep(
            self.client.clone(),
            self.settings.lease_ttl,
            timeout,
            grants_tx,
            cancel.child_token(),
        ));
        // Heartbeat times reach other replicas at most this often (bakes there need them).
        let refresh = heartbeat_interval.max(Duration::from_secs(1));
        tasks.spawn(fleet_sync::publish(
            self.client.clone(),
            self.keys.clone(),
            self.name.clone(),
            fleet.clone(),
            grants.clone(),
            refresh,
            cancel.child_token(),
        ));
        tasks.spawn(fleet_sync::follow(
            self.client.clone(),
            self.keys.clone(),
            fleet.clone(),
            cancel.child_token(),
        ));
        tasks.spawn(super::status::register(
            self.client.clone(),
            self.keys.clone(),
            self.name.clone(),
            self.address,
            grants.clone(),
            cancel.child_token(),
        ));
        tasks.spawn(fleet_sync::follow_groups(
            self.client.clone(),
            self.keys.clone(),
            fleet.clone(),
            cancel.child_token(),
        ));
        tasks.spawn(fleet_sync::follow_views(
            self.client.clone(),
            self.keys.clone(),
            fleet.clone(),
            cancel.child_token(),
        ));
        tasks.spawn(offers::deliver(
            self.client.clone(),
            self.keys.clone(),
            self.store.clone(),
            fleet.clone(),
            cancel.child_token(),
        ));
        if let Some(events) = &self.events {
            tasks.spawn(counting::follow(
                self.client.clone(),
                self.keys.clone(),
                events.settings.stream.clone(),
                decisions.clone(),
                cancel.child_token(),
            ));
        }
        let (handle, commands) = EngineHandle::channel();
        let forwarder = Forwarder::new(
            self.client.clone(),
            self.keys.clone(),
            self.name.clone(),
            grants.clone(),
            timeout,
        );
        tasks.spawn(forwarder.serve(commands, cancel.child_token()));
        let replica = self.clone();
        tasks.spawn(election::lead(
            self.client.clone(),
            self.keys.clone(),
            self.name.clone(),
            grants,
            move |leadership| {
                replica.clone().lead(
                    leadership,
                    fleet.clone(),
                    decisions.clone(),
                    metrics.clone(),
                )
            },
            cancel.child_token(),
        ));
        handle
    }

    /// A leader's term: runs the engine and what feeds it until the term ends.
    async fn lead(
        self,
        leadership: Leadership,
        fleet: FleetHandle,
        decisions: DecisionCounters,
        metrics: Arc<Metrics>,
    ) {
        let term = leadership.lost.clone();
        // Answers to this term's offers are followed from before its first offer.
        let Some(answers_from) =
            super::watch::revision_now(&self.client, &self.keys.all(kind::ANSWER), &term).await
        else {
            return;
        };
        let fenced = self.store.fenced(&leadership);
        let store: Arc<dyn Store> = Arc::new(fenced.clone());
        let (engine, engine_handle) =
            match Engine::new(store, fleet.clone(), decisions.clone(), metrics).await {
                Ok(engine) => engine,
                Err(error) => {
                    tracing::warn!(%error, "cannot load the state to lead; giving the term up");
                    term.cancel();
                    return;
                }
            };
        let duties = TaskTracker::new();
        if let Some(events) = &self.events {
            // Counting starts from the last checkpoint before the engine reads the counters.
            duties.spawn(counting::count(
                events.clone(),
                fenced.clone(),
                decisions.clone(),
                term.clone(),
            ));
        }
        let (offers, queued) = offers::offer_queue();
        let engine = match &self.event_log {
            Some(log) => {
                let scope = self.events.is_none().then(|| {
                    format!(
                        "the leader ({}) counts the events of the agents connected to it only; set events.nats for the whole fleet",
                        self.name
                    )
                });
                engine.reading_events(log.clone(), scope, &engine_handle)
            }
            None => engine,
        };
        let engine = engine.leading(
            leadership.epoch.clone(),
            OfferRoute::Etcd(offers),
            &self.name,
        );
        duties.spawn(offers::write_offers(fenced, queued, term.clone()));
        if fleet.send(Command::Leading(true)).await.is_err() {
            return;
        }
        duties.spawn(engine.run(term.clone()));
        duties.spawn(fleet_sync::publish_views(
            self.store.fenced(&leadership),
            fleet.clone(),
            leadership.lease,
            term.clone(),
        ));
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        duties.spawn(crate::sources::watch(
            fleet.clone(),
            engine_handle.clone(),
            hangup,
            term.clone(),
        ));
        duties.spawn(requests::serve_requests(
            self.client.clone(),
            self.keys.clone(),
            engine_handle.clone(),
            self.settings.request_timeout,
            term.clone(),
        ));
        duties.spawn(requests::follow_answers(
            self.client.clone(),
            self.keys.clone(),
            engine_handle,
            answers_from + 1,
            term.clone(),
        ));
        duties.close();
        term.cancelled().await;
        duties.wait().await;
        let _ = fleet.send(Command::Leading(false)).await;
    }
}
