//! `OperatorService`: what ktctl calls. Every call requires an operator certificate.

use std::pin::Pin;
use std::time::Duration;

use kt_proto::identity::{GatewayId, Role};
use kt_proto::v1::operator_service_server::OperatorService;
use kt_proto::v1::{
    self, ClusterStatusRequest, ClusterStatusResponse, ControlRolloutRequest, FleetSnapshot,
    FleetUpdate, GatewayState, GetConfigVersionRequest, ListConfigVersionsRequest,
    ListConfigVersionsResponse, ListGatewaysRequest, ListGatewaysResponse, ListRolloutsRequest,
    ListRolloutsResponse, PushConfigRequest, PushConfigResponse, RolloutAction, RolloutRequest,
    WatchFleetRequest, fleet_update,
};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::auth::authorize;
use super::rollout_view::{spec_from_proto, to_proto};
use super::{ApiError, paging, spawn_until_cancelled};
use crate::events::EventLog;
use crate::events::Filter;
use crate::events::counters::{self, DecisionCounters};
use crate::events::tail::{TailRequest, Tails};
use crate::fleet::{FleetHandle, UnknownGroup};
use crate::probes::Probes;
use crate::rollout::engine::{Action, EngineHandle, Push};
use crate::rollout::model::Target;
use crate::store::{Store, StoredConfig};

/// Updates queued towards one watcher; a watcher this far behind gets a fresh snapshot.
const WATCH_QUEUE: usize = 256;

pub struct OperatorApi {
    pub fleet: FleetHandle,
    pub engine: EngineHandle,
    pub store: Arc<dyn Store>,
    /// Windowed stats.
    pub events: Arc<dyn EventLog>,
    pub tails: Arc<dyn Tails>,
    /// Said first to every tail when it shows only part of the fleet's events.
    pub tail_scope: Option<String>,
    pub decisions: DecisionCounters,
    pub probes: Probes,
    pub trust_domain: String,
    pub cancel: CancellationToken,
    /// This replica's way to etcd, when the state is there.
    pub replica: Option<crate::cluster::replica::Replica>,
    pub revocations: crate::revocations::Revocations,
    pub renewal_refusals: crate::issuer::RenewalRefusals,
}

/// Bounds of one synthetic probe.
const MAX_PROBE_PROMPTS: usize = 8;
const MAX_PROBE_PROMPT_BYTES: usize = 16 * 1024;

type WatchStream = Pin<Box<dyn Stream<Item = Result<FleetUpdate, Status>> + Send>>;
type RolloutStream = Pin<Box<dyn Stream<Item = Result<v1::Rollout, Status>> + Send>>;
type TailStream = Pin<Box<dyn Stream<Item = Result<v1::TailEventsResponse, Status>> + Send>>;

/// Pushed configs larger than this are refused before anything else.
const MAX_PUSH_BYTES: usize = crate::rollout::plan::MAX_CONFIG_BYTES;

impl OperatorApi {
    /// The fleet's gateways, or a group's.
    async fn gateways(&self, group: Option<String>) -> Result<Vec<GatewayState>, ApiError> {
        let mut gateways = self.fleet.list(group).await??;
        for gateway in &mut gateways {
            gateway.revoked = self
                .revocations
                .get(&gateway.gateway_id)
                .map(|r| r.to_proto());
            if let Some((at, why)) = self.renewal_refusals.get(&gateway.gateway_id) {
                gateway.renewal_refused = why;
                gateway.renewal_refused_unix_ms = at;
            }
        }
        Ok(gateways)
    }

