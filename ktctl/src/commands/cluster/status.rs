//! `ktctl cluster status [-o table|json|yaml]`: the coordinator replicas, the leader and its
//! epoch, each replica's lease and agents, etcd's health and the event stream (with
//! `events.nats`) as the answering replica sees them. Exits 1 when the control plane cannot
//! act: etcd unreachable or alarmed, no leader, or the event stream unreachable.

use kt_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, EventBusStatus};

use crate::Session;
use crate::view::{Output, print_structured, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(session: &Session, args: Args) -> anyhow::Result<bool> {
    let mut client = session.client().await?;
    let status = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(crate::status_error)?
        .into_inner();
    let problems = problems(&status);
    if args.output != Output::Table {
        print_structured(&json(&status, &problems), args.output)?;
        return Ok(problems.is_empty());
    }
    print_table(&status);
    for problem in &problems {
        println!("problem: {problem}");
    }
    Ok(problems.is_empty())
}

/// What keeps the control plane from acting, in words.
pub fn problems(status: &ClusterStatusResponse) -> Vec<String> {
    let mut problems = Vec::new();
    if status.storage != "etcd" {
        return problems;
    }
    match &status.etcd {
        Some(etcd) if !etcd.reachable => problems.push(format!(
            "etcd ({}) is unreachable from {}: {}; rollouts and pushes pause until it answers",
            etcd.endpoints.join(","),
            status.answered_by,
            etcd.error
        )),
        Some(etcd) if !etcd.alarms.is_empty() => problems.push(format!(
            "etcd raised alarms {}: it refuses writes until they are cleared (etcdctl alarm disarm, after freeing space)",
            etcd.alarms.join(",")
        )),
        Some(_) if status.leader.is_empty() => {
            problems.push("no replica is the leader: rollouts do not move".into())
        }
        Some(_) => {}
        None => problems.push("the replica said nothing of etcd".into()),
    }
    if let Some(bus) = &status.bus
        && !bus.reachable
    {
        problems.push(format!(
            "the event stream {} ({}) is unreachable from {}: {}; agents keep their events buffered until it answers",
            bus.stream,
            bus.urls.join(","),
            status.answered_by,
            bus.error
        ));
    }
    problems
}

/// Messages the leader has not counted yet, as of its last checkpoint.
pub fn counting_lag(bus: &EventBusStatus) -> u64 {
    bus.last_seq.saturating_sub(bus.counted_through_seq)
}

fn bus_json(bus: &EventBusStatus) -> serde_json::Value {
    let links: Vec<_> = bus
        .links
        .iter()
        .map(|l| {
            serde_json::json!({ "region": l.region, "lag": l.lag,
                "active_ms_ago": (l.active_ms_ago >= 0).then_some(l.active_ms_ago) })
        })
        .collect();
    serde_json::json!({
        "stream": bus.stream, "region": bus.region, "urls": bus.urls,
        "reachable": bus.reachable, "error": Some(&bus.error).filter(|s| !s.is_empty()),
        "latency_ms": bus.latency_us as f64 / 1000.0, "messages": bus.messages, "bytes": bus.bytes,
        "last_seq": bus.last_seq, "counted_through_seq": bus.counted_through_seq,
        "counting_lag": counting_lag(bus),
        "checkpoint": (bus.checkpoint_unix_ms > 0).then(|| kt_daemon::clock::rfc3339(bus.checkpoint_unix_ms)),
        "links": links,
    })
}

fn print_bus(bus: &EventBusStatus) {
    if !bus.reachable {
        println!(
            "events: NATS stream {} UNREACHABLE ({}): {}",
            bus.stream,
            bus.urls.join(","),
            bus.error
        );
        return;
    }
    println!(
        "events: NATS stream {} (region {}), {} batches, {:.1} MiB; the leader counted through {} of {} (lag {})",
        bus.stream,
        bus.region,
        bus.messages,
        bus.bytes as f64 / (1024.0 * 1024.0),
        bus.counted_through_seq,
        bus.last_seq,
        counting_lag(bus)
    );
    for link in &bus.links {
        let active = if link.active_ms_ago >= 0 {
            format!("{:.1}s ago", link.active_ms_ago as f64 / 1000.0)
        } else {
            "never".into()
        };
        println!(
            "  link from region {}: lag {} batches, last active {active}",
            link.region, link.lag
        );
    }
}

fn json(status: &ClusterStatusResponse, problems: &[String]) -> serde_json::Value {
    let replicas: Vec<_> = status
        .replicas
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name, "address": r.address, "version": r.version,
                "leader": r.leader, "agents": r.agents,
                "started": (r.started_unix_ms > 0).then(|| kt_daemon::clock::rfc3339(r.started_unix_ms)),
                "lease_granted": (r.lease_granted_unix_ms > 0).then(|| kt_daemon::clock::rfc3339(r.lease_granted_unix_ms)),
                "lease_ttl_remaining_s": (r.lease_ttl_remaining_s >= 0).then_some(r.lease_ttl_remaining_s),
            })
        })
        .collect();
    let etcd = status.etcd.as_ref().map(|e| {
        serde_json::json!({
            "reachable": e.reachable, "error": Some(&e.error).filter(|s| !s.is_empty()),
            "latency_ms": e.latency_us as f64 / 1000.0, "version": e.version,
            "db_size_bytes": e.db_size_bytes, "endpoints": e.endpoints, "alarms": e.alarms,
        })
    });
    serde_json::json!({
        "storage": status.storage,
        "answered_by": Some(&status.answered_by).filter(|s| !s.is_empty()),
        "leader": Some(&status.leader).filter(|s| !s.is_empty()),
        "epoch": status.epoch,
        "replicas": replicas,
        "etcd": etcd,
        "bus": status.bus.as_ref().map(bus_json),
        "problems": problems,
    })
}

