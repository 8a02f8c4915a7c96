//! The coordinator's durable state behind one interface: config versions, rollouts, and the
//! audit log of operator actions. The embedded SQLite store is the default; a distributed
//! backend (etcd) can implement the same trait.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::config::Group;
use crate::intent::{Desired, DesiredChange, GroupIntent, Intent};
use crate::rollout::model::RolloutRecord;

/// A stored config version, content-addressed by its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredConfig {
    pub hash: String,
    pub version: String,
    pub content: Vec<u8>,
    pub author: String,
    pub created_at_unix_ms: u64,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

impl From<String> for StoreError {
    fn from(message: String) -> Self {
        StoreError(message)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError(format!("corrupt record: {e}"))
    }
}

pub trait Store: Send + Sync {
    /// Stores a config version; storing the same bytes again keeps the first record.
    fn put_config(&self, config: &StoredConfig) -> Result<(), StoreError>;
    fn get_config(&self, hash: &str) -> Result<Option<StoredConfig>, StoreError>;
    /// Newest first, without content.
    fn list_configs(&self) -> Result<Vec<StoredConfig>, StoreError>;
    /// Writes a rollout's whole record, and the desired configs its transition moved, together;
    /// every transition calls this before it takes effect.
    fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        desired: &[DesiredChange],
    ) -> Result<(), StoreError>;
    /// Moves desired configs outside a rollout (a gateway adopted at its first report).
    fn put_desired(&self, desired: &[DesiredChange]) -> Result<(), StoreError>;
    /// Pins a gateway to a config, or removes its pin.
    fn put_pin(&self, gateway: &str, pin: Option<&Desired>) -> Result<(), StoreError>;
    fn put_group_intent(&self, group: &str, intent: &GroupIntent) -> Result<(), StoreError>;
    /// Every desired config, pin and group intent.
    fn load_intent(&self) -> Result<Intent, StoreError>;
    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;
    fn next_rollout_number(&self) -> Result<u64, StoreError>;
    fn audit(
        &self,
        at_unix_ms: u64,
        identity: &str,
        action: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), StoreError>;
    /// Remembers that `gateway` refused the config `hash` (its validation failed), so listings
    /// can say so; one mark per gateway, the latest reason kept.
    fn mark_rejected(
        &self,
        hash: &str,
        gateway: &str,
        reason: &str,
        at_unix_ms: u64,
    ) -> Result<(), StoreError>;
    /// Every rejection mark: config hash -> (gateway, reason), in gateway order.
    fn rejections(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, StoreError>;
    /// Adds or replaces groups by name.
    fn put_groups(&self, groups: &[Group]) -> Result<(), StoreError>;
    fn list_groups(&self) -> Result<Vec<Group>, StoreError>;
}

