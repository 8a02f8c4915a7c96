//! Agents getting and keeping an identity: enrollment with join tokens (and every refusal
//! named), the pinned root CA, revocation. Real processes, real mutual TLS.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use kt_e2e::{
    FleetOptions, Pki, TestFleet, all_healthy, bin, create_token, output_text, row, wait_for,
};
use kt_proto::identity::{Identity, Role};
use kt_proto::tls::TlsFiles;

/// `kt-agent enroll` into `dir`, as an operator runs it on a new host.
fn enroll(fleet: &TestFleet, token: &str, fingerprint: &str, extra: &[&str], dir: &Path) -> Output {
    std::fs::create_dir_all(dir).expect("dir");
    let token_file = dir.join("join-token");
    std::fs::write(&token_file, token).expect("token file");
    let coordinator = format!("https://{}", fleet.coordinator.addr);
    let mut command = std::process::Command::new(bin("kt-agent"));
    command.args([
        "enroll",
        "--coordinator",
        &coordinator,
        "--token-file",
        &token_file.display().to_string(),
        "--ca-fingerprint",
        fingerprint,
        "--dir",
        &dir.display().to_string(),
    ]);
    command.args(extra).output().expect("run kt-agent enroll")
}

/// The audit lines of `action` the coordinator recorded: (identity, target, reason).
fn audit(fleet: &TestFleet, action: &str) -> Vec<(String, String, String)> {
    let db = fleet.dir.path().join("coordinator/data/coordinator.db");
    let conn = rusqlite::Connection::open(db).expect("open the coordinator's store");
    let mut query = conn
        .prepare("SELECT identity, target, reason FROM audit WHERE action = ?1 ORDER BY seq")
        .expect("query");
    query
        .query_map([action], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .map(|r| r.expect("row"))
        .collect()
}

fn token_id(token: &str) -> String {
    token
        .split('.')
        .nth(1)
        .expect("kt1.<id>.<secret>")
        .to_owned()
}

fn files_in(dir: &Path) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("agent.crt"),
        key: dir.join("agent.key"),
    }
}

