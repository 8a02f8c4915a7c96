//! The coordinator's config file, parsed strictly and validated into typed values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kt_daemon::yaml::{ConfigFileError, read_yaml_file};
use kt_proto::identity::GatewayId;
use kt_proto::tls::TlsFiles;
use serde::{Deserialize, Serialize};

/// `coordinator.yaml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where agents and operators connect.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// Where the coordinator keeps its state.
    pub data_dir: PathBuf,
    /// The groups file (`groups: {name: {gateways: [...], config_source: ...}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_file: Option<PathBuf>,
    #[serde(default)]
    pub liveness: LivenessConfig,
    #[serde(default)]
    pub events: EventsConfig,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP, read-only); none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Limits on incoming connections and their TLS handshakes.
    #[serde(default)]
    pub connections: kt_daemon::conn::ConnectionLimits,
    /// Where the state lives: the embedded store (the default, one coordinator) or etcd
    /// (several replicas, one leader).
    #[serde(default, skip_serializing_if = "Storage::is_embedded")]
    pub storage: Storage,
    /// Agents enroll with join tokens and renew their certificates here; none when unset
    /// (agent certificates are then issued by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<EnrollmentConfig>,
}

/// `enrollment:`: the issuing CA that signs agent certificates, and how long they live.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// The issuing CA (`issuing-ca.crt`, `issuing-ca.key` from `ktctl pki init`), under the
    /// root in `tls.ca`. Never the root's own key.
    pub issuing_ca: IssuingCaFiles,
    /// How long an agent certificate lives; agents renew at 70 to 90% of it.
    #[serde(default = "default_agent_cert_ttl", with = "humantime_serde")]
    pub agent_cert_ttl: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuingCaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_agent_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Agent certificates shorter than this would be renewed faster than a loaded coordinator
/// answers; longer than this defeats short-lived certificates.
pub const MIN_AGENT_CERT_TTL: Duration = Duration::from_secs(10);
pub const MAX_AGENT_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// `storage:`: absent for SQLite in `data_dir` (one coordinator), `{etcd: {...}}` for replicas.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(from = "StorageFile", into = "StorageFile")]
pub enum Storage {
    #[default]
    Embedded,
    Etcd(EtcdStorage),
}

/// `storage:` as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StorageFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd: Option<EtcdStorage>,
}

impl From<StorageFile> for Storage {
    fn from(file: StorageFile) -> Self {
        file.etcd.map_or(Storage::Embedded, Storage::Etcd)
    }
}

impl From<Storage> for StorageFile {
    fn from(storage: Storage) -> Self {
        match storage {
            Storage::Embedded => StorageFile::default(),
            Storage::Etcd(etcd) => StorageFile { etcd: Some(etcd) },
        }
    }
}

impl Storage {
    pub fn is_embedded(&self) -> bool {
        *self == Storage::Embedded
    }
}

/// `storage.etcd`: where etcd is, and how this replica takes part.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdStorage {
    /// `https://host:port` of etcd members.
    pub endpoints: Vec<String>,
    /// etcd's own CA and this replica's etcd client certificate; a CA of its own, so that no
    /// agent certificate of the deployment can reach etcd.
    pub tls: TlsFiles,
    /// Every key lives under it, so several fleets can share one etcd.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// The lease of this replica's leadership and fleet records: a replica cut off from etcd
    /// for this long loses both (and stops acting as leader well before).
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This replica's name in `ktctl cluster status`; unique per replica. Defaults to the host
    /// name and the listen port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// How long one etcd request may take before it counts as failed.
    #[serde(default = "default_etcd_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_etcd_prefix() -> String {
    "/kt-fleet".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_etcd_timeout() -> Duration {
    Duration::from_secs(3)
}

/// Where decision events go: the embedded store (kept `retention` and `max_events`), or a
/// NATS JetStream stream shared by replicas and regions (`nats:`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    pub max_events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsEvents>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention: Duration::from_secs(24 * 3600),
            max_events: 5_000_000,
            nats: None,
        }
    }
}

