//! Builders for end-to-end tests: a PKI, a coordinator, gateways and agents as real processes
//! on loopback (port 0), talking real mutual TLS, plus a way to run the real `ktctl`.
//!
//! Every process is owned by a [`Proc`] that kills and reaps it on drop, so a failing test
//! leaves nothing running. The binaries are the workspace's own, found next to the test
//! executable's `target/<profile>` directory: build them first (`cargo build --workspace`).

pub mod ha;
pub mod proxy;
pub mod raw;
pub mod stats;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;

use kt_ctl::ktconfig::{Context, KtctlConfig};
use kt_launch::configs::{self as dev, AgentSpec, Liveness};
use kt_launch::pki::{self, LeafRole};
use kt_launch::process;
use kt_proto::identity::GatewayId;
use kt_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::Channel;

/// Liveness for tests: a dead agent becomes unreachable in 1 s and disconnected in 3 s.
pub const TEST_LIVENESS: Liveness = Liveness {
    heartbeat_interval: Duration::from_millis(200),
    unreachable_after: Duration::from_millis(1000),
    disconnected_after: Duration::from_millis(3000),
};
/// How often test agents read their gateway's health.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(300);
/// How long a test waits for a process to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
pub const GROUP: &str = "test";

/// The directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_owned();
    assert!(
        dir.join("kt-coordinator").is_file(),
        "{} has no kt-coordinator: run `cargo build --workspace` before the tests",
        dir.display()
    );
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A child started with a command line of its own (not by [`Proc`]), killed and reaped when
/// dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process killed and reaped when dropped.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(binary: &str, args: &[String], log: PathBuf) -> Self {
        Self::spawn_with_env(binary, args, &[], log)
    }

    pub fn spawn_with_env(
        binary: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Self {
        Self::spawn_path(&bin(binary), args, env, log)
    }

    /// A program that is not ours (`etcd`), by path.
    pub fn spawn_path(binary: &Path, args: &[String], env: &[(&str, &str)], log: PathBuf) -> Self {
        let child = process::spawn(binary, args, env, &log).expect("spawn");
        Proc { child, log }
    }

    /// The child itself, for waits that need it (e.g. `kt_launch::etcd::wait_listening`).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the bound address the process writes to `ready_file`.
    pub fn wait_ready(&mut self, ready_file: &Path) -> SocketAddr {
        process::wait_ready(&mut self.child, ready_file, &self.log, READY_TIMEOUT)
            .expect("process ready")
    }

    /// SIGTERM, and wait (at most 10 s) for the exit.
    pub fn terminate(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills what is left.
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Waits for the process to exit by itself and returns its status.
    pub fn wait_exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit:\n{}",
                process::log_tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PKI in a directory: the CA and whatever leaves tests issue.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: PathBuf) -> Self {
        pki::init(&dir, pki::DEFAULT_TRUST_DOMAIN, false).expect("CA");
        let pki = Pki { dir };
        pki.issue(&LeafRole::loopback_coordinator());
        pki.issue(&LeafRole::Operator {
            name: "tester".into(),
        });
        pki
    }

    pub fn issue(&self, role: &LeafRole) -> pki::IssuedFiles {
        pki::issue(&self.dir, role, 2, false).expect("issue")
    }

    pub fn issue_agent(&self, id: &str) -> pki::IssuedFiles {
        self.issue(&LeafRole::Agent {
            gateway: GatewayId::new(id).expect("id"),
        })
    }

    /// `sha256:...` of the root CA: what enrolling agents pin.
    pub fn root_fingerprint(&self) -> String {
        use rustls_pki_types::pem::PemObject;
        let pem = std::fs::read(self.dir.join(pki::CA_CERT)).expect("ca.crt");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("PEM");
        kt_proto::leaf::fingerprint(&der)
    }

    /// A ktctl context for operator `name` (issued beforehand) against `coordinator`.
    pub fn context(&self, coordinator: SocketAddr, name: &str) -> Context {
        Context {
            name: "test".into(),
            coordinator: format!("https://{coordinator}"),
            server_name: None,
            ca: self.dir.join(pki::CA_CERT),
            cert: self.dir.join(format!("operator-{name}.crt")),
            key: self.dir.join(format!("operator-{name}.key")),
        }
    }
}

