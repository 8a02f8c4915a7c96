//! A one-member etcd (Debian's `etcd-server`) on loopback, with mutual TLS on both its client
//! and peer listeners, for `storage: etcd` coordinators in tests, benchmarks and dev fleets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use kt_coordinator::config::EtcdStorage;

/// Where etcd listens and keeps its data, and the PEM files it serves with: the deployment's CA
/// (clients must present a certificate it signed) and a server certificate for 127.0.0.1.
#[derive(Clone, Debug)]
pub struct EtcdSpec {
    pub name: String,
    pub data_dir: PathBuf,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The trust domain of an etcd's own CA.
pub const ETCD_TRUST_DOMAIN: &str = "etcd.kt-fleet.local";

impl EtcdSpec {
    /// A one-member etcd kept in `dir`: a CA of its own in `dir/pki` (so that no certificate of
    /// the deployment can reach etcd) whose one leaf, for 127.0.0.1, serves as etcd's certificate
    /// and as the replicas' client certificate; two free loopback ports.
    pub fn with_own_ca(dir: &Path, name: &str) -> anyhow::Result<Self> {
        use crate::pki::{self, LeafRole};
        let pki_dir = dir.join("pki");
        pki::init_ca(&pki_dir, ETCD_TRUST_DOMAIN, true)?;
        let leaf = pki::issue(&pki_dir, &LeafRole::loopback_coordinator(), 30, true)?;
        Ok(EtcdSpec {
            name: name.to_owned(),
            data_dir: dir.join("data"),
            client: crate::process::free_loopback_addr()?,
            peer: crate::process::free_loopback_addr()?,
            ca: pki_dir.join(pki::CA_CERT),
            cert: leaf.cert,
            key: leaf.key,
        })
    }

    /// What a coordinator's `storage.etcd` says to reach this etcd (the replica name left to
    /// each replica).
    pub fn storage(&self, lease_ttl: Duration, request_timeout: Duration) -> EtcdStorage {
        EtcdStorage {
            endpoints: vec![format!("https://{}", self.client)],
            tls: kt_proto::tls::TlsFiles {
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            },
            prefix: "/kt-fleet".into(),
            lease_ttl,
            replica: None,
            request_timeout,
        }
    }
}

/// The `etcd` binary, or an error that names the Debian package.
pub fn find_etcd() -> anyhow::Result<PathBuf> {
    crate::process::on_path("etcd").context(
        "etcd is not installed: install Debian's etcd-server (apt-get install etcd-server, or scripts/install-test-deps)",
    )
}

/// etcd's command line for `spec`.
pub fn args(spec: &EtcdSpec) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let client = format!("https://{}", spec.client);
    let peer = format!("https://{}", spec.peer);
    [
        ("--name", spec.name.clone()),
        ("--data-dir", path(&spec.data_dir)),
        ("--listen-client-urls", client.clone()),
        ("--advertise-client-urls", client),
        ("--listen-peer-urls", peer.clone()),
        ("--initial-advertise-peer-urls", peer.clone()),
        ("--initial-cluster", format!("{}={peer}", spec.name)),
        ("--initial-cluster-state", "new".into()),
        ("--cert-file", path(&spec.cert)),
        ("--key-file", path(&spec.key)),
        ("--trusted-ca-file", path(&spec.ca)),
        ("--client-cert-auth", "true".into()),
        ("--peer-cert-file", path(&spec.cert)),
        ("--peer-key-file", path(&spec.key)),
        ("--peer-trusted-ca-file", path(&spec.ca)),
        ("--peer-client-cert-auth", "true".into()),
        // Config versions may be 4 MiB, and a large fleet's rollout record is big: etcd's
        // default limit of a request (1.5 MiB) is too small for either.
        ("--max-request-bytes", "10485760".into()),
        ("--logger", "zap".into()),
        ("--log-outputs", "stderr".into()),
    ]
    .into_iter()
    .map(|(flag, value)| format!("{flag}={value}"))
    .collect()
}

/// Waits until `addr` accepts TCP connections (etcd writes no ready file), or fails with the
/// log's tail if the process exits or the deadline passes.
pub fn wait_listening(
    child: &mut std::process::Child,
    addr: SocketAddr,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    crate::process::wait_listening("etcd", child, addr, log, timeout)
}
