//! `[syslog]`: the receiver for machines without an agent (appliances, network gear, old
//! VMs). RFC 5424 and RFC 3164 (parsed with `syslog_loose`) over UDP, over TCP with
//! octet-counting or newline framing detected per message (RFC 6587), and over TLS
//! (RFC 5425) with the bastion's server certificate. Clients must be in `allow` or be an
//! enrolled agent's registered address (deny by default).
//!
//! Nothing is dropped for being odd: an unparseable message is stored whole with the
//! reception time (and counted), invalid UTF-8 is decoded lossily (and counted), a message
//! longer than `max_message_bytes` is cut there (and counted). A message from the registered
//! address of exactly one enrolled agent is filed under that agent's name; otherwise under
//! the hostname it claims, sanitised into one path component, or the sender's address.

pub mod service;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::logs::format::{
    civil, day_of, now_ms, push_line, sanitize_host, DEFAULT_FACILITY, DEFAULT_SEVERITY,
};
use crate::logs::metrics::{counters, Source};
use crate::logs::{Chunk, Store};
use crate::registry::{Registry, Snapshot};

/// `[syslog]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// UDP addresses ("0.0.0.0:514").
    #[serde(default)]
    pub udp: Vec<SocketAddr>,
    /// TCP addresses, octet-counting or newline framing ("0.0.0.0:514").
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// TLS addresses, RFC 5425 ("0.0.0.0:6514"), with the bastion's server certificate.
    #[serde(default)]
    pub tls: Vec<SocketAddr>,
    /// Client networks allowed to send.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Enrolled, non-revoked agents' accepted addresses (see `crate::addresses`) may send too.
    #[serde(default = "yes")]
    pub allow_agents: bool,
    /// Longest message kept, in bytes; the rest is cut off and counted.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most TCP and TLS connections at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A TCP or TLS connection silent this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time a TLS client has to complete its handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn yes() -> bool {
    true
}
fn default_max_message_bytes() -> usize {
    8192
}
fn default_max_connections() -> usize {
    1024
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

impl SyslogConfig {
    /// Problems as (key, reason).
    pub fn validate(&self, logs_on: bool) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut bad = |k: &str, r: &str| p.push((format!("syslog.{k}"), r.to_string()));
        if !logs_on {
            bad("", "needs a [logs] table (the store syslog is written to)");
        }
        if self.udp.is_empty() && self.tcp.is_empty() && self.tls.is_empty() {
            bad("udp", "no listener: set at least one of udp, tcp, tls");
        }
        if self.allow.is_empty() && !self.allow_agents {
            bad(
                "allow",
                "empty while allow_agents is false: nobody could send",
            );
        }
        if !(480..=16 * 1024 * 1024).contains(&self.max_message_bytes) {
            bad(
                "max_message_bytes",
                "must be between 480 (RFC 5424's minimum) and 16777216",
            );
        }
        if self.max_connections == 0 {
            bad("max_connections", "must be positive");
        }
        if self.idle_timeout < Duration::from_secs(1) {
            bad("idle_timeout", "must be at least 1s");
        }
        if self.handshake_timeout.is_zero() {
            bad("handshake_timeout", "must be positive");
        }
        p
    }
}

/// The bound sockets, so that `serve` binds everything before running anything.
pub struct Sockets {
    pub udp: Vec<UdpSocket>,
    pub tcp: Vec<TcpListener>,
    pub tls: Vec<TcpListener>,
}