/// `events.nats`: the JetStream stream every replica of this region publishes agent batches
/// to, and where tails and the leader's counters read them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NatsEvents {
    /// `tls://host:port` of this region's NATS servers.
    pub urls: Vec<String>,
    /// NATS' own CA and this replica's NATS client certificate (a CA of its own, like etcd's:
    /// no agent certificate of the deployment can reach NATS).
    pub tls: TlsFiles,
    /// The stream's name; the same in every region.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// This region: batches are published on `kt.events.<region>.<gateway>`. With `regions`,
    /// also the JetStream domain of this region's NATS servers.
    #[serde(default = "default_region")]
    pub region: String,
    /// Other regions whose streams this region's stream sources (their JetStream domains, over
    /// NATS leaf node connections): a tail here shows their events too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Copies JetStream keeps of the stream (a NATS cluster of at least as many servers).
    #[serde(default = "default_stream_replicas")]
    pub replicas: usize,
    /// Batches older than this are removed from the stream.
    #[serde(default = "default_stream_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// The stream's size limit in bytes; the oldest batches go first.
    #[serde(default = "default_stream_bytes")]
    pub max_bytes: u64,
}

fn default_stream() -> String {
    "KT_EVENTS".into()
}

fn default_region() -> String {
    "default".into()
}

fn default_stream_replicas() -> usize {
    1
}

fn default_stream_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_stream_bytes() -> u64 {
    10 << 30
}

/// A NATS subject token or JetStream name: letters, digits, `-` and `_`.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl NatsEvents {
    fn validate(&self, path: &Path) -> Result<(), ConfigFileError> {
        let invalid = |field: &str, why: &str| ConfigFileError::invalid(path, field, why);
        if self.urls.is_empty() {
            return Err(invalid("events.nats.urls", "name at least one NATS server"));
        }
        if let Some(bad) = self.urls.iter().find(|u| !u.starts_with("tls://")) {
            return Err(invalid(
                "events.nats.urls",
                &format!("{bad:?} is not tls://host:port: NATS is reached over mutual TLS only"),
            ));
        }
        if !is_token(&self.stream) {
            return Err(invalid(
                "events.nats.stream",
                "1 to 64 of letters, digits, - and _",
            ));
        }
        let regions = std::iter::once(&self.region).chain(&self.regions);
        if let Some(bad) = regions.clone().find(|r| !is_token(r)) {
            return Err(invalid(
                "events.nats.region",
                &format!("{bad:?}: a region is 1 to 64 of letters, digits, - and _"),
            ));
        }
        if self.regions.contains(&self.region) {
            return Err(invalid(
                "events.nats.regions",
                "lists other regions only, not this one",
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(invalid("events.nats.replicas", "must be 1 to 5"));
        }
        if self.max_age < Duration::from_secs(60) {
            return Err(invalid("events.nats.max_age", "must be at least 1m"));
        }
        if self.max_bytes < 1 << 20 {
            return Err(invalid("events.nats.max_bytes", "must be at least 1 MiB"));
        }
        Ok(())
    }
}

/// How the coordinator judges agent liveness; all durations like `15s` or `2m`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// The heartbeat interval assigned to agents in the welcome.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long: `unreachable`.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// No heartbeat for this long: `disconnected`.
    #[serde(with = "humantime_serde")]
    pub disconnected_after: Duration,
    /// No heartbeat for this long: `gone`.
    #[serde(with = "humantime_serde")]
    pub gone_after: Duration,
    /// Announced in the welcome: an agent that loses its session waits a random delay up to
    /// this long before reconnecting, so a coordinator restart is not met by every agent at once.
    #[serde(with = "humantime_serde")]
    pub reconnect_spread: Duration,
}

fn default_reconnect_spread() -> Duration {
    Duration::from_secs(5)
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat_interval: Duration::from_secs(15),
            unreachable_after: Duration::from_secs(45),
            disconnected_after: Duration::from_secs(120),
            gone_after: Duration::from_secs(24 * 3600),
            reconnect_spread: default_reconnect_spread(),
        }
    }
}

