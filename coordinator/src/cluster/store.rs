//! The `Store` on etcd. Records are JSON under the keys of `keys`; config bytes are stored as
//! they are. Writes only the leader may make (rollouts, desired state, pins, group intent) go
//! through a handle made for its term ([`EtcdStore::fenced`]): each is a transaction that also
//! requires the leader key at the term's revision, and a failed compare ends the term at once.
//!
//! etcd bounds a transaction (128 operations by default): desired-state moves are written in
//! chunks, before the rollout record that causes them. If the leader dies between two, the
//! record still says the transition has not happened; the next leader makes it again, writing
//! the same desired configs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use kt_proto::v1::{ConfigOffer, ShadowRun};
use prost::Message;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::election::Leadership;
use super::keys::{Keys, kind};
use crate::config::Group;
use crate::intent::{Desired, DesiredChange, GroupIntent, Intent};
use crate::revocations::AgentRevocation;
use crate::rollout::model::RolloutRecord;
use crate::store::{Store, StoreError, StoredConfig};
use crate::tokens::JoinToken;

/// The largest message to or from etcd: above etcd's own request limit (which deployments set
/// with `--max-request-bytes`), so etcd is the one that says no.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Keys read per request when listing a kind: big records (rollouts) stay within a message.
const PAGE: i64 = 16;

/// Operations per transaction: under etcd's default `--max-txn-ops` (128), with room for the
/// fence.
const TXN_OPS: usize = 100;

/// What a leader's write must find: its key at its revision.
#[derive(Clone, Debug)]
pub struct Fence {
    key: Vec<u8>,
    revision: i64,
    lost: CancellationToken,
}

impl From<&Leadership> for Fence {
    fn from(l: &Leadership) -> Self {
        Fence {
            key: l.key.clone(),
            revision: l.revision,
            lost: l.lost.clone(),
        }
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    replica: String,
    timeout: Duration,
    /// Set on a leader's handle only.
    fence: Option<Fence>,
    audit_seq: std::sync::Arc<AtomicU64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("keys", &self.keys)
            .field("fenced", &self.fence.is_some())
            .finish_non_exhaustive()
    }
}

/// Config metadata as stored (the bytes are under a key of their own).
#[derive(Serialize, Deserialize)]
struct ConfigMeta {
    hash: String,
    version: String,
    author: String,
    created_at_unix_ms: u64,
    message: String,
}

#[derive(Serialize, Deserialize)]
struct AuditLine<'a> {
    at_unix_ms: u64,
    replica: &'a str,
    identity: &'a str,
    action: &'a str,
    target: &'a str,
    reason: &'a str,
}

#[derive(Serialize, Deserialize)]
struct Rejection {
    reason: String,
    at_unix_ms: u64,
}

impl EtcdStore {
    pub fn new(client: Client, keys: Keys, replica: String, timeout: Duration) -> Self {
        EtcdStore {
            client,
            keys,
            replica,
            timeout,
            fence: None,
            audit_seq: Default::default(),
        }
    }

    fn kv(&self) -> etcd_client::KvClient {
        super::kv(&self.client)
    }

    /// A handle for `leadership`'s term: the only one that may make leader writes.
    pub fn fenced(&self, leadership: &Leadership) -> Self {
        EtcdStore {
            fence: Some(Fence::from(leadership)),
            ..self.clone()
        }
    }

