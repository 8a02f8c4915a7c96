//! A deployment's certificate authorities and the leaf certificates they issue.
//!
//! `ktctl pki init` makes two: a root (`ca.crt`, the trust anchor every party pins, and
//! `root-ca.key`, to be kept offline) and an issuing CA under it (`issuing-ca.crt`,
//! `issuing-ca.key`: what signs leaves, and all a coordinator will hold). A leaf's file holds
//! the leaf then the issuing CA, so peers that pin only the root can build the chain. A
//! directory with a single CA (`ca.crt` and `ca.key`, as made before, and still for etcd's and
//! NATS' own CAs) keeps issuing directly.
//!
//! Leaves carry a SPIFFE-style URI SAN naming their role
//! (`spiffe://<trust-domain>/agent/<gateway-id>` and so on). The trust domain is kept in each CA
//! certificate itself (as the URI SAN `spiffe://<trust-domain>`), so issuing needs nothing but
//! the signing CA's two files. Private keys are written with mode 0600.

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

pub const CA_CERT: &str = "ca.crt";
/// The key of a single CA (no issuing CA under it).
pub const CA_KEY: &str = "ca.key";
/// The root's key in a two-tier PKI: needed only to make a new issuing CA; keep it offline.
pub const ROOT_KEY: &str = "root-ca.key";
pub const ISSUING_CERT: &str = "issuing-ca.crt";
pub const ISSUING_KEY: &str = "issuing-ca.key";
/// How long an issuing CA is valid: renewed (from the offline root) well before the root.
const ISSUING_DAYS: i64 = 1825;
pub const DEFAULT_TRUST_DOMAIN: &str = "kt-fleet.local";
const CA_DAYS: i64 = 3650;

/// What to issue a leaf certificate for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafRole {
    Agent { gateway: GatewayId },
    Coordinator { dns: Vec<String>, ips: Vec<IpAddr> },
    Operator { name: String },
}

impl LeafRole {
    /// A server on this machine: `localhost` and `127.0.0.1`, as every local launch (dev fleets,
    /// tests, benchmarks, their etcd and NATS) reaches it.
    pub fn loopback_coordinator() -> Self {
        LeafRole::Coordinator {
            dns: vec!["localhost".into()],
            ips: vec![IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
        }
    }
}

/// The files a leaf was written to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: Identity,
}

/// The files `init` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitFiles {
    /// The root certificate: the trust anchor every party pins.
    pub root_cert: PathBuf,
    /// The root's key, to be moved offline.
    pub root_key: PathBuf,
    pub issuing_cert: PathBuf,
    pub issuing_key: PathBuf,
}

