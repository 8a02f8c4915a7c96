//! `ktctl rollout`: following and steering rollouts.

pub mod control;
pub mod history;
pub mod list;
pub mod status;
pub mod undo;
