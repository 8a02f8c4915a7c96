//! Wall-clock times as the fleet shows them: Unix milliseconds in, UTC text out.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn at(unix_ms: u64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000).ok()
}

/// `2026-11-27T01:02:03.456Z`.
pub fn rfc3339(unix_ms: u64) -> String {
    at(unix_ms)
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// `01:02:03`, for progress lines.
pub fn hms(unix_ms: u64) -> String {
    let format = time::macros::format_description!("[hour]:[minute]:[second]");
    at(unix_ms)
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

/// `2026-11-27 01:02:03`, for tables.
pub fn date_time(unix_ms: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    at(unix_ms)
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(hms(1_700_000_000_000), "22:13:20");
        assert_eq!(date_time(1_700_000_000_000), "2023-11-14 22:13:20");
    }
}
