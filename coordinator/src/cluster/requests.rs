//! Operator requests for the rollout engine, which runs on the leader only. Every replica hands
//! its operators' engine commands to etcd (`request/<id>`, under its own lease so a dead
//! replica's requests vanish) and waits for the leader's reply (`reply/<id>`); the leader takes
//! each request (deleting it first, so a request is carried out at most once even across a
//! takeover), runs it on its engine and writes the reply. No replica calls another.
//!
//! Reading a rollout's changes (`Watch`) needs no leader: the records are in etcd, and a replica
//! watches the rollout's key itself. Agents' answers go the same way as fleet records: the
//! replica holding the session writes them (`answer/<gateway>`), the leader follows them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use kt_proto::v1::ConfigStatus;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::keys::{Keys, kind};
use super::lease::LeaseGrant;
use super::watch::{PrefixWatch, Watched, list};
use crate::reconcile::GroupStatus;
use crate::rollout::engine::{Action, Command, EngineError, EngineHandle, Push};
use crate::rollout::model::RolloutRecord;
use crate::shadow::runs::{ShadowCommand, StartShadow};
use kt_proto::v1::ShadowRun;

/// Agents' answers queued at most before sessions wait.
const ANSWER_QUEUE: usize = 16_384;

/// How long an operator waits for the leader's reply.
const REPLY_DEADLINE: Duration = Duration::from_secs(30);

/// An engine command as it travels through etcd (a push's bytes travel beside it, raw).
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Push {
        push: Push,
        identity: String,
    },
    Control {
        id: String,
        action: Action,
        identity: String,
        reason: String,
    },
    Get {
        id: String,
    },
    List,
    Pin {
        gateway: String,
        config: Option<String>,
        identity: String,
        reason: String,
    },
    Groups,
    StartShadow {
        start: StartShadow,
        identity: String,
    },
    StopShadow {
        id: String,
        identity: String,
    },
    GetShadow {
        id: String,
    },
    ListShadows,
}

/// The leader's reply.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Pushed(Box<RolloutRecord>, String),
    Rollout(Box<RolloutRecord>),
    Rollouts(Vec<RolloutRecord>),
    Pinned,
    Groups(BTreeMap<String, GroupStatus>),
    /// A shadow run, protobuf-encoded.
    Shadow(Vec<u8>),
    Shadows(Vec<Vec<u8>>),
    Failed(Failure),
}

#[derive(Debug, Serialize, Deserialize)]
enum Failure {
    Invalid(String),
    NotFound(String),
    Conflict(String),
    Other(String),
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(m) => Failure::Invalid(m),
            EngineError::NotFound(m) => Failure::NotFound(m),
            EngineError::Conflict(m) => Failure::Conflict(m),
            other => Failure::Other(other.to_string()),
        }
    }
}

impl From<Failure> for EngineError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Invalid(m) => EngineError::Invalid(m),
            Failure::NotFound(m) => EngineError::NotFound(m),
            Failure::Conflict(m) => EngineError::Conflict(m),
            Failure::Other(m) => EngineError::NoLeader(format!("the leader failed: {m}")),
        }
    }
}

/// The request as stored: the command, and the lease its reply goes under.
#[derive(Serialize, Deserialize)]
struct Envelope {
    request: Request,
    lease: i64,
    replica: String,
}

/// A replica's way to etcd for its operators' engine commands.
#[derive(Clone)]
pub struct Forwarder {
    client: Client,
    keys: Keys,
    replica: String,
    grants: watch::Receiver<Option<LeaseGrant>>,
    timeout: Duration,
    seq: Arc<AtomicU64>,
}

impl Forwarder {
    pub fn new(
        client: Client,
        keys: Keys,
        replica: String,
        grants: watch::Receiver<Option<LeaseGrant>>,
        timeout: Duration,
    ) -> Self {
        Forwarder {
            client,
            keys,
            replica,
            grants,
            timeout,
            seq: Arc::default(),
        }
    }

