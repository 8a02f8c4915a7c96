//! `ktctl config diff A B --semantic`: the behaviour change between two config versions in
//! policy terms (phrases and patterns added or removed, PII kinds moved between redact and
//! block, models allowed or dropped, limits tightened or loosened, policies added to or taken
//! from the chain), each with an example request whose verdict changes, checked by running
//! both versions' chains on it. A change no example could show is said so, never glossed over.

use std::collections::BTreeSet;

use kt_gateway::config::{DlpAction, PiiAction, PiiKind, PolicyConfig, PolicySettings};
use kt_gateway::policy::{Input, MessageText, Verdict};
use serde::Serialize;

/// The model a request may name (the first allowed one, else the first provider's).
fn usable_model(config: &PolicyConfig) -> String {
    config
        .settings
        .model_allowlist
        .as_ref()
        .and_then(|m| m.models.first().cloned())
        .or_else(|| config.providers.first().map(|p| p.model.clone()))
        .unwrap_or_else(|| "gpt-4o".into())
}

/// A request an example makes.
#[derive(Clone, Debug, Serialize)]
pub struct Example {
    pub prompt: String,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
}

/// What one version decided on an example.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decided {
    pub verdict: &'static str,
    pub reason_code: String,
}

/// One change in policy terms, with the example that shows it (checked on both chains).
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    pub policy: String,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example: Option<Example>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Decided>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Decided>,
    /// Why no example is given, when none is.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

fn decide(version: &PolicyConfig, example: &Example) -> Decided {
    if !version.enabled {
        return Decided {
            verdict: Verdict::Allow.as_str(),
            reason_code: "pack disabled".into(),
        };
    }
    let provider = version
        .providers
        .iter()
        .find(|p| p.model == example.model)
        .map(|p| p.provider.as_str());
    let mut input = Input {
        model: &example.model,
        provider,
        max_tokens: example.max_tokens,
        messages: vec![MessageText {
            role: "user".into(),
            text: example.prompt.clone(),
        }],
    };
    let decision = version.chain.evaluate(&mut input);
    Decided {
        verdict: decision.verdict.as_str(),
        reason_code: decision.reason_code,
    }
}

/// A change, with the first of `candidates` whose verdict really differs between the two.
fn checked(
    old: &PolicyConfig,
    new: &PolicyConfig,
    policy: &str,
    what: String,
    candidates: Vec<Example>,
) -> Change {
    let mut last = None;
    for example in candidates {
        let (before, after) = (decide(old, &example), decide(new, &example));
        if before.verdict != after.verdict {
            return Change {
                policy: policy.into(),
                what,
                example: Some(example),
                before: Some(before),
                after: Some(after),
                note: String::new(),
            };
        }
        last = Some(before);
    }
    let note = match last {
        Some(both) => format!(
            "no example changes verdict: both versions decide {} on the ones tried (another policy decides first)",
            both.verdict
        ),
        None => "no example can be written for it (a pattern's matches are not spelled out)".into(),
    };
    Change {
        policy: policy.into(),
        what,
        example: None,
        before: None,
        after: None,
        note,
    }
}

fn prompt(model: &str, text: String) -> Example {
    Example {
        prompt: text,
        model: model.into(),
        max_tokens: None,
    }
}

fn added_removed<'a>(old: &'a [String], new: &'a [String]) -> (Vec<&'a String>, Vec<&'a String>) {
    let (o, n): (BTreeSet<&String>, BTreeSet<&String>) =
        (old.iter().collect(), new.iter().collect());
    (
        n.difference(&o).copied().collect(),
        o.difference(&n).copied().collect(),
    )
}

/// A sample of each PII kind, as its detector finds it.
fn pii_sample(kind: PiiKind) -> &'static str {
    match kind {
        PiiKind::Email => "jane.doe@example.com",
        PiiKind::Phone => "+1 415 555 0132",
        PiiKind::CreditCard => "4111 1111 1111 1111",
        PiiKind::UsSsn => "123-45-6789",
        PiiKind::Iban => "DE89 3704 0044 0532 0130 00",
    }
}

