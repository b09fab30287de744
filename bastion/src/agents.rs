//! The agents' endpoint: mutual-TLS gRPC (`bastide.v1`). Enrollment needs only server
//! authentication; every other call takes the agent's identity from its verified client
//! certificate, never from request fields.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::listeners::TcpListeners;
use anyhow::{Context, Result};
use bastide_proto::v1::agent_server::{Agent, AgentServer};
use bastide_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use bastide_proto::v1::{
    agent_message, bastion_message, AgentMessage, BastionMessage, EnrollRequest, EnrollResponse,
    HeartbeatAck, LogAck, LogBatch, RegisterRequest, RegisterResponse, RenewRequest, RenewResponse,
};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::config::{AgentsConfig, Config};
use crate::config_push::ConfigPushHandle;
use crate::hostmetrics::HostMetrics;
use crate::metrics::names;
use crate::pki::AgentIdentity;
use crate::registry::{EnrollError, Facts, Registry, RegistryError, SerialRefusal};
use crate::service::{self, Ctx};
use crate::tls::{AgentConn, ConnInfo, UnauthLimits};

/// Largest gRPC message an agent may send: a log batch (registration facts, CSRs and
/// heartbeats stay far below).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// HTTP/2 limits per connection. An agent uses a handful of streams (session, logs,
/// registration, renewal) and small headers; a client that opens and resets streams in a
/// loop is closed once it has this many resets pending.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_PENDING_RESETS: usize = 32;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(300);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-agent token bucket for certificate renewals: each renewal signs a certificate and
/// writes the store, so an enrolled VM must not be able to loop on it. The map holds only
/// agents whose certificate passed the registry's check, so it is bounded by the fleet.
#[derive(Clone)]
struct RenewLimiter {
    burst: f64,
    interval: Duration,
    buckets: Arc<std::sync::Mutex<HashMap<String, Bucket>>>,
}

struct Bucket {
    tokens: f64,
    at: tokio::time::Instant,
    /// A refusal was logged since the last renewal that passed.
    logged: bool,
}

impl RenewLimiter {
    fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            interval: interval.max(Duration::from_millis(1)),
            buckets: Arc::default(),
        }
    }

    /// Takes one renewal for `agent`, or tells when the next one is allowed and whether
    /// this is the first refusal since the last renewal (to log once, not per call).
    fn take(&self, agent: &str) -> Result<(), (Duration, bool)> {
        let now = tokio::time::Instant::now();
        let mut m = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let refill = |b: &Bucket| {
            (b.tokens + now.duration_since(b.at).as_secs_f64() / self.interval.as_secs_f64())
                .min(self.burst)
        };
        if m.len() > 4096 {
            // Full buckets are the same as no bucket.
            m.retain(|_, b| refill(b) < self.burst);
        }
        let b = m.entry(agent.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            logged: false,
        });
        b.tokens = refill(b);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            b.logged = false;
            Ok(())
        } else {
            let wait = self.interval.mul_f64(1.0 - b.tokens);
            let first = !b.logged;
            b.logged = true;
            Err((wait, first))
        }
    }
}

/// The services that receive from (logs) or send to (config) agents over this endpoint,
/// when they are on.
#[derive(Clone)]
pub struct Peers {
    pub hosts: HostMetrics,
    pub logs: Option<crate::logs::Logs>,
    pub config_push: Option<ConfigPushHandle>,
}

/// The agents' endpoint, bound (see `crate::service`). It takes the log store and
/// configuration push from the handles those services publish.
pub struct Endpoint {
    cfg: AgentsConfig,
    listener: TcpListeners,
    tls: Arc<rustls::ServerConfig>,
}

