//! The block rate over time for the console's chart: the fleet's decision events, from 30
//! minutes back and then live, counted in 10-second buckets per config version and per gateway.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kt_proto::v1::operator_service_client::OperatorServiceClient;
use kt_proto::v1::tail_events_response::Item;
use kt_proto::v1::{EventFilter, TailEventsRequest};
use serde::Serialize;
use tonic::transport::Channel;

pub const BUCKET_MS: u64 = 10_000;
/// How far back the chart reaches.
pub const WINDOW_MS: u64 = 30 * 60 * 1000;

/// Requests and blocks in one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub total: u64,
    pub blocked: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Bucket {
    /// Start of the bucket, Unix ms.
    pub at: u64,
    pub by_version: BTreeMap<String, Count>,
    pub by_gateway: BTreeMap<String, Count>,
}

/// The buckets of the last [`WINDOW_MS`], oldest first.
#[derive(Clone, Debug, Default)]
pub struct Series {
    buckets: Arc<Mutex<VecDeque<Bucket>>>,
}

impl Series {
    /// Counts one decision stored at `at_ms`.
    pub fn add(&self, at_ms: u64, gateway: &str, version: &str, blocked: bool) {
        let start = at_ms - at_ms % BUCKET_MS;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let index = match buckets.iter().rposition(|b| b.at <= start) {
            Some(i) if buckets[i].at == start => i,
            Some(i) => {
                buckets.insert(
                    i + 1,
                    Bucket {
                        at: start,
                        ..Default::default()
                    },
                );
                i + 1
            }
            None => {
                buckets.push_front(Bucket {
                    at: start,
                    ..Default::default()
                });
                0
            }
        };
        let bucket = &mut buckets[index];
        for count in [
            bucket.by_version.entry(version.to_owned()).or_default(),
            bucket.by_gateway.entry(gateway.to_owned()).or_default(),
        ] {
            count.total += 1;
            count.blocked += u64::from(blocked);
        }
        let newest = buckets.back().map_or(start, |b| b.at);
        while buckets.front().is_some_and(|b| b.at + WINDOW_MS < newest) {
            buckets.pop_front();
        }
    }

    pub fn snapshot(&self) -> Vec<Bucket> {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Feeds `series` from the fleet's event tail until the console stops; reconnects after errors.
pub async fn follow(client: OperatorServiceClient<Channel>, series: Series) {
    let mut since = kt_daemon::unix_ms_now().saturating_sub(WINDOW_MS).max(1);
    loop {
        let mut client = client.clone();
        let request = TailEventsRequest {
            filter: Some(EventFilter::default()),
            since_unix_ms: since,
            limit: 0,
            no_follow: false,
        };
        match client.tail_events(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Ok(Some(response)) = stream.message().await {
                    if let Some(Item::Event(event)) = response.item {
                        let body: serde_json::Value =
                            serde_json::from_slice(&event.event).unwrap_or_default();
                        let version = body["config_version"].as_str().unwrap_or("unknown");
                        let blocked = body["verdict"] == "block";
                        series.add(event.stored_at_unix_ms, &event.gateway_id, version, blocked);
                        since = since.max(event.stored_at_unix_ms + 1);
                    }
                }
            }
            Err(status) => tracing::debug!(%status, "the console's decision tail failed"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_fall_in_ten_second_buckets_per_version_and_gateway() {
        let series = Series::default();
        series.add(1_000_005, "gw-1", "1.0.0", false);
        series.add(1_000_009, "gw-1", "1.0.0", true);
        series.add(1_000_011, "gw-2", "1.1.0", true);
        series.add(999_999, "gw-1", "1.0.0", false);
        let buckets = series.snapshot();
        assert_eq!(
            buckets.iter().map(|b| b.at).collect::<Vec<_>>(),
            [990_000, 1_000_000]
        );
        let last = &buckets[1];
        assert_eq!(
            last.by_version["1.0.0"],
            Count {
                total: 2,
                blocked: 1
            }
        );
        assert_eq!(
            last.by_version["1.1.0"],
            Count {
                total: 1,
                blocked: 1
            }
        );
        assert_eq!(
            last.by_gateway["gw-1"],
            Count {
                total: 2,
                blocked: 1
            }
        );
        // Older than the window is forgotten.
        series.add(1_000_000 + WINDOW_MS + BUCKET_MS, "gw-1", "1.0.0", false);
        assert!(series.snapshot().iter().all(|b| b.at > 990_000));
    }
}
