//! Counters of the DNS service, kept in atomics on the query path and copied into the
//! recorder at scrape time by the collector `dns/service.rs` registers (names, units and help
//! texts in `metrics::names`). One process serves one `[dns]`, so they are process-wide.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// Query types counted on their own; everything else is "other".
pub const QUERY_TYPES: [RecordType; 12] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::MX,
    RecordType::NS,
    RecordType::PTR,
    RecordType::SOA,
    RecordType::SRV,
    RecordType::TXT,
    RecordType::HTTPS,
    RecordType::SVCB,
    RecordType::ANY,
];
/// Response codes 0..=23 counted on their own (BADVERS is 16); larger ones in the last slot.
pub const RCODES: usize = 24;

// A fresh zero for array and static initialisers (each use is a new atomic).
#[allow(clippy::declare_interior_mutable_const)]
const Z: AtomicU64 = AtomicU64::new(0);

/// The DNS service's counters and gauges.
#[derive(Debug)]
pub struct DnsMetrics {
    /// Queries by type, indexed like [`QUERY_TYPES`], the last slot for other types.
    pub queries_by_type: [AtomicU64; QUERY_TYPES.len() + 1],
    /// Responses sent by response code (0..=23, then other).
    pub responses_by_rcode: [AtomicU64; RCODES + 1],
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Answers served past their expiry because every upstream failed.
    pub cache_stale_served: AtomicU64,
    /// Entries in the cache now (gauge).
    pub cache_entries: AtomicU64,
    /// Background refreshes of popular answers about to expire.
    pub prefetches: AtomicU64,
    /// Misses merged into an identical query already waiting for an upstream.
    pub coalesced: AtomicU64,
    /// Queries sent to upstreams, and those that failed (timeout, error, SERVFAIL, REFUSED).
    pub upstream_queries: AtomicU64,
    pub upstream_failures: AtomicU64,
    /// Clients outside the allowed networks, answered REFUSED.
    pub refused: AtomicU64,
    /// UDP responses dropped (or slipped as TC) by the per-client rate limit.
    pub rate_limited: AtomicU64,
    /// Packets that could not be parsed.
    pub malformed: AtomicU64,
    /// Queries dropped because too many were waiting for upstreams.
    pub overloaded: AtomicU64,
}

static METRICS: DnsMetrics = DnsMetrics {
    queries_by_type: [Z; QUERY_TYPES.len() + 1],
    responses_by_rcode: [Z; RCODES + 1],
    cache_hits: Z,
    cache_misses: Z,
    cache_stale_served: Z,
    cache_entries: Z,
    prefetches: Z,
    coalesced: Z,
    upstream_queries: Z,
    upstream_failures: Z,
    refused: Z,
    rate_limited: Z,
    malformed: Z,
    overloaded: Z,
};

/// The process's DNS counters.
pub fn metrics() -> &'static DnsMetrics {
    &METRICS
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl DnsMetrics {
    pub(crate) fn query(&self, t: RecordType) {
        let i = QUERY_TYPES
            .iter()
            .position(|q| *q == t)
            .unwrap_or(QUERY_TYPES.len());
        inc(&self.queries_by_type[i]);
    }

    pub(crate) fn response(&self, rc: ResponseCode) {
        let v = u16::from(rc) as usize;
        inc(&self.responses_by_rcode[v.min(RCODES)]);
    }

    /// Upstream answer latency, recorded through the facade (buckets in `metrics::names`).
    pub(crate) fn latency(&self, d: Duration) {
        ::metrics::histogram!(crate::metrics::names::DNS_UPSTREAM_LATENCY).record(d.as_secs_f64());
    }

    /// Count of queries of type `t` so far.
    pub fn queries_of(&self, t: RecordType) -> u64 {
        let i = QUERY_TYPES
            .iter()
            .position(|q| *q == t)
            .unwrap_or(QUERY_TYPES.len());
        self.queries_by_type[i].load(Ordering::Relaxed)
    }
}
