//! Ingest into the stream, and the reads `events stats` and history make of it.
//!
//! An agent's batch is acknowledged only once JetStream acknowledged every message of it. The
//! agent resends from its oldest unacknowledged event after a reconnect, possibly to another
//! replica and possibly cut differently: each replica remembers how far each gateway's
//! events are stored (read back from the gateway's last message on first sight) and publishes
//! only what is new, under the id `gateway:epoch:first_seq`, which JetStream deduplicates
//! when two replicas race. Readers skip any event they have already seen, so even a
//! duplicate that got past both is shown and counted once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::HeaderMap;
use kt_proto::v1::EventStatsRow;
use std::sync::{Mutex, MutexGuard};

use super::read::{Reader, Start};
use super::{EventStream, message_id, wire};
use crate::events::store::Batch;
use crate::events::{EventLog, Filter, Published, stats_add};

/// A bounded read ends when the stream is silent this long (messages removed meanwhile).
const READ_IDLE: Duration = Duration::from_secs(10);

pub struct StreamLog {
    stream: EventStream,
    /// Per gateway: the agent epoch and the highest sequence number stored in the stream.
    stored_through: Mutex<StoredThrough>,
}

type StoredThrough = HashMap<String, (u64, u64)>;

impl StreamLog {
    pub fn new(stream: EventStream) -> Self {
        StreamLog {
            stream,
            stored_through: Mutex::new(HashMap::new()),
        }
    }

    fn stored_through(&self) -> MutexGuard<'_, StoredThrough> {
        self.stored_through
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// How far `gateway`'s events are stored: remembered, or read from its last message.
    async fn stored_through_of(&self, gateway: &str) -> Result<Option<(u64, u64)>, String> {
        if let Some(known) = self.stored_through().get(gateway).copied() {
            return Ok(Some(known));
        }
        let handle = self.stream.stream().await.map_err(|e| e.to_string())?;
        let subject = self.stream.subject(gateway);
        match handle.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => {
                let batch = wire::decode(&message.payload).map_err(|e| e.to_string())?;
                let last = match &batch.gap {
                    Some(gap) => gap.last_seq,
                    None => batch.first_seq + (batch.events.len() as u64).saturating_sub(1),
                };
                Ok(Some((batch.epoch, last)))
            }
            Err(error)
                if error.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(error) => Err(format!("cannot read {subject}: {error}")),
        }
    }

    /// Publishes one message and waits for JetStream to store it.
    async fn publish(&self, gateway: &str, epoch: u64, chunk: wire::Chunk) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            message_id(gateway, epoch, chunk.first_seq).as_str(),
        );
        let ack = self
            .stream
            .js
            .publish_with_headers(self.stream.subject(gateway), headers, chunk.payload.into())
            .await
            .map_err(|e| format!("event stream: {e}"))?;
        ack.await.map_err(|e| format!("event stream: {e}"))?;
        Ok(())
    }

    /// Reads `filter`'s matches from `since` to the stream's end as it is now.
    async fn read_until_now(
        &self,
        filter: &Filter,
        since: u64,
        mut each: impl FnMut(Published) -> bool,
    ) -> Result<(), String> {
        let start = if since == 0 {
            Start::All
        } else {
            Start::Time(since)
        };
        let mut reader = Reader::open(&self.stream, subject_filter(filter), start).await?;
        if reader.pending_at_start == 0 {
            return Ok(());
        }
        let mut seen: HashMap<(String, u64), u64> = HashMap::new();
        loop {
            let Ok(read) = tokio::time::timeout(READ_IDLE, reader.next()).await else {
                return Ok(());
            };
            let read = read?;
            for item in wire::published(&read.batch, read.at) {
                if !filter.matches_published(&item) || !first_sight(&mut seen, &item) {
                    continue;
                }
                if !each(item) {
                    return Ok(());
                }
            }
            if read.pending == 0 {
                return Ok(());
            }
        }
    }
}

/// The narrowest subject a filter allows: one gateway's, or all.
pub fn subject_filter(filter: &Filter) -> String {
    match &filter.gateways {
        Some(set) if set.len() == 1 => set
            .iter()
            .next()
            .map_or_else(|| "kt.events.>".to_owned(), |g| super::gateway_filter(g)),
        _ => "kt.events.>".into(),
    }
}

/// Whether `item` is new to a reader that remembers the highest sequence number per gateway
/// and epoch.
pub fn first_sight(seen: &mut HashMap<(String, u64), u64>, item: &Published) -> bool {
    let Published::Event(e) = item else {
        return true;
    };
    let last = seen.entry((e.gateway.clone(), e.epoch)).or_default();
    if e.seq <= *last {
        return false;
    }
    *last = e.seq;
    true
}

#[tonic::async_trait]
impl EventLog for StreamLog {
    async fn ingest(&self, mut batch: Batch) -> Result<(), String> {
        let gateway = batch.gateway.clone();
        let epoch = batch.epoch;
        let through = match self.stored_through_of(&gateway).await? {
            Some((stored_epoch, seq)) if stored_epoch == epoch => seq,
            _ => 0,
        };
        if batch.last_seq() <= through {
            return Ok(()); // stored already: sent again after a reconnect
        }
        // Only what is new: a resent batch may overlap what is stored.
        batch.events.retain(|e| e.record.seq > through);
        if let Some(first) = batch.events.first() {
            batch.first_seq = first.record.seq;
        }
        let last = batch.last_seq();
        let max_payload = self.stream.client.server_info().max_payload;
        for chunk in wire::encode(batch, max_payload)? {
            self.publish(&gateway, epoch, chunk).await?;
        }
        self.stored_through().insert(gateway, (epoch, last));
        Ok(())
    }

    fn session_ended(&self, gateway: &str) {
        self.stored_through().remove(gateway);
    }

    async fn query(&self, filter: Filter, since: u64, limit: u64) -> Vec<Published> {
        let mut out = Vec::new();
        let mut events = 0;
        let read = self
            .read_until_now(&filter, since, |item| {
                if matches!(item, Published::Event(_)) {
                    events += 1;
                }
                out.push(item);
                limit == 0 || events < limit
            })
            .await;
        if let Err(error) = read {
            tracing::warn!(%error, "event history incomplete");
        }
        out
    }

    async fn flips(
        &self,
        filter: Filter,
        since: u64,
        mut tally: crate::shadow::flips::FlipTally,
    ) -> Option<crate::shadow::flips::FlipTally> {
        let read = self
            .read_until_now(&filter, since, |item| match &item {
                Published::Event(e) => tally.add(e),
                Published::Gap { .. } => true,
            })
            .await;
        match read {
            Ok(_) => Some(tally),
            Err(error) => {
                tracing::warn!(%error, "shadow flips unreadable");
                None
            }
        }
    }

    async fn stats(&self, filter: Filter, by: String, since: u64) -> Vec<EventStatsRow> {
        let mut rows: BTreeMap<String, EventStatsRow> = BTreeMap::new();
        let read = self
            .read_until_now(&filter, since, |item| {
                if let Published::Event(e) = &item {
                    stats_add(&mut rows, &by, e);
                }
                true
            })
            .await;
        if let Err(error) = read {
            tracing::warn!(%error, "event stats incomplete");
        }
        rows.into_values().collect()
    }
}