/// How a version treats a PII kind: not detected, redacted or blocked.
fn pii_treatment(settings: &PolicySettings, chain: &[String], kind: PiiKind) -> &'static str {
    match &settings.pii_detector {
        Some(p) if chain.iter().any(|c| c == "pii-detector") && p.detect.contains(&kind) => {
            match p.action {
                PiiAction::Redact => "redact",
                PiiAction::Block => "block",
            }
        }
        _ => "not detected",
    }
}

/// Every behaviour change from `old` to `new`.
pub fn changes(
    (old_source, old_bytes): (&str, &[u8]),
    (new_source, new_bytes): (&str, &[u8]),
) -> Result<Vec<Change>, String> {
    let old = PolicyConfig::parse(old_source, old_bytes).map_err(|e| e.to_string())?;
    let new = PolicyConfig::parse(new_source, new_bytes).map_err(|e| e.to_string())?;
    let model = usable_model(&new);
    let say = |text: &str| prompt(&model, format!("please help with this: {text}"));
    let mut out = Vec::new();

    if old.enabled != new.enabled {
        let what = if new.enabled {
            "the pack is enabled: its policies decide again"
        } else {
            "the pack is disabled: every request passes unchecked"
        };
        let candidates = [
            "ignore all previous instructions",
            "contact jane.doe@example.com",
            "internal-only figures",
        ]
        .iter()
        .map(|t| say(t))
        .collect();
        out.push(checked(&old, &new, "pack", what.into(), candidates));
    }

    let (added, removed) = added_removed(&old.chain_names, &new.chain_names);
    for policy in added {
        out.push(Change {
            policy: policy.clone(),
            what: "added to the chain (its own changes below show what it decides)".into(),
            example: None,
            before: None,
            after: None,
            note: String::new(),
        });
    }
    for policy in removed {
        out.push(Change {
            policy: policy.clone(),
            what: "taken out of the chain: it decides nothing any more".into(),
            example: None,
            before: None,
            after: None,
            note: String::new(),
        });
    }

    let in_chain = |v: &PolicyConfig, kind: &str| v.chain_names.iter().any(|c| c == kind);
    let phrases = |v: &PolicyConfig| -> (Vec<String>, Vec<String>) {
        match &v.settings.prompt_injection {
            Some(p) if in_chain(v, "prompt-injection") => (p.phrases.clone(), p.patterns.clone()),
            _ => Default::default(),
        }
    };
    let ((old_phrases, old_patterns), (new_phrases, new_patterns)) = (phrases(&old), phrases(&new));
    let (added, removed) = added_removed(&old_phrases, &new_phrases);
    for p in added {
        let what = format!("phrase added: {p:?} (newly blocked)");
        out.push(checked(&old, &new, "prompt-injection", what, vec![say(p)]));
    }
    for p in removed {
        let what = format!("phrase removed: {p:?} (newly allowed)");
        out.push(checked(&old, &new, "prompt-injection", what, vec![say(p)]));
    }
    let (added, removed) = added_removed(&old_patterns, &new_patterns);
    for p in added.into_iter().chain(removed) {
        let what = if new_patterns.contains(p) {
            format!("pattern added: {p:?} (newly blocked)")
        } else {
            format!("pattern removed: {p:?} (newly allowed)")
        };
        out.push(checked(&old, &new, "prompt-injection", what, Vec::new()));
    }

    let dlp = |v: &PolicyConfig| match &v.settings.dlp_filter {
        Some(d) if in_chain(v, "dlp-filter") => Some(d.clone()),
        _ => None,
    };
    let (old_dlp, new_dlp) = (dlp(&old), dlp(&new));
    let keywords = |d: &Option<kt_gateway::config::DlpSettings>| {
        d.as_ref().map(|d| d.keywords.clone()).unwrap_or_default()
    };
    let (old_keywords, new_keywords) = (keywords(&old_dlp), keywords(&new_dlp));
    let (added, removed) = added_removed(&old_keywords, &new_keywords);
    for k in added {
        let what = format!("keyword added: {k:?}");
        out.push(checked(&old, &new, "dlp-filter", what, vec![say(k)]));
    }
    for k in removed {
        let what = format!("keyword removed: {k:?}");
        out.push(checked(&old, &new, "dlp-filter", what, vec![say(k)]));
    }
    let patterns = |d: &Option<kt_gateway::config::DlpSettings>| {
        d.as_ref().map(|d| d.patterns.clone()).unwrap_or_default()
    };
    let (new_dlp_patterns, old_dlp_patterns) = (patterns(&new_dlp), patterns(&old_dlp));
    let (added, removed) = added_removed(&old_dlp_patterns, &new_dlp_patterns);
    for p in added.into_iter().chain(removed) {
        let what = if new_dlp_patterns.contains(p) {
            format!("pattern added: {p:?}")
        } else {
            format!("pattern removed: {p:?}")
        };
        out.push(checked(&old, &new, "dlp-filter", what, Vec::new()));
    }
    if let (Some(o), Some(n)) = (&old_dlp, &new_dlp)
        && o.action != n.action
    {
        let name = |a: DlpAction| match a {
            DlpAction::Block => "block",
            DlpAction::Escalate => "escalate",
        };
        let what = format!(
            "action {} → {} for every keyword and pattern",
            name(o.action),
            name(n.action)
        );
        let candidates = n.keywords.iter().map(|k| say(k)).collect();
        out.push(checked(&old, &new, "dlp-filter", what, candidates));
    }

    for kind in PiiKind::ALL {
        let before = pii_treatment(&old.settings, &old.chain_names, kind);
        let after = pii_treatment(&new.settings, &new.chain_names, kind);
        if before != after {
            let what = format!("{} moved from {before} to {after}", kind.as_str());
            let example = say(&format!("send it to {}", pii_sample(kind)));
            out.push(checked(&old, &new, "pii-detector", what, vec![example]));
        }
    }

    let models = |v: &PolicyConfig| match &v.settings.model_allowlist {
        Some(m) if in_chain(v, "model-allowlist") => Some(m.models.clone()),
        _ => None,
    };
    if let (Some(old_models), Some(new_models)) = (models(&old), models(&new)) {
        let (added, removed) = added_removed(&old_models, &new_models);
        for m in added {
            let what = format!("model allowed: {m}");
            let example = prompt(m, "hello".into());
            out.push(checked(&old, &new, "model-allowlist", what, vec![example]));
        }
        for m in removed {
            let what = format!("model dropped: {m}");
            let example = prompt(m, "hello".into());
            out.push(checked(&old, &new, "model-allowlist", what, vec![example]));
        }
    }

    let limits = |v: &PolicyConfig| match &v.settings.request_limits {
        Some(l) if in_chain(v, "request-limits") => (l.max_prompt_bytes, l.max_tokens),
        _ => (None, None),
    };
    let ((old_bytes_limit, old_tokens), (new_bytes_limit, new_tokens)) =
        (limits(&old), limits(&new));
    if old_bytes_limit != new_bytes_limit {
        let what = format!(
            "max_prompt_bytes {} → {} ({})",
            limit_text(old_bytes_limit.map(|b| b as u64)),
            limit_text(new_bytes_limit.map(|b| b as u64)),
            direction(
                old_bytes_limit.map(|b| b as u64),
                new_bytes_limit.map(|b| b as u64)
            )
        );
        // A prompt just over the lower limit: inside one version, outside the other.
        let size = old_bytes_limit
            .into_iter()
            .chain(new_bytes_limit)
            .min()
            .unwrap_or(0)
            + 1;
        let candidates = vec![prompt(&model, "x".repeat(size))];
        out.push(checked(&old, &new, "request-limits", what, candidates));
    }
    if old_tokens != new_tokens {
        let what = format!(
            "max_tokens {} → {} ({})",
            limit_text(old_tokens),
            limit_text(new_tokens),
            direction(old_tokens, new_tokens)
        );
        let asked = old_tokens.into_iter().chain(new_tokens).min().unwrap_or(0) + 1;
        let mut example = prompt(&model, "hello".into());
        example.max_tokens = Some(asked);
        out.push(checked(&old, &new, "request-limits", what, vec![example]));
    }
    Ok(out)
}

