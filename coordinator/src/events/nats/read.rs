//! Reading the stream in order, with an ordered push consumer (the kind that kept up here;
//! see DEPENDENCIES.md): recreated by the client after a reconnect, from where it stopped.

use async_nats::jetstream::consumer::{DeliverPolicy, push};
use kt_proto::v1::StreamedBatch;
use tokio_stream::StreamExt;

use super::{EventStream, wire};

/// Where a read starts.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// Every message still kept.
    All,
    /// Messages stored from this time on (Unix ms).
    Time(u64),
    /// Messages stored after the read begins.
    New,
    /// From this stream sequence number on.
    Sequence(u64),
}

/// One message read back.
#[derive(Debug)]
pub struct Read {
    pub batch: StreamedBatch,
    /// The message's stream sequence number.
    pub seq: u64,
    /// When the stream stored it (Unix ms).
    pub at: u64,
    /// Messages still to deliver to this reader when this one was sent.
    pub pending: u64,
}

pub struct Reader {
    messages: push::Ordered,
    /// Matching messages waiting when the read began: 0 means a bounded read is already done.
    pub pending_at_start: u64,
}

impl Reader {
    /// Opens a read of `filter` (a subject, `kt.events.>` for all) from `start`.
    pub async fn open(stream: &EventStream, filter: String, start: Start) -> Result<Self, String> {
        let deliver_policy = match start {
            Start::All => DeliverPolicy::All,
            Start::New => DeliverPolicy::New,
            Start::Sequence(n) => DeliverPolicy::ByStartSequence {
                start_sequence: n.max(1),
            },
            Start::Time(ms) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(ms) * 1_000_000,
                )
                .map_err(|e| format!("start time {ms}: {e}"))?,
            },
        };
        let config = push::OrderedConfig {
            deliver_subject: stream.client.new_inbox(),
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        };
        let handle = stream.stream().await.map_err(|e| e.to_string())?;
        let consumer = handle
            .create_consumer(config)
            .await
            .map_err(|e| format!("cannot read the event stream: {e}"))?;
        let pending_at_start = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| format!("cannot read the event stream: {e}"))?;
        Ok(Reader {
            messages,
            pending_at_start,
        })
    }

    /// The next message; `Err` when the stream cannot be read any more. Messages that are not
    /// batches (written by something else) are skipped with a warning.
    pub async fn next(&mut self) -> Result<Read, String> {
        loop {
            let message = match self.messages.next().await {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(format!("event stream: {error}")),
                None => return Err("event stream closed".into()),
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let at = u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            match wire::decode(&message.payload) {
                Ok(batch) => {
                    return Ok(Read {
                        batch,
                        seq,
                        at,
                        pending,
                    });
                }
                Err(error) => {
                    tracing::warn!(seq, subject = %message.subject, %error, "not an event batch: skipped");
                }
            }
        }
    }
}
