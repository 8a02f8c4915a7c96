//! Several coordinator replicas on etcd (`storage: etcd`): every replica serves agents and
//! operators; the leader, elected through etcd and fenced by its campaign revision, runs the
//! rollout engine, the config sources and the drift reconciler.
//!
//! Who writes what (see ARCHITECTURE.md): the leader writes rollouts, desired state, pins and
//! offers, each in a transaction that requires its leader key at its campaign revision; every
//! replica writes config versions, groups, audit lines, operator requests, and the fleet records
//! and answers of the agents whose sessions it holds (under its own lease). Replicas never call
//! each other: they meet in etcd.

pub mod election;
pub mod fleet_sync;
pub mod keys;
pub mod lease;
pub mod offers;
pub mod replica;
pub mod requests;
pub mod status;
pub mod store;
pub mod watch;

/// A KV client that reads records as large as etcd may hold (thousands of fleet records, a
/// rollout of thousands of gateways: megabytes, above gRPC's default limit of 4 MiB).
pub(crate) fn kv(client: &etcd_client::Client) -> etcd_client::KvClient {
    client
        .kv_client()
        .max_decoding_message_size(store::MAX_MESSAGE)
        .max_encoding_message_size(store::MAX_MESSAGE)
}

/// A watch client with the same limit.
pub(crate) fn watches(client: &etcd_client::Client) -> etcd_client::WatchClient {
    client
        .watch_client()
        .max_decoding_message_size(store::MAX_MESSAGE)
}

/// The leader that made an offer: its campaign revision within one etcd cluster. Agents refuse
/// offers from an epoch lower than the highest they have seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    /// etcd's cluster id, so that a rebuilt etcd (revisions starting over) is not refused forever.
    pub cluster: String,
    /// The leader key's create revision; 0 for a single coordinator.
    pub number: u64,
}
