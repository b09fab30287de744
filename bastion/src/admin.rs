//! The admin API: JSON lines over a Unix socket (mode 0600 or 0660, never a TCP port), so
//! that CLI commands act on the running daemon at once. One request and one response per
//! connection. The socket dispatches each request on its `cmd` to the handler a service
//! registered (`control::AdminHandlers`); it answers only the registry's commands itself.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AdminConfig, Config};
use crate::control::{send_line, AdminHandlers, AdminResponse, Handler};
use crate::registry::{Registry, TokenSpec};
use crate::service::{Ctx, Service};

const MAX_REQUEST: usize = 64 * 1024;
const MAX_CLIENTS: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The commands the admin socket answers itself: the registry's tokens and agents, reloads
/// and the status summary. Services register theirs in [`AdminHandlers`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Ping,
    TokenCreate(TokenSpec),
    TokenList,
    TokenRevoke {
        id: String,
    },
    AgentsList,
    AgentsRevoke {
        name: String,
    },
    /// Reload the configuration file (as SIGHUP).
    Reload,
    /// One-screen summary of the running daemon.
    Status,
}

const COMMANDS: &[&str] = &[
    "ping",
    "token_create",
    "token_list",
    "token_revoke",
    "agents_list",
    "agents_revoke",
    "reload",
    "status",
];

/// The admin socket, bound.
pub struct Admin {
    listener: UnixListener,
    path: PathBuf,
}

impl Service for Admin {
    const NAME: &'static str = "admin";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        let Some(a) = &cfg.admin else {
            return Ok(None);
        };
        let listener =
            bind(a).with_context(|| format!("{}: admin.socket", cfg.source.display()))?;
        register(ctx);
        Ok(Some(Self {
            listener,
            path: a.socket.clone(),
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        run(ctx.admin, self.listener, self.path, shutdown).await
    }
}

/// Registers the socket's own commands.
fn register(ctx: &Ctx) {
    let (registry, config, admin) = (ctx.registry.clone(), ctx.config.clone(), ctx.admin.clone());
    let reload = ctx.reload.clone();
    ctx.admin.call(COMMANDS, move |req: AdminRequest| {
        let (registry, config, admin, reload) = (
            registry.clone(),
            config.clone(),
            admin.clone(),
            reload.clone(),
        );
        async move {
            if let AdminRequest::Reload = req {
                let (done, outcome) = tokio::sync::oneshot::channel();
                reload
                    .send(done)
                    .await
                    .context("the daemon is shutting down")?;
                return match outcome.await.context("the daemon is shutting down")? {
                    Ok(()) => Ok(serde_json::Value::Null),
                    Err(e) => Err(anyhow::anyhow!(e)),
                };
            }
            let cfg = config.borrow().clone();
            tokio::task::spawn_blocking(move || handle(req, &registry, &cfg, &admin))
                .await
                .context("admin task")?
        }
    });
}

/// Binds the admin socket with its final mode before it becomes visible: bound under a
/// temporary name, chmod-ed, then renamed into place. A live daemon already on the path is
/// an error; a stale socket file is replaced.
pub fn bind(cfg: &AdminConfig) -> Result<UnixListener> {
    let path = &cfg.socket;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "admin socket {} is in use: is another bastide running?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(cfg.mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("moving socket to {}", path.display()))?;
    Ok(listener)
}

/// Serves admin requests until `shutdown`, each by the handler registered for its `cmd`.
pub async fn run(
    handlers: AdminHandlers,
    listener: UnixListener,
    socket_path: PathBuf,
    shutdown: CancellationToken,
) -> Result<()> {
    info!(socket = %socket_path.display(), "admin socket listening");
    let limit = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!("admin: too many clients");
            continue;
        };
        let handlers = handlers.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_one(stream, handlers).await {
                warn!(error = %format!("{e:#}"), "admin: request failed");
            }
        });
    }
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// The command of a request line, and the request as JSON.
fn command(line: &str) -> Result<(String, serde_json::Value), String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
    let cmd = v
        .get("cmd")
        .and_then(|c| c.as_str())
        .ok_or("malformed request: no \"cmd\"")?
        .to_string();
    Ok((cmd, v))
}

async fn serve_one(stream: UnixStream, handlers: AdminHandlers) -> Result<()> {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(rd).take(MAX_REQUEST as u64);
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("timed out reading request")??;
    let (cmd, req) = match command(&line) {
        Ok(c) => c,
        Err(e) => {
            return respond(&mut wr, AdminResponse::from_result(Err(anyhow::anyhow!(e)))).await
        }
    };
    let response = match handlers.get(&cmd) {
        None => AdminResponse::from_result(Err(anyhow::anyhow!(
            "malformed request: unknown command {cmd:?}"
        ))),
        Some(Handler::Stream(h)) => {
            metrics::counter!(crate::metrics::names::ADMIN_REQUESTS, "result" => "ok").increment(1);
            return h(req, reader.into_inner().into_inner(), wr).await;
        }
        Some(Handler::Call(h)) => {
            let summary = req.to_string();
            let r = h(req).await;
            let outcome = if r.is_ok() { "ok" } else { "error" };
            metrics::counter!(crate::metrics::names::ADMIN_REQUESTS, "result" => outcome)
                .increment(1);
            if let Err(e) = &r {
                info!(uid = ?uid, request = %summary, error = %e, "admin request refused");
            }
            AdminResponse::from_result(r)
        }
    };
    respond(&mut wr, response).await
}

