//! Admission of connections before they cost anything: a cap on open connections, and on
//! connections still in their handshake (in all and per peer address), so silent or slow peers
//! cannot use up every file descriptor. Connections already established are never closed to
//! make room, so agents already connected and operators keep working.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits on incoming connections, as the daemons' config files write them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Open connections at most (established or in handshake); more are closed at once.
    pub max_connections: usize,
    /// Connections in their handshake (TLS, or the first request's headers) at most.
    pub max_handshakes: usize,
    /// Of those, from one peer address at most.
    pub max_handshakes_per_ip: usize,
    /// A handshake not finished in this time is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 50_000,
            // Room for a fleet reconnecting from behind one NAT address, while a single source
            // of silent connections holds at most a few hundred descriptors for 10 s each.
            max_handshakes: 2_048,
            max_handshakes_per_ip: 256,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection was closed before it was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyHandshakes,
    TooManyHandshakesFromPeer,
    HandshakeTimeout,
    HandshakeFailed,
    /// Open, but silent for too long.
    IdleTimeout,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "max_connections",
            Refusal::TooManyHandshakes => "max_handshakes",
            Refusal::TooManyHandshakesFromPeer => "max_handshakes_per_ip",
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
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Held while the connection is open.
#[derive(Debug)]
pub struct OpenPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// Held while the connection is in its handshake.
#[derive(Debug)]
pub struct HandshakePermit {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
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
    if why == Refusal::HandshakeFailed {
        tracing::debug!(%peer, reason, "connection closed before it was served");
    } else {
        tracing::warn!(%peer, reason, "connection closed before it was served");
    }
}

/// A connection admitted, with its permits.
#[derive(Debug)]
pub struct Admitted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub open: OpenPermit,
    pub handshake: HandshakePermit,
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
                Ok((open, handshake)) => {
                    return Admitted {
                        stream,
                        peer,
                        open,
                        handshake,
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
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            per_ip: Arc::default(),
            limits,
        }
    }

    /// Permits for a new connection from `peer`, or why it must be closed.
    pub fn admit(&self, peer: IpAddr) -> Result<(OpenPermit, HandshakePermit), Refusal> {
        let open = self
            .open
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::TooManyConnections)?;
        let handshake = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::TooManyHandshakes)?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(peer).or_insert(0);
        if *n >= self.limits.max_handshakes_per_ip {
            return Err(Refusal::TooManyHandshakesFromPeer);
        }
        *n += 1;
        Ok((
            OpenPermit(open),
            HandshakePermit {
                _permit: handshake,
                ip: peer,
                per_ip: self.per_ip.clone(),
            },
        ))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.open.available_permits()
    }
}

/// Raises the soft limit of open files to the hard limit; returns the soft limit now.
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

    fn limits(max_connections: usize, handshakes: usize, per_ip: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            max_handshakes: handshakes,
            max_handshakes_per_ip: per_ip,
            handshake_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn admission_caps_handshakes_per_peer_and_open_connections() {
        let a = Admission::new(limits(4, 3, 2));
        let one: IpAddr = "127.0.0.2".parse().expect("ip");
        let two: IpAddr = "127.0.0.3".parse().expect("ip");
        let first = a.admit(one).expect("first");
        let _second = a.admit(one).expect("second");
        assert_eq!(a.admit(one).err(), Some(Refusal::TooManyHandshakesFromPeer));
        let third = a.admit(two).expect("another peer");
        assert_eq!(a.admit(two).err(), Some(Refusal::TooManyHandshakes));
        // A finished handshake frees its handshake slot, not its connection slot.
        let (open_one, handshake) = first;
        drop(handshake);
        let _fourth = a.admit(one).expect("room again");
        assert_eq!(a.open(), 4);
        assert_eq!(a.admit(two).err(), Some(Refusal::TooManyConnections));
        drop((open_one, third));
        assert_eq!(a.open(), 2);
    }
}
