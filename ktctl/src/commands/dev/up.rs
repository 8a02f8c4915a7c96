//! `ktctl dev up [--gateways N] [--dir DIR]`: a PKI, one coordinator and N gateway+agent
//! pairs as real processes on loopback, and a ktctl config to reach them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use super::DirArg;
use crate::dev::{self, AgentSpec, DevProcess, DevState, Liveness, Role};
use crate::ktconfig::{self, KtctlConfig};
use crate::pki::{self, LeafRole};
use crate::view::GatewayRow;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many gateway+agent pairs to start (1-99).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub gateways: u8,
    /// A replicated control plane: etcd (Debian's etcd-server) and three coordinators on it,
    /// each agent knowing all three, and their events on NATS JetStream (Debian's nats-server).
    #[arg(long)]
    pub ha: bool,
    /// With --ha: regions, each with its own NATS server and coordinators, joined by a leaf
    /// node link so a tail in one shows the other's events (1 or 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2), requires = "ha")]
    pub regions: u8,
    #[command(flatten)]
    pub dir: DirArg,
}

/// Coordinator replicas of `--ha`.
const HA_REPLICAS: usize = 3;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const GRACE: Duration = Duration::from_secs(5);

/// Stops everything started so far if `dev up` fails half-way.
struct Rollback<'a> {
    dir: &'a Path,
    state: DevState,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            for p in self.state.processes.iter().rev() {
                dev::stop(p.pid, &p.binary, GRACE);
            }
            let _ = std::fs::remove_file(DevState::path(self.dir));
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.dir.resolve();
    if let Some(state) = DevState::load(&dir)? {
        let running = state
            .processes
            .iter()
            .filter(|p| dev::is_running(p.pid, &p.binary))
            .count();
        if running > 0 {
            bail!(
                "a dev fleet is already running in {} ({running} processes); run `ktctl dev down{}` first",
                dir.display(),
                dir_flag(&args.dir)
            );
        }
    }
    // Before anything is written: name the missing package rather than fail half-way.
    let ha_binaries = if args.ha {
        Some((kt_launch::etcd::find_etcd()?, kt_launch::nats::find_nats()?))
    } else {
        None
    };
    let regions: Vec<String> = match (args.ha, args.regions) {
        (false, _) => Vec::new(),
        (true, 1) => vec!["local".into()],
        (true, _) => vec!["eu".into(), "us".into()],
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::fs::canonicalize(&dir)?;
    let ids: Vec<String> = (1..=args.gateways)
        .map(|i| format!("gw-dev-{i:02}"))
        .collect();

    println!("creating a PKI in {}", dir.join("pki").display());
    let pki_dir = dir.join("pki");
    pki::init(&pki_dir, pki::DEFAULT_TRUST_DOMAIN, true)?;
    pki::issue(&pki_dir, &LeafRole::loopback_coordinator(), 30, true)?;
    pki::issue(
        &pki_dir,
        &LeafRole::Operator {
            name: dev::DEV_OPERATOR.into(),
        },
        30,
        true,
    )?;
    // Agents get their certificates the way production hosts do: a join token each, and the
    // root's fingerprint pinned (see `enroll_with_token` below).
    let root_fingerprint = crate::commands::pki::fingerprint::of_file(&pki_dir.join(pki::CA_CERT))?;

    let mut rollback = Rollback {
        dir: &dir,
        state: DevState::default(),
        armed: true,
    };
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir)?;

    // etcd, NATS, then the coordinators: agents need their addresses.
    let control = match &ha_binaries {
        Some((etcd, nats)) => {
            let storage = start_etcd(&mut rollback, etcd, &dir)?;
            let mut per_region = Vec::new();
            let mut first_leaf = None;
            for region in &regions {
                let mut spec = kt_launch::nats::NatsSpec::new(
                    &dir.join(format!("nats-{region}")),
                    &dir.join("nats-pki"),
                    region,
                )?;
                // Every other region links to the first one.
                spec.remotes = first_leaf.into_iter().collect();
                first_leaf.get_or_insert(spec.leaf);
                start_nats(&mut rollback, nats, &spec)?;
                let others: Vec<String> =
                    regions.iter().filter(|r| *r != region).cloned().collect();
                per_region.push(RegionPlan {
                    name: region.clone(),
                    storage: Some(storage.clone()),
                    events: Some(spec.events(&others)),
                });
            }
            per_region
        }
        None => vec![RegionPlan {
            name: String::new(),
            storage: None,
            events: None,
        }],
    };
    let several = control.len() > 1;
    let mut coordinators_of: Vec<Vec<SocketAddr>> = Vec::new();
    for plan in &control {
        let replicas = if plan.storage.is_some() {
            HA_REPLICAS
        } else {
            1
        };
        let mut coordinators = Vec::new();
        for i in 1..=replicas {
            let name = match (plan.storage.is_some(), several) {
                (false, _) => "coordinator".to_owned(),
                (true, false) => format!("coordinator-{i}"),
                (true, true) => format!("coordinator-{}-{i}", plan.name),
            };
            let coordinator_dir = dir.join(&name);
            std::fs::create_dir_all(&coordinator_dir)?;
            let groups_path = coordinator_dir.join("groups.yaml");
            let members: Vec<String> = ids
                .iter()
                .enumerate()
                .filter(|(g, _)| g % control.len() == coordinators_of.len())
                .map(|(_, id)| id.clone())
                .collect();
            std::fs::write(&groups_path, dev::groups_file(dev::DEV_GROUP, &members))?;
            let config_path = coordinator_dir.join("coordinator.yaml");
            // Concrete ports, not 0: a process restarted with its own command line keeps its address.
            let listen: SocketAddr = dev::free_loopback_addr()?;
            let mut config = dev::coordinator(
                listen,
                &pki_dir,
                &coordinator_dir.join("data"),
                &groups_path,
                Liveness::DEV,
            );
            if let Some(storage) = &plan.storage {
                let mut storage = storage.clone();
                if several {
                    // One etcd, a control plane per region.
                    storage.prefix = format!("{}-{}", storage.prefix, plan.name);
                    storage.replica = Some(format!("replica-{}-{i}", plan.name));
                } else {
                    storage.replica = Some(format!("replica-{i}"));
                }
                config.storage = dev::Storage::Etcd(storage);
            }
            config.events.nats = plan.events.clone();
            std::fs::write(&config_path, dev::to_yaml(&config))?;
            let coordinator = start(
                &mut rollback,
                Role::Coordinator,
                None,
                vec!["--config".into(), path_arg(&config_path)],
                &[],
                &coordinator_dir,
                Some(&run_dir.join(format!("{name}.addr"))),
            )?
            .context("the coordinator reported no address")?;
            println!("{name} listening on {coordinator}");
            coordinators.push(coordinator);
        }
        coordinators_of.push(coordinators);
    }
    let coordinator = coordinators_of[0][0];

    // One mock LLM provider serves every gateway: no network is needed.
    let provider_dir = dir.join("provider");
    std::fs::create_dir_all(&provider_dir)?;
    let provider = start(
        &mut rollback,
        Role::Provider,
        None,
        vec![
            "mock-provider".into(),
            "--listen".into(),
            dev::free_loopback_addr()?.to_string(),
        ],
        &[],
        &provider_dir,
        Some(&run_dir.join("provider.addr")),
    )?
    .context("the mock provider reported no address")?;
    println!("mock provider listening on {provider}");
    // The policy every dev gateway starts with, for a newcomer to edit and push to group dev.
    let shared_policy = dir.join("policy-config.yaml");
    std::fs::write(&shared_policy, dev::example_policy(provider))?;

    for (i, id) in ids.iter().enumerate() {
        let gw_dir = dir.join(id);
        std::fs::create_dir_all(&gw_dir)?;
        let policy = gw_dir.join("policy-config.yaml");
        std::fs::copy(&shared_policy, &policy)?;
        let gateway = start(
            &mut rollback,
            Role::Gateway,
            Some(id),
            vec![
                "--config".into(),
                path_arg(&policy),
                "--listen".into(),
                dev::free_loopback_addr()?.to_string(),
                "--gateway-id".into(),
                id.clone(),
                "--events-file".into(),
                path_arg(&gw_dir.join("events.jsonl")),
                "--probe-token-file".into(),
                path_arg(&gw_dir.join("probe-token")),
                "--shadow-config".into(),
                path_arg(&kt_launch::configs::shadow_config_path(&policy)),
            ],
            &[dev::MOCK_PROVIDER_SECRET],
            &gw_dir,
            Some(&run_dir.join(format!("{id}.addr"))),
        )?
        .context("the gateway reported no address")?;

        // With regions, gateway i belongs to region i mod regions; else half us, half eu.
        let coordinators = &coordinators_of[i % coordinators_of.len()];
        let region = match &control[i % control.len()].name {
            name if several => name.as_str(),
            _ if i % 2 == 0 => "us",
            _ => "eu",
        };
        // Each agent starts with another replica, then tries the others in turn.
        let first = coordinators[i % coordinators.len()];
        let others: Vec<SocketAddr> = coordinators
            .iter()
            .cycle()
            .skip(i % coordinators.len() + 1)
            .take(coordinators.len() - 1)
            .copied()
            .collect();
        let agent_path = gw_dir.join("agent.yaml");
        let mut agent_config = dev::agent(&AgentSpec {
            gateway_id: id,
            more_coordinators: &others,
            coordinator: first,
            pki: &pki_dir,
            gateway,
            health_interval: Duration::from_secs(1),
            labels: &[("region", region), ("env", "dev")],
            config_path: Some(&policy),
            validator: &dev::find_binary("kt-gateway"),
            events_file: Some(&gw_dir.join("events.jsonl")),
            probe_token_file: Some(&gw_dir.join("probe-token")),
            max_buffered_events: None,
            state_dir: &gw_dir.join("agent-state"),
            metrics_listen: None,
        });
        let operator = operator_context(&pki_dir, coordinators[0]);
        enroll_with_token(&mut agent_config, &operator, id, &gw_dir, &root_fingerprint).await?;
        std::fs::write(&agent_path, dev::to_yaml(&agent_config))?;
        start(
            &mut rollback,
            Role::Agent,
            Some(id),
            vec!["--config".into(), path_arg(&agent_path)],
            &[],
            &gw_dir,
            None,
        )?;
        println!(
            "{id}: gateway on http://{gateway} (events in {}), agent started (region {region})",
            gw_dir.join("events.jsonl").display()
        );
    }

    let ktctl_path = dir.join(dev::KTCTL_CONFIG_FILE);
    let context = |name: String, coordinator: SocketAddr| ktconfig::Context {
        name,
        ..operator_context(&pki_dir, coordinator)
    };
    let mut contexts = vec![context("dev".into(), coordinator)];
    if several {
        // A context per region, each reaching that region's first replica.
        for (plan, coordinators) in control.iter().zip(&coordinators_of) {
            contexts.push(context(format!("dev-{}", plan.name), coordinators[0]));
        }
    }
    let config = KtctlConfig {
        current_context: Some("dev".into()),
        contexts,
    };
    config.save(&ktctl_path)?;

    if several {
        // Each region's control plane knows its own gateways: gateway i is in region i mod n.
        for (r, plan) in control.iter().enumerate() {
            let in_region = ids.iter().skip(r).step_by(control.len()).count();
            let context = format!("dev-{}", plan.name);
            wait_until_connected(&config, &ktctl_path, Some(&context), in_region).await?;
        }
    } else {
        wait_until_connected(&config, &ktctl_path, None, ids.len()).await?;
    }
    rollback.armed = false;
    // Plain `ktctl` (and `dev status`, `dev down`) find this fleet from now on.
    if let Err(error) = dev::set_current(&dir) {
        eprintln!(
            "warning: cannot record {} as the current dev fleet: {error}",
            dir.display()
        );
    }

    println!();
    let control_plane = match control.len() {
        _ if ha_binaries.is_none() => "1 coordinator".to_owned(),
        1 => format!("etcd, NATS and {HA_REPLICAS} coordinator replicas"),
        n => format!(
            "{n} regions ({}), each with NATS and {HA_REPLICAS} coordinator replicas, on one etcd",
            regions.join(", ")
        ),
    };
    println!(
        "dev fleet is up: {control_plane}, {} gateways, all connected and healthy",
        ids.len()
    );
    println!("next:");
    // This fleet is now the current one; only a ktctl config of the user's own comes first.
    let found = ktconfig::default_paths(None)
        .into_iter()
        .find(|p| p.is_file());
    if found.as_deref() != Some(ktctl_path.as_path()) {
        println!("  export KTCTL_CONFIG={}", ktctl_path.display());
    }
    for (command, what) in [
        ("ktctl gateway health", "one row per gateway"),
        ("ktctl fleet watch", "live changes, Ctrl-C to stop"),
        (
            "ktctl cluster status",
            "the control plane: replicas, leader, etcd",
        ),
        (
            "ktctl dev status",
            "the processes, their pids and addresses",
        ),
        ("ktctl dev down", "stop them all"),
    ] {
        println!("  {command:<24}  {what}");
    }
    println!(
        "the gateways run {}: edit it (bump pack.version) and roll it out with",
        shared_policy.display()
    );
    println!(
        "  ktctl config push --file {} --group dev --batch-size 1 --rollback-on-error",
        shared_policy.display()
    );
    Ok(())
}

