//! Decision events from every gateway: durable ingest with deduplication ([`store`]) and
//! fan-out to tail subscribers ([`bus`]).

pub mod bus;
pub mod counters;
pub mod nats;
pub mod store;
pub mod tail;

use kt_proto::v1::{EventStatsRow, TailEventsResponse};
use tokio::sync::mpsc;

use std::collections::HashSet;
use std::sync::Arc;

use kt_proto::v1::{self, EventGap};

/// Where events are kept: the embedded store now, a distributed log later. Writes must be
/// durable and idempotent on `(gateway, epoch, seq)` before `ingest` returns.
#[tonic::async_trait]
pub trait EventLog: Send + Sync {
    async fn ingest(&self, batch: store::Batch) -> Result<(), String>;
    /// Stored events (and gap records) from `since` on, in storage order.
    async fn query(&self, filter: Filter, since: u64, limit: u64) -> Vec<Published>;
    async fn stats(&self, filter: Filter, by: String, since: u64) -> Vec<EventStatsRow>;
    /// Reads stored events from `since` on into `tally` (a shadow run's flip matrix) until it
    /// says stop; `None` when the events could not be read.
    async fn flips(
        &self,
        filter: Filter,
        since: u64,
        tally: crate::shadow::flips::FlipTally,
    ) -> Option<crate::shadow::flips::FlipTally>;
    /// A gateway's event stream ended here: what this log remembers of it may go stale, since
    /// the agent may send to another replica next.
    fn session_ended(&self, _gateway: &str) {}
}

/// Adds one event to `events stats` rows grouped `by` gateway, config-version or region.
pub fn stats_add(
    rows: &mut std::collections::BTreeMap<String, EventStatsRow>,
    by: &str,
    e: &EventRecord,
) {
    let key = match by {
        "config-version" => e.config_version.clone(),
        "region" => e.region.clone(),
        _ => e.gateway.clone(),
    };
    let row = rows.entry(key.clone()).or_insert_with(|| EventStatsRow {
        key,
        ..Default::default()
    });
    row.total += 1;
    match e.verdict.as_str() {
        "allow" => row.allow += 1,
        "block" => row.block += 1,
        "redact" => row.redact += 1,
        "escalate" => row.escalate += 1,
        _ => {}
    }
}

/// How stored events reach tail subscribers of one coordinator (with `events.nats`, tails read
/// the stream instead: see [`nats`]).
/// A subscriber that reads too slowly must never slow ingest or other subscribers.
#[tonic::async_trait]
pub trait EventBus: Send + Sync {
    async fn subscribe(&self, filter: Filter) -> Option<mpsc::Receiver<TailEventsResponse>>;
}

/// One stored event, with the fields filters and stats read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub gateway: String,
    pub region: String,
    pub epoch: u64,
    pub seq: u64,
    /// When the coordinator stored it (Unix ms): what `--since` and retention go by.
    pub at: u64,
    pub verdict: String,
    pub reason: String,
    pub config_version: String,
    /// Policies that decided something other than allow.
    pub acted: Vec<String>,
    pub body: Arc<[u8]>,
}

/// What the bus carries: events, and gaps agents reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    Event(EventRecord),
    Gap { gateway: String, gap: EventGap },
}

/// A subscriber's or a query's filter, resolved: `gateways` is the set a group or selector
/// named when the filter was made (`None`: every gateway).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub gateways: Option<HashSet<String>>,
    pub verdict: Option<String>,
    pub policy: Option<String>,
    pub reason: Option<String>,
    pub config_version: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    Some(s.to_owned()).filter(|s| !s.is_empty())
}

impl Filter {
    pub fn new(filter: &v1::EventFilter, gateways: Option<HashSet<String>>) -> Self {
        Filter {
            gateways,
            verdict: non_empty(&filter.verdict),
            policy: non_empty(&filter.policy),
            reason: non_empty(&filter.reason),
            config_version: non_empty(&filter.config_version),
        }
    }

    pub fn gateway(&self, gateway: &str) -> bool {
        self.gateways
            .as_ref()
            .is_none_or(|set| set.contains(gateway))
    }

    pub fn matches(&self, e: &EventRecord) -> bool {
        self.gateway(&e.gateway)
            && self.verdict.as_ref().is_none_or(|v| *v == e.verdict)
            && self.reason.as_ref().is_none_or(|r| *r == e.reason)
            && self
                .config_version
                .as_ref()
                .is_none_or(|c| *c == e.config_version)
            && self
                .policy
                .as_ref()
                .is_none_or(|p| e.acted.iter().any(|a| a == p))
    }

