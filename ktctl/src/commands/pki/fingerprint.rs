//! `ktctl pki fingerprint CA_FILE`: what a new agent pins (`kt-agent enroll --ca-fingerprint`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The root CA certificate (ca.crt from `ktctl pki init`).
    pub ca_file: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    println!("{}", of_file(&args.ca_file)?);
    Ok(())
}

/// `sha256:<hex>` of the first certificate in a PEM file.
pub fn of_file(path: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .with_context(|| format!("{}: no PEM certificate", path.display()))?
        .with_context(|| format!("{}: malformed PEM certificate", path.display()))?;
    Ok(kt_proto::leaf::fingerprint(&der))
}