pub async fn bind(cfg: &SyslogConfig) -> Result<Sockets> {
    let mut s = Sockets {
        udp: Vec::new(),
        tcp: Vec::new(),
        tls: Vec::new(),
    };
    for a in &cfg.udp {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(*a),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // A large receive buffer absorbs bursts while the writer fsyncs.
        let _ = sock.set_recv_buffer_size(8 * 1024 * 1024);
        sock.set_nonblocking(true)?;
        sock.bind(&(*a).into())
            .with_context(|| format!("syslog.udp: cannot bind {a}"))?;
        s.udp.push(UdpSocket::from_std(sock.into())?);
    }
    for a in &cfg.tcp {
        s.tcp.push(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("syslog.tcp: cannot bind {a}"))?,
        );
    }
    for a in &cfg.tls {
        s.tls.push(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("syslog.tls: cannot bind {a}"))?,
        );
    }
    Ok(s)
}

/// Address -> Some(agent) when exactly one active agent has it, None when shared.
type Owners = Arc<HashMap<IpAddr, Option<Arc<str>>>>;

/// Who an address belongs to, derived from the registry snapshot (rebuilt when it changes).
#[derive(Clone)]
struct AgentAddrs {
    registry: Registry,
    cache: Arc<Mutex<(Arc<Snapshot>, Owners)>>,
}

impl AgentAddrs {
    fn new(registry: Registry) -> Self {
        let snap = registry.snapshot();
        let map = Arc::new(build(&snap));
        Self {
            registry,
            cache: Arc::new(Mutex::new((snap, map))),
        }
    }

    /// Address -> Some(agent) when exactly one active agent has it, None when shared.
    fn get(&self) -> Owners {
        let snap = self.registry.snapshot();
        let mut c = match self.cache.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if !Arc::ptr_eq(&c.0, &snap) {
            *c = (snap.clone(), Arc::new(build(&snap)));
        }
        c.1.clone()
    }
}

