//! `ktctl pki init --dir DIR [--trust-domain NAME] [--force]`: a root and an issuing CA.

use std::path::PathBuf;

use crate::pki;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for the root (ca.crt, root-ca.key) and the issuing CA (issuing-ca.crt,
    /// issuing-ca.key).
    #[arg(long)]
    pub dir: PathBuf,
    /// The SPIFFE trust domain every identity of this deployment lives in.
    #[arg(long, default_value = pki::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Replace an existing CA (every certificate it issued stops working).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let files = pki::init(&args.dir, &args.trust_domain, args.force)?;
    println!(
        "created a root CA ({}) and an issuing CA ({}) for trust domain {}",
        files.root_cert.display(),
        files.issuing_cert.display(),
        args.trust_domain
    );
    println!(
        "keep {} offline: it is needed only to make a new issuing CA; coordinators and `pki issue` use {}",
        files.root_key.display(),
        files.issuing_key.display()
    );
    println!(
        "root fingerprint (new agents pin it: kt-agent enroll --ca-fingerprint): {}",
        super::fingerprint::of_file(&files.root_cert)?
    );
    println!(
        "next: ktctl pki issue --dir {} --role coordinator --dns localhost --ip 127.0.0.1",
        args.dir.display()
    );
    Ok(())
}
