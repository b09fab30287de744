//! Series rendered at scrape time: per-agent liveness from the registry, and process metrics
//! from /proc (standard `process_*` names, as every Prometheus client library exports them).

use std::fmt::Write as _;

use crate::hostmetrics::escape_label;
use crate::registry::Registry;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
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
