//! The coordinator's durable state behind one interface: config versions, rollouts, and the
//! audit log of operator actions. The embedded SQLite store is the default; a distributed
//! backend (etcd) can implement the same trait.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::de::DeserializeOwned;

use kt_proto::v1::ShadowRun;
use prost::Message;

use crate::config::Group;
use crate::intent::{Desired, DesiredChange, GroupIntent, Intent};
use crate::revocations::AgentRevocation;
use crate::rollout::model::RolloutRecord;
use crate::tokens::JoinToken;

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
pub enum StoreError {
    #[error("store: {0}")]
    Failed(String),
    /// A leader's write found its leader key gone or replaced: it is no longer the leader.
    #[error("store: leadership lost ({0}); this replica stopped acting as leader")]
    Fenced(String),
    /// The distributed store could not be reached; nothing was written.
    #[error("store: etcd unreachable: {0}")]
    Unavailable(String),
}

impl From<String> for StoreError {
    fn from(message: String) -> Self {
        StoreError::Failed(message)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Failed(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Failed(format!("corrupt record: {e}"))
    }
}

/// Every method is async: the embedded store runs SQLite on a thread of its own, and a
/// distributed backend (etcd) answers over the network.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Stores a config version; storing the same bytes again keeps the first record.
    async fn put_config(&self, config: &StoredConfig) -> Result<(), StoreError>;
    async fn get_config(&self, hash: &str) -> Result<Option<StoredConfig>, StoreError>;
    /// Newest first, without content.
    async fn list_configs(&self) -> Result<Vec<StoredConfig>, StoreError>;
    /// Writes a rollout's whole record, and the desired configs its transition moved, together;
    /// every transition calls this before it takes effect.
    async fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        desired: &[DesiredChange],
    ) -> Result<(), StoreError>;
    /// Moves desired configs outside a rollout (a gateway adopted at its first report).
    async fn put_desired(&self, desired: &[DesiredChange]) -> Result<(), StoreError>;
    /// Pins a gateway to a config, or removes its pin.
    async fn put_pin(&self, gateway: &str, pin: Option<&Desired>) -> Result<(), StoreError>;
    async fn put_group_intent(&self, group: &str, intent: &GroupIntent) -> Result<(), StoreError>;
    /// Every desired config, pin and group intent.
    async fn load_intent(&self) -> Result<Intent, StoreError>;
    async fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;
    async fn next_rollout_number(&self) -> Result<u64, StoreError>;
    async fn audit(
        &self,
        at_unix_ms: u64,
        identity: &str,
        action: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), StoreError>;
    /// Remembers that `gateway` refused the config `hash` (its validation failed), so listings
    /// can say so; one mark per gateway, the latest reason kept.
    async fn mark_rejected(
        &self,
        hash: &str,
        gateway: &str,
        reason: &str,
        at_unix_ms: u64,
    ) -> Result<(), StoreError>;
    /// Every rejection mark: config hash -> (gateway, reason), in gateway order.
    async fn rejections(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, StoreError>;
    /// Adds or replaces groups by name.
    async fn put_groups(&self, groups: &[Group]) -> Result<(), StoreError>;
    async fn list_groups(&self) -> Result<Vec<Group>, StoreError>;
    /// Adds or replaces a join token by id (created, revoked).
    async fn put_token(&self, token: &JoinToken) -> Result<(), StoreError>;
    /// Every join token, by id.
    async fn list_tokens(&self) -> Result<Vec<JoinToken>, StoreError>;
    /// Replaces a join token only while it is stored exactly as `current` (compare and set), so
    /// two enrollments never both take its last use; false when it changed meanwhile.
    async fn replace_token(
        &self,
        current: &JoinToken,
        next: &JoinToken,
    ) -> Result<bool, StoreError>;
    /// Adds or replaces a gateway's revocation.
    async fn put_revocation(&self, revocation: &AgentRevocation) -> Result<(), StoreError>;
    /// Lifts a gateway's revocation; nothing when there is none.
    async fn delete_revocation(&self, gateway: &str) -> Result<(), StoreError>;
    /// Every revoked gateway, by id.
    async fn list_revocations(&self) -> Result<Vec<AgentRevocation>, StoreError>;
    /// Writes a shadow run's whole record (with its report once it ended).
    async fn put_shadow_run(&self, run: &ShadowRun) -> Result<(), StoreError>;
    /// Every shadow run, in no particular order.
    async fn list_shadow_runs(&self) -> Result<Vec<ShadowRun>, StoreError>;
}

