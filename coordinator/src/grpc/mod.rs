//! The coordinator's gRPC edge: authorization from certificates, the agent session and the
//! operator service. Protobuf types stop here; the fleet task sees domain commands.

pub mod agent;
pub mod auth;
pub mod operator;

use crate::fleet::{FleetClosed, UnknownGroup};

/// The one mapping from internal errors to gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    NotFound(#[from] UnknownGroup),
    #[error(transparent)]
    Unavailable(#[from] FleetClosed),
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        match error {
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            ApiError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
        }
    }
}
