//! Following every change under a key prefix, across broken streams: a stream that breaks is
//! opened again right after the last revision seen, so nothing is missed, unless etcd compacted
//! past it, which the follower is told (it then lists again, or starts from now).

use std::time::Duration;

use etcd_client::{Client, Event, EventType, KeyValue, WatchOptions, WatchStream};
use tokio_util::sync::CancellationToken;

/// What a watch yields.
pub enum Watched {
    Events(Vec<Event>),
    /// etcd compacted the history this watch needed: changes were lost; the next call follows
    /// from now.
    Compacted,
}

pub struct PrefixWatch {
    client: Client,
    prefix: String,
    /// Where a new stream starts: right after the last revision seen (none: from now).
    next: Option<i64>,
    stream: Option<WatchStream>,
}

/// The pause between failed attempts to open a stream.
const RETRY: Duration = Duration::from_millis(500);

impl PrefixWatch {
    /// Follows `prefix` from revision `from` on (inclusive), or from now.
    pub fn new(client: &Client, prefix: String, from: Option<i64>) -> Self {
        PrefixWatch {
            client: client.clone(),
            prefix,
            next: from,
            stream: None,
        }
    }

    /// The next changes, in order; `None` once `cancel` fires.
    pub async fn next(&mut self, cancel: &CancellationToken) -> Option<Watched> {
        loop {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    let mut options = WatchOptions::new().with_prefix();
                    if let Some(revision) = self.next {
                        options = options.with_start_revision(revision);
                    }
                    let mut watches = super::watches(&self.client);
                    let opened = tokio::select! {
                        _ = cancel.cancelled() => return None,
                        opened = watches.watch(self.prefix.clone(), Some(options)) => opened,
                    };
                    match opened {
                        Ok(stream) => self.stream.insert(stream),
                        Err(error) => {
                            tracing::debug!(prefix = %self.prefix, %error, "cannot watch; trying again");
                            pause(cancel).await?;
                            continue;
                        }
                    }
                }
            };
            let message = tokio::select! {
                _ = cancel.cancelled() => return None,
                message = stream.message() => message,
            };
            let answer = match message {
                Ok(Some(answer)) => answer,
                Ok(None) | Err(_) => {
                    self.stream = None;
                    pause(cancel).await?;
                    continue;
                }
            };
            if answer.compact_revision() > 0 {
                self.stream = None;
                self.next = None;
                return Some(Watched::Compacted);
            }
            if answer.canceled() {
                self.stream = None;
                continue;
            }
            if self.next.is_none() {
                // Following from now: what comes after the revision the stream was opened at.
                self.next = answer.header().map(|h| h.revision() + 1);
            }
            let Some(last) = answer.events().last().and_then(|e| e.kv()) else {
                continue;
            };
            self.next = Some(last.mod_revision() + 1);
            return Some(Watched::Events(answer.events().to_vec()));
        }
    }

    /// The keys put next, with their values; deletions are passed over, and so are changes a
    /// compaction took (for followers whose writers make them again: offers, answers).
    pub async fn next_puts(&mut self, cancel: &CancellationToken) -> Option<Vec<KeyValue>> {
        loop {
            let Watched::Events(events) = self.next(cancel).await? else {
                continue;
            };
            let puts: Vec<KeyValue> = events
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .filter_map(|e| e.kv().cloned())
                .collect();
            if !puts.is_empty() {
                return Some(puts);
            }
        }
    }
}

async fn pause(cancel: &CancellationToken) -> Option<()> {
    tokio::select! {
        _ = cancel.cancelled() => None,
        _ = tokio::time::sleep(RETRY) => Some(()),
    }
}

/// Every key under `prefix` and the revision they were read at, retried until etcd answers;
/// `None` once `cancel` fires.
pub async fn list(
    client: &Client,
    prefix: &str,
    cancel: &CancellationToken,
) -> Option<(Vec<etcd_client::KeyValue>, i64)> {
    read(
        client,
        prefix,
        etcd_client::GetOptions::new().with_prefix(),
        cancel,
    )
    .await
}

/// etcd's revision now (a read of one key), retried until etcd answers; `None` once `cancel`
/// fires. A watch started from it sees every change made after this call.
pub async fn revision_now(client: &Client, key: &str, cancel: &CancellationToken) -> Option<i64> {
    let options = etcd_client::GetOptions::new().with_keys_only();
    Some(read(client, key, options, cancel).await?.1)
}

async fn read(
    client: &Client,
    prefix: &str,
    options: etcd_client::GetOptions,
    cancel: &CancellationToken,
) -> Option<(Vec<etcd_client::KeyValue>, i64)> {
    loop {
        let mut kv = super::kv(client);
        let listed = kv.get(prefix, Some(options.clone()));
        let listed = tokio::select! {
            _ = cancel.cancelled() => return None,
            listed = tokio::time::timeout(Duration::from_secs(5), listed) => listed,
        };
        match listed {
            Ok(Ok(mut answer)) => {
                let revision = answer.header().map_or(0, |h| h.revision());
                return Some((answer.take_kvs(), revision));
            }
            Ok(Err(error)) => tracing::debug!(%prefix, %error, "cannot list; trying again"),
            Err(_) => tracing::debug!(%prefix, "cannot list: etcd did not answer; trying again"),
        }
        pause(cancel).await?;
    }
}
