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

use crate::policy::Chain;
use crate::sections;

pub use kt_contract::{MAX_CONFIG_BYTES, content_hash};

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
    /// Takes the kinds set in `other` (each kind of a file parsed on its own).
    fn absorb(&mut self, other: PolicySettings) {
        self.prompt_injection = self.prompt_injection.take().or(other.prompt_injection);
        self.pii_detector = self.pii_detector.take().or(other.pii_detector);
        self.dlp_filter = self.dlp_filter.take().or(other.dlp_filter);
        self.model_allowlist = self.model_allowlist.take().or(other.model_allowlist);
        self.request_limits = self.request_limits.take().or(other.request_limits);
    }

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
    /// `policies.chain` as written, and each kind's settings: what the chain was compiled from
    /// (`ktctl config diff --semantic` compares them).
    pub chain_names: Vec<String>,
    pub settings: PolicySettings,
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
        let (raw, unparsed, mut errors) = match serde_yaml::from_str::<RawConfig>(text) {
            Ok(raw) => (raw, Unparsed::default(), Vec::new()),
            Err(whole) => {
                // Not YAML at all: there is nothing more to say than where it broke.
                if serde_yaml::from_str::<serde_yaml::Value>(text).is_err() {
                    return Err(fail(vec![whole.to_string()]));
                }
                // Each block on its own, so that every mistake is reported in this one pass.
                parse_blocks(text)
            }
        };
        errors.extend(validate(&raw, &unparsed, text));
        let chain = if unparsed.0.is_empty() {
            match Chain::compile(&raw.policies.chain, &raw.policy) {
                Ok(chain) => Some(chain),
                Err(compile_errors) => {
                    errors.extend(
                        compile_errors
                            .into_iter()
                            .map(|e| with_location(text, "policy", &e.needle, e.message)),
                    );
                    None
                }
            }
        } else {
            None
        };
        match chain {
            Some(chain) if errors.is_empty() => Ok(PolicyConfig {
                pack_name: raw.pack.name,
                version: raw.pack.version,
                enabled: raw.pack.enabled,
                chain: Arc::new(chain),
                chain_names: raw.policies.chain,
                settings: raw.policy,
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

/// The blocks that did not deserialize (`pack`, `policy.dlp-filter`, ...): the rules about
/// them are not checked, since their values are not known.
#[derive(Debug, Default)]
struct Unparsed(Vec<String>);

impl Unparsed {
    fn has(&self, block: &str) -> bool {
        self.0.iter().any(|b| b == block)
    }
}

const SECTIONS: [&str; 5] = ["pack", "policies", "policy", "providers", "cache"];

/// Deserializes each top-level block (and each kind under `policy`) on its own: every block
/// that fails says why, located in the file; the others are validated as usual.
fn parse_blocks(text: &str) -> (RawConfig, Unparsed, Vec<String>) {
    let mut errors = Vec::new();
    let mut unparsed = Unparsed::default();
    let top = sections::top_level(text);
    for block in top.iter().filter(|b| !SECTIONS.contains(&b.key.as_str())) {
        errors.push(format!(
            "unknown top-level key `{}`, expected one of {} at line {} column 1",
            block.key,
            SECTIONS.join(", "),
            block.lines.start + 1
        ));
    }
    let block = |key: &str| top.iter().find(|b| b.key == key);
    let mut one = |key: &str, required: bool| -> Option<&sections::Block> {
        let found = block(key);
        if found.is_none() && required {
            errors.push(format!("missing top-level key `{key}`"));
            unparsed.0.push(key.to_owned());
        }
        found
    };
    let (pack, policies, providers, cache) = (
        one("pack", true),
        one("policies", true),
        one("providers", false),
        one("cache", false),
    );
    let mut decoded = Decoded {
        text,
        errors: &mut errors,
        unparsed: &mut unparsed,
    };
    let pack: Option<RawPack> = decoded.block("pack", pack.map(|b| vec![b.lines.clone()]));
    let policies: Option<RawPolicies> =
        decoded.block("policies", policies.map(|b| vec![b.lines.clone()]));
    let providers: Option<RawProviders> =
        decoded.block("providers", providers.map(|b| vec![b.lines.clone()]));
    let cache: Option<CacheSettings> = decoded.block("cache", cache.map(|b| vec![b.lines.clone()]));
    let mut policy = PolicySettings::default();
    if let Some(section) = block("policy") {
        let kinds = sections::children(text, section);
        if kinds.is_empty() {
            policy = decoded
                .block("policy", Some(vec![section.lines.clone()]))
                .unwrap_or_default();
        }
        let header = section.lines.start..section.lines.start + 1;
        for kind in kinds {
            let name = format!("policy.{}", kind.key);
            let lines = vec![header.clone(), kind.lines.clone()];
            if let Some(settings) = decoded.block::<PolicySettings>(&name, Some(lines)) {
                policy.absorb(settings);
            }
        }
    }
    let raw = RawConfig {
        pack: pack.unwrap_or_else(|| RawPack {
            name: String::new(),
            version: String::new(),
            enabled: true,
        }),
        policies: policies.unwrap_or(RawPolicies { chain: Vec::new() }),
        policy,
        providers: providers.unwrap_or_default(),
        cache: cache.unwrap_or_default(),
    };
    (raw, unparsed, errors)
}

/// Deserializes blocks of one text, recording what fails.
struct Decoded<'a> {
    text: &'a str,
    errors: &'a mut Vec<String>,
    unparsed: &'a mut Unparsed,
}

impl Decoded<'_> {
    /// The value under the single top-level key left when only `lines` are kept.
    fn block<T: serde::de::DeserializeOwned>(
        &mut self,
        name: &str,
        lines: Option<Vec<std::ops::Range<usize>>>,
    ) -> Option<T> {
        let lines = lines?;
        let keep: Vec<&std::ops::Range<usize>> = lines.iter().collect();
        let masked = sections::masked(self.text, &keep);
        match serde_yaml::from_str::<BTreeMap<String, T>>(&masked) {
            Ok(map) => map.into_values().next(),
            Err(error) => {
                self.errors.push(error.to_string());
                self.unparsed.0.push(name.to_owned());
                None
            }
        }
    }
}

fn validate(raw: &RawConfig, unparsed: &Unparsed, text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |section: &str, needle: &str, message: String| {
        errors.push(with_location(text, section, needle, message))
    };
    if !unparsed.has("pack") && raw.pack.name.trim().is_empty() {
        err("pack", "name", "pack.name: must not be empty".to_owned());
    }
    if !unparsed.has("pack") && !is_semver(&raw.pack.version) {
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
    let chain: &[String] = if unparsed.has("policies") {
        &[]
    } else {
        &raw.policies.chain
    };
    for kind in chain {
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
        } else if !raw.policy.has(kind)
            && !unparsed.has("policy")
            && !unparsed.has(&format!("policy.{kind}"))
        {
            err(
                "policies",
                kind,
                format!("policies.chain: {kind:?} has no settings under policy.{kind}"),
            );
        }
        seen.push(kind);
    }
    for kind in KNOWN_KINDS {
        if raw.policy.has(kind) && !unparsed.has("policies") && !chain.iter().any(|k| k == kind) {
            err(
                "policy",
                kind,
                format!("policy.{kind}: settings for a kind that is not in policies.chain"),
            );
        }
    }
    let providers_known = !unparsed.has("providers");
    if providers_known && raw.providers.targets.is_empty() {
        err(
            "providers",
            "targets",
            "providers.targets: at least one provider target is required (allowed requests would have nowhere to go)".to_owned(),
        );
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
    if !unparsed.has("cache") && raw.cache.enabled && raw.cache.max_entries == 0 {
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
providers:
  targets:
  - {id: mock, provider: mock, model: m, base_url: \"http://127.0.0.1:9\"}
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
        assert_eq!(err.errors.len(), 5, "{err}");
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
    fn every_mistake_is_reported_in_one_pass() {
        let text = "\
pack:
  name: x
  version: 1.0.0
  colour: red
policies:
  chain: [prompt-injection, pii-detector, teleport]
policy:
  prompt-injection:
    phrase_list: [a]
  pii-detector:
    action: shred
providers:
  request_timeout: forever
cahce: {enabled: true}
";
        let err = PolicyConfig::parse("t.yaml", text.as_bytes()).expect_err("invalid");
        let all = err.to_string();
        for expected in [
            ("colour", "line 4"),
            ("phrase_list", "line 9"),
            ("shred", "line 11"),
            ("forever", "line 13"),
            ("cahce", "line 14"),
            ("\"teleport\"", "line 6"),
        ] {
            assert!(
                err.errors
                    .iter()
                    .any(|e| e.contains(expected.0) && e.contains(expected.1)),
                "{expected:?} not in:\n{all}"
            );
        }
        assert_eq!(err.errors.len(), 6, "{all}");
        assert!(all.lines().all(|l| l.starts_with("t.yaml: ")), "{all}");
    }

    #[test]
    fn a_config_without_a_provider_target_is_refused() {
        let text = VALID.split("providers:").next().expect("head").to_owned();
        let err = PolicyConfig::parse("t.yaml", text.as_bytes()).expect_err("no target");
        assert!(err.to_string().contains("providers.targets"), "{err}");
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
