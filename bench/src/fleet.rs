//! What the simulated agents run against: certificates (issued once into a cache directory),
//! a real coordinator process on loopback, and its CPU and memory as `/proc` tells them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;
use kt_coordinator::config::{GroupSpec, GroupsFile};
use kt_launch::configs;
use kt_launch::pki::{self, LeafRole};
use kt_launch::process as dev;
use kt_proto::identity::GatewayId;

/// The simulated gateways' ids: `sim-00001`, ...
pub fn agent_id(i: usize) -> String {
    format!("sim-{:05}", i + 1)
}

/// Makes sure `dir` holds a CA, a coordinator and an operator certificate, and one agent
/// certificate per simulated gateway; only missing ones are issued.
pub fn ensure_certs(dir: &Path, agents: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    if !dir.join(pki::CA_CERT).is_file() {
        pki::init(dir, pki::DEFAULT_TRUST_DOMAIN, false)?;
    }
    let leaves = [
        (
            "coordinator.crt".to_owned(),
            LeafRole::loopback_coordinator(),
        ),
        (
            "operator-bench.crt".to_owned(),
            LeafRole::Operator {
                name: "bench".into(),
            },
        ),
    ];
    for (file, role) in leaves {
        if !dir.join(file).is_file() {
            pki::issue(dir, &role, 365, false)?;
        }
    }
    let started = Instant::now();
    let mut issued = 0;
    for i in 0..agents {
        let id = agent_id(i);
        if dir.join(format!("agent-{id}.crt")).is_file() {
            continue;
        }
        let gateway = GatewayId::new(&id).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
        pki::issue(dir, &LeafRole::Agent { gateway }, 365, false)?;
        issued += 1;
    }
    if issued > 0 {
        eprintln!(
            "issued {issued} agent certificates into {} in {:.1}s (kept for later runs)",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Raises this process's open-file limit to its hard limit (children inherit it); says so
/// when what it got is below what `needed` connections take.
pub fn raise_fd_limit(needed: u64) {
    let limit = kt_daemon::conn::raise_fd_limit();
    if limit < needed {
        eprintln!(
            "warning: the open-file limit is {limit}, below the ~{needed} this run needs; \
             raise it (ulimit -n, or LimitNOFILE=) or connections will fail"
        );
    }
}

/// The coordinator process under test.
pub struct Coordinator {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
}

pub struct CoordinatorSettings {
    pub heartbeat_interval: Duration,
    pub reconnect_spread: Duration,
    /// Its directory under the work directory (and its replica name on etcd).
    pub name: String,
    pub storage: configs::Storage,
    /// Events on NATS JetStream (`events.nats`) instead of the embedded store.
    pub events_nats: Option<kt_coordinator::config::NatsEvents>,
}

impl Coordinator {
    pub fn start(work: &Path, pki: &Path, settings: &CoordinatorSettings) -> anyhow::Result<Self> {
        let dir = work.join(&settings.name);
        std::fs::create_dir_all(&dir)?;
        let groups = dir.join("groups.yaml");
        let sim = GroupSpec {
            selector: [("fleet".to_owned(), "sim".to_owned())].into(),
            ..GroupSpec::default()
        };
        let groups_file = GroupsFile {
            groups: [("sim".to_owned(), sim)].into(),
        };
        std::fs::write(&groups, configs::to_yaml(&groups_file))?;
        let metrics_addr = free_addr()?;
        let hb = settings.heartbeat_interval;
        let liveness = configs::Liveness {
            heartbeat_interval: hb,
            unreachable_after: hb * 3,
            disconnected_after: hb * 8,
        };
        let listen = "127.0.0.1:0".parse()?;
        let mut config = configs::coordinator(listen, pki, &dir.join("data"), &groups, liveness);
        config.liveness.reconnect_spread = settings.reconnect_spread;
        config.metrics_listen = Some(metrics_addr);
        config.storage = settings.storage.clone();
        config.events.nats = settings.events_nats.clone();
        let text = configs::to_yaml(&config);
        let config = dir.join("coordinator.yaml");
        std::fs::write(&config, text)?;
        let mut coordinator = Coordinator {
            child: None,
            addr: "127.0.0.1:0".parse()?,
            metrics_addr,
            dir,
            config,
        };
        coordinator.start_again()?;
        Ok(coordinator)
    }

    /// Starts the process (again) on the port it had, or a free one the first time.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let ready = self.dir.join("coordinator.addr");
        let _ = std::fs::remove_file(&ready);
        let log = self.dir.join("coordinator.log");
        let args = vec![
            "--config".into(),
            self.config.display().to_string(),
            "--listen".into(),
            self.addr.to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ];
        let mut child = dev::spawn(&dev::find_binary("kt-coordinator"), &args, &[], &log)?;
        self.addr = dev::wait_ready(&mut child, &ready, &log, Duration::from_secs(30))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process at once (no goodbye to anyone): every session is cut.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stats(&self) -> Option<ProcStats> {
        ProcStats::read(self.pid()?)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// CPU time and resident memory of a process.
#[derive(Clone, Copy, Debug)]
pub struct ProcStats {
    pub cpu: Duration,
    pub rss_bytes: u64,
}

impl ProcStats {
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as u64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(ProcStats {
            cpu: Duration::from_millis(ticks * 1000 / hz.max(1)),
            rss_bytes: rss_kb * 1024,
        })
    }
}

/// An operator client of the coordinator, with the bench's operator certificate.
pub async fn operator(
    pki: &Path,
    addr: SocketAddr,
) -> anyhow::Result<
    kt_proto::v1::operator_service_client::OperatorServiceClient<tonic::transport::Channel>,
> {
    let context = kt_ctl::ktconfig::Context {
        name: "bench".into(),
        coordinator: format!("https://{addr}"),
        server_name: None,
        ca: pki.join(pki::CA_CERT),
        cert: pki.join("operator-bench.crt"),
        key: pki.join("operator-bench.key"),
    };
    kt_ctl::client::connect(&context)
        .await
        .context("operator connection")
}

/// Debian's etcd on loopback with a CA of its own, for the `ha` scenario; killed on drop.
pub struct Etcd {
    child: Child,
    pub storage: configs::EtcdStorage,
}

impl Etcd {
    pub fn start(work: &Path) -> anyhow::Result<Self> {
        let binary = kt_launch::etcd::find_etcd()?;
        let spec = kt_launch::etcd::EtcdSpec::with_own_ca(&work.join("etcd"), "kt-bench")?;
        let log = work.join("etcd.log");
        let mut child = dev::spawn(&binary, &kt_launch::etcd::args(&spec), &[], &log)?;
        kt_launch::etcd::wait_listening(&mut child, spec.client, &log, Duration::from_secs(30))?;
        Ok(Etcd {
            child,
            storage: spec.storage(Duration::from_secs(5), Duration::from_secs(2)),
        })
    }

    /// A client of etcd with the replicas' certificate.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(kt_coordinator::etcd::connect(
            &self.storage.endpoints,
            &self.storage.tls,
            Duration::from_secs(5),
        )
        .await?)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's nats-server with JetStream on loopback, mutual TLS with a CA of its own, for the
/// `events --bus nats` scenario; killed on drop.
pub struct Nats {
    child: Child,
    pub spec: kt_launch::nats::NatsSpec,
}

impl Nats {
    pub fn start(work: &Path) -> anyhow::Result<Self> {
        let binary = kt_launch::nats::find_nats()?;
        let spec =
            kt_launch::nats::NatsSpec::new(&work.join("nats"), &work.join("nats-pki"), "bench")?;
        let config = spec.write_config()?;
        let log = work.join("nats.log");
        let mut child = dev::spawn(
            &binary,
            &["-c".into(), config.display().to_string()],
            &[],
            &log,
        )?;
        kt_launch::nats::wait_listening(&mut child, &spec, &log, Duration::from_secs(30))?;
        Ok(Nats { child, spec })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
