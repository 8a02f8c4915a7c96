//! Proxy overhead: the same open-loop load straight to the mock provider and through the
//! gateway (real release processes on loopback), interleaved request by request in one run.
//!
//! `cargo build --release --workspace && cargo bench -p kt-e2e --bench proxy_overhead`
//! Rate per path and duration: `KT_BENCH_RATE` (default 2000/s), `KT_BENCH_SECONDS` (default 10).
//! Requests are sent on a fixed schedule whatever the answers do (open loop); latency is
//! measured from the moment each request is dispatched, since tokio's timer fires up to a
//! millisecond late, and that lateness is reported separately so a stalled generator shows.

use std::sync::Arc;
use std::time::Duration;

use kt_e2e::stats::Summary;
use kt_e2e::{GatewayNode, MockProvider};
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Default)]
struct Results {
    latencies: Vec<Duration>,
    failures: usize,
    /// How late each request left compared with its schedule.
    dispatch_lag: Vec<Duration>,
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    kt_daemon::install_crypto_provider();
    let rate = env_number("KT_BENCH_RATE", 2000).max(1);
    let seconds = env_number("KT_BENCH_SECONDS", 10).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = MockProvider::start(&dir.path().join("provider"), &[]);
    let gateway = GatewayNode::start(dir.path().join("gw"), "gw-bench", provider.addr);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .expect("client");
        let direct = format!("http://{}/v1/chat/completions", provider.addr);
        let through = gateway.url("/v1/chat/completions");
        wait_until_served(&client, &through).await;
        println!("warming up for 2s");
        run_load(&client, &direct, &through, rate, 2).await;
        println!("measuring: {rate} requests/s on each path for {seconds}s, interleaved");
        let (direct_results, gateway_results) =
            run_load(&client, &direct, &through, rate, seconds).await;
        report(rate, seconds, direct_results, gateway_results);
    });
    let events = gateway.events().len();
    println!("decision events written by the gateway: {events}");
}

async fn wait_until_served(client: &reqwest::Client, url: &str) {
    for _ in 0..200 {
        if send(client, url, 0).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway never served a request (is the provider probe done?)");
}

/// One chat request; true when it answered 200 with the echoed prompt.
async fn send(client: &reqwest::Client, url: &str, n: u64) -> bool {
    let prompt = format!("benchmark request number {n}");
    let body = serde_json::json!({ "model": "mock-small", "messages": [{ "role": "user", "content": prompt }] });
    let Ok(response) = client
        .post(url)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
    else {
        return false;
    };
    if response.status() != 200 {
        return false;
    }
    let Ok(value) = response.json::<serde_json::Value>().await else {
        return false;
    };
    value
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        == Some(prompt.as_str())
}

async fn run_load(
    client: &reqwest::Client,
    direct: &str,
    through: &str,
    rate: u64,
    seconds: u64,
) -> (Results, Results) {
    let direct_results = Arc::new(Mutex::new(Results::default()));
    let gateway_results = Arc::new(Mutex::new(Results::default()));
    let total = rate * seconds * 2;
    let spacing = Duration::from_secs(1) / u32::try_from(rate * 2).unwrap_or(u32::MAX);
    let start = Instant::now() + Duration::from_millis(10);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let scheduled = start + spacing * u32::try_from(n).unwrap_or(u32::MAX);
        tokio::time::sleep_until(scheduled).await;
        let (url, results) = if n % 2 == 0 {
            (direct.to_owned(), direct_results.clone())
        } else {
            (through.to_owned(), gateway_results.clone())
        };
        let client = client.clone();
        tasks.spawn(async move {
            let dispatched = Instant::now();
            let ok = send(&client, &url, n).await;
            let latency = dispatched.elapsed();
            let mut results = results.lock().await;
            results
                .dispatch_lag
                .push(dispatched.saturating_duration_since(scheduled));
            if ok {
                results.latencies.push(latency)
            } else {
                results.failures += 1
            }
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let take = |r: Arc<Mutex<Results>>| {
        Arc::try_unwrap(r)
            .map(Mutex::into_inner)
            .unwrap_or_default()
    };
    (take(direct_results), take(gateway_results))
}

fn report(rate: u64, seconds: u64, mut direct: Results, mut gateway: Results) {
    let sent = rate * seconds;
    let d = Summary::of(&mut direct.latencies);
    let g = Summary::of(&mut gateway.latencies);
    println!(
        "direct to provider: {} ok of {sent}, {} failed; {}",
        direct.latencies.len(),
        direct.failures,
        d.map(|s| s.to_string()).unwrap_or_default()
    );
    println!(
        "through gateway:    {} ok of {sent}, {} failed; {}",
        gateway.latencies.len(),
        gateway.failures,
        g.map(|s| s.to_string()).unwrap_or_default()
    );
    let mut lag: Vec<Duration> = direct
        .dispatch_lag
        .iter()
        .chain(&gateway.dispatch_lag)
        .copied()
        .collect();
    if let Some(lag) = Summary::of(&mut lag) {
        println!(
            "generator dispatch lag behind schedule: p50 {:.0}us, p99 {:.0}us, max {:.0}us",
            lag.p50.as_secs_f64() * 1e6,
            lag.p99.as_secs_f64() * 1e6,
            lag.max.as_secs_f64() * 1e6
        );
    }
    if let (Some(d), Some(g)) = (d, g) {
        let added = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1e6;
        println!(
            "added by the gateway: p50 {:.1}us, p90 {:.1}us, p99 {:.1}us",
            added(g.p50, d.p50),
            added(g.p90, d.p90),
            added(g.p99, d.p99)
        );
        let met = added(g.p50, d.p50) < 300.0 && gateway.failures == 0;
        println!(
            "target: added p50 < 300us and no lost requests at {rate}/s -> {}",
            if met { "met" } else { "MISSED" }
        );
    }
}
