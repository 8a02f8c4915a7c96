//! `AgentService.Session`: the control stream of one agent.
//!
//! The first message must be a hello for the gateway named in the agent's certificate. The
//! session then forwards heartbeats and status to the fleet task, and config answers to the
//! rollout engine, until the stream ends; the fleet task learns of the end, cleanly (goodbye)
//! or not. Config offers reach the agent through the outbound channel the fleet task holds.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kt_contract::MAX_EVENT_BYTES;
use kt_daemon::unix_ms_now;
use kt_proto::bounds;
use kt_proto::identity::{GatewayId, Identity, Role};
use kt_proto::v1::agent_message::Body as AgentBody;
use kt_proto::v1::agent_service_server::AgentService;
use kt_proto::v1::coordinator_message::Body as CoordinatorBody;
use kt_proto::v1::{self, AgentMessage, ConfigPhase, CoordinatorMessage, Welcome};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::auth::authorize;
use super::{ApiError, spawn_until_cancelled};
use crate::config::LivenessConfig;
use crate::events::EventLog;
use crate::events::store::Batch;
use crate::fleet::{Command, FleetHandle, HelloInfo, SessionId};
use crate::metrics::{Metrics, ResultLabels};
use crate::probes::Probes;
use crate::revocations::Revocations;
use crate::rollout::engine::EngineHandle;
use crate::rollout::plan::{MAX_CONFIG_BYTES, content_hash, version_label};
use crate::store::{Store, StoredConfig};
use kt_proto::v1::{EventAck, EventBatch};

/// How long an agent has to send its hello after opening a session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one agent before offers to it are refused.
const OUTBOUND_QUEUE: usize = 16;

pub struct AgentApi {
    pub fleet: FleetHandle,
    pub engine: EngineHandle,
    pub store: Arc<dyn Store>,
    pub events: Arc<dyn EventLog>,
    pub probes: Probes,
    pub metrics: Arc<Metrics>,
    pub trust_domain: String,
    pub liveness: LivenessConfig,
    pub cancel: CancellationToken,
    /// Numbers sessions, so a stale session's end cannot touch a newer one.
    pub next_session: Arc<AtomicU64>,
    /// Hashes of running configs already stored (or being stored): a hello with one of them
    /// writes nothing.
    pub known_configs: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Signs renewals; none when this coordinator has no `enrollment:`.
    pub issuer: Option<Arc<crate::issuer::AgentIssuer>>,
    pub revocations: Revocations,
    pub renewal_refusals: crate::issuer::RenewalRefusals,
    /// The CA bundle sent with a renewed certificate (the coordinator's `tls.ca`).
    pub ca_file: std::path::PathBuf,
}

/// Running-config hashes remembered at most; past this the set starts over (a store write with
/// the same bytes keeps the first record, so forgetting only costs a write).
const MAX_KNOWN_CONFIGS: usize = 10_000;

impl AgentApi {
    fn refusals(&self) -> Refusals {
        Refusals {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        }
    }

    fn refuse(&self, gateway: &GatewayId, peer: &str, refused: &bounds::OutOfBounds) {
        self.refusals().refuse(gateway, peer, refused);
    }