    /// Resolves the gateways a filter names (ids, a group, a selector); `None` means all.
    async fn event_filter(&self, filter: Option<v1::EventFilter>) -> Result<Filter, Status> {
        let filter = filter.unwrap_or_default();
        if filter.gateways.is_empty() && filter.group.is_empty() && filter.selector.is_empty() {
            return Ok(Filter::new(&filter, None));
        }
        if !filter.group.is_empty() && !self.fleet.group_exists(&filter.group) {
            return Err(ApiError::from(UnknownGroup(filter.group.clone())).into());
        }
        let gateways = self.gateways(None).await?;
        let unknown: Vec<String> = filter
            .gateways
            .iter()
            .filter(|id| !gateways.iter().any(|g| &g.gateway_id == *id))
            .cloned()
            .collect();
        // Like an unknown group, an unknown gateway is an error now, not a tail that waits for
        // events that will never come; unless other regions' events are here too, since this
        // region's fleet does not know their gateways.
        if let Some(unknown) = unknown.first().filter(|_| !self.sees_other_regions()) {
            return Err(ApiError::Missing(format!(
                "no gateway named {unknown:?} (the coordinator knows the gateways whose agents connected and those its groups name)"
            ))
            .into());
        }
        let other_regions = unknown
            .into_iter()
            .filter(|_| filter.group.is_empty() && filter.selector.is_empty());
        let set = gateways
            .iter()
            .filter(|g| filter.gateways.is_empty() || filter.gateways.contains(&g.gateway_id))
            .filter(|g| filter.group.is_empty() || self.fleet.in_group(g, &filter.group))
            .filter(|g| {
                filter
                    .selector
                    .iter()
                    .all(|(k, v)| g.labels.get(k) == Some(v))
            })
            .map(|g| g.gateway_id.clone())
            .chain(other_regions)
            .collect();
        Ok(Filter::new(&filter, Some(set)))
    }

    /// Whether this replica's events include other regions' (sourced into its NATS stream).
    fn sees_other_regions(&self) -> bool {
        self.replica
            .as_ref()
            .and_then(|r| r.events.as_ref())
            .is_some_and(|events| !events.settings.regions.is_empty())
    }

    async fn group_infos(&self) -> Result<v1::ListGroupsResponse, Status> {
        let gateways = self.gateways(None).await?;
        let mut statuses = self.engine.groups().await.map_err(ApiError::from)?;
        let groups = self
            .fleet
            .groups()
            .into_iter()
            .map(|g| {
                let members: Vec<&GatewayState> = gateways
                    .iter()
                    .filter(|s| self.fleet.in_group(s, &g.name))
                    .collect();
                let mut running = std::collections::HashMap::new();
                for state in &members {
                    if let Some(config) = state.health.as_ref().and_then(|h| h.config.as_ref()) {
                        *running.entry(config.hash.clone()).or_insert(0u32) += 1;
                    }
                }
                let status = statuses.remove(&g.name).unwrap_or_default();
                let (held_hash, held_reason) = status.held.unwrap_or_default();
                v1::GroupInfo {
                    members: members.iter().map(|s| s.gateway_id.clone()).collect(),
                    gateways: g.gateways.iter().map(ToString::to_string).collect(),
                    selector: g.selector.clone().into_iter().collect(),
                    config_source: g
                        .config_source
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    source_hash: status.source_hash,
                    source_error: status.source_error,
                    desired: status.desired.map(|c| v1::ConfigRef {
                        version: c.version,
                        hash: c.hash,
                    }),
                    running,
                    drift: g.drift.as_str().to_owned(),
                    after: g.after.clone().unwrap_or_default(),
                    held_hash,
                    held_reason,
                    source_waiting: status.waiting,
                    name: g.name,
                }
            })
            .collect();
        Ok(v1::ListGroupsResponse { groups })
    }
}

fn version_message(c: &StoredConfig, with_content: bool) -> v1::ConfigVersion {
    v1::ConfigVersion {
        config: Some(v1::ConfigRef {
            version: c.version.clone(),
            hash: c.hash.clone(),
        }),
        content: if with_content {
            c.content.clone()
        } else {
            Vec::new()
        },
        author: c.author.clone(),
        created_at_unix_ms: c.created_at_unix_ms,
        message: c.message.clone(),
        rejected_by: Vec::new(),
    }
}

