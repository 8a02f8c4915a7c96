//! `ktctl rollout pause|resume|promote|abort ID [--reason R]`

use kt_proto::v1::{ControlRolloutRequest, RolloutAction};

use crate::Session;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub id: String,
    /// Recorded with your identity in the rollout's history and the audit log.
    #[arg(long, default_value = "")]
    pub reason: String,
}

pub async fn run(session: &Session, action: RolloutAction, args: Args) -> anyhow::Result<()> {
    let mut client = session.client().await?;
    let rollout = client
        .control_rollout(ControlRolloutRequest {
            id: args.id,
            action: action as i32,
            reason: args.reason,
        })
        .await
        .map_err(crate::status_error)?
        .into_inner();
    println!(
        "rollout {} is {}{}",
        rollout.id,
        crate::rollouts::state_words(rollout.state().label()),
        if rollout.step.is_empty() {
            String::new()
        } else {
            format!(": {}", rollout.step)
        }
    );
    Ok(())
}
