//! Config sources: a group's `config_source` file, read every `source_poll_interval` (and at
//! once on SIGHUP), validated with the gateway's own rules, and handed to the rollout engine
//! whenever what it says changed. The engine decides what to do with it (see `reconcile`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::DEFAULT_SOURCE_POLL_INTERVAL;
use crate::fleet::FleetHandle;
use crate::rollout::engine::EngineHandle;
use crate::rollout::plan::{MAX_CONFIG_BYTES, content_hash, version_label};

/// A config source as last read: its content when valid, else why not.
#[derive(Clone, Debug, Default)]
pub struct SourceReading {
    pub path: String,
    /// `sha256:` of the bytes read (empty when the file could not be read).
    pub hash: String,
    pub version: String,
    pub content: Arc<Vec<u8>>,
    /// Why the content cannot be used: unreadable, too large, or invalid (file:line: field).
    pub error: String,
    /// What the engine waits for before it uses the content (set by the engine).
    pub waiting: String,
}

impl SourceReading {
    /// Whether two readings say the same thing (the engine is told only about changes).
    fn same(&self, other: &SourceReading) -> bool {
        self.path == other.path && self.hash == other.hash && self.error == other.error
    }
}

/// Reads `path` and checks it as a gateway would load it.
pub async fn read_source(path: &Path) -> SourceReading {
    let shown = path.display().to_string();
    let failed = |error: String| SourceReading {
        path: shown.clone(),
        error,
        ..Default::default()
    };
    match tokio::fs::metadata(path).await {
        Ok(meta) if meta.len() > MAX_CONFIG_BYTES as u64 => {
            return failed(format!(
                "{shown}: {} bytes, the limit is {MAX_CONFIG_BYTES}",
                meta.len()
            ));
        }
        Ok(_) => {}
        Err(e) => return failed(format!("{shown}: cannot read: {e}")),
    }
    let content = match tokio::fs::read(path).await {
        Ok(content) => content,
        Err(e) => return failed(format!("{shown}: cannot read: {e}")),
    };
    let hash = content_hash(&content);
    let checked = tokio::task::spawn_blocking({
        let shown = shown.clone();
        move || {
            let valid = kt_gateway::config::PolicyConfig::parse(&shown, &content)
                .map_err(|invalid| invalid.to_string())
                .and_then(|_| version_label(&content).map_err(|e| format!("{shown}: {e}")));
            (valid, content)
        }
    })
    .await;
    let Ok((valid, content)) = checked else {
        return failed(format!("{shown}: validation did not finish"));
    };
    match valid {
        Ok(version) => SourceReading {
            path: shown,
            hash,
            version,
            content: Arc::new(content),
            ..Default::default()
        },
        Err(error) => SourceReading {
            path: shown,
            hash,
            error,
            ..Default::default()
        },
    }
}

/// Reads every group's config source on its interval, and all of them on SIGHUP, until
/// cancelled; tells the engine each time a source's reading changed.
pub async fn watch(
    fleet: FleetHandle,
    engine: EngineHandle,
    mut hangup: Option<tokio::signal::unix::Signal>,
    cancel: CancellationToken,
) {
    let mut last: BTreeMap<String, SourceReading> = BTreeMap::new();
    let mut due: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let groups: Vec<_> = fleet
            .groups()
            .into_iter()
            .filter(|g| g.config_source.is_some())
            .collect();
        due.retain(|name, _| groups.iter().any(|g| &g.name == name));
        for group in &groups {
            let Some(path) = &group.config_source else {
                continue;
            };
            if due.get(&group.name).is_some_and(|at| *at > now) {
                continue;
            }
            let interval = group
                .source_poll_interval
                .unwrap_or(DEFAULT_SOURCE_POLL_INTERVAL);
            due.insert(group.name.clone(), now + interval);
            let reading = read_source(path).await;
            if last.get(&group.name).is_some_and(|l| l.same(&reading)) {
                continue;
            }
            if !reading.error.is_empty() {
                tracing::error!(group = %group.name, error = %reading.error, "config source not used");
            } else {
                tracing::info!(group = %group.name, source = %reading.path, version = %reading.version, hash = %reading.hash, "config source read");
            }
            last.insert(group.name.clone(), reading.clone());
            if !engine.source(group.name.clone(), reading).await {
                return;
            }
        }
        // Wake for the next due source, and at least every second to notice new groups.
        let next = due
            .values()
            .min()
            .copied()
            .unwrap_or(now + Duration::from_secs(1))
            .min(Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reading every config source");
                due.clear();
            }
        }
    }
}