impl service::Service for Endpoint {
    const NAME: &'static str = "agents";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        let Some(a) = &cfg.agents else {
            return Ok(None);
        };
        let listener = TcpListeners::bind(&a.listen, "agents.listen", &cfg.source).await?;
        let tls = Arc::new(crate::tls::server_config(&cfg.pki_paths(), &ctx.registry)?);
        Ok(Some(Self {
            cfg: a.clone(),
            listener,
            tls,
        }))
    }

    /// Served on a thread of its own with a single-threaded runtime. Thousands of agents
    /// each wake the endpoint for a few microseconds every heartbeat: on the daemon's
    /// multi-threaded runtime every such wake-up also woke the other worker thread (a task
    /// that sends makes HTTP/2 reschedule it), and those cross-thread wake-ups were most of
    /// the heartbeats' CPU (6.3 % of a core for 10,000 agents, 4.1 % on one thread: see
    /// bench/README.md). It also keeps the other core for SSH, DNS, mail and syslog while
    /// a fleet reconnects after a restart.
    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        let peers = Peers {
            hosts: ctx.hosts.clone(),
            logs: ctx.handles.get(),
            config_push: ctx.handles.get(),
        };
        let listeners = self.listener.into_std().context("agents.listen")?;
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("bastide-agents".into())
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name("bastide-agents")
                    .build()
                    .context("agents endpoint: starting its runtime")
                    .and_then(|rt| {
                        rt.block_on(async move {
                            let listener =
                                TcpListeners::from_std(listeners).context("agents.listen")?;
                            run(self.cfg, ctx.registry, peers, self.tls, listener, shutdown).await
                        })
                    });
                let _ = done.send(served);
            })
            .context("agents endpoint: starting its thread")?;
        result
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("agents endpoint: its thread panicked")))
    }
}

/// Serves the agents' endpoint on `listener` until `shutdown`.
pub async fn run(
    cfg: AgentsConfig,
    registry: Registry,
    peers: Peers,
    tls: Arc<rustls::ServerConfig>,
    listener: TcpListeners,
    shutdown: CancellationToken,
) -> Result<()> {
    let Peers {
        hosts,
        logs,
        config_push,
    } = peers;
    let local = listener.local_addrs();
    let (tx, rx) = mpsc::channel::<Result<AgentConn, std::io::Error>>(256);
    let acceptor = TlsAcceptor::from(tls);
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let unauth = UnauthLimits::new(
        cfg.max_unauthenticated_connections,
        cfg.max_unauthenticated_per_address,
        cfg.unauthenticated_idle_timeout,
        cfg.unauthenticated_lifetime,
    );
    let accept_shutdown = shutdown.clone();
    let accept_registry = registry.clone();
    let handshake_timeout = cfg.handshake_timeout;
    let accept_loop = tokio::spawn(async move {
        // Refusals are logged at most once a second: a flood must not become a log flood.
        let mut last_refusal_log: Option<tokio::time::Instant> = None;
        let mut refused = |peer: SocketAddr, reason: &'static str| {
            metrics::counter!(names::AGENT_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
            let now = tokio::time::Instant::now();
            if last_refusal_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                last_refusal_log = Some(now);
                warn!(%peer, reason, "agents: connection refused by a limit (logged at most once a second)");
            }
        };
        loop {
            let (tcp, peer) = tokio::select! {
                _ = accept_shutdown.cancelled() => break,
                c = crate::listeners::accept(&listener, "agents") => c,
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                refused(peer, "connections");
                continue;
            };
            // Until it shows a client certificate, a connection counts against its source.
            let Some(slot) = unauth.source_slot(peer.ip()) else {
                refused(peer, "per_address");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let registry = accept_registry.clone();
            let unauth = unauth.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        match AgentConn::new(tls, peer, &registry, permit, slot, &unauth) {
                            Ok(conn) => {
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Err(reason) => {
                                metrics::counter!(names::AGENT_CONNECTIONS_REFUSED, "reason" => reason)
                                .increment(1);
                                debug!(%peer, reason, "agents: certificate-less connection refused: limit reached");
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        metrics::counter!(names::HANDSHAKE_FAILURES).increment(1);
                        debug!(%peer, error = %e, "agents: TLS handshake failed")
                    }
                    Err(_) => {
                        metrics::counter!(names::HANDSHAKE_FAILURES).increment(1);
                        debug!(%peer, "agents: TLS handshake timed out")
                    }
                }
            });
        }
    });

    // Certificates expire on the hour they say, not at the next heartbeat: one sweep a
    // second over the connections (a few microseconds for ten thousand).
    let sweep_registry = registry.clone();
    let expiry_sweep = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            sweep_registry.cut_expired(crate::unix_now());
        }
    });

    let svc = Service {
        renew_limit: RenewLimiter::new(cfg.renew_burst, cfg.renew_interval()),
        registry,
        hosts,
        heartbeat_interval: cfg.heartbeat_interval,
        heartbeat_timeout: cfg.heartbeat_timeout,
        shutdown: shutdown.clone(),
        logs,
        config_push,
    };
    info!(listen = ?local, "agents endpoint listening");
    // HTTP/2 keepalive pings only every few minutes: the session's heartbeats already prove
    // liveness both ways, and frequent pings would multiply the per-agent wake-ups at fleet
    // scale; these only close connections whose peer vanished without a session.
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(EnrollmentServer::new(svc.clone()).max_decoding_message_size(64 * 1024))
        .add_service(AgentServer::new(svc).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown.cancelled())
        .await;
    accept_loop.abort();
    expiry_sweep.abort();
    result.context("agents endpoint")
}

