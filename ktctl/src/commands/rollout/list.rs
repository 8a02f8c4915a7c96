//! `ktctl rollout list [--active] [--group G] [-o ...]`

use kt_proto::v1::ListRolloutsRequest;

use crate::Session;
use crate::rollouts::{config_label, to_json};
use crate::view::{Output, print_structured, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only rollouts still running or paused.
    #[arg(long)]
    pub active: bool,
    #[arg(long)]
    pub group: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let rollouts = client
        .list_rollouts(ListRolloutsRequest {
            active_only: args.active,
            group: args.group.unwrap_or_default(),
        })
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .rollouts;
    if args.output != Output::Table {
        let rows: Vec<_> = rollouts.iter().map(|r| to_json(r, None)).collect();
        return print_structured(&rows, args.output);
    }
    let mut t = table(&["ID", "STATE", "CONFIG", "TARGET", "BATCH", "BY", "MESSAGE"]);
    for r in &rollouts {
        let spec = r.spec.clone().unwrap_or_default();
        let target = if spec.group.is_empty() {
            "selector".to_owned()
        } else {
            spec.group.clone()
        };
        t.add_row(vec![
            r.id.clone(),
            crate::rollouts::state_words(r.state().label()),
            config_label(r),
            target,
            format!(
                "{}/{}",
                (r.current_batch as usize + 1).min(r.batches.len()),
                r.batches.len()
            ),
            r.created_by
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            r.message.chars().take(60).collect(),
        ]);
    }
    println!("{t}");
    Ok(())
}
