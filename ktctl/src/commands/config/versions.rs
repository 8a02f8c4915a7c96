//! `ktctl config versions [-o table|json|yaml]`: the stored config versions, newest first.

use kt_proto::v1::ListConfigVersionsRequest;
use serde_json::json;

use crate::Session;
use crate::view::{Output, print_structured, short_hash, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let versions = client
        .list_config_versions(ListConfigVersionsRequest {})
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .versions;
    if args.output != Output::Table {
        let rows: Vec<_> = versions
            .iter()
            .map(|v| {
                let c = v.config.clone().unwrap_or_default();
                let rejected: Vec<_> = v
                    .rejected_by
                    .iter()
                    .map(|r| json!({ "gateway_id": r.gateway_id, "reason": r.reason }))
                    .collect();
                json!({ "version": c.version, "hash": c.hash, "author": v.author, "created_at_unix_ms": v.created_at_unix_ms, "message": v.message, "rejected_by": rejected })
            })
            .collect();
        return print_structured(&rows, args.output);
    }
    let mut t = table(&["VERSION", "HASH", "AUTHOR", "REJECTED BY", "MESSAGE"]);
    for v in &versions {
        let c = v.config.clone().unwrap_or_default();
        t.add_row(vec![
            c.version,
            short_hash(&c.hash),
            v.author
                .rsplit('/')
                .take(2)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("/"),
            if v.rejected_by.is_empty() {
                "-".to_owned()
            } else {
                v.rejected_by
                    .iter()
                    .map(|r| r.gateway_id.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            },
            v.message.clone(),
        ]);
    }
    println!("{t}");
    for v in &versions {
        let version = v.config.as_ref().map_or("", |c| c.version.as_str());
        for r in &v.rejected_by {
            println!("{version}: rejected by {}: {}", r.gateway_id, r.reason);
        }
    }
    Ok(())
}