    /// Keeps the bytes of the config an agent says its gateway runs, so a rollback can return
    /// to it. Only well-formed configs within the size limit are kept. The (fsync'd) write runs
    /// on a blocking thread, off the connect path, and only for a config not stored yet.
    fn remember_running_config(&self, gateway: &GatewayId, identity: &Identity, content: Vec<u8>) {
        if content.is_empty() || content.len() > MAX_CONFIG_BYTES {
            return;
        }
        let hash = content_hash(&content);
        {
            let mut known = self.known_configs.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() >= MAX_KNOWN_CONFIGS {
                known.clear();
            }
            if !known.insert(hash.clone()) {
                return;
            }
        }
        let Ok(version) = version_label(&content) else {
            return;
        };
        let stored = StoredConfig {
            hash,
            version,
            content,
            author: identity.uri(),
            created_at_unix_ms: unix_ms_now(),
            message: format!("observed running on {gateway}"),
        };
        let (store, known, gateway) = (
            self.store.clone(),
            self.known_configs.clone(),
            gateway.clone(),
        );
        tokio::spawn(async move {
            if let Err(error) = store.put_config(&stored).await {
                tracing::warn!(gateway_id = %gateway, %error, "cannot keep the running config");
                // Not stored: a later hello tries again.
                known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&stored.hash);
            }
        });
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;
type AckStream = Pin<Box<dyn Stream<Item = Result<EventAck, Status>> + Send>>;

/// Batches an agent may send ahead of acknowledgements.
const EVENT_CREDIT: u32 = 8;
/// The largest epoch or sequence number (what SQLite stores as a signed integer).
const MAX_SEQ: u64 = i64::MAX as u64;
/// Limits of one batch; larger ones end the stream with an error.
const MAX_BATCH_EVENTS: usize = 10_000;

/// Checks a batch from the network before it reaches the store.
fn check_batch(batch: &EventBatch) -> Result<(), String> {
    if batch.epoch == 0 || batch.first_seq == 0 {
        return Err("epoch and sequence numbers start at 1".into());
    }
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(format!("a batch holds at most {MAX_BATCH_EVENTS} events"));
    }
    // Stored as SQLite integers: past i64::MAX a number would wrap and look like a duplicate.
    let last = match &batch.gap {
        Some(gap) => Some(gap.last_seq),
        None => batch
            .first_seq
            .checked_add(batch.events.len().saturating_sub(1) as u64),
    };
    if batch.epoch > MAX_SEQ || last.is_none_or(|last| last > MAX_SEQ) {
        return Err(format!(
            "epoch and sequence numbers must stay at or below {MAX_SEQ}"
        ));
    }
    if batch.events.iter().any(|e| e.len() > MAX_EVENT_BYTES) {
        return Err(format!("an event is larger than {MAX_EVENT_BYTES} bytes"));
    }
    match &batch.gap {
        Some(gap)
            if !batch.events.is_empty()
                || gap.first_seq != batch.first_seq
                || gap.last_seq < gap.first_seq =>
        {
            Err("a gap batch carries only a well-formed gap starting at first_seq".into())
        }
        None if batch.events.is_empty() => Err("an empty batch".into()),
        _ => Ok(()),
    }
}

/// Tells the event log when an agent's event stream ends, however it ends.
struct EventsEnded {
    log: Arc<dyn EventLog>,
    gateway: String,
}

