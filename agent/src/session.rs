//! The control session with the coordinator: connect, hello, heartbeats, status, goodbye.
//!
//! Disconnected is a normal mode: when the coordinator is down or refuses us, the agent keeps
//! polling its gateway and retries with full-jitter backoff, forever, doing nothing else.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use kt_daemon::unix_ms_now;
use kt_proto::identity::{GatewayId, Role};
use kt_proto::tls::PeerTls;
use kt_proto::v1::agent_message::Body as AgentBody;
use kt_proto::v1::agent_service_client::AgentServiceClient;
use kt_proto::v1::coordinator_message::Body as CoordinatorBody;
use kt_proto::v1::{
    self, AgentMessage, ConfigOffer, ConfigPhase, ConfigRef, ConfigStatus, CoordinatorMessage,
    Goodbye, Heartbeat, Hello, ProbeResult, StatusUpdate, Welcome,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Endpoint;

use crate::backoff::FullJitter;
use crate::config::AgentConfig;
use crate::events::ForwardingReport;
use crate::health::{MAX_HEARTBEAT_INTERVAL, materially_different};
use crate::metrics::{Metrics, ResultLabels};
use crate::probe::Prober;

/// Messages queued towards the coordinator before sending waits.
const OUTBOUND_QUEUE: usize = 16;
/// A config file larger than this is not sent in the hello (the coordinator refuses it anyway).
const MAX_RUNNING_CONFIG_BYTES: usize = 1024 * 1024;
/// How long connecting, and waiting for the welcome, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connect and TLS handshake together: as long as a coordinator gives a handshake (its
/// `connections.handshake_timeout` default), so a loaded but live coordinator is not given up
/// on, while a silent listener is.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a session needs, fixed for the agent's life.
pub struct SessionSettings {
    pub gateway: GatewayId,
    pub config: AgentConfig,
    pub tls: PeerTls,
    pub boot_id: String,
    /// The TLS files as last loaded well, used while the files do not load.
    pub last_good_tls: std::sync::Mutex<Option<PeerTls>>,
    /// Set when the agent manages its own certificate (`enrollment:`): it renews it.
    pub renewal: Option<crate::renewal::Renewal>,
}

impl SessionSettings {
    /// What this agent can do beyond the base protocol, for the hello.
    fn capabilities(&self) -> Vec<String> {
        let shadows = self
            .config
            .apply_settings()
            .is_some_and(|apply| apply.shadow_path.is_some());
        shadows
            .then(|| kt_proto::capability::SHADOW_CONFIG.to_owned())
            .into_iter()
            .collect()
    }

    /// The endpoint for connection attempt `attempt`: the configured ones in turn.
    pub fn endpoint(&self, attempt: u64) -> &str {
        let endpoints = &self.config.coordinator.endpoints;
        &endpoints[usize::try_from(attempt % endpoints.len().max(1) as u64).unwrap_or(0)]
    }

    /// The TLS files as they are now, so a renewed certificate or CA bundle is used from the
    /// next connection on; the last ones that loaded well when the files do not load now (a
    /// renewal half-written) or name another gateway.
    pub fn current_tls(&self) -> PeerTls {
        if let Some(candidate) = self.renewal.as_ref().and_then(|r| r.candidate()) {
            return candidate;
        }
        let mut last_good = match self.last_good_tls.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // A certificate the coordinator issued is judged by the coordinator's clock, not ours.
        let loaded = if self.renewal.is_some() {
            self.config.tls.load_ignoring_clock(Role::Agent)
        } else {
            self.config.tls.load(Role::Agent)
        };
        match loaded {
            Ok(tls) if tls.identity == self.tls.identity => {
                *last_good = Some(tls.clone());
                return tls;
            }
            Ok(tls) => {
                tracing::warn!(found = %tls.identity.uri(), expected = %self.tls.identity.uri(),
                    "the certificate file now names another identity; connecting with the last good one");
            }
            Err(error) => {
                tracing::warn!(%error, "cannot load the TLS files; connecting with the last good ones");
            }
        }
        last_good.clone().unwrap_or_else(|| self.tls.clone())
    }

    /// A channel to `endpoint`, the TLS handshake included, within [`HANDSHAKE_TIMEOUT`].
    pub async fn channel(&self, endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
        use anyhow::Context;
        let server_name = self.config.server_name(endpoint);
        let endpoint_settings = Endpoint::from_shared(endpoint.to_owned())
            .with_context(|| format!("bad endpoint {endpoint}"))?
            .tls_config(self.current_tls().client_config(&server_name))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        // `connect_timeout` bounds only the TCP connect: a listener whose process never answers
        // the TLS handshake (one still starting, or stuck) must not hold the agent on it.
        tokio::time::timeout(HANDSHAKE_TIMEOUT, endpoint_settings.connect())
            .await
            .map_err(|_| anyhow::anyhow!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))
            .and_then(|connected| connected.map_err(anyhow::Error::from))
            .with_context(|| format!("cannot connect to {endpoint}"))
    }

    /// A fresh reconnect schedule.
    pub fn backoff(&self) -> FullJitter {
        FullJitter::new(
            self.config.reconnect.min_delay,
            self.config.reconnect.max_delay,
        )
    }
}