/// SQLite in the coordinator's data directory (`coordinator.db`, WAL journal), owned by a
/// thread of its own: callers send it work and await the answer, so no fsync'd write ever
/// runs on a runtime thread.
pub struct SqliteStore {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

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
             CREATE TABLE IF NOT EXISTS group_intent (name TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS join_tokens (id TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS agent_revocations (
                 gateway TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS shadow_runs (id TEXT PRIMARY KEY, record BLOB NOT NULL);",
        )?;
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kt-store".into())
            .spawn(move || {
                let mut conn = conn;
                // Ends when the last handle is dropped.
                for job in queue {
                    job(&mut conn);
                }
            })
            .map_err(|e| StoreError::Failed(format!("cannot start the store thread: {e}")))?;
        Ok(SqliteStore {
            jobs: Mutex::new(jobs),
        })
    }

    /// Runs `work` on the store's thread and waits for its answer.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(work(conn));
        });
        let gone = || StoreError::Failed("the store thread is gone".into());
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Desired-config changes as rows: (gateway, the record as JSON, or none to forget it).
type DesiredRows = Vec<(String, Option<String>)>;

fn encode_desired(desired: &[DesiredChange]) -> Result<DesiredRows, StoreError> {
    desired
        .iter()
        .map(|(gateway, d)| {
            let record = d.as_ref().map(serde_json::to_string).transpose()?;
            Ok((gateway.clone(), record))
        })
        .collect()
}

fn write_desired(tx: &rusqlite::Transaction<'_>, desired: &DesiredRows) -> Result<(), StoreError> {
    let mut put =
        tx.prepare_cached("INSERT OR REPLACE INTO desired (gateway, record) VALUES (?1, ?2)")?;
    let mut forget = tx.prepare_cached("DELETE FROM desired WHERE gateway = ?1")?;
    for (gateway, record) in desired {
        match record {
            Some(record) => put.execute(params![gateway, record])?,
            None => forget.execute([gateway])?,
        };
    }
    Ok(())
}

/// The JSON records in the first column of `sql`'s rows, decoded.
fn json_records<T: DeserializeOwned>(conn: &Connection, sql: &str) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
    rows.map(|text| Ok(serde_json::from_str(&text?)?)).collect()
}

