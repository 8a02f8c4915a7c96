//! Tails: what `ktctl events tail` receives. [`Tails`] is where a tail reads from: the embedded
//! store and bus of one coordinator ([`EmbeddedTails`]), or the event stream shared by replicas
//! and regions (`nats::tail`). Both send through a [`TailSender`], which never sends an event
//! twice.

use std::collections::HashMap;
use std::sync::Arc;

use kt_proto::v1::{self, TailEventsResponse, tail_events_response::Item};
use tokio::sync::mpsc;
use tonic::Status;

use super::{EventBus, EventLog, Filter, Published, to_proto};

/// Items queued towards one tail's gRPC stream.
pub const TAIL_QUEUE: usize = 256;

pub type TailItems = mpsc::Receiver<Result<TailEventsResponse, Status>>;

/// A tail as asked: `since` 0 means live only (or everything kept, without `follow`).
#[derive(Clone, Debug)]
pub struct TailRequest {
    pub filter: Filter,
    pub since: u64,
    pub limit: u64,
    pub follow: bool,
}

#[tonic::async_trait]
pub trait Tails: Send + Sync {
    /// Starts a tail; its items arrive on the receiver until it is dropped or the tail ends.
    async fn tail(&self, request: TailRequest) -> Result<TailItems, String>;
}

/// One tail's progress: what it sent, so that replays and live events never repeat one.
pub struct TailSender {
    tx: mpsc::Sender<Result<TailEventsResponse, Status>>,
    limit: u64,
    sent: u64,
    /// Highest sequence number sent per gateway and epoch (looked up without allocating).
    seen: HashMap<String, HashMap<u64, u64>>,
    /// Storage time of the last event sent: where a replay starts.
    pub last_at: u64,
}

impl TailSender {
    pub fn new(
        tx: mpsc::Sender<Result<TailEventsResponse, Status>>,
        limit: u64,
        since: u64,
    ) -> Self {
        TailSender {
            tx,
            limit,
            sent: 0,
            seen: HashMap::new(),
            last_at: since,
        }
    }

    /// Sends items not sent yet; false when the tail is done or gone.
    pub async fn send_all(&mut self, items: &[Published]) -> bool {
        for item in items {
            if !self.send(item).await {
                return false;
            }
        }
        true
    }

    pub async fn send(&mut self, item: &Published) -> bool {
        match to_proto(item).item {
            Some(Item::Event(e)) => self.send_event(e).await,
            other => self.send_other(other).await,
        }
    }

    /// Sends a notice (a gap, a count of missed events, a scope); false once the tail is gone.
    pub async fn send_other(&self, item: Option<Item>) -> bool {
        self.tx.send(Ok(TailEventsResponse { item })).await.is_ok()
    }

    pub async fn send_event(&mut self, e: v1::TailedEvent) -> bool {
        if !self.seen.contains_key(&e.gateway_id) {
            self.seen.insert(e.gateway_id.clone(), HashMap::new());
        }
        let Some(epochs) = self.seen.get_mut(&e.gateway_id) else {
            return true;
        };
        let last = epochs.entry(e.epoch).or_default();
        if e.seq <= *last {
            return true;
        }
        *last = e.seq;
        self.last_at = self.last_at.max(e.stored_at_unix_ms);
        if self
            .tx
            .send(Ok(TailEventsResponse {
                item: Some(Item::Event(e)),
            }))
            .await
            .is_err()
        {
            return false;
        }
        self.sent += 1;
        self.limit == 0 || self.sent < self.limit
    }

    /// Ends the tail with an error the operator sees.
    pub async fn fail(&self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }
}

/// Tails of one coordinator: history from the embedded store, live events from the bus.
pub struct EmbeddedTails {
    pub log: Arc<dyn EventLog>,
    pub bus: Arc<dyn EventBus>,
}

#[tonic::async_trait]
impl Tails for EmbeddedTails {
    async fn tail(&self, request: TailRequest) -> Result<TailItems, String> {
        // Subscribe before reading history, so nothing falls between the two.
        let mut live = if request.follow {
            Some(
                self.bus
                    .subscribe(request.filter.clone())
                    .await
                    .ok_or("event bus stopped")?,
            )
        } else {
            None
        };
        let history = if request.since > 0 || !request.follow {
            self.log
                .query(request.filter.clone(), request.since, request.limit)
                .await
        } else {
            Vec::new()
        };
        let (tx, rx) = mpsc::channel(TAIL_QUEUE);
        let since = if request.since > 0 {
            request.since
        } else {
            kt_daemon::unix_ms_now()
        };
        let mut tail = TailSender::new(tx, request.limit, since);
        let log = self.log.clone();
        let filter = request.filter;
        tokio::spawn(async move {
            if !tail.send_all(&history).await {
                return;
            }
            let Some(live) = live.as_mut() else { return };
            while let Some(item) = live.recv().await {
                let go_on = match item.item {
                    // This tail fell behind the bus: what it missed is stored, so read it back.
                    Some(Item::Missed(_)) => {
                        let recovered = log.query(filter.clone(), tail.last_at, 0).await;
                        tail.send_all(&recovered).await
                    }
                    Some(Item::Event(e)) => tail.send_event(e).await,
                    other => tail.send_other(other).await,
                };
                if !go_on {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
