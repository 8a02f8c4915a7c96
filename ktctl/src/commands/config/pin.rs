//! `ktctl config pin --gateway ID VERSION` and `ktctl config unpin --gateway ID`: one gateway's
//! desired config, set by hand. A pinned gateway that runs something else is offered its pin
//! again (with backoff) until it runs it, whatever its group's drift policy.

use kt_proto::v1::PinConfigRequest;

use crate::Session;
use crate::view::{GatewayRow, Output, print_structured};

#[derive(Debug, clap::Args)]
pub struct PinArgs {
    #[arg(long)]
    pub gateway: String,
    /// A stored version: its label (1.2.0), its hash, or the start of the hash.
    pub version: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct UnpinArgs {
    #[arg(long)]
    pub gateway: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn pin(session: &Session, args: PinArgs) -> anyhow::Result<()> {
    let request = PinConfigRequest {
        gateway_id: args.gateway,
        config: args.version,
        unpin: false,
        reason: args.reason,
    };
    send(session, request, args.output).await
}

pub async fn unpin(session: &Session, args: UnpinArgs) -> anyhow::Result<()> {
    let request = PinConfigRequest {
        gateway_id: args.gateway,
        config: String::new(),
        unpin: true,
        reason: args.reason,
    };
    send(session, request, args.output).await
}

async fn send(session: &Session, request: PinConfigRequest, output: Output) -> anyhow::Result<()> {
    let unpin = request.unpin;
    let mut client = session.client().await?;
    let state = client
        .pin_config(request)
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let row = GatewayRow::from_state(&state, kt_daemon::unix_ms_now());
    if output != Output::Table {
        return print_structured(&row, output);
    }
    if unpin {
        println!(
            "{}: unpinned; desired {} ({})",
            row.gateway,
            row.desired_human(),
            row.sync_human()
        );
    } else {
        println!(
            "{}: pinned to {}; runs {} ({})",
            row.gateway,
            row.desired_human(),
            row.config_human(),
            row.sync_human()
        );
    }
    Ok(())
}
