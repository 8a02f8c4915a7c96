//! `ktctl events`: the decision stream of the fleet.

pub mod stats;
pub mod tail;

use std::collections::HashMap;

use anyhow::Context;
use kt_proto::v1::EventFilter;

use crate::commands::parse_selector;

/// Which gateways: exactly one of the target flags.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// Every gateway of the fleet.
    #[arg(long)]
    pub all_gateways: bool,
    #[arg(long)]
    pub group: Option<String>,
    /// A gateway id (repeat for several).
    #[arg(long)]
    pub gateway: Vec<String>,
    /// Gateways whose labels match, e.g. `region=eu`.
    #[arg(long, value_parser = parse_selector)]
    pub selector: Option<HashMap<String, String>>,
}

impl Target {
    pub fn filter(&self) -> EventFilter {
        EventFilter {
            gateways: self.gateway.clone(),
            group: self.group.clone().unwrap_or_default(),
            selector: self.selector.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// `--since`: a duration back from now (`10m`) or an RFC 3339 time.
pub fn since_ms(text: &str) -> anyhow::Result<u64> {
    if let Ok(d) = humantime::parse_duration(text) {
        let back = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        return Ok(kt_daemon::unix_ms_now().saturating_sub(back).max(1));
    }
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("--since {text:?} is neither a duration like 10m nor an RFC 3339 time")
        })?;
    Ok(u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(0)
        .max(1))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn minutes(n: u64) -> Duration {
        Duration::from_secs(60 * n)
    }

    #[test]
    fn since_parses_durations_and_times() {
        let now = kt_daemon::unix_ms_now();
        let ten = since_ms("10m").expect("duration");
        assert!(
            now - ten >= minutes(10).as_millis() as u64 - 1000
                && now - ten <= minutes(10).as_millis() as u64 + 1000
        );
        assert_eq!(
            since_ms("2023-11-14T22:13:20Z").expect("time"),
            1_700_000_000_000
        );
        assert!(since_ms("yesterday-ish").is_err());
    }
}