/// SQLite in the coordinator's data directory (`coordinator.db`, WAL journal).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(data_dir.join("coordinator.db"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS config_versions (
                 hash TEXT PRIMARY KEY, version TEXT NOT NULL, content BLOB NOT NULL,
                 author TEXT NOT NULL, created_at INTEGER NOT NULL, message TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rollouts (
                 number INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, definition TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS audit (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, identity TEXT NOT NULL,
                 action TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS config_rejections (
                 hash TEXT NOT NULL, gateway TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL,
                 PRIMARY KEY (hash, gateway)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS desired (gateway TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS pins (gateway TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS group_intent (name TEXT PRIMARY KEY, record TEXT NOT NULL);",
        )?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn write_desired(
    tx: &rusqlite::Transaction<'_>,
    desired: &[DesiredChange],
) -> Result<(), StoreError> {
    let mut put =
        tx.prepare_cached("INSERT OR REPLACE INTO desired (gateway, record) VALUES (?1, ?2)")?;
    let mut forget = tx.prepare_cached("DELETE FROM desired WHERE gateway = ?1")?;
    for (gateway, record) in desired {
        match record {
            Some(record) => put.execute(params![gateway, serde_json::to_string(record)?])?,
            None => forget.execute([gateway])?,
        };
    }
    Ok(())
}

fn row_to_config(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredConfig> {
    Ok(StoredConfig {
        hash: row.get(0)?,
        version: row.get(1)?,
        content: row.get(2)?,
        author: row.get(3)?,
        created_at_unix_ms: row.get::<_, i64>(4)?.try_into().unwrap_or(0),
        message: row.get(5)?,
    })
}

impl Store for SqliteStore {
    fn put_config(&self, c: &StoredConfig) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO config_versions VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                c.hash,
                c.version,
                c.content,
                c.author,
                i64::try_from(c.created_at_unix_ms).unwrap_or(i64::MAX),
                c.message
            ],
        )?;
        Ok(())
    }

    fn get_config(&self, hash: &str) -> Result<Option<StoredConfig>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT hash, version, content, author, created_at, message FROM config_versions WHERE hash = ?1", [hash], row_to_config)
            .optional()?)
    }

    fn list_configs(&self) -> Result<Vec<StoredConfig>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT hash, version, x'', author, created_at, message FROM config_versions ORDER BY created_at DESC")?;
        let rows = stmt.query_map([], row_to_config)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        desired: &[DesiredChange],
    ) -> Result<(), StoreError> {
        let record = serde_json::to_string(rollout)?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO rollouts (number, id, record) VALUES (?1, ?2, ?3)
             ON CONFLICT(number) DO UPDATE SET record = excluded.record",
            params![
                i64::try_from(rollout.number).unwrap_or(i64::MAX),
                rollout.id,
                record
            ],
        )?;
        write_desired(&tx, desired)?;
        tx.commit()?;
        Ok(())
    }

    fn put_desired(&self, desired: &[DesiredChange]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        write_desired(&tx, desired)?;
        tx.commit()?;
        Ok(())
    }

    fn put_pin(&self, gateway: &str, pin: Option<&Desired>) -> Result<(), StoreError> {
        let conn = self.conn();
        match pin {
            Some(pin) => conn.execute(
                "INSERT OR REPLACE INTO pins (gateway, record) VALUES (?1, ?2)",
                params![gateway, serde_json::to_string(pin)?],
            )?,
            None => conn.execute("DELETE FROM pins WHERE gateway = ?1", [gateway])?,
        };
        Ok(())
    }

    fn put_group_intent(&self, group: &str, intent: &GroupIntent) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO group_intent (name, record) VALUES (?1, ?2)",
            params![group, serde_json::to_string(intent)?],
        )?;
        Ok(())
    }

    fn load_intent(&self) -> Result<Intent, StoreError> {
        let conn = self.conn();
        let read = |table: &str| -> Result<Vec<(String, String)>, StoreError> {
            let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1"))?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        };
        let mut intent = Intent::default();
        for (gateway, record) in read("desired")? {
            intent
                .gateways
                .insert(gateway, serde_json::from_str(&record)?);
        }
        for (gateway, record) in read("pins")? {
            intent.pins.insert(gateway, serde_json::from_str(&record)?);
        }
        for (group, record) in read("group_intent")? {
            intent.groups.insert(group, serde_json::from_str(&record)?);
        }
        Ok(intent)
    }

    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT record FROM rollouts ORDER BY number")?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        let mut out = Vec::new();
        for text in rows {
            out.push(serde_json::from_str(&text?)?);
        }
        Ok(out)
    }

    fn next_rollout_number(&self) -> Result<u64, StoreError> {
        let max: Option<i64> =
            self.conn()
                .query_row("SELECT MAX(number) FROM rollouts", [], |row| row.get(0))?;
        Ok(max.map_or(1, |m| u64::try_from(m).unwrap_or(0) + 1))
    }

    fn put_groups(&self, groups: &[Group]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for group in groups {
            tx.execute(
                "INSERT INTO groups (name, definition) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET definition = excluded.definition",
                params![group.name, serde_json::to_string(group)?],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn list_groups(&self) -> Result<Vec<Group>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT definition FROM groups ORDER BY name")?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        let mut out = Vec::new();
        for text in rows {
            out.push(serde_json::from_str(&text?)?);
        }
        Ok(out)
    }

    fn mark_rejected(
        &self,
        hash: &str,
        gateway: &str,
        reason: &str,
        at_unix_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO config_rejections VALUES (?1, ?2, ?3, ?4)",
            params![
                hash,
                gateway,
                reason,
                i64::try_from(at_unix_ms).unwrap_or(i64::MAX)
            ],
        )?;
        Ok(())
    }

    fn rejections(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT hash, gateway, reason FROM config_rejections ORDER BY hash, gateway",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut all: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for row in rows {
            let (hash, gateway, reason) = row?;
            all.entry(hash).or_default().push((gateway, reason));
        }
        Ok(all)
    }

    fn audit(
        &self,
        at: u64,
        identity: &str,
        action: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO audit (at, identity, action, target, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                i64::try_from(at).unwrap_or(i64::MAX),
                identity,
                action,
                target,
                reason
            ],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_content_addressed_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoredConfig {
            hash: "sha256:aa".into(),
            version: "1.0.0".into(),
            content: b"pack: {}".to_vec(),
            author: "spiffe://d/operator/alice".into(),
            created_at_unix_ms: 5,
            message: "first".into(),
        };
        {
            let store = SqliteStore::open(dir.path()).expect("open");
            store.put_config(&config).expect("put");
            store
                .put_config(&StoredConfig {
                    message: "again".into(),
                    ..config.clone()
                })
                .expect("idempotent");
            store
                .audit(
                    1,
                    "spiffe://d/operator/alice",
                    "push",
                    "group dev",
                    "why not",
                )
                .expect("audit");
        }
        let store = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get_config("sha256:aa").expect("get"), Some(config));
        assert_eq!(store.list_configs().expect("list").len(), 1);
        assert_eq!(store.next_rollout_number().expect("next"), 1);
    }
}
