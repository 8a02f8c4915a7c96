//! Rollouts of config versions across the fleet.
//!
//! [`model`] is the durable record, [`step`] the pure state machine, [`engine`] the task that
//! owns every rollout, persists each transition before acting on it, and talks to the fleet.

pub mod engine;
pub mod model;
pub mod plan;
pub mod step;