impl EtcdStorage {
    fn validate(&self, path: &Path) -> Result<(), ConfigFileError> {
        let invalid = |field: &str, why: &str| ConfigFileError::invalid(path, field, why);
        if self.endpoints.is_empty() {
            return Err(invalid(
                "storage.etcd.endpoints",
                "name at least one etcd member",
            ));
        }
        if let Some(bad) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(invalid(
                "storage.etcd.endpoints",
                &format!("{bad:?} is not https://host:port: etcd is reached over mutual TLS only"),
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 || self.prefix.ends_with('/') {
            return Err(invalid(
                "storage.etcd.prefix",
                "must start with / and not end with one, like /kt-fleet",
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(300) {
            return Err(invalid(
                "storage.etcd.lease_ttl",
                "must be between 2s and 5m",
            ));
        }
        if self.request_timeout.is_zero() || self.request_timeout * 2 >= self.lease_ttl {
            return Err(invalid(
                "storage.etcd.request_timeout",
                "must be above 0 and under half of lease_ttl, so a leader notices a lost lease in time",
            ));
        }
        if let Some(replica) = &self.replica
            && (replica.is_empty()
                || replica.len() > 128
                || !replica
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
        {
            return Err(invalid(
                "storage.etcd.replica",
                "1 to 128 of letters, digits, - _ . :",
            ));
        }
        Ok(())
    }

    /// This replica's name: as configured, else the host name and the listen port.
    pub fn replica_name(&self, listen: SocketAddr) -> String {
        self.replica.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "coordinator".into());
            format!("{host}:{}", listen.port())
        })
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 41001))
}

impl CoordinatorConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: CoordinatorConfig = read_yaml_file(path)?;
        config.resolve_paths(path);
        config.validate(path)?;
        Ok(config)
    }

    /// Relative paths in the file are relative to the file's directory, as operators expect.
    fn resolve_paths(&mut self, path: &Path) {
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.data_dir,
        ] {
            *p = base.join(&*p);
        }
        if let Some(groups) = &mut self.groups_file {
            *groups = base.join(&*groups);
        }
        if let Storage::Etcd(etcd) = &mut self.storage {
            for p in [&mut etcd.tls.ca, &mut etcd.tls.cert, &mut etcd.tls.key] {
                *p = base.join(&*p);
            }
        }
        if let Some(nats) = &mut self.events.nats {
            for p in [&mut nats.tls.ca, &mut nats.tls.cert, &mut nats.tls.key] {
                *p = base.join(&*p);
            }
        }
        if let Some(enrollment) = &mut self.enrollment {
            for p in [
                &mut enrollment.issuing_ca.cert,
                &mut enrollment.issuing_ca.key,
            ] {
                *p = base.join(&*p);
            }
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigFileError> {
        if let Storage::Etcd(etcd) = &self.storage {
            etcd.validate(path)?;
        }
        if let Some(nats) = &self.events.nats {
            nats.validate(path)?;
            // The leader's decision counters and their stream position are kept in etcd.
            if self.storage.is_embedded() {
                return Err(ConfigFileError::invalid(
                    path,
                    "events.nats",
                    "needs storage.etcd: the leader keeps the stream's decision counters and their position there",
                ));
            }
        }
        if let Some(enrollment) = &self.enrollment {
            let ttl = enrollment.agent_cert_ttl;
            if !(MIN_AGENT_CERT_TTL..=MAX_AGENT_CERT_TTL).contains(&ttl) {
                return Err(ConfigFileError::invalid(
                    path,
                    "enrollment.agent_cert_ttl",
                    format!(
                        "must be between {} and {}",
                        humantime_serde::re::humantime::format_duration(MIN_AGENT_CERT_TTL),
                        humantime_serde::re::humantime::format_duration(MAX_AGENT_CERT_TTL)
                    ),
                ));
            }
        }
        let l = &self.liveness;
        if l.heartbeat_interval < Duration::from_millis(50) {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.heartbeat_interval",
                "must be at least 50ms",
            ));
        }
        if l.unreachable_after <= l.heartbeat_interval {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.unreachable_after",
                "must be longer than liveness.heartbeat_interval",
            ));
        }
        if l.disconnected_after <= l.unreachable_after {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.disconnected_after",
                "must be longer than liveness.unreachable_after",
            ));
        }
        if l.gone_after <= l.disconnected_after {
            return Err(ConfigFileError::invalid(
                path,
                "liveness.gone_after",
                "must be longer than liveness.disconnected_after",
            ));
        }
        Ok(())
    }
}

