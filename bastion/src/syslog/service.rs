//! How the daemon starts the syslog receiver (see `crate::service`): it writes into the log
//! store the `[logs]` service publishes.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::{Ctx, Service};

/// The syslog listeners, bound.
pub struct Syslog {
    cfg: super::SyslogConfig,
    sockets: super::Sockets,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Service for Syslog {
    const NAME: &'static str = "syslog";

    async fn bind(cfg: &Config, _ctx: &Ctx) -> Result<Option<Self>> {
        // Validation refuses [syslog] without [logs]: there would be nowhere to write.
        let (Some(s), Some(_)) = (&cfg.syslog, &cfg.logs) else {
            return Ok(None);
        };
        let sockets = super::bind(s).await.map_err(|e| {
            let hint = crate::listeners::in_use_hint_of(&e, "syslog.udp, tcp or tls", &cfg.source);
            e.context(format!("{}: syslog{hint}", cfg.source.display()))
        })?;
        let tls = if s.tls.is_empty() {
            None
        } else {
            // RFC 5425: the bastion's server certificate, no client certificates.
            let mut t = crate::tls::https_config(&cfg.pki_paths())?;
            t.alpn_protocols.clear();
            Some(Arc::new(t))
        };
        Ok(Some(Self {
            cfg: s.clone(),
            sockets,
            tls,
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        let logs = ctx
            .handles
            .get::<crate::logs::Logs>()
            .context("syslog needs the log store ([logs])")?;
        super::run(
            self.cfg,
            ctx.registry,
            logs.store,
            self.tls,
            self.sockets,
            shutdown,
        )
        .await
    }
}
