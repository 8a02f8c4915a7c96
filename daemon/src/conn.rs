//! Admission of connections before they cost anything, so silent or slow peers cannot use up
//! every file descriptor or the CPU for handshakes: a cap on open connections, a cap on the
//! connections one peer address has waiting for (or in) their handshake, and turns for the
//! handshakes themselves (in all and per address). A connection waits for its turn rather than
//! being refused, so a fleet reconnecting at once from behind one address is served in order;
//! its time counts from accept. Connections already established are never closed to make room,
//! so agents already connected and operators keep working.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits on incoming connections, as the daemons' config files write them.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Open connections at most (established or not); more are closed at once.
    pub max_connections: usize,
    /// Connections from one peer address not yet served (waiting for their handshake, in it, or
    /// for the first request) at most; more are closed at once.
    pub max_waiting_per_ip: usize,
    /// TLS handshakes running at once; the others wait their turn.
    pub max_handshakes: usize,
    /// Of those, from one peer address.
    pub max_handshakes_per_ip: usize,
    /// A connection not served this long after it was accepted (waiting included) is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 50_000,
            // A fleet reconnecting from behind one NAT address fits; a single source of silent
            // connections holds at most this many descriptors, for 10 s each.
            max_waiting_per_ip: 4_096,
            max_handshakes: 512,
            max_handshakes_per_ip: 256,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection was closed before it was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyWaitingFromPeer,
    HandshakeTimeout,
    HandshakeFailed,
    /// Open, but silent for too long.
    IdleTimeout,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "max_connections",
            Refusal::TooManyWaitingFromPeer => "max_waiting_per_ip",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::IdleTimeout => "idle_timeout",
        }
    }
}

/// Hands out permits for connections within [`ConnectionLimits`].
#[derive(Clone, Debug)]
pub struct Admission {
    pub limits: ConnectionLimits,
    open: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    peers: Arc<Mutex<HashMap<IpAddr, Peer>>>,
}

/// What one peer address has not been served yet.
#[derive(Debug)]
struct Peer {
    waiting: usize,
    handshakes: Arc<Semaphore>,
}

/// Held while the connection is open.
#[derive(Debug)]
pub struct OpenPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// Held until the connection is served (its handshake done, or its first request read).
#[derive(Debug)]
pub struct Waiting {
    ip: IpAddr,
    peers: Arc<Mutex<HashMap<IpAddr, Peer>>>,
    /// The peer address's handshake turns.
    turns: Arc<Semaphore>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(peer) = peers.get_mut(&self.ip) {
            peer.waiting -= 1;
            if peer.waiting == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

/// A turn to run a handshake: one of all, and one of the peer address's.
#[derive(Debug)]
pub struct HandshakeTurn {
    _all: OwnedSemaphorePermit,
    _peer: OwnedSemaphorePermit,
}

impl Waiting {
    /// Waits for a turn to run the handshake: the peer address's own first, so that one address
    /// waiting does not hold turns others could use.
    pub async fn turn(&self, admission: &Admission) -> HandshakeTurn {
        // The semaphores are never closed, so acquiring cannot fail.
        let own = self.turns.clone().acquire_owned().await;
        let all = admission.handshakes.clone().acquire_owned().await;
        HandshakeTurn {
            _all: all.expect("handshake turns are never closed"),
            _peer: own.expect("handshake turns are never closed"),
        }
    }
}

/// The label of `connections_refused` counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Counts a connection closed before or instead of being served, and logs it (repeats are
/// summed up, see [`crate::repeats`]); a failed TLS handshake is the peer's problem and logged at
/// debug only.
pub fn refused(
    counter: &prometheus_client::metrics::family::Family<
        ReasonLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    peer: SocketAddr,
    why: Refusal,
) {
    let reason = why.label();
    counter.get_or_create(&ReasonLabels { reason }).inc();
    // One log call site per reason: a burst of one (rate limited per call site) does not hide
    // the first line of another.
    match why {
        Refusal::TooManyConnections => {
            tracing::warn!(%peer, reason, "connection closed before it was served")
        }
        Refusal::TooManyWaitingFromPeer => {
            tracing::warn!(%peer, reason, "connection closed before it was served")
        }
        Refusal::HandshakeTimeout => {
            tracing::warn!(%peer, reason, "connection closed before it was served")
        }
        Refusal::IdleTimeout => {
            tracing::warn!(%peer, reason, "connection closed before it was served")
        }
        Refusal::HandshakeFailed => {
            tracing::debug!(%peer, reason, "connection closed before it was served")
        }
    }
}

/// A connection admitted, with its permits.
#[derive(Debug)]
pub struct Admitted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub open: OpenPermit,
    pub waiting: Waiting,
}

impl Admission {
    /// The next connection these limits let in. Refused ones are closed at once and given to
    /// `refused`; accept errors (out of file descriptors, most likely) are logged and waited
    /// out instead of spinning.
    pub async fn next(
        &self,
        listener: &TcpListener,
        refused: impl Fn(SocketAddr, Refusal),
    ) -> Admitted {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::error!(%error, "cannot accept connections");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.admit(peer.ip()) {
                Ok((open, waiting)) => {
                    return Admitted {
                        stream,
                        peer,
                        open,
                        waiting,
                    };
                }
                Err(why) => refused(peer, why),
            }
        }
    }

