//! `ktctl gateway health [--group G] [-o table|json|yaml]`
//!
//! Exits 0 only when at least one gateway is listed and every listed gateway is healthy and
//! connected, so scripts can gate on it.

use crate::Session;
use crate::view::{GatewayRow, Output, print_structured, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the gateways of this group.
    #[arg(long)]
    pub group: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Returns whether every listed gateway is healthy and connected.
pub async fn run(session: &Session, args: Args) -> anyhow::Result<bool> {
    let rows = super::fetch_rows(session, args.group.clone()).await?;
    match args.output {
        Output::Table => print_table(&rows),
        structured => print_structured(&rows, structured)?,
    }
    if rows.is_empty() {
        eprintln!(
            "no gateways{}",
            args.group
                .map(|g| format!(" in group {g}"))
                .unwrap_or_default()
        );
        return Ok(false);
    }
    Ok(rows.iter().all(GatewayRow::is_ok))
}

fn print_table(rows: &[GatewayRow]) {
    let mut t = table(&[
        "GATEWAY",
        "GROUPS",
        "REGION",
        "AGENT",
        "STATUS",
        "RUNNING",
        "DESIRED",
        "SYNC",
        "PROVIDERS",
        "REQUESTS",
        "LAST SEEN",
    ]);
    for row in rows {
        let config = row.config_human();
        t.add_row(vec![
            row.gateway.clone(),
            if row.groups.is_empty() {
                "-".into()
            } else {
                row.groups.join(",")
            },
            row.region.clone().unwrap_or_else(|| "-".into()),
            row.agent.to_owned(),
            row.status.to_owned(),
            config,
            row.desired_human(),
            row.sync_human(),
            format!("{}/{}", row.providers_reachable, row.providers_total),
            row.requests_processed.to_string(),
            row.last_seen_human(),
        ]);
    }
    println!("{t}");
    for row in rows {
        if let Some(error) = &row.last_reload_error {
            println!("{}: last reload failed: {error}", row.gateway);
        }
        if let Some(error) = &row.error {
            println!("{}: {error}", row.gateway);
        }
        if let Some(since) = row.drifted_since.as_ref().filter(|_| row.sync == "drifted") {
            println!(
                "{}: drifted from its desired config since {since}",
                row.gateway
            );
        }
        if let Some(duplicate) = &row.duplicate_agent {
            println!("{}: {duplicate}", row.gateway);
        }
    }
}
