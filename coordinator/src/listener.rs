//! The coordinator's accept loop: every connection is admitted within the configured limits
//! (`connections:` in coordinator.yaml) and gets `handshake_timeout` to finish its TLS
//! handshake, so connections that never finish one (or a flood of them) cannot use up the
//! process's file descriptors. Served connections are handed to tonic as TLS streams, whose
//! verified client certificates the services read.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kt_proto::conn::{Admission, OpenPermit, Refusal};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::{Metrics, ReasonLabels};

/// A TCP connection admitted by [`Admission`]; its permit is returned when it closes.
#[derive(Debug)]
pub struct AdmittedTcp {
    stream: TcpStream,
    _permit: OpenPermit,
    _open: OpenGauge,
}

/// Keeps the open-connections gauge right whichever way a connection ends.
#[derive(Debug)]
struct OpenGauge(Arc<Metrics>);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

impl Connected for AdmittedTcp {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.stream.local_addr().ok(),
            remote_addr: self.stream.peer_addr().ok(),
        }
    }
}

impl AsyncRead for AdmittedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdmittedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

pub type Incoming = ReceiverStream<std::io::Result<TlsStream<AdmittedTcp>>>;

/// Accepts on `listener` until `cancel` fires; yields connections whose handshake finished.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    admission: Admission,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Incoming {
    let (tx, rx) = mpsc::channel(256);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, most likely: wait instead of spinning.
                        tracing::error!(%error, "cannot accept connections");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (open, handshake) = match admission.admit(peer.ip()) {
                Ok(permits) => permits,
                Err(why) => {
                    refused(&metrics, peer, why);
                    continue; // dropping the stream closes it
                }
            };
            metrics.connections_open.inc();
            let tcp = AdmittedTcp {
                stream,
                _permit: open,
                _open: OpenGauge(metrics.clone()),
            };
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            let timeout = admission.limits.handshake_timeout;
            tokio::spawn(async move {
                let result = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
                drop(handshake);
                match result {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        refused(&metrics, peer, Refusal::HandshakeFailed);
                    }
                    Err(_) => refused(&metrics, peer, Refusal::HandshakeTimeout),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Counts a connection closed before it was served, and logs it (repeats are summed up, see
/// `kt_proto::repeats`).
fn refused(metrics: &Metrics, peer: SocketAddr, why: Refusal) {
    let reason = why.label();
    metrics
        .connections_refused
        .get_or_create(&ReasonLabels { reason })
        .inc();
    if why == Refusal::HandshakeFailed {
        // A wrong certificate is the peer's problem.
        tracing::debug!(%peer, reason, "connection closed before it was served");
    } else {
        tracing::warn!(%peer, reason, "connection closed before it was served");
    }
}
