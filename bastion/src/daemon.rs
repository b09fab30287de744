//! `bastide serve`: binds every configured service first (so nothing starts half-configured),
//! then runs each in a `JoinSet` under one root cancellation token (see `crate::service`). SIGTERM or SIGINT
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
use crate::control::ReloadRequest;
use crate::pki::AgentCa;
use crate::registry::{Registry, RegistrySettings};
use crate::service::{Bound, Ctx};
use crate::store::Store;

/// How long services get to finish after shutdown is asked.
const GRACE: Duration = Duration::from_secs(10);

fn settings(cfg: &Config) -> RegistrySettings {
    RegistrySettings {
        cert_lifetime: cfg
            .agents
            .as_ref()
            .map(|a| a.cert_lifetime)
            .unwrap_or(Duration::from_secs(24 * 3600)),
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
    // The running configuration: services that can reload watch it, the admin socket reads it.
    let (current, _) = watch::channel(Arc::new(cfg.clone()));
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let ctx = Ctx {
        registry: registry.clone(),
        config: current.subscribe(),
        reload: reload_tx,
        hosts: crate::hostmetrics::HostMetrics::new(
            cfg.metrics
                .as_ref()
                .map(|m| m.stale_after)
                .unwrap_or(Duration::from_secs(300)),
        ),
        admin: Default::default(),
        collectors: Default::default(),
        handles: Default::default(),
    };

    // Bind everything before starting anything; a service binds after those whose handles
    // it takes (logs before syslog and agents).
    let mut services = Bound::new(ctx);
    services
        .bind::<crate::logs::service::LogStore>(&cfg)
        .await?;
    services
        .bind::<crate::config_push::service::ConfigPush>(&cfg)
        .await?;
    services.bind::<crate::agents::Endpoint>(&cfg).await?;
    services
        .bind::<crate::metrics::service::Endpoint>(&cfg)
        .await?;
    services.bind::<crate::smtp::service::Relay>(&cfg).await?;
    services.bind::<crate::ssh::service::Ssh>(&cfg).await?;
    services.bind::<crate::dns::service::Dns>(&cfg).await?;
    services
        .bind::<crate::syslog::service::Syslog>(&cfg)
        .await?;
    services.bind::<crate::admin::Admin>(&cfg).await?;
    services.bind::<crate::jobs::HostMetricsPrune>(&cfg).await?;
    services.bind::<crate::jobs::LastSeenFlush>(&cfg).await?;

    let root = CancellationToken::new();
    let mut set: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
    services.spawn(&root, &mut set);
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