/// Creates a two-tier PKI in `dir`: the root (`ca.crt`, `root-ca.key`; it may sign one issuing
/// CA level below it) and an issuing CA (`issuing-ca.crt`, `issuing-ca.key`; it signs leaves
/// only). Refuses to replace an existing CA unless `force`.
pub fn init(dir: &Path, trust_domain: &str, force: bool) -> anyhow::Result<InitFiles> {
    let files = InitFiles {
        root_cert: dir.join(CA_CERT),
        root_key: dir.join(ROOT_KEY),
        issuing_cert: dir.join(ISSUING_CERT),
        issuing_key: dir.join(ISSUING_KEY),
    };
    prepare_ca_dir(
        dir,
        trust_domain,
        force,
        &[
            &files.root_cert,
            &files.root_key,
            &files.issuing_cert,
            &files.issuing_key,
            &dir.join(CA_KEY),
        ],
    )?;
    let now = OffsetDateTime::now_utc();
    let root_params = ca_params(
        &format!("kt-fleet root CA ({trust_domain})"),
        trust_domain,
        1,
        now + Duration::days(CA_DAYS),
    )?;
    let root_key = KeyPair::generate()?;
    let root_cert = root_params.self_signed(&root_key)?;
    let mut issuing_params = ca_params(
        &format!("kt-fleet issuing CA ({trust_domain})"),
        trust_domain,
        0,
        now + Duration::days(ISSUING_DAYS),
    )?;
    issuing_params.use_authority_key_identifier_extension = true;
    let issuing_key = KeyPair::generate()?;
    let root = Issuer::new(root_params, root_key);
    let issuing_cert = issuing_params.signed_by(&issuing_key, &root)?;

    // A single CA's key left from before would keep signing beside the new issuing CA.
    let _ = std::fs::remove_file(dir.join(CA_KEY));
    write_private(&files.root_key, root.key().serialize_pem().as_bytes(), true)?;
    write_private(
        &files.issuing_key,
        issuing_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_public(&files.issuing_cert, issuing_cert.pem().as_bytes())?;
    write_public(&files.root_cert, root_cert.pem().as_bytes())?;
    Ok(files)
}

/// Creates a single CA, `dir/ca.crt` and `dir/ca.key`, that signs leaves directly: for the
/// private CAs of etcd and NATS. Refuses to replace an existing CA unless `force`.
pub fn init_ca(dir: &Path, trust_domain: &str, force: bool) -> anyhow::Result<PathBuf> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    prepare_ca_dir(dir, trust_domain, force, &[&cert_path, &key_path])?;
    let now = OffsetDateTime::now_utc();
    let params = ca_params(
        &format!("kt-fleet CA ({trust_domain})"),
        trust_domain,
        0,
        now + Duration::days(CA_DAYS),
    )?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;

    write_private(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(cert_path)
}

/// Checks the trust domain and that no CA would be replaced without `force`; makes `dir`.
fn prepare_ca_dir(
    dir: &Path,
    trust_domain: &str,
    force: bool,
    files: &[&Path],
) -> anyhow::Result<()> {
    validate_trust_domain(trust_domain)
        .map_err(|why| anyhow::anyhow!("invalid trust domain {trust_domain:?}: {why}"))?;
    if !force && files.iter().any(|f| f.exists()) {
        bail!(
            "{} already holds a CA; replacing it would invalidate every certificate it issued (use --force to replace it)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// A CA certificate's parameters: the trust domain as its URI SAN, `path_len` CA levels
/// allowed below it.
fn ca_params(
    name: &str,
    trust_domain: &str,
    path_len: u8,
    not_after: OffsetDateTime,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    params.not_after = not_after;
    Ok(params)
}

/// Reads the trust domain from a CA certificate's `spiffe://<trust-domain>` URI SAN.
pub fn trust_domain_of_ca(ca_pem: &str) -> anyhow::Result<String> {
    kt_proto::leaf::trust_domain_of_ca(ca_pem).map_err(|e| anyhow::anyhow!("CA certificate: {e}"))
}

/// Issues a leaf certificate signed by the CA in `dir`, written next to it.
pub fn issue(dir: &Path, role: &LeafRole, days: i64, force: bool) -> anyhow::Result<IssuedFiles> {
    if days <= 0 {
        bail!("--days must be positive");
    }
    // The issuing CA when there is one; a single CA signs directly.
    let two_tier = dir.join(ISSUING_KEY).exists();
    let (ca_cert_path, ca_key_path) = if two_tier {
        (dir.join(ISSUING_CERT), dir.join(ISSUING_KEY))
    } else {
        (dir.join(CA_CERT), dir.join(CA_KEY))
    };
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

    let (identity, stem, sans, usages) = match role {
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

    let now = OffsetDateTime::now_utc();
    let params = kt_proto::leaf::params(&identity, sans, usages, now, now + Duration::days(days))?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    write_private(&key_path, key.serialize_pem().as_bytes(), force)?;
    // The chain up to (not including) the root every peer pins.
    let chain = if two_tier {
        format!("{}{ca_pem}", cert.pem())
    } else {
        cert.pem()
    };
    write_public(&cert_path, chain.as_bytes())?;
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

        let coord =
            issue(dir.path(), &LeafRole::loopback_coordinator(), 30, false).expect("coordinator");
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
    fn two_tier_issues_leaves_through_the_issuing_ca_with_the_chain_in_the_file() {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let dir = tempfile::tempdir().expect("tempdir");
        let files = init(dir.path(), "example.org", false).expect("init");
        assert!(
            !dir.path().join(CA_KEY).exists(),
            "no key signs beside the issuing CA"
        );
        let agent = issue(
            dir.path(),
            &LeafRole::Agent {
                gateway: GatewayId::new("gw-1").expect("id"),
            },
            1,
            false,
        )
        .expect("agent");
        assert_eq!(
            identity_of_cert_file(&agent.cert).expect("read back").uri(),
            "spiffe://example.org/agent/gw-1"
        );
        let der = |path: &Path| -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_file_iter(path)
                .expect("pem")
                .collect::<Result<_, _>>()
                .expect("certs")
        };
        let chain = der(&agent.cert);
        assert_eq!(chain.len(), 2, "leaf, then the issuing CA");
        let root = der(&files.root_cert);
        assert_eq!(root.len(), 1);
        let parse = |d: &CertificateDer<'static>| {
            use x509_parser::prelude::FromDer;
            let (_, c) = x509_parser::prelude::X509Certificate::from_der(d).expect("parse");
            (
                c.subject().as_raw().to_vec(),
                c.issuer().as_raw().to_vec(),
                c.basic_constraints()
                    .ok()
                    .flatten()
                    .and_then(|b| b.value.path_len_constraint),
            )
        };
        let (leaf, issuing, root) = (parse(&chain[0]), parse(&chain[1]), parse(&root[0]));
        assert_eq!(leaf.1, issuing.0, "the leaf is signed by the issuing CA");
        assert_eq!(issuing.1, root.0, "the issuing CA is signed by the root");
        assert_eq!((issuing.2, root.2), (Some(0), Some(1)));
        for key in [files.root_key, files.issuing_key, agent.key] {
            let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        // A directory holding either shape refuses the other without --force.
        assert!(init_ca(dir.path(), "example.org", false).is_err());
        assert!(init(dir.path(), "example.org", false).is_err());
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
