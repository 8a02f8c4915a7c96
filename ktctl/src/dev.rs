//! The local dev fleet: layout, config files and the processes `ktctl dev` starts and stops.
//!
//! Everything lives in one directory (by default under the user's state directory, see
//! [`default_dir`]): the PKI, each process's config and log, `dev.json` (the processes
//! started, with their pids) and `ktctl.yaml`. Processes are stopped by their recorded pid,
//! and only after checking that the pid still runs the binary that was started.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub const KTCTL_CONFIG_FILE: &str = "ktctl.yaml";
pub const STATE_FILE: &str = "dev.json";
pub const DEV_GROUP: &str = "dev";
pub const DEV_OPERATOR: &str = "dev";

/// The default dev fleet directory: `$XDG_STATE_HOME/kt-fleet/dev`, else
/// `~/.local/state/kt-fleet/dev`.
pub fn default_dir() -> PathBuf {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(state).join("kt-fleet").join("dev");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/kt-fleet/dev"),
        None => std::env::temp_dir().join("kt-fleet-dev"),
    }
}

/// The file naming the dev fleet `dev up` started last, so that plain `ktctl` (and `dev status`,
/// `dev down`) find a fleet started with `--dir` too; like kubectl's current context.
fn current_pointer() -> PathBuf {
    default_dir().with_file_name("current-dev-fleet")
}

/// The directory of the dev fleet `dev up` started last, if it still has one.
pub fn current_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string(current_pointer()).ok()?;
    let dir = PathBuf::from(text.trim());
    DevState::path(&dir).is_file().then_some(dir)
}

/// Records `dir` as the current dev fleet.
pub fn set_current(dir: &Path) -> std::io::Result<()> {
    let pointer = current_pointer();
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(pointer, format!("{}\n", dir.display()))
}

/// Forgets `dir` as the current dev fleet, if it is.
pub fn clear_current(dir: &Path) {
    if current_dir().is_some_and(|current| current == dir) {
        let _ = std::fs::remove_file(current_pointer());
    }
}

/// A free loopback address, chosen up front so that a dev process keeps its address when it
/// is restarted with its own command line (port 0 would bind a new one each time).
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A kt binary: next to the running executable if there, else looked up on `PATH`.
pub fn find_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The three process kinds of a fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Coordinator,
    /// The mock LLM provider (`kt-gateway mock-provider`).
    Provider,
    Gateway,
    Agent,
}

impl Role {
    pub fn binary(self) -> &'static str {
        match self {
            Role::Coordinator => "kt-coordinator",
            Role::Provider | Role::Gateway => "kt-gateway",
            Role::Agent => "kt-agent",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Provider => "provider",
            Role::Gateway => "gateway",
            Role::Agent => "agent",
        }
    }
}

/// One process `ktctl dev up` started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevProcess {
    pub role: Role,
    /// The gateway id, for gateways and agents.
    pub id: Option<String>,
    pub pid: u32,
    /// The listen address, for processes that listen.
    pub address: Option<String>,
    pub binary: PathBuf,
    pub log: PathBuf,
}

/// `dev.json`: what was started, in start order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevState {
    pub processes: Vec<DevProcess>,
}

impl DevState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// `Ok(None)` when no dev fleet was started in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is corrupt", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Written after every start, so a failed `dev up` can still be cleaned up by `dev down`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        kt_daemon::fs::write_atomic(&path, &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Whether `pid` is alive and still runs `binary` (a recycled pid does not count).
pub fn is_running(pid: u32, binary: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name; Z and X are dead.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) else {
        return false;
    };
    let expected = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
    // A binary rebuilt since the process started shows as "<path> (deleted)": still ours.
    let exe = exe.to_string_lossy();
    exe.strip_suffix(" (deleted)").unwrap_or(&exe) == expected.to_string_lossy()
}

/// Stops a process by pid: SIGTERM, then SIGKILL after `grace`. Returns whether it was running.
pub fn stop(pid: u32, binary: &Path, grace: Duration) -> bool {
    if !is_running(pid, binary) {
        return false;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let target = Pid::from_raw(raw);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_running(pid, binary) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(target, Signal::SIGKILL);
    true
}

/// Starts a daemon detached from the terminal (own process group, no stdin), logging to `log`.
pub fn spawn(
    binary: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (build the workspace first: cargo build)",
                binary.display()
            )
        })
}

