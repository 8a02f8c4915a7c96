//! `EnrollmentService.Enroll`: a new agent, with a join token and a CSR for a key it made,
//! gets its certificate. The only RPC served to callers without a client certificate; the
//! token is its credential. Every refusal says which check failed and is audited.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kt_daemon::unix_ms_now;
use kt_proto::identity::GatewayId;
use kt_proto::v1;
use kt_proto::v1::enrollment_service_server::EnrollmentService;
use tonic::{Code, Request, Response, Status};

use crate::fleet::FleetHandle;
use crate::issuer::AgentIssuer;
use crate::revocations::Revocations;
use crate::store::Store;
use crate::tokens::{self, WRONG_TOKEN};

/// How often a token taken by a concurrent enrollment is read again before giving up.
const TOKEN_RACE_RETRIES: usize = 8;
/// Refusals audited per window at most: anyone can ask to enroll, so a flood of bad tokens
/// must not grow the audit log without bound. The rest are logged (rate-limited) and counted.
const AUDITED_REFUSALS: u32 = 20;
const AUDIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

pub struct EnrollmentApi {
    /// None: this coordinator has no `enrollment:` and enrolls nobody.
    pub issuer: Option<Arc<AgentIssuer>>,
    pub store: Arc<dyn Store>,
    pub fleet: FleetHandle,
    pub revocations: Revocations,
    /// The CA bundle agents get (the coordinator's `tls.ca`), read at each answer so a new
    /// bundle reaches agents at their next renewal.
    pub ca_file: PathBuf,
    /// Binding a gateway to a group rewrites the group's list: one at a time.
    pub binding: tokio::sync::Mutex<()>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Refusals audited in the current window.
    pub audited_refusals: std::sync::Mutex<AuditWindow>,
}

/// At most [`AUDITED_REFUSALS`] per [`AUDIT_WINDOW`].
#[derive(Debug)]
pub struct AuditWindow {
    start: std::time::Instant,
    used: u32,
}

impl AuditWindow {
    pub fn new(now: std::time::Instant) -> Self {
        AuditWindow {
            start: now,
            used: 0,
        }
    }

    /// Whether one more fits at `now`.
    fn admit(&mut self, now: std::time::Instant) -> bool {
        if now.duration_since(self.start) >= AUDIT_WINDOW {
            *self = AuditWindow::new(now);
        }
        self.used += 1;
        self.used <= AUDITED_REFUSALS
    }
}

/// A refusal: the gRPC code and what the agent is told (and the audit records).
struct Refused(Code, String);

impl From<Refused> for Status {
    fn from(Refused(code, message): Refused) -> Self {
        Status::new(code, message)
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::IssuedCertificate>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown peer".to_owned(), |a| a.to_string());
        let request = request.into_inner();
        let token_id = tokens::parse(&request.token)
            .map(|(id, _)| id.to_owned())
            .unwrap_or_default();
        let asked = request.gateway_id.clone();
        match self.enroll(request).await {
            Ok((issued, admitted)) => {
                let target = admitted.gateway.to_string();
                let detail = format!(
                    "from {peer} with join token {token_id}{}",
                    admitted
                        .group
                        .as_deref()
                        .map(|g| format!(", bound to group {g}"))
                        .unwrap_or_default()
                );
                tracing::info!(gateway_id = %target, %peer, token = %token_id, "agent enrolled");
                self.count("enrolled");
                self.audit("agent enroll", &target, &detail).await;
                Ok(Response::new(issued))
            }
            Err(Refused(code, why)) => {
                tracing::warn!(gateway_id = %asked, %peer, token = %token_id, %why, "enrollment refused");
                let detail = format!("from {peer} with join token {token_id:?}: {why}");
                if self.may_audit_refusal() {
                    self.count("refused");
                    self.audit("agent enroll refused", &asked, &detail).await;
                } else {
                    self.count("refused_unaudited");
                }
                Err(Refused(code, why).into())
            }
        }
    }
}

