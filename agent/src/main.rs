//! `kt-agent`: load the config, check the certificates, run until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kt_agent::Agent;
use kt_agent::config::AgentConfig;
use kt_daemon::daemon::{self, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Sidecar agent beside a governed LLM gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The agent's config file.
    #[arg(long, env = "KT_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "KT_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Check the config file and certificates, then exit.
    Validate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::init_logging(cli.log_format);
    kt_daemon::install_crypto_provider();

    let Some(config_path) = cli.config else {
        eprintln!("kt-agent: --config FILE is required");
        return ExitCode::from(daemon::EXIT_CONFIG as u8);
    };
    let agent = match AgentConfig::load(&config_path)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(Agent::new(c)?))
    {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("kt-agent: {e}");
            return ExitCode::from(daemon::EXIT_CONFIG as u8);
        }
    };
    if matches!(cli.command, Some(Command::Validate)) {
        println!(
            "{}: ok (gateway {})",
            config_path.display(),
            agent.gateway_id()
        );
        return ExitCode::SUCCESS;
    }
    tracing::info!(gateway_id = %agent.gateway_id(), "agent starting");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kt-agent: cannot start the runtime: {e}");
            return ExitCode::from(daemon::EXIT_FAILURE as u8);
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(daemon::cancel_on_terminate(cancel.clone()));
        // Config and certificates are checked: from here the agent only retries, never exits.
        daemon::notify("READY=1");
        agent.run(cancel).await
    });
    match result {
        Ok(()) => {
            tracing::info!("agent stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent stopped");
            ExitCode::from(daemon::EXIT_FAILURE as u8)
        }
    }
}