fn build(snap: &Snapshot) -> HashMap<IpAddr, Option<Arc<str>>> {
    let mut m: HashMap<IpAddr, Option<Arc<str>>> = HashMap::new();
    for a in snap.active() {
        for ip in &a.addresses {
            m.entry(canonical(*ip))
                .and_modify(|v| *v = None)
                .or_insert_with(|| Some(Arc::from(a.name.as_str())));
        }
    }
    m
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[derive(Clone)]
struct Ctx {
    cfg: Arc<SyslogConfig>,
    store: Store,
    agents: AgentAddrs,
}

impl Ctx {
    /// Whether `ip` may send, and the agent it is filed under if any.
    fn admit(&self, ip: IpAddr) -> Option<Option<Arc<str>>> {
        let ip = canonical(ip);
        let agent = if self.cfg.allow_agents {
            self.agents.get().get(&ip).cloned()
        } else {
            None
        };
        if agent.is_some() || self.cfg.allow.iter().any(|n| n.contains(&ip)) {
            Some(agent.flatten())
        } else {
            None
        }
    }
}

/// Turns raw messages into stored lines, grouped by host.
struct Batch {
    source: Source,
    peer: IpAddr,
    agent: Option<Arc<str>>,
    now: i64,
    chunks: Vec<Chunk>,
    events: u64,
    bytes: u64,
    bad_utf8: u64,
    unparsed: u64,
    truncated: u64,
}

impl Batch {
    fn new(source: Source, peer: IpAddr, agent: Option<Arc<str>>) -> Self {
        Self {
            source,
            peer,
            agent,
            now: now_ms(),
            chunks: Vec::new(),
            events: 0,
            bytes: 0,
            bad_utf8: 0,
            unparsed: 0,
            truncated: 0,
        }
    }

    fn chunk(&mut self, host: &str) -> &mut Chunk {
        let day = day_of(self.now);
        let pos = self
            .chunks
            .iter()
            .rposition(|c| &*c.host == host)
            .unwrap_or_else(|| {
                self.chunks.push(Chunk {
                    host: Arc::from(host),
                    day,
                    data: Vec::with_capacity(16 * 1024),
                    lines: 0,
                });
                self.chunks.len() - 1
            });
        &mut self.chunks[pos]
    }

    fn handle(&mut self, raw: &[u8], truncated: bool) {
        let mut raw = raw;
        while let Some((&last, rest)) = raw.split_last() {
            if matches!(last, b'\n' | b'\r' | 0) {
                raw = rest;
            } else {
                break;
            }
        }
        if raw.is_empty() {
            return;
        }
        self.events += 1;
        self.bytes += raw.len() as u64;
        if truncated {
            self.truncated += 1;
        }
        let text = match std::str::from_utf8(raw) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => {
                self.bad_utf8 += 1;
                String::from_utf8_lossy(raw)
            }
        };
        let now = self.now;
        let (year, month, _) = civil(day_of(now));
        // RFC 3164 has no year: this year, unless that puts the message in the future.
        let get_year = move |(m, _, _, _, _): syslog_loose::IncompleteDate| {
            if m > month + 1 {
                (year - 1) as i32
            } else {
                year as i32
            }
        };
        let parsed = syslog_loose::parse_message_with_year_exact(
            &text,
            get_year,
            syslog_loose::Variant::Either,
        )
        .ok()
        .filter(|m| m.facility.is_some());
        let peer_name = || sanitize_host(&self.peer.to_string());
        match parsed {
            Some(m) => {
                let host = match &self.agent {
                    Some(a) => a.to_string(),
                    None => match m.hostname {
                        Some(h) if !h.is_empty() && h != "-" => sanitize_host(h),
                        _ => peer_name(),
                    },
                };
                let app = match (&m.appname, &m.procid) {
                    (Some(a), Some(p)) => format!("{a}[{p}]"),
                    (Some(a), None) => a.to_string(),
                    (None, _) => String::new(),
                };
                let ts = m.timestamp.map(|t| t.timestamp_millis()).unwrap_or(now);
                let fac = m.facility.map_or(DEFAULT_FACILITY, |f| f as u8);
                let sev = m.severity.map_or(DEFAULT_SEVERITY, |s| s as u8);
                let msg = m.msg.as_bytes();
                let c = self.chunk(&host);
                push_line(&mut c.data, ts, &host, &app, fac, sev, msg);
                c.lines += 1;
            }
            None => {
                self.unparsed += 1;
                let host = match &self.agent {
                    Some(a) => a.to_string(),
                    None => peer_name(),
                };
                let c = self.chunk(&host);
                push_line(
                    &mut c.data,
                    now,
                    &host,
                    "",
                    DEFAULT_FACILITY,
                    DEFAULT_SEVERITY,
                    text.as_bytes(),
                );
                c.lines += 1;
            }
        }
    }

    fn finish(self) -> Vec<Chunk> {
        let c = counters();
        let i = self.source as usize;
        c.add(self.source, self.events, self.bytes);
        c.invalid_utf8[i].fetch_add(self.bad_utf8, Relaxed);
        c.parse_failures[i].fetch_add(self.unparsed, Relaxed);
        c.truncated[i].fetch_add(self.truncated, Relaxed);
        self.chunks
    }
}

enum Skip {
    None,
    Bytes(usize),
    ToNewline,
}

/// RFC 6587 framing, detected per message: `LEN SP MSG` when a message starts with digits
/// and a space, else up to the next newline.
struct Framer {
    buf: Vec<u8>,
    max: usize,
    skip: Skip,
}

impl Framer {
    fn new(max: usize) -> Self {
        Self {
            buf: Vec::with_capacity(64 * 1024),
            max,
            skip: Skip::None,
        }
    }

