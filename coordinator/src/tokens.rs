//! Join tokens: what a new agent enrolls with. A token is `kt1.<id>.<secret>`: the id (64
//! random bits, hex) names it in listings and revocations; the secret (256 random bits, hex) is
//! shown once, at creation, and only its SHA-256 is stored. Defaults are the safe ones: one use,
//! one hour; a token that never expires must be asked for.

use std::collections::BTreeMap;
use std::time::Duration;

use kt_proto::identity::GatewayId;
use kt_proto::v1;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The prefix of every token, so a token in a log or a paste is recognisable (and versioned).
pub const TOKEN_PREFIX: &str = "kt1";
/// Bounds an operator can ask for.
pub const MAX_USES: u32 = 100_000;
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Who may enroll with a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Exactly this gateway id.
    Gateway(String),
    /// A gateway id the agent chooses, bound to this group.
    Group(String),
    /// A gateway id the agent chooses, whose labels must match.
    Selector(BTreeMap<String, String>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub at_unix_ms: u64,
    pub by: String,
    pub reason: String,
}

/// A token as stored: never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub scope: Scope,
    pub created_unix_ms: u64,
    /// None: never expires.
    pub expires_unix_ms: Option<u64>,
    pub uses: u32,
    pub uses_left: u32,
    pub created_by: String,
    pub revoked: Option<Revocation>,
}

/// Whether a token can be used now, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    Expired,
    UsedUp,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Expired => "expired",
            TokenState::UsedUp => "used_up",
            TokenState::Revoked => "revoked",
        }
    }
}

/// What an operator asks for.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub scope: Scope,
    /// None: never expires.
    pub ttl: Option<Duration>,
    pub uses: u32,
}

impl NewToken {
    /// Reads and checks a request: exactly one scope, a valid gateway id or label selector, uses
    /// and lifetime within bounds, and no unbounded lifetime unless asked for explicitly.
    pub fn from_request(request: &v1::CreateJoinTokenRequest) -> Result<Self, String> {
        let scope = request.scope.clone().unwrap_or_default();
        let scope = match (
            scope.gateway_id.is_empty(),
            scope.group.is_empty(),
            scope.selector.is_empty(),
        ) {
            (false, true, true) => {
                GatewayId::new(&scope.gateway_id)
                    .map_err(|why| format!("gateway id {:?}: {why}", scope.gateway_id))?;
                Scope::Gateway(scope.gateway_id)
            }
            (true, false, true) => Scope::Group(scope.group),
            (true, true, false) => {
                for (key, value) in &scope.selector {
                    kt_proto::bounds::check_label(key, value)
                        .map_err(|why| format!("selector {key}={value}: {why}"))?;
                }
                Scope::Selector(scope.selector.into_iter().collect())
            }
            _ => {
                return Err(
                    "a token is scoped to exactly one of: a gateway id, a group, a selector".into(),
                );
            }
        };
        if request.uses == 0 || request.uses > MAX_USES {
            return Err(format!("uses must be 1..={MAX_USES}"));
        }
        let ttl = match (request.never_expires, request.ttl_ms) {
            (true, 0) => None,
            (true, _) => return Err("a token with a lifetime cannot also never expire".into()),
            (false, 0) => {
                return Err(
                    "a token needs a lifetime (a token that never expires must be asked for explicitly)"
                        .into(),
                );
            }
            (false, ms) => {
                let ttl = Duration::from_millis(ms);
                if ttl > MAX_TTL {
                    return Err(format!(
                        "lifetime over {} days: ask for a token that never expires instead",
                        MAX_TTL.as_secs() / 86_400
                    ));
                }
                Some(ttl)
            }
        };
        Ok(NewToken {
            scope,
            ttl,
            uses: request.uses,
        })
    }

