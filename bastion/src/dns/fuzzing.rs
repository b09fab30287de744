//! Not an API: the entry point of the `dns` fuzz target (`fuzz/`), which drives the
//! resolver's query handling, zone answers and cache without sockets.

use std::net::IpAddr;
use std::sync::Arc;

use super::server::{Resolver, Transport};
use super::zone::build;
use super::DnsConfig;

/// A resolver over a `[dns]` table and a zone holding the given agents.
pub struct Harness(Arc<Resolver>);

impl Harness {
    pub fn new(
        dns_toml: &str,
        zone: &str,
        agents: Vec<(String, Vec<IpAddr>)>,
    ) -> Result<Self, String> {
        let cfg: DnsConfig = toml::from_str(dns_toml).map_err(|e| e.to_string())?;
        let settings = cfg.settings(Some(zone)).map_err(|p| format!("{p:?}"))?;
        let z = build(&settings, &agents, 1);
        Ok(Self(Arc::new(Resolver::new(settings, z))))
    }

    /// The reply to `query` from `src` (None: dropped); a cache miss is answered with
    /// `upstream` as the upstream's reply. Needs a Tokio runtime entered (prefetches).
    pub fn answer(&self, query: &[u8], src: IpAddr, tcp: bool, upstream: &[u8]) -> Option<Vec<u8>> {
        let t = if tcp { Transport::Tcp } else { Transport::Udp };
        self.0.answer_offline(query, src, t, upstream)
    }
}
