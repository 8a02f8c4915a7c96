//! `kt-gateway`: serve a policy config, validate one, or run the mock provider.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kt_daemon::daemon::{self, LogFormat};
use kt_gateway::config::PolicyConfig;
use kt_gateway::events::{self, EventsSettings};
use kt_gateway::gateway::Gateway;
use kt_gateway::mock::MockOptions;
use kt_gateway::probe_token::ProbeToken;
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
    /// The id this gateway reports in health and decision events [default: the host name].
    #[arg(long, env = "KT_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// Decision events file (JSON lines).
    #[arg(long, env = "KT_GATEWAY_EVENTS_FILE", default_value = "events.jsonl")]
    events_file: PathBuf,
    /// Rotate the events file when it would grow past this many bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    events_max_bytes: u64,
    /// Rotated events files to keep.
    #[arg(long, default_value_t = 5)]
    events_keep: usize,
    /// Write a fresh secret here at start (mode 0600): only requests whose `x-kt-synthetic`
    /// header carries it are the agent's synthetic probes. Give the agent the same path
    /// (`gateway.probe_token_file`). Without it, no request is treated as synthetic.
    #[arg(long, env = "KT_GATEWAY_PROBE_TOKEN_FILE")]
    probe_token_file: Option<PathBuf>,
    /// Open client connections at most; more are closed at once (and counted).
    #[arg(long, env = "KT_GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Connections from one peer address that have not sent their first request yet, at most.
    #[arg(long, env = "KT_GATEWAY_MAX_WAITING_PER_IP", default_value_t = 4_096)]
    max_waiting_per_ip: usize,
    /// A new connection must send its first request's headers within this time.
    #[arg(long, env = "KT_GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: std::time::Duration,
    /// A connection with no traffic for this long is closed; keep it above the providers'
    /// request timeout.
    #[arg(long, env = "KT_GATEWAY_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// A second policy config evaluated beside the active one on every request, deciding
    /// nothing (its verdict goes into the decision event's `shadow`); read again on reload,
    /// and none while the file is absent.
    #[arg(long, env = "KT_GATEWAY_SHADOW_CONFIG")]
    shadow_config: Option<PathBuf>,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "KT_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Check a policy config file: every error with its line, exit 1; or a summary, exit 0.
    Validate { file: PathBuf },
    /// Serve a deterministic OpenAI-compatible provider that echoes the last user message.
    MockProvider {
        #[arg(long, default_value = "127.0.0.1:41003")]
        listen: SocketAddr,
        #[command(flatten)]
        options: MockOptions,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kt_daemon::install_crypto_provider();
    match cli.command {
        Some(Command::Validate { file }) => validate(&file),
        Some(Command::MockProvider {
            listen,
            options,
            ready_file,
        }) => {
            daemon::init_logging(LogFormat::Text);
            block_on(mock_provider(listen, options, ready_file))
        }
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
    if let Err(errors) = PolicyConfig::load(&config_path) {
        eprintln!("{errors}");
        return ExitCode::from(daemon::EXIT_CONFIG as u8);
    }
    let gateway_id = args.gateway_id.unwrap_or_else(host_name);
    let events = EventsSettings {
        path: args.events_file,
        max_bytes: args.events_max_bytes.max(4096),
        keep: args.events_keep,
    };
    let mut limits = kt_gateway::listener::Limits::default();
    limits.connections.max_connections = args.max_connections;
    limits.connections.max_waiting_per_ip = args.max_waiting_per_ip;
    limits.connections.handshake_timeout = args.header_timeout;
    limits.idle_timeout = args.idle_timeout;
    block_on(run(
        config_path,
        args.shadow_config,
        gateway_id,
        events,
        args.probe_token_file,
        Listen {
            addr: args.listen,
            limits,
            ready_file: args.ready_file,
        },
    ))
}

/// Where and how the gateway serves.
struct Listen {
    addr: SocketAddr,
    limits: kt_gateway::listener::Limits,
    ready_file: Option<PathBuf>,
}

fn block_on(future: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(future));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kt-gateway: {e:#}");
            ExitCode::from(daemon::EXIT_FAILURE as u8)
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "gateway".into())
}

async fn run(
    config_path: PathBuf,
    shadow_path: Option<PathBuf>,
    gateway_id: String,
    events: EventsSettings,
    probe_token_file: Option<PathBuf>,
    listen: Listen,
) -> anyhow::Result<()> {
    let probe_token = probe_token_file
        .map(|path| {
            ProbeToken::create(&path)
                .with_context(|| format!("cannot write the probe token {}", path.display()))
        })
        .transpose()?;
    let events_path = events.path.clone();
    let (sink, writer) = events::start(events)
        .with_context(|| format!("cannot open events file {}", events_path.display()))?;
    let secrets: kt_gateway::gateway::SecretLookup =
        Arc::new(|name: &str| std::env::var(name).ok());
    // Loaded once more here: the file may have changed since the check in `serve`.
    let gateway = Gateway::load(config_path, gateway_id, sink, secrets, probe_token)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(path) = shadow_path {
        // A shadow that does not validate is refused (and shown in /health); serving goes on.
        let _ = gateway.set_shadow_path(path);
    }
    let listener = daemon::listen(listen.addr, listen.ready_file.as_deref()).await?;
    let addr = listener.local_addr()?;
    let current = gateway.current();
    tracing::info!(%addr, gateway_id = gateway.gateway_id(), version = %current.config.version, hash = %current.config.hash, events = %events_path.display(), "gateway listening");

    let cancel = CancellationToken::new();
    let mut hangup = signal(SignalKind::hangup())?;
    let reloader = gateway.clone();
    let reload_cancel = cancel.child_token();
    // Ends with the shutdown: it holds a gateway handle, and with it the events sink.
    let reloads = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = reload_cancel.cancelled() => return,
                signal = hangup.recv() => match signal {
                    Some(()) => {
                        let _ = reloader.reload();
                    }
                    None => return,
                },
            }
        }
    });
    let probes = tokio::spawn(gateway.clone().run_probes(cancel.child_token()));
    tokio::spawn(daemon::cancel_on_terminate(cancel.clone()));
    daemon::notify("READY=1");
    kt_gateway::http::serve(gateway, listener, listen.limits, cancel.clone()).await?;
    cancel.cancel();
    let _ = probes.await;
    let _ = reloads.await;
    // Every request handler has finished: the last sinks are gone once the gateway is dropped.
    let _ = writer.await;
    tracing::info!("gateway stopped");
    Ok(())
}

async fn mock_provider(
    listen: SocketAddr,
    options: MockOptions,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let listener = daemon::listen(listen, ready_file.as_deref()).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, ?options, "mock provider listening");
    let cancel = CancellationToken::new();
    tokio::spawn(daemon::cancel_on_terminate(cancel.clone()));
    kt_gateway::mock::serve(options, listener, cancel).await?;
    Ok(())
}
