//! The etcd key layout, all under the configured prefix. One place names every key, so that
//! who writes what can be read off one file.

/// Key names under one prefix (`/kt-fleet` by default).
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// `<prefix>/<kind>/`: every key of one kind.
    pub fn all(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix)
    }

    /// `<prefix>/<kind>/<name>`.
    pub fn one(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.prefix)
    }

    /// The name in a key of `kind`, if the key is one.
    pub fn name_in<'a>(&self, kind: &str, key: &'a [u8]) -> Option<&'a str> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&self.all(kind))
    }

    /// The election's name; candidates' keys are `<prefix>/election/<lease>`.
    pub fn election(&self) -> String {
        format!("{}/election", self.prefix)
    }
}

/// Kinds of keys, each with its writer.
pub mod kind {
    /// Config version metadata (JSON), by hash; any replica (content-addressed, written once).
    pub const CONFIG_META: &str = "config-meta";
    /// Config version bytes, by hash; any replica, with its metadata.
    pub const CONFIG_CONTENT: &str = "config-content";
    /// Rollout records (JSON), by zero-padded number; the leader, fenced.
    pub const ROLLOUT: &str = "rollout";
    /// Desired config per gateway; the leader, fenced.
    pub const DESIRED: &str = "desired";
    /// Pins per gateway; the leader, fenced.
    pub const PIN: &str = "pin";
    /// What each group should run; the leader, fenced.
    pub const GROUP_INTENT: &str = "group-intent";
    /// Group definitions; any replica (operators and groups files).
    pub const GROUP: &str = "group";
    /// Audit lines, by time, replica and a counter; any replica.
    pub const AUDIT: &str = "audit";
    /// Versions a gateway refused: `<hash>/<gateway>`; any replica.
    pub const REJECTION: &str = "rejection";
    /// Join tokens (JSON, the secret's hash only), by id; any replica.
    pub const JOIN_TOKEN: &str = "join-token";
    /// Revoked agent identities (JSON), by gateway id; any replica.
    pub const REVOCATION: &str = "agent-revocation";
    /// Shadow runs (protobuf `ShadowRun`), by id; the leader, fenced.
    pub const SHADOW_RUN: &str = "shadow-run";
    /// Live replicas, under each one's lease; each replica its own.
    pub const REPLICA: &str = "replica";
    /// Fleet records per gateway, under the lease of the replica holding its session.
    pub const FLEET: &str = "fleet";
    /// The leader's view of each gateway (desired, holder, sync), under its lease; fenced.
    pub const VIEW: &str = "view";
    /// Offers per gateway; the leader, fenced. The replica holding the session delivers them.
    pub const OFFER: &str = "offer";
    /// Agents' answers per gateway; the replica holding the session. The leader reads them.
    pub const ANSWER: &str = "answer";
    /// Operator requests for the leader's engine; any replica.
    pub const REQUEST: &str = "request";
    /// A push's config bytes, beside its request.
    pub const REQUEST_CONTENT: &str = "request-content";
    /// The leader's replies to requests, under the requester's lease.
    pub const REPLY: &str = "reply";
    /// The decision counters counted from the event stream and the stream position they
    /// count through, by stream name; the leader, fenced (`events.nats`).
    pub const COUNTERS: &str = "counters";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_back_out_of_their_keys_only() {
        let keys = Keys::new("/kt-fleet/");
        let key = keys.one(kind::FLEET, "gw-1");
        assert_eq!(key, "/kt-fleet/fleet/gw-1");
        assert_eq!(keys.name_in(kind::FLEET, key.as_bytes()), Some("gw-1"));
        assert_eq!(keys.name_in(kind::OFFER, key.as_bytes()), None);
        assert_eq!(keys.name_in(kind::FLEET, b"\xff"), None);
    }
}
