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
