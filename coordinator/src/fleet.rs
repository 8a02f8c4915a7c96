//! Fleet state: one task owns every gateway's record and is the only writer.
//!
//! Sessions and operator calls talk to it through [`FleetHandle`] (a bounded channel of
//! [`Command`]s); changes are published on a broadcast channel for `WatchFleet`. Liveness is
//! derived from heartbeat times on a periodic tick, so nothing the agent does (or fails to do)
//! can leave a record in a state that time does not eventually correct.

use std::collections::{BTreeMap, VecDeque};

use kt_daemon::unix_ms_now;
use kt_proto::identity::{DUPLICATE_AGENT_REPLACEMENTS, GatewayId};
use kt_proto::v1::coordinator_message::Body as CoordinatorBody;
use kt_proto::v1::{
    AgentState, ConfigOffer, ConfigRef, CoordinatorMessage, EventForwarding, GatewayHealth,
    GatewayState, ProbeRequest, SyncState, VerdictCounts,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::{Group, LivenessConfig};

/// Identifies one agent session, so that a stale session's end cannot touch a newer one.
pub type SessionId = u64;

/// Messages towards one agent's session.
pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

/// What an agent said in its hello.
#[derive(Clone, Debug)]
pub struct HelloInfo {
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub capabilities: Vec<String>,
    pub boot_id: String,
    pub health: Option<GatewayHealth>,
    pub peer_address: String,
    /// When the agent's verified certificate expires (Unix ms; 0 when unreadable).
    pub cert_not_after_unix_ms: u64,
    /// When it became valid (Unix ms; 0 when unreadable): with the expiry, its lifetime.
    pub cert_not_before_unix_ms: u64,
}

/// Requests to the fleet task.
#[derive(Debug)]
pub enum Command {
    Connected {
        gateway: GatewayId,
        session: SessionId,
        hello: HelloInfo,
        outbound: Outbound,
        /// Cancelled when a newer session of the same gateway replaces this one.
        replaced: CancellationToken,
    },
    Heartbeat {
        gateway: GatewayId,
        session: SessionId,
        requests_processed: u64,
        verdicts: Option<VerdictCounts>,
        errors: u64,
        events: Option<EventForwarding>,
        /// When the coordinator read it off the session.
        received: Instant,
    },
    /// Sends a message (a config offer, a probe) on the gateway's session; replies whether it
    /// was handed over.
    Deliver {
        gateway: String,
        body: CoordinatorBody,
        reply: oneshot::Sender<bool>,
    },
    /// What gateways should run (from the engine's intent): (gateway, desired, pinned).
    SetDesired {
        changes: Vec<(String, Option<ConfigRef>, bool)>,
    },
    /// Which gateways a rollout (or a re-offer) holds while they converge, or releases.
    SetHeld {
        changes: Vec<(String, Option<Hold>)>,
    },
    Status {
        gateway: GatewayId,
        session: SessionId,
        health: GatewayHealth,
    },
    /// The session ended; `clean` when the agent said goodbye first.
    Ended {
        gateway: GatewayId,
        session: SessionId,
        clean: bool,
    },
    List {
        group: Option<String>,
        reply: oneshot::Sender<Result<Vec<GatewayState>, UnknownGroup>>,
    },
    Watch {
        reply: oneshot::Sender<(Vec<GatewayState>, broadcast::Receiver<GatewayState>)>,
    },
    /// As `Watch`, with heartbeats too: for the rollout engine, whose gates read them.
    Subscribe {
        reply: oneshot::Sender<(Vec<GatewayState>, broadcast::Receiver<FleetChange>)>,
    },
    /// A gateway's record as another replica published it (`storage: etcd`); `None` when its
    /// key was deleted (that replica's lease ended, or it let the session go).
    Remote {
        gateway: GatewayId,
        state: Option<Box<GatewayState>>,
    },
    /// The leader's word on a gateway (what it should run, who holds it, its sync state) as the
    /// leader published it; `None` when withdrawn. Ignored while this replica leads.
    LeaderView {
        gateway: GatewayId,
        view: Option<Box<GatewayState>>,
    },
    /// This replica's term as leader began (true) or ended (false).
    Leading(bool),
    /// Adds or replaces groups; their listed gateways get records, every view is republished.
    ApplyGroups {
        groups: Vec<Group>,
        reply: oneshot::Sender<()>,
    },
}

/// A rollout (or a re-offer) holding a gateway while it converges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// The rollout id, or "reconcile".
    pub by: String,
    /// An offer to the gateway is unanswered.
    pub in_flight: bool,
}

/// What the engine's subscription carries.
#[derive(Clone, Debug)]
pub enum FleetChange {
    State(Box<GatewayState>),
    Heartbeat { gateway: GatewayId, at_unix_ms: u64 },
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("no group named {0:?}")]
pub struct UnknownGroup(pub String);

/// The fleet task is gone: the coordinator is shutting down.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("coordinator is shutting down")]
pub struct FleetClosed;

