//! The policy config (`policy-config.yaml`): strict parsing, then validation into a typed value.
//!
//! Unknown keys and wrong types are errors with the line and column serde_yaml reports;
//! cross-field rules (every chained kind has settings, no settings without a chain entry,
//! patterns that compile) are checked after parsing and located in the text. Nothing here
//! touches the running gateway: a config is swapped in only once it parsed, validated and
//! compiled completely.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::policy::Chain;

/// Largest config file accepted; anything bigger is refused before parsing.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// Policy kinds, in the spelling the config uses.
pub const KNOWN_KINDS: &[&str] = &[
    "prompt-injection",
    "pii-detector",
    "dlp-filter",
    "model-allowlist",
    "request-limits",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    pack: RawPack,
    policies: RawPolicies,
    #[serde(default)]
    policy: PolicySettings,
    #[serde(default)]
    providers: RawProviders,
    #[serde(default)]
    cache: CacheSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPack {
    name: String,
    version: String,
    #[serde(default = "default_true")]
    enabled: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicies {
    chain: Vec<String>,
}

/// `policy.<kind>` settings; a kind not listed here is an unknown key.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    #[serde(rename = "prompt-injection")]
    pub prompt_injection: Option<PromptInjectionSettings>,
    #[serde(rename = "pii-detector")]
    pub pii_detector: Option<PiiSettings>,
    #[serde(rename = "dlp-filter")]
    pub dlp_filter: Option<DlpSettings>,
    #[serde(rename = "model-allowlist")]
    pub model_allowlist: Option<ModelAllowlistSettings>,
    #[serde(rename = "request-limits")]
    pub request_limits: Option<RequestLimitsSettings>,
}

impl PolicySettings {
    fn has(&self, kind: &str) -> bool {
        match kind {
            "prompt-injection" => self.prompt_injection.is_some(),
            "pii-detector" => self.pii_detector.is_some(),
            "dlp-filter" => self.dlp_filter.is_some(),
            "model-allowlist" => self.model_allowlist.is_some(),
            "request-limits" => self.request_limits.is_some(),
            _ => false,
        }
    }
}

/// Phrases (case-insensitive substrings) and regexes that mark a prompt-injection attempt in
/// user and system messages.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptInjectionSettings {
    #[serde(default)]
    pub phrases: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PiiKind {
    Email,
    Phone,
    CreditCard,
    UsSsn,
    Iban,
}

impl PiiKind {
    pub const ALL: [PiiKind; 5] = [
        PiiKind::Email,
        PiiKind::Phone,
        PiiKind::CreditCard,
        PiiKind::UsSsn,
        PiiKind::Iban,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::CreditCard => "credit-card",
            PiiKind::UsSsn => "us-ssn",
            PiiKind::Iban => "iban",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PiiAction {
    Redact,
    Block,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiSettings {
    pub action: PiiAction,
    /// Which detectors run; all of them when omitted.
    #[serde(default = "all_pii")]
    pub detect: Vec<PiiKind>,
}

fn all_pii() -> Vec<PiiKind> {
    PiiKind::ALL.to_vec()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DlpAction {
    Block,
    Escalate,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlpSettings {
    pub action: DlpAction,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAllowlistSettings {
    /// Models allowed from any provider.
    #[serde(default)]
    pub models: Vec<String>,
    /// Models allowed only from the named provider (`openai: [gpt-4o]`).
    #[serde(default)]
    pub per_provider: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLimitsSettings {
    /// Total bytes of message text in one request.
    pub max_prompt_bytes: Option<usize>,
    /// The largest `max_tokens` (or `max_completion_tokens`) a request may ask for.
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProviders {
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    request_timeout: Duration,
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    probe_interval: Duration,
    #[serde(default)]
    targets: Vec<ProviderTarget>,
}

impl Default for RawProviders {
    fn default() -> Self {
        RawProviders {
            request_timeout: default_request_timeout(),
            probe_interval: default_probe_interval(),
            targets: Vec::new(),
        }
    }
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(10)
}

/// One upstream model provider the gateway may forward to.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProviderTarget {
    pub id: String,
    pub provider: String,
    pub model: String,
    /// The OpenAI-compatible API root, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    #[serde(default)]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// Where a provider's API key comes from; the key itself never sits in the config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    pub env: String,
}

/// The optional exact-match response cache for non-streaming requests.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    pub enabled: bool,
    pub max_entries: usize,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: false,
            max_entries: 1000,
            ttl: Duration::from_secs(300),
        }
    }
}

/// A validated, compiled policy config, with the identity the fleet tracks it by.
#[derive(Debug)]
pub struct PolicyConfig {
    pub pack_name: String,
    /// The operator-facing version label (`pack.version`).
    pub version: String,
    pub enabled: bool,
    /// The compiled policy chain, in priority order.
    pub chain: Arc<Chain>,
    pub providers: Vec<ProviderTarget>,
    pub request_timeout: Duration,
    pub probe_interval: Duration,
    pub cache: CacheSettings,
    /// `sha256:<hex>` of the exact bytes loaded: the content address of this config.
    pub hash: String,
}

/// Everything wrong with a config file, reported together.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    pub source: String,
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {error}", self.source)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl PolicyConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigErrors {
            source: source.clone(),
            errors: vec![format!("cannot read: {e}")],
        })?;
        Self::parse(&source, &bytes)
    }

    /// Parses, validates and compiles config bytes; `source` names them in errors.
    pub fn parse(source: &str, bytes: &[u8]) -> Result<Self, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            source: source.to_owned(),
            errors,
        };
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(fail(vec![format!(
                "file is {} bytes, the limit is {MAX_CONFIG_BYTES}",
                bytes.len()
            )]));
        }
        let text =
            std::str::from_utf8(bytes).map_err(|e| fail(vec![format!("not valid UTF-8: {e}")]))?;
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| fail(vec![e.to_string()]))?;
        let mut errors = validate(&raw, text);
        let chain = match Chain::compile(&raw.policies.chain, &raw.policy) {
            Ok(chain) => Some(chain),
            Err(compile_errors) => {
                errors.extend(
                    compile_errors
                        .into_iter()
                        .map(|e| with_location(text, "policy", &e.needle, e.message)),
                );
                None
            }
        };
        match chain {
            Some(chain) if errors.is_empty() => Ok(PolicyConfig {
                pack_name: raw.pack.name,
                version: raw.pack.version,
                enabled: raw.pack.enabled,
                chain: Arc::new(chain),
                providers: raw.providers.targets,
                request_timeout: raw.providers.request_timeout,
                probe_interval: raw.providers.probe_interval,
                cache: raw.cache,
                hash: content_hash(bytes),
            }),
            _ => Err(fail(errors)),
        }
    }
}

