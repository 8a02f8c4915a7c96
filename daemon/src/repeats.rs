//! Repeated warnings and errors are logged a few at a time: a failing disk or a flood of bad
//! connections must not write thousands of identical lines. Each call site may log
//! [`BURST`] warnings or errors per [`WINDOW`]; the rest are counted
//! ([`suppressed_total`], exported by every daemon's `/metrics`) and summed up in one line per
//! call site when the window ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing::callsite::Identifier;

pub const WINDOW: Duration = Duration::from_secs(10);
pub const BURST: u32 = 10;

static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Warning and error lines not written since the process started.
pub fn suppressed_total() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

#[derive(Debug, Default)]
struct Site {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
    what: String,
}

/// Per call site counts within the current window.
#[derive(Clone, Debug, Default)]
pub struct Repeats {
    sites: Arc<Mutex<HashMap<Identifier, Site>>>,
}

impl Repeats {
    /// Whether an event of `metadata` may be written now.
    pub fn allow(&self, metadata: &Metadata<'_>) -> bool {
        if *metadata.level() > tracing::Level::WARN || metadata.is_span() {
            return true;
        }
        self.allow_at(metadata, Instant::now())
    }

    fn allow_at(&self, metadata: &Metadata<'_>, now: Instant) -> bool {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let site = sites.entry(metadata.callsite()).or_default();
        match site.window_start {
            Some(start) if now.duration_since(start) < WINDOW => {}
            _ => {
                site.window_start = Some(now);
                site.logged = 0;
            }
        }
        if site.logged < BURST {
            site.logged += 1;
            return true;
        }
        if site.what.is_empty() {
            site.what = format!(
                "{} {}:{}",
                metadata.target(),
                metadata.file().unwrap_or("?"),
                metadata.line().unwrap_or(0)
            );
        }
        site.suppressed += 1;
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The call sites with suppressed lines since the last call, and how many.
    pub fn drain(&self) -> Vec<(String, u64)> {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        sites
            .values_mut()
            .filter(|s| s.suppressed > 0)
            .map(|s| (s.what.clone(), std::mem::take(&mut s.suppressed)))
            .collect()
    }

    /// Writes one summary line per call site with suppressed lines, every window, from a
    /// thread of its own (never from inside the logging of another line).
    pub fn report_forever(self) {
        std::thread::Builder::new()
            .name("log-repeats".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(WINDOW);
                    for (what, n) in self.drain() {
                        tracing::warn!(suppressed = n, at = %what, "repeated log lines suppressed");
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(|error| eprintln!("cannot start the log-repeats thread: {error}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_logs_a_burst_per_window_and_the_rest_is_counted() {
        let repeats = Repeats::default();
        let start = Instant::now();
        let allowed = (0..25).filter(|_| repeats.allow_at(&META, start)).count();
        assert_eq!(allowed, BURST as usize);
        let drained = repeats.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].1, 25 - u64::from(BURST));
        assert!(drained[0].0.contains("repeats.rs"), "{drained:?}");
        assert!(repeats.drain().is_empty(), "drained once");
        // A new window lets lines through again.
        assert!(repeats.allow_at(&META, start + WINDOW));
    }

    static CALLSITE: tracing::callsite::DefaultCallsite =
        tracing::callsite::DefaultCallsite::new(&META);
    static META: Metadata<'static> = tracing::metadata!(
        name: "test",
        target: "kt_daemon::repeats",
        level: tracing::Level::ERROR,
        fields: &[],
        callsite: &CALLSITE,
        kind: tracing::metadata::Kind::EVENT,
    );
}
