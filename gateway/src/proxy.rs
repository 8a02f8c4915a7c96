//! `POST /v1/chat/completions` and `GET /v1/models`: parse, evaluate the policy chain, forward.
//!
//! Every chat request ends in exactly one decision event, whatever happens: a malformed body,
//! a block, a provider that hangs. Errors are OpenAI-style JSON (`{"error": {...}}`) with the
//! status an OpenAI client expects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cache;
use crate::events::DecisionEvent;
use crate::gateway::{Gateway, LoadedConfig};
use crate::metrics::{PolicyLabels, VerdictLabels};
use crate::policy::{Decision, Input, MessageText, Verdict};
use crate::providers::ResolvedTarget;

/// Request bodies larger than this are refused with 413.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// Provider answers larger than this are refused with 502.
const MAX_UPSTREAM_BYTES: usize = 16 * 1024 * 1024;

/// A failure answered to the caller.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: String,
    pub message: String,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code: code.into(),
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    pub fn body(&self) -> Value {
        let mut error =
            json!({ "message": self.message, "type": self.kind, "code": self.code, "param": null });
        if self.kind.starts_with("policy_") {
            error["reason_code"] = json!(self.code);
        }
        json!({ "error": error })
    }
}

/// Where one message text sits in the request body: `messages[i].content` or
/// `messages[i].content[j].text`.
#[derive(Clone, Copy, Debug)]
struct TextSlot {
    message: usize,
    part: Option<usize>,
}

/// What the handler learns about a request, for its decision event.
struct Exchange {
    started: Instant,
    request_id: String,
    config: Arc<LoadedConfig>,
    model: String,
    stream: bool,
    prompt_sha256: String,
    decision: Decision,
    target: Option<ResolvedTarget>,
    cached: bool,
    usage: Option<Value>,
    /// A synthetic probe (`x-kt-synthetic` with the gateway's probe token, sent by `ktctl doctor`
    /// through the agent): marked in its decision event and left out of the verdict counters.
    synthetic: bool,
    /// The shadow config as the request started, and what it decided.
    shadow: Option<Arc<crate::shadow::ShadowConfig>>,
    shadow_outcome: Option<crate::shadow::ShadowOutcome>,
}

/// The request header that marks a synthetic probe.
pub const SYNTHETIC_HEADER: &str = "x-kt-synthetic";
/// The response header that carries the verdict, so a probe need not parse bodies.
pub const VERDICT_HEADER: &str = "x-kt-verdict";

pub async fn chat_completions(
    State(gateway): State<Gateway>,
    request: axum::extract::Request,
) -> Response {
    gateway.count_request();
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let mut exchange = Exchange {
        started: Instant::now(),
        request_id: request_id(&headers),
        config: gateway.current(),
        model: String::new(),
        stream: false,
        prompt_sha256: String::new(),
        decision: Decision {
            verdict: Verdict::Allow,
            reason_code: String::new(),
            evaluated: Vec::new(),
        },
        target: None,
        cached: false,
        usage: None,
        synthetic: gateway.is_synthetic(headers.get(SYNTHETIC_HEADER).map(|v| v.as_bytes())),
        shadow: gateway.shadow(),
        shadow_outcome: None,
    };
    let result = handle(&gateway, &mut exchange, &headers, body).await;
    let (status, error, response) = match result {
        Ok(response) => (response.status(), None, response),
        Err(error) => {
            let response = (error.status, axum::Json(error.body())).into_response();
            (error.status, Some(error), response)
        }
    };
    finish(&gateway, exchange, status, error, response).await
}

