//! A TCP proxy on loopback whose connections can be cut on demand: the network failing between
//! an agent and its coordinator, with both processes alive.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct CutProxy {
    pub addr: SocketAddr,
    /// Cancelled to cut every open connection; replaced by a fresh one for the next ones.
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    /// While set, new connections are closed at once: the network is down.
    blocked: Arc<std::sync::atomic::AtomicBool>,
}

impl CutProxy {
    /// Forwards connections to `target` until dropped. Needs a tokio runtime.
    pub fn start(target: SocketAddr) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let listener = TcpListener::from_std(std_listener).expect("tokio listener");
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (gen_for_task, stop_for_task, blocked_for_task) =
            (generation.clone(), stop.clone(), blocked.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop_for_task.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if blocked_for_task.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = gen_for_task
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let stop = stop_for_task.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        CutProxy {
            addr,
            generation,
            stop,
            blocked,
        }
    }

    /// Cuts every connection and refuses new ones until `unblock`.
    pub fn block(&self) {
        self.blocked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
    }

    /// Refuses new connections until `unblock`, leaving open ones alone: a network path that
    /// breaks for new flows only (a firewall reload, a load balancer draining).
    pub fn refuse_new(&self) {
        self.blocked
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn unblock(&self) {
        self.blocked
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every connection open now; new ones go through.
    pub fn cut(&self) {
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        generation.cancel();
        *generation = CancellationToken::new();
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
