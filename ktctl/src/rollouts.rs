//! Showing rollouts: a summary, progress lines as a rollout moves, and the exit codes shared by
//! `config push` and `rollout status --watch`.

use std::collections::BTreeSet;

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

pub const EXIT_CODES_HELP: &str = "Exit codes: 0 succeeded, 2 rolled back (or aborted), 3 failed without rollback, \
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
        r.state,
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
                g.gateway_id, from, g.state, error
            );
        }
    }
    if !r.gates.is_empty() {
        println!("  gates:");
        for g in &r.gates {
            println!(
                "    batch {} {:<12} {:<12} {}",
                g.batch + 1,
                g.gate,
                g.decision,
                g.detail
            );
        }
    }
}

/// Follows a rollout, printing each new transition, until it ends or waits for a human.
/// Returns the final rollout.
pub async fn follow(session: &Session, id: &str) -> anyhow::Result<Rollout> {
    let mut client = session.client().await?;
    let mut stream: Streaming<Rollout> = client
        .watch_rollout(RolloutRequest { id: id.to_owned() })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let mut printed = 0;
    let mut gates_printed = 0;
    let mut last: Option<Rollout> = None;
    let mut states: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                println!("stopped watching; the rollout goes on (ktctl rollout status {id} --watch)");
                return last.ok_or_else(|| anyhow::anyhow!("no rollout state received"));
            }
            next = stream.message() => next.map_err(crate::status_error)?,
        };
        let Some(r) = next else {
            return last.ok_or_else(|| anyhow::anyhow!("the coordinator ended the watch"));
        };
        // History and gate evaluations, in one timeline.
        let mut lines: Vec<(u64, String)> = r
            .history
            .iter()
            .skip(printed)
            .map(|t| (t.at_unix_ms, format!("{:<14} {}", short_by(&t.by), t.what)))
            .chain(r.gates.iter().skip(gates_printed).map(|g| {
                (
                    g.at_unix_ms,
                    format!(
                        "gate {:<9} batch {} {}: {}",
                        g.gate,
                        g.batch + 1,
                        g.decision,
                        g.detail
                    ),
                )
            }))
            .collect();
        lines.sort_by_key(|(at, _)| *at);
        for (at, line) in lines {
            println!("{}  {line}", kt_proto::clock::hms(at));
        }
        printed = r.history.len();
        gates_printed = r.gates.len();
        for batch in &r.batches {
            for g in &batch.gateways {
                if states.insert((g.gateway_id.clone(), g.state.clone())) && g.state == "offered" {
                    println!(
                        "{}  {:<14} {} offered {}",
                        kt_proto::clock::hms(kt_proto::unix_ms_now()),
                        "coordinator",
                        g.gateway_id,
                        config_label(&r)
                    );
                }
            }
        }
        let stop = exit_code(&r.state).is_some();
        last = Some(r);
        if stop {
            return last.ok_or_else(|| anyhow::anyhow!("no rollout state received"));
        }
    }
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
        "state": r.state,
        "config": config(r.config.as_ref()),
        "target": target(r),
        "step": r.step,
        "message": r.message,
        "created_by": r.created_by,
        "reason": r.reason,
        "created_at_unix_ms": r.created_at_unix_ms,
        "current_batch": r.current_batch,
        "batches": r.batches.iter().map(|b| b.gateways.iter().map(|g| json!({
            "gateway": g.gateway_id,
            "baseline": config(g.baseline.as_ref()),
            "state": g.state,
            "error": g.error,
        })).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "gates": r.gates.iter().map(|g| json!({
            "batch": g.batch, "gate": g.gate, "decision": g.decision, "value": g.value,
            "threshold": g.threshold, "detail": g.detail, "at_unix_ms": g.at_unix_ms,
        })).collect::<Vec<_>>(),
        "history": r.history.iter().map(|t| json!({ "at_unix_ms": t.at_unix_ms, "what": t.what, "by": t.by })).collect::<Vec<_>>(),
    });
    if let Some(diff) = diff {
        value["diff"] = json!(diff);
    }
    value
}
