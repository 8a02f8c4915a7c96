//! Proxy overhead: the same open-loop load straight to the mock provider, through a gateway,
//! and through a gateway with a shadow config loaded (real release processes on loopback),
//! interleaved request by request in one run; beside it, the shadow chain's own cost measured
//! in process on the same request.
//!
//! `cargo build --release --workspace && cargo bench -p kt-e2e --bench proxy_overhead`
//! Rate per path and duration: `KT_BENCH_RATE` (default 2000/s), `KT_BENCH_SECONDS` (default 10).
//! `KT_BENCH_NO_SHADOW=1` leaves the third gateway without its shadow: an A/A run, which shows
//! how far two identical gateways differ by noise alone.
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

/// The example policy with one phrase more: the shadow the third path evaluates.
fn shadow_of(policy: &str) -> String {
    policy.replace("version: 1.0.0", "version: 1.1.0").replace(
        "      - ignore all previous instructions\n",
        "      - ignore all previous instructions\n      - the weather\n",
    )
}

/// The paths' names; the third is the shadowed gateway, or its twin in an A/A run.
fn paths(control: bool) -> [&'static str; 3] {
    let third = if control {
        "twin gateway (A/A)"
    } else {
        "gateway + shadow"
    };
    ["direct to provider", "through gateway", third]
}

fn main() {
    kt_daemon::install_crypto_provider();
    let rate = env_number("KT_BENCH_RATE", 2000).max(1);
    let seconds = env_number("KT_BENCH_SECONDS", 10).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = MockProvider::start(&dir.path().join("provider"), &[]);
    let gateway = GatewayNode::start(dir.path().join("gw"), "gw-bench", provider.addr);
    let policy = std::fs::read_to_string(&gateway.policy).expect("policy");
    let shadow_dir = dir.path().join("gw-shadow");
    std::fs::create_dir_all(&shadow_dir).expect("dir");
    let shadow_text = shadow_of(&policy);
    assert_ne!(
        shadow_text, policy,
        "the shadow differs from the active config"
    );
    let control = std::env::var("KT_BENCH_NO_SHADOW").is_ok_and(|v| v == "1");
    if !control {
        std::fs::write(
            kt_launch::configs::shadow_config_path(&shadow_dir.join("policy-config.yaml")),
            &shadow_text,
        )
        .expect("shadow");
    }
    let shadowed = GatewayNode::start_with_policy(shadow_dir, "gw-bench-shadow", &policy);
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
        let urls = [
            format!("http://{}/v1/chat/completions", provider.addr),
            gateway.url("/v1/chat/completions"),
            shadowed.url("/v1/chat/completions"),
        ];
        wait_until_served(&client, &urls[1]).await;
        wait_until_served(&client, &urls[2]).await;
        let health: serde_json::Value = client
            .get(shadowed.url("/health"))
            .send()
            .await
            .expect("health")
            .json()
            .await
            .expect("health JSON");
        let loaded = health["shadow"]["hash"]
            .as_str()
            .is_some_and(|h| !h.is_empty());
        assert_eq!(loaded, !control, "the third gateway's shadow: {health}");
        if control {
            println!("A/A control: the third gateway runs without a shadow");
        }
        println!("warming up for 2s");
        run_load(&client, &urls, rate, 2).await;
        println!("measuring: {rate} requests/s on each of 3 paths for {seconds}s, interleaved");
        let results = run_load(&client, &urls, rate, seconds).await;
        report(rate, seconds, results, control);
    });
    println!(
        "the shadow chain's own cost on this request, in process: {:.2}us per evaluation",
        chain_cost(&shadow_text)
    );
    let events = shadowed.events();
    let with_shadow = events.iter().filter(|e| e.get("shadow").is_some()).count();
    println!(
        "decision events: {} by the gateway, {} by the shadowed one ({with_shadow} with a shadow verdict)",
        gateway.events().len(),
        events.len()
    );
}

