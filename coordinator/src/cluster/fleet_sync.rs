//! Fleet records across replicas. Each replica writes the records of the sessions it holds to
//! etcd under its lease, only when they change materially (and their heartbeat time at most once
//! per refresh period, so bakes on other replicas see fresh evidence); every replica watches all
//! records and hands the others' to its fleet task. A replica that dies takes its records with
//! its lease, and its gateways show unreachable until their agents reconnect elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp};
use kt_proto::identity::GatewayId;
use kt_proto::v1::{AgentState, GatewayState};
use prost::Message;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::keys::{Keys, kind};
use super::lease::LeaseGrant;
use super::store::EtcdStore;
use super::watch::{PrefixWatch, Watched, list};
use crate::config::Group;
use crate::fleet::{Command, FleetHandle};
use crate::store::StoreError;

/// Writes this replica's records: every material change at once, heartbeat times every `refresh`.
pub async fn publish(
    client: Client,
    keys: Keys,
    replica: String,
    fleet: FleetHandle,
    mut grants: watch::Receiver<Option<LeaseGrant>>,
    refresh: Duration,
    cancel: CancellationToken,
) {
    // What etcd holds of ours under the current lease: gateway -> heartbeat time written.
    let mut written: BTreeMap<String, GatewayState> = BTreeMap::new();
    let mut lease: Option<i64> = None;
    let mut tick = tokio::time::interval(refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Ok((snapshot, mut changes)) = fleet.watch().await else {
        return;
    };
    let mut pending: BTreeMap<String, GatewayState> = snapshot
        .into_iter()
        .map(|s| (s.gateway_id.clone(), s))
        .collect();
    loop {
        let current = grants.borrow_and_update().as_ref().map(|g| g.id);
        if current != lease {
            // A new lease: nothing of ours is in etcd any more; write everything again.
            lease = current;
            for (gateway, state) in std::mem::take(&mut written) {
                pending.entry(gateway).or_insert(state);
            }
        }
        if let Some(lease) = lease {
            let due: Vec<GatewayState> = std::mem::take(&mut pending).into_values().collect();
            for state in due {
                if !is_ours(&state, &replica) {
                    // Let a record go that is ours no more; another replica's stays.
                    if written.remove(&state.gateway_id).is_some()
                        && let Err(error) =
                            delete_if_ours(&client, &keys, &state.gateway_id, lease).await
                    {
                        tracing::debug!(gateway_id = %state.gateway_id, %error, "fleet record not deleted; its lease ends it");
                    }
                    continue;
                }
                let material = written
                    .get(&state.gateway_id)
                    .is_none_or(|before| materially_different(before, &state, refresh));
                if !material {
                    continue;
                }
                match put(&client, &keys, &state, lease).await {
                    Ok(()) => {
                        written.insert(state.gateway_id.clone(), state);
                    }
                    Err(error) => {
                        tracing::debug!(gateway_id = %state.gateway_id, %error, "fleet record not written; retrying");
                        pending.insert(state.gateway_id.clone(), state);
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = grants.changed() => {}
            _ = tick.tick() => {
                // Heartbeat times move without a change being published: read them now.
                if let Ok(Ok(all)) = fleet.list(None).await {
                    for state in all.into_iter().filter(|s| is_ours(s, &replica)) {
                        pending.insert(state.gateway_id.clone(), state);
                    }
                }
            }
            change = changes.recv() => match change {
                Ok(state) => {
                    pending.insert(state.gateway_id.clone(), state);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Ok(Ok(all)) = fleet.list(None).await {
                        pending.extend(all.into_iter().map(|s| (s.gateway_id.clone(), s)));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// A record this replica writes: the session is, or was last, held here.
fn is_ours(state: &GatewayState, replica: &str) -> bool {
    state.replica == replica && state.agent_state != AgentState::Disconnected as i32
}

/// Worth a write: anything but the heartbeat time and counters changed, or the heartbeat time
/// moved by `refresh` or more.
fn materially_different(before: &GatewayState, now: &GatewayState, refresh: Duration) -> bool {
    let quiet = |s: &GatewayState| {
        let mut s = s.clone();
        s.last_heartbeat_unix_ms = 0;
        // The leader's own view, which other replicas do not take from here.
        s.desired = None;
        s.sync = 0;
        s.drifted_since_unix_ms = 0;
        s.converging_by.clear();
        s.pinned = false;
        if let Some(h) = &mut s.health {
            h.requests_processed = 0;
            h.errors = 0;
            h.verdicts = None;
        }
        s.events = None;
        s
    };
    let moved = now
        .last_heartbeat_unix_ms
        .saturating_sub(before.last_heartbeat_unix_ms);
    u128::from(moved) >= refresh.as_millis() || quiet(before) != quiet(now)
}

/// Writes `state` under `lease` unless another replica's lease holds the key (its session is
/// newer than whatever this replica still says).
async fn put(
    client: &Client,
    keys: &Keys,
    state: &GatewayState,
    lease: i64,
) -> Result<(), etcd_client::Error> {
    let key = keys.one(kind::FLEET, &state.gateway_id);
    let write = || {
        TxnOp::put(
            key.clone(),
            state.encode_to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    let ours = Txn::new()
        .when(vec![Compare::lease(key.clone(), CompareOp::Equal, lease)])
        .and_then(vec![write()]);
    let txn = Txn::new()
        .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
        .and_then(vec![write()])
        .or_else(vec![TxnOp::txn(ours)]);
    let mut kv = super::kv(client);
    tokio::time::timeout(Duration::from_secs(5), kv.txn(txn))
        .await
        .map_err(|_| etcd_client::Error::WatchError("etcd did not answer in time".into()))??;
    Ok(())
}

/// Deletes the record of `gateway` if this replica's lease still holds it.
async fn delete_if_ours(
    client: &Client,
    keys: &Keys,
    gateway: &str,
    lease: i64,
) -> Result<(), etcd_client::Error> {
    let key = keys.one(kind::FLEET, gateway);
    let txn = Txn::new()
        .when(vec![Compare::lease(key.clone(), CompareOp::Equal, lease)])
        .and_then(vec![TxnOp::delete(key, None)]);
    let mut kv = super::kv(client);
    tokio::time::timeout(Duration::from_secs(5), kv.txn(txn))
        .await
        .map_err(|_| etcd_client::Error::WatchError("etcd did not answer in time".into()))??;
    Ok(())
}

/// Hands every other replica's records to the fleet task: all of them first, then each change.
/// Re-lists when the watch breaks or is compacted, so no deletion is missed.
pub async fn follow(client: Client, keys: Keys, fleet: FleetHandle, cancel: CancellationToken) {
    let remote = |gateway, state| Command::Remote { gateway, state };
    follow_kind(client, keys, kind::FLEET, remote, fleet, cancel).await
}

/// Hands the leader's views of the gateways to the fleet task (which uses them while another
/// replica leads).
pub async fn follow_views(
    client: Client,
    keys: Keys,
    fleet: FleetHandle,
    cancel: CancellationToken,
) {
    let view = |gateway, view| Command::LeaderView { gateway, view };
    follow_kind(client, keys, kind::VIEW, view, fleet, cancel).await
}

/// Keys of `kind` (encoded `GatewayState`s by gateway) to the fleet task as `make` says.
async fn follow_kind(
    client: Client,
    keys: Keys,
    kind: &'static str,
    make: fn(GatewayId, Option<Box<GatewayState>>) -> Command,
    fleet: FleetHandle,
    cancel: CancellationToken,
) {
    let mut known: BTreeSet<String> = BTreeSet::new();
    let prefix = keys.all(kind);
    loop {
        let Some((listed, revision)) = list(&client, &prefix, &cancel).await else {
            return;
        };
        let mut present = BTreeSet::new();
        for kv in &listed {
            if let Some(gateway) = keys.name_in(kind, kv.key()) {
                present.insert(gateway.to_owned());
                if hand_over(&fleet, make, gateway, Some(kv.value()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        for gone in known.difference(&present) {
            if hand_over(&fleet, make, gone, None).await.is_err() {
                return;
            }
        }
        known = present;
        let mut watch = PrefixWatch::new(&client, prefix.clone(), Some(revision + 1));
        loop {
            let events = match watch.next(&cancel).await {
                None => return,
                Some(Watched::Events(events)) => events,
                Some(Watched::Compacted) => {
                    tracing::info!(kind, "watch compacted: listing again");
                    break;
                }
            };
            for event in &events {
                let Some(kv) = event.kv() else { continue };
                let Some(gateway) = keys.name_in(kind, kv.key()) else {
                    continue;
                };
                let value = match event.event_type() {
                    EventType::Put => {
                        known.insert(gateway.to_owned());
                        Some(kv.value())
                    }
                    EventType::Delete => {
                        known.remove(gateway);
                        None
                    }
                };
                if hand_over(&fleet, make, gateway, value).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Decodes one record for the fleet task; a malformed one is logged and skipped.
async fn hand_over(
    fleet: &FleetHandle,
    make: fn(GatewayId, Option<Box<GatewayState>>) -> Command,
    gateway: &str,
    value: Option<&[u8]>,
) -> Result<(), crate::fleet::FleetClosed> {
    let Ok(id) = GatewayId::new(gateway) else {
        tracing::warn!(gateway, "fleet record with an invalid gateway id skipped");
        return Ok(());
    };
    let state = match value.map(GatewayState::decode) {
        None => None,
        Some(Ok(state)) if state.gateway_id == gateway => Some(Box::new(state)),
        Some(_) => {
            tracing::warn!(gateway, "malformed fleet record skipped");
            return Ok(());
        }
    };
    fleet.send(make(id, state)).await
}

/// Groups any replica stored (an operator's `groups apply`, a groups file) reach every replica's
/// fleet: all of them first, then each change.
pub async fn follow_groups(
    client: Client,
    keys: Keys,
    fleet: FleetHandle,
    cancel: CancellationToken,
) {
    let prefix = keys.all(kind::GROUP);
    loop {
        let Some((listed, revision)) = list(&client, &prefix, &cancel).await else {
            return;
        };
        let groups: Vec<Group> = listed
            .iter()
            .filter_map(|kv| decode_group(kv.value()))
            .collect();
        if fleet.apply_groups(groups).await.is_err() {
            return;
        }
        let mut watch = PrefixWatch::new(&client, prefix.clone(), Some(revision + 1));
        loop {
            let events = match watch.next(&cancel).await {
                None => return,
                Some(Watched::Events(events)) => events,
                Some(Watched::Compacted) => break,
            };
            let groups: Vec<Group> = events
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .filter_map(|e| e.kv().and_then(|kv| decode_group(kv.value())))
                .collect();
            if !groups.is_empty() && fleet.apply_groups(groups).await.is_err() {
                return;
            }
        }
    }
}

fn decode_group(value: &[u8]) -> Option<Group> {
    match serde_json::from_slice(value) {
        Ok(group) => Some(group),
        Err(error) => {
            tracing::warn!(%error, "malformed group record skipped");
            None
        }
    }
}

/// The leader's side of views: what each gateway should run, who holds it and its sync state,
/// written (fenced, under the leader's lease) whenever they change, for the other replicas to
/// show. They vanish with the leader's lease; the next leader writes its own.
pub async fn publish_views(
    store: EtcdStore,
    fleet: FleetHandle,
    lease: i64,
    term: CancellationToken,
) {
    let Ok((snapshot, mut changes)) = fleet.watch().await else {
        return;
    };
    let mut written: BTreeMap<String, GatewayState> = BTreeMap::new();
    let mut pending: BTreeMap<String, GatewayState> = snapshot
        .into_iter()
        .map(|s| (s.gateway_id.clone(), leader_view(&s)))
        .collect();
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    loop {
        let due: Vec<(String, Option<Vec<u8>>)> = pending
            .iter()
            .filter(|(gateway, view)| written.get(*gateway) != Some(view))
            .map(|(gateway, view)| (gateway.clone(), Some(view.encode_to_vec())))
            .collect();
        if !due.is_empty() {
            match store.put_views(due, lease).await {
                Ok(()) => written.extend(std::mem::take(&mut pending)),
                Err(StoreError::Fenced(_)) => return,
                Err(error) => tracing::debug!(%error, "leader views not written; retrying"),
            }
        } else {
            pending.clear();
        }
        tokio::select! {
            _ = term.cancelled() => return,
            _ = retry.tick() => {}
            change = changes.recv() => match change {
                Ok(state) => {
                    pending.insert(state.gateway_id.clone(), leader_view(&state));
                    // Take what else is queued, to write it together.
                    while let Ok(state) = changes.try_recv() {
                        pending.insert(state.gateway_id.clone(), leader_view(&state));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Ok(Ok(all)) = fleet.list(None).await {
                        pending.extend(all.iter().map(|s| (s.gateway_id.clone(), leader_view(s))));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// The leader's part of a gateway's record.
fn leader_view(state: &GatewayState) -> GatewayState {
    GatewayState {
        gateway_id: state.gateway_id.clone(),
        desired: state.desired.clone(),
        pinned: state.pinned,
        converging_by: state.converging_by.clone(),
        sync: state.sync,
        drifted_since_unix_ms: state.drifted_since_unix_ms,
        ..Default::default()
    }
}
