//! Connecting to the coordinator as an operator.

use std::time::Duration;

use anyhow::Context as _;
use kt_proto::identity::Role;
use kt_proto::v1::operator_service_client::OperatorServiceClient;
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
