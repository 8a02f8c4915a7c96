//! The kt-fleet wire protocol (`kt.fleet.v1`) and the identity model shared by every peer.
//!
//! Generated protobuf types live in [`v1`]; they stay at the edges of each crate and are
//! converted to domain types there. [`identity`] turns a verified certificate into a
//! role and a name; [`tls`] loads the PEM files every binary needs.

pub mod bounds;
pub mod flips;
pub mod identity;
pub mod labels;
pub mod leaf;
pub mod tls;

/// What agents say they can do in their hello (`Hello.capabilities`).
pub mod capability {
    /// The agent applies shadow offers (`ConfigOffer.shadow`): it manages a shadow config file.
    pub const SHADOW_CONFIG: &str = "shadow-config";
}

/// Generated code for package `kt.fleet.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kt.fleet.v1");
}
