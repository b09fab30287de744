//! `[logs]`: the bastion's log store. Agents ship batches over their mTLS connection
//! (`ingest`), VMs without an agent send syslog (`crate::syslog`); everything lands in plain
//! files `<dir>/<host>/<YYYY-MM-DD>.log` (`store`, line format in `format`), is kept by age
//! and total size and optionally gzip-compressed (`retention`), read back by
//! `bastide logs` (`query`), and optionally forwarded to a central collector as RFC 5424
//! (`forward`). Exactly-once storage of agent batches is explained in `store`.

pub mod format;
pub mod forward;
pub mod ingest;
pub mod metrics;
pub mod query;
pub mod retention;
pub mod service;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use store::{Chunk, Mark, Store, Stored};

/// `[logs]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// Store directory (default `<state_dir>/logs`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Days kept, today included; 0 keeps everything.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Most bytes the store may hold; the oldest days go first. 0: no limit.
    #[serde(default)]
    pub max_total_bytes: u64,
    /// Days after which a day file is gzip-compressed (`DAY.log.gz`); 0: never.
    #[serde(default)]
    pub compress_after_days: u32,
    /// Longest message of an agent event, in bytes; longer ones are truncated and counted.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// How often retention and compression run.
    #[serde(default = "default_retention_interval", with = "humantime_serde")]
    pub retention_interval: Duration,
    /// `[logs.forward]`: RFC 5424 to a central collector.
    #[serde(default)]
    pub forward: Option<forward::ForwardConfig>,
}

fn default_retention_days() -> u32 {
    90
}
fn default_max_event_bytes() -> usize {
    64 * 1024
}
fn default_retention_interval() -> Duration {
    Duration::from_secs(3600)
}

impl LogsConfig {
    pub fn store_dir(&self, state_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| state_dir.join("logs"))
    }

    /// Problems as (key, reason).
    pub fn validate(&self, state_dir: &Path) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !(64..=16 * 1024 * 1024).contains(&self.max_event_bytes) {
            p.push((
                "logs.max_event_bytes".into(),
                "must be between 64 and 16777216".into(),
            ));
        }
        if self.retention_interval < Duration::from_secs(1) {
            p.push((
                "logs.retention_interval".into(),
                "must be at least 1s".into(),
            ));
        }
        if let Some(dir) = &self.dir {
            if !dir.is_absolute() {
                p.push((
                    "logs.dir".into(),
                    format!("{} must be an absolute path", dir.display()),
                ));
            }
        }
        if let Some(f) = &self.forward {
            p.extend(f.validate(&self.store_dir(state_dir)));
        }
        p
    }
}

/// The running log service: the store and what the agents endpoint, the syslog receiver
/// and the admin socket need from it.
#[derive(Clone)]
pub struct Logs {
    pub store: Store,
    pub cfg: Arc<LogsConfig>,
    forward: Option<forward::Queue>,
    pub(crate) streams: ingest::Streams,
}

impl Logs {
    /// Opens the store (recovering it) and the forwarding queue.
    pub fn open(cfg: LogsConfig, state_dir: &Path) -> Result<Self> {
        let dir = cfg.store_dir(state_dir);
        let forward = match &cfg.forward {
            Some(f) => Some(forward::Queue::open(f, &dir).context("logs.forward queue")?),
            None => None,
        };
        let store = Store::open(&dir, forward.clone())
            .with_context(|| format!("log store {}", dir.display()))?;
        Ok(Self {
            store,
            cfg: Arc::new(cfg),
            forward,
            streams: ingest::Streams::default(),
        })
    }

    /// Figures for `bastide status`.
    pub fn status(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let c = metrics::counters();
        let events: u64 = c.events.iter().map(|a| a.load(Relaxed)).sum();
        serde_json::json!({
            "dir": self.store.dir().display().to_string(),
            "store_bytes": c.store_bytes.load(Relaxed),
            "events_received": events,
            "duplicate_batches": c.duplicates.load(Relaxed),
            "store_failed": c.store_failed.load(Relaxed) == 1,
            "forward": self.forward.as_ref().map(|_| serde_json::json!({
                "queue_bytes": c.forward_queue_bytes.load(Relaxed),
                "connected": c.forward_connected.load(Relaxed) == 1,
                "sent": c.forward_sent.load(Relaxed),
                "dropped": c.forward_dropped.load(Relaxed),
            })),
        })
    }
}

/// Runs retention and compression periodically, and the forwarder, until `shutdown`.
pub async fn run(logs: Logs, shutdown: CancellationToken) -> Result<()> {
    info!(dir = %logs.store.dir().display(), forward = logs.forward.is_some(), "log store ready");
    let forwarder = logs.forward.clone().map(|q| {
        let cfg = logs.cfg.forward.clone();
        let t = shutdown.clone();
        tokio::spawn(async move {
            if let Some(cfg) = cfg {
                forward::run(cfg, q, t).await;
            }
        })
    });
    let mut tick = tokio::time::interval(logs.cfg.retention_interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let dir = logs.store.dir().to_path_buf();
        let cfg = logs.cfg.clone();
        match tokio::task::spawn_blocking(move || retention::pass(&dir, &cfg, format::now_ms()))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %format!("{e:#}"), "log retention pass failed"),
            Err(e) => warn!(error = %e, "log retention task failed"),
        }
    }
    if let Some(f) = forwarder {
        let _ = tokio::time::timeout(Duration::from_secs(5), f).await;
    }
    Ok(())
}
