//! Showing rollouts: a summary, progress lines as a rollout moves, and the exit codes shared by
//! `config push` and `rollout status --watch`.

use std::collections::BTreeSet;
use std::time::Duration;

use kt_proto::v1::{Rollout, RolloutRequest};
use tonic::Streaming;

use crate::Session;
use crate::view::short_hash;

/// Exit codes of a rollout that was followed to its end (or to a human's decision).
pub mod exit {
    pub const SUCCEEDED: u8 = 0;
    pub const ROLLED_BACK: u8 = 2;
    pub const FAILED: u8 = 3;
    pub const PAUSED: u8 = 4;
    pub const TIMED_OUT: u8 = 5;
    /// `--shadow-first` stopped the push before any gateway enforced the config.
    pub const STOPPED_BY_SHADOW: u8 = 2;
}

/// The exit code for a rollout state, or `None` while it still moves by itself.
pub fn exit_code(state: &str) -> Option<u8> {
    match state {
        "succeeded" => Some(exit::SUCCEEDED),
        "rolled_back" | "aborted" => Some(exit::ROLLED_BACK),
        "failed" | "superseded" => Some(exit::FAILED),
        "paused" | "awaiting_promotion" => Some(exit::PAUSED),
        "timed_out" => Some(exit::TIMED_OUT),
        _ => None,
    }
}

pub const EXIT_CODES_HELP: &str = "Exit codes: 0 succeeded, 2 rolled back (or aborted, or stopped by --shadow-first before any gateway enforced it), 3 failed without rollback, \
4 paused waiting for a human (paused, or a canary awaiting promotion), 5 timed out; 1 for any other error.";

fn target(r: &Rollout) -> String {
    let Some(spec) = &r.spec else {
        return "-".into();
    };
    if !spec.group.is_empty() {
        format!("group {}", spec.group)
    } else {
        let parts: Vec<String> = spec
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("selector {}", parts.join(","))
    }
}

pub fn config_label(r: &Rollout) -> String {
    r.config
        .as_ref()
        .map(|c| format!("{} ({})", c.version, short_hash(&c.hash)))
        .unwrap_or_default()
}

/// A full description of a rollout.
pub fn print_summary(r: &Rollout) {
    println!(
        "rollout {}: {} {} to {}",
        r.id,
        state_words(r.state().label()),
        config_label(r),
        target(r)
    );
    if !r.step.is_empty() {
        println!("  now: {}", r.step);
    }
    if !r.message.is_empty() {
        println!("  message: {}", r.message);
    }
    println!(
        "  created by {}{}",
        r.created_by,
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        }
    );
    for (i, batch) in r.batches.iter().enumerate() {
        println!("  batch {}:", i + 1);
        for g in &batch.gateways {
            let from = g
                .baseline
                .as_ref()
                .map(|b| {
                    if b.version.is_empty() {
                        "unknown".to_owned()
                    } else {
                        format!("{} ({})", b.version, short_hash(&b.hash))
                    }
                })
                .unwrap_or_default();
            let error = if g.error.is_empty() {
                String::new()
            } else {
                format!("  {}", g.error)
            };
            println!(
                "    {:<20} from {:<24} {}{}",
                g.gateway_id,
                from,
                state_words(g.state().label()),
                error
            );
        }
    }
    if !r.gates.is_empty() {
        println!("  gates:");
        for g in &r.gates {
            println!(
                "    batch {} {:<12} {:<12} {}",
                g.batch + 1,
                gate_name(&g.gate),
                g.decision().label(),
                g.detail
            );
        }
    }
}

/// How long `follow` keeps trying to reach the coordinator again after losing it.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(120);

/// Follows a rollout, printing each new transition, until it ends or waits for a human.
/// Returns the final rollout. Losing the coordinator does not stop the rollout (it lives on the
/// coordinator): the watch reconnects and goes on where it was.
pub async fn follow(session: &Session, id: &str) -> anyhow::Result<Rollout> {
    let mut shown = Shown::default();
    let mut last: Option<Rollout> = None;
    loop {
        let lost = match watch(session, id, &mut shown, &mut last).await? {
            Watched::Done(r) => return Ok(*r),
            Watched::Interrupted => {
                println!(
                    "stopped watching; the rollout goes on (ktctl rollout status {id} --watch)"
                );
                return last.ok_or_else(|| anyhow::anyhow!("no rollout state received"));
            }
            Watched::Lost(why) => why,
        };
        println!(
            "{}  lost the coordinator ({lost}); the rollout goes on there, reconnecting",
            kt_daemon::clock::hms(kt_daemon::unix_ms_now())
        );
        let deadline = tokio::time::Instant::now() + RECONNECT_PATIENCE;
        let mut delay = Duration::from_millis(250);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    println!("stopped watching; the rollout goes on (ktctl rollout status {id} --watch)");
                    return last.ok_or_else(|| anyhow::anyhow!("no rollout state received"));
                }
                _ = tokio::time::sleep(delay) => {}
            }
            if session.client().await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "cannot reach the coordinator for {}s; the rollout goes on there: follow it with `ktctl rollout status {id} --watch`",
                    RECONNECT_PATIENCE.as_secs()
                );
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// What has been printed of a rollout so far, so a reconnected watch prints only what is new.
#[derive(Default)]
struct Shown {
    history: usize,
    gates: usize,
    states: BTreeSet<(String, String)>,
}

enum Watched {
    Done(Box<Rollout>),
    Interrupted,
    /// The stream broke (the coordinator went away): why.
    Lost(String),
}

