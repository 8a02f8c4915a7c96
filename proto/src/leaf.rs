//! What a leaf certificate says, whoever signs it (`ktctl pki issue`, the coordinator enrolling
//! or renewing an agent), and how an agent asks for one: a key made where it is used and a CSR
//! that carries only its public key.

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::identity::Identity;

/// How far before its issue a certificate's validity starts, so a peer whose clock is behind
/// the signer's (by up to this much) does not see it as not yet valid.
pub const BACKDATE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// The certificate of `identity`: its URI as common name and URI SAN (after `sans`), not a CA,
/// signing only, for `usages`, valid from [`BACKDATE`] before `issued` to `not_after`.
pub fn params(
    identity: &Identity,
    mut sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    issued: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
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
    params.not_before = issued - BACKDATE;
    params.not_after = not_after;
    Ok(params)
}

/// A fresh private key (PEM) and a certificate signing request for it (PEM). The request names
/// nothing: the signer decides what the certificate says.
pub fn key_and_csr() -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// `sha256:<hex>` of a certificate's DER: how an operator pins the CA a new agent trusts.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Reads `sha256:<64 hex>` (case-insensitive, colons between bytes allowed, as `openssl x509
/// -fingerprint` prints them) into the canonical form [`fingerprint`] gives.
pub fn parse_fingerprint(text: &str) -> Result<String, String> {
    let hex = text
        .trim()
        .strip_prefix("sha256:")
        .or_else(|| text.trim().strip_prefix("SHA256:"))
        .ok_or_else(|| format!("{text:?}: a CA fingerprint starts with sha256:"))?;
    let hex: String = hex.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?}: a sha256 fingerprint has 64 hexadecimal digits"
        ));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// The trust domain a CA certificate names in its `spiffe://<trust-domain>` URI SAN.
pub fn trust_domain_of_ca(ca_pem: &str) -> Result<String, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| format!("cannot be parsed: {e}"))?;
    if !cert.is_ca() {
        return Err("not a CA certificate".into());
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("subject alternative names: {e}"))?;
    san.into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri
                .strip_prefix("spiffe://")
                .filter(|td| !td.contains('/'))
                .map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| {
            "no spiffe://<trust-domain> URI SAN (was it made by `ktctl pki init`?)".to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_in_the_forms_tools_print() {
        let canonical = fingerprint(b"certificate");
        assert_eq!(parse_fingerprint(&canonical), Ok(canonical.clone()));
        let hex = canonical.trim_start_matches("sha256:").to_ascii_uppercase();
        let openssl_style: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).into_owned())
            .collect();
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{}", openssl_style.join(":"))),
            Ok(canonical)
        );
        assert!(parse_fingerprint("md5:abcd").is_err());
        assert!(parse_fingerprint("sha256:abcd").is_err());
        assert!(parse_fingerprint(&format!("sha256:{}", "g".repeat(64))).is_err());
    }

    #[test]
    fn a_csr_carries_a_public_key_its_own_key_signed() {
        let (key, csr) = key_and_csr().expect("csr");
        assert!(key.contains("PRIVATE KEY"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).expect("parses");
        let key = KeyPair::from_pem(&key).expect("key");
        use rcgen::PublicKeyData;
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
    }
}
