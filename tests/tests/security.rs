//! Refusals: identity comes from verified certificates and nothing else.

use std::time::Duration;

use kt_ctl::pki::LeafRole;
use kt_e2e::{Pki, TestFleet};
use kt_proto::identity::Role;
use kt_proto::tls::TlsFiles;
use kt_proto::v1::agent_message::Body;
use kt_proto::v1::agent_service_client::AgentServiceClient;
use kt_proto::v1::operator_service_client::OperatorServiceClient;
use kt_proto::v1::{AgentMessage, Hello, ListGatewaysRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

async fn channel(
    fleet: &TestFleet,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    channel_to(fleet.coordinator.addr, tls).await
}

async fn channel_to(
    coordinator: std::net::SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{coordinator}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether the coordinator refuses an operator call made with `tls`. With TLS 1.3 the refusal
/// may surface at connect or only at the first call.
async fn is_refused(fleet: &TestFleet, tls: ClientTlsConfig) -> bool {
    match channel(fleet, tls).await {
        Err(_) => true,
        Ok(channel) => OperatorServiceClient::new(channel)
            .list_gateways(ListGatewaysRequest::default())
            .await
            .is_err(),
    }
}

fn files(dir: &std::path::Path, stem: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// Opens a session as `stem` (a cert in `fleet.pki`) claiming `gateway_id`; returns the refusal.
async fn open_session(
    fleet: &TestFleet,
    stem: &str,
    role: Role,
    gateway_id: &str,
) -> Result<(), tonic::Status> {
    let tls = files(&fleet.pki.dir, stem).load(role).expect("load");
    let channel = channel(fleet, tls.client_config("127.0.0.1"))
        .await
        .expect("connect");
    let hello = AgentMessage {
        seq: 1,
        body: Some(Body::Hello(Hello {
            gateway_id: gateway_id.into(),
            ..Default::default()
        })),
    };
    let mut stream = AgentServiceClient::new(channel)
        .session(tokio_stream::iter(vec![hello]))
        .await?
        .into_inner();
    stream.message().await.map(|_| ())
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let fleet = TestFleet::start(0);
    let ca = std::fs::read(fleet.pki.dir.join("ca.crt")).expect("ca");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("127.0.0.1");
    let refused = is_refused(&fleet, tls).await;
    assert!(refused, "a client without a certificate was served");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let fleet = TestFleet::start(0);
    let other = tempfile::tempdir().expect("tempdir");
    let stranger = Pki::new(other.path().to_owned());
    let tls = files(&stranger.dir, "operator-tester")
        .load(Role::Operator)
        .expect("load");
    // Trust our coordinator's CA, but present a certificate from the stranger's CA.
    let ca = std::fs::read(fleet.pki.dir.join("ca.crt")).expect("ca");
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(
            &tls.cert_pem,
            &tls.key_pem,
        ))
        .domain_name("127.0.0.1");
    let refused = is_refused(&fleet, config).await;
    assert!(refused, "a certificate from another CA was accepted");
}

#[tokio::test]
async fn an_agent_certificate_cannot_call_the_operator_service() {
    let fleet = TestFleet::start(0);
    fleet.pki.issue_agent("gw-sneaky");
    let tls = files(&fleet.pki.dir, "agent-gw-sneaky")
        .load(Role::Agent)
        .expect("load");
    let channel = channel(&fleet, tls.client_config("127.0.0.1"))
        .await
        .expect("connect");
    let status = OperatorServiceClient::new(channel)
        .list_gateways(ListGatewaysRequest::default())
        .await
        .expect_err("agent listed gateways");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("requires role operator"),
        "{status:?}"
    );
}

#[tokio::test]
async fn an_agent_cannot_speak_for_another_gateway() {
    let fleet = TestFleet::start(1);
    fleet.pki.issue_agent("gw-mallory");
    let status = open_session(&fleet, "agent-gw-mallory", Role::Agent, "gw-test-01")
        .await
        .expect_err("impersonation");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("gw-mallory"), "{status:?}");
    // Its own id is fine.
    let own = open_session(&fleet, "agent-gw-mallory", Role::Agent, "gw-mallory").await;
    assert!(own.is_ok(), "{own:?}");
}

#[tokio::test]
async fn an_operator_certificate_cannot_open_an_agent_session() {
    let fleet = TestFleet::start(0);
    fleet.pki.issue(&LeafRole::Operator { name: "eve".into() });
    let status = open_session(&fleet, "operator-eve", Role::Operator, "gw-test-01")
        .await
        .expect_err("operator session");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("requires role agent"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_certificate_through_an_intermediate_the_ca_does_not_allow_is_refused() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let fleet = TestFleet::start(0);
    // Someone with the issuing CA's key makes an intermediate under it; the issuing CA says
    // pathlen:0 and the root pathlen:1.
    let ca_pem = std::fs::read_to_string(fleet.pki.dir.join("ca.crt")).expect("ca");
    let issuing_pem =
        std::fs::read_to_string(fleet.pki.dir.join("issuing-ca.crt")).expect("issuing");
    let issuing_key = KeyPair::from_pem(
        &std::fs::read_to_string(fleet.pki.dir.join("issuing-ca.key")).expect("key"),
    )
    .expect("issuing key");
    let ca = Issuer::from_ca_cert_pem(&issuing_pem, issuing_key).expect("issuer");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "rogue intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let intermediate_key = KeyPair::generate().expect("key");
    let intermediate = params
        .signed_by(&intermediate_key, &ca)
        .expect("intermediate");
    let rogue = Issuer::new(params, intermediate_key);
    let uri = "spiffe://kt-fleet.local/operator/mallory";
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, uri);
    params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = params.signed_by(&leaf_key, &rogue).expect("leaf");
    let chain = format!("{}{}{issuing_pem}", leaf.pem(), intermediate.pem());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            chain,
            leaf_key.serialize_pem(),
        ))
        .domain_name("127.0.0.1");
    let refused = is_refused(&fleet, tls).await;
    assert!(
        refused,
        "a leaf issued through an intermediate was accepted"
    );
    // The same call with a leaf of the issuing CA itself goes through.
    let tester = files(&fleet.pki.dir, "operator-tester")
        .load(Role::Operator)
        .expect("load");
    assert!(!is_refused(&fleet, tester.client_config("127.0.0.1")).await);
}