/// The dev operator's context against `coordinator`.
fn operator_context(pki_dir: &Path, coordinator: SocketAddr) -> ktconfig::Context {
    ktconfig::Context {
        name: "dev".into(),
        coordinator: format!("https://{coordinator}"),
        server_name: None,
        ca: pki_dir.join(pki::CA_CERT),
        cert: pki_dir.join(format!("operator-{}.crt", dev::DEV_OPERATOR)),
        key: pki_dir.join(format!("operator-{}.key", dev::DEV_OPERATOR)),
    }
}

/// How long a coordinator just started may take to answer (etcd connected, replicas up).
const COORDINATOR_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Makes `config` the config of an agent that enrolls at its first start: a one-use join token
/// for `id` in `dir/join-token`, the root's fingerprint pinned, its certificate to come in
/// `dir/tls/`.
async fn enroll_with_token(
    config: &mut dev::AgentConfig,
    operator: &ktconfig::Context,
    id: &str,
    dir: &Path,
    root_fingerprint: &str,
) -> anyhow::Result<()> {
    let request = kt_proto::v1::CreateJoinTokenRequest {
        scope: Some(kt_proto::v1::JoinTokenScope {
            gateway_id: id.to_owned(),
            ..Default::default()
        }),
        ttl_ms: 3_600_000,
        never_expires: false,
        uses: 1,
    };
    let deadline = tokio::time::Instant::now() + COORDINATOR_ANSWER_TIMEOUT;
    let token = loop {
        let created = async {
            let mut client = crate::client::connect(operator).await?;
            let created = client
                .create_join_token(request.clone())
                .await
                .map_err(crate::status_error)?;
            anyhow::Ok(created.into_inner().token)
        };
        match created.await {
            Ok(token) => break token,
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(error.context(format!("cannot create a join token for {id}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    dev::enroll_on_first_boot(config, dir, &token, root_fingerprint)
        .with_context(|| format!("cannot write {}", dir.join("join-token").display()))
}

/// What one region's coordinators run on: etcd and NATS with `--ha`, else nothing but their
/// embedded stores.
struct RegionPlan {
    name: String,
    storage: Option<dev::EtcdStorage>,
    events: Option<dev::NatsEvents>,
}

/// Starts one region's nats-server (JetStream, mutual TLS with a CA of its own).
fn start_nats(
    rollback: &mut Rollback<'_>,
    binary: &Path,
    spec: &kt_launch::nats::NatsSpec,
) -> anyhow::Result<()> {
    let config = spec.write_config()?;
    let log = spec.dir.join("nats.log");
    let mut child = dev::spawn(binary, &["-c".into(), path_arg(&config)], &[], &log)?;
    rollback.state.processes.push(DevProcess {
        role: Role::Nats,
        id: Some(spec.region.clone()),
        pid: child.id(),
        address: Some(spec.client.to_string()),
        binary: binary.to_owned(),
        log: log.clone(),
    });
    rollback.state.save(rollback.dir)?;
    kt_launch::nats::wait_listening(&mut child, spec, &log, READY_TIMEOUT)?;
    println!(
        "nats-server ({}) listening on tls://{}",
        spec.region, spec.client
    );
    Ok(())
}

/// Starts a one-member etcd on loopback with a CA of its own (no agent certificate can reach
/// it), and returns what the coordinators' `storage.etcd` says.
fn start_etcd(
    rollback: &mut Rollback<'_>,
    binary: &Path,
    dir: &Path,
) -> anyhow::Result<dev::EtcdStorage> {
    let etcd_dir = dir.join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let spec = kt_launch::etcd::EtcdSpec::with_own_ca(&etcd_dir, "kt-dev")?;
    let log = etcd_dir.join("etcd.log");
    let mut child = dev::spawn(binary, &kt_launch::etcd::args(&spec), &[], &log)?;
    rollback.state.processes.push(DevProcess {
        role: Role::Etcd,
        id: None,
        pid: child.id(),
        address: Some(spec.client.to_string()),
        binary: binary.to_owned(),
        log: log.clone(),
    });
    rollback.state.save(rollback.dir)?;
    kt_launch::etcd::wait_listening(&mut child, spec.client, &log, READY_TIMEOUT)?;
    println!("etcd listening on https://{}", spec.client);
    Ok(spec.storage(Duration::from_secs(5), Duration::from_secs(2)))
}

fn dir_flag(dir: &DirArg) -> String {
    dir.dir
        .as_ref()
        .map(|d| format!(" --dir {}", d.display()))
        .unwrap_or_default()
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// Starts one process, records it, and waits for its address when it has a ready file.
fn start(
    rollback: &mut Rollback<'_>,
    role: Role,
    id: Option<&String>,
    mut args: Vec<String>,
    env: &[(&str, &str)],
    workdir: &Path,
    ready_file: Option<&PathBuf>,
) -> anyhow::Result<Option<SocketAddr>> {
    let binary = dev::find_binary(role.binary());
    let binary = std::fs::canonicalize(&binary).unwrap_or(binary);
    let log = workdir.join(format!("{}.log", role.as_str()));
    if let Some(ready) = ready_file {
        let _ = std::fs::remove_file(ready);
        args.extend(["--ready-file".into(), path_arg(ready)]);
    }
    let mut child = dev::spawn(&binary, &args, env, &log)?;
    rollback.state.processes.push(DevProcess {
        role,
        id: id.cloned(),
        pid: child.id(),
        address: None,
        binary,
        log: log.clone(),
    });
    rollback.state.save(rollback.dir)?;
    let Some(ready) = ready_file else {
        return Ok(None);
    };
    let addr = dev::wait_ready(&mut child, ready, &log, READY_TIMEOUT).with_context(|| {
        format!(
            "{} {} did not start",
            role.as_str(),
            id.map(String::as_str).unwrap_or("")
        )
    })?;
    if let Some(last) = rollback.state.processes.last_mut() {
        last.address = Some(addr.to_string());
    }
    rollback.state.save(rollback.dir)?;
    Ok(Some(addr))
}

/// Waits until every dev gateway is connected and healthy, as `ktctl gateway health` sees it.
async fn wait_until_connected(
    config: &KtctlConfig,
    path: &Path,
    context: Option<&str>,
    expected: usize,
) -> anyhow::Result<()> {
    let context = config.context(context, path)?;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while tokio::time::Instant::now() < deadline {
        match crate::client::connect(context).await {
            Ok(mut client) => match crate::client::list_gateways(&mut client, "").await {
                Ok(gateways) => {
                    let now = kt_daemon::unix_ms_now();
                    let rows: Vec<GatewayRow> = gateways
                        .iter()
                        .map(|g| GatewayRow::from_state(g, now))
                        .collect();
                    let ok = rows.iter().filter(|r| r.is_ok()).count();
                    if ok == expected {
                        return Ok(());
                    }
                    last = format!("{ok} of {expected} gateways connected and healthy");
                }
                Err(status) => last = status.message().to_owned(),
            },
            Err(e) => last = crate::error_line(&e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "the fleet (context {}) did not come up within {READY_TIMEOUT:?}: {last}",
        context.name
    )
}
