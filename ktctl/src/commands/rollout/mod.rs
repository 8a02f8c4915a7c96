//! `ktctl rollout`: following and steering rollouts.

pub mod control;
pub mod list;
pub mod status;
