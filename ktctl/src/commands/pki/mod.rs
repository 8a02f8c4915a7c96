//! `ktctl pki`: the deployment's CA and leaf certificates.

pub mod fingerprint;
pub mod init;
pub mod issue;