    /// Calls `f(frame, truncated)` for each complete frame; at `eof` the rest is a frame.
    fn frames(&mut self, eof: bool, f: &mut dyn FnMut(&[u8], bool)) {
        let buf = &self.buf;
        let len = buf.len();
        let max = self.max;
        let mut pos = 0usize;
        loop {
            match self.skip {
                Skip::Bytes(n) => {
                    let k = n.min(len - pos);
                    pos += k;
                    if k < n {
                        self.skip = Skip::Bytes(n - k);
                        break;
                    }
                    self.skip = Skip::None;
                }
                Skip::ToNewline => match memchr::memchr(b'\n', &buf[pos..]) {
                    Some(i) => {
                        pos += i + 1;
                        self.skip = Skip::None;
                    }
                    None => {
                        pos = len;
                        break;
                    }
                },
                Skip::None => {}
            }
            while pos < len && matches!(buf[pos], b'\n' | b'\r' | 0 | b' ') {
                pos += 1;
            }
            if pos >= len {
                break;
            }
            let rest = &buf[pos..];
            if rest[0].is_ascii_digit() {
                let digits = rest
                    .iter()
                    .take(11)
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if digits == rest.len() && !eof {
                    break; // need more to decide
                }
                if digits < rest.len() && digits <= 10 && rest[digits] == b' ' {
                    let n: usize = std::str::from_utf8(&rest[..digits])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(usize::MAX);
                    let body = &rest[digits + 1..];
                    if body.len() >= n {
                        f(&body[..n.min(max)], n > max);
                        pos += digits + 1 + n;
                        continue;
                    }
                    if n > max && body.len() >= max {
                        f(&body[..max], true);
                        pos += digits + 1 + max;
                        self.skip = Skip::Bytes(n - max);
                        continue;
                    }
                    if eof {
                        f(body, false);
                        pos = len;
                    }
                    break;
                }
            }
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    f(&rest[..i.min(max)], i > max);
                    pos += i + 1;
                }
                None => {
                    if rest.len() > max {
                        f(&rest[..max], true);
                        pos = len;
                        self.skip = Skip::ToNewline;
                    } else if eof {
                        f(rest, false);
                        pos = len;
                    }
                    break;
                }
            }
        }
        self.buf.drain(..pos);
    }
}

/// Serves the syslog listeners until `shutdown`.
pub async fn run(
    cfg: SyslogConfig,
    registry: Registry,
    store: Store,
    tls: Option<Arc<rustls::ServerConfig>>,
    sockets: Sockets,
    shutdown: CancellationToken,
) -> Result<()> {
    let ctx = Ctx {
        cfg: Arc::new(cfg),
        store,
        agents: AgentAddrs::new(registry),
    };
    let limit = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let mut set = JoinSet::new();
    for s in sockets.udp {
        info!(listen = %s.local_addr()?, "syslog UDP listening");
        set.spawn(udp(ctx.clone(), s, shutdown.clone()));
    }
    for l in sockets.tcp {
        info!(listen = %l.local_addr()?, "syslog TCP listening");
        set.spawn(accept(
            ctx.clone(),
            l,
            None,
            limit.clone(),
            shutdown.clone(),
        ));
    }
    if !sockets.tls.is_empty() {
        let Some(tls) = tls else {
            anyhow::bail!("syslog.tls: no TLS configuration");
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        for l in sockets.tls {
            info!(listen = %l.local_addr()?, "syslog TLS listening");
            set.spawn(accept(
                ctx.clone(),
                l,
                Some(acceptor.clone()),
                limit.clone(),
                shutdown.clone(),
            ));
        }
    }
    while set.join_next().await.is_some() {}
    Ok(())
}

async fn udp(ctx: Ctx, sock: UdpSocket, shutdown: CancellationToken) {
    let max = ctx.cfg.max_message_bytes;
    let mut buf = vec![0u8; 65_536.max(max + 1)];
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "syslog UDP: receive failed");
                    continue;
                }
            },
        };
        let mut batch: Option<Batch> = None;
        let take = |batch: &mut Option<Batch>, n: usize, peer: SocketAddr, buf: &[u8]| {
            let Some(agent) = ctx.admit(peer.ip()) else {
                counters().syslog_refused.fetch_add(1, Relaxed);
                debug!(%peer, "syslog UDP: client network not allowed");
                return;
            };
            let b = batch.get_or_insert_with(|| Batch::new(Source::Udp, peer.ip(), None));
            b.peer = peer.ip();
            b.agent = agent;
            b.handle(&buf[..n.min(max)], n > max);
        };
        take(&mut batch, n, peer, &buf);
        // Drain what is already queued before handing a batch to the writer.
        for _ in 0..1024 {
            match sock.try_recv_from(&mut buf) {
                Ok((n, peer)) => take(&mut batch, n, peer, &buf),
                Err(_) => break,
            }
        }
        if let Some(b) = batch {
            if ctx.store.append(b.source, b.finish()).await.is_err() {
                break;
            }
        }
    }
}

