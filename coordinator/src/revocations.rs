//! Revoked agent identities (`ktctl agent revoke`). A revoked gateway's sessions and event
//! streams close at once, and its renewals, new sessions and enrollments are refused, whatever
//! certificate or token it shows, until an operator reinstates it.
//!
//! The store is the record; [`Revocations`] is every replica's copy, which sessions watch. The
//! replica that revokes updates its copy at once; the others read the store every
//! [`FOLLOW_EVERY`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kt_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// How often a replica re-reads the revocations another replica may have written: well within
/// the second in which a revoked agent must be cut off.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(300);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRevocation {
    pub gateway_id: String,
    pub at_unix_ms: u64,
    pub by: String,
    pub reason: String,
}

impl AgentRevocation {
    pub fn to_proto(&self) -> v1::AgentRevocation {
        v1::AgentRevocation {
            gateway_id: self.gateway_id.clone(),
            revoked_unix_ms: self.at_unix_ms,
            revoked_by: self.by.clone(),
            reason: self.reason.clone(),
        }
    }

    /// What a refused agent is told.
    pub fn refusal(&self) -> String {
        format!(
            "gateway {} is revoked (by {}: {}); an operator must reinstate it (`ktctl agent reinstate {}`) before it can connect or enroll again",
            self.gateway_id,
            self.by,
            if self.reason.is_empty() {
                "no reason given"
            } else {
                &self.reason
            },
            self.gateway_id
        )
    }
}

type ById = Arc<BTreeMap<String, AgentRevocation>>;

/// This replica's copy of the revocations.
#[derive(Clone, Debug)]
pub struct Revocations {
    current: Arc<watch::Sender<ById>>,
}

impl Revocations {
    pub fn new(all: Vec<AgentRevocation>) -> Self {
        Revocations {
            current: Arc::new(watch::Sender::new(by_id(all))),
        }
    }

    /// Reads them from `store`.
    pub async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        Ok(Revocations::new(store.list_revocations().await?))
    }

    pub fn get(&self, gateway: &str) -> Option<AgentRevocation> {
        self.current.borrow().get(gateway).cloned()
    }

    pub fn all(&self) -> Vec<AgentRevocation> {
        self.current.borrow().values().cloned().collect()
    }

    /// Reads the store again; sessions of newly revoked gateways close.
    pub async fn refresh(&self, store: &dyn Store) -> Result<(), StoreError> {
        let all = by_id(store.list_revocations().await?);
        self.current.send_if_modified(|current| {
            let changed = **current != *all;
            if changed {
                *current = all;
            }
            changed
        });
        Ok(())
    }

    /// Resolves when `gateway` is revoked (at once if it already is), with its revocation.
    pub async fn revoked(&self, gateway: &str) -> AgentRevocation {
        let mut changes = self.current.subscribe();
        loop {
            if let Some(found) = changes.borrow_and_update().get(gateway) {
                return found.clone();
            }
            if changes.changed().await.is_err() {
                // The sender lives as long as the coordinator: never revoked by its end.
                std::future::pending::<()>().await;
            }
        }
    }
}

fn by_id(all: Vec<AgentRevocation>) -> ById {
    Arc::new(all.into_iter().map(|r| (r.gateway_id.clone(), r)).collect())
}

/// Keeps `revocations` as the store says, for replicas that share a store (etcd), until `cancel`.
pub async fn follow(revocations: Revocations, store: Arc<dyn Store>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(FOLLOW_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        match revocations.refresh(store.as_ref()).await {
            Ok(()) => failing = false,
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "cannot read agent revocations; the last ones read stay in force");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(gateway: &str) -> AgentRevocation {
        AgentRevocation {
            gateway_id: gateway.into(),
            at_unix_ms: 1,
            by: "spiffe://td/operator/alice".into(),
            reason: "host decommissioned".into(),
        }
    }

    #[tokio::test]
    async fn a_session_waiting_on_its_gateway_learns_of_its_revocation() {
        let revocations = Revocations::new(vec![revocation("gw-other")]);
        let waiting = tokio::spawn({
            let revocations = revocations.clone();
            async move { revocations.revoked("gw-a").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        revocations.current.send_modify(|all| {
            let mut next = (**all).clone();
            next.insert("gw-a".into(), revocation("gw-a"));
            *all = Arc::new(next);
        });
        let found = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("resolved")
            .expect("task");
        assert_eq!(found.gateway_id, "gw-a");
        assert!(found.refusal().contains("host decommissioned"));
        assert_eq!(revocations.revoked("gw-other").await.gateway_id, "gw-other");
    }
}
