//! `[metrics]`: the bastion's Prometheus endpoint. `/metrics` has the bastion's own metrics
//! (the `metrics` facade rendered by metrics-exporter-prometheus, which the services' hot-path
//! atomics are copied into by the collectors they register, plus per-agent liveness and
//! process metrics rendered at scrape time); `/metrics/agents` and `/metrics/agents/<name>`
//! serve the host metrics agents ship over their sessions; `/sd` is Prometheus HTTP service
//! discovery with one target per agent, pointing back at the bastion (the PushProx pattern for
//! hosts behind NAT). Access: client networks allow-list, optional bearer token, optional TLS.

pub mod names;
pub mod render;
pub mod service;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use ipnet::IpNet;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::hostmetrics::HostMetrics;
use crate::registry::Registry;
use names::Collectors;

/// Most concurrent HTTP connections.
const MAX_CONNECTIONS: usize = 256;

/// `[metrics]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Addresses Prometheus scrapes (one string or a list).
    #[serde(deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Client networks allowed to scrape (default: loopback only).
    #[serde(
        default = "default_allow",
        deserialize_with = "bastide_common::tomlcfg::networks"
    )]
    pub allow: Vec<IpNet>,
    /// File holding the bearer token scrapers must send (mode 0600/0640 at most).
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Serve HTTPS with the bastion's server certificate.
    #[serde(default)]
    pub tls: bool,
    /// Time after which an agent's host metrics are dropped if it sends none.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
}

fn default_allow() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn default_stale_after() -> Duration {
    Duration::from_secs(300)
}

impl MetricsConfig {
    /// Problems as "key: reason" (the caller adds the file name).
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(f) = &self.bearer_token_file {
            if let Err(e) = crate::fsutil::check_secret_file(f) {
                p.push(format!("metrics.bearer_token_file: {e:#}"));
            } else if std::fs::read_to_string(f)
                .map(|s| s.trim().is_empty())
                .unwrap_or(true)
            {
                p.push(format!(
                    "metrics.bearer_token_file: {} is empty or unreadable",
                    f.display()
                ));
            }
        }
        if self.stale_after < Duration::from_secs(1) {
            p.push("metrics.stale_after: must be at least 1s".into());
        }
        if self.allow.is_empty() {
            p.push("metrics.allow: empty: nobody could scrape".into());
        }
        p
    }
}

/// Installs the global metrics recorder (once per process) and returns its handle.
pub fn install_recorder() -> Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(names::BUCKETS)
        .context("histogram buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(names::DNS_UPSTREAM_LATENCY.into()),
            &names::DNS_LATENCY_BUCKETS,
        )
        .context("histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    // A second install (tests) keeps the first recorder.
    let _ = metrics::set_global_recorder(recorder);
    names::describe();
    metrics::gauge!(names::BUILD_INFO, "version" => crate::VERSION).set(1.0);
    let _ = HANDLE.set(handle.clone());
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

#[derive(Clone)]
struct AppState {
    registry: Registry,
    collectors: Collectors,
    hosts: HostMetrics,
    handle: PrometheusHandle,
    token: Option<Arc<str>>,
}

/// Serves the metrics endpoint on `listener` until `shutdown`.
pub async fn run(
    cfg: MetricsConfig,
    registry: Registry,
    hosts: HostMetrics,
    collectors: Collectors,
    tls: Option<Arc<rustls::ServerConfig>>,
    listener: crate::listeners::TcpListeners,
    shutdown: CancellationToken,
) -> Result<()> {
    let handle = install_recorder()?;
    let token = match &cfg.bearer_token_file {
        Some(f) => Some(Arc::<str>::from(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim(),
        )),
        None => None,
    };
    let state = AppState {
        registry,
        collectors,
        hosts: hosts.clone(),
        handle,
        token,
    };
    let app = Router::new()
        .route("/metrics", get(self_metrics))
        .route("/metrics/agents", get(all_agents))
        .route("/metrics/agents/{name}", get(one_agent))
        .route("/sd", get(service_discovery))
        .with_state(state);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    info!(listen = ?listener.local_addrs(), tls = acceptor.is_some(), "metrics endpoint listening");
    let mut expire = tokio::time::interval(Duration::from_secs(10));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = expire.tick() => { hosts.expire(); continue; }
            c = crate::listeners::accept(&listener, "metrics") => c,
        };
        if !allowed(&cfg.allow, peer.ip()) {
            metrics::counter!(names::SCRAPE_DENIED, "reason" => "network").increment(1);
            debug!(%peer, "metrics: client network not allowed");
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "metrics: too many connections");
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                Some(a) => match tokio::time::timeout(Duration::from_secs(10), a.accept(tcp)).await
                {
                    Ok(Ok(tls)) => {
                        let conn = builder.serve_connection(TokioIo::new(tls), svc);
                        serve_until(conn, &shutdown).await
                    }
                    _ => return,
                },
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    serve_until(conn, &shutdown).await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "metrics: connection error");
            }
        });
    }
    Ok(())
}

