//! `bastide serve`: binds every configured listener first (so nothing starts half-configured),
//! then runs each service in a `JoinSet` under one root cancellation token. SIGTERM or SIGINT
//! cancels everything and waits for a graceful end; a second signal forces exit; SIGHUP
//! reloads what can change without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::pki::AgentCa;
use crate::registry::{Registry, RegistrySettings};
use crate::store::Store;

/// How long services get to finish after shutdown is asked.
const GRACE: Duration = Duration::from_secs(10);
/// How often last-seen times are written to the store.
const FLUSH_EVERY: Duration = Duration::from_secs(60);

fn settings(cfg: &Config) -> RegistrySettings {
    RegistrySettings {
        cert_lifetime: cfg
            .agents
            .as_ref()
            .map(|a| a.cert_lifetime)
            .unwrap_or(Duration::from_secs(24 * 3600)),
        addresses: cfg.address_policy(),
    }
}

/// Opens the registry of a validated configuration.
pub fn open_registry(cfg: &Config) -> Result<Registry> {
    let store = Store::open(&cfg.store_path())?;
    let ca = AgentCa::load(&cfg.pki_paths(), &cfg.project, cfg.zone.as_deref())?;
    Ok(Registry::open(store, ca, settings(cfg))?)
}

/// Runs the daemon until a signal or a service failure.
pub async fn serve(cfg: Config) -> Result<()> {
    crate::tls::install_crypto_provider();
    crate::metrics::install_recorder()?;
    let registry = open_registry(&cfg)?;
    let hosts = crate::hostmetrics::HostMetrics::new(
        cfg.metrics
            .as_ref()
            .map(|m| m.stale_after)
            .unwrap_or(Duration::from_secs(300)),
    );

    // Bind everything before starting anything.
    let agents = match &cfg.agents {
        Some(a) => {
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .with_context(|| {
                    format!(
                        "{}: agents.listen: cannot bind {}",
                        cfg.source.display(),
                        a.listen
                    )
                })?;
            let tls = Arc::new(crate::tls::server_config(&cfg.pki_paths(), &registry)?);
            Some((a.clone(), listener, tls))
        }
        None => None,
    };
    let metrics = match &cfg.metrics {
        Some(m) => {
            let listener = tokio::net::TcpListener::bind(m.listen)
                .await
                .with_context(|| {
                    format!(
                        "{}: metrics.listen: cannot bind {}",
                        cfg.source.display(),
                        m.listen
                    )
                })?;
            let tls = if m.tls {
                Some(Arc::new(crate::tls::https_config(&cfg.pki_paths())?))
            } else {
                None
            };
            Some((m.clone(), listener, tls))
        }
        None => None,
    };
    let smtp = match &cfg.smtp {
        Some(s) => {
            let listener = tokio::net::TcpListener::bind(s.listen)
                .await
                .with_context(|| {
                    format!(
                        "{}: smtp.listen: cannot bind {}",
                        cfg.source.display(),
                        s.listen
                    )
                })?;
            let svc = crate::smtp::Smtp::open(s.clone(), &cfg, registry.clone())
                .with_context(|| format!("{}: smtp", cfg.source.display()))?;
            Some((svc, listener))
        }
        None => None,
    };
    let ssh = match &cfg.ssh {
        Some(s) => Some(
            tokio::net::TcpListener::bind(s.listen)
                .await
                .with_context(|| {
                    format!(
                        "{}: ssh.listen: cannot bind {}",
                        cfg.source.display(),
                        s.listen
                    )
                })?,
        ),
        None => None,
    };
    let admin = match &cfg.admin {
        Some(a) => Some((
            crate::admin::bind(a)
                .with_context(|| format!("{}: admin.socket", cfg.source.display()))?,
            a.socket.clone(),
        )),
        None => None,
    };

    let dns = match &cfg.dns {
        Some(d) => Some((
            d.clone(),
            crate::dns::bind(d)
                .await
                .with_context(|| format!("{}: dns.listen", cfg.source.display()))?,
        )),
        None => None,
    };
    // The log store is opened (and recovered) before anything can write to it.
    let logs = match &cfg.logs {
        Some(l) => Some(
            crate::logs::Logs::open(l.clone(), &cfg.state_dir)
                .with_context(|| format!("{}: logs", cfg.source.display()))?,
        ),
        None => None,
    };
    let syslog = match (&cfg.syslog, &logs) {
        (Some(s), Some(_)) => {
            let sockets = crate::syslog::bind(s)
                .await
                .with_context(|| format!("{}: syslog", cfg.source.display()))?;
            let tls = if s.tls.is_empty() {
                None
            } else {
                // RFC 5425: the bastion's server certificate, no client certificates.
                let mut t = crate::tls::https_config(&cfg.pki_paths())?;
                t.alpn_protocols.clear();
                Some(Arc::new(t))
            };
            Some((s.clone(), sockets, tls))
        }
        _ => None,
    };
    // The running configuration: services that can reload watch it, the admin socket reads it.
    let (current, _) = watch::channel(Arc::new(cfg.clone()));
    let (reload_tx, mut reload_rx) = mpsc::channel::<crate::admin::ReloadRequest>(4);

    let root = CancellationToken::new();
    let mut set: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
    let config_push = cfg.config_push.as_ref().map(|c| {
        crate::config_push::ConfigPushHandle::new(
            c.clone(),
            &cfg.project,
            cfg.zone.clone(),
            crate::config_push::bastion_vars(&cfg),
            registry.clone(),
        )
    });
    if let Some(cp) = config_push.clone() {
        let t = root.child_token();
        set.spawn(async move { ("config_push", crate::config_push::run(cp, t).await) });
    }
    if let Some((acfg, listener, tls)) = agents {
        let (r, t, h) = (registry.clone(), root.child_token(), hosts.clone());
        let peers = crate::agents::Peers {
            hosts: h,
            logs: logs.clone(),
            config_push: config_push.clone(),
        };
        set.spawn(async move {
            (
                "agents",
                crate::agents::run(acfg, r, peers, tls, listener, t).await,
            )
        });
    }
    if let Some((mcfg, listener, tls)) = metrics {
        let (r, t, h) = (registry.clone(), root.child_token(), hosts.clone());
        let m = crate::metrics::Services {
            mail: smtp.as_ref().map(|(svc, _)| svc.handle()),
            dns: cfg.dns.is_some(),
            ssh: cfg.ssh.is_some(),
            logs: logs.is_some(),
        };
        set.spawn(async move {
            (
                "metrics",
                crate::metrics::run(mcfg, r, h, m, tls, listener, t).await,
            )
        });
    }
    {
        // A revoked agent's host metrics go at once, not after they turn stale.
        let (mut events, t, h) = (registry.events(), root.child_token(), hosts.clone());
        set.spawn(async move {
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    ev = events.recv() => match ev {
                        Ok(crate::registry::RegistryEvent::Revoked(name)) => h.remove(&name),
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    },
                }
            }
            ("hostmetrics", Ok(()))
        });
    }
    if let Some((dcfg, sockets)) = dns {
        let (r, t) = (registry.clone(), root.child_token());
        set.spawn(async move { ("dns", crate::dns::run(dcfg, r, sockets, t).await) });
    }
    if let Some(l) = &logs {
        let (l, t) = (l.clone(), root.child_token());
        set.spawn(async move { ("logs", crate::logs::run(l, t).await) });
    }
    if let (Some((scfg, sockets, tls)), Some(l)) = (syslog, &logs) {
        let (r, t, store) = (registry.clone(), root.child_token(), l.store.clone());
        set.spawn(async move {
            (
                "syslog",
                crate::syslog::run(scfg, r, store, tls, sockets, t).await,
            )
        });
    }
    let mut admin_ctx = crate::admin::AdminCtx::new(registry.clone());
    admin_ctx.logs = logs.clone();
    admin_ctx.mail = smtp.as_ref().map(|(svc, _)| svc.handle());
    admin_ctx.config_push = config_push.clone();
    if let Some((svc, listener)) = smtp {
        let t = root.child_token();
        set.spawn(async move { ("smtp", crate::smtp::run(svc, listener, t).await) });
    }
    if let Some(listener) = ssh {
        let (r, t, c) = (registry.clone(), root.child_token(), current.subscribe());
        set.spawn(async move { ("ssh", crate::ssh::run(c, r, listener, t).await) });
    }
    if let Some((listener, path)) = admin {
        admin_ctx.config = Some(current.subscribe());
        admin_ctx.reload = Some(reload_tx.clone());
        let (c, t) = (admin_ctx, root.child_token());
        set.spawn(async move { ("admin", crate::admin::run(c, listener, path, t).await) });
    }
    {
        let (r, t) = (registry.clone(), root.child_token());
        set.spawn(async move {
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    _ = tokio::time::sleep(FLUSH_EVERY) => {}
                }
                let r2 = r.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || r2.flush_last_seen()).await
                {
                    warn!(error = %e, "flushing last-seen times failed");
                }
            }
            ("flush", Ok(()))
        });
    }
    info!(project = %cfg.project, version = crate::VERSION, "bastide ready");
    // Only now: every listener above is bound, so a unit ordered after us can connect.
    crate::sdnotify::ready("serving");
    let mut watchdog = crate::sdnotify::watchdog_interval().map(|period| {
        let mut i = tokio::time::interval(period);
        // A late tick is not made up with a burst of pings.
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut failure: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => { let _ = reload(&cfg.source, &registry, &current); }
            Some(req) = reload_rx.recv() => {
                let _ = req.send(reload(&cfg.source, &registry, &current));
            }
            _ = async {
                match watchdog.as_mut() {
                    Some(w) => { w.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => crate::sdnotify::watchdog(),
            done = set.join_next() => match done {
                Some(Ok((name, Ok(())))) => {
                    if !root.is_cancelled() {
                        info!(service = name, "service stopped");
                    }
                }
                Some(Ok((name, Err(e)))) => {
                    error!(service = name, error = %format!("{e:#}"), "service failed: shutting down");
                    failure = Some(e.context(format!("service {name}")));
                    break;
                }
                Some(Err(e)) => {
                    error!(error = %e, "service task panicked: shutting down");
                    failure = Some(anyhow::anyhow!("service task panicked: {e}"));
                    break;
                }
                None => break,
            },
        }
    }
    crate::sdnotify::stopping();
    root.cancel();
    let drained = tokio::time::timeout(GRACE, async {
        while let Some(r) = set.join_next().await {
            if let Ok((name, Err(e))) = r {
                warn!(service = name, error = %format!("{e:#}"), "service ended with an error during shutdown");
            }
        }
    });
    tokio::select! {
        r = drained => if r.is_err() { warn!("services did not stop within {}s", GRACE.as_secs()); },
        _ = term.recv() => warn!("second signal: exiting now"),
        _ = int.recv() => warn!("second signal: exiting now"),
    }
    let r2 = registry.clone();
    match tokio::task::spawn_blocking(move || r2.flush_last_seen()).await {
        Ok(Err(e)) => warn!(error = %e, "flushing last-seen times failed"),
        Err(e) => warn!(error = %e, "flushing last-seen times failed"),
        Ok(Ok(())) => {}
    }
    info!("bastide stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Applies the reloadable parts of the configuration (SIGHUP). A broken file is refused
/// whole and the running configuration stays.
/// `bastide reload` does the same through the admin socket and gets the outcome.
fn reload(
    path: &Path,
    registry: &Registry,
    current: &watch::Sender<Arc<Config>>,
) -> Result<(), String> {
    let path: PathBuf = path.to_path_buf();
    crate::sdnotify::reloading();
    let outcome = match Config::load(&path) {
        Ok(new) => {
            registry.set_settings(settings(&new));
            current.send_replace(Arc::new(new));
            info!(config = %path.display(), "configuration reloaded (agents.cert_lifetime, ssh admins, rules and limits); listeners need a restart to move");
            Ok(())
        }
        Err(e) => {
            error!(config = %path.display(), error = %e, "reload refused: keeping the running configuration");
            Err(format!(
                "reload refused, the running configuration stays: {e}"
            ))
        }
    };
    // READY again whatever the outcome: a refused reload leaves the old configuration serving.
    crate::sdnotify::ready("serving");
    outcome
}
