//! `ktctl gateway`: the fleet's gateways as the coordinator sees them.

pub mod health;
pub mod list;

use crate::Session;
use crate::view::GatewayRow;

/// Fetches the gateways (of `group`, if given) as display rows.
pub async fn fetch_rows(
    session: &Session,
    group: Option<String>,
) -> anyhow::Result<Vec<GatewayRow>> {
    let mut client = session.client().await?;
    let gateways = crate::client::list_gateways(&mut client, &group.unwrap_or_default())
        .await
        .map_err(crate::status_error)?;
    let now = kt_daemon::unix_ms_now();
    Ok(gateways
        .iter()
        .map(|g| GatewayRow::from_state(g, now))
        .collect())
}
