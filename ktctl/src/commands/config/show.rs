//! `ktctl config show VERSION`: a stored config's bytes, by version label or hash (prefix).

use std::io::Write;

use kt_proto::v1::GetConfigVersionRequest;

use crate::Session;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A version label (e.g. 1.2.0) or a hash, or at least 6 characters of one.
    pub version: String,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let version = client
        .get_config_version(GetConfigVersionRequest {
            version: args.version,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    std::io::stdout().write_all(&version.content)?;
    Ok(())
}