    /// The token's record and the token itself (shown once).
    pub fn issue(self, created_by: &str, now_unix_ms: u64) -> (JoinToken, String) {
        let id = hex::encode(rand::random::<[u8; 8]>());
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let record = JoinToken {
            id: id.clone(),
            secret_sha256: sha256_hex(&secret),
            scope: self.scope,
            created_unix_ms: now_unix_ms,
            expires_unix_ms: self.ttl.map(|ttl| {
                now_unix_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            }),
            uses: self.uses,
            uses_left: self.uses,
            created_by: created_by.to_owned(),
            revoked: None,
        };
        (record, format!("{TOKEN_PREFIX}.{id}.{secret}"))
    }
}

/// The refusal for a token that does not exist or whose secret does not match: the same words
/// for both, so a caller learns nothing about which ids exist.
pub const WRONG_TOKEN: &str =
    "the join token is wrong (no token has this id and secret); check the token file";

fn selector_text(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A token's id and secret, or why the text is not a token (without echoing the secret).
pub fn parse(token: &str) -> Result<(&str, &str), &'static str> {
    let mut parts = token.trim().splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(TOKEN_PREFIX), Some(id), Some(secret))
            if id.len() == 16
                && secret.len() == 64
                && id
                    .bytes()
                    .chain(secret.bytes())
                    .all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok((id, secret))
        }
        _ => Err("not a kt-fleet join token (kt1.<id>.<secret>)"),
    }
}

/// What a token admits: the gateway id the certificate will name, and the group to bind it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub gateway: GatewayId,
    pub group: Option<String>,
}

impl JoinToken {
    /// Whether this token (already found by its id) lets an agent with `secret`, asking for
    /// `asked` (empty: the token's own gateway id) with `labels`, enroll now; if not, why, in
    /// words the agent's operator can act on.
    pub fn admit(
        &self,
        secret: &str,
        asked: &str,
        labels: &BTreeMap<String, String>,
        now_unix_ms: u64,
    ) -> Result<Admitted, String> {
        if !self.secret_matches(secret) {
            return Err(WRONG_TOKEN.into());
        }
        match self.state(now_unix_ms) {
            TokenState::Valid => {}
            TokenState::Expired => {
                return Err(format!(
                    "join token {} expired at {}; ask an operator for a new one (ktctl token create)",
                    self.id,
                    kt_daemon::clock::rfc3339(self.expires_unix_ms.unwrap_or(0))
                ));
            }
            TokenState::UsedUp => {
                return Err(format!(
                    "join token {} is used up (it allowed {} enrollment{}); ask an operator for a new one (ktctl token create)",
                    self.id,
                    self.uses,
                    if self.uses == 1 { "" } else { "s" }
                ));
            }
            TokenState::Revoked => {
                let revoked = self.revoked.clone().unwrap_or(Revocation {
                    at_unix_ms: 0,
                    by: String::new(),
                    reason: String::new(),
                });
                return Err(format!(
                    "join token {} was revoked at {} by {} ({})",
                    self.id,
                    kt_daemon::clock::rfc3339(revoked.at_unix_ms),
                    revoked.by,
                    if revoked.reason.is_empty() {
                        "no reason given"
                    } else {
                        &revoked.reason
                    }
                ));
            }
        }
        let gateway =
            |id: &str| GatewayId::new(id).map_err(|why| format!("gateway id {id:?}: {why}"));
        match &self.scope {
            Scope::Gateway(id) if asked.is_empty() || asked == id => Ok(Admitted {
                gateway: gateway(id)?,
                group: None,
            }),
            Scope::Gateway(id) => Err(format!(
                "join token {} is for gateway {id}, not {asked}",
                self.id
            )),
            Scope::Group(_) | Scope::Selector(_) if asked.is_empty() => Err(format!(
                "join token {} is not for one gateway: say which gateway id to enroll (--gateway-id, or enrollment.gateway_id)",
                self.id
            )),
            Scope::Group(group) => Ok(Admitted {
                gateway: gateway(asked)?,
                group: Some(group.clone()),
            }),
            Scope::Selector(selector) => {
                let missing: Vec<String> = selector
                    .iter()
                    .filter(|(key, value)| labels.get(*key) != Some(*value))
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                if missing.is_empty() {
                    Ok(Admitted {
                        gateway: gateway(asked)?,
                        group: None,
                    })
                } else {
                    Err(format!(
                        "join token {} is for gateways labelled {}; this agent's labels lack {}",
                        self.id,
                        selector_text(selector),
                        missing.join(",")
                    ))
                }
            }
        }
    }