#[derive(Clone)]
struct Service {
    renew_limit: RenewLimiter,
    registry: Registry,
    hosts: HostMetrics,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    shutdown: CancellationToken,
    logs: Option<crate::logs::Logs>,
    config_push: Option<ConfigPushHandle>,
}

fn conn_info<T>(req: &Request<T>) -> Option<&ConnInfo> {
    req.extensions().get::<ConnInfo>()
}

impl Service {
    /// The caller's identity, from its verified client certificate, checked against the
    /// registry again at every call and stream: a certificate revoked (or superseded and
    /// pruned) since the handshake opens nothing new.
    fn identity<T>(&self, req: &Request<T>) -> Result<AgentIdentity, Status> {
        let id = conn_info(req)
            .and_then(|c| c.identity.clone())
            .ok_or_else(|| {
                Status::unauthenticated("a client certificate issued by this bastion is required")
            })?;
        self.registry.check_serial(&id.serial).map_err(|r| {
            debug!(agent = %id.name, serial = %id.serial, reason = %r, "call refused: certificate no longer valid");
            match r {
                SerialRefusal::Revoked => Status::permission_denied(r.to_string()),
                SerialRefusal::Unknown => Status::unauthenticated(r.to_string()),
            }
        })?;
        Ok(id)
    }
}

fn peer<T>(req: &Request<T>) -> Option<SocketAddr> {
    conn_info(req).map(|c| c.peer)
}

fn enroll_status(e: &EnrollError) -> Status {
    let msg = e.to_string();
    match e {
        EnrollError::InvalidToken
        | EnrollError::TokenExpired
        | EnrollError::TokenUsed
        | EnrollError::TokenRevoked => Status::unauthenticated(msg),
        EnrollError::InvalidName(_) | EnrollError::Csr(_) => Status::invalid_argument(msg),
        EnrollError::NameNotAllowed { .. } => Status::permission_denied(msg),
        EnrollError::NameTaken(_) => Status::already_exists(msg),
        EnrollError::Internal(_) => Status::internal("internal error"),
        EnrollError::StoreUnavailable(_) => Status::unavailable(msg),
    }
}

fn registry_status(e: &RegistryError) -> Status {
    let msg = e.to_string();
    match e {
        RegistryError::UnknownAgent(_) => Status::not_found(msg),
        RegistryError::Revoked(_) => Status::permission_denied(msg),
        RegistryError::Pki(_) | RegistryError::Invalid(_) | RegistryError::UnknownToken(_) => {
            Status::invalid_argument(msg)
        }
        RegistryError::Store(crate::store::StoreError::Unavailable(_)) => Status::unavailable(
            "the registry's database is unreachable: refused until it is back, retry later",
        ),
        RegistryError::Store(_) => Status::internal("internal error"),
        RegistryError::CutOff(_) => Status::unavailable(msg),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Status::internal("internal error"))
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<BastionMessage, Status>> + Send>>;

/// Marks the agent offline when its session task ends, however it ends.
struct SessionGuard {
    registry: Registry,
    name: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.session_ended(&self.name);
    }
}

/// One agent's session: what its stream reads and answers.
struct Session {
    inbound: Streaming<AgentMessage>,
    push: Option<ConfigPushHandle>,
    push_rx: Option<tokio::sync::watch::Receiver<Option<Arc<bastide_proto::v1::ConfigPush>>>>,
    guard: SessionGuard,
    timeout: Duration,
    shutdown: CancellationToken,
    hosts: HostMetrics,
    /// A last message (the heartbeat timeout's status) went out: end at the next poll.
    ended: bool,
}

