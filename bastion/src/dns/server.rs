//! The serving loops and the per-query logic. UDP: a few receiver tasks per socket answer
//! zone queries and cache hits inline and spawn a task only for a miss, under a bound on the
//! queries waiting for upstreams. TCP: one reader and one writer task per connection, queries
//! pipelined and answered out of order (RFC 7766), under a bound on connections and on queries
//! in flight per connection. Identical concurrent misses wait on one upstream query.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use anyhow::Result;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::HINFO;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::cache::{Cache, Entry, Key, Lookup, STALE_RETRY, STALE_TTL};
use super::metrics::{inc, metrics};
use super::upstream::Upstreams;
use super::zone::{build, projection, ZoneData};
use super::{DnsSockets, Settings, MAX_UDP_PAYLOAD};
use crate::registry::Registry;

/// Most queries in flight on one TCP connection; the reader waits beyond that.
const TCP_PIPELINE: usize = 64;
/// Clients tracked per rate-limiter shard before idle ones are forgotten.
const RRL_CLIENTS_PER_SHARD: usize = 4096;
const RRL_SHARDS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What a response needs to know of its query.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    id: u16,
    op_code: OpCode,
    rd: bool,
    cd: bool,
    query: Option<Query>,
    edns: bool,
    max_size: usize,
}

pub(crate) enum Action {
    Reply(Vec<u8>),
    Drop,
    Forward(Request, Key),
}

type Outcome = Option<(Arc<Entry>, bool)>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-client token buckets for UDP responses (the bastion must not be an amplifier).
#[derive(Debug)]
struct RateLimiter {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<IpAddr, (f64, Instant)>>>,
    slip: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// Send an empty truncated answer so a real client retries over TCP (BIND's "slip").
    Slip,
    Drop,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        Self {
            rate: rate as f64,
            burst: 2.0 * rate as f64,
            shards: (0..RRL_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            slip: AtomicU64::new(0),
        }
    }

    fn check(&self, ip: IpAddr, now: Instant) -> Verdict {
        // IPv6 clients are counted per /56, what one site usually gets.
        let key = match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => {
                let mut o = v6.octets();
                o[7..].fill(0);
                IpAddr::V6(Ipv6Addr::from(o))
            }
        };
        let i = match key {
            IpAddr::V4(v4) => u32::from(v4) as usize,
            IpAddr::V6(v6) => (u128::from(v6) >> 72) as usize,
        } % RRL_SHARDS;
        let mut m = lock(&self.shards[i]);
        if m.len() >= RRL_CLIENTS_PER_SHARD && !m.contains_key(&key) {
            let window = Duration::from_secs_f64(self.burst / self.rate.max(1.0));
            m.retain(|_, (_, t)| now.saturating_duration_since(*t) < window);
            if m.len() >= RRL_CLIENTS_PER_SHARD {
                m.clear();
            }
        }
        let b = m.entry(key).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(b.1).as_secs_f64() * self.rate;
        b.0 = (b.0 + refill).min(self.burst);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            return Verdict::Allow;
        }
        inc(&metrics().rate_limited);
        if self.slip.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// Everything the serving tasks share.
pub(crate) struct Resolver {
    settings: Settings,
    zone: RwLock<Arc<ZoneData>>,
    cache: Cache,
    upstreams: Upstreams,
    inflight: Mutex<HashMap<Key, watch::Receiver<Outcome>>>,
    rrl: Option<RateLimiter>,
    pending: Arc<Semaphore>,
}

/// A bare header answer (FORMERR to an unparseable query, SERVFAIL when encoding fails).
fn header_only(query: &[u8], rcode: u8) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[0] = query.first().copied().unwrap_or(0);
    h[1] = query.get(1).copied().unwrap_or(0);
    // QR, the query's opcode and RD.
    h[2] = 0x80 | (query.get(2).copied().unwrap_or(0) & 0x79);
    h[3] = 0x80 | (rcode & 0x0f);
    h
}

