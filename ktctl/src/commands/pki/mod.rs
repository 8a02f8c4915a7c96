//! `ktctl pki`: the deployment's CA and leaf certificates.

pub mod init;
pub mod issue;
