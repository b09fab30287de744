//! How the daemon starts the SSH jump service (see `crate::service`), and its admin
//! commands (`bastide ssh known-hosts`, `bastide ssh config`).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::listeners::TcpListeners;
use crate::metrics::names;
use crate::service::{Ctx, Service};

/// The admin commands of SSH.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum SshRequest {
    /// known_hosts for the bastion and every enrolled VM.
    SshKnownHosts,
    /// A ~/.ssh/config snippet.
    SshConfig {
        user: Option<String>,
        known_hosts: String,
    },
}

const COMMANDS: &[&str] = &["ssh_known_hosts", "ssh_config"];

/// The SSH jump listener, bound.
pub struct Ssh {
    listener: TcpListeners,
}

impl Service for Ssh {
    const NAME: &'static str = "ssh";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        // Answered with [ssh] off too: known_hosts then lists the VMs alone.
        let (registry, config) = (ctx.registry.clone(), ctx.config.clone());
        ctx.admin.blocking(COMMANDS, move |req: SshRequest| {
            let cfg = config.borrow().clone();
            let snap = registry.snapshot();
            Ok(serde_json::Value::String(match req {
                SshRequest::SshKnownHosts => super::hosts::known_hosts(&cfg, &snap)?,
                SshRequest::SshConfig { user, known_hosts } => {
                    super::hosts::ssh_config(&cfg, &snap, user.as_deref(), &known_hosts)?
                }
            }))
        });
        let Some(s) = &cfg.ssh else {
            return Ok(None);
        };
        ctx.collectors.register(collect);
        let listener = TcpListeners::bind(&s.listen, "ssh.listen", &cfg.source).await?;
        Ok(Some(Self { listener }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        super::run(ctx.config, ctx.registry, self.listener, shutdown).await
    }
}

/// Copies the SSH counters into the recorder (before each scrape).
pub(crate) fn collect() {
    for (name, v) in super::counters().export() {
        names::export(name, Vec::new(), v);
    }
}
