//! The event store: one task owns the SQLite database of recent events.
//!
//! Batches from every agent are written in one transaction per round (group commit), each
//! event `INSERT OR IGNORE`d on `(gateway, epoch, seq)`, so an event sent twice (after a
//! reconnect) is stored once. Only after the commit does an agent get its acknowledgement and
//! do subscribers see the new events. Retention removes events by age and count.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kt_daemon::unix_ms_now;
use kt_proto::v1::{EventGap, EventStatsRow};

use crate::shadow::flips::FlipTally;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::counters::{self, DecisionCounters};
use super::{EventRecord, Filter, Published, fields};
use crate::metrics::Metrics;

/// One agent batch, as received.
#[derive(Debug)]
pub struct Batch {
    pub gateway: String,
    /// The region the gateway's agent reported (its `region` label).
    pub region: String,
    pub epoch: u64,
    pub first_seq: u64,
    /// Parsed by the caller (the agent's stream task), so the store's single task only writes.
    pub events: Vec<Ingested>,
    pub gap: Option<EventGap>,
}

/// One received event: what is stored, and what the decision counters add.
#[derive(Debug)]
pub struct Ingested {
    pub record: EventRecord,
    pub config_hash: String,
    pub status: u16,
    pub synthetic: bool,
}

impl Batch {
    /// Reads the indexed fields of each event; bodies that are not JSON objects are kept with
    /// empty fields (agents send only objects).
    pub fn new(
        gateway: String,
        region: String,
        epoch: u64,
        first_seq: u64,
        bodies: Vec<Vec<u8>>,
        gap: Option<EventGap>,
    ) -> Self {
        let events = bodies
            .into_iter()
            .enumerate()
            .map(|(n, body)| {
                let f = fields(&body).unwrap_or_default();
                Ingested {
                    record: EventRecord {
                        gateway: gateway.clone(),
                        region: region.clone(),
                        epoch,
                        seq: first_seq + n as u64,
                        at: 0,
                        verdict: f.verdict,
                        reason: f.reason,
                        config_version: f.config_version,
                        acted: f.acted,
                        body: Arc::from(body),
                    },
                    config_hash: f.config_hash,
                    status: f.status,
                    synthetic: f.synthetic,
                }
            })
            .collect();
        Batch {
            gateway,
            region,
            epoch,
            first_seq,
            events,
            gap,
        }
    }

    pub fn last_seq(&self) -> u64 {
        match &self.gap {
            Some(gap) => gap.last_seq,
            None => self.first_seq + (self.events.len() as u64).saturating_sub(1),
        }
    }
}

#[derive(Debug)]
pub enum Command {
    /// Stores a batch; replies once it is durable.
    Ingest {
        batch: Batch,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Query {
        filter: Filter,
        since: u64,
        limit: u64,
        reply: oneshot::Sender<Vec<Published>>,
    },
    Stats {
        filter: Filter,
        by: String,
        since: u64,
        reply: oneshot::Sender<Vec<EventStatsRow>>,
    },
    Flips {
        filter: Filter,
        since: u64,
        tally: FlipTally,
        reply: oneshot::Sender<Option<FlipTally>>,
    },
}

#[derive(Clone, Debug)]
pub struct EventStoreHandle {
    tx: mpsc::Sender<Command>,
}

impl EventStoreHandle {
    /// Sends a read request and waits for the answer; an empty answer once the store is gone.
    async fn read<T: Default>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> T {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(make(reply)).await.is_err() {
            return T::default();
        }
        rx.await.unwrap_or_default()
    }
}

#[tonic::async_trait]
impl super::EventLog for EventStoreHandle {
    async fn ingest(&self, batch: Batch) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ingest { batch, reply })
            .await
            .map_err(|_| "event store stopped".to_owned())?;
        rx.await.map_err(|_| "event store stopped".to_owned())?
    }

    async fn query(&self, filter: Filter, since: u64, limit: u64) -> Vec<Published> {
        self.read(|reply| Command::Query {
            filter,
            since,
            limit,
            reply,
        })
        .await
    }

    async fn stats(&self, filter: Filter, by: String, since: u64) -> Vec<EventStatsRow> {
        self.read(|reply| Command::Stats {
            filter,
            by,
            since,
            reply,
        })
        .await
    }

    async fn flips(&self, filter: Filter, since: u64, tally: FlipTally) -> Option<FlipTally> {
        self.read(|reply| Command::Flips {
            filter,
            since,
            tally,
            reply,
        })
        .await
    }
}

