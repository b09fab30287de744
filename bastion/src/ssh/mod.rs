//! The SSH jump host (`[ssh]`): admins use the stock OpenSSH client (`ssh -J`, `scp -J`,
//! `ProxyJump`) to reach enrolled VMs. Only `direct-tcpip` channels are served; targets are
//! resolved from the registry and checked against per-admin rules; every attempt is audited.
//!
//! Built on russh: this module owns the accept loop (so per-source rate limiting and the
//! authentication deadline act before russh spends any crypto), the policy (swapped on
//! reload, read per connection and per channel) and the forwarding.

pub mod audit;
pub mod auth;
pub mod config;
pub mod forward;
pub mod hosts;
pub mod issued;
pub mod limits;
pub mod names;
pub mod rules;
pub mod service;
pub mod sso;
pub mod userca;

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, Certificate, EcdsaCurve, HashAlg, PrivateKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure, MethodKind, MethodSet, Preferred};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::config::Policy;
pub use self::config::SshConfig;
use crate::config::Config;
use crate::registry::Registry;

/// What a shell, exec or subsystem request gets.
pub const JUMP_ONLY: &str = "this host is a jump host: use ssh -J";

/// Counters for the metrics service to export (names in `Counters::export`).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub connections_rate_limited: AtomicU64,
    pub auth_succeeded: AtomicU64,
    pub auth_failed: AtomicU64,
    pub jumps_allowed: AtomicU64,
    pub jumps_denied: AtomicU64,
    pub jumps_open: AtomicU64,
    pub bytes_to_target: AtomicU64,
    pub bytes_from_target: AtomicU64,
}

impl Counters {
    /// (metric name, value) for every counter (help texts in `metrics::names`).
    pub fn export(&self) -> Vec<(&'static str, u64)> {
        use crate::metrics::names as n;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (n::SSH_CONNECTIONS, g(&self.connections)),
            (
                n::SSH_CONNECTIONS_RATE_LIMITED,
                g(&self.connections_rate_limited),
            ),
            (n::SSH_AUTH_SUCCEEDED, g(&self.auth_succeeded)),
            (n::SSH_AUTH_FAILED, g(&self.auth_failed)),
            (n::SSH_JUMPS_ALLOWED, g(&self.jumps_allowed)),
            (n::SSH_JUMPS_DENIED, g(&self.jumps_denied)),
            (n::SSH_JUMPS_OPEN, g(&self.jumps_open)),
            (n::SSH_BYTES_TO_TARGET, g(&self.bytes_to_target)),
            (n::SSH_BYTES_FROM_TARGET, g(&self.bytes_from_target)),
        ]
    }
}

/// The process-wide counters (one SSH service per daemon).
pub fn counters() -> Arc<Counters> {
    static C: std::sync::OnceLock<Arc<Counters>> = std::sync::OnceLock::new();
    C.get_or_init(|| Arc::new(Counters::default())).clone()
}

/// What reload swaps: the compiled policy and the russh configuration built from it.
struct Live {
    config: Arc<Config>,
    policy: Arc<Policy>,
    russh: Arc<russh::server::Config>,
    auth_timeout: Duration,
}

struct Shared {
    live: RwLock<Arc<Live>>,
    registry: Registry,
    /// The user CA of single sign-on: certificates it signed are checked against
    /// `issued`, not against `[[ssh.admins]]`.
    user_ca: Option<KeyData>,
    issued: issued::IssuedCerts,
    audit: audit::Audit,
    counters: Arc<Counters>,
    limiter: limits::RateLimiter,
    sessions: Arc<limits::Sessions>,
    shutdown: CancellationToken,
}

impl Shared {
    fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn config(&self) -> Arc<Config> {
        self.live().config.clone()
    }
}

