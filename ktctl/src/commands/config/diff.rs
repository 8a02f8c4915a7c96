//! `ktctl config diff A B [--semantic]`: a unified diff of two config versions (stored ones, or
//! files), or with `--semantic` their behaviour change in policy terms.

use kt_proto::v1::{ConfigRef, ConfigVersion, GetConfigVersionRequest};

use super::semantic;
use crate::Session;
use crate::view::{Output, print_structured, short_hash};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A stored version (label or hash prefix), or a file.
    pub from: String,
    pub to: String,
    /// Explain the change in policy terms, each with an example request whose verdict changes
    /// (checked by running both versions' chains on it).
    #[arg(long)]
    pub semantic: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let from = fetch(session, &args.from).await?;
    let to = fetch(session, &args.to).await?;
    if args.semantic {
        let name = |v: &ConfigVersion| label(v);
        let found = semantic::changes((&name(&from), &from.content), (&name(&to), &to.content))
            .map_err(anyhow::Error::msg)?;
        if args.output != Output::Table {
            return print_structured(&found, args.output);
        }
        print!("{}", semantic::render(&name(&from), &name(&to), &found));
        return Ok(());
    }
    print!("{}", unified(&from, &to));
    Ok(())
}

/// A file's bytes when `what` names a file, else the stored version it names.
async fn fetch(session: &Session, what: &str) -> anyhow::Result<ConfigVersion> {
    let path = std::path::Path::new(what);
    if path.is_file() {
        let content = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        return Ok(ConfigVersion {
            config: Some(ConfigRef {
                version: what.to_owned(),
                hash: String::new(),
            }),
            content,
            ..Default::default()
        });
    }
    let mut client = session.client().await?;
    client
        .get_config_version(GetConfigVersionRequest {
            version: what.to_owned(),
        })
        .await
        .map_err(crate::status_error)
        .map(|r| r.into_inner())
}

fn label(v: &ConfigVersion) -> String {
    v.config
        .as_ref()
        .map(|c| {
            if c.hash.is_empty() {
                c.version.clone()
            } else {
                format!("{} ({})", c.version, short_hash(&c.hash))
            }
        })
        .unwrap_or_default()
}

/// A unified diff of two stored versions, or a line saying there is none.
pub fn unified(from: &ConfigVersion, to: &ConfigVersion) -> String {
    let old = String::from_utf8_lossy(&from.content);
    let new = String::from_utf8_lossy(&to.content);
    let diff = similar::TextDiff::from_lines(old.as_ref(), new.as_ref())
        .unified_diff()
        .context_radius(3)
        .header(&label(from), &label(to))
        .to_string();
    if diff.is_empty() {
        "(no difference)\n".to_owned()
    } else {
        diff
    }
}
