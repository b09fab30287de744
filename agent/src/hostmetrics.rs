//! Host metrics read straight from /proc and /sys, with node_exporter's metric names where
//! one exists, shipped to the bastion over the session stream. Cheap by design: a handful of
//! small file reads and one statvfs per real filesystem per collection.

use std::collections::BTreeMap;
use std::path::Path;

use bastide_proto::v1::{Label, MetricFamily, MetricType, MetricsBatch, Sample};

/// Filesystem types that are not storage (node_exporter's default exclusions, roughly).
const PSEUDO_FS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "procfs",
    "pstore",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tracefs",
    "fuse.lxcfs",
    "nfsd",
    "ramfs",
];
/// Bound on series per family (interfaces, disks, mounts) so a strange host cannot flood.
const MAX_SERIES: usize = 256;

/// Where to read from (tests point these at fixture trees).
#[derive(Debug, Clone)]
pub struct Sources {
    pub proc: std::path::PathBuf,
    pub sys: std::path::PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            proc: "/proc".into(),
            sys: "/sys".into(),
        }
    }
}

struct Builder {
    families: BTreeMap<String, MetricFamily>,
}

impl Builder {
    fn new() -> Self {
        Self {
            families: BTreeMap::new(),
        }
    }

    fn add(&mut self, name: &str, help: &str, ty: MetricType, labels: &[(&str, &str)], value: f64) {
        let fam = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| MetricFamily {
                name: name.to_string(),
                help: help.to_string(),
                r#type: ty as i32,
                samples: Vec::new(),
            });
        if fam.samples.len() >= MAX_SERIES || !value.is_finite() {
            return;
        }
        fam.samples.push(Sample {
            labels: labels
                .iter()
                .map(|(k, v)| Label {
                    name: (*k).to_string(),
                    value: (*v).to_string(),
                })
                .collect(),
            value,
        });
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.add(name, help, MetricType::Gauge, labels, v)
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.add(name, help, MetricType::Counter, labels, v)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Clock ticks per second for /proc/stat; 100 on every Linux architecture we run on.
const USER_HZ: f64 = 100.0;

/// Collects one batch of host metrics.
pub fn collect(src: &Sources) -> MetricsBatch {
    let mut b = Builder::new();
    cpu_and_boot(src, &mut b);
    load(src, &mut b);
    memory(src, &mut b);
    filesystems(src, &mut b);
    disks(src, &mut b);
    network(src, &mut b);
    uptime(src, &mut b);
    MetricsBatch {
        timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        families: b.families.into_values().collect(),
    }
}

fn cpu_and_boot(src: &Sources, b: &mut Builder) {
    const MODES: [&str; 8] = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ];
    for line in read(&src.proc.join("stat")).lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some(cpu) if cpu.starts_with("cpu") && cpu.len() > 3 => {
                let id = &cpu[3..];
                for (mode, v) in MODES.iter().zip(f) {
                    if let Ok(t) = v.parse::<f64>() {
                        b.counter(
                            "node_cpu_seconds_total",
                            "Seconds the CPUs spent in each mode.",
                            &[("cpu", id), ("mode", mode)],
                            t / USER_HZ,
                        );
                    }
                }
            }
            Some("btime") => {
                if let Some(Ok(t)) = f.next().map(str::parse::<f64>) {
                    b.gauge(
                        "node_boot_time_seconds",
                        "Node boot time, in unixtime.",
                        &[],
                        t,
                    );
                }
            }
            Some("ctxt") => {
                if let Some(Ok(t)) = f.next().map(str::parse::<f64>) {
                    b.counter(
                        "node_context_switches_total",
                        "Total number of context switches.",
                        &[],
                        t,
                    );
                }
            }
            _ => {}
        }
    }
}

fn load(src: &Sources, b: &mut Builder) {
    let text = read(&src.proc.join("loadavg"));
    let f: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() == 3 {
        b.gauge("node_load1", "1m load average.", &[], f[0]);
        b.gauge("node_load5", "5m load average.", &[], f[1]);
        b.gauge("node_load15", "15m load average.", &[], f[2]);
    }
}

fn memory(src: &Sources, b: &mut Builder) {
    for line in read(&src.proc.join("meminfo")).lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let Some(Ok(v)) = parts.next().map(str::parse::<f64>) else {
            continue;
        };
        let bytes = if parts.next() == Some("kB") {
            v * 1024.0
        } else {
            v
        };
        let key: String = key
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        // node_exporter's names: node_memory_<Field>_bytes (e.g. MemAvailable, SwapFree).
        b.gauge(
            &format!("node_memory_{key}_bytes"),
            &format!("Memory information field {key}_bytes."),
            &[],
            bytes,
        );
    }
}

