//! `kt-agent`: load the config, check the certificates (enrolling first when it has none yet),
//! run until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kt_agent::Agent;
use kt_agent::config::{AgentConfig, EnrollmentSettings};
use kt_agent::enroll::{self, EnrollError, Target};
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
    /// The gateway id to enroll as, over the config's `enrollment.gateway_id` (a pod's name).
    #[arg(long = "enroll-as", env = "KT_AGENT_GATEWAY_ID", global = true)]
    enroll_as: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the config file and certificates, then exit.
    Validate,
    /// Get this agent's certificate with a join token, then exit. With --config, its
    /// `enrollment:` and `tls:` are used (flags override); without, the files go to --dir.
    Enroll(EnrollArgs),
}

#[derive(Args)]
struct EnrollArgs {
    /// The coordinator, `https://host:port` (with --config: its coordinator.endpoints).
    #[arg(long)]
    coordinator: Option<String>,
    /// The file holding the join token (`ktctl token create`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// `sha256:...` of the deployment's root CA (`ktctl pki fingerprint`).
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// The gateway id to ask for (needed with a token for a group or a selector).
    #[arg(long)]
    gateway_id: Option<String>,
    /// Without --config: where ca.crt, agent.crt and agent.key are written.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Enroll even if a certificate is already there (it is replaced).
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::init_logging(cli.log_format);
    kt_daemon::install_crypto_provider();

