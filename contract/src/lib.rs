//! The gateway contract: what any gateway kt-agent manages must honour, shared by the
//! reference gateway, the agent and the coordinator without any wire (gRPC) types.
//!
//! - the health document (`GET <health_url>`, JSON): `kt-gateway` serves it and `kt-agent`
//!   reads it. Reading is lenient (unknown fields are ignored, missing ones default) so that
//!   the agent can manage any gateway that honours the contract, including newer ones;
//! - a config's identity: [`content_hash`] of its exact bytes;
//! - the size limits of a policy config ([`MAX_CONFIG_BYTES`]) and of one decision event
//!   ([`MAX_EVENT_BYTES`]);
//! - the fields of a decision event the fleet reads ([`DecisionFields`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The largest policy config a gateway loads, an agent applies or the coordinator stores.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// The fields of a decision event (one JSON object per line of the gateway's events file) that
/// the fleet reads: the coordinator indexes them for tails and counts them for the rollout gates.
/// A gateway may write more; missing ones read as empty. Strings are borrowed from the line
/// where JSON allows (no escapes), so reading allocates only what is kept.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct DecisionFields<'a> {
    /// allow | block | redact | escalate
    #[serde(borrow)]
    pub verdict: Cow<'a, str>,
    #[serde(borrow)]
    pub reason_code: Cow<'a, str>,
    #[serde(borrow)]
    pub config_version: Cow<'a, str>,
    /// `sha256:` of the config the request was decided on.
    #[serde(borrow)]
    pub config_hash: Cow<'a, str>,
    /// The HTTP status answered (5xx counts for the error-rate gate).
    pub status: u16,
    /// A synthetic probe (`x-kt-synthetic` with the probe token): never counted.
    pub synthetic: bool,
    #[serde(borrow)]
    pub policies_evaluated: Vec<PolicyOutcome<'a>>,
    /// SHA-256 of the prompt (never the prompt itself).
    #[serde(borrow)]
    pub prompt_sha256: Cow<'a, str>,
    /// What the shadow config would have decided; absent without a shadow.
    #[serde(borrow)]
    pub shadow: Option<ShadowFields<'a>>,
}

/// A decision event's `shadow`: the shadow config's verdict on the same request.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ShadowFields<'a> {
    #[serde(borrow)]
    pub config_hash: Cow<'a, str>,
    /// allow | block | redact | escalate
    #[serde(borrow)]
    pub verdict: Cow<'a, str>,
    /// The policy whose verdict it was; empty for `allow`.
    #[serde(borrow)]
    pub policy: Cow<'a, str>,
    #[serde(borrow)]
    pub reason_code: Cow<'a, str>,
}

/// One policy's result in a decision event.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PolicyOutcome<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// allow | block | redact | escalate
    #[serde(borrow)]
    pub result: Cow<'a, str>,
}

/// `sha256:<hex>` of a config's exact bytes: how gateways report what they run and how the
/// coordinator names versions.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The largest decision event (one line of the events file) that travels: agents skip larger
/// lines as invalid, the coordinator refuses larger events.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Healthy,
    Degraded,
    #[default]
    Unhealthy,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthDoc {
    pub status: HealthStatus,
    pub uptime_seconds: u64,
    pub version: String,
    pub gateway_id: Option<String>,
    pub config: ConfigDoc,
    pub providers: BTreeMap<String, ProviderDoc>,
    pub policies_loaded: u32,
    /// False when the policy pack is disabled and everything passes through unchecked.
    #[serde(default = "enabled_by_default")]
    pub pack_enabled: bool,
    pub requests_processed: u64,
    /// Requests answered with a server error (5xx).
    pub errors: u64,
    pub verdicts: VerdictsDoc,
    pub cache: CacheDoc,
    /// The shadow config evaluated beside the active one, deciding nothing; absent when none
    /// is loaded (and none was refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowDoc>,
}

/// A shadow config as `/health` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShadowDoc {
    pub version: String,
    /// Empty when none is loaded (the last one offered was refused).
    pub hash: String,
    /// Since when, RFC 3339, UTC.
    pub loaded_at: String,
    pub last_reload_error: Option<String>,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigDoc {
    pub version: String,
    pub hash: String,
    /// RFC 3339, UTC.
    pub loaded_at: String,
    pub last_reload_error: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    Reachable,
    #[default]
    Unreachable,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProviderDoc {
    pub status: Reachability,
    pub latency_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerdictsDoc {
    pub allow: u64,
    pub block: u64,
    pub redact: u64,
    pub escalate: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheDoc {
    pub entries: u64,
    pub hit_rate_pct: f64,
}
