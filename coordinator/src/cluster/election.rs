//! Leader election on etcd's election API, with fencing.
//!
//! A replica campaigns under its lease; etcd elects the candidate whose key is oldest. The
//! leader's key and its create revision (the *epoch*) are the fencing token: every leader write
//! is a transaction requiring that key at that revision (see `store`), and every offer carries
//! the epoch (agents refuse older ones). The replica stops acting the moment any of these says
//! it is no longer leader: a fenced write failed, its key was deleted, or its lease is within a
//! margin of its end by its own clock (so a partitioned leader stops before anyone else can
//! be elected). Then it campaigns again.

use std::future::Future;

use etcd_client::{Client, EventType, LeaderKey, ResignOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Epoch;
use super::keys::Keys;
use super::lease::LeaseGrant;

/// This replica's term as leader.
#[derive(Clone, Debug)]
pub struct Leadership {
    pub epoch: Epoch,
    /// The leader key, and its create revision: what every leader write compares.
    pub key: Vec<u8>,
    pub revision: i64,
    /// The lease the term lives under (the replica's).
    pub lease: i64,
    /// Cancelled the moment this replica must stop acting as leader.
    pub lost: CancellationToken,
    leader: LeaderKey,
}

/// Campaigns while this replica holds a lease, and runs `duties` for each term until the term
/// ends; resigns when `cancel` fires, so a successor takes over at once.
pub async fn lead<F, Fut>(
    client: Client,
    keys: Keys,
    replica: String,
    mut grants: watch::Receiver<Option<LeaseGrant>>,
    duties: F,
    cancel: CancellationToken,
) where
    F: Fn(Leadership) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let grant = tokio::select! {
            _ = cancel.cancelled() => return,
            grant = grants.wait_for(Option::is_some) => match grant {
                Ok(grant) => grant.clone(),
                Err(_) => return,
            },
        };
        let Some(grant) = grant else { continue };
        let elected = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = grant.ended.cancelled() => continue,
            elected = campaign(&client, &keys, &replica, &grant) => elected,
        };
        let leadership = match elected {
            Ok(leadership) => leadership,
            Err(error) => {
                tracing::warn!(%error, "campaign for leadership failed; trying again");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => continue,
                }
            }
        };
        tracing::info!(
            epoch = leadership.epoch.number,
            replica,
            "this replica is the leader"
        );
        let guard = guard(&client, &leadership, &grant);
        let term = duties(leadership.clone());
        tokio::pin!(term);
        let ended = tokio::select! {
            _ = &mut term => true,
            _ = guard => false,
            _ = cancel.cancelled() => false,
        };
        // Every duty watches `lost`: cancelled here, they stop, and the term winds up.
        leadership.lost.cancel();
        if !ended {
            term.await;
        }
        if cancel.is_cancelled() {
            resign(&client, &leadership).await;
            return;
        }
        tracing::warn!(
            epoch = leadership.epoch.number,
            "this replica is no longer the leader; campaigning again"
        );
    }
}

/// Waits until elected under `grant`.
async fn campaign(
    client: &Client,
    keys: &Keys,
    replica: &str,
    grant: &LeaseGrant,
) -> Result<Leadership, etcd_client::Error> {
    let mut response = client
        .election_client()
        .campaign(keys.election(), replica, grant.id)
        .await?;
    let cluster = response
        .header()
        .map(|h| format!("{:x}", h.cluster_id()))
        .unwrap_or_default();
    let leader = response
        .take_leader()
        .ok_or_else(|| etcd_client::Error::ElectError("campaign answered no leader key".into()))?;
    Ok(Leadership {
        epoch: Epoch {
            cluster,
            number: u64::try_from(leader.rev()).unwrap_or(0),
        },
        key: leader.key().to_vec(),
        revision: leader.rev(),
        lease: grant.id,
        lost: grant.ended.child_token(),
        leader,
    })
}

/// Returns when the term must end: the lease is near its end by this replica's clock (checked
/// again after every renewal), the leader key was deleted, or the term was lost elsewhere.
async fn guard(client: &Client, leadership: &Leadership, grant: &LeaseGrant) {
    let key_deleted = async {
        let watched = client
            .watch_client()
            .watch(leadership.key.clone(), Some(WatchOptions::new()))
            .await;
        let Ok(mut stream) = watched else {
            // Unwatchable: the lease's clock and the fenced writes still end the term.
            return std::future::pending().await;
        };
        loop {
            match stream.message().await {
                Ok(Some(answer)) => {
                    if answer
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        tracing::warn!("the leader key was deleted");
                        return;
                    }
                }
                // The watch broke: the other signals still end the term when they must.
                Ok(None) | Err(_) => return std::future::pending().await,
            }
        }
    };
    let lease_near_end = async {
        loop {
            let until = grant.safe_until();
            if tokio::time::Instant::now() >= until {
                tracing::warn!(
                    "the replica lease was not renewed in time: stopping as leader before it can end"
                );
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    };
    tokio::select! {
        _ = key_deleted => {}
        _ = lease_near_end => {}
        _ = leadership.lost.cancelled() => {}
    }
}

/// Gives the term up; etcd deletes the key only if it is still this term's, so a resignation
/// arriving late cannot remove a successor's key.
async fn resign(client: &Client, leadership: &Leadership) {
    let options = ResignOptions::new().with_leader(leadership.leader.clone());
    let mut elections = client.election_client();
    let resigned = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        elections.resign(Some(options)),
    );
    match resigned.await {
        Ok(Ok(_)) => tracing::info!(epoch = leadership.epoch.number, "resigned leadership"),
        Ok(Err(error)) => tracing::warn!(%error, "cannot resign leadership; the lease ends it"),
        Err(_) => tracing::warn!("etcd did not answer the resignation; the lease ends it"),
    }
}
