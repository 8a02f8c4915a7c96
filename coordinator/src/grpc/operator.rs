//! `OperatorService`: what ktctl calls. Every call requires an operator certificate.

use std::pin::Pin;

use kt_proto::identity::Role;
use kt_proto::v1::operator_service_server::OperatorService;
use kt_proto::v1::{
    FleetSnapshot, FleetUpdate, GatewayState, ListGatewaysRequest, ListGatewaysResponse,
    WatchFleetRequest, fleet_update,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::ApiError;
use super::auth::authorize;
use crate::fleet::{FleetHandle, UnknownGroup};

/// Updates queued towards one watcher; a watcher this far behind gets a fresh snapshot.
const WATCH_QUEUE: usize = 256;

pub struct OperatorApi {
    pub fleet: FleetHandle,
    pub trust_domain: String,
    pub cancel: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<FleetUpdate, Status>> + Send>>;

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
        let group = group_filter(request.into_inner().group);
        let gateways = self
            .fleet
            .list(group)
            .await
            .map_err(ApiError::from)?
            .map_err(ApiError::from)?;
        Ok(Response::new(ListGatewaysResponse { gateways }))
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
        tokio::spawn(async move {
            tokio::select! {
                _ = forward_changes(&fleet, group, snapshot, changes, &tx) => {}
                _ = cancel.cancelled() => {}
            }
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
            .is_none_or(|group| fleet.in_group(&g.gateway_id, group))
    };
    loop {
        snapshot.retain(|g| keep(g));
        let update = fleet_update::Update::Snapshot(FleetSnapshot { gateways: snapshot });
        if tx
            .send(Ok(FleetUpdate {
                update: Some(update),
            }))
            .await
            .is_err()
        {
            return; // the watcher left
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
