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

/// Follows `path` into the spool until cancelled; wakes the sender after each append.
pub async fn run_tailer(
    path: PathBuf,
    spool: SharedSpool,
    appended: Arc<Notify>,
    cancel: CancellationToken,
) {
    let cursor = {
        let guard = lock(&spool);
        guard.cursor().unwrap_or_default()
    };
    let mut tailer = Tailer::new(path.clone(), cursor);
    let mut invalid_total = 0u64;
    loop {
        let step = {
            let spool = spool.clone();
            let polled = tailer.poll(READ_CHUNK);
            match polled {
                Ok(polled) => {
                    let result = tokio::task::spawn_blocking(move || {
                        let changed = !polled.events.is_empty();
                        lock(&spool)
                            .append(&polled.events, polled.cursor)
                            .map(|()| (polled, changed))
                    })
                    .await;
                    match result {
                        Ok(Ok((polled, changed))) => {
                            tailer.commit(polled.cursor);
                            if polled.invalid > 0 {
                                invalid_total += polled.invalid;
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
