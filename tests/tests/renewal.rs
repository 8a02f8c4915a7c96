//! Short-lived agent certificates that renew themselves: rotations while events flow and the
//! coordinator restarts, a renewal whose reconnect fails, agents whose clocks are a minute off.
//! Real processes, real mutual TLS, certificates of 30 and 60 seconds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kt_e2e::{FleetOptions, TestFleet, all_healthy, append_events, row, wait_for};

/// Long enough for several rotations of 30-second certificates on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(300);

fn options(ttl_secs: u64) -> FleetOptions {
    FleetOptions {
        enroll_with_ttl: Some(Duration::from_secs(ttl_secs)),
        ..FleetOptions::default()
    }
}

fn agent_cert(fleet: &TestFleet, i: usize) -> PathBuf {
    fleet
        .dir
        .path()
        .join(&fleet.gateways[i].id)
        .join("tls/agent.crt")
}

/// (not before, not after) of the first certificate in a PEM file, Unix ms.
fn validity(path: &Path) -> (u64, u64) {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).expect("certificate file");
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("PEM");
    kt_proto::identity::validity_unix_ms(&der).expect("validity")
}

/// Events the coordinator stored over the last hour, all gateways.
fn stored_events(fleet: &TestFleet) -> u64 {
    let out = fleet.ktctl(&["events", "stats", "-o", "json", "--since", "1h"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter().map(|r| r["total"].as_u64().unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_30_s_renew_five_times_while_events_flow_and_the_coordinator_restarts() {
    let (mut fleet, _) = TestFleet::start_with(1, &options(30));
    fleet
        .wait_for_health(
            "the enrolled agent connected",
            Duration::from_secs(60),
            all_healthy(1),
        )
        .await;
    let gateway = fleet.gateways[0].id.clone();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Every certificate the coordinator saw the agent connect with, by its expiry.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut written = 0u64;
    let mut restarted = false;
    // The longest stretch the gateway was seen without a session, outside the restart.
    let (mut away_since, mut longest_away) = (None::<tokio::time::Instant>, Duration::ZERO);
    while seen.len() < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} certificates in {PATIENCE:?}: {seen:?}\n{}",
            seen.len(),
            fleet.agents[0].log_text()
        );
        append_events(&fleet.gateways[0].events, &gateway, written, 20);
        written += 20;
        let (_, rows) = fleet.health();
        let connected = row(&rows, &gateway).filter(|r| r["agent"] == "connected");
        match (connected, away_since) {
            (Some(r), _) => {
                if let Some(since) = away_since.take() {
                    longest_away = longest_away.max(since.elapsed());
                }
                if let Some(not_after) = r["agent_cert_not_after"].as_str() {
                    seen.insert(not_after.to_owned());
                }
            }
            (None, None) => away_since = Some(tokio::time::Instant::now()),
            (None, Some(_)) => {}
        }
        // Once rotations are under way, the coordinator is killed and started again inside the
        // renewal window of the certificate in use (at 75% of its life; renewals come between
        // 70 and 90%): the renewal is due, or under way, while the coordinator is away.
        if seen.len() == 3 && !restarted {
            restarted = true;
            let (not_before, not_after) = validity(&agent_cert(&fleet, 0));
            let issued = not_before + 5 * 60 * 1000;
            let in_window = issued + (not_after - issued) * 3 / 4;
            let now = kt_daemon::unix_ms_now();
            tokio::time::sleep(Duration::from_millis(in_window.saturating_sub(now))).await;
            fleet.coordinator.kill();
            fleet.coordinator.start_again();
            away_since = None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = fleet.agents[0].log_text();
    assert!(restarted);
    assert!(
        log.matches("renewed certificate in use").count() >= 5,
        "five rotations: {log}"
    );
    // Renewed every time: never expired, never enrolled again (its token has uses left).
    assert!(
        !log.contains("enrolled again") && !log.contains("has expired"),
        "{log}"
    );
    // A rotation costs a reconnect, not an outage: the agent reconnects at once.
    assert!(
        longest_away < Duration::from_secs(10),
        "the gateway was without a session for {longest_away:?}"
    );
    // Every event arrived, once.
    let all_in = wait_for(Duration::from_secs(120), || {
        stored_events(&fleet) >= written
    })
    .await;
    assert!(all_in, "stored {} of {written}", stored_events(&fleet));
    assert_eq!(stored_events(&fleet), written, "no event twice");
    assert!(
        !agent_cert(&fleet, 0)
            .with_extension("crt.candidate")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_reconnect_fails_falls_back_to_the_previous_certificate() {
    let options = FleetOptions {
        proxy: true,
        ..options(60)
    };
    let (fleet, proxy) = TestFleet::start_with(1, &options);
    let proxy = proxy.expect("proxy");
    fleet
        .wait_for_health(
            "the enrolled agent connected",
            Duration::from_secs(60),
            all_healthy(1),
        )
        .await;
    let cert = agent_cert(&fleet, 0);
    let first = std::fs::read(&cert).expect("certificate");
    let (not_before, _) = validity(&cert);
    // The renewal comes at 70 to 90% of the 60 s (42 s at the earliest, counted from the
    // issue, five minutes after the start of validity): block new connections before it. The
    // session's own connection stays up, so the renewal itself gets through.
    let issued = not_before + 5 * 60 * 1000;
    let block_at = issued + 35_000;
    let now = kt_daemon::unix_ms_now();
    tokio::time::sleep(Duration::from_millis(block_at.saturating_sub(now))).await;
    proxy.refuse_new();
    let fell_back = wait_for(Duration::from_secs(60), || {
        fleet.agents[0]
            .log_text()
            .contains("falling back to the previous one")
    })
    .await;
    assert!(fell_back, "{}", fleet.agents[0].log_text());
    // The previous certificate is in force again; the candidate is gone.
    assert_eq!(std::fs::read(&cert).expect("certificate"), first);
    assert!(!cert.with_extension("crt.candidate").exists());
    proxy.unblock();
    // Back with the previous certificate, then renewed soon after.
    fleet
        .wait_for_health("connected again", Duration::from_secs(30), all_healthy(1))
        .await;
    let renewed = wait_for(Duration::from_secs(60), || {
        std::fs::read(&cert).is_ok_and(|now| now != first)
    })
    .await;
    assert!(renewed, "{}", fleet.agents[0].log_text());
    let log = fleet.agents[0].log_text();
    assert!(log.contains("renewed certificate in use"), "{log}");
    assert!(!log.contains("enrolled again"), "{log}");
}

/// libfaketime, which shifts a process's clock (Debian's `faketime` package; the test
/// dependencies script installs it).
fn libfaketime() -> &'static str {
    const PATHS: [&str; 2] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ];
    PATHS
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime is installed (scripts/install-test-deps installs package faketime)")
}

fn skewed(offset: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), libfaketime().into()),
        ("FAKETIME".into(), offset.into()),
        // Timers keep the true monotonic clock; only the wall clock is off.
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_whose_clocks_are_a_minute_off_enroll_and_renew_all_the_same() {
    let options = FleetOptions {
        agent_env: vec![skewed("+60s"), skewed("-60s")],
        ..options(30)
    };
    // The skew is real: a process started so reads a clock a minute off.
    for (offset, sign) in [("+60s", 1i64), ("-60s", -1)] {
        let env = skewed(offset);
        let out = std::process::Command::new("date")
            .arg("+%s")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("date");
        let theirs: i64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("seconds");
        let ours = i64::try_from(kt_daemon::unix_ms_now() / 1000).expect("now");
        assert!(
            (theirs - ours - sign * 60).abs() <= 5,
            "{offset}: {theirs} vs {ours}"
        );
    }
    let (fleet, _) = TestFleet::start_with(2, &options);
    fleet
        .wait_for_health(
            "the skewed agents connected",
            Duration::from_secs(60),
            all_healthy(2),
        )
        .await;
    for i in 0..2 {
        let log = || fleet.agents[i].log_text();
        let renewed = wait_for(PATIENCE, || {
            log().matches("renewed certificate in use").count() >= 2
        })
        .await;
        assert!(renewed, "agent {i} renews twice: {}", log());
        assert!(!log().contains("enrolled again"), "{}", log());
    }
    fleet
        .wait_for_health("still connected", Duration::from_secs(30), all_healthy(2))
        .await;
}
