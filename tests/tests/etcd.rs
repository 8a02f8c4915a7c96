//! The coordinator's way to etcd, groundwork of `storage: etcd` (issue 13): Debian's etcd-server
//! on loopback with mutual TLS on every listener, reached with the coordinator's own certificate.

use std::time::Duration;

use kt_e2e::{Pki, Proc};
use kt_launch::etcd::{EtcdSpec, args, find_etcd, wait_listening};
use kt_proto::tls::TlsFiles;

fn coordinator_tls(pki: &Pki, ca_from: &Pki) -> TlsFiles {
    TlsFiles {
        ca: ca_from.dir.join("ca.crt"),
        cert: pki.dir.join("coordinator.crt"),
        key: pki.dir.join("coordinator.key"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_reaches_etcd_with_its_certificate_and_a_stranger_cannot() {
    kt_daemon::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path().join("pki"));
    let spec = EtcdSpec {
        name: "kt-test".into(),
        data_dir: dir.path().join("etcd"),
        client: kt_launch::process::free_loopback_addr().expect("port"),
        peer: kt_launch::process::free_loopback_addr().expect("port"),
        ca: pki.dir.join("ca.crt"),
        cert: pki.dir.join("coordinator.crt"),
        key: pki.dir.join("coordinator.key"),
    };
    // Never skipped: scripts/install-test-deps installs etcd-server.
    let etcd = find_etcd().expect("etcd");
    let log = dir.path().join("etcd.log");
    let mut proc = Proc::spawn_path(&etcd, &args(&spec), &[], log.clone());
    wait_listening(proc.child_mut(), spec.client, &log, Duration::from_secs(30))
        .expect("etcd listening");
    let endpoints = [format!("https://{}", spec.client)];

    let mut client = kt_coordinator::etcd::connect(
        &endpoints,
        &coordinator_tls(&pki, &pki),
        Duration::from_secs(10),
    )
    .await
    .expect("the coordinator connects");
    client
        .put("/kt-fleet/probe", "written", None)
        .await
        .expect("put");
    let read = client.get("/kt-fleet/probe", None).await.expect("get");
    assert_eq!(
        read.kvs().first().map(|kv| kv.value()),
        Some(&b"written"[..])
    );

    // A certificate from another deployment's CA is refused by etcd, whatever it claims.
    let stranger = Pki::new(dir.path().join("stranger"));
    let refused = async {
        let mut client = kt_coordinator::etcd::connect(
            &endpoints,
            &coordinator_tls(&stranger, &pki),
            Duration::from_secs(5),
        )
        .await?;
        client.put("/kt-fleet/probe", "stranger", None).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    assert!(refused.is_err(), "a stranger wrote to etcd");
    let read = client.get("/kt-fleet/probe", None).await.expect("get");
    assert_eq!(
        read.kvs().first().map(|kv| kv.value()),
        Some(&b"written"[..])
    );
    drop(proc);
}
