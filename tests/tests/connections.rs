//! Connections that never finish a handshake, or a flood of them, are bounded: they are closed
//! after a timeout, refused past a per-peer cap, counted and logged, and operators and clients
//! from elsewhere keep being served.

use std::net::SocketAddr;
use std::time::Duration;

use kt_e2e::{GatewayNode, MockProvider, TestFleet, all_healthy};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// More than the per-peer handshake cap (256).
/// Silent connections a test opens from one address: more than it lets wait.
const SILENT: usize = 150;
/// The per-address waiting cap and handshake timeout the tests configure.
const WAITING: usize = 100;
const PATIENCE: Duration = Duration::from_secs(60);

/// Opens `n` TCP connections to `target` from 127.0.0.2 that never send a byte.
async fn silent_connections(target: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for _ in 0..n {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind");
        if let Ok(stream) = socket.connect(target).await {
            open.push(stream);
        }
    }
    open
}

/// How many of the connections the server has closed (a read returns EOF or an error).
async fn closed_by_server(streams: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for stream in streams.iter_mut() {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(5), stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    closed
}

async fn wait_all_closed(streams: &mut [TcpStream], what: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut closed = 0;
    while tokio::time::Instant::now() < deadline {
        closed = closed_by_server(streams).await;
        if closed == streams.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{what}: only {closed} of {} silent connections were closed",
        streams.len()
    );
}

#[tokio::test]
async fn the_coordinator_bounds_silent_connections_and_keeps_serving_operators() {
    let mut fleet = TestFleet::start(1);
    fleet.coordinator.stop();
    fleet.coordinator.connections = Some(kt_daemon::conn::ConnectionLimits {
        max_waiting_per_ip: WAITING,
        handshake_timeout: Duration::from_secs(3),
        ..Default::default()
    });
    fleet.coordinator.start_again();
    fleet
        .wait_for_health("the fleet is healthy", PATIENCE, all_healthy(1))
        .await;
    let mut silent = silent_connections(fleet.coordinator.addr, SILENT).await;
    assert_eq!(silent.len(), SILENT, "the kernel accepted every connection");
    // Past what one address may have waiting, the coordinator closes them at once.
    let refused_at_once = tokio::time::timeout(PATIENCE, async {
        loop {
            if closed_by_server(&mut silent).await >= SILENT - WAITING {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .is_ok();
    assert!(
        refused_at_once,
        "connections past the per-address cap stayed open"
    );
    // An operator from another address is served meanwhile, and so is the agent.
    let (code, rows) = fleet.health();
    assert_eq!(code, 0, "{rows:?}");
    // The rest time out in their handshake and are closed too (before: never).
    wait_all_closed(&mut silent, "coordinator").await;
    let log = fleet.coordinator.proc.as_ref().expect("running").log_text();
    for reason in ["max_waiting_per_ip", "handshake_timeout"] {
        assert!(log.contains(reason), "{reason} not logged:\n{log}");
    }
}

#[tokio::test]
async fn the_gateway_bounds_silent_connections_and_keeps_serving_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = MockProvider::start(&dir.path().join("provider"), &[]);
    let mut gateway = GatewayNode::start(dir.path().join("gw"), "gw-conn", provider.addr);
    gateway.stop();
    gateway.extra_args = [
        "--max-waiting-per-ip",
        &WAITING.to_string(),
        "--header-timeout",
        "3s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    gateway.start_again();
    let mut silent = silent_connections(gateway.addr, SILENT).await;
    assert_eq!(silent.len(), SILENT);
    // A client from another address is served meanwhile.
    let client = reqwest::Client::new();
    let health = client
        .get(gateway.url("/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the gateway answers");
    assert!(health.status().is_success());
    // Past the cap at once, the others after the header timeout: all closed.
    wait_all_closed(&mut silent, "gateway").await;
    let metrics = kt_e2e::get_text(&gateway.url("/metrics")).await;
    for reason in ["max_waiting_per_ip", "handshake_timeout"] {
        assert!(
            metrics.contains(&format!(
                "kt_gateway_connections_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{metrics}"
        );
    }
}
