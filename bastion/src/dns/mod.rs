//! `[dns]`: the project's resolver. Authoritative for the project zone (records derived live
//! from the registry plus static records from config) and a caching forwarder for everything
//! else.
//!
//! hickory-proto does the wire format; the serving loop, cache, request coalescing, upstream
//! client, ACL and rate limiting are ours, because that is exactly where stock hickory 0.26 has
//! the weak spots the issue lists (per-upstream concurrency cap, one query at a time per TCP
//! connection, unbounded spawning per datagram, SERVFAIL and negative answers without SOA not
//! cached, zones fixed at start).

mod cache;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
mod server;
pub mod service;
mod upstream;
mod zone;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

pub use metrics::{metrics, DnsMetrics};

/// Most a server's UDP payload may be, whatever the client advertises (DNS flag day 2020).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// The ceiling on `servfail_ttl` (RFC 9520: at most 5 minutes; we keep it to seconds so a
/// recovered upstream is used again quickly).
pub const MAX_SERVFAIL_TTL: Duration = Duration::from_secs(5);

/// `[dns]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Addresses to serve on, UDP and TCP each (one string or a list).
    #[serde(deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Resolvers that names outside the zone are forwarded to, tried in order with failover.
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    /// Client networks that get answers; absent: loopback and the networks of the bastion's
    /// own interfaces. Others get REFUSED.
    #[serde(
        default,
        deserialize_with = "bastide_common::tomlcfg::some_one_or_many"
    )]
    pub allow: Option<Vec<String>>,
    /// TTL of the zone's records.
    #[serde(default = "default_zone_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Name of the zone's name server (NS and SOA MNAME), relative to the zone or absolute.
    #[serde(default = "default_nameserver")]
    pub nameserver: String,
    /// Reverse zones (e.g. "10.in-addr.arpa.") answered with a PTR per agent address.
    #[serde(default)]
    pub reverse_zones: Vec<String>,
    /// Static records of the zone.
    #[serde(default)]
    pub records: Vec<StaticRecord>,
    /// Most cached answers (each name and type is one entry).
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Bounds on how long an answer is cached, whatever TTL it came with.
    #[serde(default = "default_min_ttl", with = "humantime_serde")]
    pub cache_min_ttl: Duration,
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    pub cache_max_ttl: Duration,
    /// Ceiling on the caching of negative answers (NXDOMAIN, no data).
    #[serde(default = "default_negative_max_ttl", with = "humantime_serde")]
    pub negative_max_ttl: Duration,
    /// How long a failure (SERVFAIL from every upstream, or no answer) is cached; at most 5s.
    #[serde(default = "default_servfail_ttl", with = "humantime_serde")]
    pub servfail_ttl: Duration,
    /// Serve-stale (RFC 8767): how long past expiry an answer may still be served when every
    /// upstream fails; "0s" turns it off.
    #[serde(default = "default_serve_stale", with = "humantime_serde")]
    pub serve_stale: Duration,
    /// Time one upstream gets to answer before the next is tried.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Most queries waiting for an upstream at once (beyond: SERVFAIL at once).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// UDP responses per second per client address (burst: twice that); 0 turns it off.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: u32,
    /// Most TCP connections at once.
    #[serde(default = "default_max_tcp_connections")]
    pub max_tcp_connections: usize,
    /// A TCP connection with no query for this long is closed.
    #[serde(default = "default_tcp_idle_timeout", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
}

/// One `[[dns.records]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRecord {
    /// Relative to the zone ("www", "@" for the apex) or absolute inside it ("www.zone.").
    pub name: String,
    /// A, AAAA, CNAME, TXT, SRV or MX.
    #[serde(rename = "type")]
    pub rtype: String,
    /// Presentation form: "10.0.0.1", "web01", "any text", "10 5 5060 sip", "10 mail".
    pub value: String,
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