/// A groups file as written (`groups: {name: ...}`); [`load_groups`] checks it into [`Group`]s.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsFile {
    pub groups: BTreeMap<String, GroupSpec>,
}

/// One group as written in a groups file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Gateways whose labels all match are members too.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_source: Option<PathBuf>,
    /// How often the config source is read (default 10s; SIGHUP reads it at once).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub source_poll_interval: Option<Duration>,
    #[serde(default)]
    pub drift: DriftPolicy,
    /// Another group that must run the source's content, healthy, before this one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// How rollouts started by the config source run.
    #[serde(default)]
    pub rollout: GroupRollout,
}

/// What the coordinator does about a gateway running something other than its desired config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftPolicy {
    /// Show it (`gateway health`, `doctor`), change nothing.
    #[default]
    Warn,
    /// Offer the desired config again, with backoff, unless a rollout holds the gateway.
    Enforce,
}

impl DriftPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftPolicy::Warn => "warn",
            DriftPolicy::Enforce => "enforce",
        }
    }
}

/// A group's rollout defaults, as written in the groups file (the flags of `ktctl config push`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupRollout {
    pub strategy: GroupStrategy,
    /// A count (`1`) or a share of the group (`25%`).
    pub batch_size: BatchSize,
    #[serde(with = "humantime_serde")]
    pub pause_between: Duration,
    #[serde(with = "humantime_serde")]
    pub min_healthy_time: Duration,
    pub max_block_rate_delta: Option<f64>,
    pub max_error_rate: Option<f64>,
    pub min_sample: u64,
    pub continue_on_inconclusive: bool,
    pub rollback_on_error: bool,
    #[serde(with = "humantime_serde")]
    pub apply_deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub progress_deadline: Duration,
}

impl Default for GroupRollout {
    fn default() -> Self {
        GroupRollout {
            strategy: GroupStrategy::Rolling,
            batch_size: BatchSize::Count(1),
            pause_between: Duration::ZERO,
            min_healthy_time: Duration::from_secs(10),
            max_block_rate_delta: None,
            max_error_rate: None,
            min_sample: 50,
            continue_on_inconclusive: false,
            rollback_on_error: true,
            apply_deadline: Duration::from_secs(60),
            progress_deadline: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupStrategy {
    Rolling,
    /// The first batch waits for `ktctl rollout promote`.
    Canary,
    #[serde(alias = "all_at_once")]
    AllAtOnce,
}

/// `1` or `"25%"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

impl serde::Serialize for BatchSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchSize::Count(n) => s.serialize_u32(*n),
            BatchSize::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Text(String),
        }
        let invalid = |what: &str| {
            serde::de::Error::custom(format!(
                "batch_size {what:?} is neither a count (1) nor a share (25%) between 1% and 100%"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Count(0) => Err(invalid("0")),
            Raw::Count(n) => Ok(BatchSize::Count(n)),
            Raw::Text(text) => match text.strip_suffix('%').map(str::parse::<u32>) {
                Some(Ok(p)) if (1..=100).contains(&p) => Ok(BatchSize::Percent(p)),
                _ => match text.parse::<u32>() {
                    Ok(n) if n > 0 => Ok(BatchSize::Count(n)),
                    _ => Err(invalid(&text)),
                },
            },
        }
    }
}

/// How often a config source is read when the groups file does not say.
pub const DEFAULT_SOURCE_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// A named set of gateways (listed, or matched by labels) and the config they should run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub gateways: Vec<GatewayId>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub config_source: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub source_poll_interval: Option<Duration>,
    #[serde(default)]
    pub drift: DriftPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default)]
    pub rollout: GroupRollout,
}

impl Group {
    /// A group of listed gateways, every other setting at its default.
    pub fn of_gateways(name: &str, gateways: Vec<GatewayId>) -> Group {
        Group {
            name: name.to_owned(),
            gateways,
            selector: BTreeMap::new(),
            config_source: None,
            source_poll_interval: None,
            drift: DriftPolicy::Warn,
            after: None,
            rollout: GroupRollout::default(),
        }
    }