/// A cheap, cloneable way to reach the fleet task.
#[derive(Clone, Debug)]
pub struct FleetHandle {
    commands: mpsc::Sender<Command>,
    groups: SharedGroups,
}

impl FleetHandle {
    pub async fn send(&self, command: Command) -> Result<(), FleetClosed> {
        self.commands.send(command).await.map_err(|_| FleetClosed)
    }

    pub async fn list(
        &self,
        group: Option<String>,
    ) -> Result<Result<Vec<GatewayState>, UnknownGroup>, FleetClosed> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::List { group, reply }).await?;
        rx.await.map_err(|_| FleetClosed)
    }

    /// Hands `offer` to the gateway's open session; false when it has none or it is full.
    pub async fn offer(&self, gateway: String, offer: ConfigOffer) -> bool {
        self.deliver(gateway, CoordinatorBody::Offer(offer)).await
    }

    /// Hands a synthetic probe to the gateway's open session; false as for offers.
    pub async fn probe(&self, gateway: String, request: ProbeRequest) -> bool {
        self.deliver(gateway, CoordinatorBody::Probe(request)).await
    }

    async fn deliver(&self, gateway: String, body: CoordinatorBody) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .send(Command::Deliver {
                gateway,
                body,
                reply,
            })
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Sets what gateways should run; nothing when `changes` is empty.
    pub async fn set_desired(&self, changes: Vec<(String, Option<ConfigRef>, bool)>) {
        if !changes.is_empty() {
            let _ = self.send(Command::SetDesired { changes }).await;
        }
    }

    /// Marks gateways held (or released) by a rollout; nothing when `changes` is empty.
    pub async fn set_held(&self, changes: Vec<(String, Option<Hold>)>) {
        if !changes.is_empty() {
            let _ = self.send(Command::SetHeld { changes }).await;
        }
    }

    pub async fn subscribe(
        &self,
    ) -> Result<(Vec<GatewayState>, broadcast::Receiver<FleetChange>), FleetClosed> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Subscribe { reply }).await?;
        rx.await.map_err(|_| FleetClosed)
    }

    pub async fn watch(
        &self,
    ) -> Result<(Vec<GatewayState>, broadcast::Receiver<GatewayState>), FleetClosed> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Watch { reply }).await?;
        rx.await.map_err(|_| FleetClosed)
    }

    /// Whether `gateway` is in `group` (for filtering watch streams outside the task).
    pub fn in_group(&self, state: &GatewayState, group: &str) -> bool {
        read(&self.groups).contains(
            &state.gateway_id,
            |k| state.labels.get(k).map(String::as_str),
            group,
        )
    }

    /// Every group definition.
    pub fn groups(&self) -> Vec<Group> {
        read(&self.groups).defs.values().cloned().collect()
    }

    /// Adds or replaces groups by name.
    pub async fn apply_groups(&self, groups: Vec<Group>) -> Result<(), FleetClosed> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ApplyGroups { groups, reply }).await?;
        rx.await.map_err(|_| FleetClosed)
    }

    pub fn group_exists(&self, group: &str) -> bool {
        read(&self.groups).exists(group)
    }
}

/// The groups, shared with handles so that filters outside the task can read them.
/// Written only by the fleet task (`ApplyGroups`).
#[derive(Debug, Default)]
struct Groups {
    defs: BTreeMap<String, Group>,
}

impl Groups {
    fn exists(&self, group: &str) -> bool {
        self.defs.contains_key(group)
    }

    fn of<'a>(&self, gateway: &str, label: impl Fn(&str) -> Option<&'a str> + Copy) -> Vec<String> {
        self.defs
            .values()
            .filter(|g| g.contains(gateway, label))
            .map(|g| g.name.clone())
            .collect()
    }

    fn contains<'a>(
        &self,
        gateway: &str,
        label: impl Fn(&str) -> Option<&'a str>,
        group: &str,
    ) -> bool {
        self.defs
            .get(group)
            .is_some_and(|g| g.contains(gateway, label))
    }

    /// Adds or replaces groups by name; returns the gateways they list.
    fn upsert(&mut self, groups: Vec<Group>) -> Vec<GatewayId> {
        let listed: Vec<GatewayId> = groups
            .iter()
            .flat_map(|g| g.gateways.iter().cloned())
            .collect();
        for group in groups {
            self.defs.insert(group.name.clone(), group);
        }
        listed
    }
}

type SharedGroups = std::sync::Arc<std::sync::RwLock<Groups>>;

fn read(groups: &SharedGroups) -> std::sync::RwLockReadGuard<'_, Groups> {
    groups.read().unwrap_or_else(|p| p.into_inner())
}