    /// Runs one etcd call, bounded in time; a call that did not answer is `Unavailable`.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(classify(error)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Every key of `kind`, read a page at a time at one revision.
    async fn get_prefix(&self, kind: &str) -> Result<Vec<KeyValue>, StoreError> {
        let mut kv = self.kv();
        let prefix = self.keys.all(kind);
        let end = prefix_end(&prefix);
        let mut from = prefix.into_bytes();
        let mut revision = 0;
        let mut all = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut answer = self.call(kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = answer.header().map_or(0, |h| h.revision());
            }
            let more = answer.more();
            let page = answer.take_kvs();
            let Some(last) = page.last() else { break };
            // The next page starts right after the last key read.
            from = last.key().to_vec();
            from.push(0);
            all.extend(page);
            if !more {
                break;
            }
        }
        Ok(all)
    }

    async fn decoded<T: DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<BTreeMap<String, T>, StoreError> {
        let mut decoded = BTreeMap::new();
        for kv in self.get_prefix(kind).await? {
            let Some(name) = self.keys.name_in(kind, kv.key()) else {
                continue;
            };
            let value = serde_json::from_slice(kv.value()).map_err(|e| {
                StoreError::Failed(format!("corrupt record {}: {e}", self.keys.one(kind, name)))
            })?;
            decoded.insert(name.to_owned(), value);
        }
        Ok(decoded)
    }

    /// Writes `ops` in transactions of at most [`TXN_OPS`]; each fenced when `fenced`.
    async fn write(&self, ops: Vec<TxnOp>, fenced: bool) -> Result<(), StoreError> {
        let fence = if fenced {
            Some(
                self.fence
                    .as_ref()
                    .ok_or_else(|| StoreError::Fenced("this replica is not the leader".into()))?,
            )
        } else {
            None
        };
        let mut ops = ops;
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(TXN_OPS));
            let chunk = std::mem::replace(&mut ops, rest);
            let mut txn = Txn::new();
            if let Some(fence) = fence {
                if fence.lost.is_cancelled() {
                    return Err(StoreError::Fenced("the term already ended".into()));
                }
                txn = txn.when(vec![Compare::create_revision(
                    fence.key.clone(),
                    CompareOp::Equal,
                    fence.revision,
                )]);
            }
            let mut kv = self.kv();
            let answer = self.call(kv.txn(txn.and_then(chunk))).await?;
            if !answer.succeeded() {
                if let Some(fence) = fence {
                    fence.lost.cancel();
                }
                return Err(StoreError::Fenced(
                    "the leader key is gone or belongs to a newer term".into(),
                ));
            }
        }
        Ok(())
    }

    fn json_put(
        &self,
        kind: &str,
        name: &str,
        value: &impl Serialize,
    ) -> Result<TxnOp, StoreError> {
        Ok(TxnOp::put(
            self.keys.one(kind, name),
            serde_json::to_vec(value)?,
            None,
        ))
    }

    /// Writes offers for the replicas holding the gateways' sessions to deliver; fenced, so a
    /// deposed leader's offer is never written. The config bytes stay in the config's own key.
    pub async fn put_offers(&self, offers: &[(String, ConfigOffer)]) -> Result<(), StoreError> {
        let ops = offers
            .iter()
            .map(|(gateway, offer)| {
                let mut offer = offer.clone();
                offer.content.clear();
                let name = super::offers::offer_key(gateway, offer.shadow);
                (name, offer.encode_to_vec())
            })
            // One put per key in a transaction (etcd refuses two): the newest offer wins.
            .collect::<BTreeMap<String, Vec<u8>>>()
            .into_iter()
            .map(|(name, offer)| TxnOp::put(self.keys.one(kind::OFFER, &name), offer, None))
            .collect();
        self.write(ops, true).await
    }

    /// Writes the leader's views of gateways (`None` deletes one) under `lease`; fenced.
    pub async fn put_views(
        &self,
        views: Vec<(String, Option<Vec<u8>>)>,
        lease: i64,
    ) -> Result<(), StoreError> {
        let ops = views
            .into_iter()
            .map(|(gateway, view)| {
                let key = self.keys.one(kind::VIEW, &gateway);
                match view {
                    Some(view) => TxnOp::put(key, view, Some(PutOptions::new().with_lease(lease))),
                    None => TxnOp::delete(key, None),
                }
            })
            .collect();
        self.write(ops, true).await
    }

    /// Writes the decision counters' checkpoint of `stream`; fenced, so only the leader that
    /// counted them writes them.
    pub async fn put_counters(&self, stream: &str, checkpoint: Vec<u8>) -> Result<(), StoreError> {
        let key = self.keys.one(kind::COUNTERS, stream);
        self.write(vec![TxnOp::put(key, checkpoint, None)], true)
            .await
    }

    /// The decision counters' checkpoint of `stream`, if one was written.
    pub async fn get_counters(&self, stream: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.keys.one(kind::COUNTERS, stream);
        let mut kv = self.kv();
        let mut answer = self.call(kv.get(key, None)).await?;
        Ok(answer
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.value().to_vec()))
    }

    fn desired_ops(&self, desired: &[DesiredChange]) -> Result<Vec<TxnOp>, StoreError> {
        desired
            .iter()
            .map(|(gateway, d)| match d {
                Some(d) => self.json_put(kind::DESIRED, gateway, d),
                None => Ok(TxnOp::delete(self.keys.one(kind::DESIRED, gateway), None)),
            })
            .collect()
    }
}

/// The end of the key range of every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // Prefixes end with '/', never with 0xff: incrementing the last byte is the range's end.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// Which etcd errors mean "unreachable" (a transport problem, nothing written) and which are
/// answers.
fn classify(error: etcd_client::Error) -> StoreError {
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            StoreError::Unavailable(error.to_string())
        }
        etcd_client::Error::GRpcStatus(status)
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
        {
            StoreError::Unavailable(status.message().to_owned())
        }
        other => StoreError::Failed(other.to_string()),
    }
}

