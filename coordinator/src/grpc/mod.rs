//! The coordinator's gRPC edge: authorization from certificates, the agent session and the
//! operator service. Protobuf types stop here; the fleet task sees domain commands.

pub mod agent;
pub mod auth;
pub mod enrollment;
pub mod operator;
pub mod paging;
pub mod rollout_view;
pub mod shadow;

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::fleet::{FleetClosed, UnknownGroup};
use crate::rollout::engine::EngineError;
use crate::store::StoreError;

/// Runs the work behind a response stream in its own task, until it ends or the coordinator
/// shuts down (which ends the stream, so graceful shutdown need not wait for the client).
pub fn spawn_until_cancelled(
    cancel: CancellationToken,
    work: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = work => {}
            _ = cancel.cancelled() => {}
        }
    });
}

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
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    /// The gateway's agent has no open session to carry the request.
    #[error("{0}")]
    NotConnected(String),
    #[error("{0}")]
    TimedOut(String),
    /// Replicated control plane: etcd or the leader cannot be reached now; try again.
    #[error("{0}")]
    Degraded(String),
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Invalid(m) => ApiError::InvalidArgument(m),
            EngineError::NotFound(m) => ApiError::Missing(m),
            EngineError::Conflict(m) => ApiError::Conflict(m),
            EngineError::Store(e) => ApiError::from(e),
            EngineError::Closed => ApiError::Unavailable(FleetClosed),
            EngineError::NoLeader(m) => ApiError::Degraded(m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) | StoreError::Fenced(_) => {
                ApiError::Degraded(error.to_string())
            }
            StoreError::Failed(_) => ApiError::Internal(error.to_string()),
        }
    }
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
            ApiError::Missing(_) => tonic::Status::not_found(message),
            ApiError::Conflict(_) => tonic::Status::failed_precondition(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
            ApiError::NotConnected(_) => tonic::Status::unavailable(message),
            ApiError::TimedOut(_) => tonic::Status::deadline_exceeded(message),
            ApiError::Degraded(_) => tonic::Status::unavailable(message),
        }
    }
}
