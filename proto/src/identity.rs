//! SPIFFE-style identities carried as URI SANs in leaf certificates.
//!
//! `spiffe://<trust-domain>/agent/<gateway-id>`, `spiffe://<trust-domain>/coordinator`,
//! `spiffe://<trust-domain>/operator/<name>`. The coordinator derives a caller's identity from
//! its verified certificate only, never from a field the caller sends.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Replacements of a gateway's open session by another agent process (another boot id) within
/// ten minutes from which two agents are taken to share its certificate; one is a restart whose
/// old session was still open. The coordinator counts (`GatewayState.session_replacements`),
/// operators' tools judge by this.
pub const DUPLICATE_AGENT_REPLACEMENTS: u32 = 2;

/// What a certificate allows its holder to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Coordinator,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Coordinator => "coordinator",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gateway's id: what an agent may speak for, and the key of all per-gateway state.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayId(String);

impl TryFrom<String> for GatewayId {
    type Error = IdentityError;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        GatewayId::new(&id)
    }
}

impl From<GatewayId> for String {
    fn from(id: GatewayId) -> Self {
        id.0
    }
}

impl GatewayId {
    /// Accepts 1-63 characters of `[a-z0-9._-]`, starting with a letter or digit, so an id is
    /// safe in a URI, a file name and a metric label.
    pub fn new(id: &str) -> Result<Self, IdentityError> {
        validate_name(id).map_err(|why| IdentityError::BadName {
            name: id.to_owned(),
            why,
        })?;
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A verified peer identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Agent {
        trust_domain: String,
        gateway: GatewayId,
    },
    Coordinator {
        trust_domain: String,
    },
    Operator {
        trust_domain: String,
        name: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeUri,
    #[error("certificate has more than one spiffe:// URI SAN")]
    SeveralSpiffeUris,
    #[error("malformed identity {uri:?}: {why}")]
    Malformed { uri: String, why: &'static str },
    #[error("invalid name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
}

impl Identity {
    pub fn agent(trust_domain: &str, gateway: GatewayId) -> Self {
        Identity::Agent {
            trust_domain: trust_domain.to_owned(),
            gateway,
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Identity::Agent { .. } => Role::Agent,
            Identity::Coordinator { .. } => Role::Coordinator,
            Identity::Operator { .. } => Role::Operator,
        }
    }

    pub fn trust_domain(&self) -> &str {
        match self {
            Identity::Agent { trust_domain, .. }
            | Identity::Coordinator { trust_domain }
            | Identity::Operator { trust_domain, .. } => trust_domain,
        }
    }

    /// The SPIFFE URI that encodes this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Agent {
                trust_domain,
                gateway,
            } => format!("spiffe://{trust_domain}/agent/{gateway}"),
            Identity::Coordinator { trust_domain } => {
                format!("spiffe://{trust_domain}/coordinator")
            }
            Identity::Operator { trust_domain, name } => {
                format!("spiffe://{trust_domain}/operator/{name}")
            }
        }
    }

    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = |why| IdentityError::Malformed {
            uri: uri.to_owned(),
            why,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| malformed("not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let trust_domain = parts.next().unwrap_or_default();
        validate_trust_domain(trust_domain).map_err(malformed)?;
        let trust_domain = trust_domain.to_owned();
        let kind = parts.next().ok_or_else(|| malformed("no role in path"))?;
        let name = parts.next();
        if parts.next().is_some() {
            return Err(malformed("too many path segments"));
        }
        match (kind, name) {
            ("agent", Some(id)) => Ok(Identity::Agent {
                trust_domain,
                gateway: GatewayId::new(id)?,
            }),
            ("coordinator", None) => Ok(Identity::Coordinator { trust_domain }),
            ("operator", Some(name)) => {
                validate_name(name).map_err(|why| IdentityError::BadName {
                    name: name.to_owned(),
                    why,
                })?;
                Ok(Identity::Operator {
                    trust_domain,
                    name: name.to_owned(),
                })
            }
            ("agent" | "operator", None) => Err(malformed("role needs a name")),
            ("coordinator", Some(_)) => Err(malformed("coordinator takes no name")),
            _ => Err(malformed("unknown role")),
        }
    }

    /// Reads the single spiffe:// URI SAN of a DER certificate.
    ///
    /// The certificate must already be verified (by the TLS handshake or against the CA):
    /// this only reads what it says.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let mut uris = san
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            });
        let uri = uris.next().ok_or(IdentityError::NoSpiffeUri)?;
        if uris.next().is_some() {
            return Err(IdentityError::SeveralSpiffeUris);
        }
        Identity::parse_uri(uri)
    }
}

/// When a DER certificate stops being valid, in Unix ms; `None` when it cannot be read.
pub fn not_after_unix_ms(der: &[u8]) -> Option<u64> {
    validity_unix_ms(der).map(|(_, not_after)| not_after)
}

/// A certificate's validity period (not before, not after) in Unix milliseconds.
pub fn validity_unix_ms(der: &[u8]) -> Option<(u64, u64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let ms = |seconds: i64| u64::try_from(seconds).ok().map(|s| s.saturating_mul(1000));
    let validity = cert.validity();
    Some((
        ms(validity.not_before.timestamp())?,
        ms(validity.not_after.timestamp())?,
    ))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only lowercase letters, digits, '-', '_' and '.' are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or digit");
    }
    Ok(())
}

/// Checks a trust domain: a DNS-like name (lowercase letters, digits, '-', '.').
pub fn validate_trust_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() || domain.len() > 253 {
        return Err("trust domain must be 1 to 253 characters");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
    {
        return Err("trust domain allows only lowercase letters, digits, '-' and '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        for uri in [
            "spiffe://kt.local/agent/gw-prod-01",
            "spiffe://kt.local/coordinator",
            "spiffe://example.org/operator/alice",
        ] {
            let id = Identity::parse_uri(uri).expect(uri);
            assert_eq!(id.uri(), uri);
        }
    }

    #[test]
    fn bad_uris_are_refused() {
        for uri in [
            "https://kt.local/agent/gw",
            "spiffe://kt.local/agent",
            "spiffe://kt.local/agent/GW",
            "spiffe://kt.local/agent/gw/extra",
            "spiffe://kt.local/coordinator/x",
            "spiffe://kt.local/admin/x",
            "spiffe:///agent/gw",
            "spiffe://KT/agent/gw",
            "spiffe://kt.local/operator/-x",
        ] {
            assert!(Identity::parse_uri(uri).is_err(), "{uri} should be refused");
        }
    }

    #[test]
    fn role_of_each_identity() {
        let agent = Identity::parse_uri("spiffe://d/agent/gw-1").expect("valid");
        assert_eq!(agent.role(), Role::Agent);
        assert_eq!(agent.trust_domain(), "d");
        let op = Identity::parse_uri("spiffe://d/operator/bob").expect("valid");
        assert_eq!(op.role(), Role::Operator);
    }
}