/// One open session: the sending half, the receiving half and what the coordinator assigned.
struct OpenSession {
    outbound: mpsc::Sender<AgentMessage>,
    inbound: Streaming<CoordinatorMessage>,
    welcome: Welcome,
    seq: u64,
    /// The health the coordinator last heard from us: status updates are sent against it.
    reported: v1::GatewayHealth,
    /// The session's connection, which renewals are asked over.
    channel: tonic::transport::Channel,
}

impl OpenSession {
    async fn send(&mut self, body: AgentBody) -> Result<(), SessionLost> {
        self.seq += 1;
        let mut body = body;
        kt_proto::bounds::clamp(&mut body);
        let message = AgentMessage {
            seq: self.seq,
            body: Some(body),
        };
        self.outbound
            .send(message)
            .await
            .map_err(|_| SessionLost("stream closed".into()))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("session lost: {0}")]
struct SessionLost(String);

/// The session's side of config applies: offers go to the applier, answers come back.
pub struct ConfigLink {
    /// `None` when this agent does not manage its gateway's config: offers are then refused.
    pub offers: Option<mpsc::Sender<ConfigOffer>>,
    pub statuses: mpsc::Receiver<ConfigStatus>,
    /// Answers not yet delivered; kept across reconnects so none is lost.
    pub unsent: VecDeque<ConfigStatus>,
}

/// What the session reports besides health, and answers besides offers.
pub struct Observers {
    /// `None` when nothing can be probed (the fleet simulator): probes are answered with an error.
    pub prober: Option<Prober>,
    /// `None` when the agent forwards no events.
    pub forwarding: Option<ForwardingReport>,
    pub metrics: Arc<Metrics>,
}

/// Keeps a session open until `cancel` fires, reconnecting whenever it is lost.
pub async fn run(
    settings: std::sync::Arc<SessionSettings>,
    health: watch::Receiver<v1::GatewayHealth>,
    mut link: ConfigLink,
    observers: Observers,
    cancel: CancellationToken,
) {
    let mut attempt: u64 = 0;
    loop {
        let backoff = settings.backoff();
        let connect = || {
            // The first attempt goes to the first endpoint; each retry to the next one.
            let endpoint = settings.endpoint(attempt);
            attempt += 1;
            connect(
                &settings,
                endpoint,
                health.borrow().clone(),
                &observers.metrics,
            )
        };
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            opened = connect
                .retry(backoff)
                .notify(|error: &anyhow::Error, delay: Duration| {
                    observers.metrics.connect_failures.inc();
                    tracing::warn!(error = format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "cannot open a session with the coordinator");
                }) => opened,
        };
        let Ok(session) = opened else { continue };
        tracing::info!(
            heartbeat_interval_ms = session.welcome.heartbeat_interval_ms,
            coordinator_version = %session.welcome.coordinator_version,
            "session open"
        );
        let spread = Duration::from_millis(session.welcome.reconnect_spread_ms);
        // One gauge may count many agents (the fleet simulator shares it): up and down, not set.
        observers.metrics.connected.inc();
        observers.metrics.sessions_opened.inc();
        let served = serve(
            session,
            &settings,
            health.clone(),
            &mut link,
            &observers,
            &cancel,
        )
        .await;
        observers.metrics.connected.dec();
        match served {
            Ok(Ended::Cancelled) => return,
            Ok(Ended::Renewed) => {
                tracing::info!("certificate renewed; reconnecting with it");
                attempt = 0; // the same endpoint first
            }
            Err(lost) => {
                // Every agent lost its session at the same moment when the coordinator went
                // away: spread the returns over the window it announced.
                let wait = spread.mul_f64(rand::random::<f64>());
                tracing::warn!(error = %lost, wait_ms = wait.as_millis() as u64, "session with the coordinator lost, reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One connection attempt. With a renewed certificate waiting as the candidate, the attempt
/// uses it: a session opened promotes it, a failure falls back to the current one.
async fn connect(
    settings: &SessionSettings,
    endpoint: &str,
    health: v1::GatewayHealth,
    metrics: &Metrics,
) -> anyhow::Result<OpenSession> {
    let Some(renewal) = &settings.renewal else {
        return open(settings, endpoint, health).await;
    };
    let with_candidate = renewal.candidate().is_some();
    let opened = open(settings, endpoint, health).await;
    // Refused, and by our clock the certificate has expired: enroll again (the next attempt
    // uses what that gives). The clock alone is no proof; the refusal with it is.
    if opened.is_err() && !with_candidate && renewal.expired() {
        enroll_again(settings, renewal, metrics).await;
    }
    match (&opened, with_candidate) {
        (Ok(_), true) => match renewal.promote() {
            Ok(()) => {
                metrics
                    .certificate_renewals
                    .get_or_create(&ResultLabels { result: "renewed" })
                    .inc();
                tracing::info!("renewed certificate in use; the previous one is dropped");
            }
            Err(error) => {
                tracing::error!(%error, "the renewed certificate works but cannot be written; keeping the previous files");
                renewal.fall_back();
            }
        },
        (Err(error), true) => {
            metrics
                .certificate_renewals
                .get_or_create(&ResultLabels {
                    result: "fell_back",
                })
                .inc();
            tracing::warn!(
                error = format!("{error:#}"),
                "no session with the renewed certificate; falling back to the previous one and renewing again soon"
            );
            renewal.fall_back();
        }
        _ => {}
    }
    opened
}

/// The certificate expired before it could be renewed (the agent was stopped, or cut off from
/// every coordinator): enroll again with the join token if it is still good, else say what an
/// operator must do.
async fn enroll_again(
    settings: &SessionSettings,
    renewal: &crate::renewal::Renewal,
    metrics: &Metrics,
) {
    let Some(enrollment) = &settings.config.enrollment else {
        return;
    };
    match crate::enroll::enroll(&settings.config, enrollment).await {
        Ok(enrolled) => {
            metrics.certificate_expired.set(0);
            renewal.enrolled(enrolled.lifetime);
            tracing::info!(gateway_id = %enrolled.gateway_id, "certificate had expired; enrolled again with the join token");
        }
        Err(crate::enroll::EnrollError::Unreachable(why)) => {
            tracing::warn!(%why, "certificate has expired and no coordinator can be reached to enroll again");
        }
        Err(error) => {
            metrics.certificate_expired.set(1);
            tracing::error!(%error, token_file = %enrollment.token_file.display(),
                "certificate has expired and enrolling again failed: an operator must put a new join token (ktctl token create --gateway-id {}) in the token file; the agent keeps trying",
                settings.gateway);
        }
    }
}

/// Opens a session: channel, session stream, hello, welcome.
async fn open(
    settings: &SessionSettings,
    endpoint: &str,
    health: v1::GatewayHealth,
) -> anyhow::Result<OpenSession> {
    use anyhow::Context;
    let channel = settings.channel(endpoint).await?;

    let (outbound, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let hello = Hello {
        gateway_id: settings.gateway.to_string(),
        boot_id: settings.boot_id.clone(),
        labels: settings.config.labels.clone().into_iter().collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: settings.capabilities(),
        health: Some(health.clone()),
        running_config: settings
            .config
            .gateway
            .config_path
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .filter(|bytes| bytes.len() <= MAX_RUNNING_CONFIG_BYTES)
            .unwrap_or_default(),
    };
    let mut hello = AgentBody::Hello(hello);
    kt_proto::bounds::clamp(&mut hello);
    outbound
        .send(AgentMessage {
            seq: 1,
            body: Some(hello),
        })
        .await
        .context("session stream closed before the hello")?;

    let mut client = AgentServiceClient::new(channel.clone());
    let opened = async {
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        match inbound.message().await? {
            Some(CoordinatorMessage {
                body: Some(CoordinatorBody::Welcome(welcome)),
            }) => Ok((inbound, welcome)),
            Some(_) => Err(tonic::Status::internal(
                "the coordinator did not start with a welcome",
            )),
            None => Err(tonic::Status::unavailable(
                "the coordinator closed the session",
            )),
        }
    };
    let (inbound, welcome) = tokio::time::timeout(CONNECT_TIMEOUT, opened)
        .await
        .context("no welcome within the connect timeout")?
        .with_context(|| format!("{endpoint} refused the session"))?;
    Ok(OpenSession {
        outbound,
        inbound,
        welcome,
        seq: 1,
        reported: health,
        channel,
    })
}

/// How a session ended on the agent's own terms.
enum Ended {
    /// Shutting down, after a goodbye.
    Cancelled,
    /// A renewed certificate waits to be used: reconnect with it.
    Renewed,
}

/// Runs an open session: `Ok` when it ends on our terms (after a goodbye), `Err` when it is lost.
async fn serve(
    mut session: OpenSession,
    settings: &SessionSettings,
    mut health: watch::Receiver<v1::GatewayHealth>,
    link: &mut ConfigLink,
    observers: &Observers,
    cancel: &CancellationToken,
) -> Result<Ended, SessionLost> {
    // Probe results of this session; a probe still running when it ends answers nobody.
    let (probe_results, mut probes_done) = mpsc::channel::<ProbeResult>(4);
    let interval = Duration::from_millis(session.welcome.heartbeat_interval_ms.max(50))
        .min(MAX_HEARTBEAT_INTERVAL);
    // The first heartbeat goes at once, so the coordinator has fresh counters from the start.
    let mut heartbeat = tokio::time::interval(interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Anything observed since the hello is reported at once, and so is every undelivered answer.
    health.mark_changed();
    flush(&mut session, &mut link.unsent).await?;
    // A renewal in flight, asked over this session's connection.
    let mut renewing: Option<tokio::task::JoinHandle<Result<Renewed, String>>> = None;

    loop {
        let renew_at = settings.renewal.as_ref().map(|r| r.renew_at());
        tokio::select! {
            _ = cancel.cancelled() => {
                goodbye(session, "agent shutting down").await;
                return Ok(Ended::Cancelled);
            }
            _ = sleep_until_some(renew_at), if renewing.is_none() => {
                renewing = Some(tokio::spawn(ask_renewal(session.channel.clone())));
            }
            asked = join_some(&mut renewing), if renewing.is_some() => {
                renewing = None;
                let Some(renewal) = &settings.renewal else { continue };
                let staged = asked.and_then(|renewed| renewal.stage(renewed.key_pem.as_bytes(), &renewed.issued));
                match staged {
                    Ok(()) => {
                        goodbye(session, "reconnecting with a renewed certificate").await;
                        return Ok(Ended::Renewed);
                    }
                    Err(error) => {
                        observers.metrics.certificate_renewals.get_or_create(&ResultLabels { result: "failed" }).inc();
                        tracing::warn!(%error, "certificate renewal failed; trying again soon");
                        renewal.failed();
                    }
                }
            }
            _ = heartbeat.tick() => {
                let (requests_processed, verdicts, errors) = {
                    let h = health.borrow();
                    (h.requests_processed, h.verdicts, h.errors)
                };
                let now = unix_ms_now();
                let events = observers.forwarding.as_ref().map(|f| f.heartbeat(now));
                session.send(AgentBody::Heartbeat(Heartbeat { sent_at_unix_ms: now, requests_processed, verdicts, errors, events })).await?;
                observers.metrics.heartbeats_sent.inc();
            }
            changed = health.changed() => {
                if changed.is_err() {
                    // The poller stopped: the agent is shutting down.
                    goodbye(session, "agent shutting down").await;
                    return Ok(Ended::Cancelled);
                }
                let current = health.borrow_and_update().clone();
                if materially_different(&session.reported, &current) {
                    session.send(AgentBody::Status(StatusUpdate { health: Some(current.clone()) })).await?;
                    session.reported = current;
                }
            }
            Some(result) = probes_done.recv() => {
                session.send(AgentBody::ProbeResult(result)).await?;
            }
            Some(status) = link.statuses.recv() => {
                count_answer(&observers.metrics, &status);
                link.unsent.push_back(status);
                flush(&mut session, &mut link.unsent).await?;
            }
            message = session.inbound.message() => match message {
                Ok(Some(CoordinatorMessage { body: Some(CoordinatorBody::Offer(offer)) })) => {
                    tracing::info!(offer_id = %offer.offer_id, version = %offer.config.as_ref().map(|c| c.version.as_str()).unwrap_or(""), rollback = offer.rollback, "config offered");
                    match &link.offers {
                        Some(offers) => {
                            if offers.send(offer).await.is_err() {
                                return Ok(Ended::Cancelled); // the applier stopped: shutting down
                            }
                        }
                        None => {
                            let refused = ConfigStatus {
                                offer_id: offer.offer_id,
                                config: offer.config,
                                phase: ConfigPhase::Rejected as i32,
                                running: session.reported.config.as_ref().map(|c| ConfigRef { version: c.version.clone(), hash: c.hash.clone() }),
                                error: "this agent does not manage its gateway's config (no gateway.config_path)".into(),
                                shadow: offer.shadow,
                            };
                            count_answer(&observers.metrics, &refused);
                            link.unsent.push_back(refused);
                            flush(&mut session, &mut link.unsent).await?;
                        }
                    }
                }
                Ok(Some(CoordinatorMessage { body: Some(CoordinatorBody::Probe(request)) })) => {
                    tracing::info!(probe_id = %request.probe_id, prompts = request.prompts.len(), "synthetic probe asked");
                    let prober = observers.prober.clone();
                    let results = probe_results.clone();
                    tokio::spawn(async move {
                        let result = match prober {
                            Some(prober) => prober.run(request).await,
                            None => ProbeResult {
                                probe_id: request.probe_id,
                                error: "this agent cannot probe its gateway".into(),
                                ..Default::default()
                            },
                        };
                        let _ = results.send(result).await;
                    });
                }
                Ok(Some(message)) => tracing::debug!(?message, "message from the coordinator"),
                Ok(None) => return Err(SessionLost("the coordinator ended the session".into())),
                Err(status) => return Err(SessionLost(status.to_string())),
            },
        }
    }
}

/// A renewed certificate and the fresh key it is for.
struct Renewed {
    key_pem: String,
    issued: v1::IssuedCertificate,
}

/// How long a renewal may take to be answered.
const RENEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the coordinator for a certificate for a fresh key, over the session's connection.
async fn ask_renewal(channel: tonic::transport::Channel) -> Result<Renewed, String> {
    let (key_pem, csr_pem) =
        kt_proto::leaf::key_and_csr().map_err(|e| format!("cannot make a key: {e}"))?;
    let request = v1::CertificateRequest {
        csr_pem: csr_pem.into_bytes(),
    };
    let mut client = AgentServiceClient::new(channel);
    match tokio::time::timeout(RENEW_TIMEOUT, client.renew(request)).await {
        Ok(Ok(answer)) => Ok(Renewed {
            key_pem,
            issued: answer.into_inner(),
        }),
        Ok(Err(status)) => Err(format!("the coordinator refused: {}", status.message())),
        Err(_) => Err(format!("no answer within {RENEW_TIMEOUT:?}")),
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn join_some<T>(
    task: &mut Option<tokio::task::JoinHandle<Result<T, String>>>,
) -> Result<T, String> {
    match task {
        Some(task) => task.await.map_err(|e| format!("renewal task: {e}"))?,
        None => std::future::pending().await,
    }
}

fn count_answer(metrics: &Metrics, status: &ConfigStatus) {
    let result = ConfigPhase::label_of(status.phase);
    metrics
        .config_applies
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Sends queued answers in order; an answer leaves the queue only once sent.
async fn flush(
    session: &mut OpenSession,
    unsent: &mut VecDeque<ConfigStatus>,
) -> Result<(), SessionLost> {
    while let Some(status) = unsent.front() {
        session
            .send(AgentBody::ConfigStatus(status.clone()))
            .await?;
        unsent.pop_front();
    }
    Ok(())
}

/// Says goodbye, closes our half and waits briefly for the coordinator to close its half.
async fn goodbye(mut session: OpenSession, reason: &str) {
    if session
        .send(AgentBody::Goodbye(Goodbye {
            reason: reason.to_owned(),
        }))
        .await
        .is_err()
    {
        return;
    }
    let OpenSession {
        outbound,
        mut inbound,
        ..
    } = session;
    drop(outbound);
    let drain = async { while let Ok(Some(_)) = inbound.message().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}
