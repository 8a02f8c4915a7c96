//! Event senders of the `events` scenario: agents' `Events` streams, spoken directly (the
//! real agent's buffer is a file and a SQLite spool; here the bodies are made in memory), within
//! the credit the coordinator grants, at a paced rate.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use kt_proto::identity::Role;
use kt_proto::tls::TlsFiles;
use kt_proto::v1::EventBatch;
use kt_proto::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::fleet::agent_id;

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The write time a sender put in an event body.
pub fn sent_us(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.split("\"written_us\":").nth(1)?;
    rest.trim_end_matches('}').parse().ok()
}

/// A channel with agent `i`'s own certificate.
pub async fn agent_channel(
    pki: &Path,
    coordinator: SocketAddr,
    i: usize,
) -> anyhow::Result<Channel> {
    let id = agent_id(i);
    let tls = TlsFiles {
        ca: pki.join("ca.crt"),
        cert: pki.join(format!("agent-{id}.crt")),
        key: pki.join(format!("agent-{id}.key")),
    }
    .load(Role::Agent)?;
    Ok(Endpoint::from_shared(format!("https://{coordinator}"))?
        .tls_config(tls.client_config("127.0.0.1"))?
        .connect()
        .await?)
}

const BATCH: u64 = 500;

/// Sends `rate` events per second for `duration`; returns how many were acknowledged.
pub async fn send(channel: Channel, rate: u64, duration: Duration) -> anyhow::Result<u64> {
    let (tx, rx) = mpsc::channel(64);
    let mut acks = AgentServiceClient::new(channel)
        .events(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let epoch = (rand::random::<u64>() >> 1).max(1);
    let total = rate * duration.as_secs().max(1);
    let started = Instant::now();
    let (mut seq, mut credit, mut acked) = (1u64, 4u32, 0u64);
    let mut in_flight = std::collections::VecDeque::new();
    while seq <= total || !in_flight.is_empty() {
        while seq <= total && (in_flight.len() as u32) < credit {
            // Paced: batch k leaves at k * BATCH / rate seconds.
            let due = started + Duration::from_secs_f64((seq - 1) as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(due.into()).await;
            let n = BATCH.min(total - seq + 1);
            let events = (seq..seq + n)
                .map(|k| {
                    format!(
                        "{{\"id\":\"{k}\",\"verdict\":\"allow\",\"reason_code\":\"\",\"config_version\":\"1.0.0\",\"policies_evaluated\":[],\"written_us\":{}}}",
                        now_us()
                    )
                    .into_bytes()
                })
                .collect();
            tx.send(EventBatch {
                epoch,
                first_seq: seq,
                events,
                gap: None,
            })
            .await?;
            in_flight.push_back(seq + n - 1);
            seq += n;
        }
        let Some(ack) = acks.message().await? else {
            anyhow::bail!("the coordinator ended the events stream")
        };
        while in_flight
            .front()
            .is_some_and(|last| *last <= ack.durable_through_seq)
        {
            in_flight.pop_front();
        }
        acked = ack.durable_through_seq;
        credit = ack.credit.max(1);
    }
    Ok(acked)
}
