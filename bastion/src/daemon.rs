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

// The services, in the order they bind.
use crate::admin::Admin;
use crate::agents::Endpoint as Agents;
use crate::cluster::Cluster;
use crate::config_push::service::ConfigPush;
use crate::dns::service::Dns;
use crate::hostmetrics::HostMetrics;
use crate::jobs::{HostMetricsPrune, LastSeenFlush};
use crate::logs::service::LogStore;
use crate::metrics::service::Endpoint as Metrics;
use crate::smtp::service::Relay;
use crate::ssh::service::Ssh;
use crate::store::Store;
use crate::syslog::service::Syslog;

/// How long services get to finish after shutdown is asked.
const GRACE: Duration = Duration::from_secs(10);

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
    let mut store = Store::open_configured(&cfg.store, &cfg.state_dir)?;
    tracing::info!(store = %store.describe(), "registry store open");
    let ca = AgentCa::load(&cfg.pki_paths(), &cfg.project, cfg.zone.as_deref())?;
    // The first node binds the store to its agent CA; every other node must present the
    // same one (agents pin it), i.e. be made with `bastide init --join`.
    let pin = crate::pki::spki_pin(&ca.cert_der)?;
    let stored = store.claim_identity(crate::store::AGENT_CA_PIN, &pin)?;
    if stored != pin {
        anyhow::bail!("{}", ca_mismatch(&store.describe(), &pin, &stored));
    }
    Ok(Registry::open(store, ca, settings(cfg))?)
}

fn ca_mismatch(store: &str, ours: &str, theirs: &str) -> String {
    format!(
        "this node's agent CA ({ours}) is not the one of the registry in {store} ({theirs}): agents pin one CA, so every node of a project must share it; create this node with `bastide export-identity` on an existing node and `bastide init --join`"
    )
}

/// What `check-config` adds to the configuration's checks: the store answers and, when it
/// is bound to an agent CA, that CA is this node's.
pub fn check_store_identity(cfg: &Config) -> Result<()> {
    let mut store = Store::open_for_check(&cfg.store, &cfg.state_dir)?;
    let pin = crate::pki::spki_pin(&crate::pki::read_cert_pem(&cfg.pki_paths().ca_cert)?)?;
    match store.identity(crate::store::AGENT_CA_PIN)? {
        Some(stored) if stored != pin => {
            anyhow::bail!("{}", ca_mismatch(&store.describe(), &pin, &stored))
        }
        _ => Ok(()),
    }
}

/// Runs the daemon until a signal or a service failure.
pub async fn serve(cfg: Config) -> Result<()> {
    crate::tls::install_crypto_provider();
    crate::metrics::install_recorder()?;
    let registry = open_registry(&cfg)?;
    // The running configuration: services that can reload watch it, the admin socket reads it.
    let (current, _) = watch::channel(Arc::new(cfg.clone()));
    let (reload_tx, reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let stale_after = cfg.metrics.as_ref().map(|m| m.stale_after);
    let mut s = Bound::new(Ctx {
        registry: registry.clone(),
        config: current.subscribe(),
        reload: reload_tx,
        hosts: HostMetrics::new(stale_after.unwrap_or(Duration::from_secs(300))),
        admin: Default::default(),
        collectors: Default::default(),
        handles: Default::default(),
    });
    // Bind everything before starting anything. A service that takes another's handle at
    // bind time binds after it (none does today: handles are taken in `run`).
    s.bind::<Cluster>(&cfg).await?;
    s.bind::<LogStore>(&cfg).await?;
    s.bind::<ConfigPush>(&cfg).await?;
    s.bind::<Agents>(&cfg).await?;
    s.bind::<Metrics>(&cfg).await?;
    s.bind::<Relay>(&cfg).await?;
    s.bind::<Ssh>(&cfg).await?;
    s.bind::<Dns>(&cfg).await?;
    s.bind::<Syslog>(&cfg).await?;
    s.bind::<Admin>(&cfg).await?;
    s.bind::<HostMetricsPrune>(&cfg).await?;
    s.bind::<LastSeenFlush>(&cfg).await?;
    supervise(&cfg, &registry, s, &current, reload_rx).await
}

/// Runs the bound services until a signal or a failure, answers reloads, then drains.
async fn supervise(
    cfg: &Config,
    registry: &Registry,
    services: Bound,
    current: &watch::Sender<Arc<Config>>,
    mut reload_rx: mpsc::Receiver<ReloadRequest>,
) -> Result<()> {
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
            _ = hup.recv() => { let _ = reload(&cfg.source, registry, current); }
            Some(req) = reload_rx.recv() => {
                let _ = req.send(reload(&cfg.source, registry, current));
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

#[cfg(test)]
mod tests {
    /// The services' hot-path counters reach the recorder through their collectors: each
    /// family is typed once, with its help text, and keeps its name, type and labels.
    #[test]
    fn service_collectors_export_through_the_recorder() {
        let handle = crate::metrics::install_recorder().unwrap();
        let _ = ::metrics::histogram!(crate::metrics::names::DNS_UPSTREAM_LATENCY);
        crate::ssh::service::collect();
        crate::dns::service::collect();
        crate::logs::service::collect();
        crate::metrics::names::export_series("bastide_smtp_refused_total{reason=\"size\"}", 3);
        let out = handle.render();
        let mut seen = std::collections::HashSet::new();
        for l in out.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = l.split_whitespace().nth(2).unwrap();
            assert!(seen.insert(name.to_string()), "{name} typed twice");
        }
        for want in [
            "# TYPE bastide_dns_upstream_latency_seconds histogram",
            "bastide_dns_upstream_latency_seconds_bucket{le=\"0.001\"} 0",
            "bastide_dns_upstream_latency_seconds_bucket{le=\"+Inf\"} 0",
            "# HELP bastide_ssh_jumps_open Jump channels open now",
            "# TYPE bastide_ssh_jumps_open gauge",
            "bastide_ssh_jumps_open 0",
            "# TYPE bastide_ssh_connections_total counter",
            "# TYPE bastide_dns_queries_total counter",
            "bastide_dns_queries_total{type=\"A\"} ",
            "bastide_dns_responses_total{rcode=\"NOERROR\"} ",
            "bastide_logs_events_total{source=\"tcp\"} ",
            "# TYPE bastide_logs_store_full gauge",
            "bastide_smtp_refused_total{reason=\"size\"} 3",
        ] {
            assert!(out.contains(want), "{want:?} missing from\n{out}");
        }
    }
}
