//! The gateway's HTTP surface: the OpenAI-compatible API and the operations endpoints.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::proxy;

pub fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/models", get(proxy::models))
        .route("/health", get(health))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/reload", post(reload))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(proxy::MAX_REQUEST_BYTES))
        .with_state(gateway)
}

/// Serves until `cancel` fires, then lets in-flight requests finish.
pub async fn serve(
    gateway: Gateway,
    listener: TcpListener,
    limits: crate::listener::Limits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let metrics = gateway.metrics_handle();
    crate::listener::serve(router(gateway), listener, limits, metrics, cancel).await;
    Ok(())
}

async fn health(State(gateway): State<Gateway>) -> impl IntoResponse {
    Json(gateway.health())
}

/// Ready once a valid config is loaded; the gateway never runs without one, so this answers
/// ready whenever it answers at all, and says which config it serves.
async fn ready(State(gateway): State<Gateway>) -> impl IntoResponse {
    let current = gateway.current();
    format!(
        "ready: {} {}\n",
        current.config.version, current.config.hash
    )
}

async fn metrics(State(gateway): State<Gateway>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gateway.metrics().encode(),
    )
}

/// `POST /admin/reload`, from loopback only: validate, then swap.
async fn reload(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> impl IntoResponse {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            Json(
                json!({ "error": { "message": "reload is allowed from loopback only", "type": "forbidden" } }),
            ),
        );
    }
    match gateway.reload() {
        Ok(()) => {
            let current = gateway.current();
            (
                StatusCode::OK,
                Json(
                    json!({ "reloaded": true, "version": current.config.version, "hash": current.config.hash }),
                ),
            )
        }
        Err(errors) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "reloaded": false, "errors": errors.errors })),
        ),
    }
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({ "error": { "message": "no such endpoint", "type": "invalid_request_error", "code": "not_found" } }),
        ),
    )
}
