//! Small background jobs of the daemon, in the shape of every service (see
//! `crate::service`): they bind nothing and run until shutdown.

use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::Config;
use crate::service::{Ctx, Service};

/// How often last-seen times are written to the store.
const FLUSH_EVERY: Duration = Duration::from_secs(60);

/// Writes the agents' last-seen times to the store every minute (and once more at exit,
/// by `daemon::serve`).
pub struct LastSeenFlush;

impl Service for LastSeenFlush {
    const NAME: &'static str = "flush";

    async fn bind(_cfg: &Config, _ctx: &Ctx) -> Result<Option<Self>> {
        Ok(Some(Self))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
            }
            let r = ctx.registry.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || r.flush_last_seen()).await {
                warn!(error = %e, "flushing last-seen times failed");
            }
        }
        Ok(())
    }
}

/// Drops a revoked agent's host metrics at once, not after they turn stale.
pub struct HostMetricsPrune;

impl Service for HostMetricsPrune {
    const NAME: &'static str = "hostmetrics";

    async fn bind(_cfg: &Config, _ctx: &Ctx) -> Result<Option<Self>> {
        Ok(Some(Self))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        let mut events = ctx.registry.events();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = events.recv() => match ev {
                    Ok(crate::registry::RegistryEvent::Revoked(name)) => ctx.hosts.remove(&name),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
            }
        }
        Ok(())
    }
}