/// The content address of config bytes: `sha256:<lowercase hex>`.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn validate(raw: &RawConfig, text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |section: &str, needle: &str, message: String| {
        errors.push(with_location(text, section, needle, message))
    };
    if raw.pack.name.trim().is_empty() {
        err("pack", "name", "pack.name: must not be empty".to_owned());
    }
    if !is_semver(&raw.pack.version) {
        err(
            "pack",
            "version",
            format!(
                "pack.version: {:?} is not a SemVer version (MAJOR.MINOR.PATCH)",
                raw.pack.version
            ),
        );
    }
    let mut seen = Vec::new();
    for kind in &raw.policies.chain {
        if !KNOWN_KINDS.contains(&kind.as_str()) {
            err(
                "policies",
                kind,
                format!(
                    "policies.chain: unknown policy kind {kind:?}, expected one of {}",
                    KNOWN_KINDS.join(", ")
                ),
            );
        } else if seen.contains(&kind) {
            err(
                "policies",
                kind,
                format!("policies.chain: {kind:?} is listed twice"),
            );
        } else if !raw.policy.has(kind) {
            err(
                "policies",
                kind,
                format!("policies.chain: {kind:?} has no settings under policy.{kind}"),
            );
        }
        seen.push(kind);
    }
    for kind in KNOWN_KINDS {
        if raw.policy.has(kind) && !raw.policies.chain.iter().any(|k| k == kind) {
            err(
                "policy",
                kind,
                format!("policy.{kind}: settings for a kind that is not in policies.chain"),
            );
        }
    }
    let mut ids = Vec::new();
    for (i, target) in raw.providers.targets.iter().enumerate() {
        if target.id.trim().is_empty() {
            err(
                "providers",
                "id",
                format!("providers.targets[{i}].id: must not be empty"),
            );
        } else if ids.contains(&&target.id) {
            err(
                "providers",
                &target.id,
                format!("providers.targets[{i}].id: {:?} is used twice", target.id),
            );
        }
        ids.push(&target.id);
        if !(target.base_url.starts_with("http://") || target.base_url.starts_with("https://")) {
            err(
                "providers",
                &target.base_url,
                format!(
                    "providers.targets[{i}].base_url: {:?} is not an http(s) URL",
                    target.base_url
                ),
            );
        }
    }
    if raw.providers.probe_interval < Duration::from_millis(100) {
        err(
            "providers",
            "probe_interval",
            "providers.probe_interval: must be at least 100ms".to_owned(),
        );
    }
    if raw.cache.enabled && raw.cache.max_entries == 0 {
        err(
            "cache",
            "max_entries",
            "cache.max_entries: must be positive when the cache is enabled".to_owned(),
        );
    }
    errors
}

/// Appends "at line L column C" when `needle` can be found in `section` of the text.
fn with_location(text: &str, section: &str, needle: &str, message: String) -> String {
    match locate(text, section, needle) {
        Some((line, column)) => format!("{message} at line {line} column {column}"),
        None => message,
    }
}

