//! A replica's connection to etcd (`storage: etcd`): mutual TLS with the replica's etcd client
//! certificate, verified against etcd's own CA (`storage.etcd.tls`). Connecting is bounded in
//! time; each call bounds itself (see `cluster/`), since campaigns and watches are long-lived.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use kt_proto::tls::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
}

/// Connects to `endpoints` (`https://host:port`), presenting `tls.cert`; connecting gives up after
/// `timeout`, and a connection that stops answering keep-alives for as long is dropped.
pub async fn connect(
    endpoints: &[String],
    tls: &TlsFiles,
    timeout: Duration,
) -> Result<Client, EtcdError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| EtcdError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let tls_options = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    // No timeout for every request: a campaign waits as long as another replica leads, and a
    // watch lives for hours. Each bounded call bounds itself; keep-alives find dead connections.
    let options = ConnectOptions::new()
        .with_tls(tls_options)
        .with_connect_timeout(timeout)
        .with_keep_alive(Duration::from_secs(5), timeout)
        .with_keep_alive_while_idle(true);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|source| EtcdError::Connect {
            endpoints: endpoints.join(","),
            source,
        })
}
