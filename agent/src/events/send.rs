//! Sending buffered events on the `Events` stream, within the credit the coordinator grants,
//! reconnecting with the same backoff as the control session.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use kt_proto::v1::agent_service_client::AgentServiceClient;
use kt_proto::v1::{EventAck, EventBatch, EventGap};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use super::spool::Item;
use super::{ForwardingReport, SharedSpool, lock};
use crate::session::SessionSettings;

/// Events per batch, and their bytes: well under the 4 MiB a gRPC message may hold by default
/// (an event is at most 1 MiB, see `kt_contract::MAX_EVENT_BYTES`).
const BATCH: usize = 2000;
const BATCH_BYTES: usize = 2 << 20;
/// Batches in flight before the first acknowledgement grants credit.
const INITIAL_CREDIT: u32 = 4;

pub async fn run(
    settings: Arc<SessionSettings>,
    spool: SharedSpool,
    appended: Arc<Notify>,
    report: ForwardingReport,
    cancel: CancellationToken,
) {
    let mut attempt: u64 = 0;
    loop {
        let backoff = settings.backoff();
        let open = || {
            attempt += 1;
            let endpoint = settings.endpoint(attempt).to_owned();
            let settings = settings.clone();
            async move { open(&settings, &endpoint).await }
        };
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            opened = open.retry(backoff).notify(|error: &anyhow::Error, delay: Duration| {
                tracing::debug!(error = format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "cannot open the events stream");
            }) => opened,
        };
        let Ok((outbound, acks)) = opened else {
            continue;
        };
        match stream(&spool, &appended, &report, outbound, acks, &cancel).await {
            Ok(()) => return,
            Err(error) => tracing::info!(%error, "events stream lost, reconnecting"),
        }
    }
}

async fn open(
    settings: &SessionSettings,
    endpoint: &str,
) -> anyhow::Result<(mpsc::Sender<EventBatch>, Streaming<EventAck>)> {
    let channel = settings.channel(endpoint).await?;
    let (tx, rx) = mpsc::channel(INITIAL_CREDIT as usize * 2);
    let acks = AgentServiceClient::new(channel)
        .events(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, acks))
}

/// Sends from the oldest unacknowledged item on; returns `Ok` only when cancelled.
async fn stream(
    spool: &SharedSpool,
    appended: &Notify,
    report: &ForwardingReport,
    outbound: mpsc::Sender<EventBatch>,
    mut acks: Streaming<EventAck>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let (epoch, mut sent_through) = {
        let s = lock(spool);
        (s.epoch, s.acked_through()?)
    };
    let mut credit = INITIAL_CREDIT;
    // Last sequence number of each batch not yet acknowledged.
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    loop {
        while (in_flight.len() as u32) < credit {
            let spool = spool.clone();
            let items = tokio::task::spawn_blocking(move || {
                lock(&spool).read_after(sent_through, BATCH, BATCH_BYTES)
            })
            .await??;
            let Some(batch) = to_batch(epoch, &items) else {
                break;
            };
            let last = items.last().map(Item::last_seq).unwrap_or(sent_through);
            outbound
                .send(batch)
                .await
                .map_err(|_| anyhow::anyhow!("events stream closed"))?;
            sent_through = last;
            in_flight.push_back(last);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = appended.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            ack = acks.message() => {
                let Some(ack) = ack? else { anyhow::bail!("the coordinator ended the events stream") };
                if ack.epoch == epoch {
                    let through = ack.durable_through_seq;
                    while in_flight.front().is_some_and(|last| *last <= through) {
                        in_flight.pop_front();
                    }
                    let spool = spool.clone();
                    let report = report.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut spool = lock(&spool);
                        let deleted = spool.ack(through)?;
                        report.acknowledged(deleted);
                        report.update(&spool);
                        Ok::<_, rusqlite::Error>(())
                    })
                    .await??;
                }
                credit = ack.credit.max(1);
            }
        }
    }
}

/// One batch: a run of events, or a single gap.
fn to_batch(epoch: u64, items: &[Item]) -> Option<EventBatch> {
    match items.first()? {
        Item::Gap {
            first_seq,
            last_seq,
            count,
            reason,
        } => Some(EventBatch {
            epoch,
            first_seq: *first_seq,
            events: Vec::new(),
            gap: Some(EventGap {
                first_seq: *first_seq,
                last_seq: *last_seq,
                count: *count,
                reason: reason.clone(),
            }),
        }),
        Item::Event { seq, .. } => Some(EventBatch {
            epoch,
            first_seq: *seq,
            events: items
                .iter()
                .map_while(|item| match item {
                    Item::Event { body, .. } => Some(body.clone()),
                    Item::Gap { .. } => None,
                })
                .collect(),
            gap: None,
        }),
    }
}