/// One watch stream: prints what is new until the rollout stops, Ctrl-C, or the stream breaks.
async fn watch(
    session: &Session,
    id: &str,
    shown: &mut Shown,
    last: &mut Option<Rollout>,
) -> anyhow::Result<Watched> {
    let mut client = match session.client().await {
        Ok(client) => client,
        Err(error) => return Ok(Watched::Lost(crate::error_line(&error))),
    };
    let mut stream: Streaming<Rollout> = match client
        .watch_rollout(RolloutRequest { id: id.to_owned() })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) if is_transient(&status) => return Ok(Watched::Lost(status.message().into())),
        Err(status) => return Err(crate::status_error(status)),
    };
    loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(Watched::Interrupted),
            next = stream.message() => next,
        };
        let r = match next {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Watched::Lost("the coordinator ended the watch".into())),
            Err(status) if is_transient(&status) => {
                return Ok(Watched::Lost(status.message().into()));
            }
            Err(status) => return Err(crate::status_error(status)),
        };
        print_new(&r, shown);
        let stop = exit_code(r.state().label()).is_some();
        if stop {
            return Ok(Watched::Done(Box::new(r)));
        }
        *last = Some(r);
    }
}

/// A status that says the coordinator went away rather than that the request was wrong.
fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

/// Prints the transitions and gate evaluations not shown yet, in time order (a gate's lines
/// before the transition it caused), and each gateway's first offer.
fn print_new(r: &Rollout, shown: &mut Shown) {
    let mut lines: Vec<(u64, String)> = r
        .gates
        .iter()
        .skip(shown.gates)
        .map(|g| {
            (
                g.at_unix_ms,
                format!(
                    "gate {:<11} batch {} {}: {}",
                    gate_name(&g.gate),
                    g.batch + 1,
                    g.decision().label(),
                    g.detail
                ),
            )
        })
        .chain(
            r.history
                .iter()
                .skip(shown.history)
                .map(|t| (t.at_unix_ms, format!("{:<14} {}", short_by(&t.by), t.what))),
        )
        .collect();
    // Stable: at the same millisecond, gate lines (first in the list) stay first.
    lines.sort_by_key(|(at, _)| *at);
    for (at, line) in lines {
        println!("{}  {line}", kt_daemon::clock::hms(at));
    }
    shown.history = r.history.len();
    shown.gates = r.gates.len();
    for batch in &r.batches {
        for g in &batch.gateways {
            let state = g.state();
            if shown
                .states
                .insert((g.gateway_id.clone(), state.label().to_owned()))
                && state == kt_proto::v1::RolloutTargetState::Offered
            {
                println!(
                    "{}  {:<14} {} offered {}",
                    kt_daemon::clock::hms(kt_daemon::unix_ms_now()),
                    "coordinator",
                    g.gateway_id,
                    config_label(r)
                );
            }
        }
    }
}

/// A gate's name as the flags spell it (`verdict-mix`, `error-rate`).
pub fn gate_name(gate: &str) -> String {
    gate.replace('_', "-")
}

/// A state as prose (`rolled back`, `awaiting promotion`).
pub fn state_words(state: &str) -> String {
    state.replace('_', " ")
}

fn short_by(by: &str) -> &str {
    by.rsplit('/').next().unwrap_or(by)
}

/// A rollout as JSON, for `-o json|yaml`.
pub fn to_json(r: &Rollout, diff: Option<&str>) -> serde_json::Value {
    use serde_json::json;
    let config = |c: Option<&kt_proto::v1::ConfigRef>| {
        c.map(|c| json!({ "version": c.version, "hash": c.hash }))
    };
    let mut value = json!({
        "id": r.id,
        "state": r.state().label(),
        "config": config(r.config.as_ref()),
        "target": target(r),
        "step": r.step,
        "message": r.message,
        "created_by": r.created_by,
        "reason": r.reason,
        "created_at_unix_ms": r.created_at_unix_ms,
        "current_batch": r.current_batch,
        "spec": r.spec.as_ref().map(|s| json!({
            "strategy": kt_proto::v1::Strategy::try_from(s.strategy).map_or("unspecified", |s| match s {
                kt_proto::v1::Strategy::Canary => "canary",
                kt_proto::v1::Strategy::AllAtOnce => "all-at-once",
                _ => "rolling",
            }),
            "batch_size": if s.size_percent { format!("{}%", s.size) } else { s.size.to_string() },
            "pause_between_ms": s.pause_between_ms,
            "min_healthy_time_ms": s.min_healthy_time_ms,
            "max_block_rate_delta": (s.max_block_rate_delta >= 0.0).then_some(s.max_block_rate_delta),
            "max_error_rate": (s.max_error_rate >= 0.0).then_some(s.max_error_rate),
            "rollback_on_error": s.rollback_on_error,
        })),
        "batches": r.batches.iter().map(|b| b.gateways.iter().map(|g| json!({
            "gateway": g.gateway_id,
            "baseline": config(g.baseline.as_ref()),
            "state": g.state().label(),
            "error": g.error,
        })).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "gates": r.gates.iter().map(|g| json!({
            "batch": g.batch, "gate": g.gate, "decision": g.decision().label(), "value": g.value,
            "threshold": g.threshold, "detail": g.detail, "at_unix_ms": g.at_unix_ms,
        })).collect::<Vec<_>>(),
        "history": r.history.iter().map(|t| json!({ "at_unix_ms": t.at_unix_ms, "what": t.what, "by": t.by })).collect::<Vec<_>>(),
    });
    if let Some(diff) = diff {
        value["diff"] = json!(diff);
    }
    value
}
