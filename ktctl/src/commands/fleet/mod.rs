//! `ktctl fleet`: the fleet as a whole.

pub mod watch;
