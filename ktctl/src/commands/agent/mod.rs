//! `ktctl agent revoke|reinstate|revocations`: cutting an agent identity off (a stolen key, a
//! decommissioned host) and letting it back.

use kt_proto::v1::{
    AgentRevocation, ListAgentRevocationsRequest, ReinstateAgentRequest, RevokeAgentRequest,
};
use serde::Serialize;

use crate::Session;
use crate::view::{Output, print_structured, table};

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The gateway whose agent identity is revoked.
    pub gateway_id: String,
    /// Why (recorded in the audit log and told to the agent).
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct ReinstateArgs {
    pub gateway_id: String,
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn revoke(session: &Session, args: RevokeArgs) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let revoked = client
        .revoke_agent(RevokeAgentRequest {
            gateway_id: args.gateway_id,
            reason: args.reason,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    println!(
        "gateway {} revoked: its sessions are closed; renewals, sessions and enrollments under this id are refused until `ktctl agent reinstate {}`",
        revoked.gateway_id, revoked.gateway_id
    );
    Ok(())
}

pub async fn reinstate(session: &Session, args: ReinstateArgs) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let lifted = client
        .reinstate_agent(ReinstateAgentRequest {
            gateway_id: args.gateway_id,
            reason: args.reason,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    println!(
        "gateway {} reinstated; its old certificate works again until it expires (enroll it with a new token if that was stolen)",
        lifted.gateway_id
    );
    Ok(())
}

#[derive(Serialize)]
struct RevocationRow {
    gateway_id: String,
    revoked_at: String,
    revoked_by: String,
    reason: String,
}

impl From<&AgentRevocation> for RevocationRow {
    fn from(r: &AgentRevocation) -> Self {
        RevocationRow {
            gateway_id: r.gateway_id.clone(),
            revoked_at: kt_daemon::clock::rfc3339(r.revoked_unix_ms),
            revoked_by: r.revoked_by.clone(),
            reason: r.reason.clone(),
        }
    }
}

pub async fn list(session: &Session, args: ListArgs) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let all = client
        .list_agent_revocations(ListAgentRevocationsRequest {})
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .revocations;
    let rows: Vec<RevocationRow> = all.iter().map(RevocationRow::from).collect();
    if args.output != Output::Table {
        return print_structured(&rows, args.output);
    }
    let mut out = table(&["GATEWAY", "REVOKED AT", "BY", "REASON"]);
    for row in rows {
        out.add_row(vec![
            row.gateway_id,
            row.revoked_at,
            row.revoked_by,
            row.reason,
        ]);
    }
    println!("{out}");
    Ok(())
}
