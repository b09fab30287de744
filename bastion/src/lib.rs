//! Bastide, the bastion daemon: one process that gives a cloud project's VMs their internal
//! services and keeps the registry of the agents running on them.
//!
//! Every service is a module with one `impl Service` (see [`service`]): bound from its config
//! section, then run with the shared context; the [`registry`] is the one owner of agent
//! state and every service derives what it needs from it.

pub mod addresses;
pub mod admin;
pub mod agents;
pub mod cli;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod config_push;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod fsutil;
pub mod hostmetrics;
pub mod jobs;
pub mod listeners;
pub mod logging;
pub mod logs;
pub mod metrics;
pub mod pki;
pub mod registry;
pub mod sdnotify;
pub mod service;
pub mod smtp;
pub mod ssh;
pub mod store;
pub mod syslog;
pub mod tls;

/// Version string reported by `--version`, in logs and to agents.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Seconds since the Unix epoch, as the store and the protocol count time.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
