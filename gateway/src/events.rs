//! Decision events: one JSON line per request, appended to a file that rotates by size.
//!
//! Requests hand events to a writer task over a bounded channel, so a slow disk delays
//! requests only once the queue is full (backpressure, never silent loss). Rotation renames
//! `events.jsonl` to `events.jsonl.1`, shifting older files up and deleting past `keep`, the
//! way logrotate does; a tailer following the file by identity sees the rename.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::policy::Outcome;

/// A decision event (DESIGN.md section 3). The prompt itself never appears, only its hash.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionEvent {
    pub id: String,
    /// RFC 3339, microseconds, UTC.
    pub timestamp: String,
    pub gateway_id: String,
    pub request_id: String,
    pub verdict: &'static str,
    pub reason_code: String,
    pub policies_evaluated: Vec<Outcome>,
    pub model: String,
    pub provider: Option<String>,
    pub target: Option<String>,
    pub config_version: String,
    pub config_hash: String,
    pub latency_ms: f64,
    pub status: u16,
    pub stream: bool,
    pub cached: bool,
    pub prompt_sha256: String,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub error: Option<String>,
    /// A synthetic probe, not a user's request; written only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub synthetic: bool,
    /// What the shadow config would have decided on the same input; only with a shadow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::shadow::ShadowOutcome>,
}

/// Where events go and when the file rotates.
#[derive(Clone, Debug)]
pub struct EventsSettings {
    pub path: PathBuf,
    pub max_bytes: u64,
    /// Rotated files kept besides the live one.
    pub keep: usize,
}

/// Events queued before requests wait for the writer.
const QUEUE: usize = 16 * 1024;

/// Sends events to the writer task; cheap to clone.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: Option<mpsc::Sender<DecisionEvent>>,
}

impl EventSink {
    /// A sink that drops everything (no events file configured).
    pub fn disabled() -> Self {
        EventSink { tx: None }
    }

    pub async fn record(&self, event: DecisionEvent) {
        if let Some(tx) = &self.tx {
            // An error means the writer stopped (shutdown or a fatal disk error, already logged).
            let _ = tx.send(event).await;
        }
    }
}

/// Opens the events file and starts the writer; the returned handle finishes when every
/// sink is dropped and the queue is drained.
pub fn start(
    settings: EventsSettings,
) -> std::io::Result<(EventSink, tokio::task::JoinHandle<()>)> {
    let writer = RotatingWriter::open(settings)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = tokio::task::spawn_blocking(move || writer.run(rx));
    Ok((EventSink { tx: Some(tx) }, handle))
}

struct RotatingWriter {
    settings: EventsSettings,
    file: BufWriter<File>,
    size: u64,
}

impl RotatingWriter {
    fn open(settings: EventsSettings) -> std::io::Result<Self> {
        if let Some(dir) = settings.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&settings.path)?;
        let size = file.metadata()?.len();
        Ok(RotatingWriter {
            settings,
            file: BufWriter::new(file),
            size,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<DecisionEvent>) {
        while let Some(event) = rx.blocking_recv() {
            let mut batch = vec![event];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
                if batch.len() >= 1024 {
                    break;
                }
            }
            if let Err(error) = self.write_batch(&batch) {
                tracing::error!(path = %self.settings.path.display(), %error, "cannot write decision events");
            }
        }
        let _ = self.file.flush();
    }

