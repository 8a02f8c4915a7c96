//! This replica's etcd lease: its leadership campaign and its fleet records live under it, so
//! that both vanish when the replica dies. Kept alive in the background; when it ends (etcd said
//! so, or renewals failed past its time to live) a fresh one is granted and announced.
//!
//! The replica's own clock decides how long the lease is surely valid: the time a renewal was
//! *sent*, plus the TTL etcd granted in its answer. etcd cannot expire the lease before that, so
//! a leader that stops acting some margin before it cannot overlap a successor.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One granted lease.
#[derive(Clone, Debug)]
pub struct LeaseGrant {
    pub id: i64,
    /// Cancelled when this lease is over (expired, revoked, or given up as lost).
    pub ended: CancellationToken,
    valid_until: Arc<Mutex<Instant>>,
    margin: Duration,
}

impl LeaseGrant {
    /// Until when etcd surely keeps the lease, by this replica's clock.
    pub fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Until when a leader under this lease may act: the margin before `valid_until`.
    pub fn safe_until(&self) -> Instant {
        self.valid_until()
            .checked_sub(self.margin)
            .unwrap_or_else(Instant::now)
    }

    fn renewed(&self, sent: Instant, ttl: Duration) {
        let mut until = self.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        *until = (*until).max(sent + ttl);
    }
}

/// Grants, renews and replaces this replica's lease until `cancel`, announcing each grant on
/// `grants` (None while there is none); revokes it on the way out so a graceful stop hands
/// leadership and fleet records over at once.
pub async fn keep(
    client: Client,
    ttl: Duration,
    timeout: Duration,
    grants: watch::Sender<Option<LeaseGrant>>,
    cancel: CancellationToken,
) {
    let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(10);
    let mut leases = client.lease_client();
    let mut failures = 0u32;
    // A lease given up while etcd was unreachable may still live there (etcd extends leases when
    // it restarts): revoked once etcd answers again, so its election key and fleet records go
    // at once instead of a TTL later.
    let mut given_up: Option<i64> = None;
    while !cancel.is_cancelled() {
        let sent = Instant::now();
        let id = match tokio::time::timeout(timeout, leases.grant(ttl_secs, None)).await {
            Ok(Ok(response)) => response.id(),
            Ok(Err(error)) => {
                failures += 1;
                log_failure(failures, &format!("cannot grant a lease: {error}"));
                pause(failures, &cancel).await;
                continue;
            }
            Err(_) => {
                failures += 1;
                log_failure(
                    failures,
                    "cannot grant a lease: etcd did not answer in time",
                );
                pause(failures, &cancel).await;
                continue;
            }
        };
        failures = 0;
        if let Some(old) = given_up.take()
            && let Ok(Ok(_)) = tokio::time::timeout(timeout, leases.revoke(old)).await
        {
            tracing::info!(
                lease = format!("{old:x}"),
                "revoked the lease given up earlier"
            );
        }
        let grant = LeaseGrant {
            id,
            ended: CancellationToken::new(),
            valid_until: Arc::new(Mutex::new(sent + ttl)),
            margin: margin(ttl),
        };
        tracing::info!(lease = format!("{id:x}"), "replica lease granted");
        grants.send_replace(Some(grant.clone()));
        renew(&client, &grant, ttl, timeout, &cancel).await;
        grant.ended.cancel();
        grants.send_replace(None);
        if cancel.is_cancelled() {
            let _ = tokio::time::timeout(timeout, leases.revoke(id)).await;
            return;
        }
        given_up = Some(id);
        tracing::warn!(
            lease = format!("{id:x}"),
            "replica lease lost: its leadership and fleet records are gone; taking a new one"
        );
    }
}

/// How long before the lease's end a leader stops acting: a fifth of the TTL, at least 1 s.
fn margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_secs(1))
}

/// Renews `grant` every third of its TTL until it ends or `cancel` fires.
async fn renew(
    client: &Client,
    grant: &LeaseGrant,
    ttl: Duration,
    timeout: Duration,
    cancel: &CancellationToken,
) {
    let every = ttl / 3;
    let mut leases = client.lease_client();
    let mut stream = None;
    loop {
        if Instant::now() >= grant.valid_until() {
            return; // renewals failed for a whole TTL: etcd has surely let it go
        }
        if stream.is_none() {
            match tokio::time::timeout(timeout, leases.keep_alive(grant.id)).await {
                Ok(Ok(opened)) => stream = Some(opened),
                Ok(Err(error)) => tracing::debug!(%error, "cannot open lease renewals"),
                Err(_) => tracing::debug!("lease renewals: etcd did not answer in time"),
            }
        }
        if let Some((keeper, answers)) = &mut stream {
            let sent = Instant::now();
            let answered = tokio::time::timeout(timeout, async {
                keeper.keep_alive().await?;
                answers.message().await
            });
            match answered.await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                    let granted = Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                    grant.renewed(sent, granted);
                }
                Ok(Ok(Some(_))) => return, // TTL 0: etcd says the lease is gone
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    tracing::debug!("lease renewal failed; retrying");
                    stream = None;
                }
            }
        }
        let wait = if stream.is_some() {
            every
        } else {
            Duration::from_millis(300)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn log_failure(failures: u32, what: &str) {
    if failures == 1 || failures.is_power_of_two() {
        tracing::warn!(failures, "{what}");
    }
}

async fn pause(failures: u32, cancel: &CancellationToken) {
    let wait = Duration::from_millis(200 * u64::from(failures.min(10)));
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_stops_a_margin_before_its_lease_can_end() {
        assert_eq!(margin(Duration::from_secs(10)), Duration::from_secs(2));
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_secs(1));
        let now = Instant::now();
        let grant = LeaseGrant {
            id: 1,
            ended: CancellationToken::new(),
            valid_until: Arc::new(Mutex::new(now + Duration::from_secs(10))),
            margin: margin(Duration::from_secs(10)),
        };
        assert_eq!(grant.safe_until(), now + Duration::from_secs(8));
        // A renewal answered late never moves the end back.
        grant.renewed(now, Duration::from_secs(5));
        assert_eq!(grant.valid_until(), now + Duration::from_secs(10));
        grant.renewed(now + Duration::from_secs(3), Duration::from_secs(10));
        assert_eq!(grant.valid_until(), now + Duration::from_secs(13));
    }
}