async fn handle(
    gateway: &Gateway,
    exchange: &mut Exchange,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(headers, body).await?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::invalid(format!("request body is not valid UTF-8: {e}")))?;
    let mut request: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
    let object = request
        .as_object()
        .ok_or_else(|| ApiError::invalid("request body must be a JSON object"))?;
    exchange.model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return Err(ApiError::invalid("`model` must be a non-empty string")),
    };
    exchange.stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("`stream` must be a boolean")),
    };
    let max_tokens = match object
        .get("max_tokens")
        .or_else(|| object.get("max_completion_tokens"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| ApiError::invalid("`max_tokens` must be a non-negative integer"))?,
        ),
    };
    let messages = object
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("`messages` must be an array"))?;
    let (slots, texts) = extract_texts(messages)?;
    exchange.prompt_sha256 = prompt_hash(&texts);

    let config = exchange.config.clone();
    let candidates: Vec<&ResolvedTarget> = config
        .targets
        .iter()
        .filter(|t| t.target.model == exchange.model)
        .collect();
    let target = candidates.iter().find(|t| t.unavailable.is_none()).copied();
    // Recorded even when a policy stops the request: the event says where it would have gone.
    exchange.target = target.cloned();

    let provider = target
        .or(candidates.first().copied())
        .map(|t| t.target.provider.as_str());
    // The shadow sees the request as the active chain does, before any redaction, on its own
    // copy: it decides nothing.
    let shadow_outcome = exchange.shadow.clone().map(|shadow| {
        let mut input = Input {
            model: &exchange.model,
            provider,
            max_tokens,
            messages: texts.clone(),
        };
        crate::shadow::evaluate(&shadow, &mut input)
    });
    exchange.shadow_outcome = shadow_outcome;
    let mut input = Input {
        model: &exchange.model,
        provider,
        max_tokens,
        messages: texts.clone(),
    };
    if config.config.enabled {
        exchange.decision = config.config.chain.evaluate(&mut input);
    }
    match exchange.decision.verdict {
        Verdict::Block => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "policy_violation",
                exchange.decision.reason_code.clone(),
                format!(
                    "request blocked by policy ({})",
                    exchange.decision.reason_code
                ),
            ));
        }
        Verdict::Escalate => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "policy_escalation",
                exchange.decision.reason_code.clone(),
                format!(
                    "request held for human review ({}); it was not sent to the provider",
                    exchange.decision.reason_code
                ),
            ));
        }
        Verdict::Redact | Verdict::Allow => {}
    }
    write_back(&mut request, &slots, &texts, &input.messages);

    let Some(target) = target else {
        return Err(match candidates.first() {
            Some(unavailable) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "provider_unavailable",
                "provider_unavailable",
                format!(
                    "no provider target for model {:?} is available: {}",
                    exchange.model,
                    unavailable.unavailable.as_deref().unwrap_or("unavailable")
                ),
            ),
            None => ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("no provider target serves model {:?}", exchange.model),
            ),
        });
    };
    let forwarded =
        Bytes::from(serde_json::to_vec(&request).map_err(|e| ApiError::invalid(e.to_string()))?);
    if exchange.stream {
        forward_stream(gateway, target, forwarded, config.config.request_timeout).await
    } else {
        forward(gateway, exchange, target, forwarded).await
    }
}

/// Reads at most `MAX_REQUEST_BYTES`; an announced length over it is refused before reading.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body is larger than {MAX_REQUEST_BYTES} bytes"),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > MAX_REQUEST_BYTES as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, MAX_REQUEST_BYTES)
        .await
        .map_err(|e| {
            let limited = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limited {
                too_large()
            } else {
                ApiError::invalid(format!("cannot read request body: {e}"))
            }
        })
}

fn extract_texts(messages: &[Value]) -> Result<(Vec<TextSlot>, Vec<MessageText>), ApiError> {
    let mut slots = Vec::new();
    let mut texts = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(format!("messages[{i}].role must be a string")))?;
        match message.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => {
                slots.push(TextSlot {
                    message: i,
                    part: None,
                });
                texts.push(MessageText {
                    role: role.to_owned(),
                    text: text.clone(),
                });
            }
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        slots.push(TextSlot {
                            message: i,
                            part: Some(j),
                        });
                        texts.push(MessageText {
                            role: role.to_owned(),
                            text: text.to_owned(),
                        });
                    }
                }
            }
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].content must be a string or an array of parts"
                )));
            }
        }
    }
    Ok((slots, texts))
}

/// Puts rewritten (redacted) texts back where they came from.
fn write_back(
    request: &mut Value,
    slots: &[TextSlot],
    before: &[MessageText],
    after: &[MessageText],
) {
    for ((slot, old), new) in slots.iter().zip(before).zip(after) {
        if old.text == new.text {
            continue;
        }
        let content = &mut request["messages"][slot.message]["content"];
        match slot.part {
            None => *content = Value::String(new.text.clone()),
            Some(j) => content[j]["text"] = Value::String(new.text.clone()),
        }
    }
}