/// A coordinator process; restarts keep its port.
pub struct CoordinatorNode {
    pub proc: Option<Proc>,
    pub addr: SocketAddr,
    dir: PathBuf,
    pki_dir: PathBuf,
    /// The groups file it reads at start and on SIGHUP.
    pub groups: PathBuf,
    /// Connection limits written into its config at each start (the defaults when `None`).
    pub connections: Option<kt_daemon::conn::ConnectionLimits>,
    /// Written into its config at each start.
    pub storage: kt_coordinator::config::Storage,
    /// `events.nats`, written into its config at each start.
    pub events: Option<kt_coordinator::config::NatsEvents>,
    /// `enrollment.agent_cert_ttl`, written into its config at each start (24 h when `None`).
    pub agent_cert_ttl: Option<Duration>,
}

impl CoordinatorNode {
    pub fn start(dir: PathBuf, pki: &Pki, gateways: &[String]) -> Self {
        let mut node = Self::new(dir, pki, gateways);
        node.start_again();
        node
    }

    /// A coordinator not started yet, to be set up first: `start_again` starts it.
    pub fn new(dir: PathBuf, pki: &Pki, gateways: &[String]) -> Self {
        std::fs::create_dir_all(&dir).expect("dir");
        let groups = dir.join("groups.yaml");
        std::fs::write(&groups, dev::groups_file(GROUP, gateways)).expect("groups");
        CoordinatorNode {
            proc: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            dir,
            pki_dir: pki.dir.clone(),
            groups,
            connections: None,
            storage: Default::default(),
            events: None,
            agent_cert_ttl: None,
        }
    }

    /// A replica on etcd (`storage`), not started yet: `start_again` starts it.
    pub fn replica(
        dir: PathBuf,
        pki: &Pki,
        gateways: &[String],
        storage: kt_coordinator::config::Storage,
    ) -> Self {
        std::fs::create_dir_all(&dir).expect("dir");
        let groups = dir.join("groups.yaml");
        std::fs::write(&groups, dev::groups_file(GROUP, gateways)).expect("groups");
        CoordinatorNode {
            proc: None,
            addr: process::free_loopback_addr().expect("port"),
            dir,
            pki_dir: pki.dir.clone(),
            groups,
            connections: None,
            storage,
            events: None,
            agent_cert_ttl: None,
        }
    }

    /// SIGKILL: no resignation, no goodbye, as when a host dies.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Starts the process (again), on the port it had, or a free one the first time.
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "coordinator already running");
        let config = self.dir.join("coordinator.yaml");
        let mut typed = dev::coordinator(
            self.addr,
            &self.pki_dir,
            &self.dir.join("data"),
            &self.groups,
            TEST_LIVENESS,
        );
        if let Some(limits) = &self.connections {
            typed.connections = limits.clone();
        }
        typed.storage = self.storage.clone();
        typed.events.nats = self.events.clone();
        if let (Some(enrollment), Some(ttl)) = (&mut typed.enrollment, self.agent_cert_ttl) {
            enrollment.agent_cert_ttl = ttl;
        }
        std::fs::write(&config, dev::to_yaml(&typed)).expect("config");
        let ready = self.dir.join("coordinator.addr");
        let _ = std::fs::remove_file(&ready);
        let args = vec![
            "--config".into(),
            config.display().to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ];
        let mut proc = Proc::spawn("kt-coordinator", &args, self.dir.join("coordinator.log"));
        self.addr = proc.wait_ready(&ready);
        self.proc = Some(proc);
    }

    pub fn stop(&mut self) {
        if let Some(proc) = self.proc.take() {
            proc.terminate();
        }
    }
}

/// A mock LLM provider process (`kt-gateway mock-provider`).
pub struct MockProvider {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl MockProvider {
    /// Starts one with extra flags, e.g. `["--latency-ms", "5000"]`.
    pub fn start(dir: &Path, flags: &[&str]) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        let ready = dir.join("provider.addr");
        let mut args: Vec<String> = vec![
            "mock-provider".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            ready.display().to_string(),
        ];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut proc = Proc::spawn("kt-gateway", &args, dir.join("provider.log"));
        let addr = proc.wait_ready(&ready);
        MockProvider { proc, addr }
    }
}

/// A gateway process; restarts keep its port, so its agent's health URL stays valid.
pub struct GatewayNode {
    pub id: String,
    pub proc: Option<Proc>,
    pub addr: SocketAddr,
    pub policy: PathBuf,
    pub events: PathBuf,
    /// Added to its command line at each start.
    pub extra_args: Vec<String>,
    dir: PathBuf,
}

