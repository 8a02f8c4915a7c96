//! A hand-driven agent session with a real agent certificate: what a hostile or broken agent
//! (or a second host with a copied certificate) can send.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kt_proto::identity::Role;
use kt_proto::tls::TlsFiles;
use kt_proto::v1::agent_message::Body;
use kt_proto::v1::agent_service_client::AgentServiceClient;
use kt_proto::v1::coordinator_message::Body as CoordinatorBody;
use kt_proto::v1::{AgentMessage, CoordinatorMessage, Hello};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;

/// A channel to `coordinator` with the certificate `agent-<stem>` of the PKI in `pki_dir`.
async fn agent_channel(
    coordinator: SocketAddr,
    pki_dir: &Path,
    stem: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = TlsFiles {
        ca: pki_dir.join("ca.crt"),
        cert: pki_dir.join(format!("agent-{stem}.crt")),
        key: pki_dir.join(format!("agent-{stem}.key")),
    }
    .load(Role::Agent)
    .expect("agent certificate");
    Endpoint::from_shared(format!("https://{coordinator}"))
        .expect("endpoint")
        .tls_config(tls.client_config("127.0.0.1"))
        .expect("tls")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// An open session: send messages, read what the coordinator answers.
pub struct RawSession {
    outbound: mpsc::Sender<AgentMessage>,
    pub inbound: Streaming<CoordinatorMessage>,
    seq: u64,
}

/// Opens a session to `coordinator` with the certificate `agent-<stem>` of the PKI in
/// `pki_dir`, sends `hello` and waits for the welcome (or the refusal).
pub async fn open(
    coordinator: SocketAddr,
    pki_dir: &Path,
    stem: &str,
    hello: Hello,
) -> Result<RawSession, tonic::Status> {
    let channel = agent_channel(coordinator, pki_dir, stem)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (outbound, rx) = mpsc::channel(16);
    let hello = AgentMessage {
        seq: 1,
        body: Some(Body::Hello(hello)),
    };
    outbound.send(hello).await.expect("queue the hello");
    let mut inbound = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(CoordinatorMessage {
            body: Some(CoordinatorBody::Welcome(_)),
        }) => Ok(RawSession {
            outbound,
            inbound,
            seq: 1,
        }),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

impl RawSession {
    pub async fn send(&mut self, body: Body) {
        self.seq += 1;
        let message = AgentMessage {
            seq: self.seq,
            body: Some(body),
        };
        // The coordinator may already have ended the session: the caller reads why.
        let _ = self.outbound.send(message).await;
    }

    /// Reads until the coordinator ends the session; returns its status (OK for a clean end).
    pub async fn ended(&mut self, timeout: Duration) -> tonic::Status {
        let read = async {
            loop {
                match self.inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return tonic::Status::ok(""),
                    Err(status) => return status,
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .expect("the coordinator did not end the session")
    }
}

/// Opens an `Events` stream with the certificate `agent-<stem>`: batches go in, acks come out.
pub async fn open_events(
    coordinator: SocketAddr,
    pki_dir: &Path,
    stem: &str,
) -> (
    mpsc::Sender<kt_proto::v1::EventBatch>,
    Result<Streaming<kt_proto::v1::EventAck>, tonic::Status>,
) {
    let channel = agent_channel(coordinator, pki_dir, stem)
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(4);
    let acks = AgentServiceClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .events(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, acks)
}

/// `AgentService.Renew` with the certificate `agent-<stem>`, for the key of `csr_pem`.
pub async fn renew(
    coordinator: SocketAddr,
    pki_dir: &Path,
    stem: &str,
    csr_pem: &str,
) -> Result<kt_proto::v1::IssuedCertificate, tonic::Status> {
    let channel = agent_channel(coordinator, pki_dir, stem)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    AgentServiceClient::new(channel)
        .renew(kt_proto::v1::CertificateRequest {
            csr_pem: csr_pem.as_bytes().to_vec(),
        })
        .await
        .map(tonic::Response::into_inner)
}