/// Waits until `child` writes its bound address to `ready_file`, or fails with its log tail.
pub fn wait_ready(
    child: &mut Child,
    ready_file: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(addr) = std::fs::read_to_string(ready_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return Ok(addr);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "process exited ({status}) before it was ready:\n{}",
                log_tail(log)
            );
        }
        if Instant::now() >= deadline {
            bail!("process not ready within {timeout:?}:\n{}", log_tail(log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    let mut tail = format!("--- last lines of {} ---\n", log.display());
    for line in &lines[start..] {
        let _ = writeln!(tail, "{line}");
    }
    tail
}

/// Liveness settings written into a coordinator config.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub heartbeat_interval: Duration,
    pub unreachable_after: Duration,
    pub disconnected_after: Duration,
}

impl Liveness {
    /// Snappy settings for a local fleet: a dead agent shows within seconds.
    pub const DEV: Liveness = Liveness {
        heartbeat_interval: Duration::from_secs(1),
        unreachable_after: Duration::from_secs(3),
        disconnected_after: Duration::from_secs(10),
    };
}

/// `coordinator.yaml` text.
pub fn coordinator_config(
    listen: SocketAddr,
    pki: &Path,
    data_dir: &Path,
    groups_file: &Path,
    liveness: Liveness,
) -> String {
    format!(
        "listen: \"{listen}\"\ntls:\n  ca: {ca}\n  cert: {cert}\n  key: {key}\ndata_dir: {data}\ngroups_file: {groups}\nliveness:\n  heartbeat_interval: {hb}ms\n  unreachable_after: {un}ms\n  disconnected_after: {dis}ms\n  reconnect_spread: {hb}ms\n",
        ca = pki.join("ca.crt").display(),
        cert = pki.join("coordinator.crt").display(),
        key = pki.join("coordinator.key").display(),
        data = data_dir.display(),
        groups = groups_file.display(),
        hb = liveness.heartbeat_interval.as_millis(),
        un = liveness.unreachable_after.as_millis(),
        dis = liveness.disconnected_after.as_millis(),
    )
}

/// `groups.yaml` text with one group.
pub fn groups_file(group: &str, gateways: &[String]) -> String {
    format!(
        "groups:\n  {group}:\n    gateways: [{}]\n",
        gateways.join(", ")
    )
}

/// What an agent config says.
#[derive(Clone, Debug)]
pub struct AgentSpec<'a> {
    pub gateway_id: &'a str,
    pub coordinator: SocketAddr,
    pub pki: &'a Path,
    /// The gateway's listen address: health at `/health`, reload at `/admin/reload`.
    pub gateway: SocketAddr,
    pub health_interval: Duration,
    pub labels: &'a [(&'a str, &'a str)],
    /// The gateway's config file, which the agent then manages (offers are applied to it).
    pub config_path: Option<&'a Path>,
    /// The `kt-gateway` binary whose `validate` checks offered configs.
    pub validator: &'a Path,
    /// The gateway's decision events file, which the agent then forwards.
    pub events_file: Option<&'a Path>,
    /// Where the gateway writes its probe token (`--probe-token-file`).
    pub probe_token_file: Option<&'a Path>,
    /// The agent's event buffer bound (its default when `None`).
    pub max_buffered_events: Option<u64>,
    pub state_dir: &'a Path,
    /// Where the agent serves `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// `agent.yaml` text. The agent reaches the coordinator by IP and checks its IP SAN.
pub fn agent_config(spec: &AgentSpec<'_>) -> String {
    let mut labels = String::new();
    for (k, v) in spec.labels {
        let _ = writeln!(labels, "  {k}: \"{v}\"");
    }
    let mut managed = String::new();
    let buffer = spec
        .max_buffered_events
        .map(|n| format!("events:\n  max_buffered_events: {n}\n"))
        .unwrap_or_default();
    let metrics = spec
        .metrics_listen
        .map(|addr| format!("metrics_listen: \"{addr}\"\n"))
        .unwrap_or_default();
    if let Some(events) = spec.events_file {
        let _ = writeln!(managed, "  events_file: {}", events.display());
    }
    if let Some(token) = spec.probe_token_file {
        let _ = writeln!(managed, "  probe_token_file: {}", token.display());
    }
    if let Some(config_path) = spec.config_path {
        let validator =
            std::fs::canonicalize(spec.validator).unwrap_or_else(|_| spec.validator.to_owned());
        let _ = write!(
            managed,
            "  config_path: {}\n  validate_command: [\"{}\", validate, \"{{file}}\"]\n  reload: {{url: \"http://{}/admin/reload\"}}\n",
            config_path.display(),
            validator.display(),
            spec.gateway
        );
    }
    format!(
        "coordinator:\n  endpoints: [\"https://{coord}\"]\ntls:\n  ca: {ca}\n  cert: {cert}\n  key: {key}\ngateway:\n  health_url: \"http://{gateway}/health\"\n  health_interval: {hi}ms\n{managed}state_dir: {state}\n{buffer}{metrics}labels:\n{labels}reconnect:\n  min_delay: 200ms\n  max_delay: 2s\n",
        coord = spec.coordinator,
        ca = spec.pki.join("ca.crt").display(),
        cert = spec
            .pki
            .join(format!("agent-{}.crt", spec.gateway_id))
            .display(),
        key = spec
            .pki
            .join(format!("agent-{}.key", spec.gateway_id))
            .display(),
        gateway = spec.gateway,
        hi = spec.health_interval.as_millis(),
        state = spec.state_dir.display(),
    )
}

/// The example policy config every dev gateway starts with.
pub const EXAMPLE_POLICY: &str = include_str!("../../deploy/examples/policy-config.yaml");
/// Where the example policy expects its provider.
const EXAMPLE_PROVIDER_URL: &str = "http://127.0.0.1:41003/v1";
/// The secret the example policy's provider target reads; the mock provider accepts any value.
pub const MOCK_PROVIDER_SECRET: (&str, &str) = ("MOCK_PROVIDER_KEY", "dev-not-a-secret");

/// The example policy pointed at a mock provider listening on `provider`, probed every second.
pub fn example_policy(provider: SocketAddr) -> String {
    EXAMPLE_POLICY
        .replace(EXAMPLE_PROVIDER_URL, &format!("http://{provider}/v1"))
        .replace("probe_interval: 5s", "probe_interval: 1s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(DevState::load(dir.path()).expect("load"), None);
        let state = DevState {
            processes: vec![DevProcess {
                role: Role::Gateway,
                id: Some("gw-dev-01".into()),
                pid: 42,
                address: Some("127.0.0.1:1".into()),
                binary: "/bin/true".into(),
                log: "x.log".into(),
            }],
        };
        state.save(dir.path()).expect("save");
        assert_eq!(DevState::load(dir.path()).expect("load"), Some(state));
        std::fs::write(DevState::path(dir.path()), "{").expect("corrupt");
        assert!(DevState::load(dir.path()).is_err());
    }

    #[test]
    fn running_check_matches_the_binary_not_just_the_pid() {
        let me = std::process::id();
        let exe = std::env::current_exe().expect("exe");
        assert!(is_running(me, &exe));
        assert!(!is_running(me, Path::new("/bin/sh")));
        assert!(!is_running(u32::MAX - 1, &exe));
    }

    #[test]
    fn a_process_whose_binary_was_rebuilt_is_still_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("sleeper");
        std::fs::copy("/bin/sleep", &copy).expect("copy");
        let mut child =
            spawn(&copy, &["30".into()], &[], &dir.path().join("s.log")).expect("spawn");
        let canonical = std::fs::canonicalize(&copy).expect("canonical");
        std::fs::remove_file(&copy).expect("remove");
        assert!(
            is_running(child.id(), &canonical),
            "a deleted binary still names the process"
        );
        assert!(stop(child.id(), &canonical, Duration::from_secs(5)));
        let _ = child.wait();
    }

    #[test]
    fn stop_terminates_a_child_by_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sleep = PathBuf::from("/bin/sleep");
        let mut child =
            spawn(&sleep, &["30".into()], &[], &dir.path().join("sleep.log")).expect("spawn");
        let pid = child.id();
        let binary = std::fs::canonicalize(&sleep).expect("canonical");
        assert!(is_running(pid, &binary));
        assert!(stop(pid, &binary, Duration::from_secs(5)));
        let status = child.wait().expect("wait");
        assert!(!status.success());
        assert!(!is_running(pid, &binary));
    }

    #[test]
    fn example_policy_points_at_the_mock_provider() {
        let text = example_policy("127.0.0.1:5555".parse().expect("addr"));
        assert!(text.contains("http://127.0.0.1:5555/v1"), "{text}");
        assert!(text.contains("probe_interval: 1s"), "{text}");
    }

    #[test]
    fn generated_configs_name_every_file() {
        let text = agent_config(&AgentSpec {
            gateway_id: "gw-dev-01",
            coordinator: "127.0.0.1:9".parse().expect("addr"),
            pki: Path::new("/p"),
            gateway: "127.0.0.1:8".parse().expect("addr"),
            health_interval: Duration::from_millis(500),
            labels: &[("region", "us")],
            config_path: Some(Path::new("/g/policy.yaml")),
            validator: Path::new("/bin/kt-gateway"),
            events_file: Some(Path::new("/g/events.jsonl")),
            probe_token_file: Some(Path::new("/g/probe-token")),
            max_buffered_events: Some(10),
            state_dir: Path::new("/g/state"),
            metrics_listen: None,
        });
        assert!(
            text.contains("reload: {url: \"http://127.0.0.1:8/admin/reload\"}"),
            "{text}"
        );
        assert!(text.contains("config_path: /g/policy.yaml"), "{text}");
        assert!(text.contains("/p/agent-gw-dev-01.key"), "{text}");
        assert!(text.contains("region: \"us\""), "{text}");
    }
}
