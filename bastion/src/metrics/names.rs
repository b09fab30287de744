//! Every metric name the bastion exports through the `metrics` facade, with its unit and help
//! text, in one place. Names follow Prometheus conventions: `bastide_` prefix, base units,
//! `_total` for counters. Label values are always from small fixed sets.
//!
//! Per-agent series (`bastide_agent_up{agent=...}` and friends) and process metrics are
//! rendered at scrape time from the registry and /proc (see `render.rs`): they are bounded by
//! the fleet, and vanish with it, instead of living forever in the recorder.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const BUILD_INFO: &str = "bastide_build_info";
pub const ENROLLMENTS: &str = "bastide_agent_enrollments_total";
pub const RENEWALS: &str = "bastide_agent_renewals_total";
pub const REVOCATIONS: &str = "bastide_agent_revocations_total";
/// Several bastions on PostgreSQL (`crate::cluster`).
pub const STORE_CONNECTED: &str = "bastide_store_connected";
pub const STORE_DISCONNECTED_SECONDS: &str = "bastide_store_disconnected_seconds";
pub const STORE_SESSIONS_REFUSED: &str = "bastide_store_cut_off";
pub const CLUSTER_LEADER: &str = "bastide_cluster_leader";
pub const CLUSTER_RESYNCS: &str = "bastide_cluster_resyncs_total";
pub const CLUSTER_CHANGES: &str = "bastide_cluster_changes_applied_total";
pub const REGISTRATIONS: &str = "bastide_agent_registrations_total";
pub const REGISTRATION_COMMITS: &str = "bastide_agent_registration_commits_total";
pub const HEARTBEATS: &str = "bastide_agent_heartbeats_total";
pub const HANDSHAKE_FAILURES: &str = "bastide_agent_handshake_failures_total";
pub const AGENT_CONNECTIONS: &str = "bastide_agent_connections";
pub const AGENT_CONNECTIONS_REFUSED: &str = "bastide_agent_connections_refused_total";
pub const RENEWALS_REFUSED: &str = "bastide_agent_renewals_refused_total";
pub const METRICS_BATCHES: &str = "bastide_agent_metrics_batches_total";
pub const METRICS_DROPPED: &str = "bastide_agent_metrics_samples_dropped_total";
pub const ADMIN_REQUESTS: &str = "bastide_admin_requests_total";
pub const SCRAPE_DURATION: &str = "bastide_metrics_scrape_duration_seconds";
pub const SCRAPE_DENIED: &str = "bastide_metrics_scrapes_denied_total";
pub const CONFIG_PUSHES: &str = "bastide_config_pushes_total";
pub const CONFIG_RESULTS: &str = "bastide_config_results_total";
pub const CONFIG_RELOADS: &str = "bastide_config_reloads_total";
pub const CONFIG_RENDER_DURATION: &str = "bastide_config_render_duration_seconds";
/// Git source of the environment tree (`config_push::git`).
pub const CONFIG_SOURCE_REFUSED: &str = "bastide_config_source_refused_total";
pub const CONFIG_SOURCE_FETCH_FAILURES: &str = "bastide_config_source_fetch_failures_total";
pub const CONFIG_WEBHOOK_CALLS: &str = "bastide_config_webhook_calls_total";
pub const CONFIG_ROLLOUTS: &str = "bastide_config_rollouts_total";
/// Scrape-time gauge (a text collector: the old commit's series must vanish).
pub const CONFIG_SOURCE_INFO: &str = "bastide_config_source_info";
pub const CONFIG_SOURCE_INFO_HELP: &str =
    "The commit of the configuration repository in force (commit, branch labels), value 1.";