/// How long and how many events are kept for `--since` and stats.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_age: Duration,
    pub max_events: u64,
}

pub struct EventStore {
    conn: Connection,
    retention: Retention,
    /// The highest sequence number stored per (gateway, epoch). Agents send in order and resend
    /// from their oldest unacknowledged event, so anything at or below it is a duplicate.
    stored_through: std::collections::HashMap<(String, u64), u64>,
    /// Each (gateway, region) is stored once, in `sources`; event rows hold its number.
    sources: Sources,
    commands: mpsc::Receiver<Command>,
    publish: mpsc::Sender<Arc<Vec<Published>>>,
    counters: DecisionCounters,
    metrics: Arc<Metrics>,
}

const SCHEMA: &str = "
    -- Each (gateway, region) once: event rows refer to it by number instead of repeating it.
    CREATE TABLE IF NOT EXISTS sources (
        id INTEGER PRIMARY KEY, gateway TEXT NOT NULL, region TEXT NOT NULL,
        UNIQUE (gateway, region));
    -- In storage order: the rowid grows with `at`, so time lookups search the rowid and
    -- no index is maintained per event.
    CREATE TABLE IF NOT EXISTS event_log (
        at INTEGER NOT NULL, source INTEGER NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
        verdict TEXT NOT NULL, reason TEXT NOT NULL, config_version TEXT NOT NULL,
        acted TEXT NOT NULL, body BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS gaps (
        gateway TEXT NOT NULL, epoch INTEGER NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
        count INTEGER NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL,
        PRIMARY KEY (gateway, epoch, first_seq)) WITHOUT ROWID;";

/// Databases written before `sources` held the gateway and region in every event row: move
/// them to `sources`, keeping every event and its storage order (rowid).
fn migrate_v1(conn: &Connection) -> rusqlite::Result<()> {
    let old: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('event_log') WHERE name = 'region'",
        [],
        |r| r.get(0),
    )?;
    if !old {
        return Ok(());
    }
    tracing::info!("moving the event store to one row per gateway and region");
    conn.execute_batch(&format!(
        "BEGIN;
         ALTER TABLE event_log RENAME TO event_log_v1;
         {SCHEMA}
         INSERT OR IGNORE INTO sources (gateway, region) SELECT DISTINCT gateway, region FROM event_log_v1;
         INSERT INTO event_log (rowid, at, source, epoch, seq, verdict, reason, config_version, acted, body)
             SELECT e.rowid, e.at, s.id, e.epoch, e.seq, e.verdict, e.reason, e.config_version, e.acted, e.body
             FROM event_log_v1 e JOIN sources s ON s.gateway = e.gateway AND s.region = e.region
             ORDER BY e.rowid;
         DROP TABLE event_log_v1;
         COMMIT;"
    ))
}

/// The (gateway, region) pairs of `sources`, both ways.
#[derive(Debug, Default)]
struct Sources {
    ids: std::collections::HashMap<(String, String), i64>,
    names: std::collections::HashMap<i64, (String, String)>,
}

