//! `ktctl groups apply -f groups.yaml [--reason R]`: add or replace the groups of a file.

use std::path::PathBuf;

use anyhow::Context;
use kt_proto::v1::ApplyGroupsRequest;

use crate::Session;
use crate::view::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A groups file: `groups: {name: {gateways: [...], selector: {region: eu}}}`.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let content = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut client = session.client().await?;
    let groups = client
        .apply_groups(ApplyGroupsRequest {
            content,
            reason: args.reason,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .groups;
    super::print(&groups, args.output)
}
