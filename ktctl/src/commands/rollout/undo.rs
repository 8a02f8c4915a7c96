//! `ktctl rollout undo --group G [--to-version V]`: return a group to the version it ran before
//! its last successful rollout (or to V), all at once, as a rollback (a lower version is allowed).

use anyhow::Context;
use kt_proto::v1::{GetConfigVersionRequest, PushConfigRequest, RolloutSpec, Strategy};

use crate::Session;
use crate::rollouts::EXIT_CODES_HELP;
use crate::view::Output;

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct Args {
    #[arg(long)]
    pub group: String,
    /// The version (label or hash) to return to [default: what ran before the last successful rollout].
    #[arg(long)]
    pub to_version: Option<String>,
    /// How long the gateways must stay healthy on it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub min_healthy_time: std::time::Duration,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(long)]
    pub detach: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<u8> {
    let undo = plan(
        session,
        &args.group,
        args.to_version.clone(),
        args.min_healthy_time,
        &args.reason,
    )
    .await?;
    if let Some(what) = &undo.what {
        println!("{what}");
    }
    crate::commands::config::push::send(session, undo.request, args.detach, args.output).await
}

/// An undo ready to send: the push, and what it undoes when it was found by looking back.
pub struct Undo {
    pub request: PushConfigRequest,
    pub what: Option<String>,
}

/// Finds what `group` returns to (`to_version`, else what ran before its last successful
/// rollout) and makes the push that returns it there, all at once, as a rollback.
pub async fn plan(
    session: &Session,
    group: &str,
    to_version: Option<String>,
    min_healthy_time: std::time::Duration,
    reason: &str,
) -> anyhow::Result<Undo> {
    let mut what = None;
    let wanted = match to_version {
        Some(version) => version,
        None => {
            let rollouts = super::history::rollouts(session, Some(group.to_owned())).await?;
            let last = rollouts
                .iter()
                .find(|r| {
                    r.state() == kt_proto::v1::RolloutState::Succeeded && !r.batches.is_empty()
                })
                .with_context(|| {
                    format!("group {group} has no successful rollout to undo; give --to-version")
                })?;
            let baseline = super::history::baseline(last)
                .with_context(|| format!("rollout {} recorded no previous version", last.id))?;
            what = Some(format!(
                "undoing {}: back to {} ({})",
                last.id,
                baseline.version,
                crate::view::short_hash(&baseline.hash)
            ));
            baseline.hash
        }
    };
    let mut client = session.client().await?;
    let version = client
        .get_config_version(GetConfigVersionRequest { version: wanted })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let spec = RolloutSpec {
        group: group.to_owned(),
        strategy: Strategy::AllAtOnce as i32,
        size: 1,
        min_healthy_time_ms: u64::try_from(min_healthy_time.as_millis()).unwrap_or(u64::MAX),
        max_block_rate_delta: -1.0,
        max_error_rate: -1.0,
        ..Default::default()
    };
    let reason = if reason.is_empty() {
        "undo".to_owned()
    } else {
        format!("undo: {reason}")
    };
    let request = PushConfigRequest {
        content: version.content,
        spec: Some(spec),
        reason,
        dry_run: false,
        supersede: false,
        rollback: true,
    };
    Ok(Undo { request, what })
}