/// A two-column table of keys and JSON records, decoded by key.
fn keyed_json_records<T: DeserializeOwned>(
    conn: &Connection,
    table: &str,
) -> Result<BTreeMap<String, T>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT * FROM {table}"))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    rows.map(|row| {
        let (key, text) = row?;
        Ok((key, serde_json::from_str(&text)?))
    })
    .collect()
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

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn put_config(&self, c: &StoredConfig) -> Result<(), StoreError> {
        let c = c.clone();
        self.run(move |conn| {
            conn.execute(
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
        })
        .await
    }

    async fn get_config(&self, hash: &str) -> Result<Option<StoredConfig>, StoreError> {
        let hash = hash.to_owned();
        self.run(move |conn| {
            Ok(conn
                .query_row("SELECT hash, version, content, author, created_at, message FROM config_versions WHERE hash = ?1", [hash], row_to_config)
                .optional()?)
        })
        .await
    }

    async fn list_configs(&self) -> Result<Vec<StoredConfig>, StoreError> {
        self.run(|conn| {
            let mut stmt = conn.prepare("SELECT hash, version, x'', author, created_at, message FROM config_versions ORDER BY created_at DESC")?;
            let rows = stmt.query_map([], row_to_config)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        desired: &[DesiredChange],
    ) -> Result<(), StoreError> {
        let record = serde_json::to_string(rollout)?;
        let (number, id) = (
            i64::try_from(rollout.number).unwrap_or(i64::MAX),
            rollout.id.clone(),
        );
        let desired = encode_desired(desired)?;
        self.run(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO rollouts (number, id, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT(number) DO UPDATE SET record = excluded.record",
                params![number, id, record],
            )?;
            write_desired(&tx, &desired)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn put_desired(&self, desired: &[DesiredChange]) -> Result<(), StoreError> {
        let desired = encode_desired(desired)?;
        self.run(move |conn| {
            let tx = conn.transaction()?;
            write_desired(&tx, &desired)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn put_pin(&self, gateway: &str, pin: Option<&Desired>) -> Result<(), StoreError> {
        let gateway = gateway.to_owned();
        let pin = pin.map(serde_json::to_string).transpose()?;
        self.run(move |conn| {
            match pin {
                Some(pin) => conn.execute(
                    "INSERT OR REPLACE INTO pins (gateway, record) VALUES (?1, ?2)",
                    params![gateway, pin],
                )?,
                None => conn.execute("DELETE FROM pins WHERE gateway = ?1", [gateway])?,
            };
            Ok(())
        })
        .await
    }

    async fn put_group_intent(&self, group: &str, intent: &GroupIntent) -> Result<(), StoreError> {
        let group = group.to_owned();
        let record = serde_json::to_string(intent)?;
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO group_intent (name, record) VALUES (?1, ?2)",
                params![group, record],
            )?;
            Ok(())
        })
        .await
    }

    async fn load_intent(&self) -> Result<Intent, StoreError> {
        self.run(|conn| {
            Ok(Intent {
                gateways: keyed_json_records(conn, "desired")?,
                pins: keyed_json_records(conn, "pins")?,
                groups: keyed_json_records(conn, "group_intent")?,
            })
        })
        .await
    }

    async fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.run(|conn| json_records(conn, "SELECT record FROM rollouts ORDER BY number"))
            .await
    }

    async fn next_rollout_number(&self) -> Result<u64, StoreError> {
        self.run(|conn| {
            let max: Option<i64> =
                conn.query_row("SELECT MAX(number) FROM rollouts", [], |row| row.get(0))?;
            Ok(max.map_or(1, |m| u64::try_from(m).unwrap_or(0) + 1))
        })
        .await
    }

    async fn put_groups(&self, groups: &[Group]) -> Result<(), StoreError> {
        let rows: Vec<(String, String)> = groups
            .iter()
            .map(|g| Ok((g.name.clone(), serde_json::to_string(g)?)))
            .collect::<Result<_, StoreError>>()?;
        self.run(move |conn| {
            let tx = conn.transaction()?;
            for (name, definition) in rows {
                tx.execute(
                    "INSERT INTO groups (name, definition) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET definition = excluded.definition",
                    params![name, definition],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_groups(&self) -> Result<Vec<Group>, StoreError> {
        self.run(|conn| json_records(conn, "SELECT definition FROM groups ORDER BY name"))
            .await
    }

    async fn put_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        let (id, record) = (token.id.clone(), serde_json::to_string(token)?);
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO join_tokens (id, record) VALUES (?1, ?2)",
                params![id, record],
            )?;
            Ok(())
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        self.run(|conn| json_records(conn, "SELECT record FROM join_tokens ORDER BY id"))
            .await
    }

    async fn replace_token(
        &self,
        current: &JoinToken,
        next: &JoinToken,
    ) -> Result<bool, StoreError> {
        let (id, current, next) = (
            next.id.clone(),
            serde_json::to_string(current)?,
            serde_json::to_string(next)?,
        );
        self.run(move |conn| {
            let changed = conn.execute(
                "UPDATE join_tokens SET record = ?1 WHERE id = ?2 AND record = ?3",
                params![next, id, current],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn put_revocation(&self, revocation: &AgentRevocation) -> Result<(), StoreError> {
        let (gateway, record) = (
            revocation.gateway_id.clone(),
            serde_json::to_string(revocation)?,
        );
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO agent_revocations (gateway, record) VALUES (?1, ?2)",
                params![gateway, record],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_revocation(&self, gateway: &str) -> Result<(), StoreError> {
        let gateway = gateway.to_owned();
        self.run(move |conn| {
            conn.execute(
                "DELETE FROM agent_revocations WHERE gateway = ?1",
                params![gateway],
            )?;
            Ok(())
        })
        .await
    }

    async fn list_revocations(&self) -> Result<Vec<AgentRevocation>, StoreError> {
        self.run(|conn| {
            json_records(
                conn,
                "SELECT record FROM agent_revocations ORDER BY gateway",
            )
        })
        .await
    }

    async fn put_shadow_run(&self, run: &ShadowRun) -> Result<(), StoreError> {
        let (id, record) = (run.id.clone(), run.encode_to_vec());
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO shadow_runs (id, record) VALUES (?1, ?2)",
                params![id, record],
            )?;
            Ok(())
        })
        .await
    }

    async fn list_shadow_runs(&self) -> Result<Vec<ShadowRun>, StoreError> {
        self.run(|conn| {
            let mut stmt = conn.prepare("SELECT id, record FROM shadow_runs")?;
            let mut rows = stmt.query([])?;
            let mut runs = Vec::new();
            while let Some(row) = rows.next()? {
                let (id, record): (String, Vec<u8>) = (row.get(0)?, row.get(1)?);
                let run = ShadowRun::decode(record.as_slice())
                    .map_err(|e| StoreError::Failed(format!("corrupt shadow run {id}: {e}")))?;
                runs.push(run);
            }
            Ok(runs)
        })
        .await
    }

    async fn mark_rejected(
        &self,
        hash: &str,
        gateway: &str,
        reason: &str,
        at_unix_ms: u64,
    ) -> Result<(), StoreError> {
        let row = (hash.to_owned(), gateway.to_owned(), reason.to_owned());
        self.run(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO config_rejections VALUES (?1, ?2, ?3, ?4)",
                params![
                    row.0,
                    row.1,
                    row.2,
                    i64::try_from(at_unix_ms).unwrap_or(i64::MAX)
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn rejections(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, StoreError> {
        self.run(|conn| {
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
        })
        .await
    }

    async fn audit(
        &self,
        at: u64,
        identity: &str,
        action: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let row = (
            identity.to_owned(),
            action.to_owned(),
            target.to_owned(),
            reason.to_owned(),
        );
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO audit (at, identity, action, target, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    i64::try_from(at).unwrap_or(i64::MAX),
                    row.0,
                    row.1,
                    row.2,
                    row.3
                ],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn configs_are_content_addressed_and_survive_reopening() {
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
            store.put_config(&config).await.expect("put");
            store
                .put_config(&StoredConfig {
                    message: "again".into(),
                    ..config.clone()
                })
                .await
                .expect("idempotent");
            store
                .audit(
                    1,
                    "spiffe://d/operator/alice",
                    "push",
                    "group dev",
                    "why not",
                )
                .await
                .expect("audit");
        }
        let store = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.get_config("sha256:aa").await.expect("get"),
            Some(config)
        );
        assert_eq!(store.list_configs().await.expect("list").len(), 1);
        assert_eq!(store.next_rollout_number().await.expect("next"), 1);
    }

    #[tokio::test]
    async fn intent_is_stored_with_its_rollout_and_survives_reopening() {
        use crate::rollout::model::ConfigId;
        let dir = tempfile::tempdir().expect("tempdir");
        let desired = |hash: &str| Desired {
            config: ConfigId {
                version: "1.1.0".into(),
                hash: hash.into(),
            },
            cause: "test".into(),
            at: 1,
        };
        let written = {
            let store = SqliteStore::open(dir.path()).expect("open");
            store
                .put_desired(&[
                    ("gw-1".into(), Some(desired("sha256:a"))),
                    ("gw-2".into(), Some(desired("sha256:a"))),
                ])
                .await
                .expect("desired");
            store
                .put_desired(&[("gw-2".into(), None)])
                .await
                .expect("forget");
            store
                .put_pin("gw-3", Some(&desired("sha256:p")))
                .await
                .expect("pin");
            let group = GroupIntent {
                desired: Some(desired("sha256:g").config),
                source_hash: "sha256:s".into(),
                held: Some(("sha256:h".into(), "r-2 rolled back".into())),
            };
            store.put_group_intent("prod", &group).await.expect("group");
            store.load_intent().await.expect("load")
        };
        assert_eq!(written.gateways.keys().collect::<Vec<_>>(), ["gw-1"]);
        let store = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(store.load_intent().await.expect("load"), written);
        assert_eq!(written.pins["gw-3"].config.hash, "sha256:p");
        assert_eq!(written.groups["prod"].source_hash, "sha256:s");
    }
}
