//! The upstream client: one question to the configured resolvers, UDP first from a fresh
//! random port with a random ID, TCP when the answer is truncated, the next resolver on a
//! timeout, an error, SERVFAIL or REFUSED. The resolver that answered last is tried first.
//! Outstanding queries are bounded by one semaphore that makes callers wait, never fail
//! (stock hickory fails past 32 per upstream).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};
use tracing::debug;

use super::metrics::{inc, metrics};
use super::MAX_UDP_PAYLOAD;

#[derive(Debug)]
pub struct Upstreams {
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    preferred: AtomicUsize,
    permits: Semaphore,
}

fn err(msg: &str) -> io::Error {
    io::Error::other(msg.to_string())
}

impl Upstreams {
    pub fn new(addrs: Vec<SocketAddr>, timeout: Duration, max_outstanding: usize) -> Self {
        Self {
            addrs,
            timeout,
            preferred: AtomicUsize::new(0),
            permits: Semaphore::new(max_outstanding.max(1)),
        }
    }

    /// Asks the resolvers in turn; the first NOERROR or NXDOMAIN answer, or None when every
    /// one failed.
    pub async fn resolve(&self, name: &Name, qtype: RecordType) -> Option<Message> {
        let n = self.addrs.len();
        if n == 0 {
            return None;
        }
        let _permit = self.permits.acquire().await.ok()?;
        let first = self.preferred.load(Ordering::Relaxed) % n;
        for i in 0..n {
            let idx = (first + i) % n;
            let addr = self.addrs[idx];
            inc(&metrics().upstream_queries);
            let t0 = Instant::now();
            match self.ask(addr, name, qtype).await {
                Ok(msg)
                    if matches!(
                        msg.metadata.response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                {
                    metrics().latency(t0.elapsed());
                    if idx != first {
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    return Some(msg);
                }
                Ok(msg) => {
                    inc(&metrics().upstream_failures);
                    debug!(upstream = %addr, %name, rcode = %msg.metadata.response_code, "dns: upstream refused or failed");
                }
                Err(e) => {
                    inc(&metrics().upstream_failures);
                    debug!(upstream = %addr, %name, error = %e, "dns: upstream did not answer");
                }
            }
        }
        None
    }

    async fn ask(&self, addr: SocketAddr, name: &Name, qtype: RecordType) -> io::Result<Message> {
        let id: u16 = rand::random();
        let mut q = Message::new(id, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name.clone(), qtype));
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        q.set_edns(edns);
        let bytes = q.to_vec().map_err(|e| err(&e.to_string()))?;
        let check = |m: Message| -> Option<Message> {
            let ok = m.metadata.id == id
                && m.metadata.message_type == MessageType::Response
                && m.queries.len() == 1
                && m.queries[0].name() == name
                && m.queries[0].query_type() == qtype;
            ok.then_some(m)
        };
        let udp = timeout(self.timeout, async {
            let local: SocketAddr = if addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(local).await?;
            sock.connect(addr).await?;
            sock.send(&bytes).await?;
            let mut buf = vec![0u8; 65_535];
            loop {
                let n = sock.recv(&mut buf).await?;
                // Anything else on this port (a late duplicate, a forgery) is ignored.
                if let Some(m) = Message::from_vec(&buf[..n]).ok().and_then(check) {
                    return Ok::<_, io::Error>(m);
                }
            }
        })
        .await
        .map_err(|_| err("timeout over UDP"))??;
        if !udp.metadata.truncation {
            return Ok(udp);
        }
        timeout(self.timeout, async {
            let mut s = TcpStream::connect(addr).await?;
            let len = u16::try_from(bytes.len()).map_err(|_| err("query too long"))?;
            let mut out = Vec::with_capacity(bytes.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&bytes);
            s.write_all(&out).await?;
            let n = s.read_u16().await? as usize;
            let mut buf = vec![0u8; n];
            s.read_exact(&mut buf).await?;
            Message::from_vec(&buf)
                .ok()
                .and_then(check)
                .ok_or_else(|| err("bad answer over TCP"))
        })
        .await
        .map_err(|_| err("timeout over TCP"))?
    }
}
