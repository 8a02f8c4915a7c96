//! Loading the CA, certificate and key files of a peer, with errors that name the file.
//!
//! Every binary checks at start that its own certificate parses, is within its validity
//! period and carries the role it is meant to play, so a wrong file fails loudly at start
//! instead of at the first handshake.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};

use crate::identity::{Identity, Role};

/// Paths of the three PEM files a peer needs, as written in its config file.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The deployment's CA certificate: peers are verified against it.
    pub ca: PathBuf,
    /// This peer's leaf certificate.
    pub cert: PathBuf,
    /// This peer's private key.
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("{}: certificate is for role {found} ({identity}), expected role {expected}", path.display())]
    WrongRole {
        path: PathBuf,
        identity: Identity,
        found: Role,
        expected: Role,
    },
}

/// The loaded PEM material and the identity read from the certificate.
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub identity: Identity,
}

impl TlsFiles {
    /// Reads and checks all three files; `expected` is the role this process plays.
    pub fn load(&self, expected: Role) -> Result<PeerTls, TlsError> {
        self.load_checked(expected, true)
    }

    /// As [`Self::load`], without judging the certificate's validity period by this host's
    /// clock: for an agent whose certificate the coordinator issued and judges (by the
    /// coordinator's clock, which may differ from ours by a minute or more).
    pub fn load_ignoring_clock(&self, expected: Role) -> Result<PeerTls, TlsError> {
        self.load_checked(expected, false)
    }

    fn load_checked(&self, expected: Role, check_time: bool) -> Result<PeerTls, TlsError> {
        let ca_pem = read(&self.ca)?;
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;

        first_certificate(&self.ca, &ca_pem)?;
        let leaf = first_certificate(&self.cert, &cert_pem)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
            path: self.key.clone(),
            what: format!("no usable private key: {e}"),
        })?;
        if check_time {
            check_validity(&self.cert, &leaf)?;
        }
        let identity = Identity::from_cert_der(&leaf).map_err(|e| TlsError::Invalid {
            path: self.cert.clone(),
            what: e.to_string(),
        })?;
        if identity.role() != expected {
            return Err(TlsError::WrongRole {
                path: self.cert.clone(),
                found: identity.role(),
                identity,
                expected,
            });
        }
        Ok(PeerTls {
            ca_pem,
            cert_pem,
            key_pem,
            identity,
        })
    }
}

impl PeerTls {
    /// Server side: present our certificate and require a client certificate from our CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// How a server checks client certificates: chained to our CA (webpki), within the CA's
    /// path length; a client without a certificate is let through (see
    /// [`Self::rustls_server_config`]).
    pub fn client_verifier(
        &self,
    ) -> Result<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| format!("CA certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA certificate: {e}"))?;
        }
        let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
        let anchor = first_certificate(Path::new("CA"), &self.ca_pem).map_err(|e| e.to_string())?;
        Ok(std::sync::Arc::new(
            PathLenVerifier::new(webpki, &anchor).map_err(|e| format!("CA certificate: {e}"))?,
        ))
    }

    /// Server side as a rustls config, for servers that run the TLS handshake themselves (to
    /// bound its time): our certificate chain followed by the CA bundle (so a client that pins
    /// the root by its fingerprint finds it), HTTP/2, and a client certificate from our CA
    /// verified when one is presented.
    ///
    /// A client *without* a certificate completes the handshake, for enrollment (a join token
    /// is its credential): every other service must refuse it, as the coordinator's
    /// `authorize` does for each of its RPCs.
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig, String> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = self.client_verifier()?;
        let mut chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        for ca in CertificateDer::pem_slice_iter(&self.ca_pem).flatten() {
            if !chain.contains(&ca) {
                chain.push(ca);
            }
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("key: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Client side: verify the server against our CA and `server_name`, present our certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(server_name)
    }
}

