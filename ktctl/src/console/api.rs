//! The console's JSON and server-sent-event endpoints: each one call (or stream) of the
//! operator service, shaped for the page.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use kt_proto::v1::fleet_update::Update;
use kt_proto::v1::tail_events_response::Item;
use kt_proto::v1::{
    ControlRolloutRequest, EventFilter, GetConfigVersionRequest, ListRolloutsRequest,
    RolloutAction, TailEventsRequest, WatchFleetRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Console;
use crate::view::GatewayRow;

type Answer = Result<Json<Value>, Response>;

fn failed(status: StatusCode, why: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": why.to_string() }))).into_response()
}

fn from_status(status: tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
        tonic::Code::AlreadyExists | tonic::Code::Aborted => StatusCode::CONFLICT,
        _ => StatusCode::BAD_GATEWAY,
    };
    failed(code, status.message())
}

pub async fn whoami(State(console): State<Console>) -> Json<Value> {
    Json(json!({ "operator": console.operator }))
}

fn rows_json(rows: &[GatewayRow]) -> Value {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows {
        *counts.entry(row.agent).or_default() += 1;
        *counts.entry(row.status).or_default() += 1;
    }
    json!({ "rows": rows, "counts": counts })
}

pub async fn fleet(State(console): State<Console>) -> Answer {
    let mut client = console.client.clone();
    let gateways = crate::client::list_gateways(&mut client, "")
        .await
        .map_err(from_status)?;
    let now = kt_daemon::unix_ms_now();
    let rows: Vec<GatewayRow> = gateways
        .iter()
        .map(|g| GatewayRow::from_state(g, now))
        .collect();
    Ok(Json(rows_json(&rows)))
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;
type EventStream = Sse<axum::response::sse::KeepAliveStream<Events>>;

fn sse(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> EventStream {
    let stream: Events = Box::pin(stream);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The fleet, then every change: `snapshot` with all rows, then one `row` per change.
pub async fn fleet_stream(State(console): State<Console>) -> Result<EventStream, Response> {
    let mut client = console.client.clone();
    let mut updates = client
        .watch_fleet(WatchFleetRequest::default())
        .await
        .map_err(from_status)?
        .into_inner();
    let stream = async_stream(move |tx| async move {
        let mut parts = Vec::new();
        // Ends as soon as the page goes away, not at the next change of a quiet fleet.
        while let Some(Ok(Some(update))) = until_closed(&tx, updates.message()).await {
            let now = kt_daemon::unix_ms_now();
            let sent = match update.update {
                Some(Update::Snapshot(part)) => {
                    parts.extend(part.gateways);
                    if part.more {
                        continue;
                    }
                    let rows: Vec<GatewayRow> = std::mem::take(&mut parts)
                        .iter()
                        .map(|g| GatewayRow::from_state(g, now))
                        .collect();
                    tx.send(event("snapshot", &rows_json(&rows))).await
                }
                Some(Update::Changed(gateway)) => {
                    let row = GatewayRow::from_state(&gateway, now);
                    tx.send(event("row", &json!(row))).await
                }
                None => continue,
            };
            if sent.is_err() {
                return; // the page went away
            }
        }
        let _ = tx
            .send(event(
                "error",
                &json!({ "error": "the coordinator ended the fleet watch" }),
            ))
            .await;
    });
    Ok(sse(stream))
}

/// `next`, or `None` once the page reading `tx`'s events has gone away.
async fn until_closed<T>(
    tx: &tokio::sync::mpsc::Sender<Event>,
    next: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        _ = tx.closed() => None,
        value = next => Some(value),
    }
}

/// A stream fed by a task: `produce` sends events until it returns or the page goes away.
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<Event, Infallible>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

#[derive(Deserialize)]
pub struct GroupQuery {
    group: Option<String>,
}

/// Every rollout, newest first (the page puts the active ones and those waiting for a human
/// on top).
pub async fn rollouts(State(console): State<Console>, Query(query): Query<GroupQuery>) -> Answer {
    let mut client = console.client.clone();
    let mut rollouts = client
        .list_rollouts(ListRolloutsRequest {
            active_only: false,
            group: query.group.unwrap_or_default(),
        })
        .await
        .map_err(from_status)?
        .into_inner()
        .rollouts;
    rollouts.sort_by_key(|r| std::cmp::Reverse(r.created_at_unix_ms));
    let all: Vec<Value> = rollouts
        .iter()
        .map(|r| crate::rollouts::to_json(r, None))
        .collect();
    Ok(Json(json!({ "rollouts": all })))
}

#[derive(Deserialize)]
pub struct Reason {
    #[serde(default)]
    reason: String,
}

/// Pause, resume, promote or abort, recorded with the operator's identity (the console's
/// certificate is the operator's own).
pub async fn control(
    State(console): State<Console>,
    Path((id, action)): Path<(String, String)>,
    Json(body): Json<Reason>,
) -> Answer {
    let action = match action.as_str() {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "promote" => RolloutAction::Promote,
        "abort" => RolloutAction::Abort,
        other => {
            return Err(failed(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}"),
            ));
        }
    };
    let mut client = console.client.clone();
    let rollout = client
        .control_rollout(ControlRolloutRequest {
            id,
            action: action as i32,
            reason: body.reason,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    Ok(Json(crate::rollouts::to_json(&rollout, None)))
}

/// `ktctl rollout undo --group G`: back to what ran before the last successful rollout.
pub async fn undo(
    State(console): State<Console>,
    Path(group): Path<String>,
    Json(body): Json<Reason>,
) -> Answer {
    let undo = crate::commands::rollout::undo::plan(
        &console.session,
        &group,
        None,
        Duration::from_secs(5),
        &body.reason,
    )
    .await
    .map_err(|e| failed(StatusCode::BAD_REQUEST, crate::error_line(&e)))?;
    let mut client = console.client.clone();
    let pushed = client
        .push_config(undo.request)
        .await
        .map_err(from_status)?
        .into_inner();
    Ok(Json(
        json!({ "what": undo.what, "rollout": pushed.rollout.map(|r| crate::rollouts::to_json(&r, None)) }),
    ))
}

/// A group's rollouts, newest first, with the versions they moved between.
pub async fn history(state: State<Console>, query: Query<GroupQuery>) -> Answer {
    rollouts(state, query).await
}

#[derive(Deserialize)]
pub struct DiffQuery {
    from: String,
    to: String,
}

pub async fn diff(State(console): State<Console>, Query(query): Query<DiffQuery>) -> Answer {
    let mut client = console.client.clone();
    let mut fetch = async |version: String| {
        client
            .get_config_version(GetConfigVersionRequest { version })
            .await
            .map_err(from_status)
            .map(|r| r.into_inner())
    };
    let from = fetch(query.from).await?;
    let to = fetch(query.to).await?;
    Ok(Json(
        json!({ "diff": crate::commands::config::diff::unified(&from, &to) }),
    ))
}

/// The filters of `ktctl events tail`.
#[derive(Deserialize)]
pub struct EventQuery {
    gateway: Option<String>,
    group: Option<String>,
    verdict: Option<String>,
    policy: Option<String>,
    reason: Option<String>,
    config_version: Option<String>,
}

/// Decision events as they are stored (the last minute first), one `decision` each.
pub async fn events_stream(
    State(console): State<Console>,
    Query(query): Query<EventQuery>,
) -> Result<EventStream, Response> {
    let some = |s: Option<String>| s.filter(|s| !s.is_empty()).unwrap_or_default();
    let filter = EventFilter {
        gateways: query
            .gateway
            .filter(|g| !g.is_empty())
            .into_iter()
            .collect(),
        group: some(query.group),
        verdict: some(query.verdict),
        policy: some(query.policy),
        reason: some(query.reason),
        config_version: some(query.config_version),
        ..Default::default()
    };
    let mut client = console.client.clone();
    let mut tail = client
        .tail_events(TailEventsRequest {
            filter: Some(filter),
            since_unix_ms: kt_daemon::unix_ms_now().saturating_sub(60_000).max(1),
            limit: 0,
            no_follow: false,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let stream = async_stream(move |tx| async move {
        while let Some(Ok(Some(response))) = until_closed(&tx, tail.message()).await {
            let data = match response.item {
                Some(Item::Event(e)) => {
                    let mut body: Value = serde_json::from_slice(&e.event).unwrap_or_default();
                    // The authenticated gateway and region, never what the event body claims.
                    body["gateway_id"] = json!(e.gateway_id);
                    body["region"] = json!(e.region);
                    body["stored_at_unix_ms"] = json!(e.stored_at_unix_ms);
                    event("decision", &body)
                }
                Some(Item::Gap(notice)) => {
                    let gap = notice.gap.unwrap_or_default();
                    let text = format!(
                        "{} events lost by {}'s agent ({})",
                        gap.count, notice.gateway_id, gap.reason
                    );
                    event("notice", &json!({ "text": text }))
                }
                Some(Item::Missed(n)) => event(
                    "notice",
                    &json!({ "text": format!("{n} events missed: this page read too slowly") }),
                ),
                Some(Item::Scope(text)) => event("notice", &json!({ "text": text })),
                None => continue,
            };
            if tx.send(data).await.is_err() {
                return;
            }
        }
    });
    Ok(sse(stream))
}

/// Block rate per 10-second bucket, by config version and by gateway, with rollouts' starts
/// and ends to mark on the chart.
pub async fn decisions(State(console): State<Console>) -> Answer {
    let mut client = console.client.clone();
    let rollouts = client
        .list_rollouts(ListRolloutsRequest {
            active_only: false,
            group: String::new(),
        })
        .await
        .map_err(from_status)?
        .into_inner()
        .rollouts;
    let since = kt_daemon::unix_ms_now().saturating_sub(super::decisions::WINDOW_MS);
    let marks: Vec<Value> = rollouts
        .iter()
        .filter(|r| r.created_at_unix_ms >= since)
        .map(|r| {
            let finished = !matches!(
                r.state().label(),
                "planned" | "running" | "paused" | "awaiting_promotion" | "rolling_back"
            );
            let ended = r.history.last().filter(|_| finished).map(|t| t.at_unix_ms);
            json!({
                "id": r.id,
                "version": crate::rollouts::config_label(r),
                "state": r.state().label(),
                "start": r.created_at_unix_ms,
                "end": ended,
            })
        })
        .collect();
    Ok(Json(json!({
        "bucket_ms": super::decisions::BUCKET_MS,
        "buckets": console.decisions.snapshot(),
        "rollouts": marks,
    })))
}

/// `ktctl doctor --json`, on a button.
pub async fn doctor(State(console): State<Console>) -> Answer {
    let args = crate::commands::doctor::Args::everything();
    let (checks, coordinator) = crate::commands::doctor::judge(&console.session, &args)
        .await
        .map_err(|e| failed(StatusCode::BAD_GATEWAY, crate::error_line(&e)))?;
    Ok(Json(crate::commands::doctor::document(
        &checks,
        &coordinator,
    )))
}