/// What evaluating the shadow chain costs on the benchmark's request, in process: the time of
/// the gateway's shadow step (a copy of the input, then the chain).
fn chain_cost(shadow: &str) -> f64 {
    use kt_gateway::policy::{Input, MessageText};
    let config =
        kt_gateway::config::PolicyConfig::parse("shadow", shadow.as_bytes()).expect("valid");
    let input = Input {
        model: "mock-small",
        provider: Some("openai"),
        max_tokens: None,
        messages: vec![MessageText {
            role: "user".into(),
            text: "benchmark request number 123456".into(),
        }],
    };
    let rounds = 200_000;
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        let mut copy = input.clone();
        std::hint::black_box(config.chain.evaluate(&mut copy));
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
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
    urls: &[String],
    rate: u64,
    seconds: u64,
) -> Vec<Results> {
    let paths = urls.len() as u64;
    let results: Vec<Arc<Mutex<Results>>> = urls.iter().map(|_| Arc::default()).collect();
    let total = rate * seconds * paths;
    let spacing = Duration::from_secs(1) / u32::try_from(rate * paths).unwrap_or(u32::MAX);
    let start = Instant::now() + Duration::from_millis(10);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let scheduled = start + spacing * u32::try_from(n).unwrap_or(u32::MAX);
        tokio::time::sleep_until(scheduled).await;
        let path = usize::try_from(n % paths).unwrap_or(0);
        let (url, results) = (urls[path].clone(), results[path].clone());
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
    results
        .into_iter()
        .map(|r| {
            Arc::try_unwrap(r)
                .map(Mutex::into_inner)
                .unwrap_or_default()
        })
        .collect()
}

fn report(rate: u64, seconds: u64, mut results: Vec<Results>, control: bool) {
    let sent = rate * seconds;
    let summaries: Vec<Option<Summary>> = results
        .iter_mut()
        .map(|r| Summary::of(&mut r.latencies))
        .collect();
    for ((name, r), s) in paths(control).iter().zip(&results).zip(&summaries) {
        println!(
            "{name:<20} {} ok of {sent}, {} failed; {}",
            r.latencies.len(),
            r.failures,
            s.as_ref().map(|s| s.to_string()).unwrap_or_default()
        );
    }
    let mut lag: Vec<Duration> = results
        .iter()
        .flat_map(|r| r.dispatch_lag.iter().copied())
        .collect();
    if let Some(lag) = Summary::of(&mut lag) {
        println!(
            "generator dispatch lag behind schedule: p50 {:.0}us, p99 {:.0}us, max {:.0}us",
            lag.p50.as_secs_f64() * 1e6,
            lag.p99.as_secs_f64() * 1e6,
            lag.max.as_secs_f64() * 1e6
        );
    }
    let added = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1e6;
    if let [Some(d), Some(g), Some(s)] = summaries.as_slice() {
        println!(
            "added by the gateway:             p50 {:.1}us, p90 {:.1}us, p99 {:.1}us",
            added(g.p50, d.p50),
            added(g.p90, d.p90),
            added(g.p99, d.p99)
        );
        println!(
            "added by the third path:         p50 {:.1}us, p90 {:.1}us, p99 {:.1}us",
            added(s.p50, d.p50),
            added(s.p90, d.p90),
            added(s.p99, d.p99)
        );
        println!(
            "third path over the gateway:      p50 {:.1}us, p90 {:.1}us, p99 {:.1}us",
            added(s.p50, g.p50),
            added(s.p90, g.p90),
            added(s.p99, g.p99)
        );
        let lost: usize = results.iter().map(|r| r.failures).sum();
        let met = added(g.p50, d.p50) < 300.0 && lost == 0;
        println!(
            "target: added p50 < 300us and no lost requests at {rate}/s -> {}",
            if met { "met" } else { "MISSED" }
        );
    }
}