// SSH, DNS and SMTP: hot-path counters kept in atomics by each service and copied into the
// recorder before each scrape by the collector the service registers (see `Collectors`).
pub const SSH_CONNECTIONS: &str = "bastide_ssh_connections_total";
pub const SSH_CONNECTIONS_RATE_LIMITED: &str = "bastide_ssh_connections_rate_limited_total";
pub const SSH_AUTH_SUCCEEDED: &str = "bastide_ssh_auth_succeeded_total";
pub const SSH_AUTH_FAILED: &str = "bastide_ssh_auth_failed_total";
pub const SSH_JUMPS_ALLOWED: &str = "bastide_ssh_jumps_allowed_total";
pub const SSH_JUMPS_DENIED: &str = "bastide_ssh_jumps_denied_total";
pub const SSH_JUMPS_OPEN: &str = "bastide_ssh_jumps_open";
pub const SSH_BYTES_TO_TARGET: &str = "bastide_ssh_bytes_to_target_total";
pub const SSH_BYTES_FROM_TARGET: &str = "bastide_ssh_bytes_from_target_total";
pub const SSH_CERTS_ISSUED: &str = "bastide_ssh_certs_issued_total";
pub const SSH_CERTS_REVOKED: &str = "bastide_ssh_certs_revoked_total";
pub const SSH_SSO_LOGINS_REFUSED: &str = "bastide_ssh_sso_logins_refused_total";
pub const DNS_QUERIES: &str = "bastide_dns_queries_total";
pub const DNS_RESPONSES: &str = "bastide_dns_responses_total";
pub const DNS_CACHE_HITS: &str = "bastide_dns_cache_hits_total";
pub const DNS_CACHE_MISSES: &str = "bastide_dns_cache_misses_total";
pub const DNS_CACHE_STALE_SERVED: &str = "bastide_dns_cache_stale_served_total";
pub const DNS_CACHE_ENTRIES: &str = "bastide_dns_cache_entries";
pub const DNS_PREFETCHES: &str = "bastide_dns_prefetches_total";
pub const DNS_COALESCED: &str = "bastide_dns_coalesced_total";
pub const DNS_UPSTREAM_QUERIES: &str = "bastide_dns_upstream_queries_total";
pub const DNS_UPSTREAM_FAILURES: &str = "bastide_dns_upstream_failures_total";
pub const DNS_REFUSED: &str = "bastide_dns_refused_total";
pub const DNS_RATE_LIMITED: &str = "bastide_dns_rate_limited_total";
pub const DNS_MALFORMED: &str = "bastide_dns_malformed_total";
pub const DNS_OVERLOADED: &str = "bastide_dns_overloaded_total";
/// Recorded through the facade (upstream queries are cache misses, not the hot path).
pub const DNS_UPSTREAM_LATENCY: &str = "bastide_dns_upstream_latency_seconds";
/// Upper bounds (seconds) of [`DNS_UPSTREAM_LATENCY`]'s buckets (a last one is +Inf).
pub const DNS_LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];
pub const SMTP_CONNECTIONS: &str = "bastide_smtp_connections_total";
pub const SMTP_ACCEPTED: &str = "bastide_smtp_accepted_total";
pub const SMTP_ACCEPTED_BYTES: &str = "bastide_smtp_accepted_bytes_total";
pub const SMTP_REFUSED: &str = "bastide_smtp_refused_total";
pub const SMTP_SPOOL_ERRORS: &str = "bastide_smtp_spool_errors_total";
pub const SMTP_RELAYED: &str = "bastide_smtp_relayed_total";
pub const SMTP_DEFERRED: &str = "bastide_smtp_deferred_total";
pub const SMTP_BOUNCED: &str = "bastide_smtp_bounced_total";
pub const SMTP_DEAD_LETTERED: &str = "bastide_smtp_dead_lettered_total";
pub const SMTP_RELAY_CONNECTIONS: &str = "bastide_smtp_relay_connections_total";
pub const SMTP_RELAY_TRANSACTIONS: &str = "bastide_smtp_relay_transactions_total";
pub const SMTP_QUEUE_LENGTH: &str = "bastide_smtp_queue_length";
pub const SMTP_QUEUE_OLDEST_AGE: &str = "bastide_smtp_queue_oldest_age_seconds";