async fn accept(
    ctx: Ctx,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "syslog: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(agent) = ctx.admit(peer.ip()) else {
            counters().syslog_refused.fetch_add(1, Relaxed);
            debug!(%peer, "syslog: client network not allowed");
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            counters().syslog_refused.fetch_add(1, Relaxed);
            warn!(%peer, "syslog: connection limit reached, refusing connection");
            continue;
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let c = counters();
            c.syslog_connections.fetch_add(1, Relaxed);
            match tls {
                None => stream(ctx, tcp, peer, agent, Source::Tcp, shutdown).await,
                Some(a) => {
                    match tokio::time::timeout(ctx.cfg.handshake_timeout, a.accept(tcp)).await {
                        Ok(Ok(s)) => stream(ctx, s, peer, agent, Source::Tls, shutdown).await,
                        Ok(Err(e)) => {
                            c.syslog_refused.fetch_add(1, Relaxed);
                            debug!(%peer, error = %e, "syslog TLS: handshake failed");
                        }
                        Err(_) => {
                            c.syslog_refused.fetch_add(1, Relaxed);
                            debug!(%peer, "syslog TLS: handshake timed out");
                        }
                    }
                }
            }
            c.syslog_connections.fetch_sub(1, Relaxed);
        });
    }
}

async fn stream<S: AsyncRead + Unpin>(
    ctx: Ctx,
    mut s: S,
    peer: SocketAddr,
    agent: Option<Arc<str>>,
    source: Source,
    shutdown: CancellationToken,
) {
    let mut framer = Framer::new(ctx.cfg.max_message_bytes);
    loop {
        framer.buf.reserve(64 * 1024);
        let r = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(ctx.cfg.idle_timeout, s.read_buf(&mut framer.buf)) => r,
        };
        let eof = match r {
            Ok(Ok(0)) => true,
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "syslog: read failed");
                true
            }
            Err(_) => {
                debug!(%peer, "syslog: idle connection closed");
                true
            }
        };
        let mut batch = Batch::new(source, peer.ip(), agent.clone());
        framer.frames(eof, &mut |frame, truncated| batch.handle(frame, truncated));
        if ctx.store.append(source, batch.finish()).await.is_err() || eof {
            break;
        }
    }
}

/// Narrow entry points for the fuzz targets (`fuzz/fuzz_targets/syslog.rs`): the framer and
/// the message-to-line path exactly as a connection or a datagram drives them, without
/// sockets or a store.
#[doc(hidden)]
pub mod fuzzing {
    use super::{Batch, Framer, Source};
    use crate::logs::Chunk;
    use std::net::IpAddr;
    use std::sync::Arc;

    /// One TCP connection delivering `reads` in turn (end of stream after the last):
    /// the frames cut (with their truncation flag) and the lines stored from them.
    pub fn stream(
        reads: &[&[u8]],
        max: usize,
        peer: IpAddr,
        agent: Option<&str>,
    ) -> (Vec<(Vec<u8>, bool)>, Vec<Chunk>) {
        let mut framer = Framer::new(max);
        let mut frames = Vec::new();
        let mut chunks = Vec::new();
        for (i, r) in reads.iter().enumerate() {
            framer.buf.extend_from_slice(r);
            let eof = i + 1 == reads.len();
            let mut batch = Batch::new(Source::Tcp, peer, agent.map(Arc::from));
            framer.frames(eof, &mut |frame, truncated| {
                frames.push((frame.to_vec(), truncated));
                batch.handle(frame, truncated);
            });
            chunks.extend(batch.finish());
        }
        (frames, chunks)
    }

