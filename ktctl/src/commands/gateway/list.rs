//! `ktctl gateway list [--group G] [-o table|json|yaml]`

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

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let rows = super::fetch_rows(session, args.group).await?;
    match args.output {
        Output::Table => print_table(&rows),
        structured => print_structured(&rows, structured)?,
    }
    Ok(())
}

fn print_table(rows: &[GatewayRow]) {
    let mut t = table(&[
        "GATEWAY",
        "GROUPS",
        "LABELS",
        "AGENT",
        "AGENT VERSION",
        "LAST SEEN",
    ]);
    for row in rows {
        let labels: Vec<String> = row.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.add_row(vec![
            row.gateway.clone(),
            if row.groups.is_empty() {
                "-".into()
            } else {
                row.groups.join(",")
            },
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            row.agent.to_owned(),
            if row.agent_version.is_empty() {
                "-".into()
            } else {
                row.agent_version.clone()
            },
            row.last_seen_human(),
        ]);
    }
    println!("{t}");
}
