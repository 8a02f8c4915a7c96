//! `ktctl pki init --dir DIR [--trust-domain NAME] [--force]`

use std::path::PathBuf;

use crate::pki;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for ca.crt and ca.key.
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
    let cert = pki::init_ca(&args.dir, &args.trust_domain, args.force)?;
    println!(
        "created CA for trust domain {} in {}",
        args.trust_domain,
        cert.display()
    );
    println!(
        "next: ktctl pki issue --dir {} --role coordinator --dns localhost --ip 127.0.0.1",
        args.dir.display()
    );
    Ok(())
}
