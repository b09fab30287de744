//! How the daemon starts configuration push (see `crate::service`), and its admin commands
//! (`bastide config render|check|reload`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::git::GitSource;
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
    /// What a candidate tree would change for each agent, without pushing.
    ConfigPlan {
        #[serde(default)]
        commit: Option<String>,
        #[serde(default)]
        dir: Option<std::path::PathBuf>,
        #[serde(default)]
        agent: Option<String>,
    },
    /// The rollout in waves in progress (or the last one).
    ConfigRolloutStatus,
    /// A halted rollout goes on to its next wave.
    ConfigRolloutResume,
    /// The agents a rollout reached get their previous revision back.
    ConfigRolloutAbort,
    /// The registry snapshot of `bastide config plan --offline`.
    ConfigSnapshot,
}

const COMMANDS: &[&str] = &[
    "config_render",
    "config_check",
    "config_reload",
    "config_plan",
    "config_rollout_status",
    "config_rollout_resume",
    "config_rollout_abort",
    "config_snapshot",
];

/// The push service, ready.
pub struct ConfigPush {
    handle: ConfigPushHandle,
    git: Option<Arc<GitSource>>,
    webhook: Option<tokio::net::TcpListener>,
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
            bastion_vars(cfg),
            ctx.registry.clone(),
        );
        handle.set_ssh_policy(
            cfg.ssh
                .as_ref()
                .and_then(|s| crate::ssh::config::Policy::build(s, cfg.zone.as_deref()).ok())
                .map(Arc::new),
        );
        ctx.handles.provide(handle.clone());
        let git = c
            .git
            .as_ref()
            .map(|g| Arc::new(GitSource::new(g.clone(), &cfg.state_dir)));
        let mut webhook = None;
        if let Some(g) = &git {
            if let Some(w) = &g.config().webhook {
                webhook = Some(tokio::net::TcpListener::bind(w.listen).await.with_context(
                    || {
                        format!(
                            "{}: config_push.git.webhook.listen: cannot bind {}",
                            cfg.source.display(),
                            w.listen
                        )
                    },
                )?);
            }
            let st = g.clone();
            ctx.admin.status("config_source", move || {
                serde_json::to_value(st.status()).unwrap_or_default()
            });
            let st = g.clone();
            ctx.collectors.register_text(move |out| {
                use std::fmt::Write as _;
                let s = st.status();
                let n = crate::metrics::names::CONFIG_SOURCE_INFO;
                let _ = writeln!(
                    out,
                    "# HELP {n} {}\n# TYPE {n} gauge",
                    crate::metrics::names::CONFIG_SOURCE_INFO_HELP
                );
                if !s.commit.is_empty() {
                    let _ = writeln!(
                        out,
                        "{n}{{commit=\"{}\",branch=\"{}\"}} 1",
                        s.commit, s.branch
                    );
                }
            });
        }
        let (blocking, reload) = (handle.clone(), handle.clone());
        ctx.admin
            .blocking(&COMMANDS[..2], move |req: ConfigRequest| match req {
                ConfigRequest::ConfigRender { agent } => match blocking.render_view(&agent) {
                    Ok(v) => Ok(serde_json::to_value(v)?),
                    Err(e) => bail!("{}", e.join("\n")),
                },
                _ => Ok(serde_json::to_value(blocking.check())?),
            });
        let (rh, rg) = (handle.clone(), git.clone());
        ctx.admin
            .blocking(&COMMANDS[4..7], move |req: ConfigRequest| match req {
                ConfigRequest::ConfigRolloutResume => {
                    Ok(serde_json::to_value(rh.rollout_resume()?)?)
                }
                ConfigRequest::ConfigRolloutAbort => {
                    let (st, commit) = rh.rollout_abort()?;
                    if let Some(g) = &rg {
                        g.restored(&st.source, commit);
                    }
                    Ok(serde_json::to_value(st)?)
                }
                _ => match rh.rollout_status() {
                    Some(st) => Ok(serde_json::to_value(st)?),
                    None => {
                        bail!("no rollout yet ([config_push.rollout] sends new revisions in waves)")
                    }
                },
            });
        let sh = handle.clone();
        ctx.admin
            .blocking(&COMMANDS[7..8], move |_: ConfigRequest| {
                Ok(serde_json::to_value(sh.snapshot())?)
            });
        let (ph, pg) = (handle.clone(), git.clone());
        ctx.admin.call(&COMMANDS[3..4], move |req: ConfigRequest| {
            let (h, g) = (ph.clone(), pg.clone());
            async move {
                let ConfigRequest::ConfigPlan { commit, dir, agent } = req else {
                    bail!("not a plan request");
                };
                let plan = plan(h, g, commit, dir, agent).await?;
                Ok(serde_json::to_value(plan)?)
            }
        });
        ctx.admin.call(&COMMANDS[2..3], move |_: ConfigRequest| {
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
        Ok(Some(Self {
            handle,
            git,
            webhook,
        }))
    }

    async fn run(self, _ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(g) = self.git {
            if let (Some(l), Some(w)) = (self.webhook, g.config().webhook.clone()) {
                let (branch, trigger, s) = (
                    g.config().branch.clone(),
                    g.trigger.clone(),
                    shutdown.clone(),
                );
                tasks.spawn(super::git::serve_webhook(w, branch, trigger, l, s));
            }
            let (h, s) = (self.handle.clone(), shutdown.clone());
            tasks.spawn(async move {
                super::git::run(h, g, s).await;
                Ok(())
            });
        }
        tasks.spawn(super::run(self.handle, shutdown));
        // The first failure ends the service (and, dropping the set, its other tasks).
        while let Some(t) = tasks.join_next().await {
            match t {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => bail!("configuration push task failed: {e}"),
            }
        }
        Ok(())
    }
}