#[tokio::test]
async fn enrollment_gives_a_certificate_for_a_valid_token_and_names_every_refusal() {
    let fleet = TestFleet::start(1);
    let fingerprint = fleet.pki.root_fingerprint();
    let base = fleet.dir.path().join("hosts");

    // A valid token: the key is made on the host, the certificate names the gateway.
    let token = create_token(&fleet.ktctl_config, &["--gateway-id", "gw-new-01"]);
    let host = base.join("valid");
    let out = enroll(&fleet, &token, &fingerprint, &[], &host);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("enrolled as gateway gw-new-01"),
        "{}",
        output_text(&out)
    );
    let tls = files_in(&host)
        .load(Role::Agent)
        .expect("enrolled files load");
    assert_eq!(
        tls.identity,
        Identity::parse_uri("spiffe://kt-fleet.local/agent/gw-new-01").expect("uri")
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(host.join("agent.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is the owner's only");
    }
    let enrolled = audit(&fleet, "agent enroll");
    assert!(
        enrolled
            .iter()
            .any(|(_, target, reason)| target == "gw-new-01" && reason.contains(&token_id(&token))),
        "{enrolled:?}"
    );

    // The same (single-use) token again: used up.
    let out = enroll(&fleet, &token, &fingerprint, &[], &base.join("again"));
    assert_refused(&out, "is used up");

    // Expired.
    let expired = create_token(
        &fleet.ktctl_config,
        &["--gateway-id", "gw-new-02", "--ttl", "1ms"],
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_refused(
        &enroll(&fleet, &expired, &fingerprint, &[], &base.join("expired")),
        "expired at",
    );

    // Revoked.
    let revoked = create_token(&fleet.ktctl_config, &["--gateway-id", "gw-new-03"]);
    let out = fleet.ktctl(&[
        "token",
        "revoke",
        &token_id(&revoked),
        "--reason",
        "leaked in a ticket",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_refused(
        &enroll(&fleet, &revoked, &fingerprint, &[], &base.join("revoked")),
        "leaked in a ticket",
    );

    // Wrongly scoped: a token for another gateway, a selector the agent's labels miss, a
    // group token without a gateway id.
    let other = create_token(&fleet.ktctl_config, &["--gateway-id", "gw-new-04"]);
    assert_refused(
        &enroll(
            &fleet,
            &other,
            &fingerprint,
            &["--gateway-id", "gw-new-05"],
            &base.join("scope"),
        ),
        "is for gateway gw-new-04, not gw-new-05",
    );
    let selector = create_token(&fleet.ktctl_config, &["--selector", "region=eu"]);
    assert_refused(
        &enroll(
            &fleet,
            &selector,
            &fingerprint,
            &["--gateway-id", "gw-new-06"],
            &base.join("selector"),
        ),
        "lack region=eu",
    );
    let group = create_token(&fleet.ktctl_config, &["--group", kt_e2e::GROUP]);
    assert_refused(
        &enroll(&fleet, &group, &fingerprint, &[], &base.join("group")),
        "say which gateway id",
    );

    // Wrong: a token nobody created.
    let forged = format!("kt1.{}.{}", token_id(&other), "0".repeat(64));
    assert_refused(
        &enroll(&fleet, &forged, &fingerprint, &[], &base.join("forged")),
        "the join token is wrong",
    );

    // A group token binds the gateway id the agent asks for to the group.
    let out = enroll(
        &fleet,
        &group,
        &fingerprint,
        &["--gateway-id", "gw-new-07"],
        &base.join("bound"),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let groups = fleet.ktctl(&["groups", "list", "-o", "json"]);
    assert!(
        String::from_utf8_lossy(&groups.stdout).contains("gw-new-07"),
        "gw-new-07 in group {}: {}",
        kt_e2e::GROUP,
        output_text(&groups)
    );

    // Every refusal is audited with its reason, and none left a certificate behind.
    let refused = audit(&fleet, "agent enroll refused");
    for reason in [
        "is used up",
        "expired at",
        "leaked in a ticket",
        "not gw-new-05",
        "lack region=eu",
        "the join token is wrong",
    ] {
        assert!(
            refused.iter().any(|(_, _, r)| r.contains(reason)),
            "{reason} audited: {refused:?}"
        );
    }
    for host in ["again", "expired", "revoked", "scope", "selector", "forged"] {
        assert!(
            !base.join(host).join("agent.crt").exists(),
            "{host} got a certificate"
        );
    }
}

fn assert_refused(out: &Output, says: &str) {
    let text = output_text(out);
    assert!(
        !out.status.success(),
        "enrollment should be refused: {text}"
    );
    assert!(text.contains(says), "refusal should say {says:?}: {text}");
}

#[tokio::test]
async fn no_token_is_sent_to_a_coordinator_whose_root_is_not_the_pinned_one() {
    let fleet = TestFleet::start(1);
    let token = create_token(&fleet.ktctl_config, &["--gateway-id", "gw-new-01"]);
    // The fingerprint of another deployment's root: what an impostor's chain would end in.
    let elsewhere = Pki::new(fleet.dir.path().join("other-pki"));
    let host = fleet.dir.path().join("host");
    let out = enroll(&fleet, &token, &elsewhere.root_fingerprint(), &[], &host);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("does not end in the pinned root CA"),
        "{text}"
    );
    assert!(!host.join("agent.crt").exists());
    // The coordinator never saw an enrollment: no request reached it, so no token did.
    assert!(audit(&fleet, "agent enroll refused").is_empty());
    assert!(audit(&fleet, "agent enroll").is_empty());
    let rows = fleet.ktctl(&["token", "list", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&rows.stdout).expect("json");
    assert_eq!(rows[0]["uses_left"], 1, "{rows:?}");

    // A malformed pin is named before anything is sent.
    let out = enroll(&fleet, &token, "sha256:abc", &[], &host);
    assert!(
        output_text(&out).contains("64 hexadecimal digits"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test]
async fn agents_enroll_at_first_boot_and_revocation_cuts_one_off_for_good() {
    let options = FleetOptions {
        enroll_with_ttl: Some(Duration::from_secs(3600)),
        ..FleetOptions::default()
    };
    let (fleet, _) = TestFleet::start_with(2, &options);
    fleet
        .wait_for_health(
            "enrolled agents connected",
            Duration::from_secs(60),
            all_healthy(2),
        )
        .await;
    let (_, rows) = fleet.health();
    let victim = row(&rows, "gw-test-01").expect("row");
    assert!(
        victim["agent_cert_not_after"].as_str().is_some(),
        "{victim}"
    );

    let out = fleet.ktctl(&["agent", "revoke", "gw-test-01", "--reason", "host stolen"]);
    assert!(out.status.success(), "{}", output_text(&out));
    // Its session is closed at once, and it stays out; the other gateway is untouched.
    fleet
        .wait_for_health(
            "the revoked agent cut off",
            Duration::from_secs(20),
            |_, rows| {
                row(rows, "gw-test-01").is_some_and(|r| {
                    r["agent"] == "revoked" && r["revoked"]["reason"] == "host stolen"
                }) && row(rows, "gw-test-02").is_some_and(|r| r["agent"] == "connected")
            },
        )
        .await;
    let log_of = |i: usize| fleet.agents[i].log_text();
    assert!(
        wait_for(Duration::from_secs(20), || log_of(0)
            .contains("host stolen"))
        .await,
        "the agent is told why: {}",
        log_of(0)
    );
    // It keeps trying with its (still unexpired) certificate and is refused every time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, rows) = fleet.health();
    assert_eq!(row(&rows, "gw-test-01").expect("row")["agent"], "revoked");
    // Nor can it enroll again with its token (which has uses left).
    let token =
        std::fs::read_to_string(fleet.dir.path().join("gw-test-01/join-token")).expect("token");
    let out = enroll(
        &fleet,
        &token,
        &fleet.pki.root_fingerprint(),
        &[],
        &fleet.dir.path().join("comeback"),
    );
    assert_refused(&out, "is revoked");
    let list = fleet.ktctl(&["agent", "revocations", "-o", "json"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("host stolen"),
        "{}",
        output_text(&list)
    );
    assert_eq!(audit(&fleet, "agent revoke").len(), 1);

    // Reinstated, it comes back by itself.
    let out = fleet.ktctl(&[
        "agent",
        "reinstate",
        "gw-test-01",
        "--reason",
        "false alarm",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    fleet
        .wait_for_health(
            "the reinstated agent back",
            Duration::from_secs(30),
            all_healthy(2),
        )
        .await;
}

/// Where the enrolled agent of `id` keeps its certificate.
#[allow(dead_code)]
fn agent_cert(fleet: &TestFleet, id: &str) -> PathBuf {
    fleet.dir.path().join(id).join("tls/agent.crt")
}
