//! Debian's `nats-server` with JetStream, for `events.nats`: a CA of its own (like etcd's), mutual
//! TLS on the client port and on leaf node links, and a JetStream domain per region, so that
//! regions joined by a leaf node link source each other's streams.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use kt_coordinator::config::NatsEvents;
use kt_proto::tls::TlsFiles;

/// The trust domain of NATS' own CA.
pub const NATS_TRUST_DOMAIN: &str = "nats.kt-fleet.local";

/// The payload limit the servers are started with: an agent batch (2 MiB at most) fits whole.
pub const MAX_PAYLOAD: &str = "8MB";

/// One NATS server of one region.
#[derive(Clone, Debug)]
pub struct NatsSpec {
    /// The server's name, and its region (the JetStream domain).
    pub region: String,
    pub dir: PathBuf,
    pub client: SocketAddr,
    /// Where leaf node links of other regions connect.
    pub leaf: SocketAddr,
    /// Other regions' leaf ports this server links to.
    pub remotes: Vec<SocketAddr>,
    /// The leaf address told to linked servers for reconnecting, when not `leaf` itself (a
    /// proxy in front of it).
    pub leaf_advertise: Option<SocketAddr>,
    pub tls: TlsFiles,
}

impl NatsSpec {
    /// A server for `region` kept in `dir`, with certificates from the NATS CA in `pki` (made
    /// there if absent: several regions share one NATS CA so their links verify).
    pub fn new(dir: &Path, pki_dir: &Path, region: &str) -> anyhow::Result<Self> {
        use crate::pki::{self, LeafRole};
        if !pki_dir.join(pki::CA_CERT).exists() {
            pki::init_ca(pki_dir, NATS_TRUST_DOMAIN, true)?;
        }
        let leaf = pki::issue(pki_dir, &LeafRole::loopback_coordinator(), 30, true)?;
        std::fs::create_dir_all(dir)?;
        Ok(NatsSpec {
            region: region.to_owned(),
            dir: dir.to_owned(),
            client: crate::process::free_loopback_addr()?,
            leaf: crate::process::free_loopback_addr()?,
            remotes: Vec::new(),
            leaf_advertise: None,
            tls: TlsFiles {
                ca: pki_dir.join(pki::CA_CERT),
                cert: leaf.cert,
                key: leaf.key,
            },
        })
    }

    /// The server's config file, written into its directory; its path.
    pub fn write_config(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("nats-server.conf");
        std::fs::write(&path, self.config_text())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// The server's config. A linked server reconnects to the address a server advertises,
    /// not necessarily the one in its `remotes`: with a proxy in front, the proxy is advertised.
    fn config_text(&self) -> String {
        let tls = format!(
            "{{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}",
            self.tls.cert.display().to_string(),
            self.tls.key.display().to_string(),
            self.tls.ca.display().to_string(),
        );
        let remotes: Vec<String> = self
            .remotes
            .iter()
            .map(|addr| format!("{{ url: \"tls://{addr}\", tls: {tls} }}"))
            .collect();
        format!(
            "server_name: {region}\n\
             listen: {client}\n\
             max_payload: {MAX_PAYLOAD}\n\
             tls: {tls}\n\
             jetstream {{\n  store_dir: {store:?}\n  domain: {region}\n  max_memory_store: 64MB\n  max_file_store: 2GB\n}}\n\
             leafnodes {{\n  listen: {leaf}\n  advertise: {advertise}\n  tls: {tls}\n  remotes: [{remotes}]\n}}\n",
            region = self.region,
            client = self.client,
            store = self.dir.join("jetstream").display().to_string(),
            leaf = self.leaf,
            advertise = self.leaf_advertise.unwrap_or(self.leaf),
            remotes = remotes.join(", "),
        )
    }

    /// What a coordinator's `events.nats` says to use this server; `regions` are the others
    /// whose streams it sources.
    pub fn events(&self, regions: &[String]) -> NatsEvents {
        NatsEvents {
            urls: vec![format!("tls://{}", self.client)],
            tls: self.tls.clone(),
            stream: "KT_EVENTS".into(),
            region: self.region.clone(),
            regions: regions.to_vec(),
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

/// The `nats-server` binary, or an error that names the Debian package.
pub fn find_nats() -> anyhow::Result<PathBuf> {
    crate::process::on_path("nats-server").context(
        "nats-server is not installed: install Debian's nats-server (apt-get install nats-server, or scripts/install-test-deps)",
    )
}

/// Waits until the server accepts TCP connections on its client port.
pub fn wait_listening(
    child: &mut std::process::Child,
    spec: &NatsSpec,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    crate::process::wait_listening("nats-server", child, spec.client, log, timeout)
}
