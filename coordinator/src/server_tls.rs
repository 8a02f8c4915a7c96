//! The coordinator's own certificate, replaceable while it runs: on SIGHUP, and when its files
//! change (checked every few seconds, as cert-manager or a renewal script rewrites them). New
//! connections get the new certificate; sessions already open keep theirs, so none is dropped.
//! A reload that fails (a file half-written, a key that does not match, another trust domain)
//! keeps the running certificate and says why.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use kt_proto::identity::Role;
use kt_proto::tls::TlsFiles;
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

/// How often the files are looked at for changes.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The server TLS config new connections are accepted with.
#[derive(Debug)]
pub struct ServerTls {
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl ServerTls {
    pub fn new(config: rustls::ServerConfig) -> Arc<Self> {
        Arc::new(ServerTls {
            current: RwLock::new(Arc::new(config)),
        })
    }

    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, config: rustls::ServerConfig) {
        let config = Arc::new(config);
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

/// What a file looked like when last loaded: a rewrite changes at least one of these.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len(), meta.ino()))
        })
        .collect()
}

/// Reloads `tls` from `files` on SIGHUP and when the files change, until `cancel`. The trust
/// domain must stay `trust_domain`: a certificate of another deployment is refused.
pub async fn reload_on_change(
    files: TlsFiles,
    trust_domain: String,
    tls: Arc<ServerTls>,
    mut hangup: Signal,
    cancel: CancellationToken,
) {
    let mut loaded = stamp(&files);
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = cancel.cancelled() => return,
            Some(()) = hangup.recv() => "SIGHUP",
            _ = check.tick() => {
                if stamp(&files) == loaded {
                    continue;
                }
                "its files changed"
            }
        };
        // Stamped before reading: a write landing during the read is seen at the next check.
        loaded = stamp(&files);
        match load(&files, &trust_domain) {
            Ok(config) => {
                tls.replace(config);
                tracing::info!(cert = %files.cert.display(), reason = why,
                    "coordinator certificate reloaded; new connections use it");
            }
            Err(error) => tracing::error!(%error, reason = why,
                "coordinator certificate not reloaded; the running one stays"),
        }
    }
}

fn load(files: &TlsFiles, trust_domain: &str) -> Result<rustls::ServerConfig, String> {
    let peer = files
        .load(Role::Coordinator)
        .map_err(|error| error.to_string())?;
    if peer.identity.trust_domain() != trust_domain {
        return Err(format!(
            "{}: trust domain {} is not this coordinator's ({trust_domain})",
            files.cert.display(),
            peer.identity.trust_domain()
        ));
    }
    peer.rustls_server_config()
}
