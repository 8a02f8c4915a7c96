//! `ktctl fleet watch [--group G] [-o table|json]`: the fleet's current state, then one line
//! per change, until interrupted.

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
    if args.output == Output::Table {
        println!(
            "{:<25} {:<20} {:<13} {:<10} {:<24} REQUESTS",
            "TIME", "GATEWAY", "AGENT", "STATUS", "CONFIG"
        );
    }
    loop {
        let update = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            update = stream.message() => update.map_err(crate::status_error)?,
        };
        let Some(update) = update else {
            anyhow::bail!("the coordinator ended the watch");
        };
        let now = kt_proto::unix_ms_now();
        let (kind, states) = match update.update {
            // A large snapshot comes in parts; each part's rows are printed as they come.
            Some(fleet_update::Update::Snapshot(snapshot)) => ("snapshot", snapshot.gateways),
            Some(fleet_update::Update::Changed(state)) => ("changed", vec![state]),
            None => continue,
        };
        for state in &states {
            print_line(kind, &GatewayRow::from_state(state, now), args.output)?;
        }
    }
}

fn print_line(kind: &str, row: &GatewayRow, output: Output) -> anyhow::Result<()> {
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
                "{:<21} {:<20} {:<13} {:<10} {:<24} {}",
                time, row.gateway, row.agent, row.status, config, row.requests_processed
            );
        }
    }
    Ok(())
}