impl TlsFiles {
    /// A rustls client config for a service with a CA of its own (NATS): the server verified
    /// against `ca`, `cert` presented. No kt-fleet role is read from the certificate.
    pub fn rustls_client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let invalid = |path: &Path, what: String| TlsError::Invalid {
            path: path.to_owned(),
            what,
        };
        let ca_pem = read(&self.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert =
                cert.map_err(|e| invalid(&self.ca, format!("malformed PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(&self.ca, format!("unusable CA certificate: {e}")))?;
        }
        let cert_pem = read(&self.cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&self.cert, format!("malformed PEM certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| invalid(&self.key, format!("no usable private key: {e}")))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&self.cert, format!("TLS versions: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid(&self.cert, format!("certificate and key: {e}")))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn first_certificate(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| TlsError::Invalid {
            path: path.to_owned(),
            what: "no PEM certificate found".into(),
        })?
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            what: format!("malformed PEM certificate: {e}"),
        })
}

fn check_validity(path: &Path, der: &CertificateDer<'_>) -> Result<(), TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Invalid {
        path: path.to_owned(),
        what: format!("certificate cannot be parsed: {e}"),
    })?;
    let validity = cert.validity();
    if !validity.is_valid() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            what: format!(
                "certificate is outside its validity period ({} to {})",
                validity.not_before, validity.not_after
            ),
        });
    }
    Ok(())
}

/// Reads the identity of the first certificate in a PEM file, without checking its role.
pub fn identity_of_cert_file(path: &Path) -> Result<Identity, TlsError> {
    let pem = read(path)?;
    let der = first_certificate(path, &pem)?;
    Identity::from_cert_der(&der).map_err(|e| TlsError::Invalid {
        path: path.to_owned(),
        what: e.to_string(),
    })
}

/// webpki verifies the path to a trust anchor but not the anchor's own `pathLenConstraint`
/// (anchors are taken as names and keys only): our CA says `pathlen:0`, so a client
/// certificate must be issued by the CA itself, never through an intermediate someone made with
/// the CA's key. This verifier checks that after webpki's verification.
#[derive(Debug)]
struct PathLenVerifier {
    inner: std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>,
    anchor_subject: Vec<u8>,
    anchor_path_len: Option<usize>,
}

impl PathLenVerifier {
    fn new(
        inner: std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>,
        anchor: &CertificateDer<'_>,
    ) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(anchor).map_err(|e| e.to_string())?;
        let anchor_path_len = cert
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|bc| bc.value.path_len_constraint)
            .map(|n| n as usize);
        Ok(PathLenVerifier {
            inner,
            anchor_subject: cert.subject().as_raw().to_vec(),
            anchor_path_len,
        })
    }

    /// How many intermediates lie between the leaf and the anchor, following issuer names.
    fn intermediates_used(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<usize, String> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let parse = |der: &CertificateDer<'_>| -> Result<(Vec<u8>, Vec<u8>), String> {
            let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
            Ok((
                cert.subject().as_raw().to_vec(),
                cert.issuer().as_raw().to_vec(),
            ))
        };
        let chain = intermediates
            .iter()
            .map(parse)
            .collect::<Result<Vec<_>, _>>()?;
        let mut issuer = parse(leaf)?.1;
        for used in 0..=chain.len() {
            if issuer == self.anchor_subject {
                return Ok(used);
            }
            match chain.iter().find(|(subject, _)| *subject == issuer) {
                Some((_, next)) => issuer = next.clone(),
                None => break,
            }
        }
        Err("the chain does not lead to the CA".into())
    }
}

impl rustls::server::danger::ClientCertVerifier for PathLenVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |why: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                std::sync::Arc::new(std::io::Error::other(why)),
            )))
        };
        let used = self
            .intermediates_used(end_entity, intermediates)
            .map_err(refuse)?;
        match self.anchor_path_len {
            Some(allowed) if used > allowed => Err(refuse(format!(
                "the CA allows {allowed} intermediate certificates, the chain has {used}"
            ))),
            _ => Ok(verified),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
