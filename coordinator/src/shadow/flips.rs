//! The flip matrix of a shadow run: for each (active verdict -> shadow verdict), how many
//! requests, by policy and reason, per gateway and overall, with a few prompt hashes each.
//! Built from stored decision events, which carry the shadow's verdict beside the active one.

use std::collections::BTreeMap;

use kt_contract::DecisionFields;
use kt_daemon::unix_ms_now;
use kt_proto::v1::{FlipCause, FlipCell, FlipReport, GatewayFlips};

use crate::events::EventRecord;

/// Fewer compared requests than this judge nothing: one flip in 20 would read as 5%.
pub const MIN_COMPARED: u64 = 100;

/// Prompt hashes kept per cause.
const SAMPLES: usize = 3;

type CauseKey = (String, String, String, String);

#[derive(Debug, Default)]
struct Cell {
    count: u64,
    causes: BTreeMap<CauseKey, (u64, Vec<String>)>,
}

#[derive(Debug, Default)]
struct Matrix {
    compared: u64,
    cells: BTreeMap<(String, String), Cell>,
}

impl Matrix {
    fn add(&mut self, active: &str, shadow: &str, cause: &CauseKey, prompt: &str) {
        self.compared += 1;
        let cell = self
            .cells
            .entry((active.to_owned(), shadow.to_owned()))
            .or_default();
        cell.count += 1;
        if active == shadow {
            return; // no change: the causes of a flip are what matters
        }
        let (count, samples) = cell.causes.entry(cause.clone()).or_default();
        *count += 1;
        if samples.len() < SAMPLES && !prompt.is_empty() && !samples.iter().any(|s| s == prompt) {
            samples.push(prompt.to_owned());
        }
    }

    fn into_cells(self) -> Vec<FlipCell> {
        self.cells
            .into_iter()
            .map(|((active, shadow), cell)| {
                let mut causes: Vec<FlipCause> = cell
                    .causes
                    .into_iter()
                    .map(|((ap, ar, sp, sr), (count, sample_prompts))| FlipCause {
                        active_policy: ap,
                        active_reason: ar,
                        shadow_policy: sp,
                        shadow_reason: sr,
                        count,
                        sample_prompts,
                    })
                    .collect();
                causes.sort_by_key(|c| std::cmp::Reverse(c.count));
                FlipCell {
                    active,
                    shadow,
                    count: cell.count,
                    causes,
                }
            })
            .collect()
    }
}

/// Counts the events of one shadow run as a log is read in storage order.
#[derive(Debug)]
pub struct FlipTally {
    config_hash: String,
    /// Events stored after this (Unix ms) are past the run; 0: none is.
    until: u64,
    /// Stop after this many compared requests; 0: no limit.
    sample: u64,
    overall: Matrix,
    gateways: BTreeMap<String, Matrix>,
    synthetic: u64,
}

impl FlipTally {
    pub fn new(config_hash: &str, until: u64, sample: u64) -> Self {
        FlipTally {
            config_hash: config_hash.to_owned(),
            until,
            sample,
            overall: Matrix::default(),
            gateways: BTreeMap::new(),
            synthetic: 0,
        }
    }

    /// Counts `event` if the run's shadow judged it; false once the run's events are all read.
    pub fn add(&mut self, event: &EventRecord) -> bool {
        if self.until > 0 && event.at > self.until {
            return false;
        }
        let Ok(decision) = serde_json::from_slice::<DecisionFields<'_>>(&event.body) else {
            return true;
        };
        let Some(shadow) = &decision.shadow else {
            return true;
        };
        if shadow.config_hash != self.config_hash {
            return true;
        }
        if decision.synthetic {
            self.synthetic += 1;
            return true;
        }
        let active_policy = if decision.verdict == "allow" {
            ""
        } else {
            decision
                .policies_evaluated
                .iter()
                .find(|p| p.result == decision.verdict)
                .map_or("", |p| &p.name)
        };
        let cause = (
            active_policy.to_owned(),
            decision.reason_code.clone().into_owned(),
            shadow.policy.clone().into_owned(),
            shadow.reason_code.clone().into_owned(),
        );
        let (active, shadow) = (&*decision.verdict, &*shadow.verdict);
        let prompt = &*decision.prompt_sha256;
        self.overall.add(active, shadow, &cause, prompt);
        self.gateways
            .entry(event.gateway.clone())
            .or_default()
            .add(active, shadow, &cause, prompt);
        self.sample == 0 || self.overall.compared < self.sample
    }

    pub fn finish(self) -> FlipReport {
        let compared = self.overall.compared;
        let (enough, judgement) = judge(compared);
        FlipReport {
            compared,
            cells: self.overall.into_cells(),
            gateways: self
                .gateways
                .into_iter()
                .map(|(gateway_id, m)| GatewayFlips {
                    gateway_id,
                    compared: m.compared,
                    cells: m.into_cells(),
                })
                .collect(),
            enough,
            judgement,
            computed_at_unix_ms: unix_ms_now(),
            synthetic: self.synthetic,
            stored: false,
            scope: String::new(),
        }
    }
}