/// One gateway as the coordinator knows it.
#[derive(Debug)]
struct Record {
    labels: BTreeMap<String, String>,
    state: AgentState,
    /// The open session, if any.
    session: Option<SessionId>,
    /// Set by a goodbye: the agent left on purpose.
    said_goodbye: bool,
    /// Monotonic time of the last heartbeat (or connect), for liveness.
    last_heartbeat: Option<Instant>,
    last_heartbeat_unix_ms: u64,
    health: Option<GatewayHealth>,
    agent_version: String,
    capabilities: Vec<String>,
    peer_address: String,
    connected_since_unix_ms: u64,
    /// The open session's sending half.
    outbound: Option<Outbound>,
    desired: Option<ConfigRef>,
    pinned: bool,
    held: Option<Hold>,
    sync: SyncState,
    drifted_since_unix_ms: u64,
    events: Option<EventForwarding>,
    cert_not_after_unix_ms: u64,
    cert_not_before_unix_ms: u64,
    /// The open session's agent process, and how to end that session when another replaces it.
    boot_id: String,
    replaced: Option<CancellationToken>,
    /// Open sessions replaced by another agent process: when, and the two peers.
    replacements: VecDeque<(Instant, String, String)>,
    /// The session was last held by this replica (not by another one).
    held_here: bool,
    /// The session as another replica holds it, when it does.
    remote: Option<RemoteSession>,
    /// The leader's word on this gateway, when another replica leads.
    leader_view: Option<Box<GatewayState>>,
}

/// A session another replica holds, as its record in etcd says.
#[derive(Debug)]
struct RemoteSession {
    replica: String,
    state: AgentState,
    /// Its key was deleted: nobody holds the session; liveness follows the wall clock.
    orphaned: bool,
}

impl Record {
    fn never_seen() -> Self {
        Record {
            labels: BTreeMap::new(),
            state: AgentState::Disconnected,
            session: None,
            said_goodbye: false,
            last_heartbeat: None,
            last_heartbeat_unix_ms: 0,
            health: None,
            agent_version: String::new(),
            capabilities: Vec::new(),
            peer_address: String::new(),
            connected_since_unix_ms: 0,
            outbound: None,
            desired: None,
            pinned: false,
            held: None,
            sync: SyncState::Unspecified,
            drifted_since_unix_ms: 0,
            events: None,
            cert_not_after_unix_ms: 0,
            cert_not_before_unix_ms: 0,
            boot_id: String::new(),
            replaced: None,
            replacements: VecDeque::new(),
            held_here: false,
            remote: None,
            leader_view: None,
        }
    }

    /// Takes what another replica says of the session it holds.
    fn take_remote(&mut self, state: GatewayState) {
        self.labels = state.labels.into_iter().collect();
        self.health = state.health;
        self.agent_version = state.agent_version;
        self.capabilities = state.agent_capabilities;
        self.peer_address = state.peer_address;
        self.connected_since_unix_ms = state.connected_since_unix_ms;
        self.last_heartbeat_unix_ms = state.last_heartbeat_unix_ms;
        self.events = state.events;
        self.cert_not_after_unix_ms = state.agent_cert_not_after_unix_ms;
        self.cert_not_before_unix_ms = state.agent_cert_not_before_unix_ms;
        self.held_here = false;
        self.remote = Some(RemoteSession {
            replica: state.replica,
            state: AgentState::try_from(state.agent_state).unwrap_or(AgentState::Unreachable),
            orphaned: false,
        });
    }

    /// Ends the open session, if any, because `hello` opens a newer one; remembers a replacement
    /// by another agent process (a restart whose old session was not noticed yet, or a second
    /// agent with the same certificate: the count tells them apart).
    fn replace_session(&mut self, hello: &HelloInfo, now: Instant) {
        if let Some(replaced) = self.replaced.take() {
            replaced.cancel();
            if self.session.is_some() && self.boot_id != hello.boot_id {
                self.replacements.push_back((
                    now,
                    self.peer_address.clone(),
                    hello.peer_address.clone(),
                ));
            }
        }
        self.forget_old_replacements(now);
    }

    fn forget_old_replacements(&mut self, now: Instant) {
        while self
            .replacements
            .front()
            .is_some_and(|(at, ..)| now.saturating_duration_since(*at) > REPLACEMENT_WINDOW)
        {
            self.replacements.pop_front();
        }
    }

