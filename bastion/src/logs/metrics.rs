//! Counters of the log store and the syslog receiver, kept in atomics (the writer thread and
//! every receiver bump them per batch) and exported at scrape time by `metrics/render.rs`
//! under the names of `metrics/names.rs`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use crate::metrics::names;

/// Where events come from (the `source` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Agent = 0,
    Udp = 1,
    Tcp = 2,
    Tls = 3,
}

pub const SOURCES: [&str; 4] = ["agent", "udp", "tcp", "tls"];

#[derive(Default)]
pub struct Counters {
    pub events: [AtomicU64; 4],
    pub bytes: [AtomicU64; 4],
    pub parse_failures: [AtomicU64; 4],
    pub invalid_utf8: [AtomicU64; 4],
    pub truncated: [AtomicU64; 4],
    /// Agent batches acknowledged again without being stored.
    pub duplicates: AtomicU64,
    pub commits: AtomicU64,
    pub commit_micros: AtomicU64,
    pub store_failed: AtomicU64,
    /// Bytes in the store (last retention scan).
    pub store_bytes: AtomicU64,
    pub retention_deleted: AtomicU64,
    pub compressed: AtomicU64,
    pub syslog_connections: AtomicU64,
    pub syslog_refused: AtomicU64,
    /// Syslog lines refused: a new sender that is not an agent past `max_unknown_hosts`.
    pub syslog_unknown_host_refused: AtomicU64,
    /// Host directories of senders that are not agents (see `syslog::UnknownHosts`).
    pub syslog_unknown_hosts: AtomicU64,
    pub forward_queue_bytes: AtomicU64,
    pub forward_sent: AtomicU64,
    pub forward_dropped: AtomicU64,
    pub forward_connected: AtomicU64,
    /// Syslog events not stored because the store's filesystem was full.
    pub dropped: [AtomicU64; 4],
    /// Agent batches refused because the store's filesystem was full (kept by the agent).
    pub refused_batches: AtomicU64,
    /// 1 while the last write found the store's filesystem full.
    pub store_full: AtomicU64,
    /// fsync calls made by the store's writer (read by `bench/src/bin/store-bench.rs`).
    pub store_fsyncs: AtomicU64,
}

pub fn counters() -> &'static Counters {
    static C: OnceLock<Counters> = OnceLock::new();
    C.get_or_init(Counters::default)
}

impl Counters {
    pub fn add(&self, src: Source, events: u64, bytes: u64) {
        self.events[src as usize].fetch_add(events, Relaxed);
        self.bytes[src as usize].fetch_add(bytes, Relaxed);
    }

    /// (name, help, labels, value) of every series.
    pub fn export(&self) -> Vec<(&'static str, &'static str, String, f64)> {
        let mut v = Vec::new();
        let per = |v: &mut Vec<_>, name, help, arr: &[AtomicU64; 4]| {
            for (i, s) in SOURCES.iter().enumerate() {
                v.push((
                    name,
                    help,
                    format!("{{source=\"{s}\"}}"),
                    arr[i].load(Relaxed) as f64,
                ));
            }
        };
        per(
            &mut v,
            names::LOGS_EVENTS,
            "Log events received, by source kind.",
            &self.events,
        );
        per(
            &mut v,
            names::LOGS_BYTES,
            "Bytes of log messages received, by source kind.",
            &self.bytes,
        );
        per(
            &mut v,
            names::LOGS_PARSE_FAILURES,
            "Syslog messages that did not parse as RFC 5424 or 3164 (stored raw).",
            &self.parse_failures,
        );
        per(
            &mut v,
            names::LOGS_INVALID_UTF8,
            "Messages with invalid UTF-8 (stored lossily decoded).",
            &self.invalid_utf8,
        );
        per(
            &mut v,
            names::LOGS_TRUNCATED,
            "Messages longer than the configured maximum, stored truncated.",
            &self.truncated,
        );
        let one = |v: &mut Vec<_>, name, help, a: &AtomicU64| {
            v.push((name, help, String::new(), a.load(Relaxed) as f64));
        };
        one(
            &mut v,
            names::LOGS_DUPLICATES,
            "Agent batches already stored, acknowledged again and dropped.",
            &self.duplicates,
        );
        one(
            &mut v,
            names::LOGS_COMMITS,
            "Group commits of the log store (write + fsync + journal).",
            &self.commits,
        );
        v.push((
            names::LOGS_COMMIT_SECONDS,
            "Time spent in group commits.",
            String::new(),
            self.commit_micros.load(Relaxed) as f64 / 1e6,
        ));
        one(
            &mut v,
            names::LOGS_STORE_FAILED,
            "1 when a write failed and the store refuses writes until restart.",
            &self.store_failed,
        );
        one(
            &mut v,
            names::LOGS_STORE_BYTES,
            "Bytes in the log store at the last retention pass.",
            &self.store_bytes,
        );
        one(
            &mut v,
            names::LOGS_RETENTION_DELETED,
            "Day files deleted by retention (age or total size).",
            &self.retention_deleted,
        );
        one(
            &mut v,
            names::LOGS_COMPRESSED,
            "Day files compressed.",
            &self.compressed,
        );
        one(
            &mut v,
            names::SYSLOG_CONNECTIONS,
            "Open syslog TCP and TLS connections.",
            &self.syslog_connections,
        );
        one(
            &mut v,
            names::SYSLOG_REFUSED,
            "Syslog clients refused (network not allowed, connection limit, TLS handshake).",
            &self.syslog_refused,
        );
        one(
            &mut v,
            names::SYSLOG_UNKNOWN_HOST_REFUSED,
            "Syslog lines refused because their sender is not an agent and max_unknown_hosts hosts of such senders exist.",
            &self.syslog_unknown_host_refused,
        );
        one(
            &mut v,
            names::SYSLOG_UNKNOWN_HOSTS,
            "Host directories of syslog senders that are not agents (named after their address).",
            &self.syslog_unknown_hosts,
        );
        one(
            &mut v,
            names::FORWARD_QUEUE_BYTES,
            "Bytes waiting in the forwarding queue.",
            &self.forward_queue_bytes,
        );
        one(
            &mut v,
            names::FORWARD_SENT,
            "Events sent to the central collector.",
            &self.forward_sent,
        );
        one(
            &mut v,
            names::FORWARD_DROPPED,
            "Events dropped from a full forwarding queue (oldest first).",
            &self.forward_dropped,
        );
        one(
            &mut v,
            names::FORWARD_CONNECTED,
            "1 while connected to the central collector.",
            &self.forward_connected,
        );
        per(
            &mut v,
            names::LOGS_DROPPED,
            "Syslog events dropped because the log store's filesystem was full.",
            &self.dropped,
        );
        one(
            &mut v,
            names::LOGS_REFUSED_BATCHES,
            "Agent batches refused because the log store's filesystem was full (the agent keeps and resends them).",
            &self.refused_batches,
        );
        one(
            &mut v,
            names::LOGS_STORE_FULL,
            "1 while the log store's filesystem is full (writes are retried, no restart needed).",
            &self.store_full,
        );
        v
    }
}
