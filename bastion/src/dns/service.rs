//! How the daemon starts the DNS service (see `crate::service`).

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::names;
use crate::service::{Ctx, Service};

/// The DNS service, bound.
pub struct Dns {
    cfg: super::DnsConfig,
    sockets: super::DnsSockets,
}

impl Service for Dns {
    const NAME: &'static str = "dns";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        let Some(d) = &cfg.dns else {
            return Ok(None);
        };
        let sockets = super::bind(d).await.map_err(|e| {
            let hint = crate::listeners::in_use_hint_of(&e, "dns.listen", &cfg.source);
            e.context(format!("{}: dns.listen{hint}", cfg.source.display()))
        })?;
        // Registered now, so the histogram is exported (empty) before the first upstream query.
        let _ = ::metrics::histogram!(names::DNS_UPSTREAM_LATENCY);
        ctx.collectors.register(collect);
        Ok(Some(Self {
            cfg: d.clone(),
            sockets,
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        super::run(self.cfg, ctx.registry, self.sockets, shutdown).await
    }
}

/// Copies the DNS counters into the recorder (before each scrape).
pub(crate) fn collect() {
    use std::sync::atomic::Ordering::Relaxed;
    let d = super::metrics::metrics();
    for (i, c) in d.queries_by_type.iter().enumerate() {
        let t = super::metrics::QUERY_TYPES
            .get(i)
            .map(|t| t.to_string())
            .unwrap_or_else(|| "OTHER".into());
        names::export(
            names::DNS_QUERIES,
            vec![::metrics::Label::new("type", t)],
            c.load(Relaxed),
        );
    }
    for (i, c) in d.responses_by_rcode.iter().enumerate() {
        let v = c.load(Relaxed);
        let rcode = match i {
            0 => "NOERROR".to_string(),
            1 => "FORMERR".into(),
            2 => "SERVFAIL".into(),
            3 => "NXDOMAIN".into(),
            4 => "NOTIMP".into(),
            5 => "REFUSED".into(),
            16 => "BADVERS".into(),
            i if i >= super::metrics::RCODES => "OTHER".into(),
            i => format!("RCODE{i}"),
        };
        if v > 0 || i <= 5 {
            names::export(
                names::DNS_RESPONSES,
                vec![::metrics::Label::new("rcode", rcode)],
                v,
            );
        }
    }
    for (name, c) in [
        (names::DNS_CACHE_HITS, &d.cache_hits),
        (names::DNS_CACHE_MISSES, &d.cache_misses),
        (names::DNS_CACHE_STALE_SERVED, &d.cache_stale_served),
        (names::DNS_CACHE_ENTRIES, &d.cache_entries),
        (names::DNS_PREFETCHES, &d.prefetches),
        (names::DNS_COALESCED, &d.coalesced),
        (names::DNS_UPSTREAM_QUERIES, &d.upstream_queries),
        (names::DNS_UPSTREAM_FAILURES, &d.upstream_failures),
        (names::DNS_REFUSED, &d.refused),
        (names::DNS_RATE_LIMITED, &d.rate_limited),
        (names::DNS_MALFORMED, &d.malformed),
        (names::DNS_OVERLOADED, &d.overloaded),
    ] {
        names::export(name, Vec::new(), c.load(Relaxed));
    }
}