    /// The peers of the replacements still remembered, newest first, each once.
    fn replacement_peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = Vec::new();
        for (_, old, new) in self.replacements.iter().rev() {
            for peer in [new, old] {
                if !peers.contains(peer) {
                    peers.push(peer.clone());
                }
            }
        }
        peers
    }

    /// The liveness state that time and the session say this record is in.
    fn derived_state(&self, now: Instant, liveness: &LivenessConfig) -> AgentState {
        if self.session.is_none()
            && let Some(remote) = &self.remote
        {
            return if remote.orphaned {
                orphan_state(unix_ms_now(), self.last_heartbeat_unix_ms, liveness)
            } else {
                remote.state
            };
        }
        let Some(last) = self.last_heartbeat else {
            return AgentState::Disconnected;
        };
        let silent = now.saturating_duration_since(last);
        if silent >= liveness.gone_after {
            AgentState::Gone
        } else if (self.said_goodbye && self.session.is_none())
            || silent >= liveness.disconnected_after
        {
            AgentState::Disconnected
        } else if self.session.is_none() || silent >= liveness.unreachable_after {
            // A session that broke without a goodbye may be a blip: unreachable, not gone.
            AgentState::Unreachable
        } else {
            AgentState::Connected
        }
    }

    /// Re-classifies running against desired; true when that changed.
    fn update_sync(&mut self) -> bool {
        let running = self
            .health
            .as_ref()
            .and_then(|h| h.config.as_ref())
            .map(|c| c.hash.as_str())
            .filter(|h| !h.is_empty());
        let sync = crate::intent::classify(
            self.desired.as_ref().map(|d| d.hash.as_str()),
            running,
            self.held.is_some(),
            self.held.as_ref().is_some_and(|h| h.in_flight),
        );
        if sync == self.sync {
            return false;
        }
        self.drifted_since_unix_ms = match sync {
            SyncState::Drifted => unix_ms_now(),
            _ => 0,
        };
        self.sync = sync;
        true
    }
}

/// The state of a gateway whose replica let its record go (it died, or lost etcd): judged from
/// its last heartbeat by the wall clock, never better than unreachable.
fn orphan_state(now_ms: u64, last_heartbeat_ms: u64, liveness: &LivenessConfig) -> AgentState {
    let silent = Duration::from_millis(now_ms.saturating_sub(last_heartbeat_ms));
    if silent >= liveness.gone_after {
        AgentState::Gone
    } else if silent >= liveness.disconnected_after {
        AgentState::Disconnected
    } else {
        AgentState::Unreachable
    }
}

/// The fleet task.
pub struct Fleet {
    liveness: LivenessConfig,
    groups: SharedGroups,
    records: BTreeMap<GatewayId, Record>,
    commands: mpsc::Receiver<Command>,
    changes: broadcast::Sender<GatewayState>,
    /// Changes and heartbeats, for the rollout engine.
    subscription: broadcast::Sender<FleetChange>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// This replica's name (`storage: etcd`); empty for a single coordinator.
    replica: String,
    /// Whether this replica's engine says what gateways should run (always, for a single
    /// coordinator); else the leader's views do.
    leading: bool,
}

/// How long a session replaced by another agent process is remembered.
const REPLACEMENT_WINDOW: Duration = Duration::from_secs(600);

/// How many commands may queue before senders wait.
const COMMAND_QUEUE: usize = 4096;
/// How many changes a watcher may fall behind before it gets a fresh snapshot.
const CHANGE_QUEUE: usize = 4096;
/// The same for the engine's subscription, which also carries heartbeats.
const SUBSCRIPTION_QUEUE: usize = 65_536;

impl Fleet {
    /// Records into `metrics` instead of a private set.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Names this replica in the records of the sessions it holds.
    pub fn with_replica(mut self, replica: String) -> Self {
        self.replica = replica;
        self.leading = false;
        self
    }

