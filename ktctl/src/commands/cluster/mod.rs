//! `ktctl cluster`: the control plane itself.

pub mod status;
