//! Policy-chain evaluation of a 4 KiB prompt through all five kinds of the example policy.
//!
//! `cargo bench -p kt-e2e --bench policy_chain` prints latency percentiles of single
//! evaluations. The prompt contains an e-mail address, so the PII detector redacts and every
//! policy runs (nothing blocks early).

use std::time::{Duration, Instant};

use kt_e2e::stats::Summary;
use kt_gateway::config::PolicyConfig;
use kt_gateway::policy::{Input, MessageText, Verdict};

const WARMUP: usize = 20_000;
const ITERATIONS: usize = 200_000;

fn prompt() -> String {
    let filler = "The quarterly report covers revenue, churn and the roadmap for the governed gateway fleet. ";
    let mut text = String::from("Summarise this for jane.doe@example.com. ");
    while text.len() < 4096 {
        text.push_str(filler);
    }
    text.truncate(4096);
    text
}

fn main() {
    let config = PolicyConfig::parse(
        "example",
        include_bytes!("../../deploy/examples/policy-config.yaml"),
    )
    .expect("example policy");
    let chain = config.chain.clone();
    let text = prompt();
    let messages = vec![
        MessageText {
            role: "system".into(),
            text: "You are a helpful assistant.".into(),
        },
        MessageText {
            role: "user".into(),
            text: text.clone(),
        },
    ];
    let mut per_policy: Vec<(&'static str, u64)> = Vec::new();
    let mut run = || {
        let mut input = Input {
            model: "mock-small",
            provider: Some("openai"),
            max_tokens: Some(512),
            messages: messages.clone(),
        };
        let started = Instant::now();
        let decision = chain.evaluate(&mut input);
        let elapsed = started.elapsed();
        assert_eq!(decision.verdict, Verdict::Redact);
        assert_eq!(decision.evaluated.len(), 5);
        for (i, outcome) in decision.evaluated.iter().enumerate() {
            match per_policy.get_mut(i) {
                Some(slot) => slot.1 += outcome.latency_us,
                None => per_policy.push((outcome.name, outcome.latency_us)),
            }
        }
        elapsed
    };
    for _ in 0..WARMUP {
        run();
    }
    let mut samples: Vec<Duration> = (0..ITERATIONS).map(|_| run()).collect();
    let summary = Summary::of(&mut samples).expect("samples");
    println!("policy chain, 4 KiB prompt, 5 policies: {summary}");
    let runs = (WARMUP + ITERATIONS) as f64;
    let shares: Vec<String> = per_policy
        .iter()
        .map(|(name, total)| format!("{name} {:.1}us", *total as f64 / runs))
        .collect();
    println!(
        "mean per policy (as the chain measures it): {}",
        shares.join(", ")
    );
    println!(
        "target: p99 < 50us -> {}",
        if summary.p99 < Duration::from_micros(50) {
            "met"
        } else {
            "MISSED"
        }
    );
}
