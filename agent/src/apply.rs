//! Applying a config the coordinator offers: validate, write atomically, reload, verify, or
//! revert. Every offer gets exactly one terminal answer.
//!
//! The gateway's config file is only ever replaced by a rename of a complete, validated file,
//! so a crash at any point (the agent's or the machine's) leaves a valid config in place. The
//! state dir keeps `previous.yaml` (what ran before the last apply) and `last-known-good.yaml`
//! (the last config verified healthy).
//!
//! A shadow offer (`ConfigOffer.shadow`) goes the same way to the gateway's shadow config file,
//! verified against the shadow hash in `/health`; one without a config removes the shadow.

use std::path::Path;
use std::time::Duration;

use kt_contract::{HealthDoc, HealthStatus, content_hash};
use kt_daemon::fs::write_atomic;
use kt_proto::v1::{self, ConfigOffer, ConfigPhase, ConfigRef, ConfigStatus};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{ApplySettings, Reload};
use crate::epoch::EpochFence;

const VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_APPLY_DEADLINE: Duration = Duration::from_secs(30);
const PREVIOUS: &str = "previous.yaml";
const LAST_KNOWN_GOOD: &str = "last-known-good.yaml";
const STAGED: &str = "staged.yaml";
const SHADOW_STAGED: &str = "shadow-staged.yaml";

