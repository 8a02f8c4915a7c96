//! `ktctl config diff A B`: a unified diff of two stored config versions.

use kt_proto::v1::GetConfigVersionRequest;

use crate::Session;
use crate::view::short_hash;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A version label or hash (prefix).
    pub from: String,
    pub to: String,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let mut fetch = async |version: String| {
        client
            .get_config_version(GetConfigVersionRequest { version })
            .await
            .map_err(crate::status_error)
            .map(|r| r.into_inner())
    };
    let from = fetch(args.from).await?;
    let to = fetch(args.to).await?;
    print!("{}", unified(&from, &to));
    Ok(())
}

/// A unified diff of two stored versions, or a line saying there is none.
pub fn unified(from: &kt_proto::v1::ConfigVersion, to: &kt_proto::v1::ConfigVersion) -> String {
    let name = |v: &kt_proto::v1::ConfigVersion| {
        v.config
            .as_ref()
            .map(|c| format!("{} ({})", c.version, short_hash(&c.hash)))
            .unwrap_or_default()
    };
    let old = String::from_utf8_lossy(&from.content);
    let new = String::from_utf8_lossy(&to.content);
    let diff = similar::TextDiff::from_lines(old.as_ref(), new.as_ref())
        .unified_diff()
        .context_radius(3)
        .header(&name(from), &name(to))
        .to_string();
    if diff.is_empty() {
        "(no difference)\n".to_owned()
    } else {
        diff
    }
}
