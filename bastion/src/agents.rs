//! The agents' endpoint: mutual-TLS gRPC (`bastide.v1`). Enrollment needs only server
//! authentication; every other call takes the agent's identity from its verified client
//! certificate, never from request fields.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bastide_proto::v1::agent_server::{Agent, AgentServer};
use bastide_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use bastide_proto::v1::{
    agent_message, bastion_message, AgentMessage, BastionMessage, EnrollRequest, EnrollResponse,
    HeartbeatAck, LogAck, LogBatch, RegisterRequest, RegisterResponse, RenewRequest, RenewResponse,
};
use tokio::net::TcpListener;
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
use crate::registry::{EnrollError, Facts, Registry, RegistryError};
use crate::service::{self, Ctx};
use crate::tls::{AgentConn, ConnInfo};

/// Largest gRPC message an agent may send: a log batch (registration facts, CSRs and
/// heartbeats stay far below).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

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
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
}

impl service::Service for Endpoint {
    const NAME: &'static str = "agents";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        let Some(a) = &cfg.agents else {
            return Ok(None);
        };
        let listener = TcpListener::bind(a.listen).await.with_context(|| {
            format!(
                "{}: agents.listen: cannot bind {}",
                cfg.source.display(),
                a.listen
            )
        })?;
        let tls = Arc::new(crate::tls::server_config(&cfg.pki_paths(), &ctx.registry)?);
        Ok(Some(Self {
            cfg: a.clone(),
            listener,
            tls,
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        let peers = Peers {
            hosts: ctx.hosts.clone(),
            logs: ctx.handles.get(),
            config_push: ctx.handles.get(),
        };
        run(
            self.cfg,
            ctx.registry,
            peers,
            self.tls,
            self.listener,
            shutdown,
        )
        .await
    }
}

/// Serves the agents' endpoint on `listener` until `shutdown`.
pub async fn run(
    cfg: AgentsConfig,
    registry: Registry,
    peers: Peers,
    tls: Arc<rustls::ServerConfig>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let Peers {
        hosts,
        logs,
        config_push,
    } = peers;
    let local = listener.local_addr().context("agents listener address")?;
    let (tx, rx) = mpsc::channel::<Result<AgentConn, std::io::Error>>(256);
    let acceptor = TlsAcceptor::from(tls);
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let accept_shutdown = shutdown.clone();
    let accept_registry = registry.clone();
    let handshake_timeout = cfg.handshake_timeout;
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = accept_shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: wait instead of spinning.
                        warn!(error = %e, "agents: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                warn!(%peer, "agents: connection limit reached, refusing connection");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let registry = accept_registry.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx
                            .send(Ok(AgentConn::new(tls, peer, &registry, permit)))
                            .await;
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

    let svc = Service {
        registry,
        hosts,
        heartbeat_interval: cfg.heartbeat_interval,
        heartbeat_timeout: cfg.heartbeat_timeout,
        shutdown: shutdown.clone(),
        logs,
        config_push,
    };
    info!(listen = %local, "agents endpoint listening");
    // No HTTP/2 keepalive pings: the session's heartbeats already prove liveness both ways,
    // and pings would double the per-agent wake-ups at fleet scale.
    let result = tonic::transport::Server::builder()
        .add_service(EnrollmentServer::new(svc.clone()).max_decoding_message_size(64 * 1024))
        .add_service(AgentServer::new(svc).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown.cancelled())
        .await;
    accept_loop.abort();
    result.context("agents endpoint")
}

#[derive(Clone)]
struct Service {
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

fn identity<T>(req: &Request<T>) -> Result<AgentIdentity, Status> {
    conn_info(req)
        .and_then(|c| c.identity.clone())
        .ok_or_else(|| {
            Status::unauthenticated("a client certificate issued by this bastion is required")
        })
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
        RegistryError::Store(_) => Status::internal("internal error"),
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

#[tonic::async_trait]
impl Enrollment for Service {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = peer(&req);
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
        let id = identity(&req)?;
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
        let id = identity(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<BastionMessage, Status>>(16);
        self.registry.session_started(&id.name);
        let guard = SessionGuard {
            registry: self.registry.clone(),
            name: id.name.clone(),
        };
        let timeout = self.heartbeat_timeout;
        let shutdown = self.shutdown.clone();
        let hosts = self.hosts.clone();
        let push = self.config_push.clone();
        let mut push_rx = push.as_ref().map(|p| p.subscribe(&id.name));
        tokio::spawn(async move {
            let _guard = guard;
            let registry = _guard.registry.clone();
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    // The newest rendered configuration, if this agent lacks it.
                    r = async { push_rx.as_mut()?.changed().await.ok() }, if push_rx.is_some() => {
                        match (r, &push, push_rx.as_mut()) {
                            (Some(()), Some(p), Some(rx)) => {
                                if let Some(m) = p.next_push(&id.name, rx) {
                                    if tx.send(Ok(m)).await.is_err() {
                                        break;
                                    }
                                }
                            }
                            _ => push_rx = None,
                        }
                        continue;
                    }
                    m = tokio::time::timeout(timeout, inbound.message()) => m,
                };
                match msg {
                    Err(_) => {
                        warn!(agent = %id.name, "no heartbeat within {}s: closing session", timeout.as_secs());
                        let _ = tx
                            .send(Err(Status::deadline_exceeded("heartbeat timeout")))
                            .await;
                        break;
                    }
                    Ok(Ok(Some(m))) => match m.kind {
                        Some(agent_message::Kind::Heartbeat(hb)) => {
                            metrics::counter!(names::HEARTBEATS).increment(1);
                            registry.heartbeat(&id.name);
                            let ack = BastionMessage {
                                kind: Some(bastion_message::Kind::HeartbeatAck(HeartbeatAck {
                                    seq: hb.seq,
                                    bastion_time_unix: crate::unix_now(),
                                })),
                            };
                            if tx.send(Ok(ack)).await.is_err() {
                                break;
                            }
                        }
                        Some(agent_message::Kind::Metrics(batch)) => {
                            registry.heartbeat(&id.name);
                            match hosts.ingest(&id.name, batch) {
                                Ok(dropped) => {
                                    metrics::counter!(names::METRICS_BATCHES, "result" => "ok")
                                        .increment(1);
                                    if dropped > 0 {
                                        metrics::counter!(names::METRICS_DROPPED)
                                            .increment(dropped as u64);
                                        debug!(agent = %id.name, dropped, "invalid host metric samples dropped");
                                    }
                                }
                                Err(e) => {
                                    metrics::counter!(names::METRICS_BATCHES, "result" => "refused").increment(1);
                                    warn!(agent = %id.name, reason = %e, "host metrics batch refused");
                                }
                            }
                        }
                        Some(agent_message::Kind::ConfigResult(r)) => match &push {
                            Some(p) => p.result(&id.name, &r),
                            None => {
                                debug!(agent = %id.name, "configuration result without configuration push")
                            }
                        },
                        // Newer agents may send kinds this bastion does not know.
                        None => debug!(agent = %id.name, "ignoring unknown session message"),
                    },
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        debug!(agent = %id.name, error = %status, "session stream ended");
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let id = identity(&req)?;
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
        let id = identity(&req)?;
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
