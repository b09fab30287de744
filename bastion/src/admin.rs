//! The admin API: JSON lines over a Unix socket (mode 0600 or 0660, never a TCP port), so
//! that CLI commands act on the running daemon at once. One request and one response per
//! connection.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AdminConfig;
use crate::registry::{Registry, TokenSpec};

const MAX_REQUEST: usize = 64 * 1024;
const MAX_CLIENTS: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from the CLI.
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
    MailQueue,
    MailFlush,
    MailRetry {
        id: String,
    },
    MailDelete {
        id: String,
    },
    /// known_hosts for the bastion and every enrolled VM.
    SshKnownHosts,
    /// A ~/.ssh/config snippet.
    SshConfig {
        user: Option<String>,
        known_hosts: String,
    },
    /// Reload the configuration file (as SIGHUP).
    Reload,
    /// One-screen summary of the running daemon.
    Status,
    /// `bastide logs`: the answer is streamed, one `{"line": ...}` per event, then the
    /// usual response line.
    Logs(crate::logs::query::LogsQuery),
    /// Effective variables and files of one agent, from the tree on disk.
    ConfigRender {
        agent: String,
    },
    /// Validate the tree and render every agent, changing nothing.
    ConfigCheck,
    /// Reload the tree now and push what changed.
    ConfigReload,
}

/// A reload asked through the socket, answered with its outcome.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<(), String>>;

/// What admin requests act on: the registry, the running configuration, and the handles of
/// the services that are on.
#[derive(Clone)]
pub struct AdminCtx {
    pub registry: Registry,
    pub mail: Option<crate::smtp::MailHandle>,
    /// The running configuration.
    pub config: Option<tokio::sync::watch::Receiver<Arc<crate::config::Config>>>,
    /// Where reloads are asked (the daemon's main loop).
    pub reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
    /// The log store, when `[logs]` is on.
    pub logs: Option<crate::logs::Logs>,
    /// The configuration push service, when `[config_push]` is on.
    pub config_push: Option<crate::config_push::ConfigPushHandle>,
}

impl AdminCtx {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            mail: None,
            config: None,
            reload: None,
            logs: None,
            config_push: None,
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

/// Serves admin requests until `shutdown`.
pub async fn run(
    ctx: AdminCtx,
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
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_one(stream, ctx).await {
                warn!(error = %format!("{e:#}"), "admin: request failed");
            }
        });
    }
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

