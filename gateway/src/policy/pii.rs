//! PII detectors: e-mail, phone, credit card (Luhn-checked), US SSN and IBAN (mod-97 checked).
//!
//! Detectors run in a fixed order (most specific first) over text where earlier matches were
//! already replaced by typed placeholders such as `[REDACTED:EMAIL]`, so one span is never
//! claimed twice.

use std::sync::LazyLock;

use regex::{Regex, RegexSet};

use crate::config::PiiKind;

struct Detector {
    kind: PiiKind,
    regex: Regex,
    /// A check on the matched text that the regex alone cannot express.
    check: fn(&str) -> bool,
}

#[allow(clippy::expect_used)] // Constant patterns, covered by the tests below.
// ASCII word boundaries and digits (`(?-u)`): PII formats are ASCII, and it keeps every
// detector on the fast DFA engines.
static DETECTORS: LazyLock<Vec<Detector>> = LazyLock::new(|| {
    let build = |kind, pattern: &str, check: fn(&str) -> bool| Detector {
        kind,
        regex: Regex::new(pattern).expect("constant PII pattern compiles"),
        check,
    };
    vec![
        build(
            PiiKind::CreditCard,
            r"(?-u)\b(?:\d[ -]?){12,18}\d\b",
            luhn_valid,
        ),
        build(
            PiiKind::Iban,
            r"(?-u)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
            iban_valid,
        ),
        build(PiiKind::UsSsn, r"(?-u)\b\d{3}-\d{2}-\d{4}\b", ssn_valid),
        build(
            PiiKind::Email,
            r"(?i-u)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b",
            |_| true,
        ),
        build(
            PiiKind::Phone,
            r"(?-u)(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\b\d{3})[ .-]?\d{3}[ .-]?\d{4}\b",
            |_| true,
        ),
    ]
});

/// All detector patterns in one set: a single scan tells which detectors can match at all,
/// so text without PII is read once instead of once per detector.
#[allow(clippy::expect_used)] // The same constant patterns as DETECTORS.
static ANY: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new(DETECTORS.iter().map(|d| d.regex.as_str()))
        .expect("constant PII patterns compile")
});

/// Compiles the detectors now, so the first request does not pay for it.
pub fn warm_up() {
    LazyLock::force(&ANY);
}

/// The enabled detectors that have at least one candidate match in `text`.
fn candidates<'a>(
    text: &str,
    enabled: &'a [PiiKind],
) -> impl Iterator<Item = &'static Detector> + 'a {
    let matched = ANY.matches(text);
    DETECTORS
        .iter()
        .enumerate()
        .filter(move |(i, d)| matched.matched(*i) && enabled.contains(&d.kind))
        .map(|(_, d)| d)
}

pub fn placeholder(kind: PiiKind) -> &'static str {
    match kind {
        PiiKind::Email => "[REDACTED:EMAIL]",
        PiiKind::Phone => "[REDACTED:PHONE]",
        PiiKind::CreditCard => "[REDACTED:CREDIT_CARD]",
        PiiKind::UsSsn => "[REDACTED:US_SSN]",
        PiiKind::Iban => "[REDACTED:IBAN]",
    }
}

/// The first kind of PII found in `text`, among `enabled`.
pub fn detect(text: &str, enabled: &[PiiKind]) -> Option<PiiKind> {
    candidates(text, enabled)
        .find(|d| d.regex.find_iter(text).any(|m| (d.check)(m.as_str())))
        .map(|d| d.kind)
}

/// Replaces every PII match of the `enabled` kinds by its placeholder; returns the kinds found.
pub fn redact(text: &mut String, enabled: &[PiiKind]) -> Vec<PiiKind> {
    let mut found = Vec::new();
    // Candidates come from the original text: a placeholder holds no digits and no '@', so a
    // redaction never creates a match for a later detector.
    let detectors: Vec<&Detector> = candidates(text, enabled).collect();
    for detector in detectors {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for m in detector.regex.find_iter(text) {
            if (detector.check)(m.as_str()) {
                out.push_str(&text[last..m.start()]);
                out.push_str(placeholder(detector.kind));
                last = m.end();
            }
        }
        if last > 0 {
            out.push_str(&text[last..]);
            *text = out;
            found.push(detector.kind);
        }
    }
    found
}

