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
    let wanted = match args.to_version {
        Some(version) => version,
        None => {
            let rollouts = super::history::rollouts(session, Some(args.group.clone())).await?;
            let last = rollouts
                .iter()
                .find(|r| {
                    r.state() == kt_proto::v1::RolloutState::Succeeded && !r.batches.is_empty()
                })
                .with_context(|| {
                    format!(
                        "group {} has no successful rollout to undo; give --to-version",
                        args.group
                    )
                })?;
            let baseline = super::history::baseline(last)
                .with_context(|| format!("rollout {} recorded no previous version", last.id))?;
            println!(
                "undoing {}: back to {} ({})",
                last.id,
                baseline.version,
                crate::view::short_hash(&baseline.hash)
            );
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
        group: args.group,
        strategy: Strategy::AllAtOnce as i32,
        size: 1,
        min_healthy_time_ms: u64::try_from(args.min_healthy_time.as_millis()).unwrap_or(u64::MAX),
        max_block_rate_delta: -1.0,
        max_error_rate: -1.0,
        ..Default::default()
    };
    let reason = if args.reason.is_empty() {
        "undo".to_owned()
    } else {
        format!("undo: {}", args.reason)
    };
    let request = PushConfigRequest {
        content: version.content,
        spec: Some(spec),
        reason,
        dry_run: false,
        supersede: false,
        rollback: true,
    };
    crate::commands::config::push::send(session, request, args.detach, args.output).await
}
