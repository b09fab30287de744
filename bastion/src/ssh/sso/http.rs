//! The HTTPS login endpoint of `[ssh.sso]`, served with the bastion's server certificate
//! (the one agents check against the CA they pin, so `bastide-login` pins it the same way):
//!
//! - `GET /v1/sso` — the login settings: issuer, client id (and secret of a confidential
//!   client), scopes, the bastion's SSH endpoint;
//! - `POST /v1/sso/login` — `{"id_token", "public_key"}` → the signed certificate with the
//!   known_hosts of the bastion and its VMs and the host patterns to jump to (only to a
//!   signed-on admin: the VMs' names and keys are not for anyone who reaches the port), or
//!   403 with the reason (also in the SSH audit log).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Issuer, LoginRequest};
use crate::ssh::Shared;

/// Most HTTPS connections at once on the login endpoint.
const MAX_CONNECTIONS: usize = 256;
/// Largest login request body.
const MAX_BODY: usize = 64 * 1024;

/// The login settings `bastide-login` fetches.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Settings {
    pub project: String,
    pub issuer: String,
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    pub scopes: Vec<String>,
    /// Host and port admins reach the SSH jump host at.
    pub ssh_host: String,
    pub ssh_port: u16,
}

/// What a successful login gets.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LoginAnswer {
    #[serde(flatten)]
    pub issued: super::Issued,
    /// known_hosts lines: the bastion and every enrolled VM.
    pub known_hosts: String,
    /// Host patterns to reach through the bastion (`Host ... ProxyJump`).
    pub jump_patterns: Vec<String>,
}

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    issuer: Arc<Issuer>,
}

#[derive(Serialize)]
struct AuditLine<'a> {
    event: &'static str,
    time: String,
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_before: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn json(status: StatusCode, v: &impl Serialize) -> Response {
    let body = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: StatusCode, msg: &str) -> Response {
    json(status, &serde_json::json!({ "error": msg }))
}

async fn settings(State(app): State<App>) -> Response {
    let cfg = app.shared.config();
    let Some((ssh_host, ssh_port)) = crate::ssh::hosts::public_endpoint(&cfg) else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the [ssh] service is off");
    };
    let client_secret = match app.issuer.cfg.client_secret() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
    };
    let c = &app.issuer.cfg;
    json(
        StatusCode::OK,
        &Settings {
            project: cfg.project.clone(),
            issuer: c.issuer.clone(),
            client_id: c.client_id.clone(),
            client_secret,
            scopes: c.scopes.clone(),
            ssh_host,
            ssh_port,
        },
    )
}

/// known_hosts and jump patterns, for a signed-on admin.
fn hosts_for_admin(app: &App) -> anyhow::Result<(String, Vec<String>)> {
    let cfg = app.shared.config();
    let snap = app.shared.registry.snapshot();
    let known_hosts = crate::ssh::hosts::known_hosts(&cfg, &snap)?;
    let mut patterns: Vec<String> = snap.active().map(|a| a.name.clone()).collect();
    if let Some(z) = cfg.zone.as_deref() {
        patterns.push(format!("*.{}", z.trim_end_matches('.')));
    }
    Ok((known_hosts, patterns))
}

async fn login(
    State(app): State<App>,
    Extension(peer): Extension<SocketAddr>,
    body: Bytes,
) -> Response {
    let source = peer.to_string();
    fn refuse<'a>(
        source: &str,
        peer: SocketAddr,
        reason: &'a str,
        admin: Option<&'a str>,
        sub: Option<&'a str>,
    ) -> AuditLine<'a> {
        metrics::counter!(crate::metrics::names::SSH_SSO_LOGINS_REFUSED).increment(1);
        warn!(source = %peer, admin = ?admin, sub = ?sub, reason = %reason, "ssh: single sign-on refused");
        AuditLine {
            event: "sso-refused",
            time: crate::ssh::audit::now_rfc3339(),
            source: source.to_string(),
            admin,
            sub,
            serial: None,
            groups: None,
            valid_after: None,
            valid_before: None,
            key_id: None,
            reason: Some(reason),
        }
    }
    let req: LoginRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let why = format!("bad request: {e}");
            let line = refuse(&source, peer, &why, None, None);
            app.shared.audit.write_event(&line).await;
            return error(StatusCode::BAD_REQUEST, &why);
        }
    };
    let policy = app.shared.live().policy.clone();
    let now = crate::unix_now().max(0) as u64;
    match app.issuer.login(&req, &policy, peer.ip(), now).await {
        Ok(issued) => {
            let key_id = format!("{} sub={} sso", issued.admin, issued.sub);
            info!(source = %peer, admin = %issued.admin, serial = issued.serial, groups = ?issued.groups, valid_before = issued.valid_before, "ssh: certificate issued after single sign-on");
            app.shared
                .audit
                .write_event(&AuditLine {
                    event: "sso-issued",
                    time: crate::ssh::audit::now_rfc3339(),
                    source: source.clone(),
                    admin: Some(&issued.admin),
                    sub: Some(&issued.sub),
                    serial: Some(issued.serial),
                    groups: Some(&issued.groups),
                    valid_after: Some(issued.valid_after),
                    valid_before: Some(issued.valid_before),
                    key_id: Some(key_id),
                    reason: None,
                })
                .await;
            match hosts_for_admin(&app) {
                Ok((known_hosts, jump_patterns)) => json(
                    StatusCode::OK,
                    &LoginAnswer {
                        issued,
                        known_hosts,
                        jump_patterns,
                    },
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
            }
        }
        Err(r) => {
            let line = refuse(
                &source,
                peer,
                &r.reason,
                r.admin.as_deref(),
                r.sub.as_deref(),
            );
            app.shared.audit.write_event(&line).await;
            error(StatusCode::FORBIDDEN, &r.reason)
        }
    }
}

/// Serves the login endpoint until `shutdown`.
pub(in crate::ssh) async fn run(
    shared: Arc<Shared>,
    issuer: Arc<Issuer>,
    listener: crate::listeners::TcpListeners,
    tls: rustls::ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/v1/sso", get(settings))
        .route("/v1/sso/login", post(login))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(App { shared, issuer });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    info!(listen = ?listener.local_addrs(), "ssh: single sign-on login endpoint listening");
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = crate::listeners::accept(&listener, "sso") => c,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "sso: too many connections");
            continue;
        };
        let svc = TowerToHyperService::new(app.clone().layer(Extension(peer)));
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    Ok(())
}