impl Resolver {
    pub(crate) fn new(settings: Settings, zone: ZoneData) -> Self {
        Self {
            cache: Cache::new(settings.cache_entries),
            upstreams: Upstreams::new(
                settings.upstreams.clone(),
                settings.upstream_timeout,
                settings.max_pending,
            ),
            inflight: Mutex::new(HashMap::new()),
            rrl: (settings.rate_limit > 0).then(|| RateLimiter::new(settings.rate_limit)),
            pending: Arc::new(Semaphore::new(settings.max_pending)),
            zone: RwLock::new(Arc::new(zone)),
            settings,
        }
    }

    fn zone(&self) -> Arc<ZoneData> {
        self.zone.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.settings.allow.iter().any(|n| n.contains(&ip))
    }

    /// Encodes a response, truncating it (TC, question only) when it exceeds what the
    /// transport and the client allow.
    fn respond(
        &self,
        req: &Request,
        rcode: ResponseCode,
        aa: bool,
        answers: Vec<Record>,
        authority: Vec<Record>,
    ) -> Vec<u8> {
        let mut m = Message::new(req.id, MessageType::Response, req.op_code);
        m.metadata.recursion_desired = req.rd;
        m.metadata.recursion_available = !self.settings.upstreams.is_empty();
        m.metadata.authoritative = aa;
        m.metadata.checking_disabled = req.cd;
        m.metadata.response_code = rcode;
        if let Some(q) = &req.query {
            m.add_query(q.clone());
        }
        m.answers = answers;
        m.authorities = authority;
        if req.edns {
            let mut e = Edns::new();
            e.set_max_payload(MAX_UDP_PAYLOAD);
            m.set_edns(e);
        }
        metrics().response(rcode);
        match m.to_vec() {
            Ok(b) if b.len() <= req.max_size => b,
            Ok(_) => match m.truncate().to_vec() {
                Ok(b) if b.len() <= req.max_size => b,
                _ => header_only(&req.id.to_be_bytes(), 2),
            },
            Err(e) => {
                warn!(error = %e, "dns: cannot encode a response");
                header_only(&req.id.to_be_bytes(), 2)
            }
        }
    }

    fn respond_entry(&self, req: &Request, e: &Entry, stale: bool) -> Vec<u8> {
        let ttl = if stale {
            inc(&metrics().cache_stale_served);
            STALE_TTL
        } else {
            e.ttl_at(Instant::now())
        };
        let qname = req.query.as_ref().map(|q| q.name());
        let fix = |r: &Record| {
            let mut r = r.clone();
            r.ttl = ttl;
            if let Some(n) = qname {
                if r.name == *n {
                    r.name = n.clone();
                }
            }
            r
        };
        let answers = e.answers.iter().map(fix).collect();
        let authority = e.authority.iter().map(fix).collect();
        self.respond(req, e.rcode, false, answers, authority)
    }