    /// `max_connections` is lowered to what the process's file descriptor limit allows.
    pub fn new(mut limits: ConnectionLimits) -> Self {
        let fds = raise_fd_limit();
        // Room for the process's own files, listeners, and outbound connections.
        let room = usize::try_from(fds.saturating_sub(256))
            .unwrap_or(usize::MAX)
            .max(16);
        if limits.max_connections > room {
            tracing::warn!(
                configured = limits.max_connections,
                allowed = room,
                fd_limit = fds,
                "max_connections lowered to what the file descriptor limit allows (raise LimitNOFILE)"
            );
            limits.max_connections = room;
        }
        Admission {
            open: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes.max(1))),
            peers: Arc::default(),
            limits,
        }
    }

    /// Permits for a new connection from `peer`, or why it must be closed.
    pub fn admit(&self, peer: IpAddr) -> Result<(OpenPermit, Waiting), Refusal> {
        let open = self
            .open
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::TooManyConnections)?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let entry = peers.entry(peer).or_insert_with(|| Peer {
            waiting: 0,
            handshakes: Arc::new(Semaphore::new(self.limits.max_handshakes_per_ip.max(1))),
        });
        if entry.waiting >= self.limits.max_waiting_per_ip {
            return Err(Refusal::TooManyWaitingFromPeer);
        }
        entry.waiting += 1;
        Ok((
            OpenPermit(open),
            Waiting {
                ip: peer,
                peers: self.peers.clone(),
                turns: entry.handshakes.clone(),
            },
        ))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.open.available_permits()
    }
}

/// Raises the soft limit of open files to the hard limit; returns the soft limit now (so a
/// caller can say when it is below what it needs).
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(
        max_connections: usize,
        waiting_per_ip: usize,
        turns: usize,
        turns_per_ip: usize,
    ) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            max_waiting_per_ip: waiting_per_ip,
            max_handshakes: turns,
            max_handshakes_per_ip: turns_per_ip,
            handshake_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn admission_caps_open_connections_and_what_one_peer_has_waiting() {
        let a = Admission::new(limits(4, 2, 8, 8));
        let one: IpAddr = "127.0.0.2".parse().expect("ip");
        let two: IpAddr = "127.0.0.3".parse().expect("ip");
        let first = a.admit(one).expect("first");
        let _second = a.admit(one).expect("second");
        assert_eq!(a.admit(one).err(), Some(Refusal::TooManyWaitingFromPeer));
        let third = a.admit(two).expect("another peer");
        // A connection served frees its waiting place, not its connection slot.
        let (open_one, waiting) = first;
        drop(waiting);
        let _fourth = a.admit(one).expect("room again");
        assert_eq!(a.open(), 4);
        assert_eq!(a.admit(two).err(), Some(Refusal::TooManyConnections));
        drop((open_one, third));
        assert_eq!(a.open(), 2);
    }

    #[tokio::test]
    async fn handshakes_take_turns_per_peer_and_in_all() {
        use std::future::Future;
        let a = Admission::new(limits(100, 100, 3, 2));
        let one: IpAddr = "127.0.0.2".parse().expect("ip");
        let two: IpAddr = "127.0.0.3".parse().expect("ip");
        let (_o1, w1) = a.admit(one).expect("admit");
        let (_o2, w2) = a.admit(one).expect("admit");
        let (_o3, w3) = a.admit(one).expect("admit");
        let (_o4, w4) = a.admit(two).expect("admit");
        let (_o5, w5) = a.admit(two).expect("admit");
        let t1 = w1.turn(&a).await;
        let _t2 = w2.turn(&a).await;
        // Polls once: the turn if it is there now.
        let ready = |f: std::pin::Pin<&mut dyn Future<Output = HandshakeTurn>>| match f
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            std::task::Poll::Ready(turn) => Some(turn),
            std::task::Poll::Pending => None,
        };
        // The peer's own two turns are taken: its third waits, another peer's does not.
        let mut third = std::pin::pin!(w3.turn(&a));
        assert!(ready(third.as_mut()).is_none());
        let _t4 = w4.turn(&a).await;
        // All three turns are taken now: the other peer's second waits too.
        let mut fifth = std::pin::pin!(w5.turn(&a));
        assert!(ready(fifth.as_mut()).is_none());
        // A finished handshake hands its turn on, first come first served.
        drop(t1);
        let _t5 = ready(fifth.as_mut()).expect("the first in line");
        assert!(ready(third.as_mut()).is_none());
    }
}
