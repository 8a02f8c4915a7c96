//! ktctl, the operators' CLI: the command tree ([`Cli`]), one module per verb under
//! [`commands`], and the pieces tests reuse (PKI, dev fleet processes, config files).

pub mod client;
pub mod commands;
pub mod console;
pub mod dev;
pub mod doctor;
pub mod ktconfig;
pub use kt_launch::pki;
pub mod rollouts;
pub mod view;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kt_daemon::yaml::ConfigFileError;
use kt_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::Channel;

use crate::commands::{
    config as config_cmd, dev as dev_cmd, events, fleet, gateway, groups, pki as pki_cmd, rollout,
};
use crate::ktconfig::KtctlConfig;
use kt_proto::v1::RolloutAction;

/// Exit codes, kubectl-like: 0 ok, 1 failed or not healthy, 2 bad flags (clap), 64 bad config file.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const CONFIG: u8 = 64;
}

#[derive(Debug, Parser)]
#[command(
    name = "ktctl",
    version,
    about = "Operate a fleet of governed LLM gateways"
)]
pub struct Cli {
    /// ktctl config file [default: $KTCTL_CONFIG, ~/.config/ktctl/config.yaml, else the dev fleet's ktctl.yaml].
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// The context to use instead of the config's current-context.
    #[arg(long, global = true)]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Noun,
}

#[derive(Debug, Subcommand)]
pub enum Noun {
    /// Certificates: the deployment's CA and its leaf certificates.
    #[command(subcommand)]
    Pki(PkiVerb),
    /// Gateways as the coordinator sees them.
    #[command(subcommand)]
    Gateway(GatewayVerb),
    /// The fleet as a whole.
    #[command(subcommand)]
    Fleet(FleetVerb),
    /// Groups of gateways: listed by id or matched by labels.
    #[command(subcommand)]
    Groups(GroupsVerb),
    /// The control plane itself: coordinator replicas, the leader, etcd.
    #[command(subcommand)]
    Cluster(ClusterVerb),
    /// Join tokens: what new agents enroll with.
    #[command(subcommand)]
    Token(TokenVerb),
    /// Agent identities: revoke one (its sessions close at once) or reinstate it.
    #[command(subcommand)]
    Agent(AgentVerb),
    /// Config versions: push one to a group, read the stored ones.
    #[command(subcommand)]
    Config(ConfigVerb),
    /// Rollouts of config versions: follow and steer them.
    #[command(subcommand)]
    Rollout(RolloutVerb),
    /// Shadow runs (`config shadow` starts one): what a candidate config would decide on live
    /// traffic, as a flip matrix of active → shadow verdicts.
    #[command(subcommand)]
    Shadow(ShadowVerb),
    /// Decision events of every gateway: live tail and counts.
    #[command(subcommand)]
    Events(EventsVerb),
    /// The fleet in a browser: gateways, rollouts (with their buttons), decisions, doctor;
    /// served on loopback with your own certificate.
    Console(console::Args),
    /// Check the whole path (coordinator, certificates, agents, gateways, providers, config,
    /// events, policy) and say what is wrong and what to do; exits 1 when a check failed.
    Doctor(commands::doctor::Args),
    /// The operating loop, step by step, on a local fleet it brings up and stops again.
    Demo(commands::demo::Args),
    /// A local fleet of real processes on loopback.
    #[command(subcommand)]
    Dev(DevVerb),
    /// Shell completions for bash, zsh or fish, on standard output.
    Completion(commands::completion::CompletionArgs),
    /// Man pages for ktctl and every subcommand, written to a directory.
    Man(commands::completion::ManArgs),
}

#[derive(Debug, Subcommand)]
pub enum EventsVerb {
    /// Decision events as they happen (and, with --since, stored ones first).
    Tail(events::tail::Args),
    /// Counts and block rate per gateway, config version or region.
    Stats(events::stats::Args),
}

#[derive(Debug, Subcommand)]
pub enum ClusterVerb {
    /// Replicas, the leader and its epoch, leases, agents per replica, etcd's health; exits 1
    /// when the control plane cannot act.
    Status(commands::cluster::status::Args),
}

