//! `ktctl groups list [-o table|json|yaml]`

use kt_proto::v1::ListGroupsRequest;

use crate::Session;
use crate::view::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let groups = client
        .list_groups(ListGroupsRequest {})
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .groups;
    super::print(&groups, args.output)
}