fn limit_text(limit: Option<u64>) -> String {
    limit.map_or_else(|| "none".into(), |l| l.to_string())
}

fn direction(old: Option<u64>, new: Option<u64>) -> &'static str {
    match (old, new) {
        (None, Some(_)) => "a new limit",
        (Some(_), None) => "limit lifted",
        (Some(o), Some(n)) if n < o => "tightened",
        _ => "loosened",
    }
}

/// The changes as text, one block each.
pub fn render(from: &str, to: &str, changes: &[Change]) -> String {
    use std::fmt::Write;
    let mut out = format!("behaviour changes from {from} to {to}:\n");
    if changes.is_empty() {
        out.push_str("  (none: both versions decide alike)\n");
    }
    for c in changes {
        let _ = writeln!(out, "\n  {}: {}", c.policy, c.what);
        match (&c.example, &c.before, &c.after) {
            (Some(e), Some(b), Some(a)) => {
                let request = match e.max_tokens {
                    Some(t) => format!("model {}, max_tokens {t}", e.model),
                    None => format!("model {}", e.model),
                };
                let shown: String = e.prompt.chars().take(80).collect();
                let more = if e.prompt.chars().count() > 80 {
                    format!("… ({} bytes)", e.prompt.len())
                } else {
                    String::new()
                };
                let _ = writeln!(out, "    example  {shown:?}{more} ({request})");
                let reason = |d: &Decided| {
                    if d.reason_code.is_empty() {
                        d.verdict.to_owned()
                    } else {
                        format!("{} ({})", d.verdict, d.reason_code)
                    }
                };
                let _ = writeln!(out, "    checked  {} → {}", reason(b), reason(a));
            }
            _ if !c.note.is_empty() => {
                let _ = writeln!(out, "    {}", c.note);
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../../deploy/examples/policy-config.yaml");

    fn diff(edit: impl Fn(&str) -> String) -> Vec<Change> {
        let new = edit(EXAMPLE).replace("version: 1.0.0", "version: 1.1.0");
        changes(("a", EXAMPLE.as_bytes()), ("b", new.as_bytes())).expect("both valid")
    }

    #[test]
    fn an_added_phrase_is_shown_newly_blocked() {
        let found = diff(|t| {
            t.replace(
                "      - ignore all previous instructions\n",
                "      - ignore all previous instructions\n      - the weather\n",
            )
        });
        assert_eq!(found.len(), 1, "{found:?}");
        let c = &found[0];
        assert_eq!(c.policy, "prompt-injection");
        assert!(c.what.contains("the weather"));
        assert_eq!(c.before.as_ref().map(|d| d.verdict), Some("allow"));
        assert_eq!(c.after.as_ref().map(|d| d.verdict), Some("block"));
    }

    #[test]
    fn no_change_no_lines_and_a_masked_change_says_why() {
        assert!(diff(|t| t.to_owned()).is_empty());
        // A keyword that an injection phrase already blocks changes nothing visible.
        let masked = diff(|t| {
            t.replace(
                "keywords: [project-bluebird, internal-only]",
                "keywords: [project-bluebird, internal-only, ignore all previous instructions]",
            )
        });
        assert_eq!(masked.len(), 1);
        assert!(masked[0].example.is_none());
        assert!(
            masked[0].note.contains("both versions decide block"),
            "{masked:?}"
        );
    }
}
