//! `ktctl config shadow` starts a shadow run; `ktctl shadow list|status|report|stop` reads and
//! ends them. A shadow run evaluates a candidate config beside the active one on live traffic,
//! deciding nothing, and reports which requests would change verdict.

pub mod report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use kt_proto::v1::{ListShadowsRequest, ShadowRun, ShadowRunRequest, StartShadowRequest};

use crate::Session;
use crate::commands::parse_selector;
use crate::view::{Output, print_structured, short_hash, table};

/// How often `--watch` and `--shadow-first` read the run again.
const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The candidate policy config.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// The group whose gateways evaluate it.
    #[arg(long, conflicts_with = "selector")]
    pub group: Option<String>,
    /// Gateways whose labels match, e.g. `region=eu,env=prod`.
    #[arg(long, value_parser = parse_selector)]
    pub selector: Option<HashMap<String, String>>,
    /// How long the shadow runs before it is removed and the report stored.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
    pub duration: Duration,
    /// End the run as soon as this many requests were compared.
    #[arg(long)]
    pub sample: Option<u64>,
    /// Why: recorded with the config version and in the audit log.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Wait for the run to end and print its report.
    #[arg(long)]
    pub wait: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The shadow run's id (`s-...`).
    pub id: String,
    /// Read it again every 2 s until it ends, then print the stored report.
    #[arg(long)]
    pub watch: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    pub id: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The candidate's bytes, checked here first with the gateways' own rules.
pub fn read_candidate(file: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let content = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let source = file.display().to_string();
    if let Err(invalid) = kt_gateway::config::PolicyConfig::parse(&source, &content) {
        bail!(
            "{source} does not validate ({} problems), nothing was started:\n{invalid}",
            invalid.errors.len()
        );
    }
    Ok(content)
}

/// Starts a shadow run; returns it as the coordinator stored it.
pub async fn start_run(
    session: &Session,
    request: StartShadowRequest,
) -> anyhow::Result<ShadowRun> {
    let mut client = session.client().await?;
    Ok(client
        .start_shadow(request)
        .await
        .map_err(crate::status_error)?
        .into_inner())
}

pub async fn start(session: &Session, args: StartArgs) -> anyhow::Result<()> {
    if args.group.is_none() && args.selector.is_none() {
        bail!("give --group or --selector");
    }
    let content = read_candidate(&args.file)?;
    let request = StartShadowRequest {
        content,
        group: args.group.unwrap_or_default(),
        selector: args.selector.unwrap_or_default(),
        duration_ms: u64::try_from(args.duration.as_millis()).unwrap_or(u64::MAX),
        sample: args.sample.unwrap_or(0),
        reason: args.reason,
    };
    let run = start_run(session, request).await?;
    if args.wait {
        let last = wait_for_end(session, &run.id, args.output == Output::Table).await?;
        return show(&last, args.output, true);
    }
    if args.output != Output::Table {
        return print_structured(&run, args.output);
    }
    print!("{}", report::header(&run));
    println!(
        "\nfollow it with: ktctl shadow report {} --watch   (end it early: ktctl shadow stop {})",
        run.id, run.id
    );
    Ok(())
}

async fn get(session: &Session, id: &str) -> anyhow::Result<ShadowRun> {
    let mut client = session.client().await?;
    Ok(client
        .get_shadow(ShadowRunRequest { id: id.to_owned() })
        .await
        .map_err(crate::status_error)?
        .into_inner())
}

/// Reads the run until it ended and its report is stored; with `progress`, a line per read.
pub async fn wait_for_end(
    session: &Session,
    id: &str,
    progress: bool,
) -> anyhow::Result<ShadowRun> {
    loop {
        let run = get(session, id).await?;
        let ended = run.state != "running";
        // The stored report is final; one read now is taken only if none comes within a minute.
        let given_up = kt_daemon::unix_ms_now() > run.ended_at_unix_ms + 60_000;
        if ended && run.report.as_ref().is_some_and(|r| r.stored || given_up) {
            return Ok(run);
        }
        if progress {
            let line = run
                .report
                .as_ref()
                .map(report::summary)
                .unwrap_or_else(|| "no report yet".into());
            let what = if ended {
                "ended; reading its report"
            } else {
                "running"
            };
            eprintln!(
                "{} {id} {what}: {line}",
                kt_daemon::clock::hms(kt_daemon::unix_ms_now())
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Prints a run: its header, and the flip matrix when `full` (else a one-line summary).
fn show(run: &ShadowRun, output: Output, full: bool) -> anyhow::Result<()> {
    if output != Output::Table {
        return print_structured(run, output);
    }
    print!("{}", report::header(run));
    match &run.report {
        Some(r) if full => print!("{}", report::matrix(r)),
        Some(r) => println!("{}\njudgement  {}", report::summary(r), r.judgement),
        None => println!("no report: the events could not be read"),
    }
    Ok(())
}

pub async fn status(session: &Session, args: RunArgs) -> anyhow::Result<()> {
    read(session, args, false).await
}

pub async fn report(session: &Session, args: RunArgs) -> anyhow::Result<()> {
    read(session, args, true).await
}

async fn read(session: &Session, args: RunArgs, full: bool) -> anyhow::Result<()> {
    let run = if args.watch {
        wait_for_end(session, &args.id, args.output == Output::Table).await?
    } else {
        get(session, &args.id).await?
    };
    show(&run, args.output, full)
}

pub async fn stop(session: &Session, args: StopArgs) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let run = client
        .stop_shadow(ShadowRunRequest { id: args.id })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    if args.output != Output::Table {
        return print_structured(&run, args.output);
    }
    println!(
        "shadow run {} stopped; its shadow is being removed from its gateways",
        run.id
    );
    println!("its final report: ktctl shadow report {} --watch", run.id);
    Ok(())
}

pub async fn list(session: &Session, args: ListArgs) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let runs = client
        .list_shadows(ListShadowsRequest {})
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .runs;
    if args.output != Output::Table {
        return print_structured(&runs, args.output);
    }
    let mut rows = table(&[
        "ID", "STATE", "CONFIG", "TARGET", "GATEWAYS", "STARTED", "BY",
    ]);
    for r in &runs {
        let config = r.config.clone().unwrap_or_default();
        rows.add_row(vec![
            r.id.clone(),
            r.state.clone(),
            format!("{} ({})", config.version, short_hash(&config.hash)),
            r.target.clone(),
            r.gateways.len().to_string(),
            kt_daemon::clock::rfc3339(r.started_at_unix_ms),
            r.started_by.clone(),
        ]);
    }
    println!("{rows}");
    Ok(())
}
