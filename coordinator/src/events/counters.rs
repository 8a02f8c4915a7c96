//! Decision counters per gateway and per config (by content hash), counted from stored events.
//!
//! The event store adds every newly stored event (never a duplicate) in the same transaction
//! that stores it, so the counters are exact and survive restarts; they are cumulative and
//! never shrink with retention. Rollout gates compare them before and after a bake, and
//! `ktctl events stats --all-time` shows them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use kt_proto::v1::EventStatsRow;
use rusqlite::{Connection, Transaction, params};

/// Decisions counted for one gateway on one config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub config_version: String,
    pub region: String,
    pub allow: u64,
    pub block: u64,
    pub redact: u64,
    pub escalate: u64,
    /// Every event, whatever its verdict.
    pub requests: u64,
    /// Requests answered with a server error (status 500 and above).
    pub errors: u64,
}

impl Tally {
    /// Requests with one of the four verdicts: what a block rate is taken over.
    pub fn decided(&self) -> u64 {
        self.allow + self.block + self.redact + self.escalate
    }

    pub fn add_event(&mut self, verdict: &str, status: u16) {
        match verdict {
            "allow" => self.allow += 1,
            "block" => self.block += 1,
            "redact" => self.redact += 1,
            "escalate" => self.escalate += 1,
            _ => {}
        }
        self.requests += 1;
        if status >= 500 {
            self.errors += 1;
        }
    }

    pub(crate) fn merge(&mut self, other: &Tally) {
        if !other.config_version.is_empty() {
            self.config_version.clone_from(&other.config_version);
        }
        if !other.region.is_empty() {
            self.region.clone_from(&other.region);
        }
        self.allow += other.allow;
        self.block += other.block;
        self.redact += other.redact;
        self.escalate += other.escalate;
        self.requests += other.requests;
        self.errors += other.errors;
    }
}

/// A gateway's tallies by config hash.
pub type GatewayTallies = BTreeMap<String, Tally>;

/// The counters, shared between their one writer and their readers. The writer is the event
/// store (one coordinator), or with `events.nats` the leader's count of the stream; a
/// follower replica takes the leader's checkpoints instead.
#[derive(Clone, Debug, Default)]
pub struct DecisionCounters {
    inner: Arc<RwLock<Counters>>,
}

#[derive(Debug, Default)]
struct Counters {
    tallies: HashMap<String, GatewayTallies>,
    /// This replica counts the stream itself now (it leads): checkpoints are older than that.
    counting: bool,
}

impl DecisionCounters {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Counters> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every gateway's tallies, as they are now.
    pub fn snapshot(&self) -> HashMap<String, GatewayTallies> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .tallies
            .clone()
    }

    /// Adds tallies that were just stored durably (or counted from the stream).
    pub(crate) fn merge(&self, delta: &Delta) {
        let mut inner = self.write();
        for ((gateway, hash), tally) in delta {
            inner
                .tallies
                .entry(gateway.clone())
                .or_default()
                .entry(hash.clone())
                .or_default()
                .merge(tally);
        }
    }

    /// This replica starts counting the stream from `tallies` (a leader's checkpoint).
    pub(crate) fn start_counting(&self, tallies: HashMap<String, GatewayTallies>) {
        let mut inner = self.write();
        inner.tallies = tallies;
        inner.counting = true;
    }

    /// This replica stopped counting (its term ended): checkpoints apply again.
    pub(crate) fn stop_counting(&self) {
        self.write().counting = false;
    }

    /// A leader's checkpoint, taken unless this replica counts by itself.
    pub(crate) fn follow(&self, tallies: HashMap<String, GatewayTallies>) {
        let mut inner = self.write();
        if !inner.counting {
            inner.tallies = tallies;
        }
    }
}

/// Rows of `ktctl events stats --all-time`: the tallies of the gateways `filter` selects,
/// summed by `by` (gateway, config-version or region).
pub fn stats_rows(
    counters: &HashMap<String, GatewayTallies>,
    filter: &super::Filter,
    by: &str,
) -> Vec<EventStatsRow> {
    let mut rows: BTreeMap<String, EventStatsRow> = BTreeMap::new();
    for (gateway, tallies) in counters {
        if !filter.gateway(gateway) {
            continue;
        }
        for t in tallies.values() {
            let key = match by {
                "config-version" => &t.config_version,
                "region" => &t.region,
                _ => gateway,
            };
            let row = rows.entry(key.clone()).or_insert_with(|| EventStatsRow {
                key: key.clone(),
                ..Default::default()
            });
            row.total += t.requests;
            row.allow += t.allow;
            row.block += t.block;
            row.redact += t.redact;
            row.escalate += t.escalate;
        }
    }
    rows.into_values().collect()
}

