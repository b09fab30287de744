//! `[syslog]`: the receiver for machines without an agent (appliances, network gear, old
//! VMs). RFC 5424 and RFC 3164 (parsed with `syslog_loose`) over UDP, over TCP with
//! octet-counting or newline framing detected per message (RFC 6587), and over TLS
//! (RFC 5425) with the bastion's server certificate. Clients must be in `allow` or be an
//! enrolled agent's accepted address (deny by default).
//!
//! Nothing is dropped for being odd: an unparseable message is stored whole with the
//! reception time (and counted), invalid UTF-8 is decoded lossily (and counted), a message
//! longer than `max_message_bytes` is cut there (and counted).
//!
//! Where a message is filed is decided by the address it comes from, never by what it says:
//! a sender at an accepted address of exactly one active agent (the registry's
//! `AgentInfo::addresses`) is filed under that agent's name, anyone else under a name made of
//! its address ([`address_host`]: `ip-10-0-0-5`, `ip6-fd00--1`). The HOSTNAME a message
//! claims is kept as evidence at the head of the stored message, `claimed-host=NAME `, when
//! it differs from the name the line is filed under. Senders that are not agents create at
//! most `max_unknown_hosts` host directories; lines from a new one past that are refused and
//! counted (`bastide_syslog_unknown_host_refused_total`).

pub mod service;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    #[serde(default, deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub udp: Vec<SocketAddr>,
    /// TCP addresses, octet-counting or newline framing ("0.0.0.0:514").
    #[serde(default, deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub tcp: Vec<SocketAddr>,
    /// TLS addresses, RFC 5425 ("0.0.0.0:6514"), with the bastion's server certificate.
    #[serde(default, deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub tls: Vec<SocketAddr>,
    /// Client networks allowed to send (CIDRs or addresses).
    #[serde(default, deserialize_with = "bastide_common::tomlcfg::networks")]
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
    /// Most host directories for senders that are not agents (named after their address);
    /// lines from a new such sender past it are refused and counted.
    #[serde(default = "default_max_unknown_hosts")]
    pub max_unknown_hosts: usize,
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
fn default_max_unknown_hosts() -> usize {
    1024
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
        if self.max_unknown_hosts == 0 && !self.allow.is_empty() {
            bad(
                "max_unknown_hosts",
                "0 while allow is set: nobody in allow but agents could send",
            );
        }
        if self.max_unknown_hosts > 1_000_000 {
            bad("max_unknown_hosts", "must be at most 1000000");
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

/// The host name the lines of a sender that is not an agent are filed under, made of its
/// address alone: `ip-10-0-0-5`, `ip6-fd00--1` (colons become dashes; an IPv4-mapped IPv6
/// address is its IPv4 address). Always a safe path component (`[a-z0-9-]`).
pub fn address_host(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => format!("ip-{}", v4.to_string().replace('.', "-")),
        IpAddr::V6(v6) => format!("ip6-{}", v6.to_string().replace(':', "-")),
    }
}

/// The address of a name made by [`address_host`] (exactly as it makes it), if it is one.
pub fn host_address(name: &str) -> Option<IpAddr> {
    let ip = if let Some(r) = name.strip_prefix("ip-") {
        IpAddr::V4(r.replace('-', ".").parse::<Ipv4Addr>().ok()?)
    } else if let Some(r) = name.strip_prefix("ip6-") {
        IpAddr::V6(r.replace('-', ":").parse::<Ipv6Addr>().ok()?)
    } else {
        return None;
    };
    (address_host(ip) == name).then_some(ip)
}

/// How often a full set of unknown hosts looks at the store again for directories that
/// retention removed.
const RESCAN: Duration = Duration::from_secs(60);
/// Least time between two warnings about refused senders.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The host directories of senders that are not agents, bounded by `max_unknown_hosts`:
/// every address of `allow` could otherwise create its own (a /8 is 16 million of them).
/// Counted from the store's directories named by [`address_host`] at start-up and, once
/// full, again every [`RESCAN`] (so that what retention removes frees its place), plus the
/// hosts admitted since, whose directory may not exist yet.
struct UnknownHosts {
    max: usize,
    dir: PathBuf,
    state: Mutex<Unknown>,
}

#[derive(Default)]
struct Unknown {
    known: HashMap<IpAddr, Arc<str>>,
    /// Admitted since the last scan.
    recent: HashMap<IpAddr, Arc<str>>,
    last_warn: Option<Instant>,
    refused_since_warn: u64,
}

/// Address-named host directories of the store.
fn scan_unknown(dir: &Path) -> HashMap<IpAddr, Arc<str>> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(ip) = host_address(&name) {
            out.insert(ip, Arc::from(name));
        }
    }
    out
}