impl Sources {
    fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let mut sources = Sources::default();
        let mut stmt = conn.prepare("SELECT id, gateway, region FROM sources")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        for row in rows {
            let (id, gateway, region): (i64, String, String) = row?;
            sources.remember(id, gateway, region);
        }
        Ok(sources)
    }

    fn remember(&mut self, id: i64, gateway: String, region: String) {
        self.ids.insert((gateway.clone(), region.clone()), id);
        self.names.insert(id, (gateway, region));
    }

    /// The number of (gateway, region), stored the first time it is seen.
    fn id(&mut self, conn: &Connection, gateway: &str, region: &str) -> rusqlite::Result<i64> {
        if let Some(id) = self.ids.get(&(gateway.to_owned(), region.to_owned())) {
            return Ok(*id);
        }
        conn.execute(
            "INSERT OR IGNORE INTO sources (gateway, region) VALUES (?1, ?2)",
            params![gateway, region],
        )?;
        let id = conn.query_row(
            "SELECT id FROM sources WHERE gateway = ?1 AND region = ?2",
            params![gateway, region],
            |r| r.get(0),
        )?;
        self.remember(id, gateway.to_owned(), region.to_owned());
        Ok(id)
    }

    fn names(&self, id: i64) -> (String, String) {
        self.names.get(&id).cloned().unwrap_or_default()
    }
}

