//! The decision counters with `events.nats`: the leader counts the stream, and checkpoints the
//! counters together with the stream position they count through in one fenced etcd write. A
//! new leader starts from the last checkpoint and reads on from the message after it, so no
//! batch is counted twice and none is skipped, whoever leads. Each event counts once even if
//! the stream holds it twice: the checkpoint keeps the highest sequence number counted per
//! gateway and agent epoch. Followers take each checkpoint as it is written.
//!
//! The position lives in etcd, beside the counters it belongs to, not in a durable JetStream
//! consumer: two places could disagree after a crash between the two writes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kt_proto::v1::{ConfigTally, CounterCheckpoint, EpochMark, GatewayCounters, StreamedBatch};
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::EventStream;
use super::read::{Reader, Start};
use crate::cluster::store::EtcdStore;
use crate::events::counters::{DecisionCounters, Delta, GatewayTallies, Tally};
use crate::store::StoreError;

/// How often the leader writes a checkpoint while events arrive.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Agent epochs remembered per gateway (an agent's epoch changes only with a new buffer).
const EPOCHS_KEPT: usize = 4;

const RETRY: Duration = Duration::from_secs(1);

/// What the leader has counted: the counters, the marks that make counting idempotent, and
/// the stream position.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counted {
    pub position: u64,
    pub tallies: HashMap<String, GatewayTallies>,
    /// Per gateway: the highest sequence number counted per agent epoch.
    marks: HashMap<String, BTreeMap<u64, u64>>,
}

impl Counted {
    pub fn from_checkpoint(c: &CounterCheckpoint) -> Self {
        let mut counted = Counted {
            position: c.stream_seq,
            ..Default::default()
        };
        for g in &c.gateways {
            let tallies = g
                .tallies
                .iter()
                .map(|t| {
                    let tally = Tally {
                        config_version: t.config_version.clone(),
                        region: t.region.clone(),
                        allow: t.allow,
                        block: t.block,
                        redact: t.redact,
                        escalate: t.escalate,
                        requests: t.requests,
                        errors: t.errors,
                    };
                    (t.config_hash.clone(), tally)
                })
                .collect();
            counted.tallies.insert(g.gateway_id.clone(), tallies);
            let marks = g.counted_through.iter().map(|m| (m.epoch, m.seq)).collect();
            counted.marks.insert(g.gateway_id.clone(), marks);
        }
        counted
    }

