//! Prometheus metrics of the agent (`metrics_listen`): its session, heartbeats, config applies
//! by result, and event forwarding (buffered, acknowledged, dropped, invalid, backlog, lag).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connected: Gauge,
    pub sessions_opened: Counter,
    pub connect_failures: Counter,
    pub heartbeats_sent: Counter,
    pub config_applies: Family<ResultLabels, Counter>,
    pub events_buffered: Counter,
    pub events_acknowledged: Counter,
    pub events_dropped: Counter,
    pub events_invalid_lines: Counter,
    /// Set at each scrape.
    pub events_backlog: Gauge,
    pub events_lag_ms: Gauge,
    /// Certificate renewals by result: renewed (promoted after a session with it), fell_back
    /// (the new certificate's session failed), failed (no new certificate).
    pub certificate_renewals: Family<ResultLabels, Counter>,
    /// 1 while the agent's certificate has expired and it could not enroll again: an operator
    /// must give it a new join token.
    pub certificate_expired: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kt_agent");
        kt_daemon::metrics_http::register_log_repeats(&mut registry);
        let connected = Gauge::default();
        registry.register(
            "connected",
            "1 while a session with the coordinator is open",
            connected.clone(),
        );
        let sessions_opened = Counter::default();
        registry.register(
            "sessions_opened",
            "Sessions opened with the coordinator",
            sessions_opened.clone(),
        );
        let connect_failures = Counter::default();
        registry.register(
            "connect_failures",
            "Failed attempts to open a session (connection, TLS handshake or refusal)",
            connect_failures.clone(),
        );
        let heartbeats_sent = Counter::default();
        registry.register(
            "heartbeats_sent",
            "Heartbeats sent",
            heartbeats_sent.clone(),
        );
        let config_applies = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_applies",
            "Answers to config offers by result",
            config_applies.clone(),
        );
        let events_buffered = Counter::default();
        registry.register(
            "events_buffered",
            "Events read from the gateway's events file into the buffer",
            events_buffered.clone(),
        );
        let events_acknowledged = Counter::default();
        registry.register(
            "events_acknowledged",
            "Events the coordinator acknowledged as stored",
            events_acknowledged.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Events dropped from a full buffer (each in a gap record)",
            events_dropped.clone(),
        );
        let events_invalid_lines = Counter::default();
        registry.register(
            "events_invalid_lines",
            "Lines of the events file skipped as invalid",
            events_invalid_lines.clone(),
        );
        let events_backlog = Gauge::default();
        registry.register(
            "events_backlog",
            "Events buffered, not yet acknowledged",
            events_backlog.clone(),
        );
        let events_lag_ms = Gauge::default();
        registry.register(
            "events_lag_ms",
            "Age of the oldest buffered event, in milliseconds",
            events_lag_ms.clone(),
        );
        let certificate_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_renewals",
            "Certificate renewals by result (renewed, fell_back, failed)",
            certificate_renewals.clone(),
        );
        let certificate_expired = Gauge::default();
        registry.register(
            "certificate_expired",
            "1 while the certificate has expired and enrolling again failed (a new join token is needed)",
            certificate_expired.clone(),
        );
        Metrics {
            registry,
            certificate_renewals,
            certificate_expired,
            connected,
            sessions_opened,
            connect_failures,
            heartbeats_sent,
            config_applies,
            events_buffered,
            events_acknowledged,
            events_dropped,
            events_invalid_lines,
            events_backlog,
            events_lag_ms,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        kt_daemon::metrics_http::encode(&self.registry)
    }
}
