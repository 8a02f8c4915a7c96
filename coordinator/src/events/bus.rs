//! Fan-out of stored events to tail subscribers, filters applied here, on the server.
//!
//! Each subscriber has a bounded queue. A subscriber that reads too slowly loses events, never
//! slows ingest or anyone else, and is told how many it missed as soon as it has room again.

use std::sync::Arc;

use kt_proto::v1::{TailEventsResponse, tail_events_response::Item};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Filter, Published, to_proto};
use crate::metrics::Metrics;

/// Items queued towards one subscriber.
pub const SUBSCRIBER_QUEUE: usize = 8192;

struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<TailEventsResponse>,
    missed: u64,
}

impl Subscriber {
    /// Sends the count of missed events if there is room; false once the subscriber has gone.
    fn tell_missed(&mut self) -> bool {
        if self.missed == 0 {
            return !self.tx.is_closed();
        }
        match self.tx.try_send(TailEventsResponse {
            item: Some(Item::Missed(self.missed)),
        }) {
            Ok(()) => {
                self.missed = 0;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Delivers one item; false once the subscriber has gone.
    fn deliver(&mut self, item: &Published, metrics: &Metrics) -> bool {
        if !self.tell_missed() {
            return false;
        }
        if self.missed > 0 {
            // Still no room for the notice: this item is missed too.
            self.missed += 1;
            metrics.events_missed_by_subscribers.inc();
            return true;
        }
        match self.tx.try_send(to_proto(item)) {
            Ok(()) => {
                metrics.events_delivered.inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.missed += 1;
                metrics.events_missed_by_subscribers.inc();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[derive(Debug)]
pub struct Subscribe {
    pub filter: Filter,
    pub reply: tokio::sync::oneshot::Sender<mpsc::Receiver<TailEventsResponse>>,
}

#[derive(Clone, Debug)]
pub struct BusHandle {
    subscribe: mpsc::Sender<Subscribe>,
}

#[tonic::async_trait]
impl super::EventBus for BusHandle {
    async fn subscribe(&self, filter: Filter) -> Option<mpsc::Receiver<TailEventsResponse>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.subscribe
            .send(Subscribe { filter, reply })
            .await
            .ok()?;
        rx.await.ok()
    }
}

pub struct Bus {
    published: mpsc::Receiver<Arc<Vec<Published>>>,
    subscribe: mpsc::Receiver<Subscribe>,
    subscribers: Vec<Subscriber>,
    metrics: Arc<Metrics>,
}

impl Bus {
    /// The bus and the sender the event store publishes into.
    pub fn new(metrics: Arc<Metrics>) -> (Self, BusHandle, mpsc::Sender<Arc<Vec<Published>>>) {
        let (publish, published) = mpsc::channel(1024);
        let (subscribe_tx, subscribe) = mpsc::channel(64);
        (
            Bus {
                published,
                subscribe,
                subscribers: Vec::new(),
                metrics,
            },
            BusHandle {
                subscribe: subscribe_tx,
            },
            publish,
        )
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        // A subscriber that missed events hears of it even when nothing new is published.
        let mut notify = tokio::time::interval(std::time::Duration::from_millis(100));
        notify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = notify.tick() => {
                    self.subscribers.retain_mut(Subscriber::tell_missed);
                    let lag = self.subscribers.iter().map(|s| SUBSCRIBER_QUEUE - s.tx.capacity()).max().unwrap_or(0);
                    self.metrics.subscriber_lag.set(lag as i64);
                    self.metrics.subscribers.set(self.subscribers.len() as i64);
                }
                Some(Subscribe { filter, reply }) = self.subscribe.recv() => {
                    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
                    if reply.send(rx).is_ok() {
                        self.subscribers.push(Subscriber { filter, tx, missed: 0 });
                    }
                }
                batch = self.published.recv() => {
                    let Some(batch) = batch else { return };
                    self.subscribers.retain_mut(|s| {
                        let wanted: Vec<&Published> = batch.iter().filter(|p| s.filter.matches_published(p)).collect();
                        wanted.into_iter().all(|p| s.deliver(p, &self.metrics))
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventBus, EventRecord};

    fn event(seq: u64) -> Published {
        Published::Event(EventRecord {
            gateway: "gw".into(),
            region: String::new(),
            epoch: 1,
            seq,
            at: 0,
            verdict: "allow".into(),
            reason: String::new(),
            config_version: String::new(),
            acted: vec![],
            body: Arc::from(&b"{}"[..]),
        })
    }

    #[tokio::test]
    async fn a_stalled_subscriber_loses_events_and_is_told_how_many_while_others_get_all() {
        let (bus, handle, publish) = Bus::new(Default::default());
        let cancel = CancellationToken::new();
        tokio::spawn(bus.run(cancel.clone()));
        let mut stalled = handle
            .subscribe(Filter::default())
            .await
            .expect("subscribe");
        let mut reader = handle
            .subscribe(Filter::default())
            .await
            .expect("subscribe");
        let total = SUBSCRIBER_QUEUE as u64 + 100;
        // The reader keeps up batch by batch; the stalled subscriber never reads.
        for chunk in (1..=total).collect::<Vec<_>>().chunks(500) {
            publish
                .send(Arc::new(chunk.iter().map(|s| event(*s)).collect()))
                .await
                .expect("publish");
            for _ in chunk {
                let item = tokio::time::timeout(std::time::Duration::from_secs(10), reader.recv())
                    .await
                    .expect("in time");
                assert!(
                    matches!(item.and_then(|r| r.item), Some(Item::Event(_))),
                    "the reader gets every event"
                );
            }
        }
        // The stalled one holds a full queue; the rest was counted as missed.
        let mut events = 0;
        while let Ok(item) = stalled.try_recv() {
            assert!(matches!(item.item, Some(Item::Event(_))));
            events += 1;
        }
        assert_eq!(events, SUBSCRIBER_QUEUE);
        publish
            .send(Arc::new(vec![event(total + 1)]))
            .await
            .expect("publish");
        let notice = stalled.recv().await.and_then(|r| r.item);
        assert_eq!(notice, Some(Item::Missed(100)));
        cancel.cancel();
    }
}