    pub fn to_checkpoint(&self, stream: &str) -> CounterCheckpoint {
        let mut gateways: Vec<&String> = self.tallies.keys().chain(self.marks.keys()).collect();
        gateways.sort_unstable();
        gateways.dedup();
        CounterCheckpoint {
            stream_seq: self.position,
            stream: stream.to_owned(),
            written_unix_ms: kt_daemon::unix_ms_now(),
            gateways: gateways
                .into_iter()
                .map(|gateway| GatewayCounters {
                    gateway_id: gateway.clone(),
                    tallies: self
                        .tallies
                        .get(gateway)
                        .into_iter()
                        .flatten()
                        .map(|(hash, t)| ConfigTally {
                            config_hash: hash.clone(),
                            config_version: t.config_version.clone(),
                            region: t.region.clone(),
                            allow: t.allow,
                            block: t.block,
                            redact: t.redact,
                            escalate: t.escalate,
                            requests: t.requests,
                            errors: t.errors,
                        })
                        .collect(),
                    counted_through: self
                        .marks
                        .get(gateway)
                        .into_iter()
                        .flatten()
                        .map(|(epoch, seq)| EpochMark {
                            epoch: *epoch,
                            seq: *seq,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Counts message `seq` of the stream; returns what it added. Events counted before (the
    /// same event stored twice) and probes add nothing.
    pub fn count(&mut self, seq: u64, batch: &StreamedBatch) -> Delta {
        let mut delta = Delta::new();
        if seq <= self.position {
            return delta;
        }
        self.position = seq;
        let marks = self.marks.entry(batch.gateway_id.clone()).or_default();
        let through = marks.entry(batch.epoch).or_default();
        if let Some(gap) = &batch.gap {
            *through = (*through).max(gap.last_seq);
        }
        for (n, event) in batch.events.iter().enumerate() {
            let event_seq = batch.first_seq + n as u64;
            if event_seq <= *through {
                continue;
            }
            *through = event_seq;
            if event.synthetic {
                continue;
            }
            let status = u16::try_from(event.status).unwrap_or(u16::MAX);
            let key = (batch.gateway_id.clone(), event.config_hash.clone());
            let t = delta.entry(key).or_insert_with(|| Tally {
                config_version: event.config_version.clone(),
                region: batch.region.clone(),
                ..Default::default()
            });
            t.add_event(&event.verdict, status);
        }
        while marks.len() > EPOCHS_KEPT {
            marks.pop_first();
        }
        for ((gateway, hash), t) in &delta {
            self.tallies
                .entry(gateway.clone())
                .or_default()
                .entry(hash.clone())
                .or_default()
                .merge(t);
        }
        delta
    }
}

/// Reads the checkpoint of `stream`, if one was written.
async fn load(store: &EtcdStore, stream: &str) -> Result<Counted, StoreError> {
    let Some(bytes) = store.get_counters(stream).await? else {
        return Ok(Counted::default());
    };
    let checkpoint = CounterCheckpoint::decode(bytes.as_slice())
        .map_err(|e| StoreError::Failed(format!("the counters' checkpoint is corrupt: {e}")))?;
    Ok(Counted::from_checkpoint(&checkpoint))
}

async fn pause(term: &CancellationToken) -> Option<()> {
    tokio::select! {
        _ = term.cancelled() => None,
        _ = tokio::time::sleep(RETRY) => Some(()),
    }
}

/// The leader's count of the stream, for as long as the term lasts. `fenced` writes only
/// while this replica leads; a refused write ends the term.
pub async fn count(
    stream: EventStream,
    fenced: EtcdStore,
    decisions: DecisionCounters,
    term: CancellationToken,
) {
    let name = stream.settings.stream.clone();
    let mut counted = loop {
        match load(&fenced, &name).await {
            Ok(counted) => break counted,
            Err(error) => {
                tracing::warn!(%error, "cannot read the counters' checkpoint; trying again")
            }
        }
        if pause(&term).await.is_none() {
            return;
        }
    };
    tracing::info!(
        position = counted.position,
        gateways = counted.tallies.len(),
        "counting decisions from the event stream"
    );
    decisions.start_counting(counted.tallies.clone());
    let _stop = StopCounting(decisions.clone());
    let mut checkpoint = tokio::time::interval(CHECKPOINT_EVERY);
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written = counted.position;
    'reopen: loop {
        let start = Start::Sequence(counted.position + 1);
        let mut reader = match Reader::open(&stream, "kt.events.>".into(), start).await {
            Ok(reader) => reader,
            Err(error) => {
                tracing::warn!(%error, "cannot read the event stream to count; trying again");
                if pause(&term).await.is_none() {
                    return;
                }
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = checkpoint.tick(), if counted.position != written => {
                    let bytes = counted.to_checkpoint(&name).encode_to_vec();
                    match fenced.put_counters(&name, bytes).await {
                        Ok(()) => written = counted.position,
                        Err(StoreError::Fenced(_)) => return,
                        Err(error) => tracing::warn!(%error, "counters' checkpoint not written; trying again"),
                    }
                }
                read = reader.next() => match read {
                    Ok(read) => {
                        if read.seq > counted.position + 1 && counted.position > 0 {
                            tracing::warn!(from = counted.position + 1, to = read.seq - 1, "event batches removed from the stream before they were counted");
                        }
                        let delta = counted.count(read.seq, &read.batch);
                        decisions.merge(&delta);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "counting stopped; reading the stream again");
                        if pause(&term).await.is_none() {
                            return;
                        }
                        continue 'reopen;
                    }
                },
            }
        }
    }
}

/// Leaves counting to the next leader, however the term ends.
struct StopCounting(DecisionCounters);

impl Drop for StopCounting {
    fn drop(&mut self) {
        self.0.stop_counting();
    }
}

/// A follower's counters: every checkpoint the leader writes, as it is written.
pub async fn follow(
    client: etcd_client::Client,
    keys: crate::cluster::keys::Keys,
    stream: String,
    decisions: DecisionCounters,
    cancel: CancellationToken,
) {
    use crate::cluster::keys::kind;
    use crate::cluster::watch::{PrefixWatch, list};
    let key = keys.one(kind::COUNTERS, &stream);
    let apply = |value: &[u8]| match CounterCheckpoint::decode(value) {
        Ok(checkpoint) => decisions.follow(Counted::from_checkpoint(&checkpoint).tallies),
        Err(error) => tracing::warn!(%error, "corrupt counters' checkpoint skipped"),
    };
    let Some((listed, revision)) = list(&client, &key, &cancel).await else {
        return;
    };
    if let Some(kv) = listed.iter().find(|kv| kv.key() == key.as_bytes()) {
        apply(kv.value());
    }
    let mut watch = PrefixWatch::new(&client, key.clone(), Some(revision + 1));
    while let Some(puts) = watch.next_puts(&cancel).await {
        if let Some(kv) = puts.iter().rev().find(|kv| kv.key() == key.as_bytes()) {
            apply(kv.value());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kt_proto::v1::{EventGap, StreamedEvent};

    fn batch(gateway: &str, epoch: u64, first_seq: u64, verdicts: &[&str]) -> StreamedBatch {
        StreamedBatch {
            gateway_id: gateway.into(),
            region: "eu".into(),
            epoch,
            first_seq,
            events: verdicts
                .iter()
                .map(|v| StreamedEvent {
                    verdict: (*v).into(),
                    config_hash: "sha256:a".into(),
                    config_version: "1.0.0".into(),
                    status: 200,
                    ..Default::default()
                })
                .collect(),
            gap: None,
        }
    }

    fn blocks(c: &Counted, gateway: &str) -> (u64, u64) {
        let t = &c.tallies[gateway]["sha256:a"];
        (t.requests, t.block)
    }

    #[test]
    fn each_event_counts_once_and_the_checkpoint_resumes_exactly() {
        let mut c = Counted::default();
        c.count(1, &batch("gw", 7, 1, &["allow", "block"]));
        // The same events stored twice (two replicas raced): nothing more.
        c.count(2, &batch("gw", 7, 1, &["allow", "block"]));
        // Overlapping: only event 3 is new.
        c.count(3, &batch("gw", 7, 2, &["block", "block"]));
        assert_eq!(blocks(&c, "gw"), (3, 2));
        // A message read again (the stream re-delivered it) adds nothing.
        assert!(c.count(3, &batch("gw", 7, 4, &["block"])).is_empty());
        // A gap moves the mark; a new epoch counts from its start.
        let mut gap = batch("gw", 7, 4, &[]);
        gap.gap = Some(EventGap {
            first_seq: 4,
            last_seq: 9,
            count: 6,
            reason: "full".into(),
        });
        c.count(4, &gap);
        c.count(5, &batch("gw", 7, 5, &["block"]));
        c.count(6, &batch("gw", 8, 1, &["block"]));
        assert_eq!(blocks(&c, "gw"), (4, 3));
        // Through a checkpoint and back: the same state, and counting goes on the same.
        let back = Counted::from_checkpoint(&c.to_checkpoint("KT_EVENTS"));
        assert_eq!(back, c);
        let mut resumed = back;
        resumed.count(7, &batch("gw", 8, 1, &["block", "allow"]));
        assert_eq!(blocks(&resumed, "gw"), (5, 3));
        assert_eq!(resumed.position, 7);
    }

    #[test]
    fn probes_are_not_counted() {
        let mut c = Counted::default();
        let mut b = batch("gw", 1, 1, &["block"]);
        b.events[0].synthetic = true;
        assert!(c.count(1, &b).is_empty());
        assert_eq!(c.position, 1);
    }
}