async fn serve_one(stream: UnixStream, ctx: AdminCtx) -> Result<()> {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(rd).take(MAX_REQUEST as u64);
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("timed out reading request")??;
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(AdminRequest::Logs(q)) => {
            metrics::counter!(crate::metrics::names::ADMIN_REQUESTS, "result" => "ok").increment(1);
            return logs_stream(q, ctx.logs, reader.into_inner().into_inner(), wr).await;
        }
        Ok(req) => {
            let summary = format!("{req:?}");
            let r = handle(req, ctx).await;
            let outcome = if r.is_ok() { "ok" } else { "error" };
            metrics::counter!(crate::metrics::names::ADMIN_REQUESTS, "result" => outcome)
                .increment(1);
            if let Err(e) = &r {
                info!(uid = ?uid, request = %summary, error = %e, "admin request refused");
            }
            match r {
                Ok(result) => AdminResponse {
                    ok: true,
                    result,
                    error: None,
                },
                Err(e) => AdminResponse {
                    ok: false,
                    result: serde_json::Value::Null,
                    error: Some(format!("{e:#}")),
                },
            }
        }
        Err(e) => AdminResponse {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(format!("malformed request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    tokio::time::timeout(IO_TIMEOUT, wr.write_all(&out))
        .await
        .context("timed out writing response")??;
    Ok(())
}

async fn handle(req: AdminRequest, ctx: AdminCtx) -> Result<serde_json::Value> {
    if let AdminRequest::Reload = req {
        let Some(tx) = ctx.reload else {
            bail!("reload is not available");
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        tx.send(done).await.context("the daemon is shutting down")?;
        return match outcome.await.context("the daemon is shutting down")? {
            Ok(()) => Ok(serde_json::Value::Null),
            Err(e) => Err(anyhow::anyhow!(e)),
        };
    }
    if let AdminRequest::ConfigReload = req {
        let Some(cp) = ctx.config_push else {
            bail!("configuration push is off (no [config_push] table)");
        };
        let s = cp.reload().await?;
        if !s.errors.is_empty() {
            bail!(
                "the tree was refused, the last good one stays:\n{}",
                s.errors.join("\n")
            );
        }
        return Ok(serde_json::to_value(s)?);
    }
    let AdminCtx {
        registry,
        mail,
        config,
        logs,
        config_push,
        ..
    } = ctx;
    let cfg = config.map(|c| c.borrow().clone());
    tokio::task::spawn_blocking(move || -> Result<serde_json::Value> {
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
            AdminRequest::MailQueue
            | AdminRequest::MailFlush
            | AdminRequest::MailRetry { .. }
            | AdminRequest::MailDelete { .. } => {
                let Some(mail) = mail else {
                    bail!("the smtp relay is off (no [smtp] table)");
                };
                crate::smtp::admin(&mail, req)?
            }
            AdminRequest::SshKnownHosts => {
                serde_json::Value::String(crate::ssh::hosts::known_hosts(
                    cfg.as_deref().context("no configuration")?,
                    &registry.snapshot(),
                )?)
            }
            AdminRequest::SshConfig { user, known_hosts } => {
                serde_json::Value::String(crate::ssh::hosts::ssh_config(
                    cfg.as_deref().context("no configuration")?,
                    &registry.snapshot(),
                    user.as_deref(),
                    &known_hosts,
                )?)
            }
            AdminRequest::Reload => serde_json::Value::Null,
            AdminRequest::Status => {
                let mut v = status(&registry, mail.as_ref(), cfg.as_deref())?;
                v["logs"] = logs
                    .as_ref()
                    .map_or(serde_json::Value::Null, |l| l.status());
                v
            }
            // Answered by `logs_stream` before reaching here.
            AdminRequest::Logs(_) => serde_json::Value::Null,
            AdminRequest::ConfigRender { .. } | AdminRequest::ConfigCheck => {
                let Some(cp) = config_push else {
                    bail!("configuration push is off (no [config_push] table)");
                };
                match req {
                    AdminRequest::ConfigRender { agent } => match cp.render_view(&agent) {
                        Ok(v) => serde_json::to_value(v)?,
                        Err(e) => bail!("{}", e.join("\n")),
                    },
                    _ => serde_json::to_value(cp.check())?,
                }
            }
            AdminRequest::ConfigReload => serde_json::Value::Null,
        })
    })
    .await
    .context("admin task")?
}

/// Connects to the daemon and sends one request line; the answer is read from the result.
async fn send_request(
    socket: &Path,
    req: &AdminRequest,
) -> Result<(
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
)> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the bastide daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    // The caller keeps the write half open until it has read the answer: dropping it sends
    // EOF, which the daemon may take for a client gone away.
    Ok((BufReader::new(rd), wr))
}

/// Sends one request to the daemon and returns its result, or its error as an `Err`.
pub async fn call(socket: &Path, req: &AdminRequest) -> Result<serde_json::Value> {
    let fut = async {
        let (mut reader, _wr) = send_request(socket, req).await?;
        let mut resp = String::new();
        reader.read_line(&mut resp).await?;
        if resp.is_empty() {
            bail!("the daemon closed the connection without answering");
        }
        let resp: AdminResponse =
            serde_json::from_str(&resp).context("malformed answer from the daemon")?;
        if resp.ok {
            Ok(resp.result)
        } else {
            bail!("{}", resp.error.unwrap_or_else(|| "request failed".into()))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("the daemon did not answer within 5s")?
}

/// Certificates expiring within this are listed by `bastide status`.
const EXPIRY_WARNING_SECS: i64 = 24 * 3600;

/// The summary behind `bastide status`.
fn status(
    registry: &Registry,
    mail: Option<&crate::smtp::MailHandle>,
    cfg: Option<&crate::config::Config>,
) -> Result<serde_json::Value> {
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
        })
    });
    let pki = cfg.map(|c| c.pki_paths());
    let mail = mail.map(|m| {
        let (queued, oldest) = m.queue.gauges();
        serde_json::json!({ "queued": queued, "oldest_age_secs": oldest })
    });
    Ok(serde_json::json!({
        "version": crate::VERSION,
        "project": registry.ca().project,
        "services": services,
        "agents": { "online": online, "offline": offline, "revoked": revoked },
        "mail": mail,
        "certificates": {
            "ca_not_after": pki.as_ref().and_then(|p| expiry(&p.ca_cert)),
            "server_not_after": pki.as_ref().and_then(|p| expiry(&p.server_cert)),
            "offline_agents_expiring": expiring,
        },
    }))
}

