//! How a shadow run and its flip matrix read: a header, the matrix, the flips by policy and
//! reason with sample prompt hashes, and the flips per gateway.

use std::fmt::Write;

use kt_proto::flips;
use kt_proto::v1::{FlipCell, FlipReport, ShadowRun};

use crate::view::{short_hash, table};

fn pct(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// The run's identity, state and gateways.
pub fn header(run: &ShadowRun) -> String {
    let mut out = String::new();
    let config = run.config.clone().unwrap_or_default();
    let ended = if run.ended_at_unix_ms > 0 {
        format!(
            ", ended {}",
            kt_daemon::clock::rfc3339(run.ended_at_unix_ms)
        )
    } else {
        format!(", ends {}", kt_daemon::clock::rfc3339(run.ends_at_unix_ms))
    };
    let _ = writeln!(
        out,
        "shadow run {}: {}{}",
        run.id,
        run.state,
        if run.message.is_empty() {
            String::new()
        } else {
            format!(" ({})", run.message)
        }
    );
    let _ = writeln!(
        out,
        "config     {} ({}) as a shadow on {}",
        config.version,
        short_hash(&config.hash),
        run.target
    );
    let _ = writeln!(
        out,
        "started    {} by {}{ended}",
        kt_daemon::clock::rfc3339(run.started_at_unix_ms),
        run.started_by
    );
    if run.sample > 0 {
        let _ = writeln!(
            out,
            "sample     ends after {} compared requests",
            run.sample
        );
    }
    let gateways: Vec<String> = run
        .gateways
        .iter()
        .map(|g| {
            if g.error.is_empty() {
                format!("{} {}", g.gateway_id, g.state)
            } else {
                format!("{} {} ({})", g.gateway_id, g.state, g.error)
            }
        })
        .collect();
    let _ = writeln!(out, "gateways   {}", gateways.join(", "));
    out
}

/// One line: compared requests and the two flip rates that matter most.
pub fn summary(report: &FlipReport) -> String {
    format!(
        "compared {} requests: allow → block {} ({}), block → allow {} ({})",
        report.compared,
        flips::count(&report.cells, "allow", "block"),
        pct(report.share("allow", "block")),
        flips::count(&report.cells, "block", "allow"),
        pct(report.share("block", "allow")),
    )
}

/// The whole flip matrix.
pub fn matrix(report: &FlipReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compared   {} requests{}",
        report.compared,
        if report.synthetic > 0 {
            format!(" ({} synthetic probes not counted)", report.synthetic)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "judgement  {}{}",
        if report.enough {
            "enough to judge: "
        } else {
            "NOT enough to judge: "
        },
        report.judgement
    );
    if !report.scope.is_empty() {
        let _ = writeln!(out, "scope      {}", report.scope);
    }
    if report.compared == 0 {
        return out;
    }
    let mut cells = table(&["ACTIVE", "SHADOW", "REQUESTS", "SHARE", ""]);
    for c in &report.cells {
        cells.add_row(vec![
            c.active.clone(),
            c.shadow.clone(),
            c.count.to_string(),
            pct(c.count as f64 / report.compared as f64),
            if c.active == c.shadow {
                String::new()
            } else {
                "flip".into()
            },
        ]);
    }
    let _ = writeln!(out, "\n{cells}");
    let flips: Vec<&FlipCell> = report
        .cells
        .iter()
        .filter(|c| c.active != c.shadow)
        .collect();
    if flips.is_empty() {
        let _ = writeln!(out, "\nno request changes verdict");
    } else {
        let mut causes = table(&[
            "FLIP",
            "REQUESTS",
            "ACTIVE POLICY / REASON",
            "SHADOW POLICY / REASON",
            "SAMPLE PROMPTS (SHA-256)",
        ]);
        let cause = |policy: &str, reason: &str| match (policy, reason) {
            ("", "") => "-".to_owned(),
            (p, "") => p.to_owned(),
            ("", r) => r.to_owned(),
            (p, r) => format!("{p} / {r}"),
        };
        for c in flips {
            for k in &c.causes {
                causes.add_row(vec![
                    format!("{} → {}", c.active, c.shadow),
                    k.count.to_string(),
                    cause(&k.active_policy, &k.active_reason),
                    cause(&k.shadow_policy, &k.shadow_reason),
                    k.sample_prompts
                        .iter()
                        .map(|p| p.chars().take(12).collect::<String>())
                        .collect::<Vec<_>>()
                        .join(" "),
                ]);
            }
        }
        let _ = writeln!(out, "\nFLIPS BY POLICY AND REASON\n{causes}");
    }
    let mut gateways = table(&[
        "GATEWAY",
        "COMPARED",
        "ALLOW → BLOCK",
        "BLOCK → ALLOW",
        "OTHER FLIPS",
    ]);
    for g in &report.gateways {
        let other: u64 = g
            .cells
            .iter()
            .filter(|c| c.active != c.shadow)
            .filter(|c| {
                !matches!(
                    (c.active.as_str(), c.shadow.as_str()),
                    ("allow", "block") | ("block", "allow")
                )
            })
            .map(|c| c.count)
            .sum();
        let rate = |a: &str, s: &str| {
            format!(
                "{} ({})",
                flips::count(&g.cells, a, s),
                pct(flips::share(&g.cells, g.compared, a, s))
            )
        };
        gateways.add_row(vec![
            g.gateway_id.clone(),
            g.compared.to_string(),
            rate("allow", "block"),
            rate("block", "allow"),
            other.to_string(),
        ]);
    }
    let _ = writeln!(out, "\nPER GATEWAY\n{gateways}");
    out
}
