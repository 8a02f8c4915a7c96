//! One module per noun, one file per verb.

pub mod config;
pub mod dev;
pub mod events;
pub mod fleet;
pub mod gateway;
pub mod groups;
pub mod pki;
pub mod rollout;
