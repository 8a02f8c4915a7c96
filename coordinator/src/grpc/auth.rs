//! Who is calling: the identity in the verified client certificate, never a request field.

use kt_proto::identity::{Identity, Role};

use super::ApiError;

/// Reads the caller's identity and checks its role and trust domain.
///
/// The TLS layer has already verified the chain against our CA; here we only read what the
/// certificate says and refuse anything that is not `role` in `trust_domain`.
pub fn authorize<T>(
    request: &tonic::Request<T>,
    trust_domain: &str,
    role: Role,
) -> Result<Identity, ApiError> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| ApiError::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| ApiError::Unauthenticated("a client certificate is required".into()))?;
    let identity = Identity::from_cert_der(leaf)
        .map_err(|e| ApiError::Unauthenticated(format!("client certificate: {e}")))?;
    if identity.trust_domain() != trust_domain {
        return Err(ApiError::PermissionDenied(format!(
            "{identity} is not in trust domain {trust_domain}"
        )));
    }
    if identity.role() != role {
        return Err(ApiError::PermissionDenied(format!(
            "{identity} has role {}, this service requires role {role}",
            identity.role()
        )));
    }
    Ok(identity)
}