/// Finds `needle` as a key, list item or flow-list entry inside the top-level `section`.
///
/// serde_yaml reports positions only for syntax and type errors; rules checked after parsing
/// use this to point at the offending line. Returns 1-based line and column.
pub fn locate(text: &str, section: &str, needle: &str) -> Option<(usize, usize)> {
    let mut in_section = false;
    for (index, line) in text.lines().enumerate() {
        let top_level = !line.starts_with([' ', '\t', '#', '-']) && !line.trim().is_empty();
        if top_level {
            in_section = line
                .trim_end()
                .strip_prefix(section)
                .is_some_and(|rest| rest.starts_with(':'));
        }
        if !in_section || needle.is_empty() {
            continue;
        }
        let mut from = 0;
        while let Some(found) = line[from..].find(needle) {
            let start = from + found;
            let end = start + needle.len();
            let before = line[..start].chars().next_back();
            let after = line[end..].chars().next();
            let bounded_before =
                before.is_none_or(|c| matches!(c, ' ' | '[' | ',' | '-' | '"' | '\'' | '{'));
            let bounded_after =
                after.is_none_or(|c| matches!(c, ':' | ',' | ']' | ' ' | '"' | '\'' | '}'));
            if bounded_before && bounded_after {
                return Some((index + 1, start + 1));
            }
            from = end;
        }
    }
    None
}

/// `MAJOR.MINOR.PATCH` with an optional `-pre` or `+build` suffix.
fn is_semver(version: &str) -> bool {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
pack:
  name: baseline
  version: 1.2.0
policies:
  chain: [prompt-injection]
policy:
  prompt-injection:
    phrases: [\"ignore all previous instructions\"]
";

    #[test]
    fn valid_config_parses_with_its_hash() {
        let config = PolicyConfig::parse("t.yaml", VALID.as_bytes()).expect("valid");
        assert_eq!(config.version, "1.2.0");
        assert!(config.enabled);
        assert_eq!(config.hash, content_hash(VALID.as_bytes()));
        assert!(config.hash.starts_with("sha256:"));
        assert_eq!(config.chain.len(), 1);
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../deploy/examples/policy-config.yaml");
        let config = PolicyConfig::parse("example", text.as_bytes()).expect("example is valid");
        assert_eq!(config.chain.len(), KNOWN_KINDS.len());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = VALID.replace("  version: 1.2.0", "  version: 1.2.0\n  colour: red");
        let msg = PolicyConfig::parse("t.yaml", text.as_bytes())
            .expect_err("unknown key")
            .to_string();
        assert!(
            msg.contains("t.yaml") && msg.contains("colour") && msg.contains("line 4"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_setting_inside_a_kind_and_wrong_types_are_located() {
        let text = VALID.replace("    phrases:", "    phrase_list: []\n    phrases:");
        let msg = PolicyConfig::parse("t.yaml", text.as_bytes())
            .expect_err("unknown")
            .to_string();
        assert!(
            msg.contains("phrase_list") && msg.contains("line 8"),
            "{msg}"
        );
        let text = VALID.replace("  version: 1.2.0", "  version: 1.2.0\n  enabled: maybe");
        let msg = PolicyConfig::parse("t.yaml", text.as_bytes())
            .expect_err("type")
            .to_string();
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn cross_field_rules_are_all_reported_with_locations() {
        let text = "\
pack: {name: x, version: one}
policies:
  chain: [pii-detector, teleport]
policy:
  dlp-filter: {action: block}
";
        let err = PolicyConfig::parse("t.yaml", text.as_bytes()).expect_err("invalid");
        assert_eq!(err.errors.len(), 4, "{err}");
        let all = err.to_string();
        assert!(
            all.contains("pack.version") && all.contains("line 1"),
            "{all}"
        );
        assert!(
            all.contains("\"teleport\"") && all.contains("line 3 column 25"),
            "{all}"
        );
        assert!(
            all.contains("policy.dlp-filter") && all.contains("line 5 column 3"),
            "{all}"
        );
    }

    #[test]
    fn bad_regex_is_an_error_not_a_panic() {
        let text = VALID.replace(
            "    phrases: [\"ignore all previous instructions\"]",
            "    patterns: [\"(unclosed\"]",
        );
        let msg = PolicyConfig::parse("t.yaml", text.as_bytes())
            .expect_err("bad regex")
            .to_string();
        assert!(msg.contains("(unclosed") && msg.contains("line 8"), "{msg}");
    }

    #[test]
    fn truncated_and_garbage_inputs_are_errors() {
        for input in [&VALID.as_bytes()[..30], b"\xff\xfe", b"[1, 2", b""] {
            assert!(PolicyConfig::parse("t.yaml", input).is_err());
        }
    }

    #[test]
    fn semver_check() {
        assert!(is_semver("1.0.0"));
        assert!(is_semver("10.20.30-rc.1"));
        assert!(!is_semver("1.0"));
        assert!(!is_semver("v1.0.0"));
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = PolicyConfig::parse("fuzz", &bytes);
        }

        #[test]
        fn parser_never_panics_on_mutated_valid_text(cut in 0usize..VALID.len(), insert in "[ -~\n]{0,12}") {
            let mut text = VALID.to_owned();
            text.insert_str(cut, &insert);
            let _ = PolicyConfig::parse("fuzz", text.as_bytes());
        }
    }
}
