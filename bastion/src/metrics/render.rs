//! Series rendered at scrape time: per-agent liveness from the registry, and process metrics
//! from /proc (standard `process_*` names, as every Prometheus client library exports them).
//! The services' own series go through the recorder (see `names::Collectors`).

use std::fmt::Write as _;

use crate::hostmetrics::escape_label;
use crate::metrics::names;
use crate::registry::Registry;

pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn agent_label(out: &mut String, name: &str, agent: &str, extra: &[(&str, &str)]) {
    out.push_str(name);
    out.push_str("{agent=\"");
    escape_label(agent, out);
    out.push('"');
    for (k, v) in extra {
        out.push(',');
        out.push_str(k);
        out.push_str("=\"");
        escape_label(v, out);
        out.push('"');
    }
    out.push_str("} ");
}

/// Liveness and identity of every enrolled agent, plus fleet counts by state.
pub fn agents(registry: &Registry, out: &mut String) {
    let snap = registry.snapshot();
    let (mut online, mut offline, mut revoked) = (0u64, 0u64, 0u64);
    for a in snap.agents.values() {
        match (a.revoked, a.online) {
            (true, _) => revoked += 1,
            (false, true) => online += 1,
            (false, false) => offline += 1,
        }
    }
    family(out, "bastide_agents", "gauge", "Enrolled agents by state.");
    for (state, n) in [
        ("online", online),
        ("offline", offline),
        ("revoked", revoked),
    ] {
        let _ = writeln!(out, "bastide_agents{{state=\"{state}\"}} {n}");
    }
    let active: Vec<_> = snap.active().collect();
    let flagged = |flag: &str| {
        active
            .iter()
            .filter(|a| a.flags.iter().any(|f| f == flag))
            .count()
    };
    family(
        out,
        names::AGENTS_ADDRESS_MISMATCH,
        "gauge",
        "Enrolled agents whose connection comes from none of the addresses they claim.",
    );
    let _ = writeln!(
        out,
        "{} {}",
        names::AGENTS_ADDRESS_MISMATCH,
        flagged(crate::registry::FLAG_MISMATCH)
    );
    family(
        out,
        names::AGENTS_ADDRESS_CONFLICT,
        "gauge",
        "Enrolled agents claiming an address another live agent claims too (used by neither).",
    );
    let _ = writeln!(
        out,
        "{} {}",
        names::AGENTS_ADDRESS_CONFLICT,
        flagged(crate::registry::FLAG_CONFLICT)
    );
    family(
        out,
        "bastide_agent_up",
        "gauge",
        "Whether the agent has a live session with the bastion (1) or not (0).",
    );
    for a in &active {
        agent_label(out, "bastide_agent_up", &a.name, &[]);
        out.push_str(if a.online { "1\n" } else { "0\n" });
    }
    family(
        out,
        "bastide_agent_last_seen_timestamp_seconds",
        "gauge",
        "Last time the agent was heard from, in seconds since the epoch.",
    );
    for a in &active {
        if let Some(t) = registry.last_seen(&a.name) {
            agent_label(
                out,
                "bastide_agent_last_seen_timestamp_seconds",
                &a.name,
                &[],
            );
            let _ = writeln!(out, "{t}");
        }
    }
    family(
        out,
        "bastide_agent_certificate_expiry_timestamp_seconds",
        "gauge",
        "Expiry of the agent's current client certificate, in seconds since the epoch.",
    );
    for a in &active {
        agent_label(
            out,
            "bastide_agent_certificate_expiry_timestamp_seconds",
            &a.name,
            &[],
        );
        let _ = writeln!(out, "{}", a.cert_not_after);
    }
    family(
        out,
        "bastide_agent_info",
        "gauge",
        "Agent facts as labels (version), value 1.",
    );
    for a in &active {
        agent_label(
            out,
            "bastide_agent_info",
            &a.name,
            &[("version", a.agent_version.as_str())],
        );
        out.push_str("1\n");
    }
    config(registry, &active, out);
}

