//! `ktctl rollout history [--group G]`: every rollout, newest first, with where it went from.

use std::collections::BTreeMap;

use kt_proto::v1::{ListRolloutsRequest, Rollout};

use crate::Session;
use crate::rollouts::{config_label, to_json};
use crate::view::{Output, print_structured, short_hash, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub group: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The version most of the rollout's gateways ran before it: what undoing it returns to.
pub fn baseline(r: &Rollout) -> Option<kt_proto::v1::ConfigRef> {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for g in r.batches.iter().flat_map(|b| &b.gateways) {
        if let Some(b) = g.baseline.as_ref().filter(|b| !b.hash.is_empty()) {
            *counts
                .entry((b.version.clone(), b.hash.clone()))
                .or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|((version, hash), _)| kt_proto::v1::ConfigRef { version, hash })
}

/// Rollouts of `group` (or all), newest first.
pub async fn rollouts(session: &Session, group: Option<String>) -> anyhow::Result<Vec<Rollout>> {
    let mut client = session.client().await?;
    let mut rollouts = client
        .list_rollouts(ListRolloutsRequest {
            active_only: false,
            group: group.unwrap_or_default(),
        })
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .rollouts;
    rollouts.sort_by_key(|r| std::cmp::Reverse(r.created_at_unix_ms));
    Ok(rollouts)
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let rollouts = rollouts(session, args.group).await?;
    if args.output != Output::Table {
        let rows: Vec<_> = rollouts.iter().map(|r| to_json(r, None)).collect();
        return print_structured(&rows, args.output);
    }
    let mut t = table(&["ID", "CREATED", "STATE", "TO", "FROM", "BY", "REASON"]);
    for r in &rollouts {
        let created = kt_daemon::clock::date_time(r.created_at_unix_ms);
        let from = baseline(r)
            .map(|b| format!("{} ({})", b.version, short_hash(&b.hash)))
            .unwrap_or_else(|| "-".into());
        t.add_row(vec![
            r.id.clone(),
            created,
            crate::rollouts::state_words(r.state().label()),
            config_label(r),
            from,
            r.created_by
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            r.reason.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}