/// Batches gathered into one transaction at most.
const GROUP_COMMIT: usize = 64;

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl EventStore {
    pub fn open(
        data_dir: &Path,
        retention: Retention,
        publish: mpsc::Sender<Arc<Vec<Published>>>,
        counters: DecisionCounters,
        metrics: Arc<Metrics>,
    ) -> rusqlite::Result<(Self, EventStoreHandle)> {
        let conn = Connection::open(data_dir.join("events.db"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;",
        )?;
        migrate_v1(&conn)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(counters::SCHEMA)?;
        counters::load(&conn, &counters)?;
        let sources = Sources::load(&conn)?;
        // What is stored per (gateway, epoch): the highest event, or gap, sequence number.
        let mut stored_through = std::collections::HashMap::new();
        for highest in [
            "SELECT s.gateway, e.epoch, MAX(e.seq) FROM event_log e JOIN sources s ON s.id = e.source
             GROUP BY s.gateway, e.epoch",
            "SELECT gateway, epoch, MAX(last_seq) FROM gaps GROUP BY gateway, epoch",
        ] {
            let mut stmt = conn.prepare(highest)?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64),
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            for row in rows {
                let (key, seq) = row?;
                let entry = stored_through.entry(key).or_insert(0);
                *entry = (*entry).max(seq);
            }
        }
        let (tx, commands) = mpsc::channel(1024);
        Ok((
            EventStore {
                conn,
                retention,
                stored_through,
                sources,
                commands,
                publish,
                counters,
                metrics,
            },
            EventStoreHandle { tx },
        ))
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut retention = tokio::time::interval(Duration::from_secs(10));
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = retention.tick() => {
                    if let Err(error) = self.enforce_retention() {
                        tracing::error!(%error, "event retention failed");
                    }
                    continue;
                }
                command = self.commands.recv() => match command { Some(c) => c, None => return },
            };
            let mut ingests = Vec::new();
            let mut others = Vec::new();
            let mut next = Some(command);
            while let Some(command) = next.take() {
                match command {
                    Command::Ingest { batch, reply } => ingests.push((batch, reply)),
                    other => others.push(other),
                }
                if ingests.len() < GROUP_COMMIT {
                    next = self.commands.try_recv().ok();
                }
            }
            if !ingests.is_empty() {
                self.ingest(ingests).await;
            }
            for command in others {
                self.answer(command);
            }
        }
    }

    async fn ingest(&mut self, ingests: Vec<(Batch, oneshot::Sender<Result<(), String>>)>) {
        let at = unix_ms_now();
        let (batches, replies): (Vec<Batch>, Vec<_>) = ingests.into_iter().unzip();
        let (result, published) = match self.write(batches, at) {
            Ok(published) => (Ok(()), published),
            Err(error) => {
                tracing::error!(%error, "cannot store events");
                (Err(format!("cannot store events: {error}")), Vec::new())
            }
        };
        for reply in replies {
            let _ = reply.send(result.clone());
        }
        if !published.is_empty() {
            // Never blocks ingest for long: the bus drains into bounded per-subscriber queues.
            let _ = self.publish.send(Arc::new(published)).await;
        }
    }

    /// One transaction for all batches; returns what was new (duplicates are not republished).
    fn write(&mut self, batches: Vec<Batch>, at: u64) -> rusqlite::Result<Vec<Published>> {
        // Numbered outside the transaction: a source row nothing refers to yet is harmless.
        let mut source_of = Vec::with_capacity(batches.len());
        for batch in &batches {
            source_of.push(self.sources.id(&self.conn, &batch.gateway, &batch.region)?);
        }
        // Sequence numbers stored by this transaction; they count only once it commits.
        let mut overlay: std::collections::HashMap<(String, u64), u64> =
            std::collections::HashMap::new();
        let mut tallies = counters::Delta::new();
        let tx = self.conn.transaction()?;
        let mut published = Vec::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO event_log (source, epoch, seq, at, verdict, reason, config_version, acted, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut insert_gap = tx.prepare_cached(
                "INSERT OR IGNORE INTO gaps (gateway, epoch, first_seq, last_seq, count, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (batch, source) in batches.into_iter().zip(source_of) {
                let key = (batch.gateway.clone(), batch.epoch);
                let mut through = overlay
                    .get(&key)
                    .or_else(|| self.stored_through.get(&key))
                    .copied()
                    .unwrap_or(0);
                if let Some(gap) = &batch.gap {
                    if gap.last_seq <= through {
                        continue;
                    }
                    through = gap.last_seq;
                    overlay.insert(key, through);
                    let new = insert_gap.execute(params![
                        batch.gateway,
                        i(batch.epoch),
                        i(gap.first_seq),
                        i(gap.last_seq),
                        i(gap.count),
                        gap.reason,
                        i(at)
                    ])?;
                    if new == 1 {
                        published.push(Published::Gap {
                            gateway: batch.gateway.clone(),
                            gap: gap.clone(),
                        });
                    }
                    continue;
                }
                let mut tally: RunningTally = None;
                for Ingested {
                    mut record,
                    config_hash,
                    status,
                    synthetic,
                } in batch.events
                {
                    if record.seq <= through {
                        continue; // already stored: a batch sent again after a reconnect
                    }
                    through = record.seq;
                    record.at = at;
                    // A probe is stored and tailed like any event, but it is not traffic.
                    if !synthetic {
                        count(&mut tally, &mut tallies, &record, config_hash, status);
                    }
                    insert.execute(params![
                        source,
                        i(record.epoch),
                        i(record.seq),
                        i(at),
                        record.verdict,
                        record.reason,
                        record.config_version,
                        record.acted.join(","),
                        &record.body[..]
                    ])?;
                    published.push(Published::Event(record));
                }
                flush_tally(&mut tallies, &batch.gateway, tally);
                overlay.insert(key, through);
            }
        }
        counters::store(&tx, &tallies)?;
        tx.commit()?;
        self.stored_through.extend(overlay);
        self.counters.merge(&tallies);
        let mut stored = 0;
        for p in &published {
            match p {
                Published::Event(_) => stored += 1,
                Published::Gap { gap, .. } => {
                    self.metrics.events_lost_by_agents.inc_by(gap.count);
                }
            }
        }
        self.metrics.events_stored.inc_by(stored);
        Ok(published)
    }

    fn answer(&self, command: Command) {
        match command {
            Command::Query {
                filter,
                since,
                limit,
                reply,
            } => {
                let _ = reply.send(self.query(&filter, since, limit).unwrap_or_else(|error| {
                    tracing::error!(%error, "event query failed");
                    Vec::new()
                }));
            }
            Command::Flips {
                filter,
                since,
                mut tally,
                reply,
            } => {
                let read = self.rows(since, |e| !filter.matches(&e) || tally.add(&e));
                let _ = reply.send(match read {
                    Ok(()) => Some(tally),
                    Err(error) => {
                        tracing::error!(%error, "shadow flips unreadable");
                        None
                    }
                });
            }
            Command::Stats {
                filter,
                by,
                since,
                reply,
            } => {
                let _ = reply.send(self.stats(&filter, &by, since).unwrap_or_else(|error| {
                    tracing::error!(%error, "event stats failed");
                    Vec::new()
                }));
            }
            Command::Ingest { .. } => {}
        }
    }

    /// The first rowid stored at or after `since`: a binary search, since `at` grows with the rowid.
    fn first_rowid_at(&self, since: u64) -> rusqlite::Result<i64> {
        // Two queries: each alone is one B-tree descent, while `SELECT MIN(rowid), MAX(rowid)`
        // together scans the whole table.
        let lo: Option<i64> = self
            .conn
            .query_row("SELECT MIN(rowid) FROM event_log", [], |r| r.get(0))?;
        let hi: Option<i64> = self
            .conn
            .query_row("SELECT MAX(rowid) FROM event_log", [], |r| r.get(0))?;
        let (Some(mut lo), Some(mut hi)) = (lo, hi) else {
            return Ok(i64::MAX);
        };
        hi += 1; // one past the last: "none is late enough"
        let mut probe = self.conn.prepare_cached(
            "SELECT rowid, at FROM event_log WHERE rowid >= ?1 ORDER BY rowid LIMIT 1",
        )?;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let found: Option<(i64, i64)> = probe
                .query_row([mid], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match found {
                Some((rowid, at)) if (at as u64) < since => lo = rowid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    fn rows(&self, since: u64, mut each: impl FnMut(EventRecord) -> bool) -> rusqlite::Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT source, epoch, seq, at, verdict, reason, config_version, acted, body
             FROM event_log WHERE rowid >= ?1 ORDER BY rowid",
        )?;
        let start = self.first_rowid_at(since)?;
        let mut rows = stmt.query([start])?;
        while let Some(row) = rows.next()? {
            let acted: String = row.get(7)?;
            let (gateway, region) = self.sources.names(row.get(0)?);
            let record = EventRecord {
                gateway,
                region,
                epoch: row.get::<_, i64>(1)? as u64,
                seq: row.get::<_, i64>(2)? as u64,
                at: row.get::<_, i64>(3)? as u64,
                verdict: row.get(4)?,
                reason: row.get(5)?,
                config_version: row.get(6)?,
                acted: acted
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                body: Arc::from(row.get::<_, Vec<u8>>(8)?.as_slice()),
            };
            if !each(record) {
                break;
            }
        }
        Ok(())
    }

    /// Stored events and gap records from `since` on, in storage order.
    fn query(&self, filter: &Filter, since: u64, limit: u64) -> rusqlite::Result<Vec<Published>> {
        let mut out: Vec<(u64, Published)> = Vec::new();
        let mut events = 0u64;
        self.rows(since, |record| {
            if filter.matches(&record) {
                out.push((record.at, Published::Event(record)));
                events += 1;
            }
            limit == 0 || events < limit
        })?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT gateway, first_seq, last_seq, count, reason, at FROM gaps WHERE at >= ?1 ORDER BY at",
        )?;
        let mut rows = stmt.query([i(since)])?;
        while let Some(row) = rows.next()? {
            let gateway: String = row.get(0)?;
            if !filter.gateway(&gateway) {
                continue;
            }
            let gap = EventGap {
                first_seq: row.get::<_, i64>(1)? as u64,
                last_seq: row.get::<_, i64>(2)? as u64,
                count: row.get::<_, i64>(3)? as u64,
                reason: row.get(4)?,
            };
            out.push((
                row.get::<_, i64>(5)? as u64,
                Published::Gap { gateway, gap },
            ));
        }
        // Stable: a gap stored in the same commit as events stays before them.
        out.sort_by_key(|(at, p)| (*at, !matches!(p, Published::Gap { .. })));
        Ok(out.into_iter().map(|(_, p)| p).collect())
    }

    fn stats(&self, filter: &Filter, by: &str, since: u64) -> rusqlite::Result<Vec<EventStatsRow>> {
        let mut rows: BTreeMap<String, EventStatsRow> = BTreeMap::new();
        self.rows(since, |e| {
            if filter.matches(&e) {
                super::stats_add(&mut rows, by, &e);
            }
            true
        })?;
        Ok(rows.into_values().collect())
    }

    fn enforce_retention(&mut self) -> rusqlite::Result<()> {
        let cutoff = unix_ms_now()
            .saturating_sub(u64::try_from(self.retention.max_age.as_millis()).unwrap_or(u64::MAX));
        self.conn.execute(
            "DELETE FROM event_log WHERE rowid < ?1",
            [self.first_rowid_at(cutoff)?],
        )?;
        self.conn
            .execute("DELETE FROM gaps WHERE at < ?1", [i(cutoff)])?;
        let count: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM event_log", [], |r| r.get(0))?;
        let over = (count as u64).saturating_sub(self.retention.max_events);
        if over > 0 {
            self.conn.execute(
                "DELETE FROM event_log WHERE rowid IN (SELECT rowid FROM event_log ORDER BY rowid LIMIT ?1)",
                [i(over)],
            )?;
        }
        Ok(())
    }
}

