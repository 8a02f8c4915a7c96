//! `ktctl groups`: the named sets of gateways rollouts target.

pub mod apply;
pub mod list;

use kt_proto::v1::GroupInfo;

use crate::view::{Output, print_structured, short_hash, table};

/// Prints groups as a table or as structured output.
pub fn print(groups: &[GroupInfo], output: Output) -> anyhow::Result<()> {
    let non_empty = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    if output != Output::Table {
        let rows: Vec<_> = groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "name": g.name, "gateways": g.gateways, "selector": g.selector,
                    "members": g.members,
                    "config_source": non_empty(&g.config_source),
                    "source_hash": non_empty(&g.source_hash),
                    "source_error": non_empty(&g.source_error),
                    "source_waiting": non_empty(&g.source_waiting),
                    "desired": g.desired.as_ref().map(|d| serde_json::json!({"version": d.version, "hash": d.hash})),
                    "running": g.running,
                    "drift": g.drift,
                    "after": non_empty(&g.after),
                    "held": non_empty(&g.held_hash).map(|h| serde_json::json!({"hash": h, "reason": g.held_reason})),
                })
            })
            .collect();
        return print_structured(&rows, output);
    }
    let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    let mut t = table(&[
        "GROUP",
        "MEMBERS",
        "SOURCE",
        "SOURCE HASH",
        "DESIRED",
        "RUNNING",
        "DRIFT",
        "AFTER",
    ]);
    for g in groups {
        let mut selector: Vec<String> =
            g.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        selector.sort();
        let mut running: Vec<(String, u32)> =
            g.running.iter().map(|(h, n)| (short_hash(h), *n)).collect();
        running.sort();
        t.add_row(vec![
            g.name.clone(),
            dash(g.members.join(",")),
            dash(g.config_source.clone()),
            dash(short_hash(&g.source_hash)),
            g.desired.as_ref().map_or("-".into(), |d| {
                format!("{} ({})", d.version, short_hash(&d.hash))
            }),
            dash(
                running
                    .iter()
                    .map(|(h, n)| format!("{h}×{n}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            g.drift.clone(),
            dash(g.after.clone()),
        ]);
    }
    println!("{t}");
    for g in groups {
        if !g.source_error.is_empty() {
            println!("{}: config source not used: {}", g.name, g.source_error);
        }
        if !g.source_waiting.is_empty() {
            println!("{}: config source {}", g.name, g.source_waiting);
        }
        if !g.held_hash.is_empty() {
            println!(
                "{}: {} held back ({}); the source applies again only once its content changes",
                g.name,
                short_hash(&g.held_hash),
                g.held_reason
            );
        }
    }
    Ok(())
}
