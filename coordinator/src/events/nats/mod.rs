//! Events on NATS JetStream (`events.nats`): every replica of a region publishes its agents'
//! batches to one stream, and reads every tail and the leader's counters from it, so each
//! replica shows the whole fleet's events. Regions are joined by stream sourcing over NATS leaf
//! node connections (see ARCHITECTURE.md, "Events across replicas and regions").
//!
//! The unit of replication is an agent batch (one message, split only where the server's
//! payload limit demands), named `gateway:epoch:first_seq` for JetStream's deduplication.

pub mod counting;
pub mod log;
pub mod read;
pub mod status;
pub mod tail;
pub mod wire;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use kt_proto::tls::TlsError;

use crate::config::NatsEvents;

/// Subjects all start with this; the next tokens are the region and the gateway.
const SUBJECT_ROOT: &str = "kt.events";

/// How long the stream remembers message ids to drop a batch sent twice.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// One NATS request (a publish acknowledgement, a stream lookup) may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("events.nats.tls: {0}")]
    Tls(#[from] TlsError),
    #[error("NATS at {urls}: {why}")]
    Connect { urls: String, why: String },
    #[error("stream {stream}: {why}")]
    Stream { stream: String, why: String },
}

/// The connection to this region's NATS and the stream's settings.
#[derive(Clone, Debug)]
pub struct EventStream {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub settings: NatsEvents,
}

impl EventStream {
    /// Connects (retrying in the background when NATS is away at start, so the coordinator
    /// still serves) and makes sure the stream exists with these settings.
    pub async fn connect(settings: &NatsEvents, name: &str) -> Result<Self, NatsError> {
        let tls = settings.tls.rustls_client_config()?;
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .require_tls(true)
            .tls_client_config(tls)
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .max_reconnects(None)
            .retry_on_initial_connect()
            .event_callback(|event| async move {
                tracing::info!(%event, "NATS connection");
            })
            .connect(settings.urls.clone())
            .await
            .map_err(|e| NatsError::Connect {
                urls: settings.urls.join(","),
                why: e.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        Ok(EventStream {
            client,
            js,
            settings: settings.clone(),
        })
    }

    /// The stream's config as the settings say: this region's subjects, the other regions'
    /// streams as sources, limits by age and size.
    pub fn stream_config(&self) -> stream::Config {
        let s = &self.settings;
        stream::Config {
            name: s.stream.clone(),
            subjects: vec![format!("{SUBJECT_ROOT}.{}.>", s.region)],
            sources: Some(
                s.regions
                    .iter()
                    .map(|region| stream::Source {
                        name: s.stream.clone(),
                        // Only the other region's own events: never what it sourced from here.
                        filter_subject: Some(format!("{SUBJECT_ROOT}.{region}.>")),
                        external: Some(stream::External {
                            api_prefix: format!("$JS.{region}.API"),
                            delivery_prefix: None,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            )
            .filter(|sources: &Vec<_>| !sources.is_empty()),
            max_age: s.max_age,
            max_bytes: i64::try_from(s.max_bytes).unwrap_or(i64::MAX),
            num_replicas: s.replicas,
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }
    }

    /// Creates the stream, or brings an existing one to these settings.
    pub async fn ensure_stream(&self) -> Result<stream::Stream, NatsError> {
        let wanted = self.stream_config();
        let failed = |why: String| NatsError::Stream {
            stream: wanted.name.clone(),
            why,
        };
        match self.js.get_stream(&wanted.name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| failed(e.to_string()))?;
                let current = &info.config;
                if current.subjects != wanted.subjects
                    || !same_sources(current, &wanted)
                    || current.max_age != wanted.max_age
                    || current.max_bytes != wanted.max_bytes
                    || current.num_replicas != wanted.num_replicas
                {
                    tracing::info!(stream = %wanted.name, "bringing the event stream to this replica's settings");
                    // The stream works as it is: a refused change is reported, not fatal.
                    if let Err(error) = self.js.update_stream(&wanted).await {
                        tracing::warn!(stream = %wanted.name, %error,
                            "the event stream keeps its current settings: NATS refused the change");
                    }
                }
                Ok(existing)
            }
            Err(_) => match self.js.create_stream(wanted.clone()).await {
                Ok(created) => Ok(created),
                // Another replica made it in the meantime.
                Err(error) => self
                    .js
                    .get_stream(&wanted.name)
                    .await
                    .map_err(|_| failed(error.to_string())),
            },
        }
    }

    /// The stream handle, looked up (and made, if it went away).
    pub async fn stream(&self) -> Result<stream::Stream, NatsError> {
        match self.js.get_stream(&self.settings.stream).await {
            Ok(stream) => Ok(stream),
            Err(_) => self.ensure_stream().await,
        }
    }

    /// Where a gateway's batches ingested in this region are published.
    pub fn subject(&self, gateway: &str) -> String {
        subject(&self.settings.region, gateway)
    }
}

/// Whether the stream sources the same streams as wanted, compared on the fields we set (the
/// server fills in others, such as start sequences, when it stores a source).
fn same_sources(current: &stream::Config, wanted: &stream::Config) -> bool {
    let key = |config: &stream::Config| -> Vec<(String, Option<String>, Option<String>)> {
        let mut keys: Vec<_> = config
            .sources
            .iter()
            .flatten()
            .map(|source| {
                (
                    source.name.clone(),
                    source.filter_subject.clone(),
                    source.external.as_ref().map(|e| e.api_prefix.clone()),
                )
            })
            .collect();
        keys.sort();
        keys
    };
    key(current) == key(wanted)
}

/// `kt.events.<region>.<gateway>`; a gateway id's dots become `~` (ids have no `~`), since a
/// dot separates subject tokens.
pub fn subject(region: &str, gateway: &str) -> String {
    format!("{SUBJECT_ROOT}.{region}.{}", gateway.replace('.', "~"))
}

/// Every region's subject for one gateway: what a tail of that gateway alone reads.
pub fn gateway_filter(gateway: &str) -> String {
    format!("{SUBJECT_ROOT}.*.{}", gateway.replace('.', "~"))
}

/// The id JetStream deduplicates by: a batch sent again (after a reconnect) has the same one.
pub fn message_id(gateway: &str, epoch: u64, first_seq: u64) -> String {
    format!("{gateway}:{epoch}:{first_seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_keep_one_token_per_gateway() {
        assert_eq!(subject("eu", "gw-01"), "kt.events.eu.gw-01");
        assert_eq!(subject("eu", "gw.a.b"), "kt.events.eu.gw~a~b");
        assert_eq!(gateway_filter("gw.a"), "kt.events.*.gw~a");
        assert_eq!(message_id("gw-01", 7, 100), "gw-01:7:100");
    }
}
