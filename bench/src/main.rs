//! `kt-bench`: what one coordinator holds. It simulates N agents in one process, each with its
//! own certificate and its own mutual-TLS session to a real coordinator process it starts on
//! loopback, speaking the real protocol (the agent's own session code), and prints one JSON
//! result line and a human summary per scenario.
//!
//! ```text
//! kt-bench connect --agents 10000
//! kt-bench steady  --agents 10000 --heartbeat 15s --duration 60s
//! kt-bench rollout --agents 10000
//! kt-bench storm   --agents 10000 --reconnect-spread 30s
//! kt-bench events  --senders 3 --subscribers 2 --rate 100000 --duration 10s [--bus nats]
//! kt-bench watch   --agents 2000 --watchers 10 --changes-per-second 200 --duration 10s
//! ```

mod events;
mod fleet;
mod ha;
mod scenarios;
mod sim;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Fleet simulator and scale benchmarks for kt-coordinator"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Simulated agents.
    #[arg(long, global = true, default_value_t = 200)]
    agents: usize,
    /// Where certificates are issued once and kept [default: $XDG_CACHE_HOME/kt-fleet/bench-pki
    /// or ~/.cache/kt-fleet/bench-pki].
    #[arg(long, global = true)]
    certs: Option<PathBuf>,
    /// The heartbeat interval the coordinator assigns.
    #[arg(long, global = true, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// How long the measured part runs (steady, events, watch).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The spread the coordinator announces for reconnects after a lost session.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    reconnect_spread: Duration,
    /// The agents' reconnect backoff cap.
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    max_delay: Duration,
}

#[derive(Subcommand)]
enum Scenario {
    /// N agents connect at once: time until all are connected, failed attempts.
    Connect,
    /// N agents heartbeating (1% changing health each second): coordinator CPU, memory, latency.
    Steady,
    /// An all-at-once rollout to N agents: time from the push to each APPLIED, bytes sent.
    Rollout,
    /// Every agent cut off at once (coordinator killed and restarted): time until all are back,
    /// reconnects per second, coordinator memory against steady state.
    Storm,
    /// etcd and three coordinator replicas: an all-at-once rollout through a follower (time
    /// from the push to each APPLIED), then the leader killed mid-rollout (time until a new
    /// leader, and until the rollout moves again).
    Ha,
    /// Agents pushing events through the coordinator to tail subscribers.
    Events {
        #[arg(long, default_value_t = 3)]
        senders: usize,
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        /// Events per second offered, over all senders.
        #[arg(long, default_value_t = 50_000)]
        rate: u64,
        /// The coordinator's event path.
        #[arg(long, value_enum, default_value = "embedded")]
        bus: scenarios::Bus,
    },
    /// Operators watching the fleet while agents change health: update latency.
    Watch {
        #[arg(long, default_value_t = 5)]
        watchers: usize,
        #[arg(long, default_value_t = 100)]
        changes_per_second: usize,
    },
}

fn cert_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("kt-fleet").join("bench-pki")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kt_daemon::install_crypto_provider();
    // No log subscriber: the simulated agents' warnings (refused sessions during a storm...)
    // would drown the results.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kt-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kt-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let pki = cli.certs.clone().unwrap_or_else(cert_cache);
    let (agents, needed) = match &cli.scenario {
        Scenario::Events { senders, .. } => (*senders, *senders as u64 * 4 + 256),
        _ => (cli.agents, cli.agents as u64 * 3 + 256),
    };
    fleet::raise_fd_limit(needed);
    fleet::ensure_certs(&pki, agents)?;
    let mut work = tempfile::tempdir()?;
    // KT_BENCH_KEEP=1 keeps the processes' logs of a run to read after it.
    if std::env::var_os("KT_BENCH_KEEP").is_some() {
        work.disable_cleanup(true);
        eprintln!("work directory {}", work.path().display());
    }
    let run = scenarios::Run {
        pki: &pki,
        work: work.path(),
        agents,
        heartbeat: cli.heartbeat,
        duration: cli.duration,
        reconnect_spread: cli.reconnect_spread,
        max_delay: cli.max_delay,
    };
    let outcome = match cli.scenario {
        Scenario::Connect => scenarios::connect(&run).await?,
        Scenario::Steady => scenarios::steady(&run).await?,
        Scenario::Rollout => scenarios::rollout(&run).await?,
        Scenario::Ha => ha::ha(&run).await?,
        Scenario::Storm => scenarios::storm(&run).await?,
        Scenario::Events {
            senders,
            subscribers,
            rate,
            bus,
        } => {
            let settings = scenarios::EventsSettings {
                senders,
                subscribers,
                rate,
                bus,
            };
            scenarios::events(&run, &settings).await?
        }
        Scenario::Watch {
            watchers,
            changes_per_second,
        } => scenarios::watch(&run, watchers, changes_per_second).await?,
    };
    println!("{}", outcome.json);
    eprintln!("{}", outcome.summary);
    Ok(())
}
