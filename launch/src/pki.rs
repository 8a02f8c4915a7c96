//! A deployment's certificate authority and the leaf certificates it issues.
//!
//! One CA per deployment; leaves carry a SPIFFE-style URI SAN naming their role
//! (`spiffe://<trust-domain>/agent/<gateway-id>` and so on). The trust domain is kept in the
//! CA certificate itself (as the URI SAN `spiffe://<trust-domain>`), so issuing needs nothing
//! but the CA's two files. Private keys are written with mode 0600.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kt_proto::identity::{GatewayId, Identity, validate_trust_domain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const DEFAULT_TRUST_DOMAIN: &str = "kt-fleet.local";
const CA_DAYS: i64 = 3650;

/// What to issue a leaf certificate for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafRole {
    Agent { gateway: GatewayId },
    Coordinator { dns: Vec<String>, ips: Vec<IpAddr> },
    Operator { name: String },
}

/// The files a leaf was written to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: Identity,
}

/// Creates `dir/ca.crt` and `dir/ca.key`; refuses to replace an existing CA unless `force`.
pub fn init_ca(dir: &Path, trust_domain: &str, force: bool) -> anyhow::Result<PathBuf> {
    validate_trust_domain(trust_domain)
        .map_err(|why| anyhow::anyhow!("invalid trust domain {trust_domain:?}: {why}"))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !force && (cert_path.exists() || key_path.exists()) {
        bail!(
            "{} already holds a CA; replacing it would invalidate every certificate it issued (use --force to replace it)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("kt-fleet CA ({trust_domain})"));
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(CA_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;

    write_private(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(cert_path)
}

/// Reads the trust domain from a CA certificate's `spiffe://<trust-domain>` URI SAN.
pub fn trust_domain_of_ca(ca_pem: &str) -> anyhow::Result<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("CA certificate is not PEM")?;
    let (_, cert) = X509Certificate::from_der(&der).context("CA certificate cannot be parsed")?;
    let san = cert
        .subject_alternative_name()
        .context("CA certificate SAN")?;
    san.into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix("spiffe://").filter(|td| !td.contains('/')).map(str::to_owned),
            _ => None,
        })
        .context("CA certificate carries no spiffe://<trust-domain> URI SAN (was it made by `ktctl pki init`?)")
}

/// Issues a leaf certificate signed by the CA in `dir`, written next to it.
pub fn issue(dir: &Path, role: &LeafRole, days: i64, force: bool) -> anyhow::Result<IssuedFiles> {
    if days <= 0 {
        bail!("--days must be positive");
    }
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    let ca_pem = std::fs::read_to_string(&ca_cert_path).with_context(|| {
        format!(
            "cannot read {} (run `ktctl pki init --dir {}` first)",
            ca_cert_path.display(),
            dir.display()
        )
    })?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("cannot read {}", ca_key_path.display()))?;
    let trust_domain = trust_domain_of_ca(&ca_pem)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{}: not a usable private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{}: not a usable CA", ca_cert_path.display()))?;

    let (identity, stem, mut sans, usages) = match role {
        LeafRole::Agent { gateway } => (
            Identity::agent(&trust_domain, gateway.clone()),
            format!("agent-{gateway}"),
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
        LeafRole::Coordinator { dns, ips } => {
            if dns.is_empty() && ips.is_empty() {
                bail!(
                    "a coordinator certificate needs at least one --dns or --ip its clients connect to"
                );
            }
            let mut sans = Vec::new();
            for name in dns {
                sans.push(SanType::DnsName(
                    name.as_str()
                        .try_into()
                        .with_context(|| format!("invalid DNS name {name:?}"))?,
                ));
            }
            sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
            (
                Identity::Coordinator {
                    trust_domain: trust_domain.clone(),
                },
                "coordinator".to_owned(),
                sans,
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
        }
        LeafRole::Operator { name } => {
            let identity =
                Identity::parse_uri(&format!("spiffe://{trust_domain}/operator/{name}"))?;
            (
                identity,
                format!("operator-{name}"),
                Vec::new(),
                vec![ExtendedKeyUsagePurpose::ClientAuth],
            )
        }
    };
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    if !force && (cert_path.exists() || key_path.exists()) {
        bail!(
            "{} already exists (use --force to replace it)",
            cert_path.display()
        );
    }

    sans.push(SanType::URI(identity.uri().try_into()?));
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.uri());
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    write_private(&key_path, key.serialize_pem().as_bytes(), force)?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(IssuedFiles {
        cert: cert_path,
        key: key_path,
        identity,
    })
}

/// Writes a private key with mode 0600 from the first byte on (never readable by others).
fn write_private(path: &Path, bytes: &[u8], replace: bool) -> anyhow::Result<()> {
    if replace && path.exists() {
        std::fs::remove_file(path).with_context(|| format!("cannot replace {}", path.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn write_public(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use kt_proto::tls::identity_of_cert_file;

    use super::*;

    #[test]
    fn ca_then_leaves_with_identities_and_private_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), "example.org", false).expect("init");
        let ca_pem = std::fs::read_to_string(dir.path().join(CA_CERT)).expect("ca");
        assert_eq!(trust_domain_of_ca(&ca_pem).expect("td"), "example.org");

        let agent = issue(
            dir.path(),
            &LeafRole::Agent {
                gateway: GatewayId::new("gw-1").expect("id"),
            },
            30,
            false,
        )
        .expect("agent");
        assert_eq!(agent.identity.uri(), "spiffe://example.org/agent/gw-1");
        assert_eq!(
            identity_of_cert_file(&agent.cert).expect("read back"),
            agent.identity
        );

        let coord = issue(
            dir.path(),
            &LeafRole::Coordinator {
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse().expect("ip")],
            },
            30,
            false,
        )
        .expect("coordinator");
        assert_eq!(
            identity_of_cert_file(&coord.cert).expect("read back").uri(),
            "spiffe://example.org/coordinator"
        );

        for key in [dir.path().join(CA_KEY), agent.key, coord.key] {
            let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    #[test]
    fn existing_ca_and_leaves_are_not_overwritten_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), DEFAULT_TRUST_DOMAIN, false).expect("init");
        let before = std::fs::read(dir.path().join(CA_CERT)).expect("ca");
        let err = init_ca(dir.path(), DEFAULT_TRUST_DOMAIN, false).expect_err("refused");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).expect("ca"), before);
        init_ca(dir.path(), DEFAULT_TRUST_DOMAIN, true).expect("forced");
        assert_ne!(std::fs::read(dir.path().join(CA_CERT)).expect("ca"), before);

        let role = LeafRole::Operator {
            name: "alice".into(),
        };
        issue(dir.path(), &role, 1, false).expect("first");
        assert!(issue(dir.path(), &role, 1, false).is_err());
        issue(dir.path(), &role, 1, true).expect("forced");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(init_ca(dir.path(), "Not A Domain", false).is_err());
        assert!(
            issue(
                dir.path(),
                &LeafRole::Operator { name: "bob".into() },
                1,
                false
            )
            .is_err(),
            "no CA yet"
        );
        init_ca(dir.path(), DEFAULT_TRUST_DOMAIN, false).expect("init");
        assert!(
            issue(
                dir.path(),
                &LeafRole::Coordinator {
                    dns: vec![],
                    ips: vec![]
                },
                1,
                false
            )
            .is_err()
        );
        assert!(
            issue(
                dir.path(),
                &LeafRole::Operator {
                    name: "Bad Name".into()
                },
                1,
                false
            )
            .is_err()
        );
    }
}