fn print_table(status: &ClusterStatusResponse) {
    if status.storage != "etcd" {
        println!("storage: embedded (one coordinator, SQLite in its data directory)");
    } else {
        println!(
            "storage: etcd; leader: {} (epoch {}); answered by {}",
            if status.leader.is_empty() {
                "none"
            } else {
                &status.leader
            },
            status.epoch,
            status.answered_by
        );
    }
    let now = kt_daemon::unix_ms_now();
    let age = |ms: u64| {
        if ms == 0 {
            "-".to_owned()
        } else {
            humantime::format_duration(std::time::Duration::from_secs(
                now.saturating_sub(ms) / 1000,
            ))
            .to_string()
        }
    };
    let mut t = table(&[
        "REPLICA",
        "ADDRESS",
        "LEADER",
        "AGENTS",
        "LEASE AGE",
        "LEASE TTL",
        "UP",
    ]);
    for r in &status.replicas {
        t.add_row(vec![
            r.name.clone(),
            if r.address.is_empty() {
                "-".into()
            } else {
                r.address.clone()
            },
            if r.leader { "*".into() } else { String::new() },
            r.agents.to_string(),
            age(r.lease_granted_unix_ms),
            if r.lease_ttl_remaining_s >= 0 {
                format!("{}s", r.lease_ttl_remaining_s)
            } else {
                "-".into()
            },
            age(r.started_unix_ms),
        ]);
    }
    println!("{t}");
    if let Some(etcd) = &status.etcd {
        if etcd.reachable {
            println!(
                "etcd: reachable, {} ms, version {}, {:.1} MiB, {}",
                etcd.latency_us as f64 / 1000.0,
                etcd.version,
                etcd.db_size_bytes as f64 / (1024.0 * 1024.0),
                etcd.endpoints.join(",")
            );
        } else {
            println!(
                "etcd: UNREACHABLE ({}): {}",
                etcd.endpoints.join(","),
                etcd.error
            );
        }
    }
    if let Some(bus) = &status.bus {
        print_bus(bus);
    }
}
