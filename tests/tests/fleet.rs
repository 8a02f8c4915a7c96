//! The fleet as an operator sees it through `ktctl gateway health`, while parts of it fail.

use std::time::Duration;

use kt_e2e::{HEALTH_INTERVAL, TestFleet, all_healthy, row};

const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn three_gateways_show_healthy_and_connected() {
    let fleet = TestFleet::start(3);
    fleet
        .wait_for_health("3 healthy gateways", PATIENCE, all_healthy(3))
        .await;

    let (_, rows) = fleet.health();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["gateway"], format!("gw-test-{:02}", i + 1));
        assert_eq!(r["groups"], serde_json::json!([kt_e2e::GROUP]));
        assert_eq!(r["region"], if i % 2 == 0 { "us" } else { "eu" });
        assert_eq!(r["config_version"], "1.0.0");
        assert!(
            r["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')),
            "{r}"
        );
    }

    let table = fleet.ktctl(&["gateway", "health"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    for header in [
        "GATEWAY",
        "GROUPS",
        "REGION",
        "AGENT",
        "STATUS",
        "RUNNING",
        "DESIRED",
        "SYNC",
        "PROVIDERS",
        "REQUESTS",
        "LAST SEEN",
    ] {
        assert!(text.contains(header), "{header} missing from\n{text}");
    }
    assert_eq!(text.matches("connected").count(), 3, "{text}");

    let only_group = fleet.ktctl(&["gateway", "health", "--group", "nope"]);
    assert_eq!(only_group.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&only_group.stderr).contains("no group named"));
}

#[tokio::test]
async fn a_stopped_gateway_turns_unhealthy_and_recovers() {
    let mut fleet = TestFleet::start(3);
    fleet
        .wait_for_health("3 healthy gateways", PATIENCE, all_healthy(3))
        .await;

    fleet.gateways[1].stop();
    // Two health intervals, plus room for a loaded CI machine to run ktctl.
    let bound = HEALTH_INTERVAL * 2 + Duration::from_secs(2);
    fleet
        .wait_for_health("gw-test-02 unhealthy", bound, |code, rows| {
            code == 1
                && row(rows, "gw-test-02")
                    .is_some_and(|r| r["status"] == "unhealthy" && r["agent"] == "connected")
        })
        .await;
    let (_, rows) = fleet.health();
    assert_eq!(
        row(&rows, "gw-test-01").map(|r| r["status"].clone()),
        Some("healthy".into())
    );
    assert!(
        row(&rows, "gw-test-02")
            .and_then(|r| r["error"].as_str())
            .is_some_and(|e| e.contains("cannot reach gateway"))
    );

    fleet.gateways[1].start_again();
    fleet
        .wait_for_health("all healthy again", PATIENCE, all_healthy(3))
        .await;
}

#[tokio::test]
async fn a_killed_agent_goes_unreachable_then_disconnected_and_comes_back() {
    let mut fleet = TestFleet::start(2);
    fleet
        .wait_for_health("2 healthy gateways", PATIENCE, all_healthy(2))
        .await;

    fleet.agents[0].kill();
    fleet
        .wait_for_health("gw-test-01 unreachable", PATIENCE, |code, rows| {
            code == 1
                && row(rows, "gw-test-01")
                    .is_some_and(|r| r["agent"] == "unreachable" && r["status"] == "unknown")
        })
        .await;
    fleet
        .wait_for_health("gw-test-01 disconnected", PATIENCE, |_, rows| {
            row(rows, "gw-test-01").is_some_and(|r| r["agent"] == "disconnected")
        })
        .await;
    let (_, rows) = fleet.health();
    assert_eq!(
        row(&rows, "gw-test-02").map(|r| r["agent"].clone()),
        Some("connected".into())
    );

    fleet.agents[0].start_again();
    fleet
        .wait_for_health("agent reconnected", PATIENCE, all_healthy(2))
        .await;
}

#[tokio::test]
async fn agents_reconnect_by_themselves_after_a_coordinator_restart() {
    let mut fleet = TestFleet::start(3);
    fleet
        .wait_for_health("3 healthy gateways", PATIENCE, all_healthy(3))
        .await;

    fleet.coordinator.stop();
    let down = fleet.ktctl(&["gateway", "health"]);
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach the coordinator"));

    fleet.coordinator.start_again();
    fleet
        .wait_for_health("all reconnected", PATIENCE, all_healthy(3))
        .await;
}

#[tokio::test]
async fn a_bad_reload_keeps_the_running_config_and_says_why() {
    let fleet = TestFleet::start(1);
    fleet
        .wait_for_health("1 healthy gateway", PATIENCE, all_healthy(1))
        .await;
    let gateway = &fleet.gateways[0];
    let proc = gateway.proc.as_ref().expect("running");
    let original = std::fs::read_to_string(&gateway.policy).expect("policy");

    // Truncated mid-write: the gateway must keep serving 1.0.0 and report the error.
    std::fs::write(&gateway.policy, &original[..original.len() / 2]).expect("truncate");
    proc.signal(nix::sys::signal::Signal::SIGHUP);
    fleet
        .wait_for_health("reload error reported", PATIENCE, |_, rows| {
            row(rows, "gw-test-01").is_some_and(|r| {
                r["config_version"] == "1.0.0" && r["last_reload_error"].is_string()
            })
        })
        .await;

    std::fs::write(
        &gateway.policy,
        original.replace("version: 1.0.0", "version: 1.1.0"),
    )
    .expect("new version");
    proc.signal(nix::sys::signal::Signal::SIGHUP);
    fleet
        .wait_for_health("new version running", PATIENCE, |code, rows| {
            code == 0
                && row(rows, "gw-test-01").is_some_and(|r| {
                    r["config_version"] == "1.1.0" && r["last_reload_error"].is_null()
                })
        })
        .await;
}

