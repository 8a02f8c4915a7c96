//! The gateway's HTTP surface: operations endpoints now, the OpenAI-compatible API next.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

pub fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .fallback(not_implemented)
        .with_state(gateway)
}

/// Serves until `cancel` fires, then lets in-flight requests finish.
pub async fn serve(
    gateway: Gateway,
    listener: TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(gateway))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn health(State(gateway): State<Gateway>) -> impl IntoResponse {
    Json(gateway.health())
}

/// Every API request is counted, even before the proxy exists, so `requests_processed` is real.
async fn not_implemented(State(gateway): State<Gateway>) -> impl IntoResponse {
    gateway.count_request();
    (
        StatusCode::NOT_IMPLEMENTED,
        Json(serde_json::json!({
            "error": {
                "message": "this endpoint is not served by this gateway version",
                "type": "not_implemented",
                "code": "not_implemented"
            }
        })),
    )
}
