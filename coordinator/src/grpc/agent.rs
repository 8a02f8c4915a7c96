//! `AgentService.Session`: the control stream of one agent.
//!
//! The first message must be a hello for the gateway named in the agent's certificate. The
//! session then forwards heartbeats and status to the fleet task until the stream ends; the
//! fleet task learns of the end, cleanly (goodbye) or not.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kt_proto::identity::{Identity, Role};
use kt_proto::v1::agent_message::Body as AgentBody;
use kt_proto::v1::agent_service_server::AgentService;
use kt_proto::v1::coordinator_message::Body as CoordinatorBody;
use kt_proto::v1::{AgentMessage, CoordinatorMessage, Welcome};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::ApiError;
use super::auth::authorize;
use crate::config::LivenessConfig;
use crate::fleet::{Command, FleetHandle, HelloInfo, SessionId};

/// How long an agent has to send its hello after opening a session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one agent before the session is considered stuck.
const OUTBOUND_QUEUE: usize = 16;

pub struct AgentApi {
    pub fleet: FleetHandle,
    pub trust_domain: String,
    pub liveness: LivenessConfig,
    pub cancel: CancellationToken,
    next_session: Arc<AtomicU64>,
}

impl AgentApi {
    pub fn new(
        fleet: FleetHandle,
        trust_domain: String,
        liveness: LivenessConfig,
        cancel: CancellationToken,
    ) -> Self {
        AgentApi {
            fleet,
            trust_domain,
            liveness,
            cancel,
            next_session: Arc::new(AtomicU64::new(1)),
        }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Agent)?;
        let Identity::Agent { gateway, .. } = identity else {
            return Err(ApiError::PermissionDenied("not an agent".into()).into());
        };
        let peer_address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| ApiError::InvalidArgument("no hello within 10s".into()))??;
        let hello = match first.and_then(|m| m.body) {
            Some(AgentBody::Hello(hello)) => hello,
            _ => {
                return Err(
                    ApiError::InvalidArgument("the first message must be a hello".into()).into(),
                );
            }
        };
        if hello.gateway_id != gateway.as_str() {
            tracing::warn!(gateway_id = %gateway, claimed = %hello.gateway_id, "agent claimed another gateway id");
            return Err(ApiError::PermissionDenied(format!(
                "agent certificate is for gateway {gateway}, hello claims {:?}",
                hello.gateway_id
            ))
            .into());
        }

        let session: SessionId = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.fleet
            .send(Command::Connected {
                gateway: gateway.clone(),
                session,
                hello: HelloInfo {
                    labels: hello.labels.into_iter().collect(),
                    agent_version: hello.agent_version,
                    boot_id: hello.boot_id,
                    health: hello.health,
                    peer_address,
                },
            })
            .await
            .map_err(ApiError::from)?;

        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let welcome = CoordinatorMessage {
            body: Some(CoordinatorBody::Welcome(Welcome {
                coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
                heartbeat_interval_ms: duration_ms(self.liveness.heartbeat_interval),
                liveness_timeout_ms: duration_ms(self.liveness.unreachable_after),
                capabilities: Vec::new(),
            })),
        };
        // The queue is empty, so this cannot fail for lack of room.
        let _ = outbound.try_send(Ok(welcome));

        let fleet = self.fleet.clone();
        let cancel = self.cancel.clone();
        let span = tracing::info_span!("agent_session", gateway_id = %gateway, session);
        tokio::spawn(
            async move {
                let clean = tokio::select! {
                    clean = read_session(&fleet, &gateway, session, &mut inbound) => clean,
                    _ = cancel.cancelled() => false,
                };
                // Dropping `outbound` here ends the response stream.
                drop(outbound);
                let _ = fleet
                    .send(Command::Ended {
                        gateway,
                        session,
                        clean,
                    })
                    .await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound_rx))))
    }
}

/// Forwards messages until the stream ends; returns whether the agent said goodbye.
async fn read_session(
    fleet: &FleetHandle,
    gateway: &kt_proto::identity::GatewayId,
    session: SessionId,
    inbound: &mut Streaming<AgentMessage>,
) -> bool {
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return false,
            Err(status) => {
                tracing::debug!(error = %status, "agent stream broke");
                return false;
            }
        };
        let command = match message.body {
            Some(AgentBody::Heartbeat(hb)) => Command::Heartbeat {
                gateway: gateway.clone(),
                session,
                requests_processed: hb.requests_processed,
            },
            Some(AgentBody::Status(status)) => match status.health {
                Some(health) => Command::Status {
                    gateway: gateway.clone(),
                    session,
                    health,
                },
                None => continue,
            },
            Some(AgentBody::Goodbye(bye)) => {
                tracing::info!(reason = %bye.reason, "agent said goodbye");
                return true;
            }
            Some(AgentBody::Hello(_)) => {
                tracing::warn!("second hello on one session ignored");
                continue;
            }
            None => continue,
        };
        if fleet.send(command).await.is_err() {
            return false;
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