    /// Everything that can be answered without waiting: errors, the zone, cache hits.
    pub(crate) fn handle(
        self: &Arc<Self>,
        buf: &[u8],
        src: IpAddr,
        transport: Transport,
    ) -> Action {
        // Too short for a header, or a response (answering those invites loops): dropped.
        if buf.len() < 12 || buf[2] & 0x80 != 0 {
            inc(&metrics().malformed);
            return Action::Drop;
        }
        let allowed = self.allowed(src);
        let msg = match Message::from_vec(buf) {
            Ok(m) => m,
            Err(e) => {
                inc(&metrics().malformed);
                debug!(client = %src, error = %e, "dns: malformed query");
                if !allowed {
                    inc(&metrics().refused);
                    return Action::Drop;
                }
                metrics().response(ResponseCode::FormErr);
                return Action::Reply(header_only(buf, 1));
            }
        };
        let max_size = match (transport, &msg.edns) {
            (Transport::Tcp, _) => u16::MAX as usize,
            (Transport::Udp, Some(e)) => e.max_payload().clamp(512, MAX_UDP_PAYLOAD) as usize,
            (Transport::Udp, None) => 512,
        };
        let mut req = Request {
            id: msg.metadata.id,
            op_code: msg.metadata.op_code,
            rd: msg.metadata.recursion_desired,
            cd: msg.metadata.checking_disabled,
            query: msg.queries.first().cloned(),
            edns: msg.edns.is_some(),
            max_size,
        };
        let err = |req: &Request, rc| Action::Reply(self.respond(req, rc, false, vec![], vec![]));
        if !allowed {
            inc(&metrics().refused);
            return err(&req, ResponseCode::Refused);
        }
        if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return err(&req, ResponseCode::BADVERS);
        }
        if req.op_code != OpCode::Query {
            return err(&req, ResponseCode::NotImp);
        }
        if msg.queries.len() != 1 {
            req.query = None;
            return err(&req, ResponseCode::FormErr);
        }
        let Some(q) = req.query.clone() else {
            return err(&req, ResponseCode::FormErr);
        };
        let qtype = q.query_type();
        metrics().query(qtype);
        if q.query_class() != DNSClass::IN {
            return err(&req, ResponseCode::NotImp);
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT) {
            return err(&req, ResponseCode::Refused);
        }
        if let Some(a) = self.zone().lookup(q.name(), qtype) {
            return Action::Reply(self.respond(&req, a.rcode, true, a.answers, a.authority));
        }
        if self.settings.upstreams.is_empty() {
            return err(&req, ResponseCode::Refused);
        }
        if qtype == RecordType::ANY {
            // RFC 8482: a minimal synthesised answer instead of a forwarded ANY.
            let hinfo = Record::from_rdata(
                q.name().clone(),
                3600,
                RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
            );
            return Action::Reply(self.respond(
                &req,
                ResponseCode::NoError,
                false,
                vec![hinfo],
                vec![],
            ));
        }
        let key = Key {
            name: q.name().clone(),
            qtype,
        };
        let now = Instant::now();
        match self.cache.get(&key, now) {
            Lookup::Fresh(e) => {
                inc(&metrics().cache_hits);
                if e.wants_prefetch(now) {
                    self.prefetch(key);
                }
                Action::Reply(self.respond_entry(&req, &e, false))
            }
            Lookup::Stale {
                entry,
                retry_due: false,
            } => {
                inc(&metrics().cache_hits);
                Action::Reply(self.respond_entry(&req, &entry, true))
            }
            _ => {
                inc(&metrics().cache_misses);
                Action::Forward(req, key)
            }
        }
    }

    /// Answers a cache miss, joining an identical query already sent upstream if any.
    pub(crate) async fn forward(self: &Arc<Self>, req: Request, key: Key) -> Vec<u8> {
        let mut rx = {
            let mut map = lock(&self.inflight);
            // A fetch whose task died (it cannot panic by design, but) must not leave the
            // name answered SERVFAIL forever: its closed channel is replaced.
            if map.get(&key).is_some_and(|rx| rx.has_changed().is_err()) {
                map.remove(&key);
            }
            match map.get(&key) {
                Some(rx) => {
                    inc(&metrics().coalesced);
                    rx.clone()
                }
                None => {
                    // The leader inserts into the cache before leaving this map, so a
                    // second look under the lock closes the race with a finishing fetch.
                    if let Lookup::Fresh(e) = self.cache.get(&key, Instant::now()) {
                        drop(map);
                        return self.respond_entry(&req, &e, false);
                    }
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let me = self.clone();
                    // A task of its own, so a client that goes away does not cancel it.
                    tokio::spawn(async move { me.fetch(key, tx).await });
                    rx
                }
            }
        };
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        match outcome {
            Some((e, stale)) => self.respond_entry(&req, &e, stale),
            None => self.respond(&req, ResponseCode::ServFail, false, vec![], vec![]),
        }
    }

    /// Refreshes an answer in the background unless a query for it is already upstream.
    fn prefetch(self: &Arc<Self>, key: Key) {
        let mut map = lock(&self.inflight);
        if map.contains_key(&key) {
            return;
        }
        inc(&metrics().prefetches);
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx);
        let me = self.clone();
        tokio::spawn(async move { me.fetch(key, tx).await });
    }

    async fn fetch(self: Arc<Self>, key: Key, tx: watch::Sender<Outcome>) {
        let resp = self.upstreams.resolve(&key.name, key.qtype).await;
        let now = Instant::now();
        let limits = &self.settings.limits;
        let out = match resp {
            Some(m) => (Arc::new(Entry::from_response(m, limits, now)), false),
            None => match self.cache.get(&key, now) {
                Lookup::Stale { entry, .. } => {
                    let mut e = (*entry).clone();
                    e.retry_after = Some(now + STALE_RETRY);
                    (Arc::new(e), true)
                }
                // A failed prefetch leaves the answer being served as it is.
                Lookup::Fresh(e) => (e, false),
                _ => (Arc::new(Entry::servfail(limits, now)), false),
            },
        };
        self.cache.insert(key.clone(), out.0.clone(), now);
        lock(&self.inflight).remove(&key);
        let _ = tx.send(Some(out));
    }

    async fn send_udp(&self, sock: &UdpSocket, mut b: Vec<u8>, peer: SocketAddr) {
        if let Some(rrl) = &self.rrl {
            match rrl.check(peer.ip(), Instant::now()) {
                Verdict::Allow => {}
                Verdict::Drop => return,
                Verdict::Slip => {
                    b.truncate(12);
                    if b.len() == 12 {
                        b[2] |= 0x02;
                        b[4..12].fill(0);
                    }
                }
            }
        }
        if let Err(e) = sock.send_to(&b, peer).await {
            debug!(client = %peer, error = %e, "dns: cannot send over UDP");
        }
    }
}