    pub fn matches_published(&self, p: &Published) -> bool {
        match p {
            Published::Event(e) => self.matches(e),
            Published::Gap { gateway, .. } => self.gateway(gateway),
        }
    }
}

/// The indexed fields of one event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Indexed {
    pub verdict: String,
    pub reason: String,
    pub config_version: String,
    pub config_hash: String,
    pub status: u16,
    /// A probe from `ktctl doctor`: stored and tailed, never counted for the gates.
    pub synthetic: bool,
    /// Policies that decided something other than allow.
    pub acted: Vec<String>,
}

/// Reads the indexed fields of an event body; `None` when it is not a JSON object.
pub fn fields(body: &[u8]) -> Option<Indexed> {
    let f: kt_contract::DecisionFields<'_> = serde_json::from_slice(body).ok()?;
    let acted = f
        .policies_evaluated
        .into_iter()
        .filter(|p| p.result != "allow")
        .map(|p| p.name.into_owned())
        .collect();
    Some(Indexed {
        verdict: f.verdict.into_owned(),
        reason: f.reason_code.into_owned(),
        config_version: f.config_version.into_owned(),
        config_hash: f.config_hash.into_owned(),
        status: f.status,
        synthetic: f.synthetic,
        acted,
    })
}

pub fn to_proto(p: &Published) -> v1::TailEventsResponse {
    use v1::tail_events_response::Item;
    let item = match p {
        Published::Event(e) => Item::Event(v1::TailedEvent {
            gateway_id: e.gateway.clone(),
            region: e.region.clone(),
            epoch: e.epoch,
            seq: e.seq,
            event: e.body.to_vec(),
            stored_at_unix_ms: e.at,
        }),
        Published::Gap { gateway, gap } => Item::Gap(v1::GapNotice {
            gateway_id: gateway.clone(),
            gap: Some(gap.clone()),
        }),
    };
    v1::TailEventsResponse { item: Some(item) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(gateway: &str, verdict: &str, acted: &[&str]) -> EventRecord {
        EventRecord {
            gateway: gateway.into(),
            region: "eu".into(),
            epoch: 1,
            seq: 1,
            at: 0,
            verdict: verdict.into(),
            reason: "r".into(),
            config_version: "1.0.0".into(),
            acted: acted.iter().map(|s| (*s).to_owned()).collect(),
            body: Arc::from(&b"{}"[..]),
        }
    }

    #[test]
    fn filters_match_exactly() {
        let all = Filter::default();
        assert!(all.matches(&event("a", "allow", &[])));
        let f = Filter {
            verdict: Some("block".into()),
            policy: Some("pii-detector".into()),
            ..Default::default()
        };
        assert!(f.matches(&event("a", "block", &["pii-detector"])));
        assert!(!f.matches(&event("a", "block", &["dlp-filter"])));
        assert!(!f.matches(&event("a", "allow", &["pii-detector"])));
        let g = Filter {
            gateways: Some(["b".to_owned()].into()),
            ..Default::default()
        };
        assert!(!g.matches(&event("a", "allow", &[])));
        assert!(g.matches(&event("b", "allow", &[])));
    }

    #[test]
    fn indexed_fields() {
        let body = br#"{"verdict":"redact","reason_code":"pii.redacted","config_version":"2.0.0",
            "config_hash":"sha256:ab","status":200,"policies_evaluated":[{"name":"prompt-injection",
            "result":"allow"},{"name":"pii-detector","result":"redact"}]}"#;
        let f = fields(body).expect("object");
        assert_eq!(
            (
                f.verdict.as_str(),
                f.reason.as_str(),
                f.config_version.as_str()
            ),
            ("redact", "pii.redacted", "2.0.0")
        );
        assert_eq!((f.config_hash.as_str(), f.status), ("sha256:ab", 200));
        assert_eq!(f.acted, ["pii-detector"]);
        // Escaped strings cannot be borrowed and are still read.
        let escaped = fields(br#"{"reason_code":"a\"b"}"#).expect("object");
        assert_eq!(escaped.reason, "a\"b");
        assert!(fields(b"[1,2]").is_none());
    }
}
