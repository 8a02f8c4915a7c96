//! `ktctl doctor [--gateway ID | --group G | --all] [--checks connectivity,certs,...] [--json]`
//!
//! Gathers what the checks need (one timed `ListGateways`, the operator's certificate, a
//! synthetic probe through each live gateway), judges it with [`crate::doctor::check`], and prints
//! one line per check, a summary and a hint per problem. Exits 1 when a check failed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kt_proto::v1::operator_service_client::OperatorServiceClient;
use kt_proto::v1::{GatewayState, ProbeGatewayRequest, ProbePrompt};
use tonic::transport::Channel;

use crate::Session;
use crate::doctor::{self, CertInfo, Check, Inputs, Mark, Section};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only these gateways.
    #[arg(long, conflicts_with_all = ["group", "all"])]
    pub gateway: Vec<String>,
    /// Only the gateways of this group.
    #[arg(long, conflicts_with = "all")]
    pub group: Option<String>,
    /// Every gateway (the default).
    #[arg(long)]
    pub all: bool,
    /// The sections to check, comma-separated [default: all of them].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub checks: Vec<Section>,
    /// One JSON document instead of text, for CI and runbooks.
    #[arg(long)]
    pub json: bool,
    /// How long each gateway's probe may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
}

impl Args {
    /// Every section of every gateway, as `ktctl doctor --json` (what the console runs).
    pub fn everything() -> Self {
        Args {
            gateway: Vec::new(),
            group: None,
            all: true,
            checks: Vec::new(),
            json: true,
            probe_timeout: Duration::from_secs(10),
        }
    }
}

/// Returns whether no check failed.
pub async fn run(session: &Session, args: Args) -> anyhow::Result<bool> {
    let (checks, coordinator) = judge(session, &args).await?;
    let (errors, warnings) = doctor::summary(&checks);
    if args.json {
        let document = document(&checks, &coordinator);
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print_text(&checks, errors, warnings);
    }
    Ok(errors == 0)
}

/// The checks as one JSON document (`--json`): the checks, a summary, whether all is well.
pub fn document(checks: &[Check], coordinator: &str) -> serde_json::Value {
    let (errors, warnings) = doctor::summary(checks);
    serde_json::json!({
        "coordinator": coordinator,
        "checks": checks,
        "summary": { "errors": errors, "warnings": warnings },
        "ok": errors == 0,
    })
}

/// Gathers and judges: the checks, and the coordinator they were made against.
pub async fn judge(session: &Session, args: &Args) -> anyhow::Result<(Vec<Check>, String)> {
    let sections = if args.checks.is_empty() {
        Section::ALL.to_vec()
    } else {
        args.checks.clone()
    };
    let inputs = gather(session, args, &sections).await?;
    Ok((doctor::check(&inputs, &sections), inputs.coordinator))
}

async fn gather(session: &Session, args: &Args, sections: &[Section]) -> anyhow::Result<Inputs> {
    let context = session.context()?;
    let mut inputs = Inputs {
        now_ms: kt_daemon::unix_ms_now(),
        coordinator: context.coordinator.clone(),
        ..Default::default()
    };
    if sections.contains(&Section::Certs) {
        inputs.operator_cert = Some(CertInfo {
            subject: format!("operator certificate {}", context.cert.display()),
            not_after_ms: read_not_after(&context.cert),
        });
    }
    // The round trip includes connecting: what every ktctl command pays.
    let started = Instant::now();
    let listed: Result<_, String> = async {
        let mut client = crate::client::connect(&context)
            .await
            .map_err(|error| crate::error_line(&error))?;
        let group = args.group.clone().unwrap_or_default();
        let gateways = crate::client::list_gateways(&mut client, &group)
            .await
            .map_err(|status| status.message().to_owned())?;
        Ok((client, gateways))
    }
    .await;
    let rtt = started.elapsed();
    let (mut client, gateways) = match listed {
        Ok(found) => {
            inputs.rtt = Some(Ok(rtt));
            found
        }
        Err(error) => {
            // Without the coordinator nothing else can be checked; say so and stop there.
            inputs.rtt = Some(Err(error));
            return Ok(inputs);
        }
    };
    inputs.gateways = select(gateways, &args.gateway)?;
    if sections.contains(&Section::Config) {
        let groups = client
            .list_groups(kt_proto::v1::ListGroupsRequest {})
            .await
            .map_err(|status| status.message().to_owned());
        inputs.groups = Some(groups.map(|r| r.into_inner().groups));
    }
    if sections.contains(&Section::Certs) {
        let tokens = client
            .list_join_tokens(kt_proto::v1::ListJoinTokensRequest {})
            .await
            .map_err(|status| status.message().to_owned());
        inputs.tokens = Some(tokens.map(|r| r.into_inner().tokens));
    }
    if sections.contains(&Section::Connectivity) {
        let cluster = client
            .cluster_status(kt_proto::v1::ClusterStatusRequest {})
            .await
            .map_err(|status| status.message().to_owned());
        inputs.cluster = Some(cluster.map(|r| r.into_inner()));
    } else {
        inputs.rtt = None;
    }
    if sections.contains(&Section::Policy) {
        inputs.probes = probe(client, &inputs.gateways, args.probe_timeout).await;
    }
    Ok(inputs)
}