fn default_zone_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_nameserver() -> String {
    "bastion".into()
}
fn default_cache_entries() -> usize {
    100_000
}
fn default_min_ttl() -> Duration {
    Duration::ZERO
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(86_400)
}
fn default_negative_max_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_servfail_ttl() -> Duration {
    MAX_SERVFAIL_TTL
}
fn default_serve_stale() -> Duration {
    Duration::from_secs(86_400)
}
fn default_upstream_timeout() -> Duration {
    Duration::from_millis(1500)
}
fn default_max_pending() -> usize {
    10_000
}
fn default_rate_limit() -> u32 {
    500
}
fn default_max_tcp_connections() -> usize {
    1024
}
fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The configuration turned into what the server uses.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub zone: Option<Name>,
    pub nameserver: Name,
    pub zone_ttl: u32,
    pub reverse_zones: Vec<Name>,
    pub statics: Vec<Record>,
    pub allow: Vec<IpNet>,
    pub listen: Vec<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
    pub limits: cache::Limits,
    pub cache_entries: usize,
    pub upstream_timeout: Duration,
    pub max_pending: usize,
    pub rate_limit: u32,
    pub max_tcp_connections: usize,
    pub tcp_idle_timeout: Duration,
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = IpNet::from_str(s) {
        return Ok(n.trunc());
    }
    IpAddr::from_str(s)
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not a network (a.b.c.d/len, x::/len) or an address"))
}

fn parse_zone_name(s: &str) -> Result<Name, String> {
    if !crate::pki::valid_zone(s) {
        return Err(format!("{s:?} is not a valid DNS zone name"));
    }
    let mut n = Name::from_ascii(s).map_err(|e| format!("{s:?}: {e}"))?;
    n.set_fqdn(true);
    Ok(n.to_lowercase())
}

/// A name relative to `origin` ("@" is the origin, a trailing dot makes it absolute).
fn parse_rel(s: &str, origin: &Name) -> Result<Name, String> {
    let n = if s == "@" {
        origin.clone()
    } else {
        Name::parse(s, Some(origin)).map_err(|e| format!("{s:?} is not a domain name: {e}"))?
    };
    Ok(n.to_lowercase())
}

/// Splits text into DNS character-strings of at most 255 bytes, on character boundaries.
fn txt_chunks(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    for c in s.chars() {
        let fits = out.last().map(|l| l.len() + c.len_utf8() <= 255) == Some(true);
        if !fits {
            out.push(String::new());
        }
        if let Some(l) = out.last_mut() {
            l.push(c);
        }
    }
    out
}

fn parse_static(r: &StaticRecord, zone: &Name, default_ttl: u32) -> Result<Record, String> {
    let name = parse_rel(&r.name, zone)?;
    if !zone.zone_of(&name) {
        return Err(format!("{} is outside the zone {zone}", r.name));
    }
    let v = r.value.trim();
    let fields: Vec<&str> = v.split_whitespace().collect();
    let num = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("{s:?} is not a number from 0 to 65535"))
    };
    let data = match r.rtype.to_ascii_uppercase().as_str() {
        "A" => RData::A(A(
            Ipv4Addr::from_str(v).map_err(|_| format!("{v:?} is not an IPv4 address"))?
        )),
        "AAAA" => RData::AAAA(AAAA(
            Ipv6Addr::from_str(v).map_err(|_| format!("{v:?} is not an IPv6 address"))?,
        )),
        "CNAME" => RData::CNAME(CNAME(parse_rel(v, zone)?)),
        "TXT" => RData::TXT(TXT::new(txt_chunks(&r.value))),
        "MX" => match fields.as_slice() {
            [pref, exchange] => RData::MX(MX::new(num(pref)?, parse_rel(exchange, zone)?)),
            _ => return Err(format!("MX value {v:?} must be \"PREFERENCE EXCHANGE\"")),
        },
        "SRV" => match fields.as_slice() {
            [prio, weight, port, target] => RData::SRV(SRV::new(
                num(prio)?,
                num(weight)?,
                num(port)?,
                parse_rel(target, zone)?,
            )),
            _ => {
                return Err(format!(
                    "SRV value {v:?} must be \"PRIORITY WEIGHT PORT TARGET\""
                ))
            }
        },
        other => {
            return Err(format!(
                "type {other:?} is not one of A, AAAA, CNAME, TXT, SRV, MX"
            ))
        }
    };
    let ttl = r
        .ttl
        .map(|d| d.as_secs().min(u32::MAX as u64) as u32)
        .unwrap_or(default_ttl);
    Ok(Record::from_rdata(name, ttl, data))
}