impl GatewayNode {
    /// Starts a gateway with the example policy, pointed at `provider`.
    pub fn start(dir: PathBuf, id: &str, provider: SocketAddr) -> Self {
        Self::start_with_policy(dir, id, &dev::example_policy(provider))
    }

    /// Starts a gateway with the given policy config text.
    pub fn start_with_policy(dir: PathBuf, id: &str, policy_text: &str) -> Self {
        std::fs::create_dir_all(&dir).expect("dir");
        let policy = dir.join("policy-config.yaml");
        std::fs::write(&policy, policy_text).expect("policy");
        let mut node = GatewayNode {
            id: id.to_owned(),
            proc: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            policy,
            events: dir.join("events.jsonl"),
            extra_args: Vec::new(),
            dir,
        };
        node.start_again();
        node
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Where the gateway writes its probe token at each start.
    pub fn probe_token(&self) -> PathBuf {
        self.dir.join("probe-token")
    }

    /// The decision events written so far, oldest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "gateway already running");
        let ready = self.dir.join("gateway.addr");
        let _ = std::fs::remove_file(&ready);
        let args = vec![
            "--config".into(),
            self.policy.display().to_string(),
            "--listen".into(),
            self.addr.to_string(),
            "--gateway-id".into(),
            self.id.clone(),
            "--events-file".into(),
            self.events.display().to_string(),
            "--probe-token-file".into(),
            self.probe_token().display().to_string(),
            "--shadow-config".into(),
            kt_launch::configs::shadow_config_path(&self.policy)
                .display()
                .to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ];
        let args = [args, self.extra_args.clone()].concat();
        let mut proc = Proc::spawn_with_env(
            "kt-gateway",
            &args,
            &[dev::MOCK_PROVIDER_SECRET],
            self.dir.join("gateway.log"),
        );
        self.addr = proc.wait_ready(&ready);
        self.proc = Some(proc);
    }

    pub fn stop(&mut self) {
        if let Some(proc) = self.proc.take() {
            proc.terminate();
        }
    }
}

/// An agent process beside one gateway.
pub struct AgentNode {
    pub proc: Option<Proc>,
    config: PathBuf,
    log: PathBuf,
    /// Added to the process's environment at each start.
    env: Vec<(String, String)>,
}

impl AgentNode {
    pub fn start(dir: &Path, spec: &AgentSpec<'_>) -> Self {
        Self::start_with(dir, &dev::agent(spec))
    }

    /// Starts an agent with `config` (written to `dir/agent.yaml`).
    pub fn start_with(dir: &Path, config: &kt_agent::config::AgentConfig) -> Self {
        Self::start_with_env(dir, config, &[])
    }

    /// As [`Self::start_with`], with `env` added to the process's environment.
    pub fn start_with_env(
        dir: &Path,
        config: &kt_agent::config::AgentConfig,
        env: &[(&str, &str)],
    ) -> Self {
        let path = dir.join("agent.yaml");
        std::fs::write(&path, dev::to_yaml(config)).expect("agent config");
        let mut node = AgentNode {
            proc: None,
            config: path,
            log: dir.join("agent.log"),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        node.start_again();
        node
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "agent already running");
        let args = vec!["--config".into(), self.config.display().to_string()];
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.proc = Some(Proc::spawn_with_env(
            "kt-agent",
            &args,
            &env,
            self.log.clone(),
        ));
    }

    /// SIGKILL: no goodbye, as when a host dies.
    pub fn kill(&mut self) {
        self.proc = None;
    }
}

/// How a [`TestFleet`] is built.
#[derive(Clone, Debug, Default)]
pub struct FleetOptions {
    /// Agents reach the coordinator through a [`proxy::CutProxy`].
    pub proxy: bool,
    /// The agents' event buffer bound (their default when `None`).
    pub max_buffered_events: Option<u64>,
    /// Agents get their certificates by enrolling with a join token at first boot (and renew
    /// them), instead of hand-issued ones; the coordinator issues them for this long.
    pub enroll_with_ttl: Option<Duration>,
    /// Added to the environment of agent `i` (none past the end).
    pub agent_env: Vec<Vec<(String, String)>>,
}

