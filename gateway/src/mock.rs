//! `kt-gateway mock-provider`: a deterministic OpenAI-compatible provider for tests and demos.
//!
//! The reply's content echoes the last user message it received, so a caller sees exactly what
//! the gateway forwarded (a redaction shows). Switches inject latency, errors and garbage.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Fault injection for the mock provider.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct MockOptions {
    /// Wait this long before answering each chat request.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Answer every Nth chat request with `--error-status` (0: never).
    #[arg(long, default_value_t = 0)]
    pub error_every: u64,
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Answer chat requests with 200 and a body that is not JSON.
    #[arg(long)]
    pub garbage: bool,
}

#[derive(Clone)]
struct Mock {
    options: MockOptions,
    requests: Arc<AtomicU64>,
}

pub fn router(options: MockOptions) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .with_state(Mock {
            options,
            requests: Arc::new(AtomicU64::new(0)),
        })
}

pub async fn serve(
    options: MockOptions,
    listener: TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(options))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn models() -> Json<Value> {
    Json(json!({ "object": "list", "data": [
        { "id": "mock-small", "object": "model", "owned_by": "mock" },
        { "id": "mock-large", "object": "model", "owned_by": "mock" },
    ]}))
}

async fn chat(State(mock): State<Mock>, body: Bytes) -> Response {
    let n = mock.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if mock.options.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(mock.options.latency_ms)).await;
    }
    if mock.options.error_every > 0 && n.is_multiple_of(mock.options.error_every) {
        let status = StatusCode::from_u16(mock.options.error_status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (
            status,
            Json(json!({ "error": { "message": "injected failure", "type": "mock_error" } })),
        )
            .into_response();
    }
    if mock.options.garbage {
        return (StatusCode::OK, "<html>definitely not json").into_response();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({ "error": { "message": "invalid JSON", "type": "invalid_request_error" } }),
            ),
        )
            .into_response();
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-small")
        .to_owned();
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let reply = last_user_text(&messages);
    let prompt_tokens: usize = messages.iter().map(|m| words(&content_text(m))).sum();
    let completion_tokens = words(&reply);
    let id = format!("chatcmpl-mock-{n}");
    if request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return stream(id, model, reply);
    }
    Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": reply }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens },
    }))
    .into_response()
}

/// Server-sent events, one chunk per word, then `[DONE]`.
fn stream(id: String, model: String, reply: String) -> Response {
    let mut events: Vec<Result<Bytes, std::io::Error>> = Vec::new();
    let pieces: Vec<String> = reply.split_inclusive(' ').map(str::to_owned).collect();
    for piece in pieces {
        let chunk = json!({ "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{ "index": 0, "delta": { "content": piece }, "finish_reason": null }] });
        events.push(Ok(Bytes::from(format!("data: {chunk}\n\n"))));
    }
    let last = json!({ "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{ "index": 0, "delta": {}, "finish_reason": "stop" }] });
    events.push(Ok(Bytes::from(format!("data: {last}\n\n"))));
    events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    let mut response = Response::new(Body::from_stream(futures_util::stream::iter(events)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn last_user_text(messages: &[Value]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(content_text)
        .unwrap_or_default()
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}
