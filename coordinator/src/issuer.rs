//! Signs agent certificates with the issuing CA, for enrollment and renewal. Only the public
//! key of a request is used (after its signature proves the requester holds the key): the
//! certificate's name, usages and lifetime are the coordinator's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kt_proto::identity::{GatewayId, Identity};
use rcgen::{CertificateSigningRequestParams, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use time::OffsetDateTime;

use crate::config::EnrollmentConfig;

/// The largest CSR read: a P-256 or RSA-4096 request is well under this.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// The issuing CA, loaded and checked at start.
pub struct AgentIssuer {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA's certificate, sent after the leaf so peers that pin the root build the chain.
    issuing_pem: String,
    trust_domain: String,
    pub ttl: Duration,
}

impl std::fmt::Debug for AgentIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIssuer")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A signed certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, then the issuing CA.
    pub chain_pem: String,
    pub lifetime: Duration,
}

impl Issued {
    /// What the agent receives: the chain, the CA bundle it trusts from now on (`ca_file`), its
    /// lifetime, and the group a group-scoped token bound it to.
    pub fn answer(
        self,
        gateway: &GatewayId,
        ca_file: &std::path::Path,
        group: Option<String>,
    ) -> Result<kt_proto::v1::IssuedCertificate, String> {
        let ca_pem = std::fs::read(ca_file)
            .map_err(|e| format!("cannot read the CA bundle {}: {e}", ca_file.display()))?;
        Ok(kt_proto::v1::IssuedCertificate {
            cert_chain_pem: self.chain_pem.into_bytes(),
            ca_pem,
            gateway_id: gateway.to_string(),
            lifetime_ms: u64::try_from(self.lifetime.as_millis()).unwrap_or(u64::MAX),
            group: group.unwrap_or_default(),
        })
    }
}

impl AgentIssuer {
    /// Reads the issuing CA's files; it must be a CA of this coordinator's trust domain whose
    /// certificates this coordinator's own TLS (`tls`) accepts: a certificate it signs is
    /// checked exactly as an agent's will be, so a wrong issuing CA stops the start instead of
    /// every renewal.
    pub fn load(config: &EnrollmentConfig, tls: &kt_proto::tls::PeerTls) -> Result<Self, String> {
        let issuer = Self::read(config, tls.identity.trust_domain())?;
        issuer.check_accepted_by(tls).map_err(|why| {
            format!(
                "{}: a certificate it signs is not accepted by this coordinator's TLS (tls.ca): {why}",
                config.issuing_ca.cert.display()
            )
        })?;
        Ok(issuer)
    }

    fn check_accepted_by(&self, tls: &kt_proto::tls::PeerTls) -> Result<(), String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let (_, csr) = kt_proto::leaf::key_and_csr().map_err(|e| e.to_string())?;
        let probe = GatewayId::new("enrollment-check").map_err(|e| e.to_string())?;
        let issued = self.sign(&probe, csr.as_bytes())?;
        let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let (leaf, intermediates) = chain.split_first().ok_or("nothing signed")?;
        tls.client_verifier()?
            .verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn read(config: &EnrollmentConfig, trust_domain: &str) -> Result<Self, String> {
        let files = &config.issuing_ca;
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let issuing_pem = read(&files.cert)?;
        let key = KeyPair::from_pem(&read(&files.key)?)
            .map_err(|e| format!("{}: not a usable private key: {e}", files.key.display()))?;
        let ca_identity = kt_proto::leaf::trust_domain_of_ca(&issuing_pem)
            .map_err(|e| format!("{}: {e}", files.cert.display()))?;
        if ca_identity != trust_domain {
            return Err(format!(
                "{}: the issuing CA is for trust domain {ca_identity}, this coordinator's is {trust_domain}",
                files.cert.display()
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(&issuing_pem, key)
            .map_err(|e| format!("{}: not a usable CA: {e}", files.cert.display()))?;
        Ok(AgentIssuer {
            issuer,
            issuing_pem,
            trust_domain: trust_domain.to_owned(),
            ttl: config.agent_cert_ttl,
        })
    }

    /// A certificate for `gateway` with the public key of `csr_pem`, living [`Self::ttl`].
    pub fn sign(&self, gateway: &GatewayId, csr_pem: &[u8]) -> Result<Issued, String> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(format!(
                "the certificate request is larger than {MAX_CSR_BYTES} bytes"
            ));
        }
        let text = std::str::from_utf8(csr_pem)
            .map_err(|_| "the certificate request is not PEM text".to_owned())?;
        let request = CertificateSigningRequestParams::from_pem(text)
            .map_err(|e| format!("the certificate request is not a valid signed CSR: {e}"))?;
        let identity = Identity::agent(&self.trust_domain, gateway.clone());
        let issued = OffsetDateTime::now_utc();
        let params = kt_proto::leaf::params(
            &identity,
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            issued,
            issued + self.ttl,
        )
        .map_err(|e| format!("certificate for {identity}: {e}"))?;
        let ours = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        };
        let cert = ours
            .signed_by(&self.issuer)
            .map_err(|e| format!("cannot sign: {e}"))?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.issuing_pem),
            lifetime: self.ttl,
        })
    }
}

/// The last refused renewal of each gateway, until it renews again: what `gateway health` and
/// `doctor` show as a failed renewal. This replica's knowledge only.
#[derive(Clone, Debug, Default)]
pub struct RenewalRefusals(Arc<Mutex<BTreeMap<String, (u64, String)>>>);

impl RenewalRefusals {
    pub fn refused(&self, gateway: &str, at_unix_ms: u64, why: String) {
        self.lock().insert(gateway.to_owned(), (at_unix_ms, why));
    }

    pub fn renewed(&self, gateway: &str) {
        self.lock().remove(gateway);
    }

    /// When and why `gateway`'s last renewal was refused, if it has not renewed since.
    pub fn get(&self, gateway: &str) -> Option<(u64, String)> {
        self.lock().get(gateway).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u64, String)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
