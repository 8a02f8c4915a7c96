//! Offers across replicas: the leader's engine writes each offer to etcd (fenced, without the
//! config bytes, which are in the config's own key); every replica follows the offers and hands
//! those for the sessions it holds to their agents. Only offers written while a replica watches
//! are delivered: an old offer read back later could take a gateway back to a config the
//! rollout has since left, so a missed one is left to the engine, which offers again.

use std::collections::HashMap;
use std::sync::Arc;

use etcd_client::Client;
use kt_proto::v1::ConfigOffer;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::keys::{Keys, kind};
use super::store::EtcdStore;
use super::watch::PrefixWatch;
use crate::fleet::FleetHandle;
use crate::store::Store;

/// Where the engine's offers go.
#[derive(Clone, Debug)]
pub enum OfferRoute {
    /// Straight to the session (a single coordinator).
    Local(FleetHandle),
    /// Through etcd: queued for the term's [`write_offers`] task.
    Etcd(mpsc::Sender<GatewayOffer>),
}

impl OfferRoute {
    /// Hands `offer` on; false when it went nowhere (not connected here, or the term is over).
    /// An offer queued for etcd that cannot be written (the term ended, etcd went away) is
    /// never answered: the rollout offers again once its offer times out or the next leader
    /// takes over.
    pub async fn send(&self, gateway: String, offer: ConfigOffer) -> bool {
        match self {
            OfferRoute::Local(fleet) => fleet.offer(gateway, offer).await,
            OfferRoute::Etcd(queue) => queue.send((gateway, offer)).await.is_ok(),
        }
    }
}

/// A gateway's shadow offers have a key of their own (gateway ids hold no ':'), so a config
/// offer and a shadow offer written together both stand.
const SHADOW_OFFER: &str = ":shadow";

/// The name under `offer/` of a gateway's offer.
pub fn offer_key(gateway: &str, shadow: bool) -> String {
    if shadow {
        format!("{gateway}{SHADOW_OFFER}")
    } else {
        gateway.to_owned()
    }
}

/// The gateway an offer (or answer) key names.
pub fn gateway_of(name: &str) -> &str {
    name.strip_suffix(SHADOW_OFFER).unwrap_or(name)
}

/// Offers queued at most before the engine waits.
const OFFER_QUEUE: usize = 16_384;

/// An offer for one gateway.
pub type GatewayOffer = (String, ConfigOffer);

/// A queue of offers for `write_offers`.
pub fn offer_queue() -> (mpsc::Sender<GatewayOffer>, mpsc::Receiver<GatewayOffer>) {
    mpsc::channel(OFFER_QUEUE)
}

/// Writes queued offers to etcd, all that are queued together (a batch of a rollout is
/// thousands of offers: one transaction each would take seconds), fenced by the term.
pub async fn write_offers(
    store: EtcdStore,
    mut queue: mpsc::Receiver<GatewayOffer>,
    term: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = term.cancelled() => return,
            first = queue.recv() => match first { Some(first) => first, None => return },
        };
        let mut offers = vec![first];
        while let Ok(next) = queue.try_recv() {
            offers.push(next);
        }
        if let Err(error) = store.put_offers(&offers).await {
            tracing::warn!(offers = offers.len(), %error, "offers not written");
        }
    }
}

/// Config bytes kept for delivery, by hash (a rollout offers one config to many gateways).
const CONTENT_CACHE: usize = 16;

/// Delivers offers written from now on to the sessions this replica holds.
pub async fn deliver(
    client: Client,
    keys: Keys,
    store: EtcdStore,
    fleet: FleetHandle,
    cancel: CancellationToken,
) {
    let mut contents: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
    // From now on; a broken stream resumes after the last offer seen. Offers compacted away
    // before they were seen are offered again by the engine.
    let mut watch = PrefixWatch::new(&client, keys.all(kind::OFFER), None);
    while let Some(puts) = watch.next_puts(&cancel).await {
        for kv in &puts {
            let Some(name) = keys.name_in(kind::OFFER, kv.key()) else {
                continue;
            };
            let gateway = gateway_of(name);
            let mut offer = match ConfigOffer::decode(kv.value()) {
                Ok(offer) => offer,
                Err(e) => {
                    tracing::warn!(gateway, error = %e, "malformed offer skipped");
                    continue;
                }
            };
            let hash = offer
                .config
                .as_ref()
                .map(|c| c.hash.clone())
                .unwrap_or_default();
            let content = match contents.get(&hash) {
                // A shadow offer without a config removes the shadow: no bytes to find.
                _ if hash.is_empty() && offer.shadow => Arc::new(Vec::new()),
                Some(content) => content.clone(),
                None => match store.get_config(&hash).await {
                    Ok(Some(config)) => {
                        if contents.len() >= CONTENT_CACHE {
                            contents.clear();
                        }
                        let content = Arc::new(config.content);
                        contents.insert(hash.clone(), content.clone());
                        content
                    }
                    Ok(None) => {
                        tracing::warn!(gateway, %hash, "offer of an unknown config skipped");
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(gateway, %error, "offer not delivered: its config is unreadable; the engine offers again");
                        continue;
                    }
                },
            };
            offer.content = content.as_ref().clone();
            if fleet.offer(gateway.to_owned(), offer).await {
                tracing::debug!(gateway, "offer delivered");
            }
        }
    }
}
