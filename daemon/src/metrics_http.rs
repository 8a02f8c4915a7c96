//! The daemons' Prometheus endpoint: `GET /metrics` on a listener of its own, opt-in with
//! `metrics_listen` in a daemon's config. It is plain HTTP, read-only, and serves nothing but
//! counters (no secrets, no fleet data beyond counts); bind it to loopback or a scrape network.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Produces the OpenMetrics text at each scrape (gauges may be read from live state first).
pub type Encode = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Registers `log_lines_suppressed` (see [`crate::repeats`]) in a daemon's registry.
pub fn register_log_repeats(registry: &mut prometheus_client::registry::Registry) {
    registry.register_collector(Box::new(SuppressedLogLines));
}

#[derive(Debug)]
struct SuppressedLogLines;

impl prometheus_client::collector::Collector for SuppressedLogLines {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter = prometheus_client::metrics::counter::ConstCounter::new(
            crate::repeats::suppressed_total(),
        );
        let metric = encoder.encode_descriptor(
            "log_lines_suppressed",
            "Warning and error lines not written because their call site repeated too often",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// The OpenMetrics text of `registry`.
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    out
}

/// Serves `GET /metrics` on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, encode: Encode, cancel: CancellationToken) {
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let encode = encode.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    encode().await,
                )
                    .into_response()
            }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "metrics endpoint stopped");
    }
}
