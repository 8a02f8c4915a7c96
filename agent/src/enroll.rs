//! First boot: a join token and the pinned fingerprint of the deployment's root CA buy the agent
//! its certificate. The key is made here and never leaves the host; the coordinator sees only a
//! CSR. The token is sent only over TLS to a coordinator whose chain ends in the pinned root.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kt_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use kt_proto::v1::{CertificateRequest, EnrollRequest, IssuedCertificate};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::certs;
use crate::config::{AgentConfig, EnrollmentSettings};

/// A token file larger than this is not a token.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;
/// Connecting, the handshake and the answer together.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(20);

/// Why enrollment did not work.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The coordinator answered no: trying again with the same token will not help.
    #[error("the coordinator refused the enrollment: {0}")]
    Refused(String),
    /// No coordinator could be asked (or none proved it holds the pinned root).
    #[error("{0}")]
    Unreachable(String),
    /// Something on this host: the token file, writing the certificate.
    #[error("{0}")]
    Local(String),
}

/// What enrollment wrote.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub gateway_id: String,
    pub group: String,
    pub lifetime: Duration,
}

/// Where to enroll and what to write.
#[derive(Clone, Debug)]
pub struct Target {
    /// `https://host:port` URLs, tried in turn.
    pub endpoints: Vec<String>,
    /// The name the coordinator's certificate must carry; the endpoint's host when unset.
    pub server_name: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Where the key, certificate and CA bundle go.
    pub files: kt_proto::tls::TlsFiles,
}

impl Target {
    pub fn of(config: &AgentConfig) -> Self {
        Target {
            endpoints: config.coordinator.endpoints.clone(),
            server_name: config.coordinator.server_name.clone(),
            labels: config.labels.clone(),
            files: config.tls.clone(),
        }
    }
}

/// Enrolls with the first coordinator of `config` that answers, and installs the certificate,
/// key and CA bundle at `config.tls`.
pub async fn enroll(
    config: &AgentConfig,
    enrollment: &EnrollmentSettings,
) -> Result<Enrolled, EnrollError> {
    enroll_at(&Target::of(config), enrollment).await
}

/// Enrolls with the first coordinator of `target` that answers, and installs the certificate,
/// key and CA bundle at `target.files`.
pub async fn enroll_at(
    target: &Target,
    enrollment: &EnrollmentSettings,
) -> Result<Enrolled, EnrollError> {
    let token = read_token(&enrollment.token_file)?;
    let pin = kt_proto::leaf::parse_fingerprint(&enrollment.ca_fingerprint)
        .map_err(EnrollError::Local)?;
    let (key_pem, csr_pem) = kt_proto::leaf::key_and_csr()
        .map_err(|e| EnrollError::Local(format!("cannot make a key: {e}")))?;
    let request = EnrollRequest {
        token,
        gateway_id: enrollment.gateway_id.clone().unwrap_or_default(),
        labels: target.labels.clone().into_iter().collect(),
        csr: Some(CertificateRequest {
            csr_pem: csr_pem.into_bytes(),
        }),
    };
    let mut failures = Vec::new();
    for endpoint in &target.endpoints {
        let server_name = target
            .server_name
            .clone()
            .or_else(|| crate::config::host_of(endpoint))
            .unwrap_or_default();
        let asked = tokio::time::timeout(
            ENROLL_TIMEOUT,
            ask(endpoint, &server_name, &pin, request.clone()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(EnrollError::Unreachable(format!(
                "{endpoint}: no answer within {ENROLL_TIMEOUT:?}"
            )))
        });
        match asked {
            Ok(issued) => {
                check_bundle(&issued, &pin)?;
                certs::install(&target.files, key_pem.as_bytes(), &issued).map_err(|e| {
                    EnrollError::Local(format!("cannot write the certificate: {e}"))
                })?;
                return Ok(Enrolled {
                    gateway_id: issued.gateway_id,
                    group: issued.group,
                    lifetime: Duration::from_millis(issued.lifetime_ms),
                });
            }
            Err(EnrollError::Unreachable(why)) => failures.push(why),
            Err(other) => return Err(other),
        }
    }
    Err(EnrollError::Unreachable(failures.join("; ")))
}