    /// Whether a gateway with these labels belongs to this group.
    pub fn contains<'a>(&self, gateway: &str, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.gateways.iter().any(|g| g.as_str() == gateway)
            || (!self.selector.is_empty()
                && self
                    .selector
                    .iter()
                    .all(|(k, v)| label(k) == Some(v.as_str())))
    }
}

/// Loads a groups file; every gateway id must be valid.
pub fn load_groups(path: &Path) -> Result<Vec<Group>, ConfigFileError> {
    let raw: GroupsFile = read_yaml_file(path)?;
    groups_from_raw(path, raw)
}

/// Parses groups sent by an operator (`ktctl groups apply`); `source` names them in errors.
pub fn parse_groups(source: &Path, text: &str) -> Result<Vec<Group>, ConfigFileError> {
    let raw: GroupsFile = kt_daemon::yaml::parse_yaml(source, text)?;
    groups_from_raw(source, raw)
}

fn groups_from_raw(path: &Path, raw: GroupsFile) -> Result<Vec<Group>, ConfigFileError> {
    let base = path.parent().unwrap_or(Path::new("."));
    raw.groups
        .into_iter()
        .map(|(name, group)| {
            let gateways = group
                .gateways
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    GatewayId::new(id).map_err(|e| {
                        ConfigFileError::invalid(
                            path,
                            format!("groups.{name}.gateways[{i}]"),
                            e.to_string(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            if let Err(why) = GatewayId::new(&name) {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("groups.{name}"),
                    format!("invalid group name: {why}"),
                ));
            }
            check_rollout(path, &name, &group.rollout)?;
            if group
                .source_poll_interval
                .is_some_and(|d| d < Duration::from_millis(100))
            {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("groups.{name}.source_poll_interval"),
                    "must be at least 100ms",
                ));
            }
            Ok(Group {
                gateways,
                selector: group.selector,
                config_source: group.config_source.map(|p| base.join(p)),
                source_poll_interval: group.source_poll_interval,
                drift: group.drift,
                after: group.after,
                rollout: group.rollout,
                name,
            })
        })
        .collect::<Result<Vec<Group>, _>>()
        .and_then(|groups| check_after(path, groups))
}

fn check_rollout(path: &Path, group: &str, r: &GroupRollout) -> Result<(), ConfigFileError> {
    for (field, value) in [
        ("max_block_rate_delta", r.max_block_rate_delta),
        ("max_error_rate", r.max_error_rate),
    ] {
        if value.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
            return Err(ConfigFileError::invalid(
                path,
                format!("groups.{group}.rollout.{field}"),
                "must be between 0 and 1",
            ));
        }
    }
    if r.apply_deadline.is_zero() || r.progress_deadline.is_zero() {
        return Err(ConfigFileError::invalid(
            path,
            format!("groups.{group}.rollout"),
            "apply_deadline and progress_deadline must be longer than zero",
        ));
    }
    Ok(())
}

