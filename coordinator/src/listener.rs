//! The coordinator's accept loop: every connection is admitted within the configured limits
//! (`connections:` in coordinator.yaml), waits for its turn to run the TLS handshake, and gets
//! `handshake_timeout` from accept to finish it, so connections that never finish one (or a
//! flood of them) cannot use up the process's file descriptors or CPU. Served connections are handed to tonic as TLS streams, whose
//! verified client certificates the services read.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kt_daemon::conn::{Admission, Admitted, OpenPermit, Refusal, refused};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::Metrics;

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
    tls: Arc<crate::server_tls::ServerTls>,
    admission: Admission,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Incoming {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let refuse = |peer, why| refused(&metrics.connections_refused, peer, why);
        loop {
            let Admitted {
                stream,
                peer,
                open,
                waiting,
            } = tokio::select! {
                _ = cancel.cancelled() => return,
                next = admission.next(&listener, refuse) => next,
            };
            metrics.connections_open.inc();
            let tcp = AdmittedTcp {
                stream,
                _permit: open,
                _open: OpenGauge(metrics.clone()),
            };
            // The certificate as it is now: a reload applies to the next connection.
            let (acceptor, tx, metrics, admission) = (
                TlsAcceptor::from(tls.current()),
                tx.clone(),
                metrics.clone(),
                admission.clone(),
            );
            tokio::spawn(async move {
                // The time counts from accept: waiting for a turn included.
                let handshake = async {
                    let _turn = waiting.turn(&admission).await;
                    acceptor.accept(tcp).await
                };
                let timeout = admission.limits.handshake_timeout;
                let result = tokio::time::timeout(timeout, handshake).await;
                drop(waiting);
                match result {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        refused(&metrics.connections_refused, peer, Refusal::HandshakeFailed);
                    }
                    Err(_) => refused(
                        &metrics.connections_refused,
                        peer,
                        Refusal::HandshakeTimeout,
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