impl Session {
    /// The next message to send to the agent, handling what it sends until there is one;
    /// `None` ends the session.
    async fn next(&mut self) -> Option<Result<BastionMessage, Status>> {
        let name = &self.guard.name;
        let registry = &self.guard.registry;
        while !self.ended {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                // The newest rendered configuration, if this agent lacks it.
                r = async { self.push_rx.as_mut()?.changed().await.ok() }, if self.push_rx.is_some() => {
                    match (r, &self.push, self.push_rx.as_mut()) {
                        (Some(()), Some(p), Some(rx)) => {
                            if let Some(m) = p.next_push(name, rx) {
                                return Some(Ok(m));
                            }
                        }
                        _ => self.push_rx = None,
                    }
                    continue;
                }
                m = tokio::time::timeout(self.timeout, self.inbound.message()) => m,
            };
            match msg {
                Err(_) => {
                    warn!(agent = %name, "no heartbeat within {}s: closing session", self.timeout.as_secs());
                    self.ended = true;
                    return Some(Err(Status::deadline_exceeded("heartbeat timeout")));
                }
                Ok(Ok(Some(m))) => match m.kind {
                    Some(agent_message::Kind::Heartbeat(hb)) => {
                        metrics::counter!(names::HEARTBEATS).increment(1);
                        registry.heartbeat(name);
                        if hb.no_ack {
                            continue;
                        }
                        return Some(Ok(BastionMessage {
                            kind: Some(bastion_message::Kind::HeartbeatAck(HeartbeatAck {
                                seq: hb.seq,
                                bastion_time_unix: crate::unix_now(),
                            })),
                        }));
                    }
                    Some(agent_message::Kind::Metrics(batch)) => {
                        registry.heartbeat(name);
                        match self.hosts.ingest(name, batch) {
                            Ok(dropped) => {
                                metrics::counter!(names::METRICS_BATCHES, "result" => "ok")
                                    .increment(1);
                                if dropped > 0 {
                                    metrics::counter!(names::METRICS_DROPPED)
                                        .increment(dropped as u64);
                                    debug!(agent = %name, dropped, "invalid host metric samples dropped");
                                }
                            }
                            Err(e) => {
                                metrics::counter!(names::METRICS_BATCHES, "result" => "refused")
                                    .increment(1);
                                warn!(agent = %name, reason = %e, "host metrics batch refused");
                            }
                        }
                    }
                    Some(agent_message::Kind::ConfigResult(r)) => match &self.push {
                        Some(p) => p.result(name, &r),
                        None => {
                            debug!(agent = %name, "configuration result without configuration push")
                        }
                    },
                    // Newer agents may send kinds this bastion does not know.
                    None => debug!(agent = %name, "ignoring unknown session message"),
                },
                Ok(Ok(None)) => return None,
                Ok(Err(status)) => {
                    debug!(agent = %name, error = %status, "session stream ended");
                    return None;
                }
            }
        }
        None
    }
}

#[tonic::async_trait]
impl Enrollment for Service {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = peer(&req);
        // The connection closes shortly after this answer (see `AgentConn`).
        let _done = conn_info(&req)
            .and_then(|c| c.enrolled.clone())
            .map(|t| t.drop_guard());
        // Until then, the connection is not idle however long the store takes.
        let _answering = conn_info(&req)
            .and_then(|c| c.answering.clone())
            .map(crate::tls::Answering::start);
        let r = req.into_inner();
        let name: String = r.name.chars().take(64).collect();
        let registry = self.registry.clone();
        let result =
            blocking(move || registry.enroll(&r.token, &r.name, &r.csr_der, &r.agent_version))
                .await?;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        metrics::counter!(names::ENROLLMENTS, "result" => outcome).increment(1);
        match result {
            Ok(e) => {
                let ca = self.registry.ca();
                Ok(Response::new(EnrollResponse {
                    name: e.name,
                    certificate_pem: e.certificate_pem,
                    ca_pem: ca.cert_pem.clone(),
                    project: ca.project.clone(),
                    zone: ca.zone.clone().unwrap_or_default(),
                    not_after_unix: e.not_after,
                }))
            }
            Err(e) => {
                warn!(agent = %name.escape_debug(), peer = ?peer, reason = %e, "enrollment refused");
                Err(enroll_status(&e))
            }
        }
    }
}

