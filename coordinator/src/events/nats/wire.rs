//! Agent batches as stream messages, and back.

use std::sync::Arc;

use kt_proto::v1::{StreamedBatch, StreamedEvent};
use prost::Message;

use crate::events::store::{Batch, Ingested};
use crate::events::{EventRecord, Published};

/// Room left in a message for its headers and protobuf framing.
const HEADROOM: usize = 4 * 1024;

/// One message's worth of a batch: its first sequence number and its encoding.
#[derive(Debug)]
pub struct Chunk {
    pub first_seq: u64,
    pub last_seq: u64,
    pub payload: Vec<u8>,
}

/// Cuts `batch` into messages of at most `max_payload` bytes (the server's limit), in order.
/// An event too large for any message on its own cannot be stored: `Err` names it.
pub fn encode(batch: Batch, max_payload: usize) -> Result<Vec<Chunk>, String> {
    let room = max_payload.saturating_sub(HEADROOM);
    let head = |first_seq: u64| StreamedBatch {
        gateway_id: batch.gateway.clone(),
        region: batch.region.clone(),
        epoch: batch.epoch,
        first_seq,
        events: Vec::new(),
        gap: None,
    };
    if let Some(gap) = &batch.gap {
        let mut message = head(gap.first_seq);
        message.gap = Some(gap.clone());
        return Ok(vec![Chunk {
            first_seq: gap.first_seq,
            last_seq: gap.last_seq,
            payload: message.encode_to_vec(),
        }]);
    }
    let mut chunks = Vec::new();
    let mut current = head(batch.first_seq);
    let mut size = 0;
    for ingested in batch.events {
        let seq = ingested.record.seq;
        let event = streamed(ingested);
        let len = event.encoded_len() + 8;
        if len > room {
            return Err(format!(
                "event {seq} of {} is {len} bytes, over the event stream's message limit ({max_payload} bytes)",
                batch.gateway
            ));
        }
        if size + len > room && !current.events.is_empty() {
            let next = head(seq);
            chunks.push(finish(std::mem::replace(&mut current, next)));
            size = 0;
        }
        size += len;
        current.events.push(event);
    }
    if !current.events.is_empty() {
        chunks.push(finish(current));
    }
    Ok(chunks)
}

fn finish(message: StreamedBatch) -> Chunk {
    let last_seq = message.first_seq + (message.events.len() as u64).saturating_sub(1);
    Chunk {
        first_seq: message.first_seq,
        last_seq,
        payload: message.encode_to_vec(),
    }
}

fn streamed(ingested: Ingested) -> StreamedEvent {
    let Ingested {
        record,
        config_hash,
        status,
        synthetic,
    } = ingested;
    StreamedEvent {
        body: record.body.to_vec(),
        verdict: record.verdict,
        reason: record.reason,
        config_version: record.config_version,
        config_hash,
        status: u32::from(status),
        synthetic,
        acted: record.acted,
    }
}

/// A stream message read back; `at` is when the stream stored it (Unix ms).
pub fn decode(payload: &[u8]) -> Result<StreamedBatch, prost::DecodeError> {
    StreamedBatch::decode(payload)
}

/// What a tail shows of a message: its events, or its gap.
pub fn published(batch: &StreamedBatch, at: u64) -> Vec<Published> {
    if let Some(gap) = &batch.gap {
        return vec![Published::Gap {
            gateway: batch.gateway_id.clone(),
            gap: gap.clone(),
        }];
    }
    batch
        .events
        .iter()
        .enumerate()
        .map(|(n, e)| {
            Published::Event(EventRecord {
                gateway: batch.gateway_id.clone(),
                region: batch.region.clone(),
                epoch: batch.epoch,
                seq: batch.first_seq + n as u64,
                at,
                verdict: e.verdict.clone(),
                reason: e.reason.clone(),
                config_version: e.config_version.clone(),
                acted: e.acted.clone(),
                body: Arc::from(&e.body[..]),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize, body_len: usize) -> Batch {
        let body = format!(
            r#"{{"verdict":"block","config_hash":"sha256:a","status":200,"pad":"{}"}}"#,
            "x".repeat(body_len)
        );
        Batch::new(
            "gw-1".into(),
            "eu".into(),
            9,
            100,
            vec![body.into_bytes(); n],
            None,
        )
    }

    #[test]
    fn a_batch_is_cut_at_the_payload_limit_and_reads_back_whole() {
        let chunks = encode(batch(50, 1000), 16 * 1024).expect("fits");
        assert!(chunks.len() > 1, "cut into several messages");
        let mut next = 100;
        let mut events = 0;
        for chunk in &chunks {
            assert!(chunk.payload.len() <= 16 * 1024);
            assert_eq!(chunk.first_seq, next);
            let back = decode(&chunk.payload).expect("decodes");
            assert_eq!(back.first_seq, chunk.first_seq);
            let items = published(&back, 5);
            for (i, item) in items.iter().enumerate() {
                let Published::Event(e) = item else {
                    panic!("an event");
                };
                assert_eq!(e.seq, chunk.first_seq + i as u64);
                assert_eq!((e.verdict.as_str(), e.epoch, e.at), ("block", 9, 5));
            }
            events += items.len();
            next = chunk.last_seq + 1;
        }
        assert_eq!((events, next), (50, 150));
        // One message when it fits.
        assert_eq!(encode(batch(50, 10), 1 << 20).expect("fits").len(), 1);
    }

    #[test]
    fn an_event_over_the_limit_is_refused_by_name() {
        let error = encode(batch(1, 20_000), 16 * 1024).expect_err("too large");
        assert!(error.contains("event 100 of gw-1"), "{error}");
    }
}