/// Loopback plus the networks of this host's interfaces.
fn default_allow() -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    match if_addrs::get_if_addrs() {
        Ok(ifs) => {
            for i in ifs {
                let net = match i.addr {
                    if_addrs::IfAddr::V4(a) => {
                        ipnet::Ipv4Net::new(a.ip, a.prefixlen).map(IpNet::V4).ok()
                    }
                    if_addrs::IfAddr::V6(a) => {
                        ipnet::Ipv6Net::new(a.ip, a.prefixlen).map(IpNet::V6).ok()
                    }
                };
                if let Some(n) = net.map(|n| n.trunc()) {
                    if !nets.contains(&n) {
                        nets.push(n);
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "dns: cannot list interfaces: only loopback allowed"),
    }
    nets
}

impl DnsConfig {
    /// Compiles the configuration for the project zone `zone`; every problem as (key, reason).
    pub(crate) fn settings(&self, zone: Option<&str>) -> Result<Settings, Vec<(String, String)>> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut bad = |k: &str, r: String| problems.push((k.to_string(), r));
        if self.listen.is_empty() {
            bad("listen", "at least one address is needed".into());
        }
        let zone_name = match zone.map(parse_zone_name) {
            Some(Ok(z)) => Some(z),
            Some(Err(_)) => None, // reported under `zone` by the caller
            None => None,
        };
        let nameserver = match &zone_name {
            Some(z) => parse_rel(&self.nameserver, z).unwrap_or_else(|e| {
                bad("nameserver", e);
                z.clone()
            }),
            None => Name::root(),
        };
        let allow = match &self.allow {
            None => default_allow(),
            Some(list) => {
                let mut v = Vec::new();
                for s in list {
                    match parse_net(s) {
                        Ok(n) => v.push(n),
                        Err(e) => bad("allow", e),
                    }
                }
                v
            }
        };
        let mut reverse_zones = Vec::new();
        for s in &self.reverse_zones {
            match parse_zone_name(s) {
                Ok(n) => {
                    let arpa = |x: &str| Name::from_ascii(x).is_ok_and(|a| a.zone_of(&n));
                    if arpa("in-addr.arpa.") || arpa("ip6.arpa.") {
                        reverse_zones.push(n)
                    } else {
                        bad(
                            "reverse_zones",
                            format!("{s:?} is not under in-addr.arpa. or ip6.arpa."),
                        )
                    }
                }
                Err(e) => bad("reverse_zones", e),
            }
        }
        if !self.reverse_zones.is_empty() && zone.is_none() {
            bad(
                "reverse_zones",
                "needs the top-level `zone` (PTR records point into it)".into(),
            );
        }
        let zone_ttl = self.ttl.as_secs().min(u32::MAX as u64) as u32;
        let mut statics = Vec::new();
        for (i, r) in self.records.iter().enumerate() {
            let key = format!("records[{i}]");
            match &zone_name {
                None => bad(&key, "static records need the top-level `zone`".into()),
                Some(z) => match parse_static(r, z, zone_ttl) {
                    Ok(rec) => statics.push(rec),
                    Err(e) => bad(&key, e),
                },
            }
        }
        // A CNAME must be alone at its name (RFC 1034 3.6.2).
        for (i, r) in statics.iter().enumerate() {
            if matches!(r.data, RData::CNAME(_))
                && statics
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.name == r.name)
            {
                bad(
                    &format!("records[{i}]"),
                    format!("a CNAME at {} cannot have other records", r.name),
                );
            }
        }
        if self.upstreams.is_empty() && zone.is_none() {
            bad(
                "upstreams",
                "with no zone and no upstream there is nothing to answer".into(),
            );
        }
        if self.cache_entries == 0 {
            bad("cache_entries", "must be positive".into());
        }
        if self.cache_max_ttl < self.cache_min_ttl {
            bad("cache_max_ttl", "must not be below cache_min_ttl".into());
        }
        if self.servfail_ttl > MAX_SERVFAIL_TTL {
            bad("servfail_ttl", "must be at most 5s".into());
        }
        if self.upstream_timeout.is_zero() {
            bad("upstream_timeout", "must be positive".into());
        }
        if self.max_pending == 0 {
            bad("max_pending", "must be positive".into());
        }
        if self.max_tcp_connections == 0 {
            bad("max_tcp_connections", "must be positive".into());
        }
        if self.tcp_idle_timeout.is_zero() {
            bad("tcp_idle_timeout", "must be positive".into());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Settings {
            zone: zone_name,
            nameserver,
            zone_ttl,
            reverse_zones,
            statics,
            allow,
            listen: self.listen.clone(),
            upstreams: self.upstreams.clone(),
            limits: cache::Limits {
                min_ttl: self.cache_min_ttl,
                max_ttl: self.cache_max_ttl,
                negative_max_ttl: self.negative_max_ttl,
                servfail_ttl: self.servfail_ttl,
                serve_stale: self.serve_stale,
            },
            cache_entries: self.cache_entries,
            upstream_timeout: self.upstream_timeout,
            max_pending: self.max_pending,
            rate_limit: self.rate_limit,
            max_tcp_connections: self.max_tcp_connections,
            tcp_idle_timeout: self.tcp_idle_timeout,
        })
    }

    /// Every problem as (key under `dns.`, reason), for `Config::validate`.
    pub fn problems(&self, zone: Option<&str>) -> Vec<(String, String)> {
        self.settings(zone).err().unwrap_or_default()
    }
}