fn filesystems(src: &Sources, b: &mut Builder) {
    let mut seen = std::collections::HashSet::new();
    for line in read(&src.proc.join("mounts")).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (device, mountpoint, fstype) = (f[0], unescape_mount(f[1]), f[2]);
        if PSEUDO_FS.contains(&fstype) || fstype == "tmpfs" && mountpoint != "/run" {
            continue;
        }
        if !seen.insert(mountpoint.clone()) {
            continue;
        }
        let Ok(st) = nix::sys::statvfs::statvfs(Path::new(&mountpoint)) else {
            continue;
        };
        let frsize = st.fragment_size() as f64;
        let labels = [
            ("device", device),
            ("mountpoint", mountpoint.as_str()),
            ("fstype", fstype),
        ];
        b.gauge(
            "node_filesystem_size_bytes",
            "Filesystem size in bytes.",
            &labels,
            st.blocks() as f64 * frsize,
        );
        b.gauge(
            "node_filesystem_free_bytes",
            "Filesystem free space in bytes.",
            &labels,
            st.blocks_free() as f64 * frsize,
        );
        b.gauge(
            "node_filesystem_avail_bytes",
            "Filesystem space available to non-root users in bytes.",
            &labels,
            st.blocks_available() as f64 * frsize,
        );
        b.gauge(
            "node_filesystem_files",
            "Filesystem total file nodes.",
            &labels,
            st.files() as f64,
        );
        b.gauge(
            "node_filesystem_files_free",
            "Filesystem total free file nodes.",
            &labels,
            st.files_free() as f64,
        );
    }
}

/// /proc/mounts escapes spaces and friends as octal (\040).
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn disks(src: &Sources, b: &mut Builder) {
    for line in read(&src.proc.join("diskstats")).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 14 {
            continue;
        }
        let dev = f[2];
        // Partitions and virtual devices add noise; keep whole disks (as node_exporter does
        // by default for ram/loop).
        if dev.starts_with("loop") || dev.starts_with("ram") || dev.starts_with("dm-") {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        let l = [("device", dev)];
        b.counter(
            "node_disk_reads_completed_total",
            "The total number of reads completed successfully.",
            &l,
            num(3),
        );
        b.counter(
            "node_disk_read_bytes_total",
            "The total number of bytes read successfully.",
            &l,
            num(5) * 512.0,
        );
        b.counter(
            "node_disk_writes_completed_total",
            "The total number of writes completed successfully.",
            &l,
            num(7),
        );
        b.counter(
            "node_disk_written_bytes_total",
            "The total number of bytes written successfully.",
            &l,
            num(9) * 512.0,
        );
        b.counter(
            "node_disk_io_time_seconds_total",
            "Total seconds spent doing I/Os.",
            &l,
            num(12) / 1000.0,
        );
    }
}

fn network(src: &Sources, b: &mut Builder) {
    for line in read(&src.proc.join("net/dev")).lines().skip(2) {
        let Some((iface, rest)) = line.split_once(':') else {
            continue;
        };
        let iface = iface.trim();
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        if f.len() < 16 {
            continue;
        }
        let l = [("device", iface)];
        let c = |b: &mut Builder, name: &str, help: &str, v: f64| b.counter(name, help, &l, v);
        c(
            b,
            "node_network_receive_bytes_total",
            "Network device statistic receive_bytes.",
            f[0],
        );
        c(
            b,
            "node_network_receive_packets_total",
            "Network device statistic receive_packets.",
            f[1],
        );
        c(
            b,
            "node_network_receive_errs_total",
            "Network device statistic receive_errs.",
            f[2],
        );
        c(
            b,
            "node_network_receive_drop_total",
            "Network device statistic receive_drop.",
            f[3],
        );
        c(
            b,
            "node_network_transmit_bytes_total",
            "Network device statistic transmit_bytes.",
            f[8],
        );
        c(
            b,
            "node_network_transmit_packets_total",
            "Network device statistic transmit_packets.",
            f[9],
        );
        c(
            b,
            "node_network_transmit_errs_total",
            "Network device statistic transmit_errs.",
            f[10],
        );
        c(
            b,
            "node_network_transmit_drop_total",
            "Network device statistic transmit_drop.",
            f[11],
        );
    }
    let _ = &src.sys;
}

fn uptime(src: &Sources, b: &mut Builder) {
    if let Some(Ok(up)) = read(&src.proc.join("uptime"))
        .split_whitespace()
        .next()
        .map(str::parse::<f64>)
    {
        b.gauge(
            "node_time_seconds",
            "System time in seconds since epoch (1970).",
            &[],
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        b.gauge(
            "bastide_agent_host_uptime_seconds",
            "Seconds since the host booted.",
            &[],
            up,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_from_this_host() {
        let batch = collect(&Sources::default());
        let names: Vec<&str> = batch.families.iter().map(|f| f.name.as_str()).collect();
        for want in [
            "node_cpu_seconds_total",
            "node_memory_MemAvailable_bytes",
            "node_load1",
            "node_boot_time_seconds",
            "node_network_receive_bytes_total",
            "node_filesystem_size_bytes",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(batch.timestamp_ms > 0);
    }

    #[test]
    fn mount_unescape() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/trail\\"), "/trail\\");
    }
}
