//! `ktctl config`: pushing config versions and reading the stored ones.

pub mod diff;
pub mod pin;
pub mod push;
pub mod semantic;
pub mod show;
pub mod versions;
