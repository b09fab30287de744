//! The agent's local configuration (optional TOML file). The bastion cannot change it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Directory holding the VM's OpenSSH host public keys (ssh_host_*_key.pub).
    #[serde(default = "default_ssh_dir")]
    pub ssh_host_keys_dir: PathBuf,
    /// Addresses to register instead of the interfaces' addresses (NAT, several NICs).
    #[serde(default)]
    pub advertise_addresses: Vec<IpAddr>,
    /// Local address the connection to the bastion is made from (multi-homed VMs: the
    /// address on the project network, which the bastion then observes and checks claims
    /// against). Default: the kernel's choice.
    #[serde(default)]
    pub source_address: Option<IpAddr>,
    /// More bastions of the project (HOST:PORT) to fail over to, after the ones given at
    /// enrollment.
    #[serde(default)]
    pub bastions: Vec<String>,
    /// Host name to report instead of the kernel's.
    #[serde(default)]
    pub hostname: Option<String>,
    /// First reconnection delay; it doubles (with jitter) up to `reconnect_max`.
    #[serde(default = "default_reconnect_initial", with = "humantime_serde")]
    pub reconnect_initial: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How often host metrics are collected and shipped ("0s" turns them off).
    #[serde(default = "default_metrics_interval", with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Log sources, buffer and batching (`[logs]`, `[[logs.sources]]`).
    #[serde(default)]
    pub logs: crate::logs::LogsConfig,
    /// `[config]`: what a configuration pushed by the bastion may do here (nothing by
    /// default).
    #[serde(default)]
    pub config: crate::apply::PushPolicy,
}

fn default_metrics_interval() -> Duration {
    Duration::from_secs(15)
}

fn default_ssh_dir() -> PathBuf {
    PathBuf::from("/etc/ssh")
}
fn default_reconnect_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(60)
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            ssh_host_keys_dir: default_ssh_dir(),
            advertise_addresses: Vec::new(),
            source_address: None,
            bastions: Vec::new(),
            hostname: None,
            reconnect_initial: default_reconnect_initial(),
            reconnect_max: default_reconnect_max(),
            metrics_interval: default_metrics_interval(),
            logs: crate::logs::LogsConfig::default(),
            config: crate::apply::PushPolicy::default(),
        }
    }
}

impl AgentConfig {
    /// Reads a configuration file; unknown keys are refused.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let cfg: Self = bastide_common::tomlcfg::parse(&text, &[]).map_err(|problems| {
            let file = path.display();
            anyhow::anyhow!(
                "{}",
                problems
                    .iter()
                    .map(|p| format!("{file}: {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
        if !cfg.metrics_interval.is_zero() && cfg.metrics_interval < Duration::from_secs(1) {
            bail!(
                "{}: metrics_interval must be at least 1s (or 0s to turn metrics off)",
                path.display()
            );
        }
        let problems = cfg.config.problems();
        if !problems.is_empty() {
            bail!("{}: {}", path.display(), problems.join("; "));
        }
        if cfg.reconnect_initial.is_zero() || cfg.reconnect_max < cfg.reconnect_initial {
            bail!(
                "{}: reconnect_initial must be positive and at most reconnect_max",
                path.display()
            );
        }
        let problems = cfg.logs.validate();
        if !problems.is_empty() {
            bail!("{}: {}", path.display(), problems.join("; "));
        }
        Ok(cfg)
    }
}
