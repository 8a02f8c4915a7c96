//! The operator service's shadow runs: start, read (with a live flip matrix while a run goes
//! on), list, stop. The leader's engine carries each run; any replica reads its report.

use kt_proto::v1::{ShadowRun, StartShadowRequest};

use super::ApiError;
use super::operator::OperatorApi;
use crate::rollout::model::Target;
use crate::rollout::plan::MAX_CONFIG_BYTES;
use crate::shadow::runs::{self, StartShadow};

/// Most shadow runs one listing returns (the newest).
const MAX_LISTED: usize = 200;

impl OperatorApi {
    pub(super) async fn start_shadow_run(
        &self,
        request: StartShadowRequest,
        identity: String,
    ) -> Result<ShadowRun, ApiError> {
        if request.content.len() > MAX_CONFIG_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "config is larger than {MAX_CONFIG_BYTES} bytes"
            )));
        }
        if let Err(invalid) = kt_gateway::config::PolicyConfig::parse("config", &request.content) {
            return Err(ApiError::InvalidArgument(format!(
                "the config does not validate ({} problems):\n{}",
                invalid.errors.len(),
                invalid.errors.join("\n")
            )));
        }
        let target = match (request.group.is_empty(), request.selector.is_empty()) {
            (false, true) => Target::Group(request.group),
            (true, false) => Target::Selector(request.selector.into_iter().collect()),
            (false, false) => {
                return Err(ApiError::InvalidArgument(
                    "give a group or a selector, not both".into(),
                ));
            }
            (true, true) => {
                return Err(ApiError::InvalidArgument(
                    "a shadow run needs a group or a selector".into(),
                ));
            }
        };
        let start = StartShadow {
            content: request.content,
            target,
            duration_ms: request.duration_ms,
            sample: request.sample,
            reason: request.reason,
        };
        Ok(self.engine.start_shadow(start, identity).await?)
    }

    /// `run` with its report: the stored one once it ended, else read from the events now.
    pub(super) async fn with_report(&self, mut run: ShadowRun) -> ShadowRun {
        if run.report.is_none() {
            let scope = self.tail_scope.as_deref();
            run.report = runs::read_report(self.events.as_ref(), scope, &run).await;
        }
        run
    }

    pub(super) async fn list_shadow_runs(&self) -> Result<Vec<ShadowRun>, ApiError> {
        let mut all = self.engine.list_shadows().await?;
        all.sort_by_key(|r| std::cmp::Reverse(r.started_at_unix_ms));
        all.truncate(MAX_LISTED);
        Ok(all)
    }
}
