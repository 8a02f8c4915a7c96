//! `kt-coordinator`: load the config, check it, serve until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kt_coordinator::Coordinator;
use kt_coordinator::config::CoordinatorConfig;
use kt_daemon::daemon::{self, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Holds the state of a governed LLM gateway fleet")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The coordinator's config file.
    #[arg(long, env = "KT_COORDINATOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Listen address, overriding the config file's.
    #[arg(long, env = "KT_COORDINATOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "KT_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Check the config file, certificates and groups file, then exit.
    Validate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::init_logging(cli.log_format);
    kt_daemon::install_crypto_provider();

    let Some(config_path) = cli.config else {
        eprintln!("kt-coordinator: --config FILE is required");
        return ExitCode::from(daemon::EXIT_CONFIG as u8);
    };
    let mut config = match CoordinatorConfig::load(&config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kt-coordinator: {e}");
            return ExitCode::from(daemon::EXIT_CONFIG as u8);
        }
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    let listen = config.listen;
    let coordinator = match Coordinator::new(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kt-coordinator: {e}");
            return ExitCode::from(daemon::EXIT_CONFIG as u8);
        }
    };
    if matches!(cli.command, Some(Command::Validate)) {
        println!("{}: ok", config_path.display());
        return ExitCode::SUCCESS;
    }
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(serve(coordinator, listen, cli.ready_file)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "coordinator stopped");
            ExitCode::from(daemon::EXIT_FAILURE as u8)
        }
    }
}

async fn serve(
    coordinator: Coordinator,
    listen: SocketAddr,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let listener = daemon::listen(listen, ready_file.as_deref()).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, trust_domain = coordinator.trust_domain(), "coordinator listening");
    let cancel = CancellationToken::new();
    tokio::spawn(daemon::cancel_on_terminate(cancel.clone()));
    daemon::notify("READY=1");
    coordinator.run(listener, cancel).await?;
    tracing::info!("coordinator stopped");
    Ok(())
}