impl Drop for EventsEnded {
    fn drop(&mut self) {
        self.log.session_ended(&self.gateway);
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;
    type EventsStream = AckStream;

    async fn events(
        &self,
        request: Request<Streaming<EventBatch>>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Agent)?;
        let Identity::Agent { gateway, .. } = identity else {
            return Err(ApiError::PermissionDenied("not an agent".into()).into());
        };
        if let Some(revoked) = self.revocations.get(gateway.as_str()) {
            return Err(ApiError::PermissionDenied(revoked.refusal()).into());
        }
        let fleet = self.fleet.clone();
        let revocations = self.revocations.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(EVENT_CREDIT as usize);
        let store = self.events.clone();
        let cancel = self.cancel.clone();
        let span = tracing::info_span!("agent_events", gateway_id = %gateway);
        spawn_until_cancelled(
            cancel,
            async move {
                let _ended = EventsEnded {
                    log: store.clone(),
                    gateway: gateway.to_string(),
                };
                // The region comes from the agent's hello, which may arrive after this stream opens.
                let mut region = String::new();
                loop {
                    let next = tokio::select! {
                        next = inbound.message() => next,
                        revoked = revocations.revoked(gateway.as_str()) => {
                            let _ = tx.try_send(Err(Status::permission_denied(revoked.refusal())));
                            return;
                        }
                    };
                    let batch = match next {
                        Ok(Some(batch)) => batch,
                        Ok(None) => return,
                        Err(status) => {
                            // A batch over the message limit ends here too: say why, so the
                            // agent's log names the problem instead of a bare reset.
                            tracing::warn!(error = %status, "events stream ended by an error");
                            let why = format!("events stream ended: {}", status.message());
                            let _ = tx.try_send(Err(Status::new(status.code(), why)));
                            return;
                        }
                    };
                    if let Err(why) = check_batch(&batch) {
                        tracing::warn!(%why, "refused an event batch");
                        let _ = tx.send(Err(Status::invalid_argument(why))).await;
                        return;
                    }
                    if region.is_empty() {
                        region = region_of(&fleet, gateway.as_str()).await;
                    }
                    let batch = Batch::new(
                        gateway.to_string(),
                        region.clone(),
                        batch.epoch,
                        batch.first_seq,
                        batch.events,
                        batch.gap,
                    );
                    let epoch = batch.epoch;
                    let through = batch.last_seq();
                    if let Err(error) = store.ingest(batch).await {
                        let _ = tx.send(Err(Status::unavailable(error))).await;
                        return;
                    }
                    let ack = EventAck {
                        epoch,
                        durable_through_seq: through,
                        credit: EVENT_CREDIT,
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(
        &self,
        request: Request<v1::CertificateRequest>,
    ) -> Result<Response<v1::IssuedCertificate>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Agent)?;
        let Identity::Agent { gateway, .. } = identity else {
            return Err(ApiError::PermissionDenied("not an agent".into()).into());
        };
        let result = self.renew_for(&gateway, &request.into_inner().csr_pem);
        let label = if result.is_ok() { "renewed" } else { "refused" };
        self.metrics
            .certificate_renewals
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok(issued) => {
                self.renewal_refusals.renewed(gateway.as_str());
                tracing::info!(gateway_id = %gateway, lifetime_ms = issued.lifetime_ms, "agent certificate renewed");
                Ok(Response::new(issued))
            }
            Err(error) => {
                tracing::warn!(gateway_id = %gateway, %error, "agent certificate renewal refused");
                self.renewal_refusals
                    .refused(gateway.as_str(), unix_ms_now(), error.to_string());
                Err(error.into())
            }
        }
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Agent)?;
        let Identity::Agent { gateway, .. } = identity.clone() else {
            return Err(ApiError::PermissionDenied("not an agent".into()).into());
        };
        if let Some(revoked) = self.revocations.get(gateway.as_str()) {
            tracing::warn!(gateway_id = %gateway, "session refused: the gateway is revoked");
            return Err(ApiError::PermissionDenied(revoked.refusal()).into());
        }
        let (cert_not_before_unix_ms, cert_not_after_unix_ms) = request
            .peer_certs()
            .and_then(|certs| {
                certs
                    .first()
                    .and_then(|leaf| kt_proto::identity::validity_unix_ms(leaf))
            })
            .unwrap_or((0, 0));
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
        if let Err(refused) = bounds::check_hello(&hello) {
            self.refuse(&gateway, &peer_address, &refused);
            return Err(ApiError::InvalidArgument(format!("hello refused: {refused}")).into());
        }
        if hello.gateway_id != gateway.as_str() {
            tracing::warn!(gateway_id = %gateway, claimed = %hello.gateway_id, "agent claimed another gateway id");
            return Err(ApiError::PermissionDenied(format!(
                "agent certificate is for gateway {gateway}, hello claims {:?}",
                hello.gateway_id
            ))
            .into());
        }
        self.remember_running_config(&gateway, &identity, hello.running_config);

        let session: SessionId = self.next_session.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let welcome = CoordinatorMessage {
            body: Some(CoordinatorBody::Welcome(Welcome {
                coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
                heartbeat_interval_ms: duration_ms(self.liveness.heartbeat_interval),
                liveness_timeout_ms: duration_ms(self.liveness.unreachable_after),
                capabilities: Vec::new(),
                reconnect_spread_ms: duration_ms(self.liveness.reconnect_spread),
            })),
        };
        // The queue is empty, so this cannot fail for lack of room; the welcome goes first.
        let _ = outbound.try_send(Ok(welcome));
        self.fleet
            .send(Command::Connected {
                gateway: gateway.clone(),
                session,
                hello: HelloInfo {
                    labels: hello.labels.into_iter().collect(),
                    agent_version: hello.agent_version,
                    capabilities: hello.capabilities,
                    boot_id: hello.boot_id,
                    health: hello.health,
                    peer_address: peer_address.clone(),
                    cert_not_after_unix_ms,
                    cert_not_before_unix_ms,
                },
                outbound: outbound.clone(),
                replaced: replaced.clone(),
            })
            .await
            .map_err(ApiError::from)?;

        let fleet = self.fleet.clone();
        let engine = self.engine.clone();
        let probes = self.probes.clone();
        let cancel = self.cancel.clone();
        let api = self.refusals();
        let revocations = self.revocations.clone();
        let span = tracing::info_span!("agent_session", gateway_id = %gateway, session);
        tokio::spawn(
            async move {
                let end = tokio::select! {
                    end = read_session(&fleet, &engine, &probes, &api.metrics, &gateway, session, &mut inbound) => end,
                    _ = replaced.cancelled() => SessionEnd::Replaced,
                    revoked = revocations.revoked(gateway.as_str()) => SessionEnd::Revoked(revoked),
                    _ = cancel.cancelled() => SessionEnd::Broke,
                };
                match &end {
                    SessionEnd::Refused(refused) => {
                        api.refuse(&gateway, &peer_address, refused);
                        let status = Status::invalid_argument(format!("message refused: {refused}"));
                        let _ = outbound.try_send(Err(status));
                    }
                    SessionEnd::Replaced => {
                        tracing::warn!(%peer_address, "session replaced by a newer session for the same gateway");
                        // The agent reconnects when told; if two agents share this certificate,
                        // `gateway health` and `doctor` show their sessions replacing each other.
                        let status = Status::aborted(format!(
                            "replaced by a newer session for gateway {gateway}; if another agent uses this certificate, stop one of them"
                        ));
                        let _ = outbound.try_send(Err(status));
                    }
                    SessionEnd::Revoked(revoked) => {
                        tracing::warn!(%peer_address, by = %revoked.by, "session closed: the gateway was revoked");
                        let _ = outbound.try_send(Err(Status::permission_denied(revoked.refusal())));
                    }
                    SessionEnd::Goodbye | SessionEnd::Broke => {}
                }
                let clean = matches!(end, SessionEnd::Goodbye);
                // The fleet task drops its copy on `Ended`; then the response stream ends.
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

impl AgentApi {
    /// A new certificate for `gateway`, unless it is revoked or nothing here signs.
    fn renew_for(
        &self,
        gateway: &GatewayId,
        csr_pem: &[u8],
    ) -> Result<v1::IssuedCertificate, ApiError> {
        if let Some(revoked) = self.revocations.get(gateway.as_str()) {
            return Err(ApiError::PermissionDenied(revoked.refusal()));
        }
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            ApiError::Missing(
                "this coordinator does not renew agent certificates (its config has no enrollment: section)".into(),
            )
        })?;
        issuer
            .sign(gateway, csr_pem)
            .map_err(ApiError::InvalidArgument)?
            .answer(gateway, &self.ca_file, None)
            .map_err(ApiError::Internal)
    }
}

/// How a session's inbound stream ended.
enum SessionEnd {
    Goodbye,
    Broke,
    /// A newer session of the same gateway took over.
    Replaced,
    /// An operator revoked the gateway.
    Revoked(crate::revocations::AgentRevocation),
    /// A message out of bounds: the session is ended with its reason.
    Refused(bounds::OutOfBounds),
}

/// What refusing an agent's message needs, apart from the API.
struct Refusals {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Refusals {
    /// Logs, counts and audits a message refused for a field out of bounds.
    fn refuse(&self, gateway: &GatewayId, peer: &str, refused: &bounds::OutOfBounds) {
        tracing::warn!(gateway_id = %gateway, %peer, %refused, "agent message refused");
        self.metrics.agent_messages_refused.inc();
        let who = format!("agent/{gateway}");
        let detail = format!("from {peer}: {refused}");
        let (store, gateway) = (self.store.clone(), gateway.to_string());
        // Audited beside the session, which ends now whatever the store says.
        tokio::spawn(async move {
            let at = unix_ms_now();
            let audited = store.audit(at, &who, "message refused", &gateway, &detail);
            if let Err(error) = audited.await {
                tracing::warn!(%error, "cannot audit a refused agent message");
            }
        });
    }
}

/// Forwards messages until the stream ends.
async fn read_session(
    fleet: &FleetHandle,
    engine: &EngineHandle,
    probes: &Probes,
    metrics: &Metrics,
    gateway: &GatewayId,
    session: SessionId,
    inbound: &mut Streaming<AgentMessage>,
) -> SessionEnd {
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return SessionEnd::Broke,
            Err(status) => {
                tracing::debug!(error = %status, "agent stream broke");
                return SessionEnd::Broke;
            }
        };
        if let Some(Err(refused)) = message.body.as_ref().map(bounds::check) {
            return SessionEnd::Refused(refused);
        }
        let command = match message.body {
            Some(AgentBody::Heartbeat(hb)) => {
                metrics.heartbeats.inc();
                Command::Heartbeat {
                    gateway: gateway.clone(),
                    session,
                    requests_processed: hb.requests_processed,
                    verdicts: hb.verdicts,
                    errors: hb.errors,
                    events: hb.events,
                    received: tokio::time::Instant::now(),
                }
            }
            Some(AgentBody::Status(status)) => match status.health {
                Some(health) => Command::Status {
                    gateway: gateway.clone(),
                    session,
                    health,
                },
                None => continue,
            },
            Some(AgentBody::ConfigStatus(status)) => {
                let result = ConfigPhase::label_of(status.phase);
                metrics
                    .config_applies
                    .get_or_create(&ResultLabels { result })
                    .inc();
                engine.answer(gateway.to_string(), status).await;
                continue;
            }
            Some(AgentBody::ProbeResult(result)) => {
                if !probes.answer(gateway, result) {
                    tracing::debug!("probe answer nobody waits for (timed out, or not ours)");
                }
                continue;
            }
            Some(AgentBody::Goodbye(bye)) => {
                tracing::info!(reason = %bye.reason, "agent said goodbye");
                return SessionEnd::Goodbye;
            }
            Some(AgentBody::Hello(_)) => {
                tracing::warn!("second hello on one session ignored");
                continue;
            }
            None => continue,
        };
        if fleet.send(command).await.is_err() {
            return SessionEnd::Broke;
        }
    }
}

async fn region_of(fleet: &FleetHandle, gateway: &str) -> String {
    match fleet.list(None).await {
        Ok(Ok(gateways)) => gateways
            .into_iter()
            .find(|g| g.gateway_id == gateway)
            .and_then(|g| g.labels.get("region").cloned())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(epoch: u64, first_seq: u64, n: usize) -> EventBatch {
        EventBatch {
            epoch,
            first_seq,
            events: vec![b"{}".to_vec(); n],
            gap: None,
        }
    }

    #[test]
    fn sequence_numbers_that_would_wrap_are_refused() {
        assert!(check_batch(&batch(1, 1, 3)).is_ok());
        assert!(check_batch(&batch(1, MAX_SEQ - 2, 3)).is_ok());
        assert!(check_batch(&batch(1, MAX_SEQ - 1, 3)).is_err());
        assert!(check_batch(&batch(1, u64::MAX, 2)).is_err());
        assert!(check_batch(&batch(u64::MAX, 1, 1)).is_err());
        let mut gap = batch(1, 5, 0);
        gap.gap = Some(kt_proto::v1::EventGap {
            first_seq: 5,
            last_seq: u64::MAX,
            count: 1,
            reason: String::new(),
        });
        assert!(check_batch(&gap).is_err());
    }
}
