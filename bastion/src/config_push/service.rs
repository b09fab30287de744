//! How the daemon starts configuration push (see `crate::service`), and its admin commands
//! (`bastide config render|check|reload`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::ConfigPushHandle;
use crate::config::Config;
use crate::service::{Ctx, Service};

/// The admin commands of configuration push.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConfigRequest {
    /// Effective variables and files of one agent, from the tree on disk.
    ConfigRender { agent: String },
    /// Validate the tree and render every agent, changing nothing.
    ConfigCheck,
    /// Reload the tree now and push what changed.
    ConfigReload,
}

const COMMANDS: &[&str] = &["config_render", "config_check", "config_reload"];

/// The push service, ready.
pub struct ConfigPush {
    handle: ConfigPushHandle,
}

impl Service for ConfigPush {
    const NAME: &'static str = "config_push";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        let Some(c) = &cfg.config_push else {
            ctx.admin.off(
                COMMANDS,
                "configuration push is off (no [config_push] table)",
            );
            return Ok(None);
        };
        let handle = ConfigPushHandle::new(
            c.clone(),
            &cfg.project,
            cfg.zone.clone(),
            super::bastion_vars(cfg),
            ctx.registry.clone(),
        );
        ctx.handles.provide(handle.clone());
        let (blocking, reload) = (handle.clone(), handle.clone());
        ctx.admin
            .blocking(&COMMANDS[..2], move |req: ConfigRequest| match req {
                ConfigRequest::ConfigRender { agent } => match blocking.render_view(&agent) {
                    Ok(v) => Ok(serde_json::to_value(v)?),
                    Err(e) => bail!("{}", e.join("\n")),
                },
                _ => Ok(serde_json::to_value(blocking.check())?),
            });
        ctx.admin.call(&COMMANDS[2..], move |_: ConfigRequest| {
            let cp = reload.clone();
            async move {
                let s = cp.reload().await?;
                if !s.errors.is_empty() {
                    bail!(
                        "the tree was refused, the last good one stays:\n{}",
                        s.errors.join("\n")
                    );
                }
                Ok(serde_json::to_value(s)?)
            }
        });
        Ok(Some(Self { handle }))
    }

    async fn run(self, _ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        super::run(self.handle, shutdown).await
    }
}