    /// One UDP datagram, cut at `max` as the receiver does.
    pub fn datagram(msg: &[u8], max: usize, peer: IpAddr, agent: Option<&str>) -> Vec<Chunk> {
        let mut batch = Batch::new(Source::Udp, peer, agent.map(Arc::from));
        batch.handle(&msg[..msg.len().min(max)], msg.len() > max);
        batch.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[&[u8]], max: usize) -> Vec<(String, bool)> {
        let mut f = Framer::new(max);
        let mut out = Vec::new();
        for (i, part) in input.iter().enumerate() {
            f.buf.extend_from_slice(part);
            let eof = i + 1 == input.len();
            f.frames(eof, &mut |m, t| {
                out.push((String::from_utf8_lossy(m).to_string(), t))
            });
        }
        out
    }

    #[test]
    fn framing_is_detected_per_message() {
        let got = split(
            &[b"11 <13>hello A", b"\n<13>line two\n5 ab", b"cde<13>x\n"],
            100,
        );
        let want: Vec<(String, bool)> = ["<13>hello A", "<13>line two", "abcde", "<13>x"]
            .iter()
            .map(|s| (s.to_string(), false))
            .collect();
        assert_eq!(got, want);
        let got = split(&[b"5 abcde12 <13>abcdefgh\n"], 100);
        assert_eq!(
            got,
            vec![("abcde".into(), false), ("<13>abcdefgh".into(), false)]
        );
        // Over-long: cut at max, counted, the rest skipped in both framings.
        let got = split(&[b"20 0123456789", b"abcdefghij<13>after\n"], 8);
        assert_eq!(
            got,
            vec![("01234567".into(), true), ("<13>afte".into(), true)]
        );
        let long = vec![b'x'; 50];
        let got = split(&[&long, &long, b"\n<1>ok\n"], 10);
        assert_eq!(
            got,
            vec![("xxxxxxxxxx".into(), true), ("<1>ok".into(), false)]
        );
        // A line that starts with digits but no space is newline-framed.
        let got = split(&[b"2024-01-01 something\n"], 100);
        assert_eq!(got, vec![("2024-01-01 something".into(), false)]);
        // The last message without a newline at EOF.
        let got = split(&[b"<13>last"], 100);
        assert_eq!(got, vec![("<13>last".into(), false)]);
    }

    #[test]
    fn messages_become_lines() {
        let mut b = Batch::new(Source::Udp, "10.0.0.9".parse().unwrap(), None);
        b.handle(
            b"<38>1 2024-02-29T01:02:03.123Z ../../etc sshd 812 - - Accepted key\n",
            false,
        );
        b.handle(b"<13>Feb 28 01:02:03 web2 cron[5]: ran job", false);
        b.handle(b"garbage \xff without pri", false);
        let chunks = b.finish();
        let all: Vec<String> = chunks
            .iter()
            .map(|c| String::from_utf8(c.data.clone()).unwrap())
            .collect();
        assert_eq!(chunks[0].host.as_ref(), "___.._etc");
        assert_eq!(
            all[0],
            "2024-02-29T01:02:03.123Z ___.._etc sshd[812] auth.info Accepted key\n"
        );
        assert!(
            all[1].contains(" web2 cron[5] user.notice ran job\n"),
            "{}",
            all[1]
        );
        assert_eq!(chunks[2].host.as_ref(), "10.0.0.9");
        assert!(
            all[2].ends_with(" 10.0.0.9 - user.notice garbage \u{fffd} without pri\n"),
            "{}",
            all[2]
        );
    }
}