async fn serve_until<F, E>(conn: F, shutdown: &CancellationToken) -> Result<(), E>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    tokio::select! {
        r = conn => r,
        _ = shutdown.cancelled() => Ok(()),
    }
}

fn allowed(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// Checks the bearer token, if one is configured: the refusal to send, if any.
fn denied(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(want) = &state.token else {
        return None;
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // Prometheus 2.42's http_sd sends the credentials without the "Bearer" type when
        // none is configured; the secret is what matters.
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v))
        .unwrap_or("");
    if crate::registry::ct_eq(got.trim().as_bytes(), want.as_bytes()) {
        None
    } else {
        metrics::counter!(names::SCRAPE_DENIED, "reason" => "token").increment(1);
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"bastide\"")],
                "401 Unauthorized: a valid bearer token is required\n",
            )
                .into_response(),
        )
    }
}

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, TEXT)], body).into_response()
}

async fn self_metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = denied(&s, &headers) {
        return r;
    }
    let start = Instant::now();
    // The services that are on copy their atomics into the recorder first, so one render
    // holds every facade series.
    s.collectors.update();
    let mut body = s.handle.render();
    render::agents(&s.registry, &mut body);
    s.collectors.render_text(&mut body);
    render::process(&mut body);
    render::allocator(&mut body);
    metrics::histogram!(names::SCRAPE_DURATION, "path" => "/metrics")
        .record(start.elapsed().as_secs_f64());
    text(body)
}

async fn all_agents(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = denied(&s, &headers) {
        return r;
    }
    let start = Instant::now();
    let hosts = s.hosts.clone();
    let body = tokio::task::spawn_blocking(move || hosts.render_all())
        .await
        .unwrap_or_default();
    metrics::histogram!(names::SCRAPE_DURATION, "path" => "/metrics/agents")
        .record(start.elapsed().as_secs_f64());
    text(body)
}

async fn one_agent(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = denied(&s, &headers) {
        return r;
    }
    let start = Instant::now();
    let online = s
        .registry
        .snapshot()
        .agents
        .get(&name)
        .map(|a| !a.revoked && a.online);
    let resp = match (online, s.hosts.render_agent(&name)) {
        (None, _) => (StatusCode::NOT_FOUND, "unknown agent\n").into_response(),
        // The VM's own `up` follows its session: no session, no fresh data.
        (Some(false), _) => (StatusCode::SERVICE_UNAVAILABLE, "agent offline\n").into_response(),
        (Some(true), Some(body)) => text(body),
        (Some(true), None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no host metrics received yet\n",
        )
            .into_response(),
    };
    metrics::histogram!(names::SCRAPE_DURATION, "path" => "/metrics/agents/{name}")
        .record(start.elapsed().as_secs_f64());
    resp
}

/// Prometheus label names from enrollment labels: [A-Za-z0-9._-] becomes [A-Za-z0-9_].
fn prom_label(k: &str) -> Option<String> {
    let s: String = k
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let reserved = ["instance", "job", "agent", "project"];
    (crate::hostmetrics::valid_label_name(&s) && !reserved.contains(&s.as_str())).then_some(s)
}

async fn service_discovery(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = denied(&s, &headers) {
        return r;
    }
    // The target is the bastion as the scraper reached it.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    let project = s.registry.ca().project.clone();
    let snap = s.registry.snapshot();
    // Several bastions: each lists the agents whose session it holds, and the leader the
    // ones without a session, so one Prometheus job over all nodes has each VM once.
    let cluster = s.registry.cluster();
    let (clustered, leader) = (cluster.clustered(), cluster.is_leader());
    let groups: Vec<serde_json::Value> = snap
        .active()
        .filter(|a| !clustered || a.here || (!a.online && leader))
        .map(|a| {
            let mut labels = serde_json::Map::new();
            for (k, v) in &a.labels {
                if let Some(k) = prom_label(k) {
                    labels.insert(k, v.clone().into());
                }
            }
            labels.insert(
                "__metrics_path__".into(),
                format!("/metrics/agents/{}", a.name).into(),
            );
            labels.insert("instance".into(), a.name.clone().into());
            labels.insert("agent".into(), a.name.clone().into());
            labels.insert("project".into(), project.clone().into());
            serde_json::json!({ "targets": [host], "labels": labels })
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Array(groups).to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_labels() {
        let nets = default_allow();
        assert!(allowed(&nets, "127.0.0.1".parse().unwrap()));
        assert!(allowed(&nets, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allowed(&nets, "10.0.0.1".parse().unwrap()));
        assert_eq!(prom_label("role"), Some("role".into()));
        assert_eq!(
            prom_label("app.kubernetes-io"),
            Some("app_kubernetes_io".into())
        );
        assert_eq!(prom_label("instance"), None);
        assert_eq!(prom_label("9x"), None);
    }
}
