//! `ktctl token create|list|revoke`: join tokens, what new agents enroll with.

use std::collections::HashMap;
use std::time::Duration;

use kt_proto::v1::{
    CreateJoinTokenRequest, JoinToken, JoinTokenScope, ListJoinTokensRequest,
    RevokeJoinTokenRequest,
};
use serde::Serialize;

use crate::Session;
use crate::view::{Output, print_structured, table};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("scope").required(true)))]
pub struct CreateArgs {
    /// The one gateway id the token enrolls.
    #[arg(long, group = "scope")]
    pub gateway_id: Option<String>,
    /// Gateways of this group: the agent names its gateway id, which is bound to the group.
    #[arg(long, group = "scope")]
    pub group: Option<String>,
    /// Gateways whose labels match `key=value[,key=value...]`.
    #[arg(long, group = "scope", value_parser = super::parse_selector)]
    pub selector: Option<HashMap<String, String>>,
    /// How long the token can be used.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h", conflicts_with = "never_expires")]
    pub ttl: Duration,
    /// A token without an end: only when a bootstrap truly needs one (revoke it when done).
    #[arg(long)]
    pub never_expires: bool,
    /// How many agents can enroll with it.
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The token's id (as `token list` shows it; the middle part of the token).
    pub id: String,
    #[arg(long, default_value = "")]
    pub reason: String,
}

pub async fn create(session: &Session, args: CreateArgs) -> anyhow::Result<()> {
    let scope_is_one_gateway = args.gateway_id.is_some();
    let scope = JoinTokenScope {
        gateway_id: args.gateway_id.unwrap_or_default(),
        group: args.group.unwrap_or_default(),
        selector: args.selector.unwrap_or_default(),
    };
    let ttl_ms = if args.never_expires {
        0
    } else {
        u64::try_from(args.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    };
    let mut client = session.client().await?;
    let created = client
        .create_join_token(CreateJoinTokenRequest {
            scope: Some(scope),
            ttl_ms,
            never_expires: args.never_expires,
            uses: args.uses,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let info = created.info.unwrap_or_default();
    if args.output != Output::Table {
        #[derive(Serialize)]
        struct Created {
            token: String,
            #[serde(flatten)]
            info: TokenRow,
        }
        let created = Created {
            token: created.token,
            info: TokenRow::from(&info),
        };
        return print_structured(&created, args.output);
    }
    println!("{}", created.token);
    let row = TokenRow::from(&info);
    eprintln!(
        "token {} for {}: {} use(s), expires {}; shown once, keep it secret",
        row.id, row.scope, row.uses, row.expires
    );
    // What the new host runs, with the root this context trusts as the pin.
    if let Ok(context) = session.context()
        && let Ok(fingerprint) = crate::commands::pki::fingerprint::of_file(&context.ca)
    {
        let id = if scope_is_one_gateway {
            String::new()
        } else {
            " --gateway-id ID".to_owned()
        };
        eprintln!(
            "on the new host: kt-agent enroll --coordinator {} --token-file TOKEN_FILE --ca-fingerprint {fingerprint}{id}",
            context.coordinator
        );
    }
    Ok(())
}

pub async fn list(session: &Session, args: ListArgs) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let tokens = client
        .list_join_tokens(ListJoinTokensRequest {})
        .await
        .map_err(crate::status_error)?
        .into_inner()
        .tokens;
    let rows: Vec<TokenRow> = tokens.iter().map(TokenRow::from).collect();
    if args.output != Output::Table {
        return print_structured(&rows, args.output);
    }
    let mut out = table(&["ID", "SCOPE", "STATE", "USES LEFT", "EXPIRES", "CREATED BY"]);
    for row in &rows {
        out.add_row(vec![
            row.id.clone(),
            row.scope.clone(),
            row.state.clone(),
            format!("{}/{}", row.uses_left, row.uses),
            row.expires.clone(),
            row.created_by.clone(),
        ]);
    }
    println!("{out}");
    Ok(())
}

pub async fn revoke(session: &Session, args: RevokeArgs) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let token = client
        .revoke_join_token(RevokeJoinTokenRequest {
            id: args.id,
            reason: args.reason,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    println!("token {} revoked", token.id);
    Ok(())
}

/// One token as an operator reads it; never its secret.
#[derive(Debug, Serialize)]
pub struct TokenRow {
    pub id: String,
    /// `gateway=ID`, `group=G` or `selector=k=v,...`.
    pub scope: String,
    /// valid | expired | used_up | revoked
    pub state: String,
    pub uses: u32,
    pub uses_left: u32,
    /// RFC 3339, or `never`.
    pub expires: String,
    pub created: String,
    pub created_by: String,
    pub revoked_by: Option<String>,
    pub revoked_reason: Option<String>,
}

impl From<&JoinToken> for TokenRow {
    fn from(token: &JoinToken) -> Self {
        let scope = token.scope.clone().unwrap_or_default();
        let scope = if !scope.gateway_id.is_empty() {
            format!("gateway={}", scope.gateway_id)
        } else if !scope.group.is_empty() {
            format!("group={}", scope.group)
        } else {
            let mut pairs: Vec<String> = scope
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            pairs.sort();
            format!("selector={}", pairs.join(","))
        };
        TokenRow {
            id: token.id.clone(),
            scope,
            state: token.state.clone(),
            uses: token.uses,
            uses_left: token.uses_left,
            expires: match token.expires_unix_ms {
                0 => "never".into(),
                ms => kt_daemon::clock::rfc3339(ms),
            },
            created: kt_daemon::clock::rfc3339(token.created_unix_ms),
            created_by: token.created_by.clone(),
            revoked_by: Some(token.revoked_by.clone()).filter(|s| !s.is_empty()),
            revoked_reason: Some(token.revoked_reason.clone()).filter(|s| !s.is_empty()),
        }
    }
}
