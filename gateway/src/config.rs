//! The policy config (`policy-config.yaml`): strict parsing, then validation into a typed value.
//!
//! Unknown keys and wrong types are errors with the line and column serde_yaml reports;
//! cross-field rules (every chained kind has settings, no settings without a chain entry)
//! are checked after parsing. Nothing here touches the running gateway: a config is
//! swapped in only once it parsed and validated completely.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Largest config file accepted; anything bigger is refused before parsing.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// Policy kinds this gateway knows how to evaluate.
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
    policy: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    providers: RawProviders,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProviders {
    #[serde(default)]
    targets: Vec<ProviderTarget>,
}

/// One upstream model provider the gateway may forward to.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProviderTarget {
    pub id: String,
    pub provider: String,
    pub model: String,
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

/// A validated policy config, with the identity the fleet tracks it by.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub pack_name: String,
    /// The operator-facing version label (`pack.version`).
    pub version: String,
    pub enabled: bool,
    pub chain: Vec<String>,
    pub settings: BTreeMap<String, serde_yaml::Value>,
    pub providers: Vec<ProviderTarget>,
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

    /// Parses and validates config bytes; `source` names them in errors.
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
        let errors = validate(&raw);
        if !errors.is_empty() {
            return Err(fail(errors));
        }
        Ok(PolicyConfig {
            pack_name: raw.pack.name,
            version: raw.pack.version,
            enabled: raw.pack.enabled,
            chain: raw.policies.chain,
            settings: raw.policy,
            providers: raw.providers.targets,
            hash: content_hash(bytes),
        })
    }
}

/// The content address of config bytes: `sha256:<lowercase hex>`.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn validate(raw: &RawConfig) -> Vec<String> {
    let mut errors = Vec::new();
    if raw.pack.name.trim().is_empty() {
        errors.push("pack.name: must not be empty".to_owned());
    }
    if !is_semver(&raw.pack.version) {
        errors.push(format!(
            "pack.version: {:?} is not a SemVer version (MAJOR.MINOR.PATCH)",
            raw.pack.version
        ));
    }
    let mut seen = Vec::new();
    for kind in &raw.policies.chain {
        if !KNOWN_KINDS.contains(&kind.as_str()) {
            errors.push(format!(
                "policies.chain: unknown policy kind {kind:?}, expected one of {}",
                KNOWN_KINDS.join(", ")
            ));
        } else if seen.contains(&kind) {
            errors.push(format!("policies.chain: {kind:?} is listed twice"));
        } else if !raw.policy.contains_key(kind) {
            errors.push(format!(
                "policies.chain: {kind:?} has no settings under policy.{kind}"
            ));
        }
        seen.push(kind);
    }
    for kind in raw.policy.keys() {
        if !raw.policies.chain.contains(kind) {
            errors.push(format!(
                "policy.{kind}: settings for a kind that is not in policies.chain"
            ));
        }
    }
    let mut ids = Vec::new();
    for (i, target) in raw.providers.targets.iter().enumerate() {
        if target.id.trim().is_empty() {
            errors.push(format!("providers.targets[{i}].id: must not be empty"));
        } else if ids.contains(&&target.id) {
            errors.push(format!(
                "providers.targets[{i}].id: {:?} is used twice",
                target.id
            ));
        }
        ids.push(&target.id);
        if !(target.base_url.starts_with("http://") || target.base_url.starts_with("https://")) {
            errors.push(format!(
                "providers.targets[{i}].base_url: {:?} is not an http(s) URL",
                target.base_url
            ));
        }
    }
    errors
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
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = VALID.replace("  version: 1.2.0", "  version: 1.2.0\n  colour: red");
        let err = PolicyConfig::parse("t.yaml", text.as_bytes()).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("t.yaml"), "{msg}");
        assert!(msg.contains("colour"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn cross_field_rules_are_all_reported() {
        let text = "\
pack: {name: x, version: one}
policies:
  chain: [pii-detector, teleport]
policy:
  dlp-filter: {}
";
        let err = PolicyConfig::parse("t.yaml", text.as_bytes()).expect_err("invalid");
        assert_eq!(err.errors.len(), 4, "{err}");
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
}
