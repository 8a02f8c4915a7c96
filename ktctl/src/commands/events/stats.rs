//! `ktctl events stats [--group G | --gateway ID | --selector k=v] [--by gateway|config-version|region]
//! [--since 15m | --all-time]`

use std::collections::HashMap;

use kt_proto::v1::{EventFilter, EventStatsRequest};

use super::since_ms;
use crate::Session;
use crate::commands::parse_selector;
use crate::view::{Output, print_structured, table};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Gateway,
    ConfigVersion,
    Region,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long)]
    pub gateway: Vec<String>,
    #[arg(long, value_parser = parse_selector)]
    pub selector: Option<HashMap<String, String>>,
    #[arg(long, value_enum, default_value_t = By::Gateway)]
    pub by: By,
    /// The window: a duration back from now, or an RFC 3339 time.
    #[arg(long, default_value = "15m", conflicts_with = "all_time")]
    pub since: String,
    /// Every decision since each gateway's first event, from the coordinator's per-config
    /// counters (the ones rollout gates read), not limited by event retention.
    #[arg(long)]
    pub all_time: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let filter = EventFilter {
        gateways: args.gateway,
        group: args.group.unwrap_or_default(),
        selector: args.selector.unwrap_or_default(),
        ..Default::default()
    };
    let by = match args.by {
        By::Gateway => "gateway",
        By::ConfigVersion => "config-version",
        By::Region => "region",
    };
    let mut client = session.client().await?;
    let rows = client
        .event_stats(EventStatsRequest {
            filter: Some(filter),
            by: by.into(),
            since_unix_ms: if args.all_time {
                0
            } else {
                since_ms(&args.since)?
            },
            all_time: args.all_time,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .rows;
    let rate = |block: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            block as f64 * 100.0 / total as f64
        }
    };
    if args.output != Output::Table {
        let json: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({ by: r.key, "total": r.total, "allow": r.allow, "block": r.block, "redact": r.redact,
                "escalate": r.escalate, "block_rate_pct": rate(r.block, r.total) }))
            .collect();
        return print_structured(&json, args.output);
    }
    let mut t = table(&[
        &by.to_uppercase(),
        "TOTAL",
        "ALLOW",
        "BLOCK",
        "REDACT",
        "ESCALATE",
        "BLOCK RATE",
    ]);
    for r in &rows {
        t.add_row(vec![
            if r.key.is_empty() {
                "-".into()
            } else {
                r.key.clone()
            },
            r.total.to_string(),
            r.allow.to_string(),
            r.block.to_string(),
            r.redact.to_string(),
            r.escalate.to_string(),
            format!("{:.1}%", rate(r.block, r.total)),
        ]);
    }
    println!("{t}");
    Ok(())
}