/// Whether `compared` requests are enough to judge a flip rate, and in what words.
fn judge(compared: u64) -> (bool, String) {
    if compared == 0 {
        return (
            false,
            "no request was compared: nothing to judge (no traffic, or no gateway loaded the shadow)"
                .into(),
        );
    }
    if compared < MIN_COMPARED {
        return (
            false,
            format!(
                "only {compared} requests compared; at least {MIN_COMPARED} are needed to judge a flip rate"
            ),
        );
    }
    // The widest 95% interval of a share measured on `compared` requests (at p = 1/2).
    let margin = 1.96 * (0.25 / compared as f64).sqrt() * 100.0;
    (
        true,
        format!(
            "{compared} requests compared: each share is known within ±{margin:.1} points (95%)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(gateway: &str, at: u64, body: serde_json::Value) -> EventRecord {
        EventRecord {
            gateway: gateway.into(),
            region: "us".into(),
            epoch: 1,
            seq: at,
            at,
            verdict: String::new(),
            reason: String::new(),
            config_version: String::new(),
            acted: Vec::new(),
            body: body.to_string().into_bytes().into(),
        }
    }

    fn decision(verdict: &str, shadow: &str, hash: &str, prompt: &str) -> serde_json::Value {
        let (policy, reason) = if shadow == "block" {
            ("prompt-injection", "prompt_injection.phrase")
        } else {
            ("", "")
        };
        serde_json::json!({
            "verdict": verdict,
            "reason_code": if verdict == "block" { "dlp.keyword" } else { "" },
            "policies_evaluated": [{"name": "dlp-filter", "result": verdict}],
            "prompt_sha256": prompt,
            "shadow": {"config_hash": hash, "verdict": shadow, "policy": policy, "reason_code": reason},
        })
    }

    #[test]
    fn flips_are_counted_by_cell_cause_and_gateway_with_samples() {
        let mut tally = FlipTally::new("sha256:new", 0, 0);
        for i in 0..5 {
            let prompt = format!("p{}", i % 4);
            assert!(tally.add(&event(
                "gw-1",
                i,
                decision("allow", "block", "sha256:new", &prompt)
            )));
        }
        for i in 0..10 {
            tally.add(&event(
                "gw-2",
                10 + i,
                decision("allow", "allow", "sha256:new", "q"),
            ));
        }
        tally.add(&event(
            "gw-2",
            30,
            decision("block", "allow", "sha256:new", "r"),
        ));
        // Another shadow's verdicts, events without a shadow and probes are not this run's.
        tally.add(&event(
            "gw-2",
            31,
            decision("allow", "block", "sha256:old", "x"),
        ));
        tally.add(&event("gw-2", 32, serde_json::json!({"verdict": "allow"})));
        let mut probe = decision("allow", "block", "sha256:new", "y");
        probe["synthetic"] = true.into();
        tally.add(&event("gw-2", 33, probe));
        tally.add(&event("gw-2", 34, serde_json::json!("not a decision")));

        let report = tally.finish();
        assert_eq!(report.compared, 16);
        assert_eq!(report.synthetic, 1);
        let cell = |a: &str, s: &str| {
            report
                .cells
                .iter()
                .find(|c| c.active == a && c.shadow == s)
                .cloned()
        };
        let flips = cell("allow", "block").expect("allow -> block");
        assert_eq!(flips.count, 5);
        assert_eq!(flips.causes.len(), 1);
        assert_eq!(flips.causes[0].shadow_policy, "prompt-injection");
        assert_eq!(flips.causes[0].shadow_reason, "prompt_injection.phrase");
        assert_eq!(flips.causes[0].sample_prompts, ["p0", "p1", "p2"]);
        let unblocked = cell("block", "allow").expect("block -> allow");
        assert_eq!(unblocked.causes[0].active_policy, "dlp-filter");
        assert_eq!(unblocked.causes[0].active_reason, "dlp.keyword");
        assert!(cell("allow", "allow").expect("same").causes.is_empty());
        assert_eq!(report.share("allow", "block"), 5.0 / 16.0);
        assert_eq!(report.gateways.len(), 2);
        assert_eq!(report.gateways[0].gateway_id, "gw-1");
        assert_eq!(report.gateways[0].compared, 5);
        assert_eq!(report.gateways[1].compared, 11);
        assert!(!report.enough, "16 requests judge nothing");
    }

    #[test]
    fn reading_stops_at_the_sample_size_and_at_the_end_of_the_run() {
        let mut sampled = FlipTally::new("h", 0, 2);
        assert!(sampled.add(&event("gw", 1, decision("allow", "allow", "h", "a"))));
        assert!(!sampled.add(&event("gw", 2, decision("allow", "allow", "h", "b"))));
        let mut ended = FlipTally::new("h", 10, 0);
        assert!(ended.add(&event("gw", 10, decision("allow", "allow", "h", "a"))));
        assert!(!ended.add(&event("gw", 11, decision("allow", "allow", "h", "b"))));
        assert_eq!(ended.finish().compared, 1);
    }

    #[test]
    fn the_judgement_needs_enough_requests() {
        assert!(!judge(0).0);
        assert!(!judge(MIN_COMPARED - 1).0);
        let (enough, words) = judge(400);
        assert!(enough);
        assert!(words.contains("±4.9"), "{words}");
    }
}
