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
pub const REGISTRATIONS: &str = "bastide_agent_registrations_total";
pub const HEARTBEATS: &str = "bastide_agent_heartbeats_total";
pub const HANDSHAKE_FAILURES: &str = "bastide_agent_handshake_failures_total";
pub const AGENT_CONNECTIONS: &str = "bastide_agent_connections";
pub const METRICS_BATCHES: &str = "bastide_agent_metrics_batches_total";
pub const METRICS_DROPPED: &str = "bastide_agent_metrics_samples_dropped_total";
pub const ADMIN_REQUESTS: &str = "bastide_admin_requests_total";
pub const SCRAPE_DURATION: &str = "bastide_metrics_scrape_duration_seconds";
pub const SCRAPE_DENIED: &str = "bastide_metrics_scrapes_denied_total";
pub const CONFIG_PUSHES: &str = "bastide_config_pushes_total";
pub const CONFIG_RESULTS: &str = "bastide_config_results_total";
pub const CONFIG_RELOADS: &str = "bastide_config_reloads_total";
pub const CONFIG_RENDER_DURATION: &str = "bastide_config_render_duration_seconds";

// Logs and syslog (exported at scrape time from `logs::metrics::Counters`).
pub const LOGS_EVENTS: &str = "bastide_logs_events_total";
pub const LOGS_BYTES: &str = "bastide_logs_bytes_total";
pub const LOGS_PARSE_FAILURES: &str = "bastide_logs_parse_failures_total";
pub const LOGS_INVALID_UTF8: &str = "bastide_logs_invalid_utf8_total";
pub const LOGS_TRUNCATED: &str = "bastide_logs_truncated_total";
pub const LOGS_DUPLICATES: &str = "bastide_logs_duplicate_batches_total";
pub const LOGS_COMMITS: &str = "bastide_logs_commits_total";
pub const LOGS_COMMIT_SECONDS: &str = "bastide_logs_commit_seconds_total";
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
    describe_counter!(REGISTRATIONS, Unit::Count, "Agent registrations by result.");
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
}
