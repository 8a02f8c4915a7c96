//! Agents getting and keeping an identity: enrollment with join tokens (and every refusal
//! named), the pinned root CA, revocation. Real processes, real mutual TLS.

use std::path::Path;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_ends_within_a_second_and_renewals_are_refused() {
    use kt_e2e::raw;
    let fleet = TestFleet::start(1);
    fleet.pki.issue_agent("gw-raw");
    let addr = fleet.coordinator.addr;
    let hello = kt_proto::v1::Hello {
        gateway_id: "gw-raw".into(),
        boot_id: "raw".into(),
        ..Default::default()
    };
    let mut session = raw::open(addr, &fleet.pki.dir, "gw-raw", hello.clone())
        .await
        .expect("a session before the revocation");
    let (_, csr) = kt_proto::leaf::key_and_csr().expect("csr");
    // The test PKI has an issuing CA, so this coordinator renews: it does, before the revocation.
    raw::renew(addr, &fleet.pki.dir, "gw-raw", &csr)
        .await
        .expect("a renewal before the revocation");

    let mut operator = fleet.operator().await;
    operator
        .revoke_agent(kt_proto::v1::RevokeAgentRequest {
            gateway_id: "gw-raw".into(),
            reason: "key found on a pastebin".into(),
        })
        .await
        .expect("revoke");
    let revoked_at = std::time::Instant::now();
    let ended = session.ended(Duration::from_secs(10)).await;
    let took = revoked_at.elapsed();
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    assert!(
        ended.message().contains("key found on a pastebin"),
        "{ended:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the session ended {took:?} after the revocation"
    );

    // No way back with the same certificate: not a session, not a renewal, not an event stream.
    let again = raw::open(addr, &fleet.pki.dir, "gw-raw", hello).await;
    assert_eq!(
        again.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    let renewal = raw::renew(addr, &fleet.pki.dir, "gw-raw", &csr).await;
    assert_eq!(
        renewal.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    let (_, events) = raw::open_events(addr, &fleet.pki.dir, "gw-raw").await;
    assert_eq!(
        events.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
}

/// Enrollment lets callers without a client certificate finish the TLS handshake: every other
/// RPC must still refuse them.
#[tokio::test]
async fn a_caller_without_a_certificate_gets_nothing_but_enrollment() {
    use kt_proto::v1::agent_service_client::AgentServiceClient;
    use kt_proto::v1::operator_service_client::OperatorServiceClient;
    use kt_proto::v1::*;
    let fleet = TestFleet::start(1);
    let channel = kt_agent::enroll::pinned_channel(
        &format!("https://{}", fleet.coordinator.addr),
        "127.0.0.1",
        &fleet.pki.root_fingerprint(),
    )
    .await
    .expect("a TLS connection without a client certificate");
    let mut agent = AgentServiceClient::new(channel.clone());
    let mut op = OperatorServiceClient::new(channel);
    let codes: Vec<(&str, Option<tonic::Code>)> = vec![
        (
            "Session",
            agent
                .session(tokio_stream::iter(Vec::<AgentMessage>::new()))
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "Events",
            agent
                .events(tokio_stream::iter(Vec::<EventBatch>::new()))
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "Renew",
            agent
                .renew(CertificateRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ListGateways",
            op.list_gateways(ListGatewaysRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "WatchFleet",
            op.watch_fleet(WatchFleetRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "PushConfig",
            op.push_config(PushConfigRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ListRollouts",
            op.list_rollouts(ListRolloutsRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "GetRollout",
            op.get_rollout(RolloutRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "WatchRollout",
            op.watch_rollout(RolloutRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ControlRollout",
            op.control_rollout(ControlRolloutRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ListConfigVersions",
            op.list_config_versions(ListConfigVersionsRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "GetConfigVersion",
            op.get_config_version(GetConfigVersionRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ApplyGroups",
            op.apply_groups(ApplyGroupsRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ListGroups",
            op.list_groups(ListGroupsRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "PinConfig",
            op.pin_config(PinConfigRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "TailEvents",
            op.tail_events(TailEventsRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "EventStats",
            op.event_stats(EventStatsRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ProbeGateway",
            op.probe_gateway(ProbeGatewayRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ClusterStatus",
            op.cluster_status(ClusterStatusRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "CreateJoinToken",
            op.create_join_token(CreateJoinTokenRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ListJoinTokens",
            op.list_join_tokens(ListJoinTokensRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "RevokeJoinToken",
            op.revoke_join_token(RevokeJoinTokenRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "RevokeAgent",
            op.revoke_agent(RevokeAgentRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ReinstateAgent",
            op.reinstate_agent(ReinstateAgentRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
        (
            "ListAgentRevocations",
            op.list_agent_revocations(ListAgentRevocationsRequest::default())
                .await
                .err()
                .map(|s| s.code()),
        ),
    ];
    for (rpc, code) in codes {
        assert_eq!(
            code,
            Some(tonic::Code::Unauthenticated),
            "{rpc} without a certificate"
        );
    }
}

/// A first boot as systemd and Kubernetes run it: `kt-agent validate` passes before any
/// certificate exists, and the gateway id comes from the environment (a pod's name).
#[tokio::test]
async fn a_first_boot_validates_and_enrolls_as_the_id_its_environment_names() {
    let fleet = TestFleet::start(1);
    let host = fleet.dir.path().join("pod");
    let mut config = kt_launch::configs::agent(&kt_launch::configs::AgentSpec {
        gateway_id: "unused",
        coordinator: fleet.coordinator.addr,
        more_coordinators: &[],
        pki: &fleet.pki.dir,
        gateway: fleet.gateways[0].addr,
        health_interval: Duration::from_secs(1),
        labels: &[],
        config_path: None,
        validator: &bin("kt-gateway"),
        events_file: None,
        probe_token_file: None,
        max_buffered_events: None,
        state_dir: &host.join("state"),
        metrics_listen: None,
    });
    kt_e2e::enroll_on_first_boot(
        &mut config,
        &fleet.ktctl_config,
        &fleet.pki,
        "unused",
        &host,
    );
    // A token for the group: the id is the agent's to name, here from KT_AGENT_GATEWAY_ID.
    let group = create_token(&fleet.ktctl_config, &["--group", kt_e2e::GROUP]);
    let enrollment = config.enrollment.as_mut().expect("enrollment");
    std::fs::write(&enrollment.token_file, &group).expect("token");
    let path = host.join("agent.yaml");
    std::fs::write(&path, kt_launch::configs::to_yaml(&config)).expect("config");
    let agent = |args: &[&str]| {
        std::process::Command::new(bin("kt-agent"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .env("KT_AGENT_GATEWAY_ID", "kt-gateway-7d9f-x2")
            .output()
            .expect("kt-agent")
    };
    let validated = agent(&["validate"]);
    assert!(validated.status.success(), "{}", output_text(&validated));
    assert!(
        output_text(&validated).contains("enrolls at start"),
        "{}",
        output_text(&validated)
    );
    let enrolled = agent(&["enroll"]);
    assert!(enrolled.status.success(), "{}", output_text(&enrolled));
    let identity = kt_proto::tls::identity_of_cert_file(&config.tls.cert).expect("certificate");
    assert_eq!(
        identity.uri(),
        "spiffe://kt-fleet.local/agent/kt-gateway-7d9f-x2"
    );
    // Enrolling again over a certificate needs --force.
    let again = agent(&["enroll"]);
    assert!(!again.status.success());
    assert!(
        output_text(&again).contains("--force"),
        "{}",
        output_text(&again)
    );
}