    /// Serves `commands` (from [`EngineHandle::channel`]) until `cancel`, each on its own task;
    /// agents' answers are written together, as they come.
    pub async fn serve(self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let (answers, queued) = mpsc::channel(ANSWER_QUEUE);
        tokio::spawn(self.clone().write_answers(queued, cancel.clone()));
        loop {
            let command = tokio::select! {
                _ = cancel.cancelled() => return,
                command = commands.recv() => match command { Some(c) => c, None => return },
            };
            if let Command::Answer { gateway, status } = command {
                if answers.send((gateway, status)).await.is_err() {
                    return;
                }
                continue;
            }
            let forwarder = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = forwarder.handle(command) => {}
                }
            });
        }
    }

    async fn handle(&self, command: Command) {
        match command {
            Command::Push {
                push,
                identity,
                reply,
            } => {
                let answer = self.ask(Request::Push { push, identity }).await;
                let _ = reply.send(answer.and_then(|r| match r {
                    Reply::Pushed(record, diff) => Ok((*record, diff)),
                    other => Err(unexpected(other)),
                }));
            }
            Command::Control {
                id,
                action,
                identity,
                reason,
                reply,
            } => {
                let request = Request::Control {
                    id,
                    action,
                    identity,
                    reason,
                };
                let _ = reply.send(self.ask(request).await.and_then(rollout));
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.ask(Request::Get { id }).await.and_then(rollout));
            }
            Command::List { reply } => {
                let answer = self.ask(Request::List).await;
                let _ = reply.send(answer.and_then(|r| match r {
                    Reply::Rollouts(all) => Ok(all),
                    other => Err(unexpected(other)),
                }));
            }
            Command::Pin {
                gateway,
                config,
                identity,
                reason,
                reply,
            } => {
                let request = Request::Pin {
                    gateway,
                    config,
                    identity,
                    reason,
                };
                let _ = reply.send(self.ask(request).await.and_then(|r| match r {
                    Reply::Pinned => Ok(()),
                    other => Err(unexpected(other)),
                }));
            }
            Command::Groups { reply } => {
                let _ = reply.send(self.ask(Request::Groups).await.and_then(|r| match r {
                    Reply::Groups(groups) => Ok(groups),
                    other => Err(unexpected(other)),
                }));
            }
            Command::Watch { id, reply } => {
                let _ = reply.send(self.watch(id).await);
            }
            Command::Shadow(command) => self.handle_shadow(command).await,
            // Answers are written by `write_answers`; config sources are read by the leader, for
            // its own engine.
            Command::Answer { .. } | Command::Source { .. } => {}
        }
    }

    async fn handle_shadow(&self, command: ShadowCommand) {
        let one = |reply: Result<Reply, EngineError>| {
            reply.and_then(|r| match r {
                Reply::Shadow(bytes) => decode_run(&bytes),
                other => Err(unexpected(other)),
            })
        };
        match command {
            ShadowCommand::Start {
                mut start,
                identity,
                reply,
            } => {
                let content = std::mem::take(&mut start.content);
                let request = Request::StartShadow { start, identity };
                let _ = reply.send(one(self.ask_with(request, content).await));
            }
            ShadowCommand::Stop {
                id,
                identity,
                reply,
            } => {
                let _ = reply.send(one(self.ask(Request::StopShadow { id, identity }).await));
            }
            ShadowCommand::Get { id, reply } => {
                let _ = reply.send(one(self.ask(Request::GetShadow { id }).await));
            }
            ShadowCommand::List { reply } => {
                let answer = self.ask(Request::ListShadows).await;
                let _ = reply.send(answer.and_then(|r| match r {
                    Reply::Shadows(all) => all.iter().map(|bytes| decode_run(bytes)).collect(),
                    other => Err(unexpected(other)),
                }));
            }
            // The leader's own readers report to its own engine.
            ShadowCommand::Compared { .. } | ShadowCommand::Report { .. } => {}
        }
    }

    /// Writes `request` and waits for the leader's reply.
    async fn ask(&self, request: Request) -> Result<Reply, EngineError> {
        let (request, content) = match request {
            Request::Push { mut push, identity } => {
                let content = std::mem::take(&mut push.content);
                (Request::Push { push, identity }, content)
            }
            other => (other, Vec::new()),
        };
        self.ask_with(request, content).await
    }

    /// Writes `request` with `content` (config bytes travel raw, beside it) and waits for the
    /// leader's reply.
    async fn ask_with(&self, request: Request, content: Vec<u8>) -> Result<Reply, EngineError> {
        let lease = self.grants.borrow().as_ref().map(|g| g.id).ok_or_else(|| {
            EngineError::NoLeader(
                "this replica has no etcd lease now (is etcd reachable?); try again".into(),
            )
        })?;
        let id = format!(
            "{}-{}-{:08x}",
            self.replica.replace(':', "_"),
            self.seq.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let envelope = Envelope {
            request,
            lease,
            replica: self.replica.clone(),
        };
        let body =
            serde_json::to_vec(&envelope).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let reply_key = self.keys.one(kind::REPLY, &id);
        let txn = Txn::new().and_then(vec![
            TxnOp::put(
                self.keys.one(kind::REQUEST_CONTENT, &id),
                content,
                with_lease(),
            ),
            TxnOp::put(self.keys.one(kind::REQUEST, &id), body, with_lease()),
        ]);
        let mut kv = super::kv(&self.client);
        let written = tokio::time::timeout(self.timeout, kv.txn(txn)).await;
        let revision = match written {
            Ok(Ok(answer)) => answer.header().map_or(0, |h| h.revision()),
            Ok(Err(e)) => {
                return Err(EngineError::NoLeader(format!(
                    "etcd unreachable: {e}; nothing was asked"
                )));
            }
            Err(_) => {
                return Err(EngineError::NoLeader(
                    "etcd did not answer; nothing was asked".into(),
                ));
            }
        };
        let waited =
            tokio::time::timeout(REPLY_DEADLINE, self.wait_reply(&reply_key, revision)).await;
        // The reply is read: let it go (the lease would, later).
        let _ = tokio::time::timeout(self.timeout, kv.delete(reply_key, None)).await;
        match waited {
            Ok(Ok(Reply::Failed(failure))) => Err(failure.into()),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EngineError::NoLeader(format!(
                "no leader answered within {REPLY_DEADLINE:?} (etcd unreachable, or a takeover under way); the request may still be carried out: check `ktctl rollout list` before asking again"
            ))),
        }
    }

    async fn wait_reply(&self, key: &str, since: i64) -> Result<Reply, EngineError> {
        let options = WatchOptions::new().with_start_revision(since);
        let broken = |e: etcd_client::Error| {
            EngineError::NoLeader(format!(
                "etcd unreachable while waiting for the leader: {e}"
            ))
        };
        let mut stream = self
            .client
            .watch_client()
            .watch(key, Some(options))
            .await
            .map_err(broken)?;
        loop {
            let Some(answer) = stream.message().await.map_err(broken)? else {
                return Err(EngineError::NoLeader(
                    "etcd ended the wait for the leader's reply".into(),
                ));
            };
            for event in answer.events() {
                if event.event_type() == EventType::Put
                    && let Some(kv) = event.kv()
                {
                    return serde_json::from_slice(kv.value()).map_err(|e| {
                        EngineError::NoLeader(format!("unreadable reply from the leader: {e}"))
                    });
                }
            }
        }
    }

    /// The record of rollout `id` now, then each change of it as written to etcd.
    async fn watch(
        &self,
        id: String,
    ) -> Result<(RolloutRecord, broadcast::Receiver<RolloutRecord>), EngineError> {
        let first = match self.ask(Request::Get { id }).await? {
            Reply::Rollout(record) => *record,
            other => return Err(unexpected(other)),
        };
        let (tx, rx) = broadcast::channel(64);
        let key = self
            .keys
            .one(kind::ROLLOUT, &super::store::rollout_name(first.number));
        let client = self.client.clone();
        tokio::spawn(async move {
            let mut watches = super::watches(&client);
            let Ok(mut stream) = watches.watch(key, None).await else {
                return;
            };
            while let Ok(Some(answer)) = stream.message().await {
                for event in answer.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(record) = serde_json::from_slice::<RolloutRecord>(kv.value()) else {
                        continue;
                    };
                    let done = !record.is_active();
                    if tx.send(record).is_err() || done {
                        return; // nobody listens any more, or nothing more will change
                    }
                }
            }
        });
        Ok((first, rx))
    }

    /// Writes agents' answers for the leader, and lets the answered offers go: all that are
    /// queued together, in transactions of at most 50 answers.
    async fn write_answers(
        self,
        mut queue: mpsc::Receiver<(String, ConfigStatus)>,
        cancel: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                first = queue.recv() => match first { Some(first) => first, None => return },
            };
            let mut answers = vec![first];
            while answers.len() < 50
                && let Ok(next) = queue.try_recv()
            {
                answers.push(next);
            }
            // etcd refuses a transaction that names a key twice: two answers for one offer key
            // (a superseded offer and the next) go in transactions one after the other.
            let mut transactions: Vec<(Vec<TxnOp>, std::collections::HashSet<String>)> =
                vec![Default::default()];
            for (gateway, status) in &answers {
                let name = super::offers::offer_key(gateway, status.shadow);
                if transactions
                    .last()
                    .is_some_and(|(_, keys)| keys.contains(&name))
                {
                    transactions.push(Default::default());
                }
                if let Some((ops, keys)) = transactions.last_mut() {
                    ops.push(TxnOp::put(
                        self.keys.one(kind::ANSWER, &name),
                        status.encode_to_vec(),
                        None,
                    ));
                    ops.push(TxnOp::delete(self.keys.one(kind::OFFER, &name), None));
                    keys.insert(name);
                }
            }
            let mut kv = super::kv(&self.client);
            for (ops, _) in transactions {
                let txn = Txn::new().and_then(ops);
                let written = match tokio::time::timeout(self.timeout, kv.txn(txn)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("etcd did not answer".to_owned()),
                };
                if let Err(error) = written {
                    tracing::warn!(answers = answers.len(), %error, "cannot hand agents' answers to the leader; it offers again");
                }
            }
        }
    }
}

