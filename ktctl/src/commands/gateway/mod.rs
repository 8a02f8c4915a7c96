//! `ktctl gateway`: the fleet's gateways as the coordinator sees them.

pub mod health;
pub mod list;

use kt_proto::v1::ListGatewaysRequest;

use crate::Session;
use crate::view::GatewayRow;

/// Fetches the gateways (of `group`, if given) as display rows.
pub async fn fetch_rows(
    session: &Session,
    group: Option<String>,
) -> anyhow::Result<Vec<GatewayRow>> {
    let mut client = session.client().await?;
    let response = client
        .list_gateways(ListGatewaysRequest {
            group: group.unwrap_or_default(),
        })
        .await
        .map_err(crate::status_error)?;
    let now = kt_proto::unix_ms_now();
    Ok(response
        .into_inner()
        .gateways
        .iter()
        .map(|g| GatewayRow::from_state(g, now))
        .collect())
}
