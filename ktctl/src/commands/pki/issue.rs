//! `ktctl pki issue --dir DIR --role agent|coordinator|operator [--id ID] [--dns ..] [--ip ..]`

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use kt_proto::identity::GatewayId;

use crate::pki::{self, LeafRole};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    Agent,
    Coordinator,
    Operator,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory holding the CA (from `ktctl pki init`); the leaf is written there too.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// The gateway id (agent) or operator name (operator).
    #[arg(long)]
    pub id: Option<String>,
    /// DNS names the coordinator is reached by (coordinator only).
    #[arg(long)]
    pub dns: Vec<String>,
    /// IP addresses the coordinator is reached by (coordinator only).
    #[arg(long)]
    pub ip: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: i64,
    /// Replace an existing certificate and key.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let has_addresses = !args.dns.is_empty() || !args.ip.is_empty();
    if args.role != RoleArg::Coordinator && has_addresses {
        anyhow::bail!("--dns and --ip are for --role coordinator only");
    }
    let role = match args.role {
        RoleArg::Agent => {
            let id = args.id.context("--role agent needs --id GATEWAY_ID")?;
            LeafRole::Agent {
                gateway: GatewayId::new(&id)?,
            }
        }
        RoleArg::Coordinator => {
            if args.id.is_some() {
                anyhow::bail!(
                    "--role coordinator takes no --id (there is one coordinator identity per trust domain)"
                );
            }
            LeafRole::Coordinator {
                dns: args.dns,
                ips: args.ip,
            }
        }
        RoleArg::Operator => LeafRole::Operator {
            name: args.id.context("--role operator needs --id NAME")?,
        },
    };
    let issued = pki::issue(&args.dir, &role, args.days, args.force)?;
    println!("issued {} valid for {} days", issued.identity, args.days);
    println!("  certificate: {}", issued.cert.display());
    println!("  key:         {} (mode 0600)", issued.key.display());
    Ok(())
}