/// A shadow run as the leader encoded it in its reply.
fn decode_run(bytes: &[u8]) -> Result<ShadowRun, EngineError> {
    ShadowRun::decode(bytes)
        .map_err(|e| EngineError::NoLeader(format!("unreadable shadow run: {e}")))
}

fn rollout(reply: Reply) -> Result<RolloutRecord, EngineError> {
    match reply {
        Reply::Rollout(record) => Ok(*record),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: Reply) -> EngineError {
    match reply {
        Reply::Failed(failure) => failure.into(),
        _ => EngineError::NoLeader("the leader answered another question".into()),
    }
}

/// The leader's side: takes requests (those left from before its term first), runs them on
/// `engine`, replies. Also hands agents' answers to the engine. Ends with the term.
pub async fn serve_requests(
    client: Client,
    keys: Keys,
    engine: EngineHandle,
    timeout: Duration,
    term: CancellationToken,
) {
    let prefix = keys.all(kind::REQUEST);
    loop {
        // Requests made before this term (during a takeover) first, then each new one.
        let Some((listed, revision)) = list(&client, &prefix, &term).await else {
            return;
        };
        for kv in &listed {
            take(&client, &keys, &engine, kv, timeout, &term);
        }
        let mut watch = PrefixWatch::new(&client, prefix.clone(), Some(revision + 1));
        loop {
            let events = match watch.next(&term).await {
                None => return,
                Some(Watched::Events(events)) => events,
                Some(Watched::Compacted) => break,
            };
            for event in &events {
                if event.event_type() == EventType::Put
                    && let Some(kv) = event.kv()
                {
                    take(&client, &keys, &engine, kv, timeout, &term);
                }
            }
        }
    }
}

/// Takes one request on a task of its own: deletes it (only this version of it; losing the race
/// means another term took it), runs it, replies under the requester's lease.
fn take(
    client: &Client,
    keys: &Keys,
    engine: &EngineHandle,
    kv: &etcd_client::KeyValue,
    timeout: Duration,
    term: &CancellationToken,
) {
    let Some(id) = keys.name_in(kind::REQUEST, kv.key()).map(str::to_owned) else {
        return;
    };
    let (client, keys, engine, term) = (client.clone(), keys.clone(), engine.clone(), term.clone());
    let (key, revision, body) = (kv.key().to_vec(), kv.mod_revision(), kv.value().to_vec());
    tokio::spawn(async move {
        let content_key = keys.one(kind::REQUEST_CONTENT, &id);
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then(vec![
                TxnOp::delete(key, None),
                TxnOp::get(content_key.clone(), None),
                TxnOp::delete(content_key, None),
            ]);
        let mut kv = super::kv(&client);
        let Ok(Ok(taken)) = tokio::time::timeout(timeout, kv.txn(txn)).await else {
            return; // not taken: the requester times out and says so
        };
        if !taken.succeeded() {
            return;
        }
        let content = taken.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(mut get) => get
                .take_kvs()
                .into_iter()
                .next()
                .map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let reply_key = keys.one(kind::REPLY, &id);
        let (reply, lease) = match serde_json::from_slice::<Envelope>(&body) {
            Ok(envelope) => {
                tracing::debug!(request = %id, replica = %envelope.replica, "operator request taken");
                let reply = tokio::select! {
                    _ = term.cancelled() => Reply::Failed(Failure::Other("leadership ended while the request ran".into())),
                    reply = run(&engine, envelope.request, content.unwrap_or_default()) => reply,
                };
                (reply, envelope.lease)
            }
            Err(e) => (
                Reply::Failed(Failure::Invalid(format!("unreadable request: {e}"))),
                0,
            ),
        };
        let Ok(body) = serde_json::to_vec(&reply) else {
            return;
        };
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        if let Err(error) = kv.put(reply_key, body, options).await {
            tracing::warn!(request = %id, %error, "cannot reply to an operator request (its replica may be gone)");
        }
    });
}

async fn run(engine: &EngineHandle, request: Request, content: Vec<u8>) -> Reply {
    let failed = |e: EngineError| Reply::Failed(e.into());
    match request {
        Request::Push { mut push, identity } => {
            push.content = content;
            match engine.push(push, identity).await {
                Ok((record, diff)) => Reply::Pushed(Box::new(record), diff),
                Err(e) => failed(e),
            }
        }
        Request::Control {
            id,
            action,
            identity,
            reason,
        } => match engine.control(id, action, identity, reason).await {
            Ok(record) => Reply::Rollout(Box::new(record)),
            Err(e) => failed(e),
        },
        Request::Get { id } => match engine.get(id).await {
            Ok(record) => Reply::Rollout(Box::new(record)),
            Err(e) => failed(e),
        },
        Request::List => match engine.list().await {
            Ok(all) => Reply::Rollouts(all),
            Err(e) => failed(e),
        },
        Request::Pin {
            gateway,
            config,
            identity,
            reason,
        } => match engine.pin(gateway, config, identity, reason).await {
            Ok(()) => Reply::Pinned,
            Err(e) => failed(e),
        },
        Request::Groups => match engine.groups().await {
            Ok(groups) => Reply::Groups(groups),
            Err(e) => failed(e),
        },
        Request::StartShadow {
            mut start,
            identity,
        } => {
            start.content = content;
            match engine.start_shadow(start, identity).await {
                Ok(run) => Reply::Shadow(run.encode_to_vec()),
                Err(e) => failed(e),
            }
        }
        Request::StopShadow { id, identity } => match engine.stop_shadow(id, identity).await {
            Ok(run) => Reply::Shadow(run.encode_to_vec()),
            Err(e) => failed(e),
        },
        Request::GetShadow { id } => match engine.get_shadow(id).await {
            Ok(run) => Reply::Shadow(run.encode_to_vec()),
            Err(e) => failed(e),
        },
        Request::ListShadows => match engine.list_shadows().await {
            Ok(all) => Reply::Shadows(all.iter().map(|r| r.encode_to_vec()).collect()),
            Err(e) => failed(e),
        },
    }
}

/// The leader's side of answers: each one an agent gave through any replica, to the engine.
/// Hands the agents' answers written from revision `from` on to the engine. `from` is read
/// before the engine makes its first offer: an agent that runs the offered config already
/// answers at once, possibly before this watch is open, and that answer must not be lost.
pub async fn follow_answers(
    client: Client,
    keys: Keys,
    engine: EngineHandle,
    from: i64,
    term: CancellationToken,
) {
    // A broken stream resumes after the last answer seen. Answers compacted away before they
    // were seen are offered again by the engine once their offer times out.
    let mut watch = PrefixWatch::new(&client, keys.all(kind::ANSWER), Some(from));
    while let Some(puts) = watch.next_puts(&term).await {
        for kv in &puts {
            let Some(name) = keys.name_in(kind::ANSWER, kv.key()) else {
                continue;
            };
            let gateway = super::offers::gateway_of(name);
            match ConfigStatus::decode(kv.value()) {
                Ok(status) => engine.answer(gateway.to_owned(), status).await,
                Err(e) => tracing::warn!(gateway, error = %e, "malformed answer skipped"),
            }
        }
    }
}