// Logs and syslog (copied at scrape time from `logs::metrics::Counters`).
pub const LOGS_EVENTS: &str = "bastide_logs_events_total";
pub const LOGS_BYTES: &str = "bastide_logs_bytes_total";
pub const LOGS_PARSE_FAILURES: &str = "bastide_logs_parse_failures_total";
pub const LOGS_INVALID_UTF8: &str = "bastide_logs_invalid_utf8_total";
pub const LOGS_TRUNCATED: &str = "bastide_logs_truncated_total";
pub const LOGS_DUPLICATES: &str = "bastide_logs_duplicate_batches_total";
pub const LOGS_COMMITS: &str = "bastide_logs_commits_total";
/// A counter of fractional seconds, which the facade cannot hold (its counters are integers):
/// rendered as text by the logs collector, with this help.
pub const LOGS_COMMIT_SECONDS: &str = "bastide_logs_commit_seconds_total";
pub const LOGS_COMMIT_SECONDS_HELP: &str = "Time spent in group commits.";
pub const LOGS_STORE_FAILED: &str = "bastide_logs_store_failed";
pub const LOGS_STORE_BYTES: &str = "bastide_logs_store_bytes";
pub const LOGS_RETENTION_DELETED: &str = "bastide_logs_retention_deleted_files_total";
pub const LOGS_COMPRESSED: &str = "bastide_logs_compressed_files_total";
pub const SYSLOG_CONNECTIONS: &str = "bastide_syslog_connections";
pub const SYSLOG_REFUSED: &str = "bastide_syslog_refused_total";
pub const SYSLOG_UNKNOWN_HOST_REFUSED: &str = "bastide_syslog_unknown_host_refused_total";
pub const SYSLOG_UNKNOWN_HOSTS: &str = "bastide_syslog_unknown_hosts";
pub const FORWARD_QUEUE_BYTES: &str = "bastide_logs_forward_queue_bytes";
pub const FORWARD_SENT: &str = "bastide_logs_forward_sent_total";
pub const FORWARD_DROPPED: &str = "bastide_logs_forward_dropped_total";
pub const FORWARD_CONNECTED: &str = "bastide_logs_forward_connected";
pub const LOGS_DROPPED: &str = "bastide_logs_dropped_events_total";
pub const LOGS_REFUSED_BATCHES: &str = "bastide_logs_refused_batches_total";
pub const LOGS_STORE_FULL: &str = "bastide_logs_store_full";
/// Scrape-time gauges: active agents whose observed address is none of their claims, and
/// active agents that lost a claimed address to a conflict (see `crate::addresses`).
pub const AGENTS_ADDRESS_MISMATCH: &str = "bastide_agents_address_mismatch";
pub const AGENTS_ADDRESS_CONFLICT: &str = "bastide_agents_address_conflict";
/// Scrape-time gauge: active agents by configuration state (see `ConfigState::summary`).
pub const AGENTS_CONFIG_STATE: &str = "bastide_agents_config_state";

