//! The gateway's accept loop: connections are admitted within limits, a connection must send
//! its first request's headers within `handshake_timeout`, and one silent for `idle_timeout`
//! is closed, so silent or slow clients cannot use up the gateway's file descriptors. Refused
//! and timed-out connections are counted (`kt_gateway_connections_refused_total`) and logged.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use kt_daemon::conn::{Admission, Admitted, ConnectionLimits, Refusal, Waiting, refused};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::Metrics;

/// How the gateway bounds its client connections.
#[derive(Clone, Debug)]
pub struct Limits {
    pub connections: ConnectionLimits,
    /// A connection with no bytes in or out for this long is closed; longer than any
    /// provider's request timeout, so a request waiting on its provider is not cut.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: ConnectionLimits {
                max_connections: 10_000,
                ..ConnectionLimits::default()
            },
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Serves `router` on `listener` until `cancel` fires, then lets open requests finish.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let admission = Admission::new(limits.connections.clone());
    let connections = TaskTracker::new();
    let refuse = |peer, why| refused(&metrics.connections_refused, peer, why);
    loop {
        let Admitted {
            stream,
            peer,
            open,
            waiting,
        } = tokio::select! {
            _ = cancel.cancelled() => break,
            next = admission.next(&listener, refuse) => next,
        };
        let _ = stream.set_nodelay(true);
        let watched = Watched::new(stream, waiting);
        let activity = watched.activity.clone();
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
        let (cancel, metrics, limits) = (cancel.clone(), metrics.clone(), limits.clone());
        connections.spawn(async move {
            let _open = open;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.connections.handshake_timeout)
                .serve_connection(TokioIo::new(watched), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = &mut connection => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                }
                why = activity.expired(&limits) => refused(&metrics.connections_refused, peer, why),
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// When the connection last moved a byte, and whether it ever sent one.
#[derive(Debug)]
struct Activity {
    started: Instant,
    /// Milliseconds after `started` of the last read or write.
    last_ms: AtomicU64,
    first_byte: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves when the connection sent nothing within the handshake timeout, or moved
    /// nothing for the idle timeout.
    async fn expired(&self, limits: &Limits) -> Refusal {
        loop {
            let (limit, why) = if self.first_byte.load(Ordering::Relaxed) {
                (limits.idle_timeout, Refusal::IdleTimeout)
            } else {
                (
                    limits.connections.handshake_timeout,
                    Refusal::HandshakeTimeout,
                )
            };
            let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if Instant::now() >= last + limit {
                return why;
            }
            tokio::time::sleep_until(last + limit).await;
        }
    }
}

/// A TCP stream that records its activity and gives back its waiting place at the first byte.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    waiting: Option<Waiting>,
}

impl Watched {
    fn new(stream: TcpStream, waiting: Waiting) -> Self {
        Watched {
            stream,
            activity: Arc::new(Activity {
                started: Instant::now(),
                last_ms: AtomicU64::new(0),
                first_byte: false.into(),
            }),
            waiting: Some(waiting),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
            if self.waiting.take().is_some() {
                self.activity.first_byte.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