impl UnknownHosts {
    fn new(dir: PathBuf, max: usize) -> Self {
        let known = scan_unknown(&dir);
        counters()
            .syslog_unknown_hosts
            .store(known.len() as u64, Relaxed);
        Self {
            max,
            dir,
            state: Mutex::new(Unknown {
                known,
                ..Unknown::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Unknown> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The host name of a sender that is not an agent, or None when it would be a new host
    /// past `max_unknown_hosts`.
    fn admit(&self, ip: IpAddr) -> Option<Arc<str>> {
        let mut s = self.lock();
        if let Some(h) = s.known.get(&ip) {
            return Some(h.clone());
        }
        if s.known.len() >= self.max {
            return None;
        }
        let h: Arc<str> = Arc::from(address_host(ip));
        s.known.insert(ip, h.clone());
        s.recent.insert(ip, h.clone());
        counters()
            .syslog_unknown_hosts
            .store(s.known.len() as u64, Relaxed);
        Some(h)
    }

    /// Counts `lines` refused from `peer`, with a warning at most every [`WARN_EVERY`].
    fn refused(&self, peer: IpAddr, lines: u64) {
        if lines == 0 {
            return;
        }
        counters()
            .syslog_unknown_host_refused
            .fetch_add(lines, Relaxed);
        let mut s = self.lock();
        s.refused_since_warn += lines;
        if s.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            warn!(%peer, max_unknown_hosts = self.max, refused = s.refused_since_warn, "syslog: lines from a new sender that is not an agent refused: max_unknown_hosts host directories exist");
            s.last_warn = Some(Instant::now());
            s.refused_since_warn = 0;
        }
    }

    fn full(&self) -> bool {
        self.lock().known.len() >= self.max
    }

    /// Looks at the store again (blocking): hosts whose directory is gone free their place.
    fn rescan(&self) {
        let mut found = scan_unknown(&self.dir);
        let mut s = self.lock();
        found.extend(s.recent.drain());
        s.known = found;
        counters()
            .syslog_unknown_hosts
            .store(s.known.len() as u64, Relaxed);
    }
}

#[derive(Clone)]
struct Ctx {
    cfg: Arc<SyslogConfig>,
    store: Store,
    agents: AgentAddrs,
    unknown: Arc<UnknownHosts>,
}

/// What the address of a sender earns it.
enum Admit {
    /// May send; its lines are filed under this host name.
    Host(Arc<str>),
    /// Not an agent (or `allow_agents` is off) and not in `allow`.
    NotAllowed,
    /// In `allow`, not an agent, and `max_unknown_hosts` other such hosts exist.
    OverCap,
}

impl Ctx {
    /// Whether `ip` may send, and the host its lines are filed under: the agent whose
    /// accepted address it is, or else a name made of the address. Never what it claims.
    fn admit(&self, ip: IpAddr) -> Admit {
        let ip = canonical(ip);
        let agent = self.agents.get().get(&ip).cloned().flatten();
        let in_allow = self.cfg.allow.iter().any(|n| n.contains(&ip));
        match agent {
            Some(a) if self.cfg.allow_agents || in_allow => Admit::Host(a),
            _ if !in_allow => Admit::NotAllowed,
            _ => match self.unknown.admit(ip) {
                Some(h) => Admit::Host(h),
                None => Admit::OverCap,
            },
        }
    }
}

/// What precedes the HOSTNAME a message claims in the stored message, when it is not the
/// name the line is filed under.
pub const CLAIMED: &str = "claimed-host=";

/// Turns raw messages into stored lines, grouped by host.
struct Batch {
    source: Source,
    /// The host the next messages are filed under (see [`Ctx::admit`]).
    host: Arc<str>,
    /// The stored message with its claimed host name in front.
    scratch: Vec<u8>,
    now: i64,
    chunks: Vec<Chunk>,
    events: u64,
    bytes: u64,
    bad_utf8: u64,
    unparsed: u64,
    truncated: u64,
}

impl Batch {
    fn new(source: Source, host: Arc<str>) -> Self {
        Self {
            source,
            host,
            scratch: Vec::new(),
            now: now_ms(),
            chunks: Vec::new(),
            events: 0,
            bytes: 0,
            bad_utf8: 0,
            unparsed: 0,
            truncated: 0,
        }
    }

    fn chunk(&mut self) -> &mut Chunk {
        let day = day_of(self.now);
        let host = &self.host;
        let pos = self
            .chunks
            .iter()
            .rposition(|c| c.host == *host)
            .unwrap_or_else(|| {
                self.chunks.push(Chunk {
                    host: host.clone(),
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
        match parsed {
            Some(m) => {
                let app = match (&m.appname, &m.procid) {
                    (Some(a), Some(p)) => format!("{a}[{p}]"),
                    (Some(a), None) => a.to_string(),
                    (None, _) => String::new(),
                };
                let ts = m.timestamp.map(|t| t.timestamp_millis()).unwrap_or(now);
                let fac = m.facility.map_or(DEFAULT_FACILITY, |f| f as u8);
                let sev = m.severity.map_or(DEFAULT_SEVERITY, |s| s as u8);
                // The claimed HOSTNAME is evidence, not an identity: kept in the message
                // when it is not the name the line is filed under.
                let claimed = m
                    .hostname
                    .filter(|h| !h.is_empty() && *h != "-" && sanitize_host(h) != *self.host);
                let mut buf = std::mem::take(&mut self.scratch);
                let msg: &[u8] = match claimed {
                    Some(h) => {
                        buf.clear();
                        buf.extend_from_slice(CLAIMED.as_bytes());
                        buf.extend_from_slice(h.as_bytes());
                        if !m.msg.is_empty() {
                            buf.push(b' ');
                            buf.extend_from_slice(m.msg.as_bytes());
                        }
                        &buf
                    }
                    None => m.msg.as_bytes(),
                };
                let host = self.host.clone();
                let c = self.chunk();
                push_line(&mut c.data, ts, &host, &app, fac, sev, msg);
                c.lines += 1;
                self.scratch = buf;
            }
            None => {
                self.unparsed += 1;
                let host = self.host.clone();
                let c = self.chunk();
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
    let dir = store.dir().to_path_buf();
    let max = cfg.max_unknown_hosts;
    let unknown = Arc::new(
        tokio::task::spawn_blocking(move || UnknownHosts::new(dir, max))
            .await
            .context("syslog: counting the store's host directories")?,
    );
    let ctx = Ctx {
        cfg: Arc::new(cfg),
        store,
        agents: AgentAddrs::new(registry),
        unknown: unknown.clone(),
    };
    let limit = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let mut set = JoinSet::new();
    {
        let shutdown = shutdown.clone();
        set.spawn(async move {
            let mut tick = tokio::time::interval(RESCAN);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if unknown.full() {
                    let u = unknown.clone();
                    let _ = tokio::task::spawn_blocking(move || u.rescan()).await;
                }
            }
        });
    }
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
            let host = match ctx.admit(peer.ip()) {
                Admit::Host(h) => h,
                Admit::NotAllowed => {
                    counters().syslog_refused.fetch_add(1, Relaxed);
                    debug!(%peer, "syslog UDP: client network not allowed");
                    return;
                }
                Admit::OverCap => {
                    ctx.unknown.refused(peer.ip(), 1);
                    return;
                }
            };
            let b = batch.get_or_insert_with(|| Batch::new(Source::Udp, host.clone()));
            b.host = host;
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
            c = crate::listeners::accept(&listener, "syslog") => c,
        };
        // None: a new host past max_unknown_hosts, whose lines are read, counted, dropped
        // (closing would only make it reconnect at once).
        let host = match ctx.admit(peer.ip()) {
            Admit::Host(h) => Some(h),
            Admit::OverCap => None,
            Admit::NotAllowed => {
                counters().syslog_refused.fetch_add(1, Relaxed);
                debug!(%peer, "syslog: client network not allowed");
                continue;
            }
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
                None => stream(ctx, tcp, peer, host, Source::Tcp, shutdown).await,
                Some(a) => {
                    match tokio::time::timeout(ctx.cfg.handshake_timeout, a.accept(tcp)).await {
                        Ok(Ok(s)) => stream(ctx, s, peer, host, Source::Tls, shutdown).await,
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
    host: Option<Arc<str>>,
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
        let Some(host) = &host else {
            let mut n = 0u64;
            framer.frames(eof, &mut |_, _| n += 1);
            ctx.unknown.refused(peer.ip(), n);
            if eof {
                break;
            }
            continue;
        };
        let mut batch = Batch::new(source, host.clone());
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
    use super::{address_host, Batch, Framer, Source};
    use crate::logs::Chunk;
    use std::net::IpAddr;
    use std::sync::Arc;

    /// The host a sender is filed under: the agent's name, or a name of its address.
    fn host(peer: IpAddr, agent: Option<&str>) -> Arc<str> {
        match agent {
            Some(a) => Arc::from(a),
            None => Arc::from(address_host(peer)),
        }
    }

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
            let mut batch = Batch::new(Source::Tcp, host(peer, agent));
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
        let mut batch = Batch::new(Source::Udp, host(peer, agent));
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
    fn messages_become_lines_filed_by_address_with_the_claimed_name_kept() {
        let mut b = Batch::new(
            Source::Udp,
            Arc::from(address_host("10.0.0.9".parse().unwrap())),
        );
        b.handle(
            b"<38>1 2024-02-29T01:02:03.123Z ../../etc sshd 812 - - Accepted key\n",
            false,
        );
        b.handle(b"<13>Feb 28 01:02:03 web2 cron[5]: ran job", false);
        b.handle(b"garbage \xff without pri", false);
        b.handle(b"<13>1 2024-02-29T01:02:03.123Z - app - - - no host", false);
        let chunks = b.finish();
        assert_eq!(chunks.len(), 1, "one sender, one host");
        assert_eq!(chunks[0].host.as_ref(), "ip-10-0-0-9");
        let text = String::from_utf8(chunks[0].data.clone()).unwrap();
        let all: Vec<&str> = text.lines().collect();
        assert_eq!(
            all[0],
            "2024-02-29T01:02:03.123Z ip-10-0-0-9 sshd[812] auth.info claimed-host=../../etc Accepted key"
        );
        assert!(
            all[1].contains(" ip-10-0-0-9 cron[5] user.notice claimed-host=web2 ran job"),
            "{}",
            all[1]
        );
        assert!(
            all[2].ends_with(" ip-10-0-0-9 - user.notice garbage \u{fffd} without pri"),
            "{}",
            all[2]
        );
        assert!(
            all[3].ends_with(" ip-10-0-0-9 app user.notice no host"),
            "{}",
            all[3]
        );

        // An agent's own host name is not repeated; any other claim is kept.
        let mut b = Batch::new(Source::Udp, Arc::from("web01"));
        b.handle(
            b"<13>1 2024-02-29T01:02:03.123Z WEB01 app - - - mine",
            false,
        );
        b.handle(
            b"<13>1 2024-02-29T01:02:03.123Z db01 app - - - theirs",
            false,
        );
        let text = String::from_utf8(b.finish()[0].data.clone()).unwrap();
        assert!(text.contains(" web01 app user.notice mine\n"), "{text}");
        assert!(
            text.contains(" web01 app user.notice claimed-host=db01 theirs\n"),
            "{text}"
        );
    }

    #[test]
    fn address_names_are_safe_and_reversible() {
        for (ip, name) in [
            ("10.0.0.5", "ip-10-0-0-5"),
            ("127.0.0.1", "ip-127-0-0-1"),
            ("fd00::1", "ip6-fd00--1"),
            ("::", "ip6---"),
            ("2001:db8:0:1:2:3:4:5", "ip6-2001-db8-0-1-2-3-4-5"),
            ("::ffff:192.0.2.7", "ip-192-0-2-7"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(address_host(ip), name);
            assert_eq!(sanitize_host(name), name, "a safe path component");
            assert_eq!(host_address(name), Some(canonical(ip)));
        }
        for not in [
            "web01",
            "ip-10-0-0",
            "ip-10-0-0-256",
            "ip6-zz",
            "ip-010-0-0-5",
            "ip6-FD00--1",
        ] {
            assert_eq!(host_address(not), None, "{not}");
        }
    }

    #[test]
    fn unknown_hosts_are_capped_and_retention_frees_places() {
        let dir = std::env::temp_dir().join(format!("bastide-syslog-{}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join("ip-10-0-0-1")).unwrap();
        std::fs::create_dir_all(dir.join("web01")).unwrap();
        let u = UnknownHosts::new(dir.clone(), 2);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // The directory already in the store counts; the agent's does not.
        assert_eq!(u.admit(ip("10.0.0.1")).as_deref(), Some("ip-10-0-0-1"));
        assert_eq!(u.admit(ip("10.0.0.2")).as_deref(), Some("ip-10-0-0-2"));
        assert!(u.full());
        assert_eq!(u.admit(ip("10.0.0.3")), None);
        assert_eq!(u.admit(ip("10.0.0.2")).as_deref(), Some("ip-10-0-0-2"));
        // Retention removed 10.0.0.1's directory; 10.0.0.2 was admitted since the last scan
        // (its directory not written yet) and keeps its place.
        std::fs::remove_dir(dir.join("ip-10-0-0-1")).unwrap();
        u.rescan();
        assert_eq!(u.admit(ip("10.0.0.3")).as_deref(), Some("ip-10-0-0-3"));
        assert_eq!(u.admit(ip("10.0.0.4")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
