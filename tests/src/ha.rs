//! A replicated control plane for tests: Debian's etcd on loopback (mutual TLS, a CA of its own),
//! several coordinator replicas on it, and gateways whose agents know every replica, each
//! starting with a different one so the sessions spread.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use kt_coordinator::config::Storage;
use kt_ctl::ktconfig::KtctlConfig;
use kt_launch::configs::AgentSpec;
use kt_launch::etcd::{EtcdSpec, args, find_etcd, wait_listening};
use kt_launch::nats::NatsSpec;

use crate::proxy::CutProxy;
use crate::{
    AgentNode, CoordinatorNode, GatewayNode, HEALTH_INTERVAL, MockProvider, Pki, Proc, bin, ktctl,
};

/// How long a replica's lease lives in these tests: a killed leader's term ends this long after.
pub const LEASE_TTL: Duration = Duration::from_secs(4);

/// How a fleet's NATS server takes part in a set of regions.
#[derive(Clone, Debug)]
pub struct NatsRegion {
    pub name: String,
    /// The NATS CA shared by the regions (their leaf links verify each other); none: one of
    /// the fleet's own.
    pub pki: Option<PathBuf>,
    /// Other regions whose streams this one sources.
    pub others: Vec<String>,
    /// Leaf ports of other regions' servers this one links to.
    pub remotes: Vec<SocketAddr>,
    /// This server's leaf port, chosen beforehand, and the address it advertises for it (a
    /// proxy in front of it).
    pub leaf: Option<(SocketAddr, SocketAddr)>,
}

impl NatsRegion {
    /// The one region of a fleet that has no other.
    pub fn local() -> Self {
        NatsRegion {
            name: "local".into(),
            pki: None,
            others: Vec::new(),
            remotes: Vec::new(),
            leaf: None,
        }
    }
}

pub struct HaFleet {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub etcd: Option<Proc>,
    pub etcd_spec: EtcdSpec,
    /// Each replica reaches etcd through a proxy of its own, to be cut off alone.
    pub etcd_proxies: Vec<CutProxy>,
    pub coordinators: Vec<CoordinatorNode>,
    /// With events on NATS: the server, and how it runs.
    pub nats: Option<Proc>,
    pub nats_spec: Option<NatsSpec>,
    pub provider: MockProvider,
    pub gateways: Vec<GatewayNode>,
    pub agents: Vec<AgentNode>,
}

impl HaFleet {
    /// etcd, `replicas` coordinators on it, and `n` gateways (`gw-test-01`...).
    pub fn start(replicas: usize, n: usize) -> Self {
        Self::start_with(replicas, n, None)
    }

    /// As [`HaFleet::start`], with the events of every replica on one NATS JetStream server.
    pub fn with_nats(replicas: usize, n: usize) -> Self {
        Self::start_with(replicas, n, Some(NatsRegion::local()))
    }

    /// One region of several: its own etcd, replicas and NATS server (JetStream domain
    /// `region.name`), its gateways named `gw-<region>-NN`.
    pub fn in_region(replicas: usize, n: usize, region: NatsRegion) -> Self {
        Self::start_with(replicas, n, Some(region))
    }

