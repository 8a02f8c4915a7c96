//! The agent's on-disk event buffer: events wait here, numbered `(epoch, seq)`, until the
//! coordinator acknowledges them as durably stored.
//!
//! Events and the file cursor are written in one transaction, so an event is either taken
//! from the file and buffered, or neither: nothing is lost or read twice across restarts.
//! The buffer is bounded by count, bytes and age; when it overflows, the oldest events are dropped
//! and a gap record takes their sequence numbers, so the coordinator learns exactly what is
//! missing.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::tail::Cursor;

/// One buffered item, in sequence order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Event {
        seq: u64,
        body: Vec<u8>,
    },
    Gap {
        first_seq: u64,
        last_seq: u64,
        count: u64,
        reason: String,
    },
}

impl Item {
    pub fn last_seq(&self) -> u64 {
        match self {
            Item::Event { seq, .. } => *seq,
            Item::Gap { last_seq, .. } => *last_seq,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_events: u64,
    /// The events' bodies, summed.
    pub max_bytes: u64,
    pub max_age: Duration,
}

pub struct Spool {
    conn: Connection,
    pub epoch: u64,
    next_seq: u64,
    limits: Limits,
    /// Events in the table and their bodies' bytes, kept in memory so appends need not count.
    buffered: u64,
    buffered_bytes: u64,
    /// Events dropped by overflow since this process opened the spool.
    dropped: u64,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("epoch", &self.epoch)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

fn now_ms() -> i64 {
    i64::try_from(kt_daemon::unix_ms_now()).unwrap_or(i64::MAX)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Spool {
    pub fn open(state_dir: &Path, limits: Limits) -> rusqlite::Result<Self> {
        let conn = Connection::open(state_dir.join("events.db"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body BLOB NOT NULL, at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS gaps (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,
                                               count INTEGER NOT NULL, reason TEXT NOT NULL);",
        )?;
        let get = |key: &str| -> rusqlite::Result<Option<i64>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let epoch = match get("epoch")? {
            Some(e) => e as u64,
            None => {
                // Positive and below i64::MAX, so it survives SQLite's integers.
                let e = (rand::random::<u64>() >> 1).max(1);
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
                    [e as i64],
                )?;
                e
            }
        };
        let next_seq = get("next_seq")?.map_or(1, |n| n as u64);
        let (buffered, buffered_bytes) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM events",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?;
        Ok(Spool {
            conn,
            epoch,
            next_seq,
            limits,
            buffered,
            buffered_bytes,
            dropped: 0,
        })
    }

    pub fn cursor(&self) -> rusqlite::Result<Cursor> {
        let get = |key: &str| -> rusqlite::Result<u64> {
            Ok(self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                .unwrap_or(0) as u64)
        };
        Ok(Cursor {
            dev: get("cursor_dev")?,
            ino: get("cursor_ino")?,
            offset: get("cursor_offset")?,
        })
    }

    /// Buffers `events` and moves the cursor, atomically; then enforces the limits.
    pub fn append(&mut self, events: &[Vec<u8>], cursor: Cursor) -> rusqlite::Result<()> {
        let at = now_ms();
        let tx = self.conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO events (seq, body, at) VALUES (?1, ?2, ?3)")?;
            for body in events {
                insert.execute(params![to_i64(self.next_seq), body, at])?;
                self.buffered += 1;
                self.buffered_bytes += body.len() as u64;
                self.next_seq += 1;
            }
            let mut meta = tx.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?;
            meta.execute(params!["next_seq", to_i64(self.next_seq)])?;
            meta.execute(params!["cursor_dev", to_i64(cursor.dev)])?;
            meta.execute(params!["cursor_ino", to_i64(cursor.ino)])?;
            meta.execute(params!["cursor_offset", to_i64(cursor.offset)])?;
        }
        tx.commit()?;
        self.enforce_limits()
    }

    /// Drops the oldest events beyond the limits, leaving a gap record in their place.
    fn enforce_limits(&mut self) -> rusqlite::Result<()> {
        // Every check reads the oldest rows through the primary key: no scan on every append.
        let over = self.buffered.saturating_sub(self.limits.max_events);
        let over_bytes =
            self.oldest_covering(self.buffered_bytes.saturating_sub(self.limits.max_bytes))?;
        let too_old = now_ms() - i64::try_from(self.limits.max_age.as_millis()).unwrap_or(i64::MAX);
        let oldest_at: Option<i64> = self
            .conn
            .query_row("SELECT at FROM events ORDER BY seq LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let old: u64 = if oldest_at.is_some_and(|at| at < too_old) {
            self.conn.query_row(
                "SELECT COUNT(*) FROM events WHERE at < ?1",
                [too_old],
                |r| r.get::<_, i64>(0),
            )? as u64
        } else {
            0
        };
        let full = over.max(over_bytes);
        let drop = full.max(old);
        if drop == 0 {
            return Ok(());
        }
        let reason = if full >= old {
            "agent buffer full"
        } else {
            "older than the buffer's age limit"
        };
        let tx = self.conn.transaction()?;
        let (first, last): (i64, i64) = tx.query_row(
            "SELECT MIN(seq), MAX(seq) FROM (SELECT seq FROM events ORDER BY seq LIMIT ?1)",
            [to_i64(drop)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (dropped, dropped_bytes) = delete_through(&tx, last)?;
        self.buffered = self.buffered.saturating_sub(dropped);
        self.buffered_bytes = self.buffered_bytes.saturating_sub(dropped_bytes);
        self.dropped += dropped;
        // Merge with a gap that ends right before, so repeated overflow stays one record.
        let previous: Option<(i64, i64)> = tx
            .query_row(
                "SELECT first_seq, count FROM gaps WHERE last_seq = ?1",
                [first - 1],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match previous {
            Some((gap_first, gap_count)) => {
                tx.execute(
                    "UPDATE gaps SET last_seq = ?1, count = ?2 WHERE first_seq = ?3",
                    params![last, gap_count + (last - first + 1), gap_first],
                )?;
            }
            None => {
                tx.execute(
                    "INSERT INTO gaps (first_seq, last_seq, count, reason) VALUES (?1, ?2, ?3, ?4)",
                    params![first, last, last - first + 1, reason],
                )?;
            }
        }
        tx.commit()?;
        tracing::warn!(
            dropped = last - first + 1,
            first,
            last,
            reason,
            "event buffer overflow: oldest events dropped"
        );
        Ok(())
    }

    /// How many of the oldest events hold at least `bytes` bytes (0 for none).
    fn oldest_covering(&self, bytes: u64) -> rusqlite::Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT length(body) FROM events ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        let (mut count, mut covered) = (0u64, 0u64);
        while covered < bytes {
            let Some(row) = rows.next()? else { break };
            covered += row.get::<_, i64>(0)? as u64;
            count += 1;
        }
        Ok(count)
    }

    /// Items with a sequence number above `after`, in order: at most `max` events of at most
    /// `max_bytes` in all (but always at least one, so that no event is too large to send).
    pub fn read_after(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> rusqlite::Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut stmt = self.conn.prepare_cached("SELECT first_seq, last_seq, count, reason FROM gaps WHERE last_seq > ?1 ORDER BY first_seq LIMIT 1")?;
        let gap: Option<Item> = stmt
            .query_row([to_i64(after)], |r| {
                Ok(Item::Gap {
                    first_seq: r.get::<_, i64>(0)? as u64,
                    last_seq: r.get::<_, i64>(1)? as u64,
                    count: r.get::<_, i64>(2)? as u64,
                    reason: r.get(3)?,
                })
            })
            .optional()?;
        let mut events = self
            .conn
            .prepare_cached("SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = events.query_map(params![to_i64(after), to_i64(max as u64)], |r| {
            Ok(Item::Event {
                seq: r.get::<_, i64>(0)? as u64,
                body: r.get(1)?,
            })
        })?;
        let mut bytes = 0;
        for row in rows {
            let item = row?;
            if let Item::Event { body, .. } = &item {
                bytes += body.len();
                if bytes > max_bytes && !items.is_empty() {
                    break;
                }
            }
            items.push(item);
        }
        if let Some(Item::Gap { first_seq, .. }) = &gap {
            // The gap comes before any event after it.
            items.retain(|item| item.last_seq() < *first_seq);
            if items.is_empty() {
                items.push(gap.clone().unwrap_or(Item::Gap {
                    first_seq: 0,
                    last_seq: 0,
                    count: 0,
                    reason: String::new(),
                }));
            }
        }
        Ok(items)
    }

    /// The lowest sequence number still buffered (where a new connection resumes), minus one.
    pub fn acked_through(&self) -> rusqlite::Result<u64> {
        let first: Option<i64> = self.conn.query_row(
            "SELECT MIN(s) FROM (SELECT MIN(seq) AS s FROM events UNION ALL SELECT MIN(first_seq) FROM gaps)",
            [],
            |r| r.get(0),
        )?;
        Ok(first.map_or(self.next_seq.saturating_sub(1), |f| {
            (f as u64).saturating_sub(1)
        }))
    }

    /// Deletes what the coordinator stored durably; returns how many events that was.
    pub fn ack(&mut self, through: u64) -> rusqlite::Result<u64> {
        let tx = self.conn.transaction()?;
        let (deleted, deleted_bytes) = delete_through(&tx, to_i64(through))?;
        self.buffered = self.buffered.saturating_sub(deleted);
        self.buffered_bytes = self.buffered_bytes.saturating_sub(deleted_bytes);
        tx.execute("DELETE FROM gaps WHERE last_seq <= ?1", [to_i64(through)])?;
        tx.commit()?;
        Ok(deleted)
    }

    /// The forwarding state for heartbeats: backlog, when the oldest buffered event was
    /// buffered, and how many were dropped.
    pub fn forwarding(&self) -> rusqlite::Result<Forwarding> {
        let oldest_at: Option<i64> = self
            .conn
            .prepare_cached("SELECT at FROM events ORDER BY seq LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()?;
        Ok(Forwarding {
            backlog: self.buffered,
            oldest_at_ms: oldest_at.map(|at| at.max(0) as u64),
            dropped: self.dropped,
        })
    }
}

/// What heartbeats report about the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarding {
    pub backlog: u64,
    pub oldest_at_ms: Option<u64>,
    pub dropped: u64,
}

/// Deletes the events up to `seq`; returns how many and their bytes.
fn delete_through(tx: &rusqlite::Transaction<'_>, seq: i64) -> rusqlite::Result<(u64, u64)> {
    let mut stmt =
        tx.prepare_cached("DELETE FROM events WHERE seq <= ?1 RETURNING length(body)")?;
    let mut rows = stmt.query([seq])?;
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some(row) = rows.next()? {
        count += 1;
        bytes += row.get::<_, i64>(0)? as u64;
    }
    Ok((count, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_events: u64) -> Limits {
        Limits {
            max_events,
            max_bytes: u64::MAX,
            max_age: Duration::from_secs(3600),
        }
    }

    fn bodies(n: usize, from: usize) -> Vec<Vec<u8>> {
        (from..from + n)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect()
    }

    #[test]
    fn events_and_cursor_survive_reopening_and_acks_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cursor = Cursor {
            dev: 1,
            ino: 2,
            offset: 30,
        };
        let epoch = {
            let mut s = Spool::open(dir.path(), limits(100)).expect("open");
            s.append(&bodies(3, 0), cursor).expect("append");
            s.epoch
        };
        let mut s = Spool::open(dir.path(), limits(100)).expect("reopen");
        assert_eq!(s.epoch, epoch, "the epoch is kept");
        assert_eq!(s.cursor().expect("cursor"), cursor);
        let items = s.read_after(0, 10, usize::MAX).expect("read");
        assert_eq!(
            items.iter().map(Item::last_seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        s.ack(2).expect("ack");
        assert_eq!(s.acked_through().expect("acked"), 2);
        s.append(&bodies(1, 3), cursor).expect("append");
        assert_eq!(
            s.read_after(2, 10, usize::MAX)
                .expect("read")
                .iter()
                .map(Item::last_seq)
                .collect::<Vec<_>>(),
            [3, 4],
            "numbering goes on"
        );
    }

    #[test]
    fn overflow_drops_the_oldest_and_leaves_one_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path(), limits(5)).expect("open");
        for i in 0..4 {
            s.append(&bodies(3, i * 3), Cursor::default())
                .expect("append");
        }
        // 12 events, 5 kept: seqs 1..=7 dropped as one gap.
        let items = s.read_after(0, 100, usize::MAX).expect("read");
        assert_eq!(
            items[0],
            Item::Gap {
                first_seq: 1,
                last_seq: 7,
                count: 7,
                reason: "agent buffer full".into()
            }
        );
        let rest = s.read_after(7, 100, usize::MAX).expect("read");
        assert_eq!(
            rest.iter().map(Item::last_seq).collect::<Vec<_>>(),
            [8, 9, 10, 11, 12]
        );
        s.ack(7).expect("ack the gap");
        assert_eq!(
            s.read_after(0, 100, usize::MAX)
                .expect("read")
                .first()
                .map(Item::last_seq),
            Some(8)
        );
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bounded = Limits {
            max_bytes: 1_000,
            ..limits(1_000)
        };
        let event = |n: usize| vec![b'x'; n];
        {
            let mut s = Spool::open(dir.path(), bounded).expect("open");
            s.append(&[event(400), event(400)], Cursor::default())
                .expect("append");
            assert_eq!(s.read_after(0, 100, usize::MAX).expect("read").len(), 2);
        }
        // Reopened, the spool still knows it holds 800 bytes: 300 more push out the first.
        let mut s = Spool::open(dir.path(), bounded).expect("reopen");
        s.append(&[event(300)], Cursor::default()).expect("append");
        let items = s.read_after(0, 100, usize::MAX).expect("read");
        assert!(
            matches!(
                items[0],
                Item::Gap {
                    first_seq: 1,
                    last_seq: 1,
                    count: 1,
                    ..
                }
            ),
            "{:?}",
            items[0]
        );
        // Acknowledged events free their bytes: two more of 300 fit after the ack.
        s.ack(2).expect("ack");
        s.append(&[event(300), event(300)], Cursor::default())
            .expect("append");
        let rest = s.read_after(1, 100, usize::MAX).expect("read");
        assert_eq!(
            rest.iter().map(Item::last_seq).collect::<Vec<_>>(),
            [3, 4, 5],
            "nothing more dropped"
        );
        // A batch stops at the byte limit, but always takes one event.
        assert_eq!(s.read_after(2, 100, 650).expect("read").len(), 2);
        assert_eq!(s.read_after(2, 100, 10).expect("read").len(), 1);
    }
}