#[tokio::test]
async fn fleet_watch_streams_a_snapshot_then_changes() {
    use kt_proto::v1::{WatchFleetRequest, fleet_update};

    let mut fleet = TestFleet::start(2);
    fleet
        .wait_for_health("2 healthy gateways", PATIENCE, all_healthy(2))
        .await;
    let mut client = fleet.operator().await;
    let mut stream = client
        .watch_fleet(WatchFleetRequest::default())
        .await
        .expect("watch")
        .into_inner();

    let first = stream
        .message()
        .await
        .expect("stream")
        .expect("first update");
    let Some(fleet_update::Update::Snapshot(snapshot)) = first.update else {
        panic!("the first update must be a snapshot: {first:?}");
    };
    assert_eq!(snapshot.gateways.len(), 2);

    fleet.gateways[0].stop();
    let change = tokio::time::timeout(PATIENCE, async {
        loop {
            let update = stream.message().await.expect("stream").expect("update");
            if let Some(fleet_update::Update::Changed(state)) = update.update {
                let unhealthy = state
                    .health
                    .as_ref()
                    .is_some_and(|h| h.status == kt_proto::v1::HealthStatus::Unhealthy as i32);
                if state.gateway_id == "gw-test-01" && unhealthy {
                    return state;
                }
            }
        }
    })
    .await
    .expect("a change for the stopped gateway");
    assert!(!change.health.expect("health").reachable);
}

#[tokio::test]
async fn an_agent_passes_over_an_endpoint_that_accepts_but_never_answers() {
    let mut fleet = TestFleet::start(1);
    fleet
        .wait_for_health("1 healthy gateway", PATIENCE, all_healthy(1))
        .await;
    // A listener that takes connections and never says a word, as a coordinator still starting.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("address");
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            connections.push(stream);
        }
    });
    let config = fleet.dir.path().join("gw-test-01").join("agent.yaml");
    let text = std::fs::read_to_string(&config).expect("agent config");
    let endpoints = "endpoints:\n";
    assert!(text.contains(endpoints), "{text}");
    let text = text.replacen(
        endpoints,
        &format!("{endpoints}  - https://{silent_addr}\n"),
        1,
    );
    std::fs::write(&config, text).expect("agent config");

    fleet.agents[0].kill();
    fleet
        .wait_for_health("gw-test-01 unreachable", PATIENCE, |_, rows| {
            row(rows, "gw-test-01").is_some_and(|r| r["agent"] != "connected")
        })
        .await;
    fleet.agents[0].start_again();
    fleet
        .wait_for_health(
            "the agent connected past the silent endpoint",
            Duration::from_secs(60),
            all_healthy(1),
        )
        .await;
    held.abort();
}

#[tokio::test]
async fn an_agent_connects_with_its_renewed_certificate_and_keeps_the_last_good_one() {
    let mut fleet = TestFleet::start(1);
    fleet
        .wait_for_health("1 healthy gateway", PATIENCE, all_healthy(1))
        .await;
    let not_after = |fleet: &TestFleet| {
        let (_, rows) = fleet.health();
        row(&rows, "gw-test-01")
            .filter(|r| r["agent"] == "connected")
            .and_then(|r| r["agent_cert_not_after"].as_str().map(str::to_owned))
    };
    let first = not_after(&fleet).expect("the certificate's expiry is known");

    // Renewed on disk (1 day instead of 2); the next session is opened with it.
    kt_launch::pki::issue(
        &fleet.pki.dir,
        &kt_launch::pki::LeafRole::Agent {
            gateway: kt_proto::identity::GatewayId::new("gw-test-01").expect("id"),
        },
        1,
        true,
    )
    .expect("renew");
    let cert_file = fleet.pki.dir.join("agent-gw-test-01.crt");
    let renewed = std::fs::read(&cert_file).expect("renewed");
    fleet.coordinator.stop();
    fleet.coordinator.start_again();
    let mut seen = None;
    let renewed_in_use = kt_e2e::wait_for(Duration::from_secs(60), || {
        seen = not_after(&fleet);
        seen.as_ref().is_some_and(|s| *s < first)
    })
    .await;
    assert!(renewed_in_use, "expiry {seen:?}, before {first}");
    let second = seen.expect("seen");

    // A half-written renewal: the agent goes on with the last good certificate.
    std::fs::write(&cert_file, "-----BEGIN CERTIFICATE-----\n").expect("break");
    fleet.coordinator.stop();
    fleet.coordinator.start_again();
    fleet
        .wait_for_health("reconnected", Duration::from_secs(60), all_healthy(1))
        .await;
    assert_eq!(not_after(&fleet), Some(second));
    std::fs::write(&cert_file, renewed).expect("restore");
}