    fn start_with(replicas: usize, n: usize, nats: Option<NatsRegion>) -> Self {
        kt_daemon::install_crypto_provider();
        let mut dir = tempfile::tempdir().expect("tempdir");
        // KT_E2E_KEEP=1 keeps the logs of a run to read after it.
        if std::env::var_os("KT_E2E_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("HA fleet in {}", dir.path().display());
        }
        let pki = Pki::new(dir.path().join("pki"));
        // etcd's own CA: no agent certificate of the deployment is signed by it, so no agent
        // can reach etcd.
        let etcd_spec = EtcdSpec::with_own_ca(&dir.path().join("etcd"), "kt-test").expect("etcd");
        let prefix = match &nats {
            Some(region) if region.name != "local" => format!("gw-{}", region.name),
            _ => "gw-test".to_owned(),
        };
        let ids: Vec<String> = (1..=n).map(|i| format!("{prefix}-{i:02}")).collect();
        let etcd_proxies: Vec<CutProxy> = (0..replicas)
            .map(|_| CutProxy::start(etcd_spec.client))
            .collect();
        let storage = Storage::Etcd(etcd_spec.storage(LEASE_TTL, Duration::from_millis(1500)));
        let nats_spec = nats.as_ref().map(|region| {
            let nats_dir = dir.path().join("nats");
            let pki_dir = region.pki.clone().unwrap_or_else(|| nats_dir.join("pki"));
            let mut spec = NatsSpec::new(&nats_dir, &pki_dir, &region.name).expect("nats");
            spec.remotes = region.remotes.clone();
            if let Some((listen, advertise)) = region.leaf {
                spec.leaf = listen;
                spec.leaf_advertise = Some(advertise);
            }
            spec
        });
        // Agents of a region say so in their labels; otherwise half are `us`, half `eu`.
        let label = nats
            .as_ref()
            .map(|region| region.name.clone())
            .filter(|name| name != "local");
        let others = nats.map(|region| region.others).unwrap_or_default();
        let mut coordinators: Vec<CoordinatorNode> = (0..replicas)
            .map(|i| {
                let mut storage = storage.clone();
                if let Storage::Etcd(etcd) = &mut storage {
                    etcd.replica = Some(format!("replica-{}", i + 1));
                    etcd.endpoints = vec![format!("https://{}", etcd_proxies[i].addr)];
                }
                let mut node = CoordinatorNode::replica(
                    dir.path().join(format!("coordinator-{}", i + 1)),
                    &pki,
                    &ids,
                    storage,
                );
                node.events = nats_spec.as_ref().map(|spec| spec.events(&others));
                node
            })
            .collect();
        let mut ha = HaFleet {
            provider: MockProvider::start(&dir.path().join("provider"), &[]),
            dir,
            pki,
            etcd: None,
            etcd_spec,
            etcd_proxies,
            nats: None,
            nats_spec,
            coordinators: Vec::new(),
            gateways: Vec::new(),
            agents: Vec::new(),
        };
        ha.start_etcd();
        if ha.nats_spec.is_some() {
            ha.start_nats();
        }
        for c in &mut coordinators {
            c.start_again();
        }
        ha.coordinators = coordinators;
        let addrs: Vec<SocketAddr> = ha.coordinators.iter().map(|c| c.addr).collect();
        for (i, id) in ids.iter().enumerate() {
            ha.pki.issue_agent(id);
            let gw_dir = ha.dir.path().join(id);
            let gateway = GatewayNode::start(gw_dir.clone(), id, ha.provider.addr);
            // Each agent starts with another replica, then tries the others in turn.
            let first = addrs[i % addrs.len()];
            let others: Vec<SocketAddr> = addrs
                .iter()
                .cycle()
                .skip(i % addrs.len() + 1)
                .take(addrs.len() - 1)
                .copied()
                .collect();
            let region = match &label {
                Some(name) => name.as_str(),
                None if i % 2 == 0 => "us",
                None => "eu",
            };
            let agent = AgentNode::start(
                &gw_dir,
                &AgentSpec {
                    gateway_id: id,
                    more_coordinators: &others,
                    coordinator: first,
                    pki: &ha.pki.dir,
                    gateway: gateway.addr,
                    health_interval: HEALTH_INTERVAL,
                    labels: &[("region", region), ("env", "test")],
                    config_path: Some(&gateway.policy),
                    validator: &bin("kt-gateway"),
                    events_file: Some(&gateway.events),
                    probe_token_file: Some(&gateway.probe_token()),
                    max_buffered_events: None,
                    state_dir: &gw_dir.join("agent-state"),
                    metrics_listen: None,
                },
            );
            ha.gateways.push(gateway);
            ha.agents.push(agent);
        }
        ha
    }

