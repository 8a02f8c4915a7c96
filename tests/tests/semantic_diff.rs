//! `ktctl config diff A B --semantic` on the example policy and a modified copy: every change is
//! listed in policy terms, each with an example whose verdict really changes (checked here
//! again by running both versions' chains on it).

use kt_e2e::output_text;
use kt_gateway::config::PolicyConfig;
use kt_gateway::policy::{Input, MessageText};
use serde_json::Value;

const EXAMPLE: &str = include_str!("../../deploy/examples/policy-config.yaml");

fn verdict(config: &PolicyConfig, example: &Value) -> &'static str {
    let model = example["model"].as_str().expect("model");
    let mut input = Input {
        model,
        provider: config
            .providers
            .iter()
            .find(|p| p.model == model)
            .map(|p| p.provider.as_str()),
        max_tokens: example["max_tokens"].as_u64(),
        messages: vec![MessageText {
            role: "user".into(),
            text: example["prompt"].as_str().expect("prompt").into(),
        }],
    };
    config.chain.evaluate(&mut input).verdict.as_str()
}

#[test]
fn each_change_is_listed_with_an_example_that_really_flips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let modified = EXAMPLE
        .replace("version: 1.0.0", "version: 1.1.0")
        .replace(
            "      - ignore all previous instructions\n",
            "      - ignore all previous instructions\n      - the weather\n",
        )
        .replace("      - you are now in developer mode\n", "")
        .replace(
            "keywords: [project-bluebird, internal-only]",
            "keywords: [project-bluebird, internal-only, quarterly-forecast]",
        )
        .replace(
            "    action: redact\n    detect: [email, phone, credit-card, us-ssn, iban]",
            "    action: block\n    detect: [email, phone, credit-card, us-ssn]",
        )
        .replace(
            "models: [mock-small, mock-large]",
            "models: [mock-small, mock-tiny]",
        )
        .replace("max_tokens: 4096", "max_tokens: 1024");
    assert_ne!(modified, EXAMPLE);
    let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    std::fs::write(&a, EXAMPLE).expect("a");
    std::fs::write(&b, &modified).expect("b");
    let (a, b) = (a.display().to_string(), b.display().to_string());
    // Files need no coordinator: a config that names none must not be needed.
    let ktctl = |args: &[&str]| kt_e2e::ktctl(&dir.path().join("no-such-ktctl.yaml"), args);

    let out = ktctl(&["config", "diff", &a, &b, "--semantic", "-o", "json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let changes: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let old = PolicyConfig::parse("a", EXAMPLE.as_bytes()).expect("a valid");
    let new = PolicyConfig::parse("b", modified.as_bytes()).expect("b valid");
    let expected = [
        (
            "prompt-injection",
            "phrase added: \"the weather\"",
            "allow",
            "block",
        ),
        (
            "prompt-injection",
            "phrase removed: \"you are now in developer mode\"",
            "block",
            "allow",
        ),
        (
            "dlp-filter",
            "keyword added: \"quarterly-forecast\"",
            "allow",
            "block",
        ),
        (
            "pii-detector",
            "email moved from redact to block",
            "redact",
            "block",
        ),
        (
            "pii-detector",
            "phone moved from redact to block",
            "redact",
            "block",
        ),
        (
            "pii-detector",
            "credit-card moved from redact to block",
            "redact",
            "block",
        ),
        (
            "pii-detector",
            "us-ssn moved from redact to block",
            "redact",
            "block",
        ),
        (
            "pii-detector",
            "iban moved from redact to not detected",
            "redact",
            "allow",
        ),
        (
            "model-allowlist",
            "model allowed: mock-tiny",
            "block",
            "allow",
        ),
        (
            "model-allowlist",
            "model dropped: mock-large",
            "allow",
            "block",
        ),
        (
            "request-limits",
            "max_tokens 4096 → 1024 (tightened)",
            "allow",
            "block",
        ),
    ];
    assert_eq!(changes.len(), expected.len(), "{changes:#?}");
    for (policy, what, before, after) in expected {
        let change = changes
            .iter()
            .find(|c| {
                c["policy"] == policy && c["what"].as_str().is_some_and(|w| w.starts_with(what))
            })
            .unwrap_or_else(|| panic!("{policy}: {what} not listed in {changes:#?}"));
        let example = &change["example"];
        assert!(example.is_object(), "no example for {what}: {change:#}");
        assert_eq!(change["before"]["verdict"], before, "{change:#}");
        assert_eq!(change["after"]["verdict"], after, "{change:#}");
        // The example really flips: both chains, run here on it.
        assert_eq!(verdict(&old, example), before, "{what}: {example}");
        assert_eq!(verdict(&new, example), after, "{what}: {example}");
    }

    let text = output_text(&ktctl(&["config", "diff", &a, &b, "--semantic"]));
    assert!(
        text.contains("phrase added: \"the weather\"") && text.contains("checked  allow → block"),
        "{text}"
    );
    let same = output_text(&ktctl(&["config", "diff", &a, &a, "--semantic"]));
    assert!(same.contains("none: both versions decide alike"), "{same}");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "pack: [").expect("broken");
    let out = ktctl(&[
        "config",
        "diff",
        &a,
        &broken.display().to_string(),
        "--semantic",
    ]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("broken.yaml"),
        "{}",
        output_text(&out)
    );
}
