//! Prometheus metrics of the gateway, served at `/metrics`.

use kt_daemon::conn::ReasonLabels;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub target: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<VerdictLabels, Counter>,
    pub policy_results: Family<PolicyLabels, Counter>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    /// Requests whose `x-kt-synthetic` header did not carry the probe token (counted as usual).
    pub synthetic_refused: Counter,
    /// Connections closed before being served, by reason.
    pub connections_refused: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kt_gateway");
        kt_daemon::metrics_http::register_log_repeats(&mut registry);
        let requests = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "requests",
            "Chat completion requests by final verdict",
            requests.clone(),
        );
        let policy_results = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "policy_results",
            "Policy evaluations by policy and result",
            policy_results.clone(),
        );
        // 50 us .. ~3.5 min
        let request_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 22));
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            request_duration.clone(),
        );
        let upstream_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 22));
        registry.register(
            "upstream_duration_seconds",
            "Time the provider took to answer",
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Provider failures by target and kind",
            upstream_errors.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by result",
            reloads.clone(),
        );
        let synthetic_refused = Counter::default();
        registry.register(
            "synthetic_refused",
            "Requests marked x-kt-synthetic without the probe token (treated as ordinary requests)",
            synthetic_refused.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed before being served, by reason",
            connections_refused.clone(),
        );
        Metrics {
            registry,
            synthetic_refused,
            connections_refused,
            requests,
            policy_results,
            request_duration,
            upstream_duration,
            upstream_errors,
            reloads,
        }
    }
}

impl Metrics {
    /// The Prometheus (OpenMetrics) text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn upstream_error(&self, target: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                target: target.to_owned(),
                kind,
            })
            .inc();
    }
}