    pub fn new(liveness: LivenessConfig, groups: &[Group]) -> (Self, FleetHandle) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (changes, _) = broadcast::channel(CHANGE_QUEUE);
        let (subscription, _) = broadcast::channel(SUBSCRIPTION_QUEUE);
        let mut defs = Groups::default();
        let records = defs
            .upsert(groups.to_vec())
            .into_iter()
            .map(|id| (id, Record::never_seen()))
            .collect();
        let groups: SharedGroups = std::sync::Arc::new(std::sync::RwLock::new(defs));
        let fleet = Fleet {
            liveness,
            groups: groups.clone(),
            records,
            commands: rx,
            changes,
            subscription,
            metrics: Default::default(),
            replica: String::new(),
            leading: true,
        };
        (
            fleet,
            FleetHandle {
                commands: tx,
                groups,
            },
        )
    }

    /// Runs until `cancel` fires or every handle is dropped.
    pub async fn run(mut self, cancel: CancellationToken) {
        // Check liveness a few times per heartbeat interval, at least every second.
        let period = (self.liveness.heartbeat_interval / 4).min(Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => self.update_liveness(Instant::now()),
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command, Instant::now()),
                    None => break,
                },
            }
        }
    }

    fn handle(&mut self, command: Command, now: Instant) {
        match command {
            Command::Connected {
                gateway,
                session,
                hello,
                outbound,
                replaced,
            } => {
                let record = self
                    .records
                    .entry(gateway.clone())
                    .or_insert_with(Record::never_seen);
                record.replace_session(&hello, now);
                if record.replacements.len() >= DUPLICATE_AGENT_REPLACEMENTS as usize {
                    tracing::warn!(gateway_id = %gateway, peers = %record.replacement_peers().join(" "), replacements = record.replacements.len(), "two agents seem to share one certificate: their sessions keep replacing each other");
                }
                record.boot_id = hello.boot_id.clone();
                record.replaced = Some(replaced);
                record.labels = hello.labels;
                record.agent_version = hello.agent_version;
                record.capabilities = hello.capabilities;
                record.peer_address = hello.peer_address;
                record.cert_not_after_unix_ms = hello.cert_not_after_unix_ms;
                record.cert_not_before_unix_ms = hello.cert_not_before_unix_ms;
                if hello.health.is_some() {
                    record.health = hello.health;
                }
                record.session = Some(session);
                record.outbound = Some(outbound);
                record.held_here = true;
                record.said_goodbye = false;
                record.last_heartbeat = Some(now);
                record.last_heartbeat_unix_ms = unix_ms_now();
                record.connected_since_unix_ms = record.last_heartbeat_unix_ms;
                tracing::info!(gateway_id = %gateway, session, boot_id = %hello.boot_id, "agent connected");
                self.refresh(&gateway, now, true);
            }
            Command::Heartbeat {
                gateway,
                session,
                requests_processed,
                verdicts,
                errors,
                events,
                received,
            } => {
                self.metrics
                    .heartbeat_processing
                    .observe(received.elapsed().as_secs_f64());
                if let Some(record) = self.current_session(&gateway, session) {
                    record.events = events;
                    record.last_heartbeat = Some(now);
                    record.last_heartbeat_unix_ms = unix_ms_now();
                    if let Some(health) = &mut record.health {
                        health.requests_processed = requests_processed;
                        health.errors = errors;
                        if verdicts.is_some() {
                            health.verdicts = verdicts;
                        }
                    }
                    let at_unix_ms = record.last_heartbeat_unix_ms;
                    if self.subscription.receiver_count() > 0 {
                        let _ = self.subscription.send(FleetChange::Heartbeat {
                            gateway: gateway.clone(),
                            at_unix_ms,
                        });
                    }
                    self.refresh(&gateway, now, false);
                }
            }
            Command::Status {
                gateway,
                session,
                health,
            } => {
                if let Some(record) = self.current_session(&gateway, session) {
                    record.health = Some(health);
                    record.last_heartbeat = Some(now);
                    record.last_heartbeat_unix_ms = unix_ms_now();
                    self.refresh(&gateway, now, true);
                }
            }
            Command::Ended {
                gateway,
                session,
                clean,
            } => {
                if let Some(record) = self.current_session(&gateway, session) {
                    record.session = None;
                    record.outbound = None;
                    record.replaced = None;
                    record.said_goodbye = clean;
                    tracing::info!(gateway_id = %gateway, session, clean, "agent session ended");
                    self.refresh(&gateway, now, false);
                }
            }
            Command::Deliver {
                gateway,
                body,
                reply,
            } => {
                let outbound = GatewayId::new(&gateway)
                    .ok()
                    .and_then(|id| self.records.get(&id))
                    .and_then(|r| r.outbound.clone());
                let delivered = outbound.is_some_and(|tx| {
                    let message = CoordinatorMessage { body: Some(body) };
                    tx.try_send(Ok(message)).is_ok()
                });
                let _ = reply.send(delivered);
            }
            Command::SetDesired { changes } => {
                for (gateway, desired, pinned) in changes {
                    let Ok(id) = GatewayId::new(&gateway) else {
                        continue;
                    };
                    let changed = self
                        .records
                        .get_mut(&id)
                        .filter(|r| r.desired != desired || r.pinned != pinned)
                        .map(|r| (r.desired, r.pinned) = (desired, pinned))
                        .is_some();
                    if changed {
                        self.refresh(&id, now, true);
                    }
                }
            }
            Command::SetHeld { changes } => {
                for (gateway, held) in changes {
                    let Ok(id) = GatewayId::new(&gateway) else {
                        continue;
                    };
                    let changed = self
                        .records
                        .get_mut(&id)
                        .filter(|r| r.held != held)
                        .map(|r| r.held = held)
                        .is_some();
                    if changed {
                        self.refresh(&id, now, true);
                    }
                }
            }
            Command::Remote { gateway, state } => {
                let record = self
                    .records
                    .entry(gateway.clone())
                    .or_insert_with(Record::never_seen);
                match state {
                    // This replica's own record coming back: the key is ours again.
                    Some(state) if state.replica == self.replica => record.remote = None,
                    Some(state) => {
                        if record.session.is_some() {
                            tracing::debug!(gateway_id = %gateway, replica = %state.replica, "another replica reports a session this one holds");
                        } else {
                            record.take_remote(*state);
                        }
                    }
                    None => {
                        if let Some(remote) = &mut record.remote {
                            remote.orphaned = true;
                        }
                    }
                }
                self.refresh(&gateway, now, true);
            }
            Command::LeaderView { gateway, view } => {
                let record = self
                    .records
                    .entry(gateway.clone())
                    .or_insert_with(Record::never_seen);
                record.leader_view = view;
                if !self.leading {
                    self.refresh(&gateway, now, true);
                }
            }
            Command::Leading(leading) => {
                self.leading = leading;
                if !leading {
                    // What this replica's engine said is stale from now on.
                    for record in self.records.values_mut() {
                        (record.desired, record.pinned, record.held) = (None, false, None);
                    }
                }
                let ids: Vec<GatewayId> = self.records.keys().cloned().collect();
                for id in ids {
                    self.refresh(&id, now, true);
                }
            }
            Command::ApplyGroups { groups, reply } => {
                let listed = self
                    .groups
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .upsert(groups);
                for id in listed {
                    self.records.entry(id).or_insert_with(Record::never_seen);
                }
                let ids: Vec<GatewayId> = self.records.keys().cloned().collect();
                for id in ids {
                    self.refresh(&id, now, true);
                }
                let _ = reply.send(());
            }
            Command::List { group, reply } => {
                let _ = reply.send(self.list(group.as_deref()));
            }
            Command::Watch { reply } => {
                let receiver = self.changes.subscribe();
                let snapshot = self.list(None).unwrap_or_default();
                let _ = reply.send((snapshot, receiver));
            }
            Command::Subscribe { reply } => {
                let receiver = self.subscription.subscribe();
                let snapshot = self.list(None).unwrap_or_default();
                let _ = reply.send((snapshot, receiver));
            }
        }
    }

    /// The record of `gateway` if `session` is its open session; messages of older sessions are ignored.
    fn current_session(&mut self, gateway: &GatewayId, session: SessionId) -> Option<&mut Record> {
        self.records
            .get_mut(gateway)
            .filter(|record| record.session == Some(session))
    }

    fn update_liveness(&mut self, now: Instant) {
        let ids: Vec<GatewayId> = self.records.keys().cloned().collect();
        for id in ids {
            self.refresh(&id, now, false);
        }
    }

    /// Re-derives the liveness state and publishes the record if it changed (or `force`).
    fn refresh(&mut self, gateway: &GatewayId, now: Instant, force: bool) {
        let Some(record) = self.records.get_mut(gateway) else {
            return;
        };
        let replacements = record.replacements.len();
        record.forget_old_replacements(now);
        let force = record.update_sync() || force || record.replacements.len() != replacements;
        let state = record.derived_state(now, &self.liveness);
        if state != record.state {
            tracing::info!(gateway_id = %gateway, from = record.state.as_str_name(), to = state.as_str_name(), "agent state changed");
            record.state = state;
        } else if !force {
            return;
        }
        let view = self.view(gateway);
        if let Some(view) = view {
            // No receivers is fine: nobody is watching.
            if self.subscription.receiver_count() > 0 {
                let _ = self
                    .subscription
                    .send(FleetChange::State(Box::new(view.clone())));
            }
            let _ = self.changes.send(view);
        }
    }

    fn view(&self, gateway: &GatewayId) -> Option<GatewayState> {
        let record = self.records.get(gateway)?;
        let mut view = self.own_view(gateway, record);
        if !self.leading {
            let leader = record.leader_view.as_deref();
            view.desired = leader.and_then(|l| l.desired.clone());
            view.pinned = leader.is_some_and(|l| l.pinned);
            view.converging_by = leader.map(|l| l.converging_by.clone()).unwrap_or_default();
            view.sync = leader.map_or(SyncState::Unspecified as i32, |l| l.sync);
            view.drifted_since_unix_ms = leader.map_or(0, |l| l.drifted_since_unix_ms);
        }
        Some(view)
    }

    fn own_view(&self, gateway: &GatewayId, record: &Record) -> GatewayState {
        GatewayState {
            gateway_id: gateway.to_string(),
            labels: record.labels.clone().into_iter().collect(),
            groups: read(&self.groups).of(gateway.as_str(), |k| {
                record.labels.get(k).map(String::as_str)
            }),
            agent_state: record.state as i32,
            last_heartbeat_unix_ms: record.last_heartbeat_unix_ms,
            health: record.health.clone(),
            agent_version: record.agent_version.clone(),
            agent_capabilities: record.capabilities.clone(),
            peer_address: record.peer_address.clone(),
            connected_since_unix_ms: record.connected_since_unix_ms,
            desired: record.desired.clone(),
            events: record.events,
            agent_cert_not_after_unix_ms: record.cert_not_after_unix_ms,
            agent_cert_not_before_unix_ms: record.cert_not_before_unix_ms,
            revoked: None,
            renewal_refused: String::new(),
            renewal_refused_unix_ms: 0,
            session_replacements: record.replacements.len() as u32,
            replacement_peers: record.replacement_peers(),
            sync: record.sync as i32,
            drifted_since_unix_ms: record.drifted_since_unix_ms,
            converging_by: record
                .held
                .as_ref()
                .map(|h| h.by.clone())
                .unwrap_or_default(),
            pinned: record.pinned,
            replica: match &record.remote {
                Some(remote) if record.session.is_none() && !remote.orphaned => {
                    remote.replica.clone()
                }
                _ if record.held_here => self.replica.clone(),
                _ => String::new(),
            },
        }
    }

    fn list(&self, group: Option<&str>) -> Result<Vec<GatewayState>, UnknownGroup> {
        let groups = read(&self.groups);
        if let Some(group) = group.filter(|g| !groups.exists(g)) {
            return Err(UnknownGroup(group.to_owned()));
        }
        Ok(self
            .records
            .iter()
            .filter(|(id, record)| {
                group.is_none_or(|g| {
                    groups.contains(id.as_str(), |k| record.labels.get(k).map(String::as_str), g)
                })
            })
            .filter_map(|(id, _)| self.view(id))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness() -> LivenessConfig {
        LivenessConfig {
            heartbeat_interval: Duration::from_secs(1),
            unreachable_after: Duration::from_secs(3),
            disconnected_after: Duration::from_secs(10),
            gone_after: Duration::from_secs(100),
            ..LivenessConfig::default()
        }
    }

    fn hello() -> HelloInfo {
        HelloInfo {
            labels: BTreeMap::from([("region".into(), "eu".into())]),
            agent_version: "0.1.0".into(),
            capabilities: Vec::new(),
            boot_id: "b".into(),
            health: None,
            peer_address: "127.0.0.1:1".into(),
            cert_not_after_unix_ms: 0,
            cert_not_before_unix_ms: 0,
        }
    }

    fn outbound() -> Outbound {
        mpsc::channel(1).0
    }

    fn gw(id: &str) -> GatewayId {
        GatewayId::new(id).expect("valid id")
    }

    fn connect(fleet: &mut Fleet, id: &str, session: SessionId, now: Instant) {
        let command = Command::Connected {
            gateway: gw(id),
            session,
            hello: hello(),
            outbound: outbound(),
            replaced: CancellationToken::new(),
        };
        fleet.handle(command, now);
    }

    fn end(fleet: &mut Fleet, id: &str, session: SessionId, clean: bool, now: Instant) {
        let command = Command::Ended {
            gateway: gw(id),
            session,
            clean,
        };
        fleet.handle(command, now);
    }

    fn state_of(fleet: &Fleet, id: &str) -> AgentState {
        fleet.records[&gw(id)].state
    }

    #[tokio::test(start_paused = true)]
    async fn silence_walks_connected_unreachable_disconnected_gone() {
        let (mut fleet, _handle) = Fleet::new(liveness(), &[]);
        let start = Instant::now();
        connect(&mut fleet, "gw-1", 1, start);
        assert_eq!(state_of(&fleet, "gw-1"), AgentState::Connected);

        for (after, expected) in [
            (2, AgentState::Connected),
            (3, AgentState::Unreachable),
            (9, AgentState::Unreachable),
            (10, AgentState::Disconnected),
            (100, AgentState::Gone),
        ] {
            fleet.update_liveness(start + Duration::from_secs(after));
            assert_eq!(state_of(&fleet, "gw-1"), expected, "after {after}s");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn broken_session_is_unreachable_goodbye_is_disconnected() {
        let (mut fleet, _handle) = Fleet::new(liveness(), &[]);
        let now = Instant::now();
        connect(&mut fleet, "gw-1", 1, now);
        connect(&mut fleet, "gw-2", 2, now);
        end(&mut fleet, "gw-1", 1, false, now);
        end(&mut fleet, "gw-2", 2, true, now);
        assert_eq!(state_of(&fleet, "gw-1"), AgentState::Unreachable);
        assert_eq!(state_of(&fleet, "gw-2"), AgentState::Disconnected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_session_cannot_touch_the_new_one() {
        let (mut fleet, _handle) = Fleet::new(liveness(), &[]);
        let now = Instant::now();
        connect(&mut fleet, "gw-1", 1, now);
        connect(&mut fleet, "gw-1", 2, now);
        end(&mut fleet, "gw-1", 1, true, now);
        assert_eq!(state_of(&fleet, "gw-1"), AgentState::Connected);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_an_agent_connected_and_changes_are_published() {
        let (mut fleet, _handle) = Fleet::new(liveness(), &[]);
        let mut changes = fleet.changes.subscribe();
        let start = Instant::now();
        connect(&mut fleet, "gw-1", 1, start);
        for s in 1..20 {
            let now = start + Duration::from_secs(s);
            fleet.handle(
                Command::Heartbeat {
                    gateway: gw("gw-1"),
                    session: 1,
                    requests_processed: s,
                    verdicts: None,
                    errors: 0,
                    events: None,
                    received: Instant::now(),
                },
                now,
            );
            fleet.update_liveness(now);
        }
        assert_eq!(state_of(&fleet, "gw-1"), AgentState::Connected);
        let first = changes.try_recv().expect("connect is published");
        assert_eq!(first.agent_state, AgentState::Connected as i32);
        assert!(
            changes.try_recv().is_err(),
            "heartbeats alone publish nothing"
        );
    }

    #[tokio::test]
    async fn groups_filter_lists_and_unknown_group_is_an_error() {
        let groups = [Group::of_gateways(
            "production",
            vec![gw("gw-prod-01"), gw("gw-prod-02")],
        )];
        let (mut fleet, _handle) = Fleet::new(liveness(), &groups);
        fleet.handle(
            Command::Connected {
                gateway: gw("gw-other"),
                session: 1,
                hello: hello(),
                outbound: outbound(),
                replaced: CancellationToken::new(),
            },
            Instant::now(),
        );
        let prod = fleet.list(Some("production")).expect("known group");
        let ids: Vec<_> = prod.iter().map(|g| g.gateway_id.as_str()).collect();
        assert_eq!(ids, ["gw-prod-01", "gw-prod-02"]);
        assert!(
            prod.iter()
                .all(|g| g.agent_state == AgentState::Disconnected as i32)
        );
        assert_eq!(fleet.list(None).expect("all").len(), 3);
        assert_eq!(fleet.list(Some("nope")), Err(UnknownGroup("nope".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_session_is_ended_and_two_agents_with_one_certificate_show() {
        let (mut fleet, _handle) = Fleet::new(liveness(), &[]);
        let now = Instant::now();
        let open = |fleet: &mut Fleet, session: SessionId, boot: &str, peer: &str| {
            let token = CancellationToken::new();
            let mut hello = hello();
            hello.boot_id = boot.into();
            hello.peer_address = peer.into();
            let command = Command::Connected {
                gateway: gw("gw-1"),
                session,
                hello,
                outbound: outbound(),
                replaced: token.clone(),
            };
            fleet.handle(command, now);
            token
        };
        let first = open(&mut fleet, 1, "boot-a", "10.0.0.1:1");
        // The same agent process reconnecting is no replacement by another agent.
        let again = open(&mut fleet, 2, "boot-a", "10.0.0.1:2");
        assert!(first.is_cancelled());
        assert_eq!(
            fleet
                .view(&gw("gw-1"))
                .expect("record")
                .session_replacements,
            0
        );
        let other = open(&mut fleet, 3, "boot-b", "10.0.0.2:1");
        assert!(again.is_cancelled() && !other.is_cancelled());
        open(&mut fleet, 4, "boot-a", "10.0.0.1:3");
        let view = fleet.view(&gw("gw-1")).expect("record");
        assert_eq!(view.session_replacements, 2);
        assert_eq!(
            view.replacement_peers,
            ["10.0.0.1:3", "10.0.0.2:1", "10.0.0.1:2"]
        );
        // Forgotten after the window.
        fleet.update_liveness(now + REPLACEMENT_WINDOW + Duration::from_secs(1));
        assert_eq!(
            fleet
                .view(&gw("gw-1"))
                .expect("record")
                .session_replacements,
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn running_against_desired_is_in_sync_drifted_or_converging() {
        let (mut fleet, _handle) = Fleet::new(liveness(), &[]);
        let now = Instant::now();
        connect(&mut fleet, "gw-1", 1, now);
        let view = |fleet: &Fleet| fleet.view(&gw("gw-1")).expect("record");
        assert_eq!(
            view(&fleet).sync,
            SyncState::Unspecified as i32,
            "nothing known yet"
        );
        let report = |fleet: &mut Fleet, hash: &str| {
            let health = GatewayHealth {
                config: Some(kt_proto::v1::ConfigInfo {
                    hash: hash.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let status = Command::Status {
                gateway: gw("gw-1"),
                session: 1,
                health,
            };
            fleet.handle(status, now);
        };
        let desire = ConfigRef {
            version: "1.0.0".into(),
            hash: "sha256:a".into(),
        };
        report(&mut fleet, "sha256:a");
        let set = Command::SetDesired {
            changes: vec![("gw-1".into(), Some(desire), false)],
        };
        fleet.handle(set, now);
        assert_eq!(view(&fleet).sync, SyncState::InSync as i32);
        assert_eq!(view(&fleet).drifted_since_unix_ms, 0);

        report(&mut fleet, "sha256:edited");
        assert_eq!(view(&fleet).sync, SyncState::Drifted as i32);
        assert!(view(&fleet).drifted_since_unix_ms > 0, "drifted since when");

        let hold = Hold {
            by: "r-1".into(),
            in_flight: true,
        };
        fleet.handle(
            Command::SetHeld {
                changes: vec![("gw-1".into(), Some(hold))],
            },
            now,
        );
        assert_eq!(view(&fleet).sync, SyncState::Converging as i32);
        assert_eq!(view(&fleet).converging_by, "r-1");
        report(&mut fleet, "sha256:a");
        fleet.handle(
            Command::SetHeld {
                changes: vec![("gw-1".into(), None)],
            },
            now,
        );
        assert_eq!(view(&fleet).sync, SyncState::InSync as i32);
        assert_eq!(view(&fleet).converging_by, "");
    }
}