    /// This token with one use taken.
    pub fn used_once(&self) -> JoinToken {
        JoinToken {
            uses_left: self.uses_left.saturating_sub(1),
            ..self.clone()
        }
    }

    pub fn state(&self, now_unix_ms: u64) -> TokenState {
        if self.revoked.is_some() {
            TokenState::Revoked
        } else if self.expires_unix_ms.is_some_and(|at| now_unix_ms >= at) {
            TokenState::Expired
        } else if self.uses_left == 0 {
            TokenState::UsedUp
        } else {
            TokenState::Valid
        }
    }

    /// Whether `secret` is this token's, compared in constant time over the hashes.
    pub fn secret_matches(&self, secret: &str) -> bool {
        let given = sha256_hex(secret);
        given.len() == self.secret_sha256.len()
            && given
                .bytes()
                .zip(self.secret_sha256.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }

    pub fn to_proto(&self, now_unix_ms: u64) -> v1::JoinToken {
        let scope = match &self.scope {
            Scope::Gateway(id) => v1::JoinTokenScope {
                gateway_id: id.clone(),
                ..Default::default()
            },
            Scope::Group(group) => v1::JoinTokenScope {
                group: group.clone(),
                ..Default::default()
            },
            Scope::Selector(selector) => v1::JoinTokenScope {
                selector: selector.clone().into_iter().collect(),
                ..Default::default()
            },
        };
        let revoked = self.revoked.clone().unwrap_or(Revocation {
            at_unix_ms: 0,
            by: String::new(),
            reason: String::new(),
        });
        v1::JoinToken {
            id: self.id.clone(),
            scope: Some(scope),
            created_unix_ms: self.created_unix_ms,
            expires_unix_ms: self.expires_unix_ms.unwrap_or(0),
            uses: self.uses,
            uses_left: self.uses_left,
            created_by: self.created_by.clone(),
            revoked_unix_ms: revoked.at_unix_ms,
            revoked_by: revoked.by,
            revoked_reason: revoked.reason,
            state: self.state(now_unix_ms).as_str().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        scope: v1::JoinTokenScope,
        ttl_ms: u64,
        never: bool,
        uses: u32,
    ) -> v1::CreateJoinTokenRequest {
        v1::CreateJoinTokenRequest {
            scope: Some(scope),
            ttl_ms,
            never_expires: never,
            uses,
        }
    }

    fn gateway(id: &str) -> v1::JoinTokenScope {
        v1::JoinTokenScope {
            gateway_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_token_carries_256_secret_bits_stored_only_as_a_hash() {
        let new =
            NewToken::from_request(&request(gateway("gw-1"), 3_600_000, false, 1)).expect("ok");
        let (record, token) = new.issue("spiffe://td/operator/alice", 1_000);
        let (id, secret) = parse(&token).expect("parses");
        assert_eq!(id, record.id);
        assert_eq!(secret.len(), 64, "32 bytes of entropy, hex");
        assert!(
            !serde_json::to_string(&record)
                .expect("json")
                .contains(secret)
        );
        assert!(record.secret_matches(secret));
        assert!(!record.secret_matches(&"0".repeat(64)));
        assert_eq!(record.expires_unix_ms, Some(3_601_000));
        let (other, other_token) = NewToken::from_request(&request(gateway("gw-1"), 1, false, 1))
            .expect("ok")
            .issue("x", 0);
        assert_ne!((other.id, other_token), (record.id.clone(), token));
    }

    #[test]
    fn states_follow_revocation_expiry_and_uses() {
        let (mut record, _) = NewToken::from_request(&request(gateway("gw-1"), 1_000, false, 2))
            .expect("ok")
            .issue("x", 0);
        assert_eq!(record.state(999), TokenState::Valid);
        assert_eq!(record.state(1_000), TokenState::Expired);
        record.uses_left = 0;
        assert_eq!(record.state(0), TokenState::UsedUp);
        record.revoked = Some(Revocation {
            at_unix_ms: 1,
            by: "x".into(),
            reason: String::new(),
        });
        assert_eq!(record.state(0), TokenState::Revoked);
    }

    #[test]
    fn requests_out_of_bounds_are_refused_with_the_reason() {
        let both = v1::JoinTokenScope {
            gateway_id: "gw-1".into(),
            group: "prod".into(),
            ..Default::default()
        };
        let cases = [
            (request(both, 1_000, false, 1), "exactly one"),
            (
                request(v1::JoinTokenScope::default(), 1_000, false, 1),
                "exactly one",
            ),
            (request(gateway("Bad Id"), 1_000, false, 1), "gateway id"),
            (request(gateway("gw-1"), 0, false, 1), "explicitly"),
            (request(gateway("gw-1"), 1_000, true, 1), "cannot also"),
            (request(gateway("gw-1"), 1_000, false, 0), "uses"),
            (
                request(gateway("gw-1"), u64::MAX, false, 1),
                "lifetime over",
            ),
        ];
        for (request, says) in cases {
            let error = NewToken::from_request(&request).expect_err("refused");
            assert!(error.contains(says), "{error} (wanted {says:?})");
        }
        let never =
            NewToken::from_request(&request(gateway("gw-1"), 0, true, 1)).expect("asked for");
        assert_eq!(never.ttl, None);
    }

    #[test]
    fn admission_says_which_check_failed() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let issue = |scope| {
            let (record, token) = NewToken::from_request(&request(scope, 1_000, false, 1))
                .expect("ok")
                .issue("x", 0);
            let secret = parse(&token).expect("token").1.to_owned();
            (record, secret)
        };
        let none = labels(&[]);
        let (one, secret) = issue(gateway("gw-1"));
        let admitted = one.admit(&secret, "", &none, 10).expect("own id");
        assert_eq!((admitted.gateway.as_str(), admitted.group), ("gw-1", None));
        assert!(one.admit(&secret, "gw-1", &none, 10).is_ok());
        let wrong = one
            .admit(&"0".repeat(64), "gw-1", &none, 10)
            .expect_err("secret");
        assert_eq!(wrong, WRONG_TOKEN);
        assert!(
            one.admit(&secret, "gw-2", &none, 10)
                .expect_err("scope")
                .contains("is for gateway gw-1, not gw-2")
        );
        assert!(
            one.admit(&secret, "", &none, 1_000)
                .expect_err("expiry")
                .contains("expired at 1970-01-01T00:00:01Z")
        );
        assert!(
            one.used_once()
                .admit(&secret, "", &none, 10)
                .expect_err("uses")
                .contains("used up")
        );

        let (group, secret) = issue(v1::JoinTokenScope {
            group: "prod".into(),
            ..Default::default()
        });
        assert!(
            group
                .admit(&secret, "", &none, 10)
                .expect_err("no id")
                .contains("say which gateway id")
        );
        let admitted = group.admit(&secret, "gw-9", &none, 10).expect("bound");
        assert_eq!(admitted.group.as_deref(), Some("prod"));
        assert!(group.admit(&secret, "Not An Id", &none, 10).is_err());

        let (selector, secret) = issue(v1::JoinTokenScope {
            selector: [("region".to_owned(), "eu".to_owned())].into(),
            ..Default::default()
        });
        assert!(
            selector
                .admit(&secret, "gw-3", &labels(&[("region", "eu")]), 10)
                .is_ok()
        );
        let lacks = selector
            .admit(&secret, "gw-3", &labels(&[("region", "us")]), 10)
            .expect_err("labels");
        assert!(lacks.contains("lack region=eu"), "{lacks}");
    }

    #[test]
    fn malformed_tokens_are_named_without_their_text() {
        for text in [
            "",
            "kt1",
            "kt1.abc.def",
            "kt2.0123456789abcdef.",
            &format!("kt1.0123456789abcdef.{}", "z".repeat(64)),
        ] {
            let why = parse(text).expect_err("refused");
            assert!(!why.contains("zzz"));
        }
    }
}
