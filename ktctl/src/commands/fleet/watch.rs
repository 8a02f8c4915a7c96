//! `ktctl fleet watch [--group G] [-o table|json]`: the fleet's current state, then one line
//! per change, until interrupted.

use std::collections::HashMap;

use kt_proto::v1::{WatchFleetRequest, fleet_update};

use crate::Session;
use crate::view::{GatewayRow, Output};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub group: Option<String>,
    /// `table`: aligned lines; `json`: one JSON object per line (for jq).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    if args.output == Output::Yaml {
        anyhow::bail!("fleet watch prints table or json lines");
    }
    let mut client = session.client().await?;
    let mut stream = client
        .watch_fleet(WatchFleetRequest {
            group: args.group.unwrap_or_default(),
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let mut shown: HashMap<String, String> = HashMap::new();
    let mut width = 20;
    let mut header = args.output == Output::Table;
    loop {
        let update = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            update = stream.message() => update.map_err(crate::status_error)?,
        };
        let Some(update) = update else {
            anyhow::bail!("the coordinator ended the watch");
        };
        let now = kt_daemon::unix_ms_now();
        let (kind, states) = match update.update {
            // A large snapshot comes in parts; each part's rows are printed as they come.
            Some(fleet_update::Update::Snapshot(snapshot)) => ("snapshot", snapshot.gateways),
            Some(fleet_update::Update::Changed(state)) => ("changed", vec![state]),
            None => continue,
        };
        if header {
            // Wide enough for the longest id of the first snapshot part.
            width = states
                .iter()
                .map(|s| s.gateway_id.len())
                .max()
                .unwrap_or(0)
                .max(width);
            println!(
                "{:<20} {:<width$} {:<13} {:<10} {:<28} {:<18} REQUESTS",
                "TIME", "GATEWAY", "AGENT", "STATUS", "RUNNING", "SYNC"
            );
            header = false;
        }
        for state in &states {
            let row = GatewayRow::from_state(state, now);
            // A change that changes nothing shown (only counters moved) is not repeated.
            let key = format!(
                "{}|{}|{}|{}",
                row.agent,
                row.status,
                row.config_human(),
                row.sync_human()
            );
            if kind == "changed" && shown.get(&row.gateway) == Some(&key) {
                continue;
            }
            shown.insert(row.gateway.clone(), key);
            print_line(kind, &row, args.output, width)?;
        }
    }
}

fn print_line(kind: &str, row: &GatewayRow, output: Output, width: usize) -> anyhow::Result<()> {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let time = time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default();
    match output {
        Output::Json => {
            let line = serde_json::json!({ "time": time, "event": kind, "gateway": row });
            println!("{line}");
        }
        _ => {
            let config = row.config_human();
            println!(
                "{:<20} {:<width$} {:<13} {:<10} {:<28} {:<18} {}",
                time,
                row.gateway,
                row.agent,
                row.status,
                config,
                row.sync_human(),
                row.requests_processed
            );
        }
    }
    Ok(())
}
