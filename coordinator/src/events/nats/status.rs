//! The event stream as `ktctl cluster status` and `ktctl doctor` show it: reachable or not,
//! its size and end, how far the leader has counted, and each region link's lag.

use std::time::{Duration, Instant};

use kt_proto::v1::{CounterCheckpoint, EventBusStatus, RegionLink};
use prost::Message;

use super::EventStream;
use crate::cluster::store::EtcdStore;

/// What the answering replica sees of the bus, each question bounded by `timeout`.
pub async fn bus_status(
    stream: &EventStream,
    store: &EtcdStore,
    timeout: Duration,
) -> EventBusStatus {
    let s = &stream.settings;
    let mut status = EventBusStatus {
        urls: s.urls.clone(),
        stream: s.stream.clone(),
        region: s.region.clone(),
        ..Default::default()
    };
    let asked = Instant::now();
    let info = async {
        let mut handle = stream
            .js
            .get_stream(&s.stream)
            .await
            .map_err(|e| e.to_string())?;
        handle.info().await.cloned().map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, info).await {
        Ok(Ok(info)) => {
            status.reachable = true;
            status.latency_us = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
            status.messages = info.state.messages;
            status.bytes = info.state.bytes;
            status.last_seq = info.state.last_sequence;
            status.last_unix_ms =
                u64::try_from(info.state.last_timestamp.unix_timestamp_nanos() / 1_000_000)
                    .unwrap_or(0);
            // Servers that leave the filter out of a source's state list the sources in the
            // order of the stream's config.
            let configured = info.config.sources.clone().unwrap_or_default();
            status.links = info
                .sources
                .iter()
                .enumerate()
                .map(|(i, source)| RegionLink {
                    region: region_of(
                        source
                            .filter_subject
                            .as_deref()
                            .or_else(|| configured.get(i)?.filter_subject.as_deref()),
                    ),
                    lag: source.lag,
                    active_ms_ago: source
                        .active
                        .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                })
                .collect();
        }
        Ok(Err(error)) => status.error = error,
        Err(_) => status.error = format!("no answer within {timeout:?}"),
    }
    if let Ok(Some(bytes)) = store.get_counters(&s.stream).await
        && let Ok(checkpoint) = CounterCheckpoint::decode(bytes.as_slice())
    {
        status.counted_through_seq = checkpoint.stream_seq;
        status.checkpoint_unix_ms = checkpoint.written_unix_ms;
    }
    status
}

/// `kt.events.<region>.>` -> the region.
fn region_of(filter: Option<&str>) -> String {
    filter
        .and_then(|f| f.strip_prefix("kt.events."))
        .and_then(|f| f.strip_suffix(".>"))
        .unwrap_or_default()
        .to_owned()
}