    if let Some(Command::Enroll(args)) = &cli.command {
        return enroll_command(cli.config.as_deref(), cli.enroll_as.as_deref(), args);
    }
    let Some(config_path) = cli.config else {
        eprintln!("kt-agent: --config FILE is required");
        return ExitCode::from(daemon::EXIT_CONFIG as u8);
    };
    let config = match AgentConfig::load(&config_path)
        .map_err(|e| e.to_string())
        .and_then(|config| with_enroll_as(config, cli.enroll_as.as_deref()))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kt-agent: {e}");
            return ExitCode::from(daemon::EXIT_CONFIG as u8);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kt-agent: cannot start the runtime: {e}");
            return ExitCode::from(daemon::EXIT_FAILURE as u8);
        }
    };
    let cancel = CancellationToken::new();
    // First boot: no certificate yet, and a join token to get one with.
    let validate_only = matches!(cli.command, Some(Command::Validate));
    if let (Some(enrollment), true) = (&config.enrollment, validate_only)
        && !config.tls.cert.exists()
    {
        // `ExecStartPre=kt-agent validate` on a first boot: the config is fine; the token is
        // checked when used, the certificate does not exist yet.
        if let Err(error) = std::fs::metadata(&enrollment.token_file) {
            eprintln!(
                "kt-agent: enrollment.token_file {}: {error}",
                enrollment.token_file.display()
            );
            return ExitCode::from(daemon::EXIT_CONFIG as u8);
        }
        println!(
            "{}: ok (no certificate yet: enrolls at start with {})",
            config_path.display(),
            enrollment.token_file.display()
        );
        return ExitCode::SUCCESS;
    }
    let mut first_boot = None;
    if let (Some(enrollment), false) = (&config.enrollment, validate_only)
        && !config.tls.cert.exists()
    {
        let target = Target::of(&config);
        let enrolled = runtime.block_on(async {
            tokio::spawn(daemon::cancel_on_terminate(cancel.clone()));
            enroll_until_answered(&target, enrollment, &cancel).await
        });
        match enrolled {
            Some(Ok(lifetime)) => first_boot = Some(lifetime),
            Some(Err(code)) => return code,
            None => return ExitCode::SUCCESS, // stopped while waiting
        }
    }
    let agent = match Agent::new(config) {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("kt-agent: {e}");
            return ExitCode::from(daemon::EXIT_CONFIG as u8);
        }
    };
    if let Some(lifetime) = first_boot {
        agent.enrolled_now(lifetime);
    }
    if validate_only {
        println!(
            "{}: ok (gateway {})",
            config_path.display(),
            agent.gateway_id()
        );
        return ExitCode::SUCCESS;
    }
    tracing::info!(gateway_id = %agent.gateway_id(), "agent starting");
    let result = runtime.block_on(async {
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

/// `--enroll-as` (`KT_AGENT_GATEWAY_ID`) over `enrollment.gateway_id`.
fn with_enroll_as(mut config: AgentConfig, enroll_as: Option<&str>) -> Result<AgentConfig, String> {
    if let (Some(id), Some(enrollment)) = (enroll_as, config.enrollment.as_mut()) {
        kt_proto::identity::GatewayId::new(id)
            .map_err(|why| format!("--enroll-as / KT_AGENT_GATEWAY_ID {id:?}: {why}"))?;
        enrollment.gateway_id = Some(id.to_owned());
    }
    Ok(config)
}

/// Enrolls, retrying while no coordinator answers; a refusal ends it (the token will not get
/// better by itself). `None` when cancelled.
async fn enroll_until_answered(
    target: &Target,
    enrollment: &EnrollmentSettings,
    cancel: &CancellationToken,
) -> Option<Result<std::time::Duration, ExitCode>> {
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        match enroll::enroll_at(target, enrollment).await {
            Ok(enrolled) => {
                tracing::info!(gateway_id = %enrolled.gateway_id, group = %enrolled.group,
                    cert = %target.files.cert.display(), "enrolled");
                return Some(Ok(enrolled.lifetime));
            }
            Err(EnrollError::Unreachable(why)) => {
                tracing::warn!(%why, retry_in_ms = delay.as_millis() as u64, "cannot enroll yet");
            }
            Err(error) => {
                tracing::error!(%error, "enrollment failed");
                eprintln!("kt-agent: {error}");
                return Some(Err(ExitCode::from(daemon::EXIT_CONFIG as u8)));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    }
}

/// `kt-agent enroll`: one attempt per coordinator, then exit.
fn enroll_command(
    config_path: Option<&std::path::Path>,
    enroll_as: Option<&str>,
    args: &EnrollArgs,
) -> ExitCode {
    let usage = |why: String| {
        eprintln!("kt-agent enroll: {why}");
        ExitCode::from(daemon::EXIT_CONFIG as u8)
    };
    let (mut target, from_config) = match config_path {
        Some(path) => match AgentConfig::load(path) {
            Ok(config) => (Target::of(&config), config.enrollment),
            Err(e) => return usage(e.to_string()),
        },
        None => (
            Target {
                endpoints: Vec::new(),
                server_name: None,
                labels: Default::default(),
                files: kt_proto::tls::TlsFiles {
                    ca: args.dir.join("ca.crt"),
                    cert: args.dir.join("agent.crt"),
                    key: args.dir.join("agent.key"),
                },
            },
            None,
        ),
    };
    if let Some(url) = &args.coordinator {
        if !url.starts_with("https://") {
            return usage(format!("--coordinator {url:?} must be an https:// URL"));
        }
        target.endpoints = vec![url.clone()];
    }
    if target.endpoints.is_empty() {
        return usage("--coordinator URL is required".into());
    }
    let token_file = args
        .token_file
        .clone()
        .or_else(|| from_config.as_ref().map(|e| e.token_file.clone()));
    let fingerprint = args
        .ca_fingerprint
        .clone()
        .or_else(|| from_config.as_ref().map(|e| e.ca_fingerprint.clone()));
    let (Some(token_file), Some(ca_fingerprint)) = (token_file, fingerprint) else {
        return usage("--token-file and --ca-fingerprint are required".into());
    };
    if let Err(why) = kt_proto::leaf::parse_fingerprint(&ca_fingerprint) {
        return usage(why);
    }
    let enrollment = EnrollmentSettings {
        token_file,
        ca_fingerprint,
        gateway_id: args
            .gateway_id
            .clone()
            .or_else(|| enroll_as.map(str::to_owned))
            .or_else(|| from_config.and_then(|e| e.gateway_id)),
    };
    if target.files.cert.exists() && !args.force {
        return usage(format!(
            "{} already exists (use --force to enroll again and replace it)",
            target.files.cert.display()
        ));
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return usage(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(enroll::enroll_at(&target, &enrollment)) {
        Ok(enrolled) => {
            println!(
                "enrolled as gateway {}{}; certificate {} (renewed by the agent before it ends, lifetime {})",
                enrolled.gateway_id,
                if enrolled.group.is_empty() {
                    String::new()
                } else {
                    format!(" in group {}", enrolled.group)
                },
                target.files.cert.display(),
                humantime_serde::re::humantime::format_duration(enrolled.lifetime)
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kt-agent enroll: {error}");
            ExitCode::from(match error {
                EnrollError::Unreachable(_) => daemon::EXIT_FAILURE,
                _ => daemon::EXIT_CONFIG,
            } as u8)
        }
    }
}
