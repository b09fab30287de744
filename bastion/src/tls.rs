//! TLS for the agents' endpoint: rustls (TLS 1.3 only, ring provider), a client verifier that
//! consults the registry at every handshake, and a connection type that the registry can cut
//! (revocation) and that closes itself when its client certificate expires, or, without a
//! client certificate, when idle, enrolled or old.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::pki::{identity_from_cert, AgentIdentity, PkiPaths};
use crate::registry::{ConnCut, Registry, SerialRefusal};

/// Installs the process-wide rustls crypto provider (ring) once, explicitly, so that no
/// feature unification can leave the choice to chance.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct RegistryVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    registry: Registry,
}

impl ClientCertVerifier for RegistryVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    // Enrollment happens before an agent has a certificate; every other call checks that
    // the connection carries an identity.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::warn!(error = %e, "client certificate refused"))?;
        let id = identity_from_cert(end_entity, &self.registry.ca().project).map_err(|e| {
            tracing::warn!(error = %e, "client certificate refused");
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        self.registry.check_serial(&id.serial).map_err(|r| {
            tracing::warn!(agent = %id.name, serial = %id.serial, reason = %r, "client certificate refused");
            rustls::Error::InvalidCertificate(match r {
                SerialRefusal::Revoked => CertificateError::Revoked,
                SerialRefusal::Unknown => CertificateError::ApplicationVerificationFailure,
            })
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls server configuration of the agents' endpoint.
pub fn server_config(paths: &PkiPaths, registry: &Registry) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let ca = registry.ca().cert_der.clone();
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .context("adding agent CA to trust store")?;
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .context("building client verifier")?;
    let verifier = Arc::new(RegistryVerifier {
        inner: webpki,
        registry: registry.clone(),
    });
    let server_cert = crate::pki::read_cert_pem(&paths.server_cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.server_key)
        .with_context(|| format!("reading {}", paths.server_key.display()))?;
    // The CA goes in the chain so that an enrolling agent can match it against its pin.
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert, ca], key)
        .context("server certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed handshake does not run the client verifier, so a
    // ticket obtained before a revocation would reopen a connection after it. Agents hold
    // long-lived connections; a full handshake per connection costs nothing that matters.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A plain server configuration (no client certificates) with the bastion's server
/// certificate, for HTTPS endpoints such as metrics.
pub fn https_config(paths: &PkiPaths) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let cert = crate::pki::read_cert_pem(&paths.server_cert)?;
    let ca = crate::pki::read_cert_pem(&paths.ca_cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.server_key)
        .with_context(|| format!("reading {}", paths.server_key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(vec![cert, ca], key)
        .context("server certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// What a gRPC handler knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The agent identity from the verified client certificate, if one was presented.
    pub identity: Option<AgentIdentity>,
    /// On a connection without a client certificate: cancelled by the enrollment handler
    /// once it answered, so that the connection closes after a short grace.
    pub enrolled: Option<CancellationToken>,
    /// On a connection without a client certificate: set while a call on it is being
    /// answered (see [`Answering`]); the client then waits in silence and is not idle.
    pub answering: Option<Arc<AtomicBool>>,
}

/// Marks a certificate-less connection as being answered until dropped: an enrollment the
/// bastion is slow to answer (its store busy) must not be cut as idle, or the agent would
/// get no certificate for a token already spent.
pub struct Answering(Arc<AtomicBool>);

impl Answering {
    pub fn start(flag: Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Grace between an enrollment's answer and the close of its certificate-less connection:
/// time for the answer to reach the client.
const ENROLLED_GRACE: Duration = Duration::from_secs(1);

/// The key connections are counted under per source: the address, or its /64 for IPv6
/// (one host commonly holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Bounds on connections that have not shown a client certificate: they can only enroll,
/// so a stranger must not hold more than a few of them, nor hold them long.
#[derive(Clone, Debug)]
pub struct UnauthLimits {
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_source: usize,
    total: Arc<Semaphore>,
    pub idle: Duration,
    pub lifetime: Duration,
}

/// One connection counted against its source address until dropped.
#[derive(Debug)]
pub struct SourceSlot {
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl UnauthLimits {
    pub fn new(
        max_total: usize,
        max_per_source: usize,
        idle: Duration,
        lifetime: Duration,
    ) -> Self {
        Self {
            per_source: Arc::new(Mutex::new(HashMap::new())),
            max_per_source,
            total: Arc::new(Semaphore::new(max_total)),
            idle,
            lifetime,
        }
    }

    /// Counts a new connection from `ip` (its handshake, then the connection if it shows no
    /// client certificate); `None` when that source already holds its share. The map holds
    /// only sources with a live connection, so it is bounded by the connection limit.
    pub fn source_slot(&self, ip: IpAddr) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut m = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            per_source: self.per_source.clone(),
            key,
        })
    }
}

/// Closes the registry's record of a connection when it ends.
struct ConnGuard {
    registry: Registry,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::names::AGENT_CONNECTIONS).decrement(1.0);
        self.registry.connection_closed(self.id);
    }
}

type CutFuture = Pin<Box<dyn Future<Output = &'static str> + Send>>;

/// What ends a connection: for an agent, the registry's cut (revocation, expiry); without a
/// client certificate, its own timers (idle, enrolled, lifetime).
enum Cut {
    Agent {
        cut: Arc<ConnCut>,
        _guard: ConnGuard,
    },
    Unauthenticated {
        fut: CutFuture,
        _hold: UnauthHold,
    },
}

/// What keeps a certificate-less connection counted: its source slot and its share of the
/// total.
struct UnauthHold {
    _slot: SourceSlot,
    _permit: OwnedSemaphorePermit,
}

/// A TLS connection from an agent that ends itself when cut.
///
/// Boxed: the server keeps each connection inside the future of its task, and an async
/// function keeps its arguments beside its state, so an inline connection (1.4 KiB, most of
/// it rustls' state) was counted there twice and pushed every agent's task into a larger
/// allocation class (`bench/README.md`, memory per agent).
pub struct AgentConn(Box<Conn>);

struct Conn {
    io: TlsStream<TcpStream>,
    info: ConnInfo,
    cut: Cut,
    /// Milliseconds from `opened` to the last byte read (certificate-less connections).
    last_read: Option<Arc<AtomicU64>>,
    opened: Instant,
    _permit: OwnedSemaphorePermit,
}

impl AgentConn {
    /// Wraps a completed handshake. With a client certificate the connection is registered
    /// with the registry so that revocation cuts it; the serial is checked again once it
    /// is registered, so that a revocation that ran during the handshake (after the
    /// verifier's check, before the registration) cuts it too. Without one it keeps its
    /// source slot and a share of `limits`' total, or is refused (`Err` with the reason)
    /// when the total is spent.
    pub fn new(
        io: TlsStream<TcpStream>,
        peer: SocketAddr,
        registry: &Registry,
        permit: OwnedSemaphorePermit,
        slot: SourceSlot,
        limits: &UnauthLimits,
    ) -> Result<Self, &'static str> {
        let identity = io
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| registry.ca().identity(c).ok());
        let opened = Instant::now();
        let mut last_read = None;
        let mut enrolled = None;
        let mut answering = None;
        let cut = match &identity {
            Some(id) => {
                drop(slot);
                let (conn_id, cut) = registry.connection_opened(&id.name, id.not_after);
                metrics::gauge!(crate::metrics::names::AGENT_CONNECTIONS).increment(1.0);
                let guard = ConnGuard {
                    registry: registry.clone(),
                    id: conn_id,
                };
                if let Err(r) = registry.check_serial(&id.serial) {
                    // Revoked between the verifier's check and `connection_opened`: the
                    // revocation's cut list did not hold this connection yet.
                    tracing::warn!(agent = %id.name, serial = %id.serial, reason = %r, %peer, "certificate refused after the handshake: cutting the connection");
                    metrics::counter!(crate::metrics::names::AGENT_CONNECTIONS_REFUSED, "reason" => "revoked").increment(1);
                    cut.revoke();
                } else if id.not_after < crate::unix_now() {
                    // Expired during the handshake: cut now rather than at the next sweep.
                    cut.expire();
                }
                Cut::Agent { cut, _guard: guard }
            }
            None => {
                let Ok(total) = limits.total.clone().try_acquire_owned() else {
                    return Err("unauthenticated");
                };
                let hold = UnauthHold {
                    _slot: slot,
                    _permit: total,
                };
                let read = Arc::new(AtomicU64::new(0));
                last_read = Some(read.clone());
                let done = CancellationToken::new();
                enrolled = Some(done.clone());
                let busy = Arc::new(AtomicBool::new(false));
                answering = Some(busy.clone());
                let (idle, lifetime) = (limits.idle, limits.lifetime);
                let fut: CutFuture = Box::pin(async move {
                    let mut deadline = opened + lifetime;
                    let mut reason = "lifetime";
                    loop {
                        let seen = read.load(Ordering::Relaxed);
                        let idle_at = opened + Duration::from_millis(seen) + idle;
                        tokio::select! {
                            _ = tokio::time::sleep_until(deadline) => break,
                            _ = tokio::time::sleep_until(idle_at), if idle_at < deadline => {
                                if busy.load(Ordering::Relaxed) {
                                    // A call is being answered: the idle time starts again.
                                    read.store(opened.elapsed().as_millis() as u64, Ordering::Relaxed);
                                } else if read.load(Ordering::Relaxed) == seen {
                                    reason = "idle";
                                    break;
                                }
                            }
                            _ = done.cancelled(), if reason == "lifetime" => {
                                reason = "enrolled";
                                deadline = deadline.min(Instant::now() + ENROLLED_GRACE);
                            }
                        }
                    }
                    if reason != "enrolled" {
                        metrics::counter!(crate::metrics::names::AGENT_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
                    }
                    match reason {
                        "idle" => "idle without a client certificate",
                        "enrolled" => "enrollment answered",
                        _ => "certificate-less connection lifetime reached",
                    }
                });
                Cut::Unauthenticated { fut, _hold: hold }
            }
        };
        Ok(Self(Box::new(Conn {
            io,
            info: ConnInfo {
                peer,
                identity,
                enrolled,
                answering,
            },
            cut,
            last_read,
            opened,
            _permit: permit,
        })))
    }
}

impl Conn {
    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let reason = match &mut self.cut {
            Cut::Agent { cut, .. } => cut.poll_cut(cx),
            Cut::Unauthenticated { fut, .. } => fut.as_mut().poll(cx),
        };
        if let Poll::Ready(reason) = reason {
            match &self.info.identity {
                Some(id) => {
                    tracing::info!(agent = %id.name, reason, "cutting agent connection")
                }
                None => {
                    tracing::debug!(peer = %self.info.peer, reason, "closing certificate-less connection")
                }
            }
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason));
        }
        Ok(())
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_cut(cx)?;
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(seen) = &self.last_read {
                seen.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AgentConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.0.info.clone()
    }
}