/// Pushed configuration: the revision each agent applied, and how many lag behind.
fn config(
    registry: &Registry,
    active: &[&std::sync::Arc<crate::registry::AgentInfo>],
    out: &mut String,
) {
    let states = registry.config_states();
    let mut out_of_sync = 0u64;
    family(
        out,
        "bastide_agent_config_applied_info",
        "gauge",
        "Configuration revision the agent applied last (label revision), value 1.",
    );
    for a in active {
        let Some(c) = states.get(&a.name) else {
            continue;
        };
        if c.desired != c.applied && !c.desired.is_empty() {
            out_of_sync += 1;
        }
        if !c.applied.is_empty() {
            agent_label(
                out,
                "bastide_agent_config_applied_info",
                &a.name,
                &[("revision", c.applied.as_str())],
            );
            out.push_str("1\n");
        }
    }
    family(
        out,
        "bastide_agent_config_in_sync",
        "gauge",
        "Whether the agent applied the configuration revision rendered for it (1) or not (0).",
    );
    for a in active {
        if let Some(c) = states.get(&a.name).filter(|c| !c.desired.is_empty()) {
            agent_label(out, "bastide_agent_config_in_sync", &a.name, &[]);
            out.push_str(if c.desired == c.applied { "1\n" } else { "0\n" });
        }
    }
    family(
        out,
        "bastide_agents_config_out_of_sync",
        "gauge",
        "Active agents that have not applied the configuration revision rendered for them.",
    );
    let _ = writeln!(out, "bastide_agents_config_out_of_sync {out_of_sync}");
    // A refused revision is not sent again by itself: its own series, to alert on.
    let mut by_state: std::collections::BTreeMap<&str, u64> =
        ["in-sync", "pending", "refused", "render-error"]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
    for a in active {
        if let Some(c) = states.get(&a.name) {
            if let Some(n) = by_state.get_mut(c.summary()) {
                *n += 1;
            }
        }
    }
    let name = crate::metrics::names::AGENTS_CONFIG_STATE;
    family(
        out,
        name,
        "gauge",
        "Active agents by configuration state: in-sync, pending (sent, no answer yet), refused (NACKed; sent again on a tree change, a reconnection or `bastide config reload`), render-error.",
    );
    for (state, n) in by_state {
        let _ = writeln!(out, "{name}{{state=\"{state}\"}} {n}");
    }
}

/// process_* metrics of this process, read from /proc/self.
pub fn process(out: &mut String) {
    let tck = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // After the command: [0]=state ... [11]=utime [12]=stime [19]=starttime [20]=vsize
    if let (Some(u), Some(s)) = (num(11), num(12)) {
        family(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(out, "process_cpu_seconds_total {}", (u + s) / tck);
    }
    if let Some(v) = num(20) {
        family(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        let _ = writeln!(out, "process_virtual_memory_bytes {v}");
    }
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    if let Some(kb) = rss_kb {
        family(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {}", kb * 1024.0);
    }
    let btime = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
    if let (Some(start), Some(bt)) = (num(19), btime) {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(out, "process_start_time_seconds {}", bt + start / tck);
    }
    if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
        family(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        let _ = writeln!(out, "process_open_fds {}", rd.count());
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    if let Some(max) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<f64>().ok())
    {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(out, "process_max_fds {max}");
    }
}

/// The allocator's own accounting (jemalloc, the binary's global allocator): what the daemon
/// holds (`allocated`) against the pages that holds (`active`, `resident`), so that growth
/// can be told apart from fragmentation. Nothing without the `jemalloc` feature.
pub fn allocator(out: &mut String) {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        // The statistics are a snapshot refreshed by advancing the epoch.
        if epoch::advance().is_err() {
            return;
        }
        let series = [
            (
                "bastide_allocator_allocated_bytes",
                "Bytes the daemon has allocated and not freed (jemalloc stats.allocated).",
                stats::allocated::read(),
            ),
            (
                "bastide_allocator_active_bytes",
                "Bytes in the allocator's active pages: allocated plus the free space of partly used pages (jemalloc stats.active).",
                stats::active::read(),
            ),
            (
                "bastide_allocator_metadata_bytes",
                "Bytes of the allocator's own bookkeeping (jemalloc stats.metadata).",
                stats::metadata::read(),
            ),
            (
                "bastide_allocator_resident_bytes",
                "Bytes in physically resident pages the allocator maps, metadata included (jemalloc stats.resident).",
                stats::resident::read(),
            ),
            (
                "bastide_allocator_retained_bytes",
                "Bytes of virtual memory the allocator keeps mapped but returned to the system (jemalloc stats.retained).",
                stats::retained::read(),
            ),
        ];
        for (name, help, value) in series {
            if let Ok(v) = value {
                family(out, name, "gauge", help);
                let _ = writeln!(out, "{name} {v}");
            }
        }
    }
    #[cfg(not(feature = "jemalloc"))]
    let _ = out;
}