/// The bound sockets of the service (bound by the daemon before anything starts).
#[derive(Debug)]
pub struct DnsSockets {
    pub udp: Vec<UdpSocket>,
    pub tcp: Vec<TcpListener>,
}

/// Binds UDP and TCP on every `listen` address. UDP buffers are enlarged so that bursts are
/// queued by the kernel rather than lost.
pub async fn bind(cfg: &DnsConfig) -> Result<DnsSockets> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for addr in &cfg.listen {
        let domain = socket2::Domain::for_address(*addr);
        let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
            .context("creating a UDP socket")?;
        if addr.is_ipv6() {
            let _ = s.set_only_v6(true);
        }
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true)?;
        s.bind(&(*addr).into())
            .with_context(|| format!("cannot bind UDP {addr}"))?;
        udp.push(UdpSocket::from_std(s.into())?);
        tcp.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind TCP {addr}"))?,
        );
    }
    Ok(DnsSockets { udp, tcp })
}

/// Serves DNS until `shutdown`. `registry` gives the zone's agents and is followed live.
pub async fn run(
    cfg: DnsConfig,
    registry: Registry,
    sockets: DnsSockets,
    shutdown: CancellationToken,
) -> Result<()> {
    let zone = registry.ca().zone.clone();
    let settings = cfg.settings(zone.as_deref()).map_err(|p| {
        anyhow::anyhow!(
            "{}",
            p.iter()
                .map(|(k, r)| format!("dns.{k}: {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    server::serve(settings, registry, sockets, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> DnsConfig {
        toml::from_str(&format!("listen = [\"127.0.0.1:5353\"]\n{extra}")).unwrap()
    }

    #[test]
    fn statics_parse() {
        let c = cfg(r#"
            [[records]]
            name = "www"
            type = "CNAME"
            value = "web01"
            [[records]]
            name = "@"
            type = "MX"
            value = "10 mail"
            [[records]]
            name = "_sip._tcp"
            type = "SRV"
            value = "10 5 5060 sip.other.org."
            [[records]]
            name = "txt"
            type = "TXT"
            value = "hello"
            ttl = "5m"
        "#);
        let s = c.settings(Some("proj.test.")).unwrap();
        assert_eq!(s.statics.len(), 4);
        assert_eq!(s.statics[0].name.to_string(), "www.proj.test.");
        assert_eq!(s.statics[3].ttl, 300);
        match &s.statics[2].data {
            RData::SRV(srv) => assert_eq!(srv.target.to_string(), "sip.other.org."),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn every_problem_reported() {
        let c = cfg(r#"
            allow = ["nope"]
            servfail_ttl = "10s"
            reverse_zones = ["example.org."]
            [[records]]
            name = "x"
            type = "A"
            value = "not-an-ip"
            [[records]]
            name = "y.elsewhere.org."
            type = "A"
            value = "10.0.0.1"
            [[records]]
            name = "z"
            type = "HINFO"
            value = "a b"
        "#);
        let p = c.settings(Some("proj.test.")).unwrap_err();
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "allow",
            "servfail_ttl",
            "reverse_zones",
            "records[0]",
            "records[1]",
            "records[2]",
        ] {
            assert!(keys.contains(&k), "{k} missing from {p:?}");
        }
    }

    #[test]
    fn long_txt_is_chunked() {
        let s = "é".repeat(300);
        let chunks = txt_chunks(&s);
        assert!(chunks.iter().all(|c| c.len() <= 255));
        assert_eq!(chunks.concat(), s);
    }
}
