//! What `ktctl cluster status` and `ktctl doctor` read of the control plane: each replica
//! registers itself under its lease; any replica answers with the replicas, the leader and its
//! epoch, the agents each holds, and etcd's health as measured from here.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmType, Client, GetOptions, PutOptions};
use kt_proto::v1::{AgentState, ClusterStatusResponse, EtcdStatus, GatewayState, ReplicaStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::keys::{Keys, kind};
use super::lease::LeaseGrant;
use super::replica::Replica;

/// A replica's registration (`replica/<name>`, under its lease).
#[derive(Serialize, Deserialize)]
struct Registration {
    address: String,
    version: String,
    started_unix_ms: u64,
    lease_granted_unix_ms: u64,
}

/// Registers this replica under each lease it is granted, until `cancel`.
pub async fn register(
    client: Client,
    keys: Keys,
    name: String,
    address: SocketAddr,
    mut grants: watch::Receiver<Option<LeaseGrant>>,
    cancel: CancellationToken,
) {
    let started_unix_ms = kt_daemon::unix_ms_now();
    loop {
        let lease = grants.borrow_and_update().as_ref().map(|g| g.id);
        if let Some(lease) = lease {
            let registration = Registration {
                address: address.to_string(),
                version: env!("CARGO_PKG_VERSION").into(),
                started_unix_ms,
                lease_granted_unix_ms: kt_daemon::unix_ms_now(),
            };
            let value = serde_json::to_vec(&registration).unwrap_or_default();
            let put = async {
                client
                    .kv_client()
                    .put(
                        keys.one(kind::REPLICA, &name),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
            };
            if tokio::time::timeout(Duration::from_secs(5), put)
                .await
                .is_ok_and(|put| put.is_ok())
            {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = grants.changed() => if changed.is_err() { return },
                }
                continue;
            }
        }
        // No lease yet, or not written: try again soon.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = grants.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The control plane as `replica` sees it; `fleet` is its fleet view (every replica's records).
pub async fn cluster_status(replica: &Replica, fleet: &[GatewayState]) -> ClusterStatusResponse {
    let timeout = replica.settings.request_timeout;
    let client = &replica.client;
    let mut etcd = EtcdStatus {
        endpoints: replica.settings.endpoints.clone(),
        ..Default::default()
    };
    let asked = Instant::now();
    let mut maintenance = client.maintenance_client();
    match tokio::time::timeout(timeout, maintenance.status()).await {
        Ok(Ok(status)) => {
            etcd.reachable = true;
            etcd.latency_us = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
            etcd.version = status.version().to_owned();
            etcd.db_size_bytes = u64::try_from(status.db_size()).unwrap_or(0);
        }
        Ok(Err(e)) => etcd.error = e.to_string(),
        Err(_) => etcd.error = format!("no answer within {timeout:?}"),
    }
    let mut answer = ClusterStatusResponse {
        storage: "etcd".into(),
        answered_by: replica.name.clone(),
        ..Default::default()
    };
    if etcd.reachable {
        let mut maintenance = client.maintenance_client();
        let alarms = maintenance.alarm(AlarmAction::Get, AlarmType::None, None);
        if let Ok(Ok(alarms)) = tokio::time::timeout(timeout, alarms).await {
            etcd.alarms = alarms
                .alarms()
                .iter()
                .map(|a| a.alarm().as_str_name().to_owned())
                .collect();
        }
        let mut elections = client.election_client();
        let leader = elections.leader(replica.keys.election());
        if let Ok(Ok(leader)) = tokio::time::timeout(timeout, leader).await
            && let Some(kv) = leader.kv()
        {
            answer.leader = String::from_utf8_lossy(kv.value()).into_owned();
            answer.epoch = u64::try_from(kv.create_revision()).unwrap_or(0);
        }
        answer.replicas = replicas(client, &replica.keys, timeout).await;
    }
    for r in &mut answer.replicas {
        r.leader = r.name == answer.leader;
        r.agents = agents_of(fleet, &r.name);
    }
    answer.etcd = Some(etcd);
    if let Some(stream) = &replica.events {
        let bus = crate::events::nats::status::bus_status(stream, &replica.store, timeout);
        answer.bus = Some(bus.await);
    }
    answer
}

/// Every registered replica, with what etcd says of its lease.
async fn replicas(client: &Client, keys: &Keys, timeout: Duration) -> Vec<ReplicaStatus> {
    let mut kv = super::kv(client);
    let listed = kv.get(
        keys.all(kind::REPLICA),
        Some(GetOptions::new().with_prefix()),
    );
    let Ok(Ok(listed)) = tokio::time::timeout(timeout, listed).await else {
        return Vec::new();
    };
    let mut replicas = Vec::new();
    for kv in listed.kvs() {
        let Some(name) = keys.name_in(kind::REPLICA, kv.key()) else {
            continue;
        };
        let Ok(registration) = serde_json::from_slice::<Registration>(kv.value()) else {
            continue;
        };
        let mut leases = client.lease_client();
        let ttl = leases.time_to_live(kv.lease(), None);
        let ttl = match tokio::time::timeout(timeout, ttl).await {
            Ok(Ok(ttl)) => ttl.ttl(),
            _ => -1,
        };
        replicas.push(ReplicaStatus {
            name: name.to_owned(),
            address: registration.address,
            version: registration.version,
            started_unix_ms: registration.started_unix_ms,
            lease_granted_unix_ms: registration.lease_granted_unix_ms,
            lease_ttl_remaining_s: ttl,
            agents: 0,
            leader: false,
        });
    }
    replicas
}

/// Connected agents whose sessions `replica` holds.
pub fn agents_of(fleet: &[GatewayState], replica: &str) -> u32 {
    let held = fleet
        .iter()
        .filter(|g| g.replica == replica && g.agent_state == AgentState::Connected as i32)
        .count();
    u32::try_from(held).unwrap_or(u32::MAX)
}