/// `bastide config plan`: the candidate is a directory, a commit of the git source, or
/// (neither given) the branch's head or the tree on disk.
async fn plan(
    h: ConfigPushHandle,
    git: Option<Arc<GitSource>>,
    commit: Option<String>,
    dir: Option<std::path::PathBuf>,
    agent: Option<String>,
) -> Result<super::plan::Plan> {
    let blocking = |h: ConfigPushHandle,
                    dir: std::path::PathBuf,
                    c: Option<String>,
                    agent: Option<String>| async move {
        tokio::task::spawn_blocking(move || h.plan(&dir, c, agent.as_deref()))
            .await
            .context("plan task")
    };
    match (dir, commit, git) {
        (Some(_), Some(_), _) => bail!("--dir and --commit exclude each other"),
        (Some(d), None, _) => {
            if !d.is_dir() {
                bail!("{} is not a directory", d.display());
            }
            blocking(h, d, None, agent).await
        }
        (None, c, Some(g)) => {
            let (dest, commit, refusal) = g.plan_source(c.as_deref()).await?;
            let r = blocking(h, dest.clone(), Some(commit), agent).await;
            let _ = std::fs::remove_dir_all(&dest);
            let mut p = r?;
            p.refusal = refusal;
            Ok(p)
        }
        (None, Some(_), None) => bail!("--commit needs a git source ([config_push.git])"),
        (None, None, None) => {
            let Some(d) = h.dir() else {
                bail!("no tree in force");
            };
            blocking(h, d, None, agent).await
        }
    }
}

/// The template variable `bastion`: the bastion's project, zone, address and the addresses
/// of its services, so that templates can point a VM's resolver, relay and logs at it.
pub fn bastion_vars(cfg: &Config) -> serde_json::Value {
    let cp = cfg.config_push.as_ref();
    let advertised = crate::listeners::advertised;
    let agents = cfg.agents.as_ref().and_then(|a| advertised(&a.listen));
    let address = cp
        .and_then(|c| c.bastion_address)
        .or_else(|| agents.map(|a| a.ip()).filter(|ip| !ip.is_unspecified()));
    let endpoint = |sa: SocketAddr| {
        let host = if sa.ip().is_unspecified() {
            address.unwrap_or(sa.ip())
        } else {
            sa.ip()
        };
        serde_json::json!({ "host": host.to_string(), "port": sa.port() })
    };
    let mut services = serde_json::Map::new();
    if let Some(a) = agents {
        services.insert("agents".into(), endpoint(a));
    }
    if let Some(d) = cfg.dns.as_ref().and_then(|d| advertised(&d.listen)) {
        services.insert("dns".into(), endpoint(d));
    }
    if let Some(s) = cfg.smtp.as_ref().and_then(|s| advertised(&s.listen)) {
        services.insert("smtp".into(), endpoint(s));
    }
    if let Some(s) = cfg.ssh.as_ref().and_then(|s| advertised(&s.listen)) {
        services.insert("ssh".into(), endpoint(s));
    }
    if let Some(m) = cfg.metrics.as_ref().and_then(|m| advertised(&m.listen)) {
        services.insert("metrics".into(), endpoint(m));
    }
    // Where a VM's rsyslog forwards to: TCP when the receiver has it (no loss on a full
    // socket buffer), else UDP.
    if let Some(s) = &cfg.syslog {
        let (addr, protocol) = match (advertised(&s.tcp), advertised(&s.udp)) {
            (Some(t), _) => (Some(t), "tcp"),
            (None, Some(u)) => (Some(u), "udp"),
            _ => (None, ""),
        };
        if let Some(a) = addr {
            let mut e = endpoint(a);
            e["protocol"] = serde_json::json!(protocol);
            services.insert("syslog".into(), e);
        }
    }
    serde_json::json!({
        "project": cfg.project,
        "zone": cfg.zone.clone().unwrap_or_default(),
        "address": address.map(|a| a.to_string()).unwrap_or_default(),
        "services": services,
        // The single sign-on user CA (`bastide ssh user-ca`), for a VM's TrustedUserCAKeys;
        // empty when the state directory has none yet.
        "ssh_user_ca": std::fs::read_to_string(
            cfg.pki_paths().ssh_user_ca_key.with_extension("pub")
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_default(),
    })
}