fn group_filter(group: String) -> Option<String> {
    Some(group).filter(|g| !g.is_empty())
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn list_gateways(
        &self,
        request: Request<ListGatewaysRequest>,
    ) -> Result<Response<ListGatewaysResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let group = group_filter(request.group);
        let gateways = self.gateways(group).await?;
        let (gateways, next_page_token) =
            paging::page(gateways, &request.page_token, request.page_size);
        Ok(Response::new(ListGatewaysResponse {
            gateways,
            next_page_token,
        }))
    }

    async fn push_config(
        &self,
        request: Request<PushConfigRequest>,
    ) -> Result<Response<PushConfigResponse>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        if request.content.len() > MAX_PUSH_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "config is larger than {MAX_PUSH_BYTES} bytes"
            ))
            .into());
        }
        // A version no gateway could load is refused before it is stored (a rollback returns to
        // what ran before, which is taken as it is).
        if !request.rollback
            && let Err(invalid) =
                kt_gateway::config::PolicyConfig::parse("config", &request.content)
        {
            return Err(ApiError::InvalidArgument(format!(
                "the config does not validate ({} problems):\n{}",
                invalid.errors.len(),
                invalid.errors.join("\n")
            ))
            .into());
        }
        let spec = request
            .spec
            .as_ref()
            .ok_or_else(|| ApiError::InvalidArgument("a push needs a rollout spec".into()))?;
        let spec = spec_from_proto(spec).map_err(ApiError::InvalidArgument)?;
        let push = Push {
            content: request.content,
            spec,
            reason: request.reason,
            dry_run: request.dry_run,
            supersede: request.supersede,
            rollback: request.rollback,
            source: None,
        };
        let (rollout, diff) = self
            .engine
            .push(push, identity.uri())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(PushConfigResponse {
            rollout: Some(to_proto(&rollout)),
            diff,
        }))
    }

    async fn list_rollouts(
        &self,
        request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let rollouts = self.engine.list().await.map_err(ApiError::from)?;
        let rollouts = rollouts
            .iter()
            .filter(|r| !request.active_only || r.is_active())
            .filter(|r| {
                request.group.is_empty() || r.spec.target == Target::Group(request.group.clone())
            })
            .map(to_proto)
            .collect();
        Ok(Response::new(ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let rollout = self
            .engine
            .get(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(&rollout)))
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let id = request.into_inner().id;
        let (first, mut changes) = self
            .engine
            .watch(id.clone())
            .await
            .map_err(ApiError::from)?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let engine = self.engine.clone();
        let cancel = self.cancel.clone();
        spawn_until_cancelled(cancel, async move {
            let mut current = first;
            loop {
                let done = !current.is_active();
                if tx.send(Ok(to_proto(&current))).await.is_err() || done {
                    return;
                }
                current = loop {
                    match changes.recv().await {
                        Ok(change) if change.id == id => break change,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            match engine.get(id.clone()).await {
                                Ok(fresh) => break fresh,
                                Err(_) => return,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn control_rollout(
        &self,
        request: Request<ControlRolloutRequest>,
    ) -> Result<Response<v1::Rollout>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let action =
            match RolloutAction::try_from(request.action).unwrap_or(RolloutAction::Unspecified) {
                RolloutAction::Pause => Action::Pause,
                RolloutAction::Resume => Action::Resume,
                RolloutAction::Promote => Action::Promote,
                RolloutAction::Abort => Action::Abort,
                RolloutAction::Unspecified => {
                    return Err(ApiError::InvalidArgument("no rollout action given".into()).into());
                }
            };
        let rollout = self
            .engine
            .control(request.id, action, identity.uri(), request.reason)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(&rollout)))
    }

    async fn list_config_versions(
        &self,
        request: Request<ListConfigVersionsRequest>,
    ) -> Result<Response<ListConfigVersionsResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let versions = self.store.list_configs().await.map_err(ApiError::from)?;
        let rejections = self.store.rejections().await.map_err(ApiError::from)?;
        Ok(Response::new(ListConfigVersionsResponse {
            versions: versions
                .iter()
                .map(|c| {
                    let mut v = version_message(c, false);
                    v.rejected_by = rejections
                        .get(&c.hash)
                        .into_iter()
                        .flatten()
                        .map(|(gateway, reason)| v1::Rejection {
                            gateway_id: gateway.clone(),
                            reason: reason.clone(),
                        })
                        .collect();
                    v
                })
                .collect(),
        }))
    }

    async fn get_config_version(
        &self,
        request: Request<GetConfigVersionRequest>,
    ) -> Result<Response<v1::ConfigVersion>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let wanted = request.into_inner().version;
        let all = self.store.list_configs().await.map_err(ApiError::from)?;
        let hex = |h: &str| h.strip_prefix("sha256:").unwrap_or(h).to_owned();
        let by_hash: Vec<&StoredConfig> = all
            .iter()
            .filter(|c| {
                c.hash == wanted || (wanted.len() >= 6 && hex(&c.hash).starts_with(&hex(&wanted)))
            })
            .collect();
        // A label may name several configs (an edit without a version bump): the newest wins.
        let found = match by_hash.as_slice() {
            [one] => Some(*one),
            [] => all.iter().find(|c| c.version == wanted),
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "{wanted:?} matches several config hashes; give more of it"
                ))
                .into());
            }
        };
        let found =
            found.ok_or_else(|| ApiError::Missing(format!("no config version {wanted:?}")))?;
        let full = self
            .store
            .get_config(&found.hash)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::Missing(format!("no config version {wanted:?}")))?;
        Ok(Response::new(version_message(&full, true)))
    }

    async fn apply_groups(
        &self,
        request: Request<v1::ApplyGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        if request.content.len() > MAX_PUSH_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "groups file is larger than {MAX_PUSH_BYTES} bytes"
            ))
            .into());
        }
        let text = std::str::from_utf8(&request.content)
            .map_err(|e| ApiError::InvalidArgument(format!("groups file is not UTF-8: {e}")))?;
        let groups = crate::config::parse_groups(std::path::Path::new("groups file"), text)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        self.store
            .put_groups(&groups)
            .await
            .map_err(ApiError::from)?;
        self.fleet
            .apply_groups(groups)
            .await
            .map_err(ApiError::from)?;
        self.store
            .audit(
                kt_daemon::unix_ms_now(),
                &identity.uri(),
                "groups apply",
                &names.join(","),
                &request.reason,
            )
            .await
            .map_err(ApiError::from)?;
        self.group_infos().await.map(Response::new)
    }

    async fn pin_config(
        &self,
        request: Request<v1::PinConfigRequest>,
    ) -> Result<Response<GatewayState>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let config = (!request.unpin).then_some(request.config);
        if config.as_deref() == Some("") {
            return Err(ApiError::InvalidArgument("give the version to pin to".into()).into());
        }
        self.engine
            .pin(
                request.gateway_id.clone(),
                config,
                identity.uri(),
                request.reason,
            )
            .await
            .map_err(ApiError::from)?;
        let state = self
            .gateways(None)
            .await?
            .into_iter()
            .find(|g| g.gateway_id == request.gateway_id)
            .unwrap_or_else(|| GatewayState {
                gateway_id: request.gateway_id,
                ..Default::default()
            });
        Ok(Response::new(state))
    }

    async fn list_groups(
        &self,
        request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        self.group_infos().await.map(Response::new)
    }

    type TailEventsStream = TailStream;

    async fn tail_events(
        &self,
        request: Request<v1::TailEventsRequest>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let filter = self.event_filter(request.filter).await?;
        let tail = TailRequest {
            filter,
            since: request.since_unix_ms,
            limit: request.limit,
            follow: !request.no_follow,
        };
        let mut items = self
            .tails
            .tail(tail)
            .await
            .map_err(|why| ApiError::Degraded(format!("cannot tail events: {why}")))?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        if let Some(scope) = &self.tail_scope {
            let first = v1::TailEventsResponse {
                item: Some(v1::tail_events_response::Item::Scope(scope.clone())),
            };
            let _ = tx.send(Ok(first)).await;
        }
        spawn_until_cancelled(self.cancel.clone(), async move {
            while let Some(item) = items.recv().await {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn event_stats(
        &self,
        request: Request<v1::EventStatsRequest>,
    ) -> Result<Response<v1::EventStatsResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let by = match request.by.as_str() {
            "" | "gateway" => "gateway",
            "config-version" => "config-version",
            "region" => "region",
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "cannot group stats by {other:?}: use gateway, config-version or region"
                ))
                .into());
            }
        };
        let filter = self.event_filter(request.filter).await?;
        if request.all_time {
            if request.since_unix_ms != 0
                || filter.verdict.is_some()
                || filter.policy.is_some()
                || filter.reason.is_some()
                || filter.config_version.is_some()
            {
                return Err(ApiError::InvalidArgument(
                    "all-time stats come from per-gateway counters: they take no time window and \
                     no verdict, policy, reason or config-version filter"
                        .into(),
                )
                .into());
            }
            let rows = counters::stats_rows(&self.decisions.snapshot(), &filter, by);
            return Ok(Response::new(v1::EventStatsResponse { rows }));
        }
        let rows = self
            .events
            .stats(filter, by.to_owned(), request.since_unix_ms)
            .await;
        Ok(Response::new(v1::EventStatsResponse { rows }))
    }

    async fn probe_gateway(
        &self,
        request: Request<v1::ProbeGatewayRequest>,
    ) -> Result<Response<v1::ProbeResult>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let gateway = GatewayId::new(&request.gateway_id).map_err(|e| {
            ApiError::InvalidArgument(format!("gateway id {:?}: {e}", request.gateway_id))
        })?;
        if request.prompts.is_empty() || request.prompts.len() > MAX_PROBE_PROMPTS {
            return Err(ApiError::InvalidArgument(format!(
                "a probe sends 1 to {MAX_PROBE_PROMPTS} prompts"
            ))
            .into());
        }
        if request
            .prompts
            .iter()
            .any(|p| p.text.len() > MAX_PROBE_PROMPT_BYTES)
        {
            return Err(ApiError::InvalidArgument(format!(
                "a probe prompt is at most {MAX_PROBE_PROMPT_BYTES} bytes"
            ))
            .into());
        }
        let timeout = match request.timeout_ms {
            0 => Duration::from_secs(10),
            ms => Duration::from_millis(ms.min(60_000)),
        };
        // Forgotten when this call ends, however it ends (the operator may go away first).
        let mut waiter = self.probes.register(gateway.clone());
        tracing::info!(%identity, gateway_id = %gateway, probe_id = %waiter.id, "synthetic probe");
        let probe = v1::ProbeRequest {
            probe_id: waiter.id.clone(),
            prompts: request.prompts,
        };
        if !self.fleet.probe(gateway.to_string(), probe).await {
            return Err(ApiError::NotConnected(format!(
                "the agent of {gateway} has no open session: nothing can carry the probe"
            ))
            .into());
        }
        match tokio::time::timeout(timeout, &mut waiter.answer).await {
            Ok(Ok(result)) => Ok(Response::new(result)),
            _ => Err(ApiError::TimedOut(format!(
                "the agent of {gateway} did not answer the probe within {} ms",
                timeout.as_millis()
            ))
            .into()),
        }
    }

    async fn create_join_token(
        &self,
        request: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let new = crate::tokens::NewToken::from_request(request.get_ref())
            .map_err(ApiError::InvalidArgument)?;
        if let crate::tokens::Scope::Group(group) = &new.scope
            && !self.fleet.group_exists(group)
        {
            return Err(ApiError::from(UnknownGroup(group.clone())).into());
        }
        let now = kt_daemon::unix_ms_now();
        let (record, token) = new.issue(&identity.uri(), now);
        self.store
            .put_token(&record)
            .await
            .map_err(ApiError::from)?;
        let scope = serde_json::to_string(&record.scope).unwrap_or_default();
        self.store
            .audit(now, &identity.uri(), "token create", &record.id, &scope)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::CreateJoinTokenResponse {
            token,
            info: Some(record.to_proto(now)),
        }))
    }

    async fn list_join_tokens(
        &self,
        request: Request<v1::ListJoinTokensRequest>,
    ) -> Result<Response<v1::ListJoinTokensResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let now = kt_daemon::unix_ms_now();
        let tokens = self.store.list_tokens().await.map_err(ApiError::from)?;
        Ok(Response::new(v1::ListJoinTokensResponse {
            tokens: tokens.iter().map(|t| t.to_proto(now)).collect(),
        }))
    }

    async fn revoke_join_token(
        &self,
        request: Request<v1::RevokeJoinTokenRequest>,
    ) -> Result<Response<v1::JoinToken>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let mut reason = request.reason;
        kt_proto::bounds::clamp_text(&mut reason, 1024);
        let tokens = self.store.list_tokens().await.map_err(ApiError::from)?;
        let Some(mut token) = tokens.into_iter().find(|t| t.id == request.id) else {
            return Err(
                ApiError::Missing(format!("no join token with id {:?}", request.id)).into(),
            );
        };
        let now = kt_daemon::unix_ms_now();
        // Revoking twice keeps the first revocation's time and author.
        if token.revoked.is_none() {
            token.revoked = Some(crate::tokens::Revocation {
                at_unix_ms: now,
                by: identity.uri(),
                reason: reason.clone(),
            });
            self.store.put_token(&token).await.map_err(ApiError::from)?;
            self.store
                .audit(now, &identity.uri(), "token revoke", &token.id, &reason)
                .await
                .map_err(ApiError::from)?;
        }
        Ok(Response::new(token.to_proto(now)))
    }

    async fn revoke_agent(
        &self,
        request: Request<v1::RevokeAgentRequest>,
    ) -> Result<Response<v1::AgentRevocation>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let gateway = GatewayId::new(&request.gateway_id).map_err(|why| {
            ApiError::InvalidArgument(format!("gateway id {:?}: {why}", request.gateway_id))
        })?;
        // Revoking twice keeps the first revocation's time and author.
        if let Some(already) = self.revocations.get(gateway.as_str()) {
            return Ok(Response::new(already.to_proto()));
        }
        let mut reason = request.reason;
        kt_proto::bounds::clamp_text(&mut reason, 1024);
        let revocation = crate::revocations::AgentRevocation {
            gateway_id: gateway.to_string(),
            at_unix_ms: kt_daemon::unix_ms_now(),
            by: identity.uri(),
            reason,
        };
        self.store
            .put_revocation(&revocation)
            .await
            .map_err(ApiError::from)?;
        // This replica's sessions of the gateway close now; the others' at their next read.
        self.revocations
            .refresh(self.store.as_ref())
            .await
            .map_err(ApiError::from)?;
        self.store
            .audit(
                revocation.at_unix_ms,
                &identity.uri(),
                "agent revoke",
                gateway.as_str(),
                &revocation.reason,
            )
            .await
            .map_err(ApiError::from)?;
        tracing::warn!(gateway_id = %gateway, by = %identity, reason = %revocation.reason, "agent revoked");
        Ok(Response::new(revocation.to_proto()))
    }

    async fn reinstate_agent(
        &self,
        request: Request<v1::ReinstateAgentRequest>,
    ) -> Result<Response<v1::AgentRevocation>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let request = request.into_inner();
        let Some(revocation) = self.revocations.get(&request.gateway_id) else {
            return Err(ApiError::Missing(format!(
                "gateway {:?} is not revoked",
                request.gateway_id
            ))
            .into());
        };
        self.store
            .delete_revocation(&revocation.gateway_id)
            .await
            .map_err(ApiError::from)?;
        self.revocations
            .refresh(self.store.as_ref())
            .await
            .map_err(ApiError::from)?;
        let mut reason = request.reason;
        kt_proto::bounds::clamp_text(&mut reason, 1024);
        self.store
            .audit(
                kt_daemon::unix_ms_now(),
                &identity.uri(),
                "agent reinstate",
                &revocation.gateway_id,
                &reason,
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(revocation.to_proto()))
    }

    async fn list_agent_revocations(
        &self,
        request: Request<v1::ListAgentRevocationsRequest>,
    ) -> Result<Response<v1::ListAgentRevocationsResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        Ok(Response::new(v1::ListAgentRevocationsResponse {
            revocations: self
                .revocations
                .all()
                .iter()
                .map(|r| r.to_proto())
                .collect(),
        }))
    }

    async fn start_shadow(
        &self,
        request: Request<v1::StartShadowRequest>,
    ) -> Result<Response<v1::ShadowRun>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let run = self
            .start_shadow_run(request.into_inner(), identity.uri())
            .await?;
        Ok(Response::new(run))
    }

    async fn get_shadow(
        &self,
        request: Request<v1::ShadowRunRequest>,
    ) -> Result<Response<v1::ShadowRun>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let id = request.into_inner().id;
        let run = self.engine.get_shadow(id).await.map_err(ApiError::from)?;
        Ok(Response::new(self.with_report(run).await))
    }

    async fn list_shadows(
        &self,
        request: Request<v1::ListShadowsRequest>,
    ) -> Result<Response<v1::ListShadowsResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let runs = self.list_shadow_runs().await?;
        Ok(Response::new(v1::ListShadowsResponse { runs }))
    }

    async fn stop_shadow(
        &self,
        request: Request<v1::ShadowRunRequest>,
    ) -> Result<Response<v1::ShadowRun>, Status> {
        let identity = authorize(&request, &self.trust_domain, Role::Operator)?;
        let id = request.into_inner().id;
        let run = self
            .engine
            .stop_shadow(id, identity.uri())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(self.with_report(run).await))
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let fleet = self
            .fleet
            .list(None)
            .await
            .map_err(ApiError::from)?
            .map_err(ApiError::from)?;
        let answer = match &self.replica {
            Some(replica) => crate::cluster::status::cluster_status(replica, &fleet).await,
            None => ClusterStatusResponse {
                storage: "embedded".into(),
                replicas: vec![v1::ReplicaStatus {
                    name: "coordinator".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    agents: crate::cluster::status::agents_of(&fleet, ""),
                    leader: true,
                    lease_ttl_remaining_s: -1,
                    ..Default::default()
                }],
                leader: "coordinator".into(),
                ..Default::default()
            },
        };
        Ok(Response::new(answer))
    }

    type WatchFleetStream = WatchStream;

    async fn watch_fleet(
        &self,
        request: Request<WatchFleetRequest>,
    ) -> Result<Response<Self::WatchFleetStream>, Status> {
        authorize(&request, &self.trust_domain, Role::Operator)?;
        let group = group_filter(request.into_inner().group);
        if let Some(g) = group.as_ref().filter(|g| !self.fleet.group_exists(g)) {
            return Err(ApiError::from(UnknownGroup(g.clone())).into());
        }
        let (snapshot, changes) = self.fleet.watch().await.map_err(ApiError::from)?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let fleet = self.fleet.clone();
        let cancel = self.cancel.clone();
        spawn_until_cancelled(cancel, async move {
            forward_changes(&fleet, group, snapshot, changes, &tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends the snapshot, then each change, until the watcher leaves.
async fn forward_changes(
    fleet: &FleetHandle,
    group: Option<String>,
    mut snapshot: Vec<GatewayState>,
    mut changes: broadcast::Receiver<GatewayState>,
    tx: &mpsc::Sender<Result<FleetUpdate, Status>>,
) {
    let keep = |g: &GatewayState| {
        group
            .as_deref()
            .is_none_or(|group| fleet.in_group(g, group))
    };
    loop {
        snapshot.retain(|g| keep(g));
        for (gateways, more) in paging::parts(snapshot) {
            let update = fleet_update::Update::Snapshot(FleetSnapshot { gateways, more });
            if tx
                .send(Ok(FleetUpdate {
                    update: Some(update),
                }))
                .await
                .is_err()
            {
                return; // the watcher left
            }
        }
        loop {
            match changes.recv().await {
                Ok(change) if keep(&change) => {
                    let update = fleet_update::Update::Changed(change);
                    if tx
                        .send(Ok(FleetUpdate {
                            update: Some(update),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "fleet watcher lagged, sending a fresh snapshot");
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        // Too far behind: start over from a fresh snapshot rather than a gap.
        match fleet.watch().await {
            Ok((fresh, receiver)) => {
                snapshot = fresh;
                changes = receiver;
            }
            Err(_) => return,
        }
    }
}