/// SHA-256 over the roles and texts: events carry this, never the prompt.
fn prompt_hash(texts: &[MessageText]) -> String {
    let mut hasher = Sha256::new();
    for t in texts {
        hasher.update(t.role.as_bytes());
        hasher.update([0]);
        hasher.update(t.text.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

async fn forward(
    gateway: &Gateway,
    exchange: &mut Exchange,
    target: &ResolvedTarget,
    body: Bytes,
) -> Result<Response, ApiError> {
    let cache = &exchange.config.cache;
    let key = cache
        .enabled()
        .then(|| cache::key(&target.target.id, &body));
    if let Some(hit) = key.as_ref().and_then(|k| cache.get(k)) {
        exchange.cached = true;
        exchange.usage = usage_of(&hit);
        return Ok(json_response(StatusCode::OK, hit));
    }
    let timeout = exchange.config.config.request_timeout;
    let started = Instant::now();
    let exchange_result = tokio::time::timeout(timeout, async {
        let response = send(gateway, target, body).await?;
        let status = response.status();
        let bytes = read_limited(response).await.map_err(|e| {
            upstream(
                gateway,
                target,
                "invalid_response",
                StatusCode::BAD_GATEWAY,
                e,
            )
        })?;
        Ok::<_, ApiError>((status, bytes))
    })
    .await;
    gateway
        .metrics()
        .upstream_duration
        .observe(started.elapsed().as_secs_f64());
    let (status, bytes) = match exchange_result {
        Ok(result) => result?,
        Err(_) => return Err(timed_out(gateway, target, timeout)),
    };
    if !status.is_success() {
        return Err(upstream_status(gateway, target, status, &bytes));
    }
    let parsed: Value = serde_json::from_slice(&bytes)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            upstream(
                gateway,
                target,
                "invalid_response",
                StatusCode::BAD_GATEWAY,
                "provider answered with something that is not a JSON object",
            )
        })?;
    exchange.usage = parsed.get("usage").cloned();
    if let Some(key) = key {
        cache.put(key, bytes.clone());
    }
    Ok(json_response(status, bytes))
}

async fn forward_stream(
    gateway: &Gateway,
    target: &ResolvedTarget,
    body: Bytes,
    timeout: Duration,
) -> Result<Response, ApiError> {
    // The timeout covers the wait for response headers; a stream may then run as long as it flows.
    let response = match tokio::time::timeout(timeout, send(gateway, target, body)).await {
        Ok(result) => result?,
        Err(_) => return Err(timed_out(gateway, target, timeout)),
    };
    let status = response.status();
    if !status.is_success() {
        let bytes = read_limited(response).await.unwrap_or_default();
        return Err(upstream_status(gateway, target, status, &bytes));
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("text/event-stream"));
    let stream = response
        .bytes_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    out.headers_mut().insert(header::CONTENT_TYPE, content_type);
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(out)
}

async fn send(
    gateway: &Gateway,
    target: &ResolvedTarget,
    body: Bytes,
) -> Result<reqwest::Response, ApiError> {
    let mut request = gateway
        .http()
        .post(target.url("chat/completions"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    request.send().await.map_err(|e| {
        if e.is_connect() {
            upstream(
                gateway,
                target,
                "unreachable",
                StatusCode::BAD_GATEWAY,
                "cannot connect to the provider",
            )
        } else if e.is_timeout() {
            upstream(
                gateway,
                target,
                "timeout",
                StatusCode::GATEWAY_TIMEOUT,
                "the provider timed out",
            )
        } else {
            upstream(
                gateway,
                target,
                "transport",
                StatusCode::BAD_GATEWAY,
                format!("request to the provider failed: {e}"),
            )
        }
    })
}

async fn read_limited(mut response: reqwest::Response) -> Result<Bytes, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the provider's answer failed: {e}"))?
    {
        if body.len() + chunk.len() > MAX_UPSTREAM_BYTES {
            return Err(format!(
                "the provider's answer is larger than {MAX_UPSTREAM_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

fn timed_out(gateway: &Gateway, target: &ResolvedTarget, timeout: Duration) -> ApiError {
    upstream(
        gateway,
        target,
        "timeout",
        StatusCode::GATEWAY_TIMEOUT,
        format!("provider did not answer within {timeout:?}"),
    )
}

fn upstream(
    gateway: &Gateway,
    target: &ResolvedTarget,
    kind: &'static str,
    status: StatusCode,
    message: impl Into<String>,
) -> ApiError {
    gateway.metrics().upstream_error(&target.target.id, kind);
    let message = format!("provider target {}: {}", target.target.id, message.into());
    ApiError::new(
        status,
        "upstream_error",
        format!("upstream_{kind}"),
        message,
    )
}

/// A provider's non-2xx answer: 4xx pass through with their status (the caller's request was
/// wrong or limited), 5xx become 502.
fn upstream_status(
    gateway: &Gateway,
    target: &ResolvedTarget,
    status: StatusCode,
    body: &[u8],
) -> ApiError {
    let detail = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let message = if detail.is_empty() {
        format!("answered {status}")
    } else {
        format!("answered {status}: {detail}")
    };
    if status.is_client_error() {
        gateway
            .metrics()
            .upstream_error(&target.target.id, "client_error");
        let code = if status == StatusCode::TOO_MANY_REQUESTS {
            "rate_limited"
        } else {
            "upstream_client_error"
        };
        ApiError::new(
            status,
            "upstream_error",
            code,
            format!("provider target {}: {message}", target.target.id),
        )
    } else {
        upstream(
            gateway,
            target,
            "server_error",
            StatusCode::BAD_GATEWAY,
            message,
        )
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn usage_of(body: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("usage").cloned())
}

/// Takes a well-formed `x-request-id` from the caller, or makes one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req-{:032x}", rand::random::<u128>()))
}

/// Records the decision event and metrics, and stamps the response with the request id.
async fn finish(
    gateway: &Gateway,
    exchange: Exchange,
    status: StatusCode,
    error: Option<ApiError>,
    mut response: Response,
) -> Response {
    let decision = &exchange.decision;
    let verdict = decision.verdict;
    if !exchange.synthetic {
        gateway.count_verdict(verdict);
    }
    if status.is_server_error() {
        gateway.count_error();
    }
    let metrics = gateway.metrics();
    metrics
        .requests
        .get_or_create(&VerdictLabels {
            verdict: verdict.as_str(),
        })
        .inc();
    for outcome in &decision.evaluated {
        metrics
            .policy_results
            .get_or_create(&PolicyLabels {
                policy: outcome.name,
                result: outcome.result.as_str(),
            })
            .inc();
    }
    let elapsed = exchange.started.elapsed();
    metrics.request_duration.observe(elapsed.as_secs_f64());
    let token = |name: &str| {
        exchange
            .usage
            .as_ref()
            .and_then(|u| u.get(name))
            .and_then(Value::as_u64)
    };
    let loaded = &exchange.config.config;
    let event = DecisionEvent {
        id: format!("{:032x}", rand::random::<u128>()),
        timestamp: timestamp_now(),
        gateway_id: gateway.gateway_id().to_owned(),
        request_id: exchange.request_id.clone(),
        verdict: verdict.as_str(),
        reason_code: decision.reason_code.clone(),
        policies_evaluated: decision.evaluated.clone(),
        model: exchange.model.clone(),
        provider: exchange.target.as_ref().map(|t| t.target.provider.clone()),
        target: exchange.target.as_ref().map(|t| t.target.id.clone()),
        config_version: loaded.version.clone(),
        config_hash: loaded.hash.clone(),
        latency_ms: crate::events::millis(elapsed),
        status: status.as_u16(),
        stream: exchange.stream,
        cached: exchange.cached,
        prompt_sha256: exchange.prompt_sha256,
        prompt_tokens: token("prompt_tokens"),
        completion_tokens: token("completion_tokens"),
        total_tokens: token("total_tokens"),
        error: error.map(|e| e.message),
        synthetic: exchange.synthetic,
        shadow: exchange.shadow_outcome,
    };
    gateway.events().record(event).await;
    if let Ok(value) = HeaderValue::from_str(&exchange.request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
        .headers_mut()
        .insert(VERDICT_HEADER, HeaderValue::from_static(verdict.as_str()));
    response
}

/// RFC 3339 with microseconds, UTC.
pub fn timestamp_now() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
}

/// `GET /v1/models`: the models this gateway routes, as its config allows them.
pub async fn models(State(gateway): State<Gateway>) -> Response {
    let current = gateway.current();
    let mut seen = Vec::new();
    let data: Vec<Value> = current
        .targets
        .iter()
        .filter(|t| t.unavailable.is_none())
        .filter(|t| {
            let new = !seen.contains(&t.target.model);
            seen.push(t.target.model.clone());
            new
        })
        .filter(|t| {
            let mut probe = Input {
                model: &t.target.model,
                provider: Some(&t.target.provider),
                max_tokens: None,
                messages: Vec::new(),
            };
            !current.config.enabled
                || current.config.chain.evaluate(&mut probe).verdict != Verdict::Block
        })
        .map(|t| json!({ "id": t.target.model, "object": "model", "owned_by": t.target.provider }))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}