/// Buckets of every histogram (seconds): from 100 µs to 10 s.
pub const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Registers the help texts and units of every facade metric.
pub fn describe() {
    describe_gauge!(BUILD_INFO, "Build information: version label, value 1.");
    describe_counter!(
        ENROLLMENTS,
        Unit::Count,
        "Enrollment attempts by result (ok, refused)."
    );
    describe_counter!(RENEWALS, Unit::Count, "Agent certificates renewed.");
    describe_counter!(REVOCATIONS, Unit::Count, "Agents revoked.");
    describe_gauge!(
        STORE_CONNECTED,
        "Whether this node's notification connection to the shared PostgreSQL store is up (1) or not (0)."
    );
    describe_gauge!(
        STORE_DISCONNECTED_SECONDS,
        Unit::Seconds,
        "How long the shared PostgreSQL store has been unreachable (0 when it answers)."
    );
    describe_gauge!(
        STORE_SESSIONS_REFUSED,
        "1 when this node has been cut off from the shared store for over [store] max_disconnected and refuses new agent sessions."
    );
    describe_gauge!(
        CLUSTER_LEADER,
        "Whether this node runs the cluster's run-once jobs (holds the leader lock)."
    );
    describe_counter!(
        CLUSTER_RESYNCS,
        Unit::Count,
        "Full reloads of the registry from the shared store (start, reconnection)."
    );
    describe_counter!(
        CLUSTER_CHANGES,
        Unit::Count,
        "Agent changes announced by the shared store and applied here."
    );
    describe_counter!(REGISTRATIONS, Unit::Count, "Agent registrations by result.");
    describe_counter!(
        REGISTRATION_COMMITS,
        Unit::Count,
        "Store transactions that recorded registrations (a reconnection storm groups many in one)."
    );
    describe_counter!(HEARTBEATS, Unit::Count, "Heartbeats received from agents.");
    describe_counter!(
        HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes on the agents endpoint that failed or timed out."
    );
    describe_gauge!(
        AGENT_CONNECTIONS,
        Unit::Count,
        "Open TLS connections on the agents endpoint."
    );
    describe_counter!(
        AGENT_CONNECTIONS_REFUSED,
        Unit::Count,
        "Connections to the agents endpoint closed by a limit, by reason (connections, \
         unauthenticated, per_address, idle, lifetime, revoked)."
    );
    describe_counter!(
        RENEWALS_REFUSED,
        Unit::Count,
        "Certificate renewals refused by the per-agent rate limit."
    );
    describe_counter!(
        METRICS_BATCHES,
        Unit::Count,
        "Host metric batches received from agents by result (ok, refused)."
    );
    describe_counter!(
        METRICS_DROPPED,
        Unit::Count,
        "Host metric samples dropped for invalid names or reserved labels."
    );
    describe_counter!(
        ADMIN_REQUESTS,
        Unit::Count,
        "Admin socket requests by result (ok, error)."
    );
    describe_histogram!(
        SCRAPE_DURATION,
        Unit::Seconds,
        "Time to render a metrics endpoint, by path."
    );
    describe_counter!(
        SCRAPE_DENIED,
        Unit::Count,
        "Metrics requests refused by reason (network, token)."
    );
    describe_counter!(
        CONFIG_PUSHES,
        Unit::Count,
        "Configuration revisions sent to agents."
    );
    describe_counter!(
        CONFIG_RESULTS,
        Unit::Count,
        "Agents' answers to configuration pushes by result (ack, nack)."
    );
    describe_counter!(
        CONFIG_RELOADS,
        Unit::Count,
        "Loads of the environment tree by result (ok, refused)."
    );
    describe_histogram!(
        CONFIG_RENDER_DURATION,
        Unit::Seconds,
        "Time to load the environment tree and render every agent."
    );
    describe_counter!(
        CONFIG_SOURCE_REFUSED,
        Unit::Count,
        "Commits of the configuration repository refused, by reason (unsigned, \
         unknown_signer, bad_signature, force_push, render)."
    );
    describe_counter!(
        CONFIG_SOURCE_FETCH_FAILURES,
        Unit::Count,
        "Fetches of the configuration repository that failed."
    );
    describe_counter!(
        CONFIG_ROLLOUTS,
        Unit::Count,
        "Configuration rollouts in waves that ended, by result (done, halted, aborted)."
    );
    describe_counter!(
        CONFIG_WEBHOOK_CALLS,
        Unit::Count,
        "Calls of the configuration webhook by result (fetch, ignored, unauthorized, network, too_many_connections)."
    );
    // SSH.
    for (name, help) in [
        (SSH_CONNECTIONS, "SSH connections accepted"),
        (
            SSH_CONNECTIONS_RATE_LIMITED,
            "SSH connections refused by the per-source rate limit",
        ),
        (SSH_AUTH_SUCCEEDED, "SSH authentications that succeeded"),
        (SSH_AUTH_FAILED, "SSH authentication attempts refused"),
        (SSH_JUMPS_ALLOWED, "Jump channels allowed"),
        (SSH_JUMPS_DENIED, "Jump channels denied or failed"),
        (
            SSH_BYTES_TO_TARGET,
            "Bytes forwarded from admins to targets",
        ),
        (
            SSH_BYTES_FROM_TARGET,
            "Bytes forwarded from targets to admins",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_gauge!(SSH_JUMPS_OPEN, "Jump channels open now");
    describe_counter!(
        SSH_CERTS_ISSUED,
        Unit::Count,
        "SSH user certificates issued after a single sign-on."
    );
    describe_counter!(
        SSH_CERTS_REVOKED,
        Unit::Count,
        "SSH user certificates revoked (bastide ssh certs revoke)."
    );
    describe_counter!(
        SSH_SSO_LOGINS_REFUSED,
        Unit::Count,
        "Single sign-on logins refused (bad token, name, groups or key)."
    );
    // DNS.
    describe_counter!(DNS_QUERIES, "DNS queries received, by query type.");
    describe_counter!(DNS_RESPONSES, "DNS responses sent, by response code.");
    for (name, help) in [
        (DNS_CACHE_HITS, "Answers served from the cache."),
        (DNS_CACHE_MISSES, "Queries the cache could not answer."),
        (
            DNS_CACHE_STALE_SERVED,
            "Expired answers served while every upstream was down.",
        ),
        (DNS_PREFETCHES, "Cache entries refreshed before expiry."),
        (
            DNS_COALESCED,
            "Queries merged into an identical upstream query in flight.",
        ),
        (DNS_UPSTREAM_QUERIES, "Queries sent to upstream resolvers."),
        (
            DNS_UPSTREAM_FAILURES,
            "Upstream queries that failed or timed out.",
        ),
        (
            DNS_REFUSED,
            "Queries refused: client outside the allowed networks.",
        ),
        (
            DNS_RATE_LIMITED,
            "Responses dropped or truncated by response rate limiting.",
        ),
        (DNS_MALFORMED, "Malformed packets received."),
        (
            DNS_OVERLOADED,
            "Queries dropped because too many were pending.",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_gauge!(DNS_CACHE_ENTRIES, "Entries in the cache.");
    describe_histogram!(
        DNS_UPSTREAM_LATENCY,
        Unit::Seconds,
        "Latency of upstream queries."
    );
    // SMTP.
    for (name, help) in [
        (
            SMTP_CONNECTIONS,
            "SMTP connections accepted by the listener",
        ),
        (
            SMTP_ACCEPTED,
            "Messages acknowledged (250 after DATA, spooled and fsynced)",
        ),
        (SMTP_ACCEPTED_BYTES, "Bytes of acknowledged messages"),
        (
            SMTP_REFUSED,
            "Refusals by reason (client, recipient, size, line_length, limit, syntax, timeout).",
        ),
        (
            SMTP_SPOOL_ERRORS,
            "Messages that could not be written to the spool (451)",
        ),
        (SMTP_RELAYED, "Messages delivered to the smarthost"),
        (SMTP_DEFERRED, "Delivery attempts that failed temporarily"),
        (SMTP_BOUNCED, "Bounces (DSN) generated"),
        (
            SMTP_DEAD_LETTERED,
            "Messages moved to the dead-letter folder",
        ),
        (
            SMTP_RELAY_CONNECTIONS,
            "Connections opened to the smarthost",
        ),
        (
            SMTP_RELAY_TRANSACTIONS,
            "Transactions (MAIL FROM) sent to the smarthost; above connections when reused",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_gauge!(SMTP_QUEUE_LENGTH, "Messages in the queue");
    describe_gauge!(
        SMTP_QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest message in the queue"
    );
    // Logs and syslog.
    for (name, help) in [
        (LOGS_EVENTS, "Log events received, by source kind."),
        (LOGS_BYTES, "Bytes of log messages received, by source kind."),
        (
            LOGS_PARSE_FAILURES,
            "Syslog messages that did not parse as RFC 5424 or 3164 (stored raw).",
        ),
        (
            LOGS_INVALID_UTF8,
            "Messages with invalid UTF-8 (stored lossily decoded).",
        ),
        (
            LOGS_TRUNCATED,
            "Messages longer than the configured maximum, stored truncated.",
        ),
        (
            LOGS_DUPLICATES,
            "Agent batches already stored, acknowledged again and dropped.",
        ),
        (
            LOGS_COMMITS,
            "Group commits of the log store (write + fsync + journal).",
        ),
        (
            LOGS_RETENTION_DELETED,
            "Day files deleted by retention (age or total size).",
        ),
        (LOGS_COMPRESSED, "Day files compressed."),
        (
            SYSLOG_REFUSED,
            "Syslog clients refused (network not allowed, connection limit, TLS handshake).",
        ),
        (
            SYSLOG_UNKNOWN_HOST_REFUSED,
            "Syslog lines refused because their sender is not an agent and max_unknown_hosts hosts of such senders exist.",
        ),
        (FORWARD_SENT, "Events sent to the central collector."),
        (
            FORWARD_DROPPED,
            "Events dropped from a full forwarding queue (oldest first).",
        ),
        (
            LOGS_DROPPED,
            "Syslog events dropped because the log store's filesystem was full.",
        ),
        (
            LOGS_REFUSED_BATCHES,
            "Agent batches refused because the log store's filesystem was full (the agent keeps and resends them).",
        ),
    ] {
        describe_counter!(name, help);
    }
    for (name, help) in [
        (
            LOGS_STORE_FAILED,
            "1 when a write failed and the store refuses writes until restart.",
        ),
        (
            LOGS_STORE_BYTES,
            "Bytes in the log store at the last retention pass.",
        ),
        (SYSLOG_CONNECTIONS, "Open syslog TCP and TLS connections."),
        (
            SYSLOG_UNKNOWN_HOSTS,
            "Host directories of syslog senders that are not agents (named after their address).",
        ),
        (
            FORWARD_QUEUE_BYTES,
            "Bytes waiting in the forwarding queue.",
        ),
        (
            FORWARD_CONNECTED,
            "1 while connected to the central collector.",
        ),
        (
            LOGS_STORE_FULL,
            "1 while the log store's filesystem is full (writes are retried, no restart needed).",
        ),
    ] {
        describe_gauge!(name, help);
    }
}

/// Copies a value kept in an atomic into the recorder: a counter for a `_total` name, a gauge
/// otherwise (the same rule the names follow).
pub fn export(name: &'static str, labels: Vec<metrics::Label>, v: u64) {
    if name.ends_with("_total") {
        metrics::counter!(name, labels).absolute(v);
    } else {
        metrics::gauge!(name, labels).set(v as f64);
    }
}

/// [`export`] for a series written `name{k="v",...}` (label values without quotes or commas).
pub fn export_series(series: &'static str, v: u64) {
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.trim_end_matches('}')),
        None => (series, ""),
    };
    let labels = labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| metrics::Label::new(k, v.trim_matches('"')))
        .collect();
    export(name, labels, v);
}

/// Appends one counter of fractional value as text, with its HELP and TYPE.
pub fn text_counter(out: &mut String, name: &str, help: &str, v: f64) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// Collectors run before each scrape of `/metrics`: a service that keeps hot-path counters in
/// atomics registers one that copies them into the recorder ([`export`]), so its series are
/// rendered by the exporter with the rest. A text collector appends series the facade cannot
/// hold (fractional counters, per-agent series that must vanish with the agent).
#[derive(Clone, Default)]
pub struct Collectors(std::sync::Arc<std::sync::RwLock<Vec<Collector>>>);

#[derive(Clone)]
enum Collector {
    Recorder(std::sync::Arc<dyn Fn() + Send + Sync>),
    Text(std::sync::Arc<dyn Fn(&mut String) + Send + Sync>),
}

impl Collectors {
    /// Adds `f`, run before every scrape to update the recorder.
    pub fn register(&self, f: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut v) = self.0.write() {
            v.push(Collector::Recorder(std::sync::Arc::new(f)));
        }
    }

    /// Adds `f`, which appends its series (with HELP and TYPE) to every scrape.
    pub fn register_text(&self, f: impl Fn(&mut String) + Send + Sync + 'static) {
        if let Ok(mut v) = self.0.write() {
            v.push(Collector::Text(std::sync::Arc::new(f)));
        }
    }

    fn all(&self) -> Vec<Collector> {
        self.0.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Runs the recorder collectors (before rendering the recorder).
    pub fn update(&self) {
        for c in self.all() {
            if let Collector::Recorder(f) = c {
                f();
            }
        }
    }

    /// Runs the text collectors (after rendering the recorder).
    pub fn render_text(&self, out: &mut String) {
        for c in self.all() {
            if let Collector::Text(f) = c {
                f(out);
            }
        }
    }
}