fn read_token(path: &Path) -> Result<String, EnrollError> {
    let local = |why: String| EnrollError::Local(format!("token file {}: {why}", path.display()));
    let size = std::fs::metadata(path)
        .map_err(|e| local(e.to_string()))?
        .len();
    if size > MAX_TOKEN_FILE_BYTES {
        return Err(local(format!(
            "{size} bytes: larger than a join token ({MAX_TOKEN_FILE_BYTES} at most)"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| local(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(local("empty".into()));
    }
    Ok(token.to_owned())
}

/// The CA bundle the coordinator sent must hold the pinned root: it is what this agent will
/// trust from now on.
fn check_bundle(issued: &IssuedCertificate, pin: &str) -> Result<(), EnrollError> {
    use rustls_pki_types::pem::PemObject;
    let holds_pin = CertificateDer::pem_slice_iter(&issued.ca_pem)
        .flatten()
        .any(|ca| kt_proto::leaf::fingerprint(&ca) == pin);
    if holds_pin {
        Ok(())
    } else {
        Err(EnrollError::Refused(format!(
            "the CA bundle the coordinator sent does not hold the pinned root {pin}"
        )))
    }
}

async fn ask(
    endpoint: &str,
    server_name: &str,
    pin: &str,
    request: EnrollRequest,
) -> Result<IssuedCertificate, EnrollError> {
    let channel = pinned_channel(endpoint, server_name, pin)
        .await
        .map_err(|e| EnrollError::Unreachable(format!("{endpoint}: {e:#}")))?;
    match EnrollmentServiceClient::new(channel).enroll(request).await {
        Ok(answer) => Ok(answer.into_inner()),
        Err(status) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted => Err(
                EnrollError::Unreachable(format!("{endpoint}: {}", status.message())),
            ),
            _ => Err(EnrollError::Refused(status.message().to_owned())),
        },
    }
}

/// A channel to `endpoint` whose TLS handshake succeeds only if the coordinator's chain ends in
/// the root with fingerprint `pin` and names `server_name`. No client certificate.
pub async fn pinned_channel(
    endpoint: &str,
    server_name: &str,
    pin: &str,
) -> anyhow::Result<Channel> {
    let uri: Uri = endpoint
        .parse()
        .with_context(|| format!("bad endpoint {endpoint}"))?;
    let authority = uri
        .authority()
        .with_context(|| format!("endpoint {endpoint} has no host"))?
        .to_string();
    let address = if uri.port().is_some() {
        authority.clone()
    } else {
        format!("{authority}:443")
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedRoot {
        pin: pin.to_owned(),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("{server_name:?} is not a server name"))?;
    // TLS is ours (the pinned verifier), so the channel itself speaks plain HTTP/2 over it.
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, name, address) = (connector.clone(), name.clone(), address.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{authority}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(connect)
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

/// Verifies the server's chain against the one root whose SHA-256 fingerprint was pinned, taken
/// from the chain the server sent (the coordinator sends its root along).
#[derive(Debug)]
struct PinnedRoot {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedRoot {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let refuse = |why: String| {
            TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                std::io::Error::other(why),
            ))))
        };
        let is_pinned = |cert: &CertificateDer<'_>| kt_proto::leaf::fingerprint(cert) == self.pin;
        let root = intermediates.iter().find(|c| is_pinned(c)).ok_or_else(|| {
            refuse(format!(
                "the coordinator's certificate chain does not end in the pinned root CA {}; the token was not sent",
                self.pin
            ))
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(root.clone().into_owned())
            .map_err(|e| refuse(format!("the pinned root is not a usable CA: {e}")))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| !is_pinned(c))
            .cloned()
            .collect();
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| refuse(format!("verifier: {e}")))?;
        webpki.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
