//! Connecting to the coordinator as an operator.

use std::time::Duration;

use anyhow::Context as _;
use kt_proto::identity::Role;
use kt_proto::v1::operator_service_client::OperatorServiceClient;
use kt_proto::v1::{GatewayState, ListGatewaysRequest};
use tonic::transport::{Channel, Endpoint};

use crate::ktconfig::Context;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens an mTLS channel to the context's coordinator with the operator's certificate.
pub async fn connect(context: &Context) -> anyhow::Result<OperatorServiceClient<Channel>> {
    let tls = context
        .tls_files()
        .load(Role::Operator)
        .with_context(|| format!("context {:?}", context.name))?;
    let channel = Endpoint::from_shared(context.coordinator.clone())
        .with_context(|| {
            format!(
                "context {:?}: bad coordinator URL {:?}",
                context.name, context.coordinator
            )
        })?
        .tls_config(tls.client_config(&context.server_name()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", context.coordinator))?;
    Ok(OperatorServiceClient::new(channel))
}

/// Every gateway (of `group`, when not empty), page by page.
pub async fn list_gateways(
    client: &mut OperatorServiceClient<Channel>,
    group: &str,
) -> Result<Vec<GatewayState>, tonic::Status> {
    let mut gateways = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_gateways(ListGatewaysRequest {
                group: group.to_owned(),
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        gateways.extend(page.gateways);
        if page.next_page_token.is_empty() {
            return Ok(gateways);
        }
        page_token = page.next_page_token;
    }
}