/// Only modern algorithms; strict KEX (kex-strict-s) is offered, which OpenSSH >= 9.6 uses.
fn preferred() -> Preferred {
    use russh::{cipher, kex, mac};
    Preferred {
        kex: Cow::Borrowed(&[
            kex::MLKEM768X25519_SHA256,
            kex::CURVE25519,
            kex::CURVE25519_PRE_RFC_8731,
            kex::EXTENSION_SUPPORT_AS_SERVER,
            kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]),
        key: Cow::Borrowed(&[
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP521,
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ]),
        host_key_certificates: Cow::Borrowed(&[]),
        cipher: Cow::Borrowed(&[
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
        ]),
        mac: Cow::Borrowed(&[mac::HMAC_SHA512_ETM, mac::HMAC_SHA256_ETM]),
        compression: Cow::Borrowed(&[russh::compression::NONE]),
    }
}

/// russh's per-connection configuration.
///
/// Window and packet sizes: russh defaults to a 2 MiB window and 32 KiB packets. A jump
/// channel is a bulk pipe, so the window is 16 MiB (enough for ~1 Gbit/s at 100 ms RTT) and
/// packets may be up to 256 KiB, OpenSSH's own upper bound, which lets clients send larger
/// packets and halves the per-packet work for bulk copies.
fn russh_config(cfg: &SshConfig, host_key: PrivateKey) -> russh::server::Config {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    russh::server::Config {
        server_id: russh::SshId::Standard(Cow::Owned(format!(
            "SSH-2.0-bastide_{}",
            crate::VERSION
        ))),
        methods,
        auth_rejection_time: cfg.auth_rejection_delay,
        // OpenSSH clients always open with a "none" probe: answer it at once.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        max_auth_attempts: cfg.max_auth_attempts,
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: 256 * 1024,
        channel_buffer_size: 64,
        event_buffer_size: 64,
        preferred: preferred(),
        // Channel idleness is enforced per channel; this only reaps dead connections.
        inactivity_timeout: Some(cfg.idle_timeout + cfg.keepalive_interval * 4),
        keepalive_interval: Some(cfg.keepalive_interval),
        keepalive_max: 3,
        // Server-initiated rekeying (RFC 4253 section 9); OpenSSH clients rekey on their
        // own RekeyLimit as well.
        limits: russh::Limits::new(
            cfg.rekey_limit.min(1 << 30),
            cfg.rekey_limit.min(1 << 30),
            cfg.rekey_interval,
        ),
        nodelay: true,
        ..Default::default()
    }
}

fn load_host_key(cfg: &Config) -> Result<PrivateKey> {
    let path = cfg.pki_paths().ssh_host_key;
    crate::fsutil::check_secret_file(&path)?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading SSH host key {}", path.display()))?;
    PrivateKey::from_openssh(text.trim())
        .with_context(|| format!("parsing SSH host key {}", path.display()))
}

