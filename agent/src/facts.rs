//! What the agent reports about its VM: host name, addresses, OS and SSH host keys.

use std::net::IpAddr;
use std::path::Path;

use crate::config::AgentConfig;

/// Most SSH host keys reported.
const MAX_KEYS: usize = 16;

pub fn hostname(cfg: &AgentConfig) -> String {
    if let Some(h) = &cfg.hostname {
        return h.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The short host name, lowercased, as a default agent name.
pub fn default_name() -> String {
    hostname(&AgentConfig::default())
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

pub fn addresses(cfg: &AgentConfig) -> Vec<String> {
    if !cfg.advertise_addresses.is_empty() {
        return cfg
            .advertise_addresses
            .iter()
            .map(IpAddr::to_string)
            .collect();
    }
    let mut out: Vec<String> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !is_link_local(ip))
        .map(|ip| ip.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

pub fn os() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{pretty} (kernel {kernel})")
}

/// OpenSSH host public keys found in `dir` (ssh_host_*_key.pub).
pub fn ssh_host_keys(dir: &Path) -> Vec<String> {
    let mut keys: Vec<(String, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            (name.starts_with("ssh_host_") && name.ends_with("_key.pub"))
                .then_some((name, e.path()))
        })
        .filter_map(|(name, p)| {
            let text = std::fs::read_to_string(p).ok()?;
            let line = text.lines().next()?.trim().to_string();
            (!line.is_empty()).then_some((name, line))
        })
        .collect();
    keys.sort();
    keys.into_iter().take(MAX_KEYS).map(|(_, k)| k).collect()
}
