//! Decision events: tail the gateway's events file into an on-disk buffer ([`spool`]) and send
//! the buffer to the coordinator on the `Events` stream ([`send`]), deleting only what the
//! coordinator acknowledged as durably stored.

pub mod send;
pub mod spool;
pub mod tail;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use spool::Spool;
use tail::Tailer;

/// Bytes read from the events file per poll.
const READ_CHUNK: usize = 4 * 1024 * 1024;
/// How often the events file is checked for new lines when nothing is pending.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The buffer, shared by the tailer (writer) and the sender (reader, acknowledger).
pub type SharedSpool = Arc<Mutex<Spool>>;

pub fn lock(spool: &SharedSpool) -> std::sync::MutexGuard<'_, Spool> {
    spool.lock().unwrap_or_else(|p| p.into_inner())
}

/// The latest state of forwarding, for heartbeats: written by the tailer and the sender after
/// each change of the buffer, read without touching the buffer.
/// It also keeps the forwarding metrics.
#[derive(Clone, Debug, Default)]
pub struct ForwardingReport {
    inner: Arc<Mutex<(spool::Forwarding, u64)>>,
    metrics: Arc<Metrics>,
}

impl ForwardingReport {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        ForwardingReport {
            inner: Default::default(),
            metrics,
        }
    }

    /// Takes the buffer's state after a change.
    pub fn update(&self, spool: &Spool) {
        match spool.forwarding() {
            Ok(now) => {
                let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                let newly_dropped = now.dropped.saturating_sub(inner.0.dropped);
                self.metrics.events_dropped.inc_by(newly_dropped);
                inner.0 = now;
            }
            Err(error) => tracing::warn!(%error, "cannot read the event buffer's state"),
        }
    }

    fn add_invalid(&self, lines: u64) {
        self.metrics.events_invalid_lines.inc_by(lines);
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1 += lines;
    }

    fn buffered(&self, events: u64) {
        self.metrics.events_buffered.inc_by(events);
    }

    pub fn acknowledged(&self, events: u64) {
        self.metrics.events_acknowledged.inc_by(events);
    }

    /// Sets the gauges a scrape reads.
    pub fn scrape(&self, now_ms: u64) {
        let now = self.heartbeat(now_ms);
        self.metrics.events_backlog.set(now.backlog as i64);
        self.metrics
            .events_lag_ms
            .set(i64::try_from(now.oldest_buffered_age_ms).unwrap_or(i64::MAX));
    }

    /// What the next heartbeat says.
    pub fn heartbeat(&self, now_ms: u64) -> kt_proto::v1::EventForwarding {
        let (state, invalid) = *self.inner.lock().unwrap_or_else(|p| p.into_inner());
        kt_proto::v1::EventForwarding {
            backlog: state.backlog,
            oldest_buffered_age_ms: state.oldest_at_ms.map_or(0, |at| now_ms.saturating_sub(at)),
            dropped: state.dropped,
            invalid_lines: invalid,
        }
    }
}

/// Follows `path` into the spool until cancelled; wakes the sender after each append.
pub async fn run_tailer(
    path: PathBuf,
    spool: SharedSpool,
    appended: Arc<Notify>,
    report: ForwardingReport,
    cancel: CancellationToken,
) {
    let cursor = {
        let guard = lock(&spool);
        report.update(&guard);
        guard.cursor().unwrap_or_default()
    };
    let mut tailer = Tailer::new(path.clone(), cursor);
    let mut invalid_total = 0u64;
    loop {
        let step = {
            let spool = spool.clone();
            let reporter = report.clone();
            let polled = tailer.poll(READ_CHUNK);
            match polled {
                Ok(polled) => {
                    let result = tokio::task::spawn_blocking(move || {
                        let changed = !polled.events.is_empty();
                        let mut spool = lock(&spool);
                        let appended = spool.append(&polled.events, polled.cursor);
                        if changed {
                            reporter.buffered(polled.events.len() as u64);
                            reporter.update(&spool);
                        }
                        appended.map(|()| (polled, changed))
                    })
                    .await;
                    match result {
                        Ok(Ok((polled, changed))) => {
                            tailer.commit(polled.cursor);
                            if polled.invalid > 0 {
                                invalid_total += polled.invalid;
                                report.add_invalid(polled.invalid);
                                tracing::warn!(file = %path.display(), invalid = polled.invalid, invalid_total, "skipped lines that are not JSON events");
                            }
                            if changed {
                                appended.notify_one();
                            }
                            polled.more
                        }
                        Ok(Err(error)) => {
                            tracing::error!(%error, "cannot buffer events");
                            false
                        }
                        Err(_) => false,
                    }
                }
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "cannot read the events file");
                    false
                }
            }
        };
        if step {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}