/// Rollout keys sort by number.
pub(crate) fn rollout_name(number: u64) -> String {
    format!("{number:020}")
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn put_config(&self, c: &StoredConfig) -> Result<(), StoreError> {
        let meta = ConfigMeta {
            hash: c.hash.clone(),
            version: c.version.clone(),
            author: c.author.clone(),
            created_at_unix_ms: c.created_at_unix_ms,
            message: c.message.clone(),
        };
        let meta_key = self.keys.one(kind::CONFIG_META, &c.hash);
        // Written once: the same bytes stored again keep the first record.
        let txn = Txn::new()
            .when(vec![Compare::version(
                meta_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(
                    self.keys.one(kind::CONFIG_CONTENT, &c.hash),
                    c.content.clone(),
                    None,
                ),
                TxnOp::put(meta_key, serde_json::to_vec(&meta)?, None),
            ]);
        let mut kv = self.kv();
        self.call(kv.txn(txn)).await?;
        Ok(())
    }

    async fn get_config(&self, hash: &str) -> Result<Option<StoredConfig>, StoreError> {
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.keys.one(kind::CONFIG_META, hash), None),
            TxnOp::get(self.keys.one(kind::CONFIG_CONTENT, hash), None),
        ]);
        let mut kv = self.kv();
        let answer = self.call(kv.txn(txn)).await?;
        let mut values = answer.op_responses().into_iter().map(|r| match r {
            etcd_client::TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
            _ => None,
        });
        let (Some(Some(meta)), Some(Some(content))) = (values.next(), values.next()) else {
            return Ok(None);
        };
        let meta: ConfigMeta = serde_json::from_slice(meta.value())?;
        Ok(Some(StoredConfig {
            hash: meta.hash,
            version: meta.version,
            content: content.value().to_vec(),
            author: meta.author,
            created_at_unix_ms: meta.created_at_unix_ms,
            message: meta.message,
        }))
    }

    async fn list_configs(&self) -> Result<Vec<StoredConfig>, StoreError> {
        let metas: BTreeMap<String, ConfigMeta> = self.decoded(kind::CONFIG_META).await?;
        let mut configs: Vec<StoredConfig> = metas
            .into_values()
            .map(|m| StoredConfig {
                hash: m.hash,
                version: m.version,
                content: Vec::new(),
                author: m.author,
                created_at_unix_ms: m.created_at_unix_ms,
                message: m.message,
            })
            .collect();
        configs.sort_by_key(|c| std::cmp::Reverse(c.created_at_unix_ms));
        Ok(configs)
    }

    async fn put_rollout(
        &self,
        rollout: &RolloutRecord,
        desired: &[DesiredChange],
    ) -> Result<(), StoreError> {
        let mut ops = self.desired_ops(desired)?;
        // The record last: until it is written, the transition has not happened.
        ops.push(self.json_put(kind::ROLLOUT, &rollout_name(rollout.number), rollout)?);
        if ops.len() <= TXN_OPS {
            return self.write(ops, true).await;
        }
        let record = ops.split_off(ops.len() - 1);
        self.write(ops, true).await?;
        self.write(record, true).await
    }

    async fn put_desired(&self, desired: &[DesiredChange]) -> Result<(), StoreError> {
        self.write(self.desired_ops(desired)?, true).await
    }

    async fn put_pin(&self, gateway: &str, pin: Option<&Desired>) -> Result<(), StoreError> {
        let op = match pin {
            Some(pin) => self.json_put(kind::PIN, gateway, pin)?,
            None => TxnOp::delete(self.keys.one(kind::PIN, gateway), None),
        };
        self.write(vec![op], true).await
    }

    async fn put_group_intent(&self, group: &str, intent: &GroupIntent) -> Result<(), StoreError> {
        let op = self.json_put(kind::GROUP_INTENT, group, intent)?;
        self.write(vec![op], true).await
    }

    async fn load_intent(&self) -> Result<Intent, StoreError> {
        Ok(Intent {
            gateways: self.decoded(kind::DESIRED).await?,
            pins: self.decoded(kind::PIN).await?,
            groups: self.decoded(kind::GROUP_INTENT).await?,
        })
    }

    async fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        // Keys sort by number, and so does the map.
        let rollouts: BTreeMap<String, RolloutRecord> = self.decoded(kind::ROLLOUT).await?;
        Ok(rollouts.into_values().collect())
    }

    async fn next_rollout_number(&self) -> Result<u64, StoreError> {
        let mut kv = self.kv();
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only();
        let answer = self
            .call(kv.get(self.keys.all(kind::ROLLOUT), Some(options)))
            .await?;
        let last = answer
            .kvs()
            .first()
            .and_then(|kv| self.keys.name_in(kind::ROLLOUT, kv.key()))
            .and_then(|name| name.parse::<u64>().ok());
        Ok(last.map_or(1, |n| n + 1))
    }

    async fn audit(
        &self,
        at_unix_ms: u64,
        identity: &str,
        action: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let seq = self.audit_seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{at_unix_ms:016}-{}-{seq:010}", self.replica);
        let line = AuditLine {
            at_unix_ms,
            replica: &self.replica,
            identity,
            action,
            target,
            reason,
        };
        self.write(vec![self.json_put(kind::AUDIT, &name, &line)?], false)
            .await
    }

    async fn mark_rejected(
        &self,
        hash: &str,
        gateway: &str,
        reason: &str,
        at_unix_ms: u64,
    ) -> Result<(), StoreError> {
        let rejection = Rejection {
            reason: reason.to_owned(),
            at_unix_ms,
        };
        let op = self.json_put(kind::REJECTION, &format!("{hash}/{gateway}"), &rejection)?;
        self.write(vec![op], false).await
    }

    async fn rejections(&self) -> Result<BTreeMap<String, Vec<(String, String)>>, StoreError> {
        let marks: BTreeMap<String, Rejection> = self.decoded(kind::REJECTION).await?;
        let mut all: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (name, mark) in marks {
            if let Some((hash, gateway)) = name.rsplit_once('/') {
                all.entry(hash.to_owned())
                    .or_default()
                    .push((gateway.to_owned(), mark.reason));
            }
        }
        Ok(all)
    }

    async fn put_groups(&self, groups: &[Group]) -> Result<(), StoreError> {
        let ops = groups
            .iter()
            .map(|g| self.json_put(kind::GROUP, &g.name, g))
            .collect::<Result<_, _>>()?;
        self.write(ops, false).await
    }

    async fn list_groups(&self) -> Result<Vec<Group>, StoreError> {
        let groups: BTreeMap<String, Group> = self.decoded(kind::GROUP).await?;
        Ok(groups.into_values().collect())
    }

    async fn put_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        let op = self.json_put(kind::JOIN_TOKEN, &token.id, token)?;
        self.write(vec![op], false).await
    }

    async fn list_tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        let tokens: BTreeMap<String, JoinToken> = self.decoded(kind::JOIN_TOKEN).await?;
        Ok(tokens.into_values().collect())
    }

    async fn replace_token(
        &self,
        current: &JoinToken,
        next: &JoinToken,
    ) -> Result<bool, StoreError> {
        let key = self.keys.one(kind::JOIN_TOKEN, &next.id);
        let txn = Txn::new()
            .when(vec![Compare::value(
                key.clone(),
                CompareOp::Equal,
                serde_json::to_vec(current)?,
            )])
            .and_then(vec![TxnOp::put(key, serde_json::to_vec(next)?, None)]);
        let mut kv = self.kv();
        let answer = self.call(kv.txn(txn)).await?;
        Ok(answer.succeeded())
    }

    async fn put_revocation(&self, revocation: &AgentRevocation) -> Result<(), StoreError> {
        let op = self.json_put(kind::REVOCATION, &revocation.gateway_id, revocation)?;
        self.write(vec![op], false).await
    }

    async fn delete_revocation(&self, gateway: &str) -> Result<(), StoreError> {
        let key = self.keys.one(kind::REVOCATION, gateway);
        self.write(vec![TxnOp::delete(key, None)], false).await
    }

    async fn list_revocations(&self) -> Result<Vec<AgentRevocation>, StoreError> {
        let all: BTreeMap<String, AgentRevocation> = self.decoded(kind::REVOCATION).await?;
        Ok(all.into_values().collect())
    }

    async fn put_shadow_run(&self, run: &ShadowRun) -> Result<(), StoreError> {
        let key = self.keys.one(kind::SHADOW_RUN, &run.id);
        self.write(vec![TxnOp::put(key, run.encode_to_vec(), None)], true)
            .await
    }

    async fn list_shadow_runs(&self) -> Result<Vec<ShadowRun>, StoreError> {
        let mut runs = Vec::new();
        for kv in self.get_prefix(kind::SHADOW_RUN).await? {
            let run = ShadowRun::decode(kv.value()).map_err(|e| {
                StoreError::Failed(format!(
                    "corrupt shadow run {}: {e}",
                    String::from_utf8_lossy(kv.key())
                ))
            })?;
            runs.push(run);
        }
        Ok(runs)
    }
}
