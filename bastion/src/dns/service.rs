//! How the daemon starts the DNS service (see `crate::service`).

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::{Ctx, Service};

/// The DNS service, bound.
pub struct Dns {
    cfg: super::DnsConfig,
    sockets: super::DnsSockets,
}

impl Service for Dns {
    const NAME: &'static str = "dns";

    async fn bind(cfg: &Config, _ctx: &Ctx) -> Result<Option<Self>> {
        let Some(d) = &cfg.dns else {
            return Ok(None);
        };
        let sockets = super::bind(d)
            .await
            .with_context(|| format!("{}: dns.listen", cfg.source.display()))?;
        Ok(Some(Self {
            cfg: d.clone(),
            sockets,
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        super::run(self.cfg, ctx.registry, self.sockets, shutdown).await
    }
}
