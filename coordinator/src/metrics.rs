//! Prometheus metrics of the coordinator (`metrics_listen`): agents by state, heartbeats,
//! rollouts by state, gate evaluations, config applies by result, events in, out and dropped,
//! and how far the slowest tail subscriber lags.

use kt_daemon::conn::ReasonLabels;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabels {
    pub gate: String,
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Set at each scrape from the fleet.
    pub agents: Family<StateLabels, Gauge>,
    pub heartbeats: Counter,
    /// From a heartbeat's arrival to the fleet task having recorded it.
    pub heartbeat_processing: Histogram,
    /// Set at each scrape from the rollout engine.
    pub rollouts: Family<StateLabels, Gauge>,
    pub gate_evaluations: Family<GateLabels, Counter>,
    pub config_applies: Family<ResultLabels, Counter>,
    pub events_stored: Counter,
    pub events_lost_by_agents: Counter,
    pub events_delivered: Counter,
    pub events_missed_by_subscribers: Counter,
    pub subscribers: Gauge,
    pub subscriber_lag: Gauge,
    /// Agent messages refused for fields out of bounds (the session ends).
    pub agent_messages_refused: Counter,
    /// Connections closed before they were served, by reason.
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Open connections (TLS established or in handshake).
    pub connections_open: Gauge,
    /// Agent certificate renewals, by result (renewed, refused).
    pub certificate_renewals: Family<ResultLabels, Counter>,
    /// Enrollments, by result (enrolled, refused, refused_unaudited: past the audit's rate).
    pub enrollments: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kt_coordinator");
        let agents = Family::<StateLabels, Gauge>::default();
        registry.register("agents", "Gateways by agent state", agents.clone());
        let heartbeats = Counter::default();
        registry.register(
            "heartbeats",
            "Heartbeats received from agents",
            heartbeats.clone(),
        );
        // 10 us .. ~5 s
        let heartbeat_processing = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        registry.register(
            "heartbeat_processing_seconds",
            "Time from a heartbeat's arrival to the fleet task having recorded it",
            heartbeat_processing.clone(),
        );
        let rollouts = Family::<StateLabels, Gauge>::default();
        registry.register("rollouts", "Rollouts by state", rollouts.clone());
        let gate_evaluations = Family::<GateLabels, Counter>::default();
        registry.register(
            "gate_evaluations",
            "Rollout gate evaluations by gate and decision",
            gate_evaluations.clone(),
        );
        let config_applies = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_applies",
            "Agents' answers to config offers by result",
            config_applies.clone(),
        );
        let events_stored = Counter::default();
        registry.register(
            "events_stored",
            "Decision events stored (duplicates excluded)",
            events_stored.clone(),
        );
        let events_lost_by_agents = Counter::default();
        registry.register(
            "events_lost_by_agents",
            "Events agents dropped from full buffers, as their gap records say",
            events_lost_by_agents.clone(),
        );
        let events_delivered = Counter::default();
        registry.register(
            "events_delivered",
            "Events handed to tail subscribers",
            events_delivered.clone(),
        );
        let events_missed_by_subscribers = Counter::default();
        registry.register(
            "events_missed_by_subscribers",
            "Events tail subscribers missed because they read too slowly",
            events_missed_by_subscribers.clone(),
        );
        let subscribers = Gauge::default();
        registry.register("subscribers", "Live tail subscribers", subscribers.clone());
        let subscriber_lag = Gauge::default();
        registry.register(
            "subscriber_lag",
            "Events queued for the slowest tail subscriber",
            subscriber_lag.clone(),
        );
        let agent_messages_refused = Counter::default();
        registry.register(
            "agent_messages_refused",
            "Agent messages refused because a field was out of bounds",
            agent_messages_refused.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed before being served, by reason",
            connections_refused.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Open connections, in TLS handshake or established",
            connections_open.clone(),
        );
        let certificate_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_renewals",
            "Agent certificate renewals, by result (renewed, refused)",
            certificate_renewals.clone(),
        );
        let enrollments = Family::<ResultLabels, Counter>::default();
        registry.register(
            "enrollments",
            "Agent enrollments by result (enrolled, refused, refused_unaudited)",
            enrollments.clone(),
        );
        kt_daemon::metrics_http::register_log_repeats(&mut registry);
        Metrics {
            enrollments,
            registry,
            agent_messages_refused,
            connections_refused,
            connections_open,
            certificate_renewals,
            agents,
            heartbeats,
            heartbeat_processing,
            rollouts,
            gate_evaluations,
            config_applies,
            events_stored,
            events_lost_by_agents,
            events_delivered,
            events_missed_by_subscribers,
            subscribers,
            subscriber_lag,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        kt_daemon::metrics_http::encode(&self.registry)
    }

    /// Replaces a gauge family's values with `counts`; the states in `all` are always present.
    pub fn set_states<'a>(
        family: &Family<StateLabels, Gauge>,
        all: &[&str],
        counts: impl Iterator<Item = &'a str>,
    ) {
        family.clear();
        for state in all {
            family
                .get_or_create(&StateLabels {
                    state: (*state).to_owned(),
                })
                .set(0);
        }
        for state in counts {
            family
                .get_or_create(&StateLabels {
                    state: state.to_owned(),
                })
                .inc();
        }
    }
}