async fn udp_worker(res: Arc<Resolver>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "dns: UDP receive error");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        match res.handle(&buf[..n], peer.ip(), Transport::Udp) {
            Action::Drop => {}
            Action::Reply(b) => res.send_udp(&sock, b, peer).await,
            Action::Forward(req, key) => match res.pending.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (res, sock) = (res.clone(), sock.clone());
                    tokio::spawn(async move {
                        let b = res.forward(req, key).await;
                        res.send_udp(&sock, b, peer).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    inc(&metrics().overloaded);
                    let b = res.respond(&req, ResponseCode::ServFail, false, vec![], vec![]);
                    res.send_udp(&sock, b, peer).await;
                }
            },
        }
    }
}

async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> io::Result<()> {
    let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&b[..len as usize]).await
}

/// One TCP connection in one task: every complete query already read is answered in turn
/// (zone answers and cache hits at once, misses in tasks of their own), and the answers go out
/// in one write, so a pipelining client costs a read and a write per batch, not per query.
async fn tcp_conn(
    res: Arc<Resolver>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    if let Err(e) = tcp_serve(res, stream, peer, shutdown).await {
        debug!(client = %peer, error = %e, "dns: TCP connection ended");
    }
}

async fn tcp_serve(
    res: Arc<Resolver>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let idle = res.settings.tcp_idle_timeout;
    let (mut rd, wr) = stream.into_split();
    let mut w = BufWriter::with_capacity(32 * 1024, wr);
    let mut inbuf: Vec<u8> = Vec::with_capacity(8 * 1024);
    // Answers to misses come back here; each is sent by a task holding one of the slots, so
    // at most TCP_PIPELINE are ever queued.
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let slots = Arc::new(Semaphore::new(TCP_PIPELINE));
    let mut eof = false;
    // Only a complete query moves the deadline, never a byte: a client dripping one byte a
    // second is closed `idle` after its last whole query (or its connection) like a silent
    // one, so it cannot hold one of the `max_tcp_connections` slots for longer.
    let mut deadline = Instant::now() + idle;
    loop {
        let mut off = 0;
        while inbuf.len() - off >= 2 {
            let len = u16::from_be_bytes([inbuf[off], inbuf[off + 1]]) as usize;
            if inbuf.len() - off - 2 < len {
                break;
            }
            let msg = &inbuf[off + 2..off + 2 + len];
            off += 2 + len;
            deadline = Instant::now() + idle;
            match res.handle(msg, peer.ip(), Transport::Tcp) {
                Action::Drop => {}
                Action::Reply(b) => write_frame(&mut w, &b).await?,
                Action::Forward(req, key) => {
                    let Ok(permit) = res.pending.clone().try_acquire_owned() else {
                        inc(&metrics().overloaded);
                        let b = res.respond(&req, ResponseCode::ServFail, false, vec![], vec![]);
                        write_frame(&mut w, &b).await?;
                        continue;
                    };
                    // Past TCP_PIPELINE queries in flight, wait for one to finish.
                    let slot = loop {
                        match slots.clone().try_acquire_owned() {
                            Ok(s) => break s,
                            Err(_) => {
                                w.flush().await?;
                                match rx.recv().await {
                                    Some(b) => write_frame(&mut w, &b).await?,
                                    None => return Ok(()),
                                }
                            }
                        }
                    };
                    let (res, tx) = (res.clone(), tx.clone());
                    tokio::spawn(async move {
                        let b = res.forward(req, key).await;
                        let _ = tx.send(b);
                        drop((slot, permit));
                    });
                }
            }
        }
        inbuf.drain(..off);
        while let Ok(b) = rx.try_recv() {
            write_frame(&mut w, &b).await?;
        }
        if !w.buffer().is_empty() {
            w.flush().await?;
        }
        let busy = slots.available_permits() < TCP_PIPELINE;
        if eof && !busy {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(b) = rx.recv() => {
                write_frame(&mut w, &b).await?;
                // An answer that took long does not leave its client closed at once.
                deadline = deadline.max(Instant::now() + idle / 2);
            }
            r = rd.read_buf(&mut inbuf), if !eof && inbuf.len() < 2 + u16::MAX as usize => match r {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) => return Err(e),
            },
            _ = tokio::time::sleep_until(deadline), if !busy => break,
        }
    }
    w.flush().await?;
    w.shutdown().await
}