/// Makes `config` an enrolling agent's: a join token for `id` (3 uses: the first boot, and
/// enrolling again should its certificate expire) in `dir/join-token`, the root's fingerprint
/// pinned, and its certificate files in `dir/tls/`, not there yet.
pub fn enroll_on_first_boot(
    config: &mut kt_agent::config::AgentConfig,
    ktctl_config: &Path,
    pki: &Pki,
    id: &str,
    dir: &Path,
) {
    let token = create_token(ktctl_config, &["--gateway-id", id, "--uses", "3"]);
    dev::enroll_on_first_boot(config, dir, &token, &pki.root_fingerprint()).expect("token file");
}

/// `ktctl token create ARGS`: the token it printed.
pub fn create_token(ktctl_config: &Path, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let out = ktctl(ktctl_config, &all);
    assert!(out.status.success(), "token create: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A coordinator and N gateway+agent pairs (`gw-test-01`..., regions alternating us/eu).
pub struct TestFleet {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub provider: MockProvider,
    pub coordinator: CoordinatorNode,
    pub gateways: Vec<GatewayNode>,
    pub agents: Vec<AgentNode>,
    pub ktctl_config: PathBuf,
}

impl TestFleet {
    pub fn start(n: usize) -> Self {
        Self::start_with(n, &FleetOptions::default()).0
    }

    /// Like `start`, with every agent reaching the coordinator through a [`proxy::CutProxy`],
    /// and, when given, a small event buffer.
    pub fn start_with_proxy(n: usize, max_buffered_events: Option<u64>) -> (Self, proxy::CutProxy) {
        let options = FleetOptions {
            proxy: true,
            max_buffered_events,
            ..FleetOptions::default()
        };
        let (fleet, proxy) = Self::start_with(n, &options);
        (fleet, proxy.expect("proxy"))
    }

    /// A fleet built as `options` say; the proxy when asked for.
    pub fn start_with(n: usize, options: &FleetOptions) -> (Self, Option<proxy::CutProxy>) {
        kt_daemon::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path().join("pki"));
        let ids: Vec<String> = (1..=n).map(|i| format!("gw-test-{i:02}")).collect();
        let mut coordinator = CoordinatorNode::new(dir.path().join("coordinator"), &pki, &ids);
        coordinator.agent_cert_ttl = options.enroll_with_ttl;
        coordinator.start_again();
        let ktctl_config = dir.path().join("ktctl.yaml");
        KtctlConfig {
            current_context: Some("test".into()),
            contexts: vec![pki.context(coordinator.addr, "tester")],
        }
        .save(&ktctl_config)
        .expect("ktctl config");
        let provider = MockProvider::start(&dir.path().join("provider"), &[]);
        let proxy = options
            .proxy
            .then(|| proxy::CutProxy::start(coordinator.addr));
        let agents_reach = proxy.as_ref().map_or(coordinator.addr, |p| p.addr);
        let max_buffered_events = options.max_buffered_events;
        let mut gateways = Vec::new();
        let mut agents = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let gw_dir = dir.path().join(id);
            let gateway = GatewayNode::start(gw_dir.clone(), id, provider.addr);
            let region = if i % 2 == 0 { "us" } else { "eu" };
            let mut config = dev::agent(&AgentSpec {
                gateway_id: id,
                more_coordinators: &[],
                coordinator: agents_reach,
                pki: &pki.dir,
                gateway: gateway.addr,
                health_interval: HEALTH_INTERVAL,
                labels: &[("region", region), ("env", "test")],
                config_path: Some(&gateway.policy),
                validator: &bin("kt-gateway"),
                events_file: Some(&gateway.events),
                probe_token_file: Some(&gateway.probe_token()),
                max_buffered_events,
                state_dir: &gw_dir.join("agent-state"),
                metrics_listen: None,
            });
            if options.enroll_with_ttl.is_some() {
                enroll_on_first_boot(&mut config, &ktctl_config, &pki, id, &gw_dir);
            } else {
                pki.issue_agent(id);
            }
            let env: Vec<(&str, &str)> = options
                .agent_env
                .get(i)
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let agent = AgentNode::start_with_env(&gw_dir, &config, &env);
            gateways.push(gateway);
            agents.push(agent);
        }
        let fleet = TestFleet {
            dir,
            pki,
            provider,
            coordinator,
            gateways,
            agents,
            ktctl_config,
        };
        (fleet, proxy)
    }

    pub async fn operator(&self) -> OperatorServiceClient<Channel> {
        kt_ctl::client::connect(&self.pki.context(self.coordinator.addr, "tester"))
            .await
            .expect("operator client")
    }

    /// Runs the real `ktctl` against this fleet.
    pub fn ktctl(&self, args: &[&str]) -> Output {
        ktctl(&self.ktctl_config, args)
    }

    /// `ktctl gateway health -o json`: the exit code and the rows.
    pub fn health(&self) -> (i32, Vec<serde_json::Value>) {
        let out = self.ktctl(&["gateway", "health", "-o", "json"]);
        let rows = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code().unwrap_or(-1), rows)
    }

    /// Polls `ktctl gateway health` until `check` accepts the rows, or fails with the last rows.
    pub async fn wait_for_health(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(i32, &[serde_json::Value]) -> bool,
    ) {
        let mut last = (0, Vec::new());
        let found = wait_for(timeout, || {
            last = self.health();
            check(last.0, &last.1)
        })
        .await;
        assert!(
            found,
            "{what}: not reached within {timeout:?}; last exit {} rows {:#?}",
            last.0, last.1
        );
    }
}