impl EnrollmentApi {
    async fn enroll(
        &self,
        request: v1::EnrollRequest,
    ) -> Result<(v1::IssuedCertificate, tokens::Admitted), Refused> {
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            Refused(
                Code::FailedPrecondition,
                "this coordinator does not enroll agents (its config has no enrollment: section)"
                    .into(),
            )
        })?;
        let (id, secret) = tokens::parse(&request.token)
            .map_err(|why| Refused(Code::Unauthenticated, why.to_owned()))?;
        let labels: BTreeMap<String, String> = request.labels.into_iter().collect();
        if labels.len() > kt_proto::bounds::MAX_LABELS {
            return Err(Refused(Code::InvalidArgument, "too many labels".into()));
        }
        for (key, value) in &labels {
            kt_proto::bounds::check_label(key, value)
                .map_err(|why| Refused(Code::InvalidArgument, format!("label {key}: {why}")))?;
        }
        let csr = request.csr.unwrap_or_default().csr_pem;
        let store_error = |e: crate::store::StoreError| Refused(Code::Unavailable, e.to_string());
        for _ in 0..TOKEN_RACE_RETRIES {
            let now = unix_ms_now();
            let tokens = self.store.list_tokens().await.map_err(store_error)?;
            let token = tokens
                .into_iter()
                .find(|t| t.id == id)
                .ok_or_else(|| Refused(Code::Unauthenticated, WRONG_TOKEN.into()))?;
            let admitted = token
                .admit(secret, &request.gateway_id, &labels, now)
                .map_err(|why| Refused(Code::PermissionDenied, why))?;
            if let Some(revoked) = self.revocations.get(admitted.gateway.as_str()) {
                return Err(Refused(Code::PermissionDenied, revoked.refusal()));
            }
            if let Some(group) = &admitted.group
                && !self.fleet.group_exists(group)
            {
                return Err(Refused(
                    Code::FailedPrecondition,
                    format!("join token {id} binds to group {group}, which no longer exists"),
                ));
            }
            // Signed before the use is taken: a bad CSR does not cost a use.
            let issued = issuer
                .sign(&admitted.gateway, &csr)
                .map_err(|why| Refused(Code::InvalidArgument, why))?;
            if !self
                .store
                .replace_token(&token, &token.used_once())
                .await
                .map_err(store_error)?
            {
                continue; // another enrollment took a use meanwhile: look again
            }
            if let Some(group) = &admitted.group {
                self.bind(&admitted.gateway, group).await?;
            }
            let answer = issued
                .answer(&admitted.gateway, &self.ca_file, admitted.group.clone())
                .map_err(|why| Refused(Code::Internal, why))?;
            return Ok((answer, admitted));
        }
        Err(Refused(
            Code::Aborted,
            format!("join token {id} is being used by many enrollments at once; try again"),
        ))
    }

    /// Adds `gateway` to `group`'s listed gateways (once).
    async fn bind(&self, gateway: &GatewayId, group: &str) -> Result<(), Refused> {
        let _one_at_a_time = self.binding.lock().await;
        let unavailable = |e: String| Refused(Code::Unavailable, e);
        let groups = self
            .store
            .list_groups()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let Some(mut found) = groups.into_iter().find(|g| g.name == group) else {
            return Err(Refused(
                Code::FailedPrecondition,
                format!("group {group} is not stored; apply it (ktctl groups apply) first"),
            ));
        };
        if found.gateways.contains(gateway) {
            return Ok(());
        }
        found.gateways.push(gateway.clone());
        self.store
            .put_groups(std::slice::from_ref(&found))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        self.fleet
            .apply_groups(vec![found])
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(())
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .enrollments
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
    }

    /// Whether this refusal fits in the audit's window.
    fn may_audit_refusal(&self) -> bool {
        self.audited_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(std::time::Instant::now())
    }

    async fn audit(&self, action: &str, target: &str, detail: &str) {
        let audited = self
            .store
            .audit(unix_ms_now(), "enrollment", action, target, detail);
        if let Err(error) = audited.await {
            tracing::warn!(%error, action, "cannot audit an enrollment");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_audited_up_to_a_rate_then_again_in_the_next_window() {
        let start = std::time::Instant::now();
        let mut window = AuditWindow::new(start);
        let admitted = (0..100).filter(|_| window.admit(start)).count();
        assert_eq!(admitted, AUDITED_REFUSALS as usize);
        assert!(window.admit(start + AUDIT_WINDOW));
    }
}