async fn tcp_accept(
    res: Arc<Resolver>,
    listener: TcpListener,
    conns: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = crate::listeners::accept(&listener, "dns: TCP").await;
        // The allow-list is checked before anything is read and before a slot is taken: a
        // client outside it costs an accept and a close, never one of the connections.
        if !res.allowed(peer.ip()) {
            inc(&metrics().refused);
            debug!(client = %peer, "dns: TCP client not allowed: closing");
            continue;
        }
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            inc(&metrics().overloaded);
            debug!(client = %peer, "dns: too many TCP connections: closing");
            continue;
        };
        let (res, shutdown) = (res.clone(), shutdown.clone());
        tokio::spawn(async move {
            tcp_conn(res, stream, peer, shutdown).await;
            drop(permit);
        });
    }
}

/// Rebuilds the zone whenever the registry changes what it publishes.
async fn follow_registry(res: Arc<Resolver>, registry: Registry) {
    let mut rx = registry.subscribe();
    let mut last = projection(&res.settings, &rx.borrow_and_update());
    while rx.changed().await.is_ok() {
        let snap = rx.borrow_and_update().clone();
        let p = projection(&res.settings, &snap);
        if p == last {
            continue;
        }
        let serial = res
            .zone()
            .serial
            .wrapping_add(1)
            .max(crate::unix_now() as u32);
        let z = build(&res.settings, &p, serial);
        *res.zone.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(z);
        info!(serial, agents = p.len(), "dns: zone updated");
        last = p;
    }
}