/// Runs the real `ktctl` as a newcomer would, with no config of their own: its state and
/// config homes are `home` (so tests never touch the real ones, nor each other's), plus `env`.
pub fn newcomer_ktctl(home: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut command = std::process::Command::new(bin("ktctl"));
    command
        .env_remove("KTCTL_CONFIG")
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_CONFIG_HOME", home.join("config"));
    for (k, v) in env {
        command.env(k, v);
    }
    command.args(args).output().expect("run ktctl")
}

/// The body of a chat request: one user message `text` to the mock provider's `mock-small`.
pub fn user_prompt(text: &str) -> serde_json::Value {
    serde_json::json!({ "model": "mock-small", "messages": [{ "role": "user", "content": text }] })
}

/// Runs the real `ktctl` with `--config config`.
/// A finished command's stdout then stderr, for assertions and their messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ktctl(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(bin("ktctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run ktctl")
}

/// A health check: `n` rows, every agent connected and every gateway healthy, exit code 0.
pub fn all_healthy(n: usize) -> impl Fn(i32, &[serde_json::Value]) -> bool {
    move |code, rows| {
        code == 0
            && rows.len() == n
            && rows
                .iter()
                .all(|r| r["agent"] == "connected" && r["status"] == "healthy")
    }
}

/// Row `gateway` of a health listing.
pub fn row<'a>(rows: &'a [serde_json::Value], gateway: &str) -> Option<&'a serde_json::Value> {
    rows.iter().find(|r| r["gateway"] == gateway)
}

/// `events.jsonl` -> `events.jsonl.1`, where a rotation moves a file.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The text of `GET url` (a `/metrics` page, say), failing the test when it cannot be read.
pub async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Polls `condition` every 50 ms until it holds (true) or `timeout` passes (false).
pub async fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops whatever `ktctl dev up` (or `ktctl demo`) started in a directory, by pid, even when the
/// test fails.
pub struct DevFleetGuard(pub PathBuf);

impl Drop for DevFleetGuard {
    fn drop(&mut self) {
        if let Ok(Some(state)) = kt_ctl::dev::DevState::load(&self.0) {
            for p in &state.processes {
                process::stop(p.pid, &p.binary, Duration::from_secs(2));
            }
        }
    }
}

/// `kt-gateway validate FILE`, asserting that it accepts the file.
pub fn assert_valid_policy(path: &Path) {
    let out = std::process::Command::new(bin("kt-gateway"))
        .arg("validate")
        .arg(path)
        .output()
        .expect("kt-gateway validate");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Appends `count` synthetic decision events numbered from `from` to a gateway's events file.
pub fn append_events(path: &Path, gateway: &str, from: u64, count: u64) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("events file");
    let mut text = String::new();
    for n in from..from + count {
        let verdict = if n % 10 == 0 { "block" } else { "allow" };
        let line = serde_json::json!({ "id": format!("{gateway}-{n}"), "n": n, "gateway_id": gateway, "verdict": verdict,
            "reason_code": "", "config_version": "1.0.0", "policies_evaluated": [] });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    file.write_all(text.as_bytes()).expect("append");
}