/// `after:` names another group of the same file, and following `after:` never loops.
fn check_after(path: &Path, groups: Vec<Group>) -> Result<Vec<Group>, ConfigFileError> {
    let after_of = |name: &str| {
        groups
            .iter()
            .find(|g| g.name == name)
            .and_then(|g| g.after.clone())
    };
    for group in &groups {
        let Some(first) = &group.after else { continue };
        let field = format!("groups.{}.after", group.name);
        if !groups.iter().any(|g| &g.name == first) {
            return Err(ConfigFileError::invalid(
                path,
                field,
                format!("no group named {first:?} in this file"),
            ));
        }
        let mut seen = vec![group.name.clone()];
        let mut next = Some(first.clone());
        while let Some(name) = next {
            if seen.contains(&name) {
                seen.push(name);
                return Err(ConfigFileError::invalid(
                    path,
                    field,
                    format!("`after` goes round in a circle: {}", seen.join(" -> ")),
                ));
            }
            next = after_of(&name);
            seen.push(name);
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.yaml",
            "tls: {ca: ca.crt, cert: c.crt, key: c.key}\ndata_dir: data\n",
        );
        let config = CoordinatorConfig::load(&path).expect("valid");
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.data_dir, dir.path().join("data"));
        assert_eq!(config.liveness, LivenessConfig::default());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.yaml",
            "tls: {ca: a, cert: b, key: c}\ndata_dir: d\nliveness:\n  heartbeat: 1s\n",
        );
        let msg = CoordinatorConfig::load(&path)
            .expect_err("unknown key")
            .to_string();
        assert!(msg.contains("c.yaml"), "{msg}");
        assert!(msg.contains("heartbeat"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn etcd_storage_resolves_paths_and_refuses_what_cannot_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "tls: {ca: a, cert: b, key: c}\ndata_dir: d\n";
        let path = write(
            dir.path(),
            "c.yaml",
            &format!(
                "{base}storage:\n  etcd:\n    endpoints: [https://10.0.0.1:2379]\n    tls: {{ca: etcd/ca.crt, cert: etcd/c.crt, key: etcd/c.key}}\n"
            ),
        );
        let config = CoordinatorConfig::load(&path).expect("valid");
        let Storage::Etcd(etcd) = &config.storage else {
            panic!("etcd storage expected");
        };
        assert_eq!(etcd.tls.ca, dir.path().join("etcd/ca.crt"));
        assert_eq!(etcd.prefix, "/kt-fleet");
        assert_eq!(etcd.lease_ttl, Duration::from_secs(10));
        assert!(etcd.replica_name(default_listen()).ends_with(":41001"));
        for (storage, field) in [
            (
                "{endpoints: [], tls: {ca: a, cert: b, key: c}}",
                "storage.etcd.endpoints",
            ),
            (
                "{endpoints: [http://h:2379], tls: {ca: a, cert: b, key: c}}",
                "storage.etcd.endpoints",
            ),
            (
                "{endpoints: [https://h:2379], tls: {ca: a, cert: b, key: c}, prefix: kt}",
                "storage.etcd.prefix",
            ),
            (
                "{endpoints: [https://h:2379], tls: {ca: a, cert: b, key: c}, lease_ttl: 1s}",
                "storage.etcd.lease_ttl",
            ),
            (
                "{endpoints: [https://h:2379], tls: {ca: a, cert: b, key: c}, lease_ttl: 4s, request_timeout: 3s}",
                "storage.etcd.request_timeout",
            ),
            (
                "{endpoints: [https://h:2379], tls: {ca: a, cert: b, key: c}, replica: 'a b'}",
                "storage.etcd.replica",
            ),
        ] {
            let path = write(
                dir.path(),
                "bad.yaml",
                &format!("{base}storage: {{etcd: {storage}}}\n"),
            );
            let msg = CoordinatorConfig::load(&path)
                .expect_err(storage)
                .to_string();
            assert!(msg.contains(field), "{storage}: {msg}");
        }
    }

    #[test]
    fn nats_events_need_etcd_and_refuse_what_cannot_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "tls: {ca: a, cert: b, key: c}\ndata_dir: d\n";
        let etcd =
            "storage: {etcd: {endpoints: [https://h:2379], tls: {ca: a, cert: b, key: c}}}\n";
        let nats =
            "{urls: [tls://127.0.0.1:4222], tls: {ca: n/ca.crt, cert: n/c.crt, key: n/c.key}";
        let path = write(
            dir.path(),
            "c.yaml",
            &format!("{base}{etcd}events: {{nats: {nats}, region: eu, regions: [us]}}}}\n"),
        );
        let config = CoordinatorConfig::load(&path).expect("valid");
        let events = config.events.nats.expect("nats");
        assert_eq!(events.tls.ca, dir.path().join("n/ca.crt"));
        assert_eq!((events.stream.as_str(), events.replicas), ("KT_EVENTS", 1));
        assert_eq!(events.regions, ["us"]);
        for (text, field) in [
            (
                format!("{base}events: {{nats: {nats}}}}}\n"),
                "needs storage.etcd",
            ),
            (
                format!(
                    "{base}{etcd}events: {{nats: {{urls: [nats://h:4222], tls: {{ca: a, cert: b, key: c}}}}}}\n"
                ),
                "events.nats.urls",
            ),
            (
                format!("{base}{etcd}events: {{nats: {nats}, stream: a.b}}}}\n"),
                "events.nats.stream",
            ),
            (
                format!("{base}{etcd}events: {{nats: {nats}, region: 'e u'}}}}\n"),
                "events.nats.region",
            ),
            (
                format!("{base}{etcd}events: {{nats: {nats}, region: eu, regions: [eu]}}}}\n"),
                "events.nats.regions",
            ),
            (
                format!("{base}{etcd}events: {{nats: {nats}, replicas: 0}}}}\n"),
                "events.nats.replicas",
            ),
            (
                format!("{base}{etcd}events: {{nats: {nats}, max_age: 1s}}}}\n"),
                "events.nats.max_age",
            ),
        ] {
            let path = write(dir.path(), "bad.yaml", &text);
            let msg = CoordinatorConfig::load(&path).expect_err(&text).to_string();
            assert!(msg.contains(field), "{text}: {msg}");
        }
    }

    #[test]
    fn liveness_order_is_enforced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.yaml",
            "tls: {ca: a, cert: b, key: c}\ndata_dir: d\nliveness: {heartbeat_interval: 10s, unreachable_after: 5s}\n",
        );
        let msg = CoordinatorConfig::load(&path)
            .expect_err("bad order")
            .to_string();
        assert!(msg.contains("liveness.unreachable_after"), "{msg}");
    }

    #[test]
    fn groups_file_parses_and_rejects_bad_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "groups.yaml",
            "groups:\n  production:\n    gateways: [gw-prod-01, gw-prod-02]\n    config_source: policies/production.yaml\n  eu:\n    gateways: [gw-eu-01]\n",
        );
        let groups = load_groups(&path).expect("valid");
        assert_eq!(groups.len(), 2);
        let prod = groups
            .iter()
            .find(|g| g.name == "production")
            .expect("production");
        assert_eq!(prod.gateways.len(), 2);
        assert_eq!(
            prod.config_source,
            Some(dir.path().join("policies/production.yaml"))
        );

        let bad = write(
            dir.path(),
            "bad.yaml",
            "groups:\n  x:\n    gateways: [Not_Valid]\n",
        );
        let msg = load_groups(&bad).expect_err("bad id").to_string();
        assert!(msg.contains("groups.x.gateways[0]"), "{msg}");
    }

    #[test]
    fn group_rollout_defaults_and_after_are_checked_with_their_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write(
            dir.path(),
            "good.yaml",
            "groups:\n  staging:\n    selector: {env: staging}\n    drift: enforce\n    rollout: {strategy: canary, batch_size: 25%, pause_between: 30s}\n  production:\n    gateways: [gw-1]\n    after: staging\n    rollout: {batch_size: 2}\n",
        );
        let groups = load_groups(&good).expect("loads");
        let staging = groups
            .iter()
            .find(|g| g.name == "staging")
            .expect("staging");
        assert_eq!(staging.drift, DriftPolicy::Enforce);
        assert_eq!(staging.rollout.batch_size, BatchSize::Percent(25));
        assert_eq!(staging.rollout.strategy, GroupStrategy::Canary);
        assert_eq!(staging.rollout.pause_between, Duration::from_secs(30));
        let production = groups
            .iter()
            .find(|g| g.name == "production")
            .expect("production");
        assert_eq!(production.rollout.batch_size, BatchSize::Count(2));
        assert_eq!(production.after.as_deref(), Some("staging"));

        for (text, field) in [
            ("groups:\n  a:\n    after: nowhere\n", "groups.a.after"),
            ("groups:\n  a:\n    after: b\n  b:\n    after: a\n", "after"),
            (
                "groups:\n  a:\n    rollout: {batch_size: 0%}\n",
                "batch_size",
            ),
            (
                "groups:\n  a:\n    rollout: {max_block_rate_delta: 2}\n",
                "groups.a.rollout.max_block_rate_delta",
            ),
            ("groups:\n  a:\n    drift: sometimes\n", "drift"),
        ] {
            let path = write(dir.path(), "bad.yaml", text);
            let msg = load_groups(&path).expect_err(text).to_string();
            assert!(msg.contains(field), "{text}: {msg}");
        }
    }
}