/// What one transaction adds, by (gateway, config hash).
pub(crate) type Delta = HashMap<(String, String), Tally>;

pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS decision_counts (
    gateway TEXT NOT NULL, config_hash TEXT NOT NULL, config_version TEXT NOT NULL, region TEXT NOT NULL,
    allow INTEGER NOT NULL, block INTEGER NOT NULL, redact INTEGER NOT NULL, escalate INTEGER NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL,
    PRIMARY KEY (gateway, config_hash)) WITHOUT ROWID;";

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads the stored counters into `counters` (at start).
pub(super) fn load(conn: &Connection, counters: &DecisionCounters) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT gateway, config_hash, config_version, region, allow, block, redact, escalate, requests, errors
         FROM decision_counts",
    )?;
    let rows = stmt.query_map([], |r| {
        let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
        Ok((
            (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            Tally {
                config_version: r.get(2)?,
                region: r.get(3)?,
                allow: n(4)?,
                block: n(5)?,
                redact: n(6)?,
                escalate: n(7)?,
                requests: n(8)?,
                errors: n(9)?,
            },
        ))
    })?;
    let mut delta = Delta::new();
    for row in rows {
        let (key, tally) = row?;
        delta.insert(key, tally);
    }
    counters.merge(&delta);
    Ok(())
}

/// Adds `delta` to the stored counters, inside the transaction that stores its events.
pub(super) fn store(tx: &Transaction<'_>, delta: &Delta) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO decision_counts
             (gateway, config_hash, config_version, region, allow, block, redact, escalate, requests, errors)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (gateway, config_hash) DO UPDATE SET
             config_version = excluded.config_version, region = excluded.region,
             allow = allow + excluded.allow, block = block + excluded.block,
             redact = redact + excluded.redact, escalate = escalate + excluded.escalate,
             requests = requests + excluded.requests, errors = errors + excluded.errors",
    )?;
    for ((gateway, hash), t) in delta {
        upsert.execute(params![
            gateway,
            hash,
            t.config_version,
            t.region,
            i(t.allow),
            i(t.block),
            i(t.redact),
            i(t.escalate),
            i(t.requests),
            i(t.errors)
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_verdicts_and_server_errors() {
        let mut t = Tally::default();
        for (verdict, status) in [
            ("allow", 200),
            ("block", 409),
            ("redact", 200),
            ("allow", 502),
            ("escalate", 409),
            ("weird", 200),
        ] {
            t.add_event(verdict, status);
        }
        assert_eq!(
            (t.allow, t.block, t.redact, t.escalate, t.requests, t.errors),
            (2, 1, 1, 1, 6, 1)
        );
        assert_eq!(t.decided(), 5);
    }

    #[test]
    fn stats_rows_sum_the_selected_gateways() {
        let tally = |version: &str, region: &str, allow, block| Tally {
            config_version: version.into(),
            region: region.into(),
            allow,
            block,
            requests: allow + block,
            ..Default::default()
        };
        let counters: HashMap<String, GatewayTallies> = [
            (
                "a".to_owned(),
                [
                    ("h1".to_owned(), tally("1.0.0", "eu", 8, 2)),
                    ("h2".to_owned(), tally("2.0.0", "eu", 1, 9)),
                ]
                .into(),
            ),
            (
                "b".to_owned(),
                [("h1".to_owned(), tally("1.0.0", "us", 5, 0))].into(),
            ),
            (
                "c".to_owned(),
                [("h1".to_owned(), tally("1.0.0", "us", 0, 7))].into(),
            ),
        ]
        .into();
        let not_c = super::super::Filter {
            gateways: Some(["a".to_owned(), "b".to_owned()].into()),
            ..Default::default()
        };
        let key_total_block = |rows: Vec<EventStatsRow>| -> Vec<(String, u64, u64)> {
            rows.into_iter()
                .map(|r| (r.key, r.total, r.block))
                .collect()
        };
        assert_eq!(
            key_total_block(stats_rows(&counters, &not_c, "gateway")),
            [("a".to_owned(), 20, 11), ("b".to_owned(), 5, 0)]
        );
        assert_eq!(
            key_total_block(stats_rows(&counters, &not_c, "config-version")),
            [("1.0.0".to_owned(), 15, 2), ("2.0.0".to_owned(), 10, 9)]
        );
        assert_eq!(
            key_total_block(stats_rows(&counters, &Default::default(), "region")),
            [("eu".to_owned(), 20, 11), ("us".to_owned(), 12, 7)]
        );
    }
}