    fn write_batch(&mut self, batch: &[DecisionEvent]) -> std::io::Result<()> {
        for event in batch {
            let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
            line.push(b'\n');
            if self.size > 0 && self.size + line.len() as u64 > self.settings.max_bytes {
                self.rotate()?;
            }
            self.file.write_all(&line)?;
            self.size += line.len() as u64;
        }
        // Whole lines only reach the file: a tailer never sees half an event for long.
        self.file.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let path = &self.settings.path;
        let numbered = |n: usize| rotated_path(path, n);
        let _ = std::fs::remove_file(numbered(self.settings.keep));
        for n in (1..self.settings.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        if self.settings.keep > 0 {
            std::fs::rename(path, numbered(1))?;
        } else {
            std::fs::remove_file(path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        self.file = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

/// `events.jsonl` -> `events.jsonl.N`.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A duration in milliseconds to the microsecond, so events and health documents show
/// `0.41`, not `0.40961699999999995`.
pub fn millis(elapsed: std::time::Duration) -> f64 {
    (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_written_to_the_microsecond() {
        let ms = millis(std::time::Duration::from_nanos(409_617));
        assert_eq!(serde_json::json!(ms).to_string(), "0.41");
        assert_eq!(
            millis(std::time::Duration::from_micros(1_234_567)),
            1234.567
        );
    }
    use crate::policy::Verdict;

    fn event(i: usize) -> DecisionEvent {
        DecisionEvent {
            id: format!("ev-{i}"),
            timestamp: "2026-01-01T00:00:00.000000Z".into(),
            gateway_id: "gw".into(),
            request_id: format!("req-{i}"),
            verdict: Verdict::Allow.as_str(),
            reason_code: String::new(),
            policies_evaluated: vec![],
            model: "m".into(),
            provider: None,
            target: None,
            config_version: "1.0.0".into(),
            config_hash: "sha256:x".into(),
            latency_ms: 1.0,
            status: 200,
            stream: false,
            cached: false,
            prompt_sha256: "abc".into(),
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            error: None,
            synthetic: false,
            shadow: None,
        }
    }

    /// What this gateway writes is what the fleet reads (the contract's decision fields).
    #[test]
    fn events_carry_the_contracts_decision_fields() {
        let mut e = event(1);
        e.verdict = Verdict::Block.as_str();
        e.reason_code = "prompt_injection.phrase".into();
        e.status = 409;
        e.synthetic = true;
        e.policies_evaluated = vec![crate::policy::Outcome {
            name: "prompt-injection",
            result: Verdict::Block,
            latency_us: 3,
        }];
        e.shadow = Some(crate::shadow::ShadowOutcome {
            config_hash: "sha256:y".into(),
            verdict: Verdict::Allow.as_str(),
            policy: String::new(),
            reason_code: String::new(),
        });
        let line = serde_json::to_vec(&e).expect("json");
        let read: kt_contract::DecisionFields<'_> =
            serde_json::from_slice(&line).expect("the contract reads it");
        assert_eq!(read.verdict, "block");
        assert_eq!(read.reason_code, "prompt_injection.phrase");
        assert_eq!(
            (read.config_version.as_ref(), read.config_hash.as_ref()),
            ("1.0.0", "sha256:x")
        );
        assert_eq!(read.status, 409);
        assert!(read.synthetic);
        assert_eq!(read.policies_evaluated.len(), 1);
        assert_eq!(read.policies_evaluated[0].name, "prompt-injection");
        assert_eq!(read.policies_evaluated[0].result, "block");
        assert_eq!(read.prompt_sha256, "abc");
        let shadow = read.shadow.expect("the shadow's verdict");
        assert_eq!(
            (shadow.config_hash.as_ref(), shadow.verdict.as_ref()),
            ("sha256:y", "allow")
        );
    }

    #[tokio::test]
    async fn rotates_by_size_and_keeps_n_files_with_every_line_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let (sink, handle) = start(EventsSettings {
            path: path.clone(),
            max_bytes: 2000,
            keep: 2,
        })
        .expect("start");
        for i in 0..100 {
            sink.record(event(i)).await;
        }
        drop(sink);
        handle.await.expect("writer");

        assert!(rotated_path(&path, 1).exists() && rotated_path(&path, 2).exists());
        assert!(
            !rotated_path(&path, 3).exists(),
            "only two rotated files are kept"
        );
        let mut ids = Vec::new();
        for file in [rotated_path(&path, 2), rotated_path(&path, 1), path.clone()] {
            let text = std::fs::read_to_string(&file).expect("read");
            assert!(
                text.len() as u64 <= 2000,
                "{} is {} bytes",
                file.display(),
                text.len()
            );
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).expect("whole JSON line");
                ids.push(value["id"].as_str().expect("id").to_owned());
            }
        }
        // The newest events survive, in order, with nothing duplicated.
        let last: Vec<String> = (100 - ids.len()..100).map(|i| format!("ev-{i}")).collect();
        assert_eq!(ids, last);
    }
}
