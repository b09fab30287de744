//! Counters of the log store and the syslog receiver, kept in atomics (the writer thread and
//! every receiver bump them per batch) and copied into the recorder at scrape time by the
//! collector `logs/service.rs` registers, under the names of `metrics/names.rs`.

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

    /// (name, `source` label, value) of every series the recorder holds (help texts in
    /// `metrics::names`); `commit_micros` is exported apart, as fractional seconds.
    pub fn export(&self) -> Vec<(&'static str, Option<&'static str>, u64)> {
        let mut v = Vec::new();
        let per = |v: &mut Vec<_>, name, arr: &[AtomicU64; 4]| {
            for (i, s) in SOURCES.iter().enumerate() {
                v.push((name, Some(*s), arr[i].load(Relaxed)));
            }
        };
        per(&mut v, names::LOGS_EVENTS, &self.events);
        per(&mut v, names::LOGS_BYTES, &self.bytes);
        per(&mut v, names::LOGS_PARSE_FAILURES, &self.parse_failures);
        per(&mut v, names::LOGS_INVALID_UTF8, &self.invalid_utf8);
        per(&mut v, names::LOGS_TRUNCATED, &self.truncated);
        for (name, a) in [
            (names::LOGS_DUPLICATES, &self.duplicates),
            (names::LOGS_COMMITS, &self.commits),
            (names::LOGS_STORE_FAILED, &self.store_failed),
            (names::LOGS_STORE_BYTES, &self.store_bytes),
            (names::LOGS_RETENTION_DELETED, &self.retention_deleted),
            (names::LOGS_COMPRESSED, &self.compressed),
            (names::SYSLOG_CONNECTIONS, &self.syslog_connections),
            (names::SYSLOG_REFUSED, &self.syslog_refused),
            (
                names::SYSLOG_UNKNOWN_HOST_REFUSED,
                &self.syslog_unknown_host_refused,
            ),
            (names::SYSLOG_UNKNOWN_HOSTS, &self.syslog_unknown_hosts),
            (names::FORWARD_QUEUE_BYTES, &self.forward_queue_bytes),
            (names::FORWARD_SENT, &self.forward_sent),
            (names::FORWARD_DROPPED, &self.forward_dropped),
            (names::FORWARD_CONNECTED, &self.forward_connected),
        ] {
            v.push((name, None, a.load(Relaxed)));
        }
        per(&mut v, names::LOGS_DROPPED, &self.dropped);
        for (name, a) in [
            (names::LOGS_REFUSED_BATCHES, &self.refused_batches),
            (names::LOGS_STORE_FULL, &self.store_full),
        ] {
            v.push((name, None, a.load(Relaxed)));
        }
        v
    }
}