#[derive(Debug, Subcommand)]
pub enum TokenVerb {
    /// A new join token (printed once): one use and one hour unless asked otherwise.
    Create(commands::token::CreateArgs),
    /// Every join token with its scope, state and uses left; never the secrets.
    List(commands::token::ListArgs),
    /// Make a token unusable at once.
    Revoke(commands::token::RevokeArgs),
}

#[derive(Debug, Subcommand)]
pub enum AgentVerb {
    /// Cut a gateway's agent off: sessions closed, renewals, sessions and enrollments refused.
    Revoke(commands::agent::RevokeArgs),
    /// Lift a revocation.
    Reinstate(commands::agent::ReinstateArgs),
    /// The revoked gateways.
    Revocations(commands::agent::ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum GroupsVerb {
    /// Add or replace the groups of a groups file.
    Apply(groups::apply::Args),
    /// Every group with its members now.
    List(groups::list::Args),
}

#[derive(Debug, Subcommand)]
pub enum ConfigVerb {
    /// Store a config version and roll it out (rolling, canary or all at once), or plan it with --dry-run.
    Push(Box<config_cmd::push::Args>),
    /// The stored config versions, newest first.
    Versions(config_cmd::versions::Args),
    /// Print a stored config version.
    Show(config_cmd::show::Args),
    /// A unified diff of two config versions (stored, or files); --semantic explains it in
    /// policy terms with example prompts that change verdict.
    Diff(config_cmd::diff::Args),
    /// Evaluate a candidate config beside the active one on live traffic, deciding nothing.
    Shadow(commands::shadow::StartArgs),
    /// Pin one gateway to a stored version: its desired config until unpinned.
    Pin(config_cmd::pin::PinArgs),
    /// Remove a gateway's pin: its desired config is its group's again.
    Unpin(config_cmd::pin::UnpinArgs),
}

#[derive(Debug, Subcommand)]
pub enum RolloutVerb {
    /// Every rollout, or the active ones.
    List(rollout::list::Args),
    /// One rollout: batches, gateways, gates, history; --watch follows it.
    Status(rollout::status::Args),
    /// Stop a running rollout where it is.
    Pause(rollout::control::Args),
    /// Continue a paused rollout.
    Resume(rollout::control::Args),
    /// Let a canary rollout go on to the rest of the gateways.
    Promote(rollout::control::Args),
    /// Stop the rollout and return every touched gateway to its previous version.
    Abort(rollout::control::Args),
    /// Every rollout, newest first, with the version it started from.
    History(rollout::history::Args),
    /// Return a group to what it ran before its last successful rollout (or --to-version).
    Undo(rollout::undo::Args),
}

#[derive(Debug, Subcommand)]
pub enum ShadowVerb {
    /// Every shadow run, newest first.
    List(commands::shadow::ListArgs),
    /// One run: its gateways and a summary of its flips; --watch follows it to its end.
    Status(commands::shadow::RunArgs),
    /// One run's flip matrix: by verdict pair, policy and reason, per gateway.
    Report(commands::shadow::RunArgs),
    /// End a run now: the shadow is removed and the report stored.
    Stop(commands::shadow::StopArgs),
}

#[derive(Debug, Subcommand)]
pub enum PkiVerb {
    /// Create a CA.
    Init(pki_cmd::init::Args),
    /// Issue a certificate for an agent, the coordinator or an operator.
    Issue(pki_cmd::issue::Args),
    /// The SHA-256 fingerprint of a CA certificate, which new agents pin when they enroll.
    Fingerprint(pki_cmd::fingerprint::Args),
}

#[derive(Debug, Subcommand)]
pub enum GatewayVerb {
    /// Health of each gateway; exits 1 unless all are healthy and connected.
    Health(gateway::health::Args),
    /// The gateways, their groups and labels.
    List(gateway::list::Args),
}

#[derive(Debug, Subcommand)]
pub enum FleetVerb {
    /// The fleet's state, then each change as it happens, until interrupted.
    Watch(fleet::watch::Args),
}

#[derive(Debug, Subcommand)]
pub enum DevVerb {
    /// Start a PKI, a coordinator and N gateway+agent pairs.
    Up(dev_cmd::up::Args),
    /// List the processes `dev up` started.
    Status(dev_cmd::status::Args),
    /// Stop the processes `dev up` started.
    Down(dev_cmd::down::Args),
}

/// How to reach the coordinator: resolved lazily, since `pki` and `dev` need no config.
#[derive(Debug)]
pub struct Session {
    config: Option<PathBuf>,
    context: Option<String>,
}

impl Session {
    pub fn new(config: Option<PathBuf>, context: Option<String>) -> Self {
        Session { config, context }
    }

    /// The config file named by `--config` or `$KTCTL_CONFIG`, if any.
    pub fn named_config(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            std::env::var_os("KTCTL_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }

    fn config_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.config {
            return Ok(path.clone());
        }
        let env = std::env::var_os("KTCTL_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let candidates = ktconfig::default_paths(env);
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .with_context(|| {
                let tried: Vec<String> =
                    candidates.iter().map(|p| p.display().to_string()).collect();
                format!(
                    "no ktctl config found (tried {}); run `ktctl dev up` or pass --config",
                    tried.join(", ")
                )
            })
    }

    pub async fn client(&self) -> anyhow::Result<OperatorServiceClient<Channel>> {
        client::connect(&self.context()?).await
    }

    /// The context in use: where the coordinator is and which certificate to present.
    pub fn context(&self) -> anyhow::Result<ktconfig::Context> {
        let path = self.config_path()?;
        let config = KtctlConfig::load(&path)?;
        Ok(config.context(self.context.as_deref(), &path)?.clone())
    }
}

/// A coordinator's refusal as an error an operator can act on.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let what = match status.code() {
        Code::Unavailable => "coordinator unavailable",
        Code::PermissionDenied | Code::Unauthenticated => "coordinator refused the certificate",
        Code::DeadlineExceeded => "coordinator timed out",
        Code::Internal | Code::Unknown => "coordinator failed",
        _ => "coordinator",
    };
    anyhow::anyhow!("{what}: {}", status.message())
}

/// An error and its causes on one line, each cause once (see `kt_daemon::error_chain`).
pub fn error_line(error: &anyhow::Error) -> String {
    kt_daemon::error_chain(&**error)
}

/// Runs one command and returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    let session = Session::new(cli.config, cli.context);
    let result = match cli.command {
        Noun::Console(args) => console::run(session, args).await.map(|()| true),
        Noun::Pki(PkiVerb::Init(args)) => pki_cmd::init::run(args).map(|()| true),
        Noun::Pki(PkiVerb::Issue(args)) => pki_cmd::issue::run(args).map(|()| true),
        Noun::Pki(PkiVerb::Fingerprint(args)) => pki_cmd::fingerprint::run(args).map(|()| true),
        Noun::Agent(AgentVerb::Revoke(args)) => {
            commands::agent::revoke(&session, args).await.map(|()| true)
        }
        Noun::Agent(AgentVerb::Reinstate(args)) => commands::agent::reinstate(&session, args)
            .await
            .map(|()| true),
        Noun::Agent(AgentVerb::Revocations(args)) => {
            commands::agent::list(&session, args).await.map(|()| true)
        }
        Noun::Gateway(GatewayVerb::Health(args)) => gateway::health::run(&session, args).await,
        Noun::Gateway(GatewayVerb::List(args)) => {
            gateway::list::run(&session, args).await.map(|()| true)
        }
        Noun::Fleet(FleetVerb::Watch(args)) => {
            fleet::watch::run(&session, args).await.map(|()| true)
        }
        Noun::Config(ConfigVerb::Push(args)) => {
            return finish(config_cmd::push::run(&session, *args).await);
        }
        Noun::Config(ConfigVerb::Versions(args)) => config_cmd::versions::run(&session, args)
            .await
            .map(|()| true),
        Noun::Config(ConfigVerb::Show(args)) => {
            config_cmd::show::run(&session, args).await.map(|()| true)
        }
        Noun::Events(EventsVerb::Tail(args)) => {
            events::tail::run(&session, args).await.map(|()| true)
        }
        Noun::Events(EventsVerb::Stats(args)) => {
            events::stats::run(&session, args).await.map(|()| true)
        }
        Noun::Cluster(ClusterVerb::Status(args)) => {
            commands::cluster::status::run(&session, args).await
        }
        Noun::Token(TokenVerb::Create(args)) => {
            commands::token::create(&session, args).await.map(|()| true)
        }
        Noun::Token(TokenVerb::List(args)) => {
            commands::token::list(&session, args).await.map(|()| true)
        }
        Noun::Token(TokenVerb::Revoke(args)) => {
            commands::token::revoke(&session, args).await.map(|()| true)
        }
        Noun::Groups(GroupsVerb::Apply(args)) => {
            groups::apply::run(&session, args).await.map(|()| true)
        }
        Noun::Groups(GroupsVerb::List(args)) => {
            groups::list::run(&session, args).await.map(|()| true)
        }
        Noun::Config(ConfigVerb::Diff(args)) => {
            config_cmd::diff::run(&session, args).await.map(|()| true)
        }
        Noun::Config(ConfigVerb::Shadow(args)) => {
            commands::shadow::start(&session, args).await.map(|()| true)
        }
        Noun::Shadow(ShadowVerb::List(args)) => {
            commands::shadow::list(&session, args).await.map(|()| true)
        }
        Noun::Shadow(ShadowVerb::Status(args)) => commands::shadow::status(&session, args)
            .await
            .map(|()| true),
        Noun::Shadow(ShadowVerb::Report(args)) => commands::shadow::report(&session, args)
            .await
            .map(|()| true),
        Noun::Shadow(ShadowVerb::Stop(args)) => {
            commands::shadow::stop(&session, args).await.map(|()| true)
        }
        Noun::Config(ConfigVerb::Pin(args)) => {
            config_cmd::pin::pin(&session, args).await.map(|()| true)
        }
        Noun::Config(ConfigVerb::Unpin(args)) => {
            config_cmd::pin::unpin(&session, args).await.map(|()| true)
        }
        Noun::Rollout(RolloutVerb::History(args)) => {
            rollout::history::run(&session, args).await.map(|()| true)
        }
        Noun::Rollout(RolloutVerb::Undo(args)) => {
            return finish(rollout::undo::run(&session, args).await);
        }
        Noun::Rollout(RolloutVerb::List(args)) => {
            rollout::list::run(&session, args).await.map(|()| true)
        }
        Noun::Rollout(RolloutVerb::Status(args)) => {
            return finish(rollout::status::run(&session, args).await);
        }
        Noun::Rollout(RolloutVerb::Pause(args)) => {
            rollout::control::run(&session, RolloutAction::Pause, args)
                .await
                .map(|()| true)
        }
        Noun::Rollout(RolloutVerb::Resume(args)) => {
            rollout::control::run(&session, RolloutAction::Resume, args)
                .await
                .map(|()| true)
        }
        Noun::Rollout(RolloutVerb::Promote(args)) => {
            rollout::control::run(&session, RolloutAction::Promote, args)
                .await
                .map(|()| true)
        }
        Noun::Rollout(RolloutVerb::Abort(args)) => {
            rollout::control::run(&session, RolloutAction::Abort, args)
                .await
                .map(|()| true)
        }
        Noun::Doctor(args) => commands::doctor::run(&session, args).await,
        Noun::Demo(args) => commands::demo::run(args).await,
        Noun::Completion(args) => commands::completion::completion(args).map(|()| true),
        Noun::Man(args) => commands::completion::man(args).map(|()| true),
        Noun::Dev(DevVerb::Up(args)) => dev_cmd::up::run(args).await.map(|()| true),
        Noun::Dev(DevVerb::Status(args)) => dev_cmd::status::run(args, &session),
        Noun::Dev(DevVerb::Down(args)) => dev_cmd::down::run(args, &session).map(|()| true),
    };
    finish(result.map(|ok| if ok { exit::OK } else { exit::FAILED }))
}

/// The exit code of a command's result; errors are printed here.
fn finish(result: anyhow::Result<u8>) -> u8 {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", error_line(&error));
            if error
                .chain()
                .any(|cause| cause.downcast_ref::<ConfigFileError>().is_some())
            {
                exit::CONFIG
            } else {
                exit::FAILED
            }
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn an_error_line_names_each_cause_once() {
        let io = std::io::Error::other("tcp connect error");
        let error = anyhow::Error::new(io)
            .context("tcp connect error")
            .context("cannot reach the coordinator at https://127.0.0.1:1");
        assert_eq!(
            error_line(&error),
            "cannot reach the coordinator at https://127.0.0.1:1: tcp connect error"
        );
        let status = status_error(tonic::Status::invalid_argument("bad spec"));
        assert_eq!(error_line(&status), "coordinator: bad spec");
    }
}