pub(crate) async fn serve(
    settings: Settings,
    registry: Registry,
    sockets: DnsSockets,
    shutdown: CancellationToken,
) -> Result<()> {
    let agents = projection(&settings, &registry.snapshot());
    let zone = build(&settings, &agents, crate::unix_now() as u32);
    let res = Arc::new(Resolver::new(settings, zone));
    let mut set = JoinSet::new();
    set.spawn(follow_registry(res.clone(), registry));
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let mut addrs = Vec::new();
    for s in sockets.udp {
        addrs.push(s.local_addr()?);
        let s = Arc::new(s);
        for _ in 0..workers {
            set.spawn(udp_worker(res.clone(), s.clone()));
        }
    }
    let conns = Arc::new(Semaphore::new(res.settings.max_tcp_connections));
    for l in sockets.tcp {
        set.spawn(tcp_accept(
            res.clone(),
            l,
            conns.clone(),
            shutdown.child_token(),
        ));
    }
    info!(
        listen = ?addrs,
        zone = ?res.settings.zone.as_ref().map(|z| z.to_string()),
        upstreams = ?res.settings.upstreams,
        "dns ready"
    );
    shutdown.cancelled().await;
    set.abort_all();
    Ok(())
}

/// Without sockets, for the fuzzers ([`super::fuzzing`]): answers `query` as `handle` does,
/// and a cache miss as `fetch` would with `upstream` as the upstream's reply (garbage
/// counts as no reply). `None` when the query is dropped.
impl Resolver {
    pub(crate) fn answer_offline(
        self: &Arc<Self>,
        query: &[u8],
        src: IpAddr,
        transport: Transport,
        upstream: &[u8],
    ) -> Option<Vec<u8>> {
        match self.handle(query, src, transport) {
            Action::Drop => None,
            Action::Reply(b) => Some(b),
            Action::Forward(req, key) => {
                let now = Instant::now();
                let limits = &self.settings.limits;
                let e = match Message::from_vec(upstream) {
                    Ok(m) => Arc::new(Entry::from_response(m, limits, now)),
                    Err(_) => Arc::new(Entry::servfail(limits, now)),
                };
                self.cache.insert(key, e.clone(), now);
                Some(self.respond_entry(&req, &e, false))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::DnsConfig;
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::Name;
    use std::sync::atomic::AtomicBool;

    fn resolver(upstream: SocketAddr, extra: &str) -> Arc<Resolver> {
        let c: DnsConfig = toml::from_str(&format!(
            "listen = [\"127.0.0.1:1\"]\nupstreams = [\"{upstream}\"]\nallow = [\"127.0.0.1\"]\nrate_limit = 0\nupstream_timeout = \"300ms\"\n{extra}"
        ))
        .unwrap();
        Arc::new(Resolver::new(
            c.settings(None).unwrap(),
            ZoneData::default(),
        ))
    }

    /// A fake upstream answering every A query with 10.0.0.1 (TTL 1) after `delay`, while
    /// `up` is set; it counts the queries it gets.
    async fn fake_upstream(delay: Duration) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicBool>) {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let up = Arc::new(AtomicBool::new(true));
        let (c, u) = (count.clone(), up.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                if !u.load(Ordering::SeqCst) {
                    continue;
                }
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                r.add_query(q.queries[0].clone());
                r.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    1,
                    RData::A(A::new(10, 0, 0, 1)),
                ));
                let s = sock.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    s.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
                });
            }
        });
        (addr, count, up)
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    async fn ask(res: &Arc<Resolver>, id: u16, name: &str) -> Message {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let b = match res.handle(&query(id, name), lo, Transport::Udp) {
            Action::Forward(req, key) => res.forward(req, key).await,
            Action::Reply(b) => b,
            Action::Drop => panic!("dropped"),
        };
        Message::from_vec(&b).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_misses_make_one_upstream_query() {
        let (addr, count, _) = fake_upstream(Duration::from_millis(200)).await;
        let res = resolver(addr, "");
        let mut set = JoinSet::new();
        for i in 0..500u16 {
            let res = res.clone();
            set.spawn(async move { (i, ask(&res, i, "Same.Example.org.").await) });
        }
        while let Some(r) = set.join_next().await {
            let (i, m) = r.unwrap();
            assert_eq!(m.metadata.id, i);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(m.answers.len(), 1);
            assert_eq!(
                m.queries[0].name().to_string(),
                "Same.Example.org.",
                "case kept"
            );
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_answer_served_when_upstream_is_down() {
        let (addr, count, up) = fake_upstream(Duration::ZERO).await;
        let res = resolver(addr, "serve_stale = \"1h\"");
        let m = ask(&res, 1, "s.example.org.").await;
        assert_eq!(m.answers[0].ttl, 1);
        up.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let m = ask(&res, 2, "s.example.org.").await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers[0].ttl, STALE_TTL);
        let asked = count.load(Ordering::SeqCst);
        // Within the recheck window, stale answers come without asking upstream again.
        let m = ask(&res, 3, "s.example.org.").await;
        assert_eq!(m.answers[0].ttl, STALE_TTL);
        assert_eq!(count.load(Ordering::SeqCst), asked);
        // A name never seen gets SERVFAIL, cached briefly.
        let m = ask(&res, 4, "new.example.org.").await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        let asked = count.load(Ordering::SeqCst);
        let m = ask(&res, 5, "new.example.org.").await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(count.load(Ordering::SeqCst), asked, "SERVFAIL cached");
    }

    #[tokio::test]
    async fn protocol_errors() {
        let (addr, _, _) = fake_upstream(Duration::ZERO).await;
        let res = resolver(addr, "");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let reply = |b: &[u8], ip: IpAddr| match res.handle(b, ip, Transport::Udp) {
            Action::Reply(b) => Some(Message::from_vec(&b).unwrap()),
            _ => None,
        };
        // Outside the allowed networks.
        let m = reply(&query(7, "a.org."), "127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        // EDNS version 1.
        let mut q = Message::from_vec(&query(8, "a.org.")).unwrap();
        let mut e = Edns::new();
        e.set_version(1);
        q.set_edns(e);
        let m = reply(&q.to_vec().unwrap(), lo).unwrap();
        // BADVERS and BADSIG share code 16; hickory decodes it as the latter.
        assert_eq!(u16::from(m.metadata.response_code), 16);
        assert!(m.edns.is_some());
        // Garbage with a header: FORMERR with the ID; shorter than a header: dropped.
        let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x05];
        junk.extend_from_slice(&[0xff; 20]);
        let m = reply(&junk, lo).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(reply(&[1, 2, 3], lo).is_none());
        // ANY outside the zone: minimal.
        let mut q = Message::from_vec(&query(9, "a.org.")).unwrap();
        q.queries[0].set_query_type(RecordType::ANY);
        let m = reply(&q.to_vec().unwrap(), lo).unwrap();
        assert!(matches!(m.answers[0].data, RData::HINFO(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_refills() {
        let r = RateLimiter::new(10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        let allowed = (0..100)
            .filter(|_| r.check(ip, now) == Verdict::Allow)
            .count();
        assert_eq!(allowed, 20, "the burst is twice the rate");
        // Another client is not affected.
        assert_eq!(r.check("10.0.0.2".parse().unwrap(), now), Verdict::Allow);
        tokio::time::advance(Duration::from_secs(1)).await;
        let allowed = (0..100)
            .filter(|_| r.check(ip, Instant::now()) == Verdict::Allow)
            .count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn formerr_header_keeps_the_id() {
        let h = header_only(&[0xab, 0xcd, 0x01, 0x00, 0xff], 1);
        assert_eq!(&h[..2], &[0xab, 0xcd]);
        assert_eq!(h[2] & 0x80, 0x80);
        assert_eq!(h[2] & 0x01, 0x01, "RD copied");
        assert_eq!(h[3] & 0x0f, 1);
    }
}