    /// Starts etcd (again, on its ports and data).
    pub fn start_etcd(&mut self) {
        assert!(self.etcd.is_none(), "etcd already running");
        // Never skipped: scripts/install-test-deps installs etcd-server.
        let etcd = find_etcd().expect("etcd");
        let log = self.dir.path().join("etcd.log");
        let mut proc = Proc::spawn_path(&etcd, &args(&self.etcd_spec), &[], log.clone());
        wait_listening(
            proc.child_mut(),
            self.etcd_spec.client,
            &log,
            Duration::from_secs(30),
        )
        .expect("etcd listening");
        self.etcd = Some(proc);
    }

    /// Starts the NATS server (again, on its ports and data).
    pub fn start_nats(&mut self) {
        assert!(self.nats.is_none(), "nats-server already running");
        let spec = self.nats_spec.as_ref().expect("a fleet with NATS");
        // Never skipped: scripts/install-test-deps installs nats-server.
        let nats = kt_launch::nats::find_nats().expect("nats-server");
        let config = spec.write_config().expect("nats config");
        let log = spec.dir.join("nats.log");
        let args = ["-c".to_owned(), config.display().to_string()];
        let mut proc = Proc::spawn_path(&nats, &args, &[], log.clone());
        kt_launch::nats::wait_listening(proc.child_mut(), spec, &log, Duration::from_secs(30))
            .expect("nats-server listening");
        self.nats = Some(proc);
    }

    /// The ktctl config file pointing at replica `i`.
    pub fn ktctl_config(&self, i: usize) -> PathBuf {
        let path = self.dir.path().join(format!("ktctl-{}.yaml", i + 1));
        if !path.exists() {
            KtctlConfig {
                current_context: Some("test".into()),
                contexts: vec![self.pki.context(self.coordinators[i].addr, "tester")],
            }
            .save(&path)
            .expect("ktctl config");
        }
        path
    }

    /// Runs the real `ktctl` against replica `i`.
    pub fn ktctl(&self, i: usize, args: &[&str]) -> Output {
        ktctl(&self.ktctl_config(i), args)
    }

    /// `ktctl gateway health -o json` on replica `i`: the exit code and the rows.
    pub fn health(&self, i: usize) -> (i32, Vec<serde_json::Value>) {
        let out = self.ktctl(i, &["gateway", "health", "-o", "json"]);
        let rows = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code().unwrap_or(-1), rows)
    }

    /// A client of etcd with a replica's certificate, as a test's own hand in the store.
    pub async fn etcd_client(&self) -> etcd_client::Client {
        kt_coordinator::etcd::connect(
            &[format!("https://{}", self.etcd_spec.client)],
            &self.etcd_spec.storage(LEASE_TTL, LEASE_TTL).tls,
            Duration::from_secs(5),
        )
        .await
        .expect("etcd client")
    }

    /// The replica elected leader now, by its name in etcd, and its epoch.
    pub async fn leader(&self) -> Option<(String, i64)> {
        let mut client = self.etcd_client().await;
        let answer = client.leader("/kt-fleet/election").await.ok()?;
        let kv = answer.kv()?;
        Some((
            String::from_utf8_lossy(kv.value()).into_owned(),
            kv.create_revision(),
        ))
    }

    /// The index of the replica named `name` (`replica-N`).
    pub fn index_of(&self, name: &str) -> usize {
        name.strip_prefix("replica-")
            .and_then(|n| n.parse::<usize>().ok())
            .map(|n| n - 1)
            .expect("a replica name")
    }

    /// A policy variant with `version`, written beside the fleet; its path.
    pub fn policy(&self, version: &str) -> String {
        let text = std::fs::read_to_string(&self.gateways[0].policy).expect("policy");
        let text = text.replace("version: 1.0.0", &format!("version: {version}"));
        let path = self.dir.path().join(format!("policy-{version}.yaml"));
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    }

    pub fn ids(&self) -> Vec<String> {
        self.gateways.iter().map(|g| g.id.clone()).collect()
    }
}
