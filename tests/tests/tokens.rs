//! `ktctl token create|list|revoke` against a real coordinator: secrets shown once, stored as
//! hashes, bounds and scopes checked, revocations and expiries visible, every change audited.

use std::time::Duration;

use kt_e2e::{TestFleet, output_text, wait_for};
use serde_json::Value;

fn tokens(fleet: &TestFleet) -> Vec<Value> {
    let out = fleet.ktctl(&["token", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn token_row<'a>(rows: &'a [Value], id: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("token {id} listed: {rows:?}"))
}

#[tokio::test]
async fn tokens_are_shown_once_listed_without_secrets_and_revoked() {
    let fleet = TestFleet::start(1);
    let created = fleet.ktctl(&["token", "create", "--gateway-id", "gw-new-01"]);
    assert!(created.status.success(), "{}", output_text(&created));
    let token = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert_eq!(parts[0], "kt1");
    assert_eq!(parts[2].len(), 64, "256 bits of secret, hex");
    let (id, secret) = (parts[1], parts[2]);

    let rows = tokens(&fleet);
    let row = token_row(&rows, id);
    assert_eq!(row["scope"], "gateway=gw-new-01");
    assert_eq!(row["state"], "valid");
    assert_eq!(
        (row["uses"].as_u64(), row["uses_left"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        row["created_by"]
            .as_str()
            .is_some_and(|c| c.ends_with("/operator/tester")),
        "{row}"
    );
    // Defaults: one hour.
    assert!(
        row["expires"].as_str().is_some_and(|e| e != "never"),
        "{row}"
    );
    let table = fleet.ktctl(&["token", "list"]);
    let coordinator_dir = fleet.dir.path().join("coordinator");
    for shown in [
        String::from_utf8_lossy(&table.stdout).into_owned(),
        rows_text(&rows),
    ] {
        assert!(!shown.contains(secret), "a listing shows the secret");
    }
    // Nor does the coordinator keep it anywhere on disk.
    assert!(
        !dir_contains(&coordinator_dir, secret.as_bytes()),
        "the secret is stored"
    );

    let revoked = fleet.ktctl(&["token", "revoke", id, "--reason", "sent to the wrong team"]);
    assert!(revoked.status.success(), "{}", output_text(&revoked));
    let rows = tokens(&fleet);
    let row = token_row(&rows, id);
    assert_eq!(row["state"], "revoked");
    assert_eq!(row["revoked_reason"], "sent to the wrong team");
    let unknown = fleet.ktctl(&["token", "revoke", "0123456789abcdef"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", output_text(&unknown));
    assert!(
        output_text(&unknown).contains("no join token"),
        "{}",
        output_text(&unknown)
    );
}

#[tokio::test]
async fn scopes_lifetimes_and_uses_are_checked() {
    let fleet = TestFleet::start(1);
    // A short one expires, and says so.
    let short = fleet.ktctl(&[
        "token",
        "create",
        "--group",
        kt_e2e::GROUP,
        "--ttl",
        "1s",
        "--uses",
        "3",
        "-o",
        "json",
    ]);
    assert!(short.status.success(), "{}", output_text(&short));
    let short: Value = serde_json::from_slice(&short.stdout).expect("json");
    let id = short["id"].as_str().expect("id").to_owned();
    assert_eq!(short["scope"], format!("group={}", kt_e2e::GROUP));
    assert!(short["token"].as_str().is_some_and(|t| t.contains(&id)));
    let expired = wait_for(Duration::from_secs(30), || {
        tokens(&fleet)
            .iter()
            .any(|r| r["id"] == id.as_str() && r["state"] == "expired")
    })
    .await;
    assert!(expired, "{:?}", tokens(&fleet));

    let never = fleet.ktctl(&[
        "token",
        "create",
        "--selector",
        "region=eu",
        "--never-expires",
        "-o",
        "json",
    ]);
    assert!(never.status.success(), "{}", output_text(&never));
    let never: Value = serde_json::from_slice(&never.stdout).expect("json");
    assert_eq!(
        (never["expires"].as_str(), never["scope"].as_str()),
        (Some("never"), Some("selector=region=eu"))
    );

    // Refusals, each saying why; nothing is stored for them.
    let before = tokens(&fleet).len();
    for (args, says) in [
        (&["token", "create"][..], "--gateway-id"),
        (
            &["token", "create", "--gateway-id", "gw-1", "--group", "g"][..],
            "cannot be used with",
        ),
        (
            &["token", "create", "--group", "no-such-group"][..],
            "no-such-group",
        ),
        (
            &["token", "create", "--gateway-id", "Not An Id"][..],
            "gateway id",
        ),
        (
            &["token", "create", "--gateway-id", "gw-1", "--uses", "0"][..],
            "uses",
        ),
        (
            &[
                "token",
                "create",
                "--gateway-id",
                "gw-1",
                "--ttl",
                "400days",
            ][..],
            "never expires",
        ),
        (
            &[
                "token",
                "create",
                "--gateway-id",
                "gw-1",
                "--ttl",
                "1h",
                "--never-expires",
            ][..],
            "cannot be used with",
        ),
    ] {
        let out = fleet.ktctl(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            output_text(&out).contains(says),
            "{args:?}: {}",
            output_text(&out)
        );
    }
    assert_eq!(tokens(&fleet).len(), before);
}

fn rows_text(rows: &[Value]) -> String {
    serde_json::to_string(rows).expect("json")
}

/// Whether any file under `dir` holds `needle`.
fn dir_contains(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            let path = entry.path();
            if path.is_dir() {
                dir_contains(&path, needle)
            } else {
                std::fs::read(&path)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            }
        })
}
