//! How the daemon starts the metrics endpoint (see `crate::service`).

use std::sync::Arc;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::listeners::TcpListeners;
use crate::service::{Ctx, Service};

/// The metrics endpoint, bound.
pub struct Endpoint {
    cfg: super::MetricsConfig,
    listener: TcpListeners,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Service for Endpoint {
    const NAME: &'static str = "metrics";

    async fn bind(cfg: &Config, _ctx: &Ctx) -> Result<Option<Self>> {
        let Some(m) = &cfg.metrics else {
            return Ok(None);
        };
        let listener = TcpListeners::bind(&m.listen, "metrics.listen", &cfg.source).await?;
        let tls = if m.tls {
            Some(Arc::new(crate::tls::https_config(&cfg.pki_paths())?))
        } else {
            None
        };
        Ok(Some(Self {
            cfg: m.clone(),
            listener,
            tls,
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        super::run(
            self.cfg,
            ctx.registry,
            ctx.hosts,
            ctx.collectors,
            self.tls,
            self.listener,
            shutdown,
        )
        .await
    }
}
