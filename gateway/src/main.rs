//! `kt-gateway`: serve a policy config, or validate one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kt_gateway::config::PolicyConfig;
use kt_gateway::gateway::Gateway;
use kt_proto::daemon::{self, LogFormat};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "A governed LLM gateway",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Policy config file (policy-config.yaml).
    #[arg(long, env = "KT_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "KT_GATEWAY_LISTEN", default_value = "127.0.0.1:41002")]
    listen: SocketAddr,
    /// The id this gateway reports in health and decision events.
    #[arg(long, env = "KT_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Check a policy config file and print every error with its line.
    Validate { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Validate { file }) => validate(&file),
        None => serve(cli.serve),
    }
}

fn validate(file: &std::path::Path) -> ExitCode {
    match PolicyConfig::load(file) {
        Ok(config) => {
            println!(
                "{}: ok: pack {} {} ({}), {} policies, {} provider targets, {}",
                file.display(),
                config.pack_name,
                config.version,
                if config.enabled {
                    "enabled"
                } else {
                    "disabled"
                },
                config.chain.len(),
                config.providers.len(),
                config.hash
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    daemon::init_logging(args.log_format);
    let Some(config_path) = args.config else {
        eprintln!("kt-gateway: --config FILE is required");
        return ExitCode::from(daemon::EXIT_CONFIG as u8);
    };
    let gateway = match Gateway::load(config_path, args.gateway_id) {
        Ok(gateway) => gateway,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(daemon::EXIT_CONFIG as u8);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kt-gateway: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(gateway, args.listen, args.ready_file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    gateway: Gateway,
    listen: SocketAddr,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let current = gateway.current();
    tracing::info!(%addr, version = %current.config.version, hash = %current.config.hash, "gateway listening");
    if let Some(path) = ready_file {
        daemon::write_ready_file(&path, addr)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    let cancel = CancellationToken::new();
    let mut hangup = signal(SignalKind::hangup())?;
    let reloader = gateway.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let _ = reloader.reload();
        }
    });
    tokio::spawn(daemon::cancel_on_terminate(cancel.clone()));
    kt_gateway::http::serve(gateway, listener, cancel).await?;
    tracing::info!("gateway stopped");
    Ok(())
}