fn luhn_valid(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn iban_valid(candidate: &str) -> bool {
    let compact: Vec<char> = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    // Move the first four characters to the end, letters become 10..35, then mod 97 == 1.
    let rotated = compact[4..].iter().chain(&compact[..4]);
    let mut remainder: u32 = 0;
    for c in rotated {
        let value = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

fn ssn_valid(candidate: &str) -> bool {
    let parts: Vec<&str> = candidate.split('-').collect();
    let [area, group, serial] = parts.as_slice() else {
        return false;
    };
    *area != "000"
        && *area != "666"
        && !area.starts_with('9')
        && *group != "00"
        && *serial != "0000"
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[PiiKind] = &PiiKind::ALL;

    #[test]
    fn catches_each_kind() {
        for (text, kind) in [
            ("mail me at jane.doe@example.com please", PiiKind::Email),
            ("call +1 415-555-0132 today", PiiKind::Phone),
            ("card 4111 1111 1111 1111 exp 12/30", PiiKind::CreditCard),
            ("ssn 123-45-6789", PiiKind::UsSsn),
            ("iban DE89 3704 0044 0532 0130 00 thanks", PiiKind::Iban),
            ("iban GB82WEST12345698765432", PiiKind::Iban),
        ] {
            assert_eq!(detect(text, ALL), Some(kind), "{text}");
        }
    }

    #[test]
    fn lets_look_alikes_through() {
        for text in [
            "order 4111 1111 1111 1112 failed", // fails Luhn
            "ssn 000-12-3456 is not valid",     // area 000
            "DE00 3704 0044 0532 0130 00",      // bad IBAN checksum
            "version 1.2.3 at example dot com",
            "no pii here at all",
        ] {
            assert_eq!(detect(text, ALL), None, "{text}");
        }
    }

    #[test]
    fn redaction_uses_typed_placeholders_and_reports_kinds() {
        let mut text = "reach jane@example.com or 415-555-0132, card 4111111111111111".to_owned();
        let found = redact(&mut text, ALL);
        assert_eq!(
            text,
            "reach [REDACTED:EMAIL] or [REDACTED:PHONE], card [REDACTED:CREDIT_CARD]"
        );
        assert_eq!(found, [PiiKind::CreditCard, PiiKind::Email, PiiKind::Phone]);
    }

    #[test]
    fn only_enabled_kinds_run() {
        let mut text = "jane@example.com 415-555-0132".to_owned();
        assert_eq!(redact(&mut text, &[PiiKind::Email]), [PiiKind::Email]);
        assert_eq!(text, "[REDACTED:EMAIL] 415-555-0132");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_redaction_removes_what_detect_finds(text in "\\PC{0,300}") {
            let mut redacted = text.clone();
            redact(&mut redacted, ALL);
            proptest::prop_assert_eq!(detect(&redacted, ALL), None);
        }

        #[test]
        fn generated_emails_are_always_redacted(user in "[a-z][a-z0-9.]{0,10}[a-z0-9]", domain in "[a-z]{2,10}", tld in "[a-z]{2,4}") {
            let mut text = format!("contact {user}@{domain}.{tld} now");
            let found = redact(&mut text, &[PiiKind::Email]);
            proptest::prop_assert_eq!(found, vec![PiiKind::Email]);
            proptest::prop_assert!(!text.contains('@'));
        }

        #[test]
        fn valid_card_numbers_pass_luhn(prefix in proptest::collection::vec(0u32..10, 15)) {
            // Append the check digit that makes the number Luhn-valid.
            let digits: String = prefix.iter().map(|d| char::from_digit(*d, 10).unwrap_or('0')).collect();
            let check = (0..10).find(|c| luhn_valid(&format!("{digits}{c}"))).unwrap_or(0);
            let card = format!("{digits}{check}");
            proptest::prop_assert!(luhn_valid(&card));
            proptest::prop_assert_eq!(detect(&format!("pay {card} now"), &[PiiKind::CreditCard]), Some(PiiKind::CreditCard));
        }
    }
}