/// The running tally of a batch: for one config at a time, since most events of a batch share
/// one; a change of config adds the finished tally to the transaction's.
type RunningTally = Option<(String, counters::Tally)>;

fn count(
    running: &mut RunningTally,
    tallies: &mut counters::Delta,
    record: &EventRecord,
    config_hash: String,
    status: u16,
) {
    if running
        .as_ref()
        .is_none_or(|(hash, _)| *hash != config_hash)
    {
        flush_tally(tallies, &record.gateway, running.take());
        let fresh = counters::Tally {
            config_version: record.config_version.clone(),
            region: record.region.clone(),
            ..Default::default()
        };
        *running = Some((config_hash, fresh));
    }
    if let Some((_, t)) = running {
        t.add_event(&record.verdict, status);
    }
}

/// Adds a batch's running tally to the transaction's tallies.
fn flush_tally(tallies: &mut counters::Delta, gateway: &str, running: RunningTally) {
    if let Some((hash, t)) = running {
        tallies
            .entry((gateway.to_owned(), hash))
            .or_default()
            .merge(&t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;

    fn batch(gateway: &str, first_seq: u64, verdicts: &[&str]) -> Batch {
        let bodies = verdicts
            .iter()
            .map(|v| {
                format!(r#"{{"verdict":"{v}","config_version":"1.0.0","config_hash":"sha256:aa","status":200}}"#)
                    .into_bytes()
            })
            .collect();
        Batch::new(gateway.into(), "eu".into(), 7, first_seq, bodies, None)
    }

    #[tokio::test]
    async fn gateway_and_region_are_stored_once_and_an_old_database_is_moved_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A database of the first layout: gateway and region in every event row.
        {
            let conn = Connection::open(dir.path().join("events.db")).expect("db");
            conn.execute_batch(
                "CREATE TABLE event_log (
                     at INTEGER NOT NULL, gateway TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
                     region TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT NOT NULL, config_version TEXT NOT NULL,
                     acted TEXT NOT NULL, body BLOB NOT NULL);
                 INSERT INTO event_log VALUES (1, 'gw-old', 3, 1, 'us', 'allow', '', '1.0.0', '', x'7b7d');
                 INSERT INTO event_log VALUES (2, 'gw-old', 3, 2, 'us', 'block', '', '1.0.0', '', x'7b7d');",
            )
            .expect("old layout");
        }
        let (publish, _published) = mpsc::channel(16);
        let retention = Retention {
            max_age: Duration::from_secs(3600 * 24 * 365 * 100),
            max_events: 1000,
        };
        let (store, handle) = EventStore::open(
            dir.path(),
            retention,
            publish,
            DecisionCounters::default(),
            Default::default(),
        )
        .expect("open and migrate");
        assert_eq!(
            store.stored_through.get(&("gw-old".to_owned(), 3)),
            Some(&2),
            "what was stored before still counts for deduplication"
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(store.run(cancel.clone()));
        handle
            .ingest(batch("gw-a", 1, &["allow", "block", "allow"]))
            .await
            .expect("ingest");
        let all = handle.query(Filter::default(), 0, 0).await;
        let names: Vec<(String, String, u64)> = all
            .iter()
            .filter_map(|p| match p {
                Published::Event(e) => Some((e.gateway.clone(), e.region.clone(), e.seq)),
                Published::Gap { .. } => None,
            })
            .collect();
        assert_eq!(
            names,
            [
                ("gw-old".into(), "us".into(), 1),
                ("gw-old".into(), "us".into(), 2),
                ("gw-a".into(), "eu".into(), 1),
                ("gw-a".into(), "eu".into(), 2),
                ("gw-a".into(), "eu".into(), 3),
            ]
        );
        cancel.cancel();
        let _ = task.await;
        let conn = Connection::open(dir.path().join("events.db")).expect("db");
        let sources: i64 = conn
            .query_row("SELECT COUNT(*) FROM sources", [], |r| r.get(0))
            .expect("sources");
        assert_eq!(sources, 2, "one row per gateway and region, not per event");
        let columns: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('event_log') WHERE name IN ('gateway', 'region')",
                [],
                |r| r.get(0),
            )
            .expect("columns");
        assert_eq!(columns, 0);
    }

    #[tokio::test]
    async fn duplicates_are_stored_and_published_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (publish, mut published) = mpsc::channel(16);
        let retention = Retention {
            max_age: Duration::from_secs(3600),
            max_events: 1000,
        };
        let counters = DecisionCounters::default();
        let (store, handle) = EventStore::open(
            dir.path(),
            retention,
            publish,
            counters.clone(),
            Default::default(),
        )
        .expect("open");
        let cancel = CancellationToken::new();
        let task = tokio::spawn(store.run(cancel.clone()));
        handle
            .ingest(batch("gw-a", 1, &["allow", "block"]))
            .await
            .expect("first");
        handle
            .ingest(batch("gw-a", 1, &["allow", "block", "block"]))
            .await
            .expect("resent with one more");
        let first = published.recv().await.expect("published");
        let second = published.recv().await.expect("published");
        assert_eq!(
            (first.len(), second.len()),
            (2, 1),
            "only the new event is published again"
        );
        let rows = handle.stats(Filter::default(), "gateway".into(), 0).await;
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].total, rows[0].block, rows[0].allow), (3, 2, 1));
        let blocks = handle
            .query(
                Filter {
                    verdict: Some("block".into()),
                    ..Default::default()
                },
                0,
                0,
            )
            .await;
        assert_eq!(blocks.len(), 2);
        let later = handle
            .query(Filter::default(), unix_ms_now() + 3_600_000, 0)
            .await;
        assert!(later.is_empty(), "nothing is stored in the future");
        let recent = handle
            .query(Filter::default(), unix_ms_now() - 60_000, 0)
            .await;
        assert_eq!(recent.len(), 3, "the last minute holds all three");
        let limited = handle.query(Filter::default(), 0, 1).await;
        assert_eq!(limited.len(), 1);
        let tally = |counters: &DecisionCounters| {
            let t = &counters.snapshot()["gw-a"]["sha256:aa"];
            (t.requests, t.allow, t.block, t.config_version.clone())
        };
        assert_eq!(
            tally(&counters),
            (3, 1, 2, "1.0.0".to_owned()),
            "the resent events are counted once"
        );
        cancel.cancel();
        task.await.expect("store task");

        // The counters are stored with the events: a reopened store starts from them.
        let reopened = DecisionCounters::default();
        let (publish, _published) = mpsc::channel(16);
        let _store = EventStore::open(
            dir.path(),
            retention,
            publish,
            reopened.clone(),
            Default::default(),
        )
        .expect("reopen");
        assert_eq!(tally(&reopened), tally(&counters));
    }
}