/// Streams `bastide logs`: matching stored lines, then (with `follow`) live ones until the
/// client goes away. Each event is one `{"line": "..."}` line; the last line is the usual
/// response.
async fn logs_stream(
    q: crate::logs::query::LogsQuery,
    logs: Option<crate::logs::Logs>,
    mut rd: tokio::net::unix::OwnedReadHalf,
    mut wr: tokio::net::unix::OwnedWriteHalf,
) -> Result<()> {
    use crate::logs::query::{scan, Filter};
    async fn send(wr: &mut tokio::net::unix::OwnedWriteHalf, v: &serde_json::Value) -> Result<()> {
        let mut out = serde_json::to_vec(v)?;
        out.push(b'\n');
        wr.write_all(&out).await?;
        Ok(())
    }
    let end = |r: Result<u64>| match r {
        Ok(n) => serde_json::to_value(AdminResponse {
            ok: true,
            result: serde_json::json!({ "events": n }),
            error: None,
        }),
        Err(e) => serde_json::to_value(AdminResponse {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(format!("{e:#}")),
        }),
    };
    let Some(logs) = logs else {
        let v = end(Err(anyhow::anyhow!(
            "the log store is off (no [logs] table)"
        )))?;
        return send(&mut wr, &v).await;
    };
    let filter = match Filter::new(&q) {
        Ok(f) => Arc::new(f),
        Err(e) => return send(&mut wr, &end(Err(e))?).await,
    };
    // Subscribe before reading the files: a line committed meanwhile is shown (at worst
    // twice), never missed.
    let mut live = q.follow.then(|| logs.store.subscribe());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
    let dir = logs.store.dir().to_path_buf();
    let f2 = filter.clone();
    let scanner = tokio::task::spawn_blocking(move || {
        scan(&dir, &f2, &mut |line| tx.blocking_send(line).is_ok())
    });
    let mut n = 0u64;
    while let Some(line) = rx.recv().await {
        if send(&mut wr, &serde_json::json!({ "line": line }))
            .await
            .is_err()
        {
            return Ok(());
        }
        n += 1;
    }
    let scanned = scanner.await.context("log scan task")?;
    if let Err(e) = scanned {
        return send(&mut wr, &end(Err(e))?).await;
    }
    if let Some(live) = live.as_mut() {
        let mut probe = [0u8; 64];
        loop {
            tokio::select! {
                // The client closing its end stops the stream.
                r = rd.read(&mut probe) => if matches!(r, Ok(0) | Err(_)) { return Ok(()); },
                g = live.recv() => match g {
                    Ok(chunks) => {
                        for c in chunks.iter() {
                            for line in String::from_utf8_lossy(&c.data).lines() {
                                if filter.line_ok(line).is_some() {
                                    if send(&mut wr, &serde_json::json!({ "line": line })).await.is_err() {
                                        return Ok(());
                                    }
                                    n += 1;
                                }
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                        let note = format!("(bastide: {k} groups of lines skipped: the output was too slow)");
                        if send(&mut wr, &serde_json::json!({ "notice": note })).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(_) => break,
                },
            }
        }
    }
    send(&mut wr, &end(Ok(n))?).await
}

/// Sends a streaming request (`Logs`): calls `each` with every event line's JSON, returns
/// the final result.
pub async fn call_stream(
    socket: &Path,
    req: &AdminRequest,
    mut each: impl FnMut(serde_json::Value) -> Result<()>,
) -> Result<serde_json::Value> {
    let (mut reader, _wr) = send_request(socket, req).await?;
    loop {
        let mut resp = String::new();
        if reader.read_line(&mut resp).await? == 0 {
            bail!("the daemon closed the connection without answering");
        }
        let v: serde_json::Value =
            serde_json::from_str(&resp).context("malformed answer from the daemon")?;
        if v.get("ok").is_some() {
            let resp: AdminResponse = serde_json::from_value(v)?;
            return if resp.ok {
                Ok(resp.result)
            } else {
                bail!("{}", resp.error.unwrap_or_else(|| "request failed".into()))
            };
        }
        each(v)?;
    }
}