fn select(gateways: Vec<GatewayState>, only: &[String]) -> anyhow::Result<Vec<GatewayState>> {
    if only.is_empty() {
        return Ok(gateways);
    }
    if let Some(unknown) = only
        .iter()
        .find(|id| !gateways.iter().any(|g| g.gateway_id == **id))
    {
        anyhow::bail!("the coordinator knows no gateway {unknown:?}");
    }
    Ok(gateways
        .into_iter()
        .filter(|g| only.contains(&g.gateway_id))
        .collect())
}

/// Probes sent at the same time at most.
const PROBES_AT_ONCE: usize = 32;

/// Probes every live gateway; a gateway whose probe fails gets the error.
async fn probe(
    client: OperatorServiceClient<Channel>,
    gateways: &[GatewayState],
    timeout: Duration,
) -> BTreeMap<String, Result<kt_proto::v1::ProbeResult, String>> {
    let prompts = vec![
        ProbePrompt {
            name: doctor::KNOWN_BAD.into(),
            text: doctor::KNOWN_BAD_PROMPT.into(),
        },
        ProbePrompt {
            name: doctor::KNOWN_GOOD.into(),
            text: doctor::KNOWN_GOOD_PROMPT.into(),
        },
    ];
    let asks = doctor::probe_targets(gateways).into_iter().map(|gateway| {
        let mut client = client.clone();
        let request = ProbeGatewayRequest {
            gateway_id: gateway.clone(),
            prompts: prompts.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        async move {
            let answer = client
                .probe_gateway(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|status| status.message().to_owned());
            (gateway, answer)
        }
    });
    // A few at a time: a large fleet must not get every probe in the same instant.
    use futures_util::StreamExt;
    futures_util::stream::iter(asks)
        .buffer_unordered(PROBES_AT_ONCE)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

fn read_not_after(path: &std::path::Path) -> Result<u64, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der =
        CertificateDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    kt_proto::identity::not_after_unix_ms(&der)
        .ok_or_else(|| format!("{}: not a readable X.509 certificate", path.display()))
}

fn mark_str(mark: Mark) -> &'static str {
    match mark {
        Mark::Pass => "PASS",
        Mark::Warn => "WARN",
        Mark::Fail => "FAIL",
        Mark::Skip => "SKIP",
    }
}

fn print_text(checks: &[Check], errors: usize, warnings: usize) {
    let mut section = None;
    for check in checks {
        if section != Some(check.section) {
            section = Some(check.section);
            println!("{}", check.section.name());
        }
        println!(
            "  {}  {:<28} {}  [{}]",
            mark_str(check.mark),
            check.subject,
            check.value,
            check.threshold
        );
    }
    println!();
    println!("summary: {errors} error(s), {warnings} warning(s)");
    let problems: Vec<&Check> = checks
        .iter()
        .filter(|c| matches!(c.mark, Mark::Fail | Mark::Warn))
        .collect();
    if !problems.is_empty() {
        println!("hints:");
        for c in problems {
            if let Some(hint) = &c.hint {
                println!(
                    "  {} {}/{}: {hint}",
                    mark_str(c.mark),
                    c.section.name(),
                    c.subject
                );
            }
        }
    }
}
