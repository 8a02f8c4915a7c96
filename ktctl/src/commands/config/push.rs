//! `ktctl config push --file F (--group G | --selector k=v) [--strategy ...] [--dry-run]`

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use kt_proto::v1::{PushConfigRequest, RolloutSpec, StartShadowRequest, Strategy};

use crate::Session;
use crate::commands::{parse_selector, shadow};
use crate::rollouts::{self, EXIT_CODES_HELP, config_label, exit_code, follow, print_summary};
use crate::view::{Output, print_structured};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    Rolling,
    Canary,
    AllAtOnce,
}

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct Args {
    /// The policy config to push.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// The group to move.
    #[arg(long, conflicts_with = "selector")]
    pub group: Option<String>,
    /// Gateways whose labels match, e.g. `region=eu,env=prod`.
    #[arg(long, value_parser = parse_selector)]
    pub selector: Option<HashMap<String, String>>,
    #[arg(long, value_enum, default_value_t = StrategyArg::Rolling)]
    pub strategy: StrategyArg,
    /// Gateways per batch (rolling): a count or a percentage like `25%`.
    #[arg(long, default_value = "1")]
    pub batch_size: String,
    /// The canary batch (canary): a count or a percentage.
    #[arg(long, default_value = "1")]
    pub canary_size: String,
    /// Promote the canary by itself once its gates pass.
    #[arg(long)]
    pub auto_promote: bool,
    /// Wait between batches.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub pause_between: Duration,
    /// How long each batch must stay healthy (the bake) before the gates decide.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub min_healthy_time: Duration,
    /// Verdict-mix gate: fail when the new version's block rate exceeds the old version's by more
    /// than this fraction (0.2 = 20 points). Off when not given.
    #[arg(long)]
    pub max_block_rate_delta: Option<f64>,
    /// Error-rate gate: fail when more than this fraction of a batch's requests get a server
    /// error (5xx) during its bake. Off when not given.
    #[arg(long)]
    pub max_error_rate: Option<f64>,
    /// Requests each side needs before the verdict-mix (or error-rate) gate decides.
    #[arg(long, default_value_t = 50)]
    pub min_sample: u64,
    /// When the verdict-mix gate has too few requests, go on instead of pausing.
    #[arg(long)]
    pub continue_on_inconclusive: bool,
    /// How long each gateway has to apply and verify the config.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub apply_deadline: Duration,
    /// The whole rollout must finish within this, or it times out.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub progress_deadline: Duration,
    /// On a failed gate or a refused config, return every touched gateway to its previous version
    /// (otherwise the rollout pauses for a human).
    #[arg(long)]
    pub rollback_on_error: bool,
    /// Why: recorded with the config version and in the audit log.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Replace an active rollout on the same gateways.
    #[arg(long)]
    pub supersede: bool,
    /// Start the rollout and return at once.
    #[arg(long)]
    pub detach: bool,
    /// Print the plan (gateways, batches, current versions, diff) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// First run the config as a shadow on the target gateways for this long (deciding
    /// nothing); push only if its flip rates stay within the limits below.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub shadow_first: Option<Duration>,
    /// With --shadow-first: the largest share of requests that may go from allow to block.
    #[arg(long, default_value_t = 0.02, requires = "shadow_first")]
    pub max_flip_rate: f64,
    /// With --shadow-first: the largest share that may go from block to allow [default: the
    /// --max-flip-rate].
    #[arg(long, requires = "shadow_first")]
    pub max_unblock_rate: Option<f64>,
    /// With --shadow-first: requests the shadow must have compared to judge at all; fewer
    /// stop the push (no evidence is not a pass).
    #[arg(long, default_value_t = 100, requires = "shadow_first")]
    pub shadow_min_requests: u64,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `N` or `N%`.
fn parse_size(text: &str) -> anyhow::Result<(u32, bool)> {
    match text.strip_suffix('%') {
        Some(p) => Ok((
            p.trim()
                .parse()
                .with_context(|| format!("{text:?} is not a percentage"))?,
            true,
        )),
        None => Ok((
            text.trim()
                .parse()
                .with_context(|| format!("{text:?} is not a count"))?,
            false,
        )),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Returns the process exit code.
pub async fn run(session: &Session, args: Args) -> anyhow::Result<u8> {
    if args.group.is_none() && args.selector.is_none() {
        bail!("give --group or --selector");
    }
    let content = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    // The gateways' own rules, here first: every problem named with the file and line, and
    // nothing sent (the coordinator checks again, for any other client).
    let source = args.file.display().to_string();
    if let Err(invalid) = kt_gateway::config::PolicyConfig::parse(&source, &content) {
        bail!(
            "{source} does not validate ({} problems), nothing was pushed:\n{invalid}",
            invalid.errors.len()
        );
    }
    let (size, size_percent) = parse_size(if args.strategy == StrategyArg::Canary {
        &args.canary_size
    } else {
        &args.batch_size
    })?;
    let spec = RolloutSpec {
        group: args.group.clone().unwrap_or_default(),
        selector: args.selector.clone().unwrap_or_default(),
        strategy: match args.strategy {
            StrategyArg::Rolling => Strategy::Rolling,
            StrategyArg::Canary => Strategy::Canary,
            StrategyArg::AllAtOnce => Strategy::AllAtOnce,
        } as i32,
        size,
        size_percent,
        auto_promote: args.auto_promote,
        pause_between_ms: ms(args.pause_between),
        min_healthy_time_ms: ms(args.min_healthy_time),
        apply_deadline_ms: ms(args.apply_deadline),
        progress_deadline_ms: ms(args.progress_deadline),
        max_block_rate_delta: args.max_block_rate_delta.unwrap_or(-1.0),
        max_error_rate: args.max_error_rate.unwrap_or(-1.0),
        min_sample: args.min_sample,
        continue_on_inconclusive: args.continue_on_inconclusive,
        rollback_on_error: args.rollback_on_error,
    };
    if let Some(duration) = args.shadow_first
        && !args.dry_run
    {
        let gate = ShadowGate {
            duration,
            max_flip_rate: args.max_flip_rate,
            max_unblock_rate: args.max_unblock_rate.unwrap_or(args.max_flip_rate),
            min_requests: args.shadow_min_requests,
        };
        let target = (args.group.clone(), args.selector.clone());
        if let Some(stopped) = shadow_first(session, &content, target, &gate, &args.reason).await? {
            return Ok(stopped);
        }
    }
    let request = PushConfigRequest {
        content,
        spec: Some(spec),
        reason: args.reason,
        dry_run: args.dry_run,
        supersede: args.supersede,
        rollback: false,
    };
    send(session, request, args.detach, args.output).await
}

/// The limits a shadow run must keep before the push goes on.
struct ShadowGate {
    duration: Duration,
    max_flip_rate: f64,
    max_unblock_rate: f64,
    min_requests: u64,
}

/// Runs `content` as a shadow on the push's gateways and judges its flips: `Some(exit code)`
/// when the push must stop (the report printed), `None` when it may go on.
async fn shadow_first(
    session: &Session,
    content: &[u8],
    (group, selector): (Option<String>, Option<HashMap<String, String>>),
    gate: &ShadowGate,
    reason: &str,
) -> anyhow::Result<Option<u8>> {
    let request = StartShadowRequest {
        content: content.to_vec(),
        group: group.unwrap_or_default(),
        selector: selector.unwrap_or_default(),
        duration_ms: ms(gate.duration),
        sample: 0,
        reason: format!("--shadow-first {reason}").trim().to_owned(),
    };
    let run = shadow::start_run(session, request).await?;
    println!(
        "shadow run {} started on {} gateways for {}: nothing is enforced until it passes",
        run.id,
        run.gateways.len(),
        humantime::format_duration(gate.duration)
    );
    let run = shadow::wait_for_end(session, &run.id, true).await?;
    let report = run.report.clone().unwrap_or_default();
    let flips = report.share("allow", "block");
    let unblocks = report.share("block", "allow");
    let why = if report.compared < gate.min_requests {
        Some(format!(
            "only {} requests were compared (at least {} are needed): no evidence is not a pass",
            report.compared, gate.min_requests
        ))
    } else if flips > gate.max_flip_rate {
        Some(format!(
            "{:.2}% of requests would go from allow to block (limit {:.2}%)",
            flips * 100.0,
            gate.max_flip_rate * 100.0
        ))
    } else if unblocks > gate.max_unblock_rate {
        Some(format!(
            "{:.2}% of requests would go from block to allow (limit {:.2}%)",
            unblocks * 100.0,
            gate.max_unblock_rate * 100.0
        ))
    } else {
        None
    };
    match why {
        Some(why) => {
            print!("{}", shadow::report::header(&run));
            print!("{}", shadow::report::matrix(&report));
            println!(
                "
stopped before any gateway enforces it: {why}"
            );
            Ok(Some(rollouts::exit::STOPPED_BY_SHADOW))
        }
        None => {
            println!(
                "shadow run {} passed: {}; pushing",
                run.id,
                shadow::report::summary(&report)
            );
            Ok(None)
        }
    }
}

/// Sends a push, prints the plan or the rollout, and follows it unless detached.
/// Returns the exit code.
pub async fn send(
    session: &Session,
    request: PushConfigRequest,
    detach: bool,
    output: Output,
) -> anyhow::Result<u8> {
    let dry_run = request.dry_run;
    let mut client = session.client().await?;
    let response = client
        .push_config(request)
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let rollout = response
        .rollout
        .context("the coordinator sent no rollout")?;
    if output != Output::Table {
        print_structured(&rollouts::to_json(&rollout, Some(&response.diff)), output)?;
        if dry_run || detach {
            return Ok(0);
        }
    } else if dry_run {
        println!("dry run: nothing changes");
        print_summary(&rollout);
        println!();
        print!(
            "{}",
            if response.diff.is_empty() {
                "(no difference)\n".to_owned()
            } else {
                response.diff
            }
        );
        return Ok(0);
    } else {
        println!("rollout {} created: {}", rollout.id, config_label(&rollout));
    }
    if detach {
        println!(
            "follow it with: ktctl rollout status {} --watch",
            rollout.id
        );
        return Ok(0);
    }
    let last = follow(session, &rollout.id).await?;
    if output == Output::Table {
        println!();
        print_summary(&last);
    }
    Ok(exit_code(last.state().label()).unwrap_or(rollouts::exit::FAILED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_selectors() {
        assert_eq!(parse_size("3").expect("count"), (3, false));
        assert_eq!(parse_size("25%").expect("percent"), (25, true));
        assert!(parse_size("many").is_err());
        let s = parse_selector("region=eu,env=prod").expect("selector");
        assert_eq!(s["region"], "eu");
        assert!(parse_selector("region").is_err());
    }
}
