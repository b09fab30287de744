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

/// The admin commands of single sign-on certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum SshCertsRequest {
    /// Every recorded certificate (the caller filters live ones).
    SshCertsList,
    /// Revokes by serial or by admin and cuts their connections.
    SshCertsRevoke {
        serial: Option<i64>,
        admin: Option<String>,
    },
}

const CERT_COMMANDS: &[&str] = &["ssh_certs_list", "ssh_certs_revoke"];

/// The SSH jump listener (and the single sign-on login endpoint), bound.
pub struct Ssh {
    listener: TcpListeners,
    sso: Option<TcpListeners>,
    issued: super::issued::IssuedCerts,
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
            ctx.admin.off(CERT_COMMANDS, "the [ssh] service is off");
            return Ok(None);
        };
        let issued = super::issued::IssuedCerts::new(ctx.registry.clone());
        let certs = issued.clone();
        let audit_path = s.audit_log_path(&cfg.state_dir);
        ctx.admin.call(CERT_COMMANDS, move |req: SshCertsRequest| {
            let (certs, audit_path) = (certs.clone(), audit_path.clone());
            async move {
                match req {
                    SshCertsRequest::SshCertsList => Ok(serde_json::to_value(certs.list().await?)?),
                    SshCertsRequest::SshCertsRevoke { serial, admin } => {
                        if serial.is_none() && admin.is_none() {
                            anyhow::bail!("name a serial or an admin");
                        }
                        let r = certs.revoke(serial, admin.clone()).await?;
                        tracing::info!(serial = ?serial, admin = ?admin, revoked = ?r.serials, connections_cut = r.connections_cut, "ssh: certificates revoked");
                        // An audit line per revocation, next to the issue lines.
                        let line = serde_json::json!({
                            "event": "sso-revoked",
                            "time": super::audit::now_rfc3339(),
                            "serials": r.serials,
                            "admin": admin,
                            "connections_cut": r.connections_cut,
                        });
                        append_audit(&audit_path, &line).await;
                        Ok(serde_json::to_value(r)?)
                    }
                }
            }
        });
        ctx.collectors.register(collect);
        let listener = TcpListeners::bind(&s.listen, "ssh.listen", &cfg.source).await?;
        let sso = match &s.sso {
            Some(sso) => {
                Some(TcpListeners::bind(&sso.listen, "ssh.sso.listen", &cfg.source).await?)
            }
            None => None,
        };
        Ok(Some(Self {
            listener,
            sso,
            issued,
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        tokio::spawn(self.issued.clone().cut_on_events(shutdown.clone()));
        super::run(
            ctx.config,
            ctx.registry,
            self.listener,
            self.sso,
            self.issued,
            shutdown,
        )
        .await
    }
}

/// Copies the SSH counters into the recorder (before each scrape).
pub(crate) fn collect() {
    for (name, v) in super::counters().export() {
        names::export(name, Vec::new(), v);
    }
}

/// Appends one line to the SSH audit log from the admin socket's side (the file is opened
/// `O_APPEND`, so lines from both writers never interleave).
async fn append_audit(path: &std::path::Path, v: &serde_json::Value) {
    match super::audit::Audit::open(path, true) {
        Ok(a) => a.write_event(v).await,
        Err(e) => tracing::error!(error = %format!("{e:#}"), "audit: record lost"),
    }
}