fn build_live(cfg: &Config) -> Result<Live> {
    let ssh = cfg.ssh.as_ref().context("no [ssh] table")?;
    let policy = Policy::build(ssh, cfg.zone.as_deref()).map_err(|p| {
        anyhow::anyhow!(
            "{}",
            p.iter()
                .map(|(k, r)| format!("{k}: {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    Ok(Live {
        config: Arc::new(cfg.clone()),
        policy: Arc::new(policy),
        russh: Arc::new(russh_config(ssh, load_host_key(cfg)?)),
        auth_timeout: ssh.auth_timeout,
    })
}

fn set_keepalive(stream: &TcpStream, interval: Duration) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(interval)
        .with_interval(interval)
        .with_retries(4);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Serves the jump host on `listener` until `shutdown`. `config` carries the whole daemon
/// configuration so a reload (SIGHUP, `bastide reload`) swaps admins, rules and limits for
/// new connections and channels without touching open ones; the listener and the audit
/// log path need a restart.
pub async fn run(
    mut config: watch::Receiver<Arc<Config>>,
    registry: Registry,
    listener: crate::listeners::TcpListeners,
    sso: Option<crate::listeners::TcpListeners>,
    issued: issued::IssuedCerts,
    shutdown: CancellationToken,
) -> Result<()> {
    let cfg = config.borrow_and_update().clone();
    let ssh = cfg.ssh.clone().context("no [ssh] table")?;
    let live = build_live(&cfg)?;
    let paths = cfg.pki_paths();
    if userca::ensure(&paths.ssh_user_ca_key)? {
        info!(key = %paths.ssh_user_ca_key.display(), "ssh: user CA created (single sign-on)");
    }
    let user_ca = Arc::new(userca::load(&paths.ssh_user_ca_key)?);
    let shared = Arc::new(Shared {
        live: RwLock::new(Arc::new(live)),
        registry,
        user_ca: Some(user_ca.public_key().key_data().clone()),
        issued: issued.clone(),
        audit: audit::Audit::open(&ssh.audit_log_path(&cfg.state_dir), ssh.audit_fail_open)?,
        counters: counters(),
        limiter: limits::RateLimiter::new(ssh.rate_limit_burst, ssh.rate_limit_refill),
        sessions: Arc::new(limits::Sessions::default()),
        shutdown: shutdown.clone(),
    });
    if let (Some(listener), Some(sso_cfg)) = (sso, ssh.sso.clone()) {
        let issuer = Arc::new(sso::Issuer::new(sso_cfg, user_ca.clone(), issued)?);
        let tls = crate::tls::https_config(&paths)?;
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = sso::http::run(shared, issuer, listener, tls, shutdown).await {
                warn!(error = %format!("{e:#}"), "ssh: single sign-on endpoint stopped");
            }
        });
    }
    let conns = Arc::new(Semaphore::new(ssh.max_connections));
    info!(listen = ?listener.local_addrs(), admins = ssh.admins.len(), rules = ssh.rules.len(), "ssh jump host listening");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = config.changed() => {
                if changed.is_err() { continue; }
                let cfg = config.borrow_and_update().clone();
                match build_live(&cfg) {
                    Ok(l) => {
                        if let Ok(mut g) = shared.live.write() { *g = Arc::new(l); }
                        info!("ssh: admins and rules reloaded");
                    }
                    Err(e) => warn!(error = %format!("{e:#}"), "ssh: reload refused, keeping the running policy"),
                }
                continue;
            }
            c = crate::listeners::accept(&listener, "ssh") => c,
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        if !shared.limiter.try_take(peer.ip(), Instant::now()) {
            shared
                .counters
                .connections_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            warn!(source = %peer, "ssh: connection refused: too many failed logins from this address");
            drop(stream);
            continue;
        }
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            warn!(source = %peer, "ssh: connection refused: max_connections reached");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(shared, stream, peer).await;
        });
    }
    Ok(())
}

/// A TCP stream the connection task can cut: russh cannot send a disconnect before the key
/// exchange is done, and dropping its session future does not stop it, so the
/// authentication deadline and shutdown end the session by failing its reads and writes.
struct Killable {
    inner: TcpStream,
    kill: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Killable {
    fn killed(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.kill.as_mut().poll(cx).is_ready()
    }
}

fn aborted() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "connection cut")
}

