//! How the daemon starts the SMTP relay (see `crate::service`), and its admin commands
//! (`bastide mail ...`) and status.

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::listeners::TcpListeners;
use crate::metrics::names;
use crate::service::{Ctx, Service};

const COMMANDS: &[&str] = &["mail_queue", "mail_flush", "mail_retry", "mail_delete"];

/// The relay, bound and opened.
pub struct Relay {
    svc: super::Smtp,
    listener: TcpListeners,
}

impl Service for Relay {
    const NAME: &'static str = "smtp";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        let Some(s) = &cfg.smtp else {
            ctx.admin
                .off(COMMANDS, "the smtp relay is off (no [smtp] table)");
            return Ok(None);
        };
        let listener = TcpListeners::bind(&s.listen, "smtp.listen", &cfg.source).await?;
        let pki = cfg.pki_paths();
        let main = super::Main {
            zone: cfg.zone.as_deref(),
            state_dir: &cfg.state_dir,
            pki: &pki,
        };
        let svc = super::Smtp::open(s.clone(), &main, ctx.registry.clone())
            .with_context(|| format!("{}: smtp", cfg.source.display()))?;
        let mail = svc.handle();
        ctx.handles.provide(mail.clone());
        let m = mail.clone();
        ctx.collectors.register(move || {
            for (series, v) in m.metrics.snapshot(&m.queue) {
                names::export_series(series, v);
            }
        });
        let m = mail.clone();
        ctx.admin
            .blocking(COMMANDS, move |req: super::MailRequest| {
                super::admin(&m, req)
            });
        ctx.admin.status("mail", move || {
            let (queued, oldest) = mail.queue.gauges();
            serde_json::json!({ "queued": queued, "oldest_age_secs": oldest })
        });
        Ok(Some(Self { svc, listener }))
    }

    async fn run(self, _ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        super::run(self.svc, self.listener, shutdown).await
    }
}
