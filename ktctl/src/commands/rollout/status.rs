//! `ktctl rollout status ID [--watch] [-o json]`

use kt_proto::v1::RolloutRequest;

use crate::Session;
use crate::rollouts::{EXIT_CODES_HELP, exit, exit_code, follow, print_summary, to_json};
use crate::view::{Output, print_structured};

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct Args {
    pub id: String,
    /// Follow the rollout until it ends or waits for a human; exit with its code.
    #[arg(long, short = 'w')]
    pub watch: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<u8> {
    let rollout = if args.watch {
        follow(session, &args.id).await?
    } else {
        let mut client = session.client().await?;
        client
            .get_rollout(RolloutRequest {
                id: args.id.clone(),
            })
            .await
            .map_err(crate::status_error)?
            .into_inner()
    };
    match args.output {
        Output::Table => print_summary(&rollout),
        structured => print_structured(&to_json(&rollout, None), structured)?,
    }
    Ok(if args.watch {
        exit_code(rollout.state().label()).unwrap_or(exit::FAILED)
    } else {
        0
    })
}
