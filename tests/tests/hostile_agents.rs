//! What an agent certificate in the wrong hands can do: oversized fields, a second session
//! for a gateway whose agent is running.

use std::collections::HashMap;
use std::time::Duration;

use kt_e2e::{TestFleet, all_healthy, raw, row};
use kt_proto::v1::agent_message::Body;
use kt_proto::v1::{EventBatch, GatewayHealth, Hello, StatusUpdate};

const TIMEOUT: Duration = Duration::from_secs(60);

fn hello(gateway: &str, labels: &[(&str, String)]) -> Hello {
    Hello {
        gateway_id: gateway.into(),
        boot_id: "hostile".into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

#[tokio::test]
async fn oversized_agent_fields_are_refused_and_listings_keep_working() {
    let fleet = TestFleet::start(1);
    fleet
        .wait_for_health("the fleet is healthy", TIMEOUT, all_healthy(1))
        .await;
    fleet.pki.issue_agent("gw-hostile");
    let (addr, pki) = (fleet.coordinator.addr, &fleet.pki.dir);

    // A region of 2 MiB: copied into every listing and, before, into every stored event row.
    let huge = hello("gw-hostile", &[("region", "x".repeat(2 << 20))]);
    let refused = raw::open(addr, pki, "gw-hostile", huge)
        .await
        .err()
        .expect("a 2 MiB label was accepted");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("hello.labels"), "{refused:?}");

    let many: Vec<(&str, String)> = Vec::new();
    let mut many_labels = hello("gw-hostile", &many);
    many_labels.labels = (0..100).map(|i| (format!("k{i}"), "v".into())).collect();
    let refused = raw::open(addr, pki, "gw-hostile", many_labels)
        .await
        .err()
        .expect("100 labels were accepted");
    assert!(refused.message().contains("100 labels"), "{refused:?}");

    // A well-formed hello, then a health error text of 3 MiB: the session is ended with why.
    let mut session = raw::open(
        addr,
        pki,
        "gw-hostile",
        hello("gw-hostile", &[("region", "eu".into())]),
    )
    .await
    .expect("a well-formed hello is welcome");
    let health = GatewayHealth {
        error: "e".repeat(3 << 20),
        ..Default::default()
    };
    session
        .send(Body::Status(StatusUpdate {
            health: Some(health),
        }))
        .await;
    let ended = session.ended(TIMEOUT).await;
    assert_eq!(ended.code(), tonic::Code::InvalidArgument, "{ended:?}");
    assert!(ended.message().contains("status.health.error"), "{ended:?}");

    // Every operator's view still works, and nothing of the refused fields reached it.
    let list = fleet.ktctl(&["gateway", "list", "-o", "json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).expect("json");
    assert!(row(&rows, "gw-test-01").is_some(), "{rows:?}");
    let hostile = row(&rows, "gw-hostile").expect("the well-formed hello was recorded");
    assert_eq!(hostile["region"], "eu");
    assert!(list.stdout.len() < 64 << 10, "{} bytes", list.stdout.len());
    // Refusals are logged (and audited) with the field named.
    let log = fleet.coordinator.proc.as_ref().expect("running").log_text();
    assert!(
        log.contains("agent message refused") && log.contains("status.health.error"),
        "{log}"
    );
}

#[tokio::test]
async fn a_second_session_with_one_certificate_is_shown_and_the_real_agent_returns() {
    let fleet = TestFleet::start(1);
    fleet
        .wait_for_health("the fleet is healthy", TIMEOUT, all_healthy(1))
        .await;
    // Another host with a copy of gw-test-01's certificate.
    let mut ghost = raw::open(
        fleet.coordinator.addr,
        &fleet.pki.dir,
        "gw-test-01",
        hello("gw-test-01", &[("region", "us".into())]),
    )
    .await
    .expect("the ghost's hello is well-formed");
    // The real agent is told its session was replaced and reconnects, which replaces the
    // ghost's session in turn: before, the real agent was never told and stayed silent.
    let ended = ghost.ended(TIMEOUT).await;
    assert_eq!(ended.code(), tonic::Code::Aborted, "{ended:?}");
    assert!(ended.message().contains("replaced"), "{ended:?}");

    fleet
        .wait_for_health("the duplicate is shown", TIMEOUT, |code, rows| {
            row(rows, "gw-test-01")
                .is_some_and(|r| r["agent"] == "connected" && r["duplicate_agent"].is_string())
                && code == 1
        })
        .await;
    let doctor = fleet.ktctl(&["doctor", "--checks", "agents", "--json"]);
    assert_eq!(doctor.status.code(), Some(1));
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        text.contains("two agents seem to use this gateway's certificate"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_event_batches_end_the_stream_with_a_reason() {
    let fleet = TestFleet::start(0);
    fleet.pki.issue_agent("gw-hostile");
    let (addr, pki) = (fleet.coordinator.addr, &fleet.pki.dir);
    // Sequence numbers that would wrap past what the store can hold: before, stored as
    // negative numbers and later events taken for duplicates, silently.
    let (tx, acks) = raw::open_events(addr, pki, "gw-hostile").await;
    let batch = EventBatch {
        epoch: 1,
        first_seq: i64::MAX as u64 - 1,
        events: vec![br#"{"verdict":"allow"}"#.to_vec(); 5],
        gap: None,
    };
    tx.send(batch).await.expect("send");
    let status = acks
        .expect("stream opened")
        .message()
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("sequence numbers"), "{status:?}");

    // A batch over the 4 MiB message limit: the agent is told why, not just reset.
    let (tx, acks) = raw::open_events(addr, pki, "gw-hostile").await;
    let batch = EventBatch {
        epoch: 1,
        first_seq: 1,
        events: vec![vec![b'x'; 1 << 20]; 5],
        gap: None,
    };
    let _ = tx.send(batch).await;
    let status = acks
        .expect("stream opened")
        .message()
        .await
        .expect_err("refused");
    assert!(
        status.message().contains("events stream ended") && status.message().contains("length"),
        "{status:?}"
    );
}