impl tokio::io::AsyncRead for Killable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.killed(cx) {
            return std::task::Poll::Ready(Err(aborted()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Killable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.killed(cx) {
            return std::task::Poll::Ready(Err(aborted()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.killed(cx) {
            return std::task::Poll::Ready(Err(aborted()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let live = shared.live();
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream, live.policy.keepalive_interval);
    let kill = CancellationToken::new();
    let stream = Killable {
        inner: stream,
        kill: Box::pin(kill.clone().cancelled_owned()),
    };
    let _cut_on_exit = kill.clone().drop_guard();
    let authed = Arc::new(AtomicBool::new(false));
    // Cancelled when the certificate the connection authenticated with is revoked (and on
    // shutdown): its jumps end and the connection is cut.
    let cut = shared.shutdown.child_token();
    let handler = Conn {
        shared: shared.clone(),
        peer,
        identity: None,
        authed: authed.clone(),
        cut: cut.clone(),
        ended: kill.clone(),
        tracked: None,
    };
    let deadline = tokio::time::Instant::now() + live.auth_timeout;
    let started = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(live.russh.clone(), stream, handler),
    )
    .await;
    let running = match started {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(source = %peer, error = %e, "ssh: handshake failed");
            return;
        }
        Err(_) => {
            debug!(source = %peer, "ssh: no SSH banner before the authentication deadline");
            return;
        }
    };
    let handle = running.handle();
    tokio::pin!(running);
    let mut grace = true;
    loop {
        tokio::select! {
            r = &mut running => {
                if let Err(e) = r {
                    debug!(source = %peer, error = %e, "ssh: session ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(deadline), if grace => {
                grace = false;
                if !authed.load(Ordering::Relaxed) {
                    info!(source = %peer, "ssh: authentication timeout");
                    kill.cancel();
                }
            }
            _ = cut.cancelled(), if !shared.shutdown.is_cancelled() => {
                info!(source = %peer, "ssh: certificate revoked: connection cut");
                let _ = tokio::time::timeout(Duration::from_secs(1), handle.disconnect(russh::Disconnect::ByApplication, "certificate revoked".into(), "en".into())).await;
                kill.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut running).await;
                break;
            }
            _ = shared.shutdown.cancelled() => {
                let _ = handle.disconnect(russh::Disconnect::ByApplication, "bastion shutting down".into(), "en".into()).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut running).await;
                kill.cancel();
                break;
            }
        }
    }
}

/// One client connection.
struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    identity: Option<auth::Identity>,
    authed: Arc<AtomicBool>,
    cut: CancellationToken,
    /// Cancelled when the connection ends (the stream's kill switch).
    ended: CancellationToken,
    /// The single sign-on certificate this connection authenticated with, for revocation.
    tracked: Option<issued::Tracked>,
}

impl Conn {
    fn accept(&mut self, id: auth::Identity) -> Auth {
        info!(source = %self.peer, admin = %id.admin, key = %id.key_fingerprint, cert_id = ?id.cert_key_id, "ssh: admin authenticated");
        self.identity = Some(id);
        Auth::Accept
    }

    fn refuse(&self, user: &str, why: &str) -> Auth {
        self.shared
            .counters
            .auth_failed
            .fetch_add(1, Ordering::Relaxed);
        warn!(source = %self.peer, user = %user, reason = %why, "ssh: authentication refused");
        Auth::Reject {
            proceed_with_methods: None,
            partial_success: false,
        }
    }
}

fn reject_with(reason: String) -> ChannelOpenFailure {
    ChannelOpenFailure::Other { code: 1, reason }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if matches!(offer.algorithm, Algorithm::Rsa { hash: None }) {
            return Ok(self.refuse(user, "ssh-rsa (SHA-1) signatures are refused"));
        }
        let live = self.shared.live();
        // With the user CA, any valid name may be a signed-on admin: decided on the
        // certificate, after the signature.
        if auth::offer_acceptable(&live.policy, user, offer.public_key.key_data())
            || (self.shared.user_ca.is_some() && config::valid_name(user))
        {
            Ok(Auth::Accept)
        } else {
            Ok(self.refuse(user, "unknown key or user"))
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if matches!(key.algorithm, Algorithm::Rsa { hash: None }) {
            return Ok(self.refuse(user, "ssh-rsa (SHA-1) signatures are refused"));
        }
        let live = self.shared.live();
        match auth::check_key(&live.policy, user, key.public_key.key_data()) {
            Ok(id) => Ok(self.accept(id)),
            Err(why) => Ok(self.refuse(user, &why)),
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let live = self.shared.live();
        let now = crate::unix_now().max(0) as u64;
        if self.shared.user_ca.as_ref() == Some(cert.signature_key()) {
            let row = match i64::try_from(cert.serial()) {
                Ok(serial) => match self.shared.issued.get(serial).await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "ssh: issued certificates cannot be read");
                        return Ok(
                            self.refuse(user, "the bastion cannot read its certificate records")
                        );
                    }
                },
                Err(_) => None,
            };
            return match auth::check_sso_certificate(
                user,
                cert,
                row.as_ref(),
                Some(self.peer.ip()),
                now,
            ) {
                Ok(id) => {
                    if let Some(serial) = row.map(|r| r.serial) {
                        self.tracked = Some(self.shared.issued.track(serial, self.cut.clone()));
                        tokio::spawn(issued::watch_revocation(
                            self.shared.issued.clone(),
                            serial,
                            self.cut.clone(),
                            self.ended.clone(),
                            issued::RECHECK,
                        ));
                    }
                    Ok(self.accept(id))
                }
                Err(why) => Ok(self.refuse(user, &why)),
            };
        }
        match auth::check_certificate(&live.policy, user, cert, Some(self.peer.ip()), now) {
            Ok(id) => Ok(self.accept(id)),
            Err(why) => Ok(self.refuse(user, &why)),
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.authed.store(true, Ordering::Relaxed);
        self.shared
            .counters
            .auth_succeeded
            .fetch_add(1, Ordering::Relaxed);
        self.shared.limiter.refund(self.peer.ip(), Instant::now());
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        info!(source = %self.peer, admin = ?self.identity.as_ref().map(|i| &i.admin), "ssh: session channel refused (jump host only)");
        reply.reject(reject_with(JUMP_ONLY.into())).await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(reject_with(format!(
                "Unix socket forwarding is refused: {JUMP_ONLY}"
            )))
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        info!(source = %self.peer, address, port = *port, "ssh: remote forwarding (-R) refused");
        Ok(false)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(id) = self.identity.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let shared = self.shared.clone();
        let peer = self.peer;
        let host = host_to_connect.to_string();
        let cut = self.cut.clone();
        tokio::spawn(async move {
            jump(shared, id, peer, host, port_to_connect, channel, reply, cut).await;
        });
        Ok(())
    }
}

/// Decides, connects, pumps and audits one jump.
#[allow(clippy::too_many_arguments)]
async fn jump(
    shared: Arc<Shared>,
    id: auth::Identity,
    peer: SocketAddr,
    host: String,
    port: u32,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    cut: CancellationToken,
) {
    let live = shared.live();
    let start = audit::now_rfc3339();
    let mut rec = audit::Record {
        decision: "denied",
        reason: String::new(),
        who: id.clone(),
        source: peer.to_string(),
        target: host.clone(),
        port,
        agent: None,
        resolved: None,
        rule: None,
        start,
        end: String::new(),
        bytes_to_target: 0,
        bytes_from_target: 0,
        event: "denied",
    };
    let denied = |shared: &Shared, mut rec: audit::Record, reason: String| {
        shared.counters.jumps_denied.fetch_add(1, Ordering::Relaxed);
        warn!(admin = %rec.who.admin, source = %rec.source, target = %rec.target, port = rec.port, reason = %reason, "ssh: jump denied");
        rec.reason = reason;
        rec.end = audit::now_rfc3339();
        rec
    };
    if !id.may_forward {
        let rec = denied(
            &shared,
            rec,
            "certificate lacks permit-port-forwarding".into(),
        );
        // On disk before the client hears of it.
        shared.audit.write(&rec).await;
        reply
            .reject(reject_with(format!("denied: {}", rec.reason)))
            .await;
        return;
    }
    let snap = shared.registry.snapshot();
    let decided = match &id.sso_groups {
        Some(groups) => {
            let admin = config::Admin {
                name: id.admin.clone(),
                keys: Vec::new(),
                cas: Vec::new(),
                groups: groups.clone(),
            };
            rules::decide_as(&live.policy, &admin, &snap, &host, port).await
        }
        None => rules::decide(&live.policy, &id.admin, &snap, &host, port).await,
    };
    let allowed = match decided {
        Ok(a) => a,
        Err(d) => {
            rec.agent = d.agent;
            rec.resolved = d.addr.map(|a| a.to_string());
            let rec = denied(&shared, rec, d.reason);
            // On disk before the client hears of it.
            shared.audit.write(&rec).await;
            reply
                .reject(reject_with(format!("denied: {}", rec.reason)))
                .await;
            return;
        }
    };
    rec.agent = allowed.agent.clone();
    rec.resolved = Some(allowed.addr.to_string());
    rec.rule = Some(allowed.rule);
    let Some(slot) = shared
        .sessions
        .acquire(&id.admin, live.policy.max_sessions_per_admin)
    else {
        let reason = format!(
            "{} has {} jump sessions open (max_sessions_per_admin)",
            id.admin, live.policy.max_sessions_per_admin
        );
        let rec = denied(&shared, rec, reason);
        // On disk before the client hears of it.
        shared.audit.write(&rec).await;
        reply
            .reject(ChannelOpenFailure::Other {
                code: 4,
                reason: rec.reason.clone(),
            })
            .await;
        return;
    };
    let target = SocketAddr::new(allowed.addr, port as u16);
    let tcp =
        match tokio::time::timeout(live.policy.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let rec = denied(&shared, rec, format!("connecting to {target} failed: {e}"));
                // On disk before the client hears of it.
                shared.audit.write(&rec).await;
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: 2,
                        reason: rec.reason.clone(),
                    })
                    .await;
                return;
            }
            Err(_) => {
                let rec = denied(&shared, rec, format!("connecting to {target} timed out"));
                // On disk before the client hears of it.
                shared.audit.write(&rec).await;
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: 2,
                        reason: rec.reason.clone(),
                    })
                    .await;
                return;
            }
        };
    let _ = tcp.set_nodelay(true);
    set_keepalive(&tcp, live.policy.keepalive_interval);
    // A start line, on disk before the channel is accepted: a long session is visible in the
    // audit log while it runs and survives a crash of the daemon, and a jump whose line
    // cannot be written is refused (unless `audit_fail_open`).
    rec.decision = "allowed";
    rec.reason = format!("rule {}", allowed.rule);
    rec.event = "start";
    if let Err(e) = shared.audit.write_start(&rec).await {
        drop(tcp);
        shared.counters.jumps_denied.fetch_add(1, Ordering::Relaxed);
        reply
            .reject(reject_with(format!(
                "refused: the bastion cannot write its audit log ({e}); no jump runs unaudited"
            )))
            .await;
        return;
    }
    reply.accept().await;
    shared
        .counters
        .jumps_allowed
        .fetch_add(1, Ordering::Relaxed);
    shared.counters.jumps_open.fetch_add(1, Ordering::Relaxed);
    info!(admin = %id.admin, source = %peer, target = %host, resolved = %target, rule = allowed.rule, "ssh: jump opened");
    let traffic = Arc::new(forward::Traffic::default());
    let why = forward::pump(
        channel,
        tcp,
        live.policy.idle_timeout,
        live.policy.target_stall_timeout,
        cut.child_token(),
        traffic.clone(),
        shared.counters.clone(),
    )
    .await;
    let why = if cut.is_cancelled() && !shared.shutdown.is_cancelled() {
        "certificate revoked"
    } else {
        why
    };
    drop(slot);
    shared.counters.jumps_open.fetch_sub(1, Ordering::Relaxed);
    rec.event = "end";
    rec.reason = format!("rule {}; ended: {why}", allowed.rule);
    rec.end = audit::now_rfc3339();
    rec.bytes_to_target = traffic.to_target.load(Ordering::Relaxed);
    rec.bytes_from_target = traffic.from_target.load(Ordering::Relaxed);
    info!(admin = %id.admin, target = %host, up = rec.bytes_to_target, down = rec.bytes_from_target, ended = why, "ssh: jump closed");
    shared.audit.write(&rec).await;
}