pub struct Applier {
    settings: ApplySettings,
    health_url: String,
    http: reqwest::Client,
    /// Asks the health poller for a fresh reading once an offer was handled.
    poll_health: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// Why an apply ended as it did.
enum Outcome {
    Applied,
    Rejected(String),
    Failed(String),
}

impl Applier {
    pub fn new(settings: ApplySettings, health_url: String) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create state dir {}: {e}",
                settings.state_dir.display()
            )
        })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Applier {
            settings,
            health_url,
            http,
            poll_health: None,
        })
    }

    /// Pokes `poll` after each offer, so the new running config is reported at once.
    pub fn with_health_poll(mut self, poll: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.poll_health = Some(poll);
        self
    }

    /// Applies offers one at a time until cancelled; answers go to `statuses`.
    pub async fn run(
        self,
        mut offers: mpsc::Receiver<ConfigOffer>,
        statuses: mpsc::Sender<ConfigStatus>,
        health: watch::Receiver<v1::GatewayHealth>,
        cancel: CancellationToken,
    ) {
        let mut fence = EpochFence::load(&self.settings.state_dir);
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                offer = offers.recv() => match offer { Some(offer) => offer, None => return },
            };
            let mut waiting = vec![first];
            while let Ok(newer) = offers.try_recv() {
                waiting.push(newer);
            }
            // Only the newest waiting offer of each kind (config, shadow) matters: the older
            // ones are superseded.
            let mut newest: Vec<ConfigOffer> = Vec::new();
            for offer in waiting.into_iter().rev() {
                if newest.iter().any(|n| n.shadow == offer.shadow) {
                    let running = running_of(&health.borrow(), offer.shadow);
                    let reason = "a newer offer arrived".to_owned();
                    let answer = status(&offer, ConfigPhase::Superseded, running, reason);
                    if statuses.send(answer).await.is_err() {
                        return;
                    }
                } else {
                    newest.push(offer);
                }
            }
            for offer in newest.into_iter().rev() {
                let answer = self.handle(&offer, &mut fence, &health).await;
                if statuses.send(answer).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Applies one offer and says how it ended.
    async fn handle(
        &self,
        offer: &ConfigOffer,
        fence: &mut EpochFence,
        health: &watch::Receiver<v1::GatewayHealth>,
    ) -> ConfigStatus {
        if let Err(stale) = fence.admit(&offer.epoch_cluster, offer.epoch) {
            tracing::warn!(offer_id = %offer.offer_id, %stale, "config offer refused");
            let running = running_of(&health.borrow(), offer.shadow);
            return status(offer, ConfigPhase::StaleEpoch, running, stale.to_string());
        }
        let outcome = if offer.shadow {
            self.apply_shadow(offer).await
        } else {
            self.apply(offer, health).await
        };
        if let Some(poll) = &self.poll_health {
            poll.notify_one();
        }
        let running = self
            .observed_running(offer.shadow)
            .await
            .unwrap_or_else(|| running_of(&health.borrow(), offer.shadow));
        let answer = match outcome {
            Outcome::Applied => status(offer, ConfigPhase::Applied, running, String::new()),
            Outcome::Rejected(why) => status(offer, ConfigPhase::Rejected, running, why),
            Outcome::Failed(why) => status(offer, ConfigPhase::Failed, running, why),
        };
        tracing::info!(
            offer_id = %offer.offer_id,
            shadow = offer.shadow,
            version = %offer.config.as_ref().map(|c| c.version.as_str()).unwrap_or(""),
            phase = ConfigPhase::try_from(answer.phase).map(|p| p.as_str_name()).unwrap_or("?"),
            error = %answer.error,
            "config offer answered"
        );
        answer
    }

    /// Puts a shadow config in place (or removes it, for an offer without one): validated,
    /// written atomically, reloaded, verified in `/health`; a failure puts back what was there.
    async fn apply_shadow(&self, offer: &ConfigOffer) -> Outcome {
        let Some(path) = &self.settings.shadow_path else {
            return Outcome::Rejected(
                "this agent manages no shadow config (no gateway.shadow_config_path)".into(),
            );
        };
        let deadline = apply_deadline(offer);
        let wanted = offer.config.clone().filter(|c| !c.hash.is_empty());
        let Some(wanted) = wanted else {
            if let Err(e) = remove_if_present(path) {
                return Outcome::Failed(format!("cannot remove {}: {e}", path.display()));
            }
            return match self.reload().await {
                Ok(()) => match self.verify_shadow(None, deadline).await {
                    Ok(()) => Outcome::Applied,
                    Err(why) => Outcome::Failed(why),
                },
                Err(e) => Outcome::Failed(format!("reload failed: {e}")),
            };
        };
        if self
            .observed_running(true)
            .await
            .is_some_and(|shadow| shadow.hash == wanted.hash)
        {
            return Outcome::Applied;
        }
        if content_hash(&offer.content) != wanted.hash {
            return Outcome::Rejected(format!("content does not match its hash {}", wanted.hash));
        }
        let staged = self.settings.state_dir.join(SHADOW_STAGED);
        if let Err(e) = write_atomic(&staged, &offer.content) {
            return Outcome::Rejected(format!("cannot stage the shadow config: {e}"));
        }
        if let Err(why) = self.validate(&staged).await {
            return Outcome::Rejected(why);
        }
        let previous = std::fs::read(path).ok();
        if let Err(e) = write_atomic(path, &offer.content) {
            return Outcome::Rejected(format!("cannot write {}: {e}", path.display()));
        }
        let result = match self.reload().await {
            Ok(()) => self.verify_shadow(Some(&wanted.hash), deadline).await,
            Err(e) => Err(format!("reload failed: {e}")),
        };
        let Err(why) = result else {
            return Outcome::Applied;
        };
        let put_back = match previous {
            Some(bytes) => write_atomic(path, &bytes).map_err(|e| e.to_string()),
            None => remove_if_present(path).map_err(|e| e.to_string()),
        };
        let reverted = match put_back {
            Ok(()) => match self.reload().await {
                Ok(()) => "put back the previous shadow".to_owned(),
                Err(e) => format!("put back the previous shadow file, but {e}"),
            },
            Err(e) => format!("cannot put back the previous shadow: {e}"),
        };
        Outcome::Failed(format!("{why}; {reverted}"))
    }

    /// Waits until `/health` shows the shadow `hash` (`None`: no shadow).
    async fn verify_shadow(&self, hash: Option<&str>, deadline: Duration) -> Result<(), String> {
        let until = tokio::time::Instant::now() + deadline;
        let mut last = String::from("no health answer");
        while tokio::time::Instant::now() < until {
            match self.read_health().await {
                Ok(doc) => {
                    let shadow = doc.shadow.unwrap_or_default();
                    if shadow.hash == hash.unwrap_or_default() {
                        return Ok(());
                    }
                    last = match (hash, shadow.last_reload_error) {
                        (Some(_), Some(error)) => format!("the gateway refused it: {error}"),
                        _ if shadow.hash.is_empty() => "the gateway runs no shadow".into(),
                        _ => format!("the gateway's shadow is still {}", shadow.hash),
                    };
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("not verified within {deadline:?}: {last}"))
    }

    async fn apply(
        &self,
        offer: &ConfigOffer,
        health: &watch::Receiver<v1::GatewayHealth>,
    ) -> Outcome {
        let wanted = offer.config.clone().unwrap_or_default();
        let running = match self.observed_running(false).await {
            Some(running) => running,
            None => running_of(&health.borrow(), false),
        };
        if !running.hash.is_empty() && running.hash == wanted.hash {
            return Outcome::Applied;
        }
        if content_hash(&offer.content) != wanted.hash {
            return Outcome::Rejected(format!("content does not match its hash {}", wanted.hash));
        }
        if !offer.rollback && is_lower(&wanted.version, &running.version) {
            return Outcome::Rejected(format!(
                "version {} is lower than the running {}; only a rollback may go back",
                wanted.version, running.version
            ));
        }
        let state = &self.settings.state_dir;
        let staged = state.join(STAGED);
        if let Err(e) = write_atomic(&staged, &offer.content) {
            return Outcome::Rejected(format!("cannot stage the config: {e}"));
        }
        if let Err(why) = self.validate(&staged).await {
            return Outcome::Rejected(why);
        }

        // Keep what runs now, so a failed apply can go back to it.
        let current = std::fs::read(&self.settings.config_path).ok();
        if let Some(current) = &current {
            if let Err(e) = write_atomic(&state.join(PREVIOUS), current) {
                return Outcome::Rejected(format!("cannot keep the previous config: {e}"));
            }
            if health.borrow().status == v1::HealthStatus::Healthy as i32
                && !state.join(LAST_KNOWN_GOOD).exists()
            {
                let _ = write_atomic(&state.join(LAST_KNOWN_GOOD), current);
            }
        }
        if let Err(e) = write_atomic(&self.settings.config_path, &offer.content) {
            return Outcome::Rejected(format!(
                "cannot write {}: {e}",
                self.settings.config_path.display()
            ));
        }
        let deadline = apply_deadline(offer);
        let result = match self.reload().await {
            Ok(()) => self.verify(&wanted.hash, deadline).await,
            Err(e) => Err(format!("reload failed: {e}")),
        };
        match result {
            Ok(()) => {
                let _ = write_atomic(&state.join(LAST_KNOWN_GOOD), &offer.content);
                Outcome::Applied
            }
            Err(why) => Outcome::Failed(format!("{why}; {}", self.revert(current).await)),
        }
    }

    /// Runs the gateway's own validation on the staged file.
    async fn validate(&self, staged: &Path) -> Result<(), String> {
        let Some((program, args)) = self.settings.validate_command.split_first() else {
            return Ok(());
        };
        let file = staged.display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{file}", &file)).collect();
        let run = tokio::process::Command::new(program)
            .args(&args)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(VALIDATE_TIMEOUT, run).await {
            Err(_) => Err(format!(
                "validation did not finish within {VALIDATE_TIMEOUT:?}"
            )),
            Ok(Err(e)) => Err(format!("cannot run {program}: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => {
                let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                if text.is_empty() {
                    text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                }
                Err(format!(
                    "validation failed: {}",
                    text.replace(&file, "<offered config>")
                ))
            }
        }
    }

    async fn reload(&self) -> Result<(), String> {
        match &self.settings.reload {
            Reload::Url(url) => {
                let response = self
                    .http
                    .post(url)
                    .send()
                    .await
                    .map_err(|e| format!("POST {url}: {e}"))?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    Err(format!(
                        "POST {url} answered {status}: {}",
                        body.chars().take(500).collect::<String>()
                    ))
                }
            }
            Reload::Signal { pid_file } => {
                let text = std::fs::read_to_string(pid_file)
                    .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
                let pid: i32 = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("{} holds no pid", pid_file.display()))?;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGHUP,
                )
                .map_err(|e| format!("cannot signal pid {pid}: {e}"))
            }
            Reload::Command(command) => {
                let Some((program, args)) = command.split_first() else {
                    return Err("empty reload command".into());
                };
                let out = tokio::process::Command::new(program)
                    .args(args)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(|e| format!("cannot run {program}: {e}"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!("{program} exited with {}", out.status))
                }
            }
        }
    }

    /// Waits until the gateway reports `hash`, healthy or degraded, with no reload error.
    async fn verify(&self, hash: &str, deadline: Duration) -> Result<(), String> {
        let until = tokio::time::Instant::now() + deadline;
        let mut last = String::from("no health answer");
        while tokio::time::Instant::now() < until {
            match self.read_health().await {
                Ok(doc) if doc.config.hash == hash && doc.status != HealthStatus::Unhealthy => {
                    return Ok(());
                }
                Ok(doc) if doc.config.hash == hash => {
                    last = "the gateway runs it but is unhealthy".into()
                }
                Ok(doc) => {
                    last = match doc.config.last_reload_error {
                        Some(error) => format!("the gateway refused it: {error}"),
                        None => format!("the gateway still runs {}", doc.config.hash),
                    }
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("not verified within {deadline:?}: {last}"))
    }

    /// Puts back what ran before (the last-known-good copy if the previous one is gone).
    async fn revert(&self, previous: Option<Vec<u8>>) -> String {
        let bytes =
            previous.or_else(|| std::fs::read(self.settings.state_dir.join(LAST_KNOWN_GOOD)).ok());
        let Some(bytes) = bytes else {
            return "nothing to revert to".into();
        };
        if let Err(e) = write_atomic(&self.settings.config_path, &bytes) {
            return format!("revert failed: {e}");
        }
        match self.reload().await {
            Ok(()) => match self
                .verify(&content_hash(&bytes), Duration::from_secs(10))
                .await
            {
                Ok(()) => "reverted to the previous config".into(),
                Err(e) => format!("reverted the file, but {e}"),
            },
            Err(e) => format!("reverted the file, but {e}"),
        }
    }

    async fn read_health(&self) -> Result<HealthDoc, String> {
        let response = self
            .http
            .get(&self.health_url)
            .send()
            .await
            .map_err(|e| format!("cannot reach the gateway: {e}"))?;
        response
            .json::<HealthDoc>()
            .await
            .map_err(|e| format!("gateway health is not valid: {e}"))
    }

    /// What the gateway runs right now (its shadow, with `shadow`), read from its health; a
    /// shadow's is empty when none is loaded.
    async fn observed_running(&self, shadow: bool) -> Option<ConfigRef> {
        let doc = self.read_health().await.ok()?;
        let running = match (shadow, doc.shadow) {
            (false, _) => ConfigRef {
                version: doc.config.version,
                hash: doc.config.hash,
            },
            (true, Some(s)) => ConfigRef {
                version: s.version,
                hash: s.hash,
            },
            (true, None) => ConfigRef::default(),
        };
        Some(running)
    }
}

fn status(
    offer: &ConfigOffer,
    phase: ConfigPhase,
    running: ConfigRef,
    error: String,
) -> ConfigStatus {
    ConfigStatus {
        offer_id: offer.offer_id.clone(),
        config: offer.config.clone(),
        phase: phase as i32,
        running: Some(running),
        error,
        shadow: offer.shadow,
    }
}

/// How long an offer may take to apply and verify.
fn apply_deadline(offer: &ConfigOffer) -> Duration {
    if offer.apply_deadline_ms == 0 {
        DEFAULT_APPLY_DEADLINE
    } else {
        Duration::from_millis(offer.apply_deadline_ms).max(Duration::from_secs(1))
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The config (or shadow) the last health reading showed.
fn running_of(health: &v1::GatewayHealth, shadow: bool) -> ConfigRef {
    let info = if shadow {
        &health.shadow
    } else {
        &health.config
    };
    info.as_ref()
        .map(|c| ConfigRef {
            version: c.version.clone(),
            hash: c.hash.clone(),
        })
        .unwrap_or_default()
}

/// Whether SemVer `a` is lower than `b`; unparsable versions are never "lower".
pub fn is_lower(a: &str, b: &str) -> bool {
    fn triple(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let t = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(t)
    }
    matches!((triple(a), triple(b)), (Some(a), Some(b)) if a < b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_ordering() {
        assert!(is_lower("1.0.0", "1.0.1"));
        assert!(is_lower("1.9.0", "1.10.0"));
        assert!(!is_lower("2.0.0", "1.99.99"));
        assert!(!is_lower("1.0.0", "1.0.0"));
        assert!(!is_lower("banana", "1.0.0"));
        assert!(!is_lower("1.0.0", ""));
    }
}