#[tonic::async_trait]
impl Agent for Service {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let id = self.identity(&req)?;
        let peer_ip = peer(&req).map(|p| p.ip());
        let r = req.into_inner();
        let facts = Facts {
            claimed_name: r.claimed_name,
            hostname: r.hostname,
            addresses: r.addresses,
            os: r.os,
            agent_version: r.agent_version,
            ssh_host_keys: r.ssh_host_keys,
            config_revision: r.config_revision,
        };
        let registry = self.registry.clone();
        let id2 = id.clone();
        let labels = blocking(move || registry.register(&id2, facts, peer_ip))
            .await?
            .inspect(|_| metrics::counter!(names::REGISTRATIONS, "result" => "ok").increment(1))
            .map_err(|e| {
                metrics::counter!(names::REGISTRATIONS, "result" => "refused").increment(1);
                warn!(agent = %id.name, reason = %e, "registration refused");
                registry_status(&e)
            })?;
        let ca = self.registry.ca();
        Ok(Response::new(RegisterResponse {
            name: id.name,
            heartbeat_interval_secs: self.heartbeat_interval.as_secs().max(1) as u32,
            project: ca.project.clone(),
            zone: ca.zone.clone().unwrap_or_default(),
            labels: labels.into_iter().collect(),
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let id = self.identity(&req)?;
        self.registry.session_started(&id.name);
        let push = self.config_push.clone();
        let state = Session {
            push_rx: push.as_ref().map(|p| p.subscribe(&id.name)),
            push,
            inbound: req.into_inner(),
            guard: SessionGuard {
                registry: self.registry.clone(),
                name: id.name,
            },
            timeout: self.heartbeat_timeout,
            shutdown: self.shutdown.clone(),
            hosts: self.hosts.clone(),
            ended: false,
        };
        // The response stream is the session itself, polled by the connection's HTTP/2 task:
        // no task and no channel of its own per agent. When the agent goes away the stream is
        // dropped, and with it the guard that marks the session ended.
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            state,
            |mut s| async move { s.next().await.map(|m| (m, s)) },
        ))))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let id = self.identity(&req)?;
        if let Err((wait, first)) = self.renew_limit.take(&id.name) {
            metrics::counter!(names::RENEWALS_REFUSED).increment(1);
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if first {
                warn!(agent = %id.name, retry_in_secs = secs, "renewal refused: rate limit (logged once until a renewal passes)");
            }
            return Err(Status::resource_exhausted(format!(
                "certificate renewal rate limit reached: retry in {secs}s"
            )));
        }
        let r = req.into_inner();
        let registry = self.registry.clone();
        let id2 = id.clone();
        let issued = blocking(move || registry.renew(&id2, &r.csr_der))
            .await?
            .inspect(|_| metrics::counter!(names::RENEWALS).increment(1))
            .map_err(|e| {
                warn!(agent = %id.name, reason = %e, "renewal refused");
                registry_status(&e)
            })?;
        Ok(Response::new(RenewResponse {
            certificate_pem: issued.certificate_pem,
            not_after_unix: issued.not_after,
        }))
    }

    type ShipLogsStream = Pin<Box<dyn Stream<Item = Result<LogAck, Status>> + Send>>;

    async fn ship_logs(
        &self,
        req: Request<Streaming<LogBatch>>,
    ) -> Result<Response<Self::ShipLogsStream>, Status> {
        let id = self.identity(&req)?;
        let Some(logs) = self.logs.clone() else {
            debug!(agent = %id.name, "log shipping refused: no [logs] table");
            return Err(Status::failed_precondition(
                "this bastion has no log store ([logs] is off)",
            ));
        };
        let acks =
            crate::logs::ingest::ship(logs, id.name, req.into_inner(), self.shutdown.clone()).await;
        Ok(Response::new(Box::pin(acks)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn renewals_are_a_burst_then_one_per_interval() {
        let l = RenewLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(l.take("web01").is_ok());
        }
        let (wait, first) = l.take("web01").unwrap_err();
        assert!(first);
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(59));
        // Logged once per streak.
        assert!(!l.take("web01").unwrap_err().1);
        // Another agent has its own bucket.
        assert!(l.take("db01").is_ok());
        tokio::time::advance(Duration::from_secs(30)).await;
        let (wait, _) = l.take("web01").unwrap_err();
        assert!(wait <= Duration::from_secs(30), "{wait:?}");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(l.take("web01").is_ok());
        assert!(l.take("web01").is_err());
        // A renewal that passes starts a new streak.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(l.take("web01").is_ok());
        assert!(l.take("web01").unwrap_err().1);
    }
}