#[tokio::test]
async fn a_deployment_with_a_single_ca_keeps_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    // The shape `ktctl pki init` made before the issuing CA: ca.crt and ca.key, leaves below.
    kt_launch::pki::init_ca(&pki_dir, kt_launch::pki::DEFAULT_TRUST_DOMAIN, false).expect("CA");
    let pki = Pki { dir: pki_dir };
    for role in [
        LeafRole::loopback_coordinator(),
        LeafRole::Operator {
            name: "tester".into(),
        },
    ] {
        pki.issue(&role);
    }
    let operator = files(&pki.dir, "operator-tester");
    let one_cert = std::fs::read_to_string(&operator.cert).expect("cert");
    assert_eq!(one_cert.matches("BEGIN CERTIFICATE").count(), 1);
    let coordinator = kt_e2e::CoordinatorNode::start(dir.path().join("coordinator"), &pki, &[]);
    let tls = operator.load(Role::Operator).expect("load");
    let channel = channel_to(coordinator.addr, tls.client_config("127.0.0.1"))
        .await
        .expect("connect");
    OperatorServiceClient::new(channel)
        .list_gateways(ListGatewaysRequest::default())
        .await
        .expect("an operator of a single-CA deployment is served");
}

/// The first certificate the coordinator at `coordinator` presents to a new connection.
async fn served_certificate(coordinator: std::net::SocketAddr, pki: &Pki) -> Option<Vec<u8>> {
    let config = files(&pki.dir, "operator-tester")
        .rustls_client_config()
        .expect("client config");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(coordinator).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .ok()?
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
}

fn first_certificate_in(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .expect("pem")
        .next()
        .expect("a certificate")
        .expect("pem")
        .to_vec()
}

#[tokio::test]
async fn the_coordinators_certificate_is_replaced_without_dropping_sessions() {
    use kt_e2e::{all_healthy, wait_for};
    let fleet = TestFleet::start(1);
    fleet
        .wait_for_health("1 healthy gateway", Duration::from_secs(30), all_healthy(1))
        .await;
    let cert_file = fleet.pki.dir.join("coordinator.crt");
    let addr = fleet.coordinator.addr;
    assert_eq!(
        served_certificate(addr, &fleet.pki).await,
        Some(first_certificate_in(&cert_file))
    );
    let role = LeafRole::loopback_coordinator();

    // Renewed on disk: new connections get the new certificate, without a signal.
    kt_launch::pki::issue(&fleet.pki.dir, &role, 2, true).expect("renew");
    let renewed = first_certificate_in(&cert_file);
    let mut served = None;
    for _ in 0..60 {
        served = served_certificate(addr, &fleet.pki).await;
        if served.as_ref() == Some(&renewed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        served,
        Some(renewed.clone()),
        "the renewed certificate is served"
    );

    // A broken file is not taken: the running certificate stays, and says why on SIGHUP.
    std::fs::write(&cert_file, "not a certificate").expect("break");
    let coordinator = fleet.coordinator.proc.as_ref().expect("running");
    coordinator.signal(nix::sys::signal::Signal::SIGHUP);
    let said = wait_for(Duration::from_secs(30), || {
        coordinator.log_text().contains("certificate not reloaded")
    })
    .await;
    assert!(said, "{}", coordinator.log_text());
    assert_eq!(served_certificate(addr, &fleet.pki).await, Some(renewed));

    // SIGHUP with good files reloads at once.
    kt_launch::pki::issue(&fleet.pki.dir, &role, 2, true).expect("renew again");
    coordinator.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = wait_for(Duration::from_secs(30), || {
        coordinator
            .log_text()
            .lines()
            .any(|l| l.contains("certificate reloaded") && l.contains("SIGHUP"))
    })
    .await;
    assert!(reloaded, "{}", coordinator.log_text());
    assert_eq!(
        served_certificate(addr, &fleet.pki).await,
        Some(first_certificate_in(&cert_file))
    );

    // The agent's session lived through all of it.
    let agent_log = std::fs::read_to_string(fleet.dir.path().join("gw-test-01").join("agent.log"))
        .expect("agent log");
    assert_eq!(agent_log.matches("session open").count(), 1, "{agent_log}");
    let (_, rows) = fleet.health();
    assert_eq!(
        kt_e2e::row(&rows, "gw-test-01").map(|r| r["agent"].clone()),
        Some("connected".into())
    );
}
