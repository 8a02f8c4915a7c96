//! Events end to end: gateways' events files → agents → coordinator (durable, deduplicated)
//! → one tail subscriber, with real release processes on loopback.
//!
//! `cargo build --release --workspace && cargo bench -p kt-e2e --bench events_throughput`
//! `KT_BENCH_EVENTS` events per gateway (default 100000), 3 gateways, written as fast as
//! possible, or paced at `KT_BENCH_RATE` events/s in all. Each event carries the time it was
//! written (microseconds); the subscriber measures latency from write to receipt.

use std::io::Write;
use std::time::{Duration, Instant};

use kt_e2e::TestFleet;
use kt_e2e::stats::Summary;
use kt_proto::v1::{EventFilter, TailEventsRequest, tail_events_response::Item};

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn main() {
    let per_gateway: u64 = std::env::var("KT_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rate: Option<u64> = std::env::var("KT_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let fleet = TestFleet::start(3);
        fleet.wait_for_health("fleet up", Duration::from_secs(30), |code, rows| code == 0 && rows.len() == 3).await;
        let mut client = fleet.operator().await;
        let mut tail = client
            .tail_events(TailEventsRequest { filter: Some(EventFilter::default()), since_unix_ms: 0, limit: 0, no_follow: false })
            .await
            .expect("tail")
            .into_inner();
        let total = per_gateway * 3;
        let files: Vec<_> = fleet.gateways.iter().map(|g| (g.events.clone(), g.id.clone())).collect();
        let started = Instant::now();
        // Writers: 100 events per append, as a busy gateway's writer task would flush them.
        let writer = tokio::task::spawn_blocking(move || {
            let mut handles: Vec<_> = files.iter().map(|(path, _)| std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open")).collect();
            let mut n = 0;
            let begun = Instant::now();
            while n < per_gateway {
                if let Some(rate) = rate {
                    // Pace: 300 events per round across the three gateways.
                    let due = begun + Duration::from_secs_f64((n * 3) as f64 / rate as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                for (i, (_, id)) in files.iter().enumerate() {
                    let mut chunk = String::new();
                    for k in n..(n + 100).min(per_gateway) {
                        chunk.push_str(&format!(
                            "{{\"id\":\"{id}-{k}\",\"verdict\":\"allow\",\"reason_code\":\"\",\"config_version\":\"1.0.0\",\"policies_evaluated\":[],\"written_us\":{}}}\n",
                            now_us()
                        ));
                    }
                    handles[i].write_all(chunk.as_bytes()).expect("write");
                }
                n += 100;
            }
        });
        let mut latencies = Vec::with_capacity(total as usize);
        let mut received = 0u64;
        let mut missed = 0u64;
        let deadline = Instant::now() + Duration::from_secs(300);
        while received + missed < total && Instant::now() < deadline {
            let Ok(Ok(Some(item))) = tokio::time::timeout(Duration::from_secs(30), tail.message()).await else { break };
            match item.item {
                Some(Item::Event(e)) => {
                    received += 1;
                    let value: serde_json::Value = serde_json::from_slice(&e.event).unwrap_or_default();
                    if let Some(written) = value["written_us"].as_u64() {
                        latencies.push(Duration::from_micros(now_us().saturating_sub(written)));
                    }
                }
                Some(Item::Missed(n)) => missed += n,
                _ => {}
            }
        }
        let elapsed = started.elapsed();
        writer.await.expect("writer");
        let summary = Summary::of(&mut latencies);
        let throughput = received as f64 / elapsed.as_secs_f64();
        println!("producer: {}", rate.map(|r| format!("paced at {r} events/s")).unwrap_or_else(|| "as fast as it can".into()));
        println!("events: {received} received of {total} written by 3 gateways, {missed} missed by the subscriber, in {:.2}s", elapsed.as_secs_f64());
        println!("sustained end to end: {throughput:.0} events/s");
        if let Some(s) = summary {
            println!("latency from file write to tail receipt: p50 {:.1}ms p99 {:.1}ms max {:.1}ms", s.p50.as_secs_f64() * 1e3, s.p99.as_secs_f64() * 1e3, s.max.as_secs_f64() * 1e3);
            let met = throughput >= 200_000.0 && s.p99 < Duration::from_millis(250) && missed == 0;
            println!("target: >= 200000 events/s, p99 < 250 ms -> {}", if met { "met" } else { "MISSED" });
        }
    });
}