async fn respond(wr: &mut tokio::net::unix::OwnedWriteHalf, r: AdminResponse) -> Result<()> {
    tokio::time::timeout(IO_TIMEOUT, send_line(wr, &r))
        .await
        .context("timed out writing response")?
}

fn handle(
    req: AdminRequest,
    registry: &Registry,
    cfg: &Config,
    admin: &AdminHandlers,
) -> Result<serde_json::Value> {
    Ok(match req {
        AdminRequest::Ping => serde_json::json!({ "version": crate::VERSION }),
        AdminRequest::TokenCreate(spec) => serde_json::to_value(registry.create_token(&spec)?)?,
        AdminRequest::TokenList => serde_json::to_value(registry.list_tokens()?)?,
        AdminRequest::TokenRevoke { id } => {
            registry.revoke_token(&id)?;
            serde_json::Value::Null
        }
        AdminRequest::AgentsList => serde_json::to_value(registry.list_agents())?,
        AdminRequest::AgentsRevoke { name } => {
            registry.revoke_agent(&name)?;
            serde_json::Value::Null
        }
        // Answered before reaching here.
        AdminRequest::Reload => serde_json::Value::Null,
        AdminRequest::Status => {
            let mut v = status(registry, cfg)?;
            v["logs"] = serde_json::Value::Null;
            for (k, part) in admin.statuses() {
                v[k] = part;
            }
            v
        }
    })
}

/// Certificates expiring within this are listed by `bastide status`.
const EXPIRY_WARNING_SECS: i64 = 24 * 3600;

/// The summary behind `bastide status`.
fn status(registry: &Registry, cfg: &Config) -> Result<serde_json::Value> {
    let cfg = Some(cfg);
    let now = crate::unix_now();
    let snap = registry.snapshot();
    let (mut online, mut offline, mut revoked) = (0, 0, 0);
    let mut expiring = Vec::new();
    for a in snap.agents.values() {
        match (a.revoked, a.online) {
            (true, _) => revoked += 1,
            (false, true) => online += 1,
            (false, false) => offline += 1,
        }
        // Online agents renew on their own; an offline one past expiry must re-enroll.
        if !a.revoked && !a.online && a.cert_not_after - now < EXPIRY_WARNING_SECS {
            expiring.push(serde_json::json!({ "name": a.name, "not_after": a.cert_not_after }));
        }
    }
    let expiry = |path: &Path| -> Option<i64> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let der = crate::pki::read_cert_pem(path).ok()?;
        let (_, c) = X509Certificate::from_der(&der).ok()?;
        Some(c.validity().not_after.timestamp())
    };
    let services = cfg.map(|c| {
        serde_json::json!({
            "agents": c.agents.is_some(),
            "admin": c.admin.is_some(),
            "metrics": c.metrics.is_some(),
            "dns": c.dns.is_some(),
            "smtp": c.smtp.is_some(),
            "ssh": c.ssh.is_some(),
            "logs": c.logs.is_some(),
            "syslog": c.syslog.is_some(),
            "config_push": c.config_push.is_some(),
        })
    });
    // Where each service listens, as configured (`listen` lists; syslog per protocol).
    let listen = cfg.map(|c| {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, l: Option<&Vec<std::net::SocketAddr>>| {
            if let Some(l) = l.filter(|l| !l.is_empty()) {
                let l: Vec<String> = l.iter().map(|a| a.to_string()).collect();
                m.insert(k.into(), l.into());
            }
        };
        put("agents", c.agents.as_ref().map(|a| &a.listen));
        put("metrics", c.metrics.as_ref().map(|x| &x.listen));
        put("dns", c.dns.as_ref().map(|x| &x.listen));
        put("smtp", c.smtp.as_ref().map(|x| &x.listen));
        put("ssh", c.ssh.as_ref().map(|x| &x.listen));
        put("syslog.udp", c.syslog.as_ref().map(|x| &x.udp));
        put("syslog.tcp", c.syslog.as_ref().map(|x| &x.tcp));
        put("syslog.tls", c.syslog.as_ref().map(|x| &x.tls));
        m
    });
    let pki = cfg.map(|c| c.pki_paths());
    Ok(serde_json::json!({
        "version": crate::VERSION,
        "project": registry.ca().project,
        "services": services,
        "listen": listen,
        "agents": { "online": online, "offline": offline, "revoked": revoked },
        // Filled by the services that are on (`AdminHandlers::status`).
        "mail": null,
        "certificates": {
            "ca_not_after": pki.as_ref().and_then(|p| expiry(&p.ca_cert)),
            "server_not_after": pki.as_ref().and_then(|p| expiry(&p.server_cert)),
            "offline_agents_expiring": expiring,
        },
    }))
}
