//! `[smtp]`: the VMs' system mail relay. Accepts mail on port 25 from allowed clients only
//! (configured networks and enrolled agents' addresses, read from the registry), spools
//! each message durably before answering 250, and relays it to the site's smarthost with
//! retries, bounces and a dead-letter folder.
//!
//! Parts: [`server`] (SMTP sessions, parsing by `smtp-proto`), [`spool`] (on-disk queue with
//! group commit), [`relay`] (queue runner, pooled and pipelined delivery over `lettre`
//! connections, DSNs), [`rewrite`]
//! (Postfix-like masquerading).

pub mod relay;
pub mod rewrite;
pub mod server;
pub mod service;
pub mod spool;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

pub use spool::Queue;

/// `[smtp]`: the relay's listener, who may use it, limits and rewriting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Addresses to listen on, usually port 25 of the project network (one string or a
    /// list).
    #[serde(deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Name in the greeting, Received: headers and bounces (default: from the zone, else
    /// the system host name).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Spool directory (default: `<state_dir>/mail`).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Client networks allowed to relay, as CIDRs ("10.0.0.0/8") or addresses ("10.0.0.5").
    #[serde(default, deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub allow: Vec<String>,
    /// Enrolled, non-revoked agents' accepted addresses (see `crate::addresses`) may relay too.
    #[serde(default = "yes")]
    pub allow_agents: bool,
    /// When not empty, the only recipient domains accepted (after rewriting).
    #[serde(default)]
    pub allow_recipient_domains: Vec<String>,
    /// Largest message accepted, in bytes (advertised with SIZE).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Longest line of message content, without CRLF (RFC 5321: 998).
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Time a client has to send its next command.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Time a client has to send a whole message after DATA.
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Offer STARTTLS with the bastion's server certificate.
    #[serde(default)]
    pub starttls: bool,
    /// Masquerading: local senders (`root@web01`, `root@localhost`, `cron`) become this
    /// address, in the envelope and in From:.
    #[serde(default)]
    pub sender_address: Option<String>,
    /// Recipients without a domain or in a local domain (`root`, `root@web01`) go here.
    #[serde(default)]
    pub admin_address: Option<String>,
    /// Extra domains counted as local, besides domain-less names, `localhost`, single-label
    /// host names, the project zone and enrolled agents' names ("*.internal" allowed).
    #[serde(default)]
    pub local_domains: Vec<String>,
    /// Receives a copy of every bounce (and the bounce of a message whose sender is local
    /// and unrewritten).
    #[serde(default)]
    pub postmaster: Option<String>,
    pub relay: RelayConfig,
}

/// How the connection to the smarthost is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayTls {
    /// STARTTLS, and never a byte of mail in plaintext without it (the default).
    Required,
    /// STARTTLS when offered, plaintext otherwise (no AUTH allowed).
    Opportunistic,
    /// TLS from the first byte (port 465).
    Implicit,
    /// Plaintext only: for a smarthost on a trusted local link (no AUTH allowed).
    None,
}

/// `[smtp.relay]`: the upstream smarthost and the queue's retry policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub host: String,
    #[serde(default = "default_relay_port")]
    pub port: u16,
    #[serde(default = "default_relay_tls")]
    pub tls: RelayTls,
    /// PEM CA bundle that alone is trusted for the smarthost (default: the system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the AUTH password (mode 0600).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connect and per-command timeout towards the smarthost.
    #[serde(default = "default_relay_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Deliveries to the smarthost at once, each on its own connection (Postfix's
    /// `default_destination_concurrency_limit`).
    #[serde(default = "default_destination_concurrency_limit")]
    pub destination_concurrency_limit: usize,
    /// Messages sent over one connection before it is closed and a new one opened
    /// (Postfix's `smtp_connection_reuse_count_limit`).
    #[serde(default = "default_messages_per_connection")]
    pub messages_per_connection: usize,
    /// First retry delay; doubled on each failure up to `retry_max`.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Time after which a message that could not be delivered is bounced.
    #[serde(default = "default_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
}

fn yes() -> bool {
    true
}
fn default_max_message_size() -> usize {
    10 * 1024 * 1024
}
fn default_max_recipients() -> usize {
    100
}
fn default_max_line_length() -> usize {
    998
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_connections_per_client() -> usize {
    50
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_relay_port() -> u16 {
    25
}
fn default_relay_tls() -> RelayTls {
    RelayTls::Required
}
fn default_relay_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_destination_concurrency_limit() -> usize {
    20
}
fn default_messages_per_connection() -> usize {
    100
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(60)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(5 * 24 * 3600)
}

/// An IP network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

fn plausible_address(a: &str) -> bool {
    matches!(a.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !a.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>'))
}

impl SmtpConfig {
    /// Every problem of the `[smtp]` table, as (key, reason).
    pub fn validate(&self, state_dir: &Path) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut bad = |k: &str, r: String| p.push((format!("smtp.{k}"), r));
        for n in &self.allow {
            if Cidr::parse(n).is_none() {
                bad("allow", format!("{n:?} is not an address or CIDR network"));
            }
        }
        if self.allow.is_empty() && !self.allow_agents {
            bad(
                "allow",
                "empty while allow_agents is false: nobody could send mail".into(),
            );
        }
        for (k, v) in [
            ("max_message_size", self.max_message_size),
            ("max_recipients", self.max_recipients),
            ("max_connections", self.max_connections),
            (
                "max_connections_per_client",
                self.max_connections_per_client,
            ),
        ] {
            if v == 0 {
                bad(k, "must be positive".into());
            }
        }
        if self.max_line_length < 78 {
            bad("max_line_length", "must be at least 78".into());
        }
        if self.command_timeout.is_zero() {
            bad("command_timeout", "must be positive".into());
        }
        if self.data_timeout.is_zero() {
            bad("data_timeout", "must be positive".into());
        }
        for (k, v) in [
            ("sender_address", &self.sender_address),
            ("admin_address", &self.admin_address),
            ("postmaster", &self.postmaster),
        ] {
            if let Some(a) = v {
                if !plausible_address(a) {
                    bad(k, format!("{a:?} is not an address like user@example.org"));
                }
            }
        }
        if let Some(h) = &self.hostname {
            if h.is_empty()
                || h.chars()
                    .any(|c| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            {
                bad("hostname", format!("{h:?} is not a host name"));
            }
        }
        if let Some(d) = &self.spool_dir {
            match d.parent() {
                Some(parent) if parent.is_dir() => {}
                _ => bad(
                    "spool_dir",
                    format!("the parent directory of {} does not exist", d.display()),
                ),
            }
        }
        if self.starttls {
            let pki = crate::pki::PkiPaths::new(state_dir);
            if !pki.server_cert.is_file() {
                bad(
                    "starttls",
                    format!(
                        "server certificate {} is missing",
                        pki.server_cert.display()
                    ),
                );
            }
        }
        let r = &self.relay;
        if r.host.trim().is_empty() {
            bad("relay.host", "must not be empty".into());
        }
        if r.port == 0 {
            bad("relay.port", "must not be 0".into());
        }
        if r.destination_concurrency_limit == 0 || r.destination_concurrency_limit > 256 {
            bad(
                "relay.destination_concurrency_limit",
                "must be between 1 and 256".into(),
            );
        }
        if r.messages_per_connection == 0 {
            bad("relay.messages_per_connection", "must be positive".into());
        }
        if r.timeout.is_zero() {
            bad("relay.timeout", "must be positive".into());
        }
        if r.retry_initial.is_zero() {
            bad("relay.retry_initial", "must be positive".into());
        }
        if r.retry_max < r.retry_initial {
            bad(
                "relay.retry_max",
                "must not be shorter than relay.retry_initial".into(),
            );
        }
        if r.max_lifetime < r.retry_initial {
            bad(
                "relay.max_lifetime",
                "must not be shorter than relay.retry_initial".into(),
            );
        }
        match (&r.username, &r.password_file) {
            (Some(_), Some(f)) => {
                if let Err(e) = crate::fsutil::check_secret_file(f) {
                    bad("relay.password_file", format!("{e:#}"));
                }
                if matches!(r.tls, RelayTls::None | RelayTls::Opportunistic) {
                    bad(
                        "relay.tls",
                        "AUTH needs tls = \"required\" or \"implicit\": a password is never sent in plaintext".into(),
                    );
                }
            }
            (None, None) => {}
            (Some(_), None) => bad("relay.password_file", "needed with relay.username".into()),
            (None, Some(_)) => bad("relay.username", "needed with relay.password_file".into()),
        }
        if let Some(ca) = &r.ca_file {
            if let Err(e) = std::fs::read(ca) {
                bad(
                    "relay.ca_file",
                    format!("cannot read {}: {e}", ca.display()),
                );
            }
        }
        p
    }

    pub fn spool_path(&self, state_dir: &Path) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("mail"))
    }
}

/// The relay's counters, kept here until the metrics service exports them (names and help
/// texts in [`SmtpMetrics::snapshot`]).
#[derive(Debug, Default)]
pub struct SmtpMetrics {
    pub connections: AtomicU64,
    pub accepted: AtomicU64,
    pub accepted_bytes: AtomicU64,
    pub refused_client: AtomicU64,
    pub refused_recipient: AtomicU64,
    pub refused_size: AtomicU64,
    pub refused_line_length: AtomicU64,
    pub refused_limit: AtomicU64,
    pub refused_syntax: AtomicU64,
    pub refused_timeout: AtomicU64,
    pub spool_errors: AtomicU64,
    pub relayed: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Connections opened to the smarthost.
    pub relay_connections: AtomicU64,
    /// Transactions (MAIL FROM) sent to the smarthost: more than connections when they are
    /// reused.
    pub relay_transactions: AtomicU64,
}

/// Every series of the relay, in Prometheus style (help texts in `metrics::names`).
pub const METRICS: &[&str] = &[
    "bastide_smtp_connections_total",
    "bastide_smtp_accepted_total",
    "bastide_smtp_accepted_bytes_total",
    "bastide_smtp_refused_total{reason=\"client\"}",
    "bastide_smtp_refused_total{reason=\"recipient\"}",
    "bastide_smtp_refused_total{reason=\"size\"}",
    "bastide_smtp_refused_total{reason=\"line_length\"}",
    "bastide_smtp_refused_total{reason=\"limit\"}",
    "bastide_smtp_refused_total{reason=\"syntax\"}",
    "bastide_smtp_refused_total{reason=\"timeout\"}",
    "bastide_smtp_spool_errors_total",
    "bastide_smtp_relayed_total",
    "bastide_smtp_deferred_total",
    "bastide_smtp_bounced_total",
    "bastide_smtp_dead_lettered_total",
    "bastide_smtp_relay_connections_total",
    "bastide_smtp_relay_transactions_total",
    "bastide_smtp_queue_length",
    "bastide_smtp_queue_oldest_age_seconds",
];

impl SmtpMetrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter and the queue gauges, by metric name.
    pub fn snapshot(&self, queue: &Queue) -> BTreeMap<&'static str, u64> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (len, oldest) = queue.gauges();
        let values = [
            g(&self.connections),
            g(&self.accepted),
            g(&self.accepted_bytes),
            g(&self.refused_client),
            g(&self.refused_recipient),
            g(&self.refused_size),
            g(&self.refused_line_length),
            g(&self.refused_limit),
            g(&self.refused_syntax),
            g(&self.refused_timeout),
            g(&self.spool_errors),
            g(&self.relayed),
            g(&self.deferred),
            g(&self.bounced),
            g(&self.dead_lettered),
            g(&self.relay_connections),
            g(&self.relay_transactions),
            len,
            oldest,
        ];
        METRICS.iter().copied().zip(values).collect()
    }
}

/// What the admin socket needs of the running relay.
#[derive(Clone)]
pub struct MailHandle {
    pub queue: Arc<Queue>,
    pub metrics: Arc<SmtpMetrics>,
}

/// Domain given to domain-less addresses (`<root>`) so that the parser takes them; the
/// rewriter treats it as local. `.invalid` can never be a real domain (RFC 2606).
pub const UNQUALIFIED: &str = "unqualified.bastide.invalid";

/// What the relay takes from the rest of the configuration.
pub struct Main<'a> {
    pub zone: Option<&'a str>,
    pub state_dir: &'a std::path::Path,
    pub pki: &'a crate::pki::PkiPaths,
}

/// The relay, opened (spool loaded, TLS and transport built) but not yet serving.
pub struct Smtp {
    cfg: SmtpConfig,
    hostname: String,
    zone: Option<String>,
    registry: Registry,
    queue: Arc<Queue>,
    metrics: Arc<SmtpMetrics>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    relay: relay::Relay,
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Smtp {
    /// Opens the spool (recovering from a crash: half-written files are removed) and
    /// prepares the listener's TLS and the smarthost transport.
    pub fn open(cfg: SmtpConfig, main: &Main<'_>, registry: Registry) -> Result<Self> {
        let zone = main
            .zone
            .map(|z| z.trim_end_matches('.').to_ascii_lowercase());
        let hostname = cfg.hostname.clone().unwrap_or_else(|| match &zone {
            Some(z) => format!("bastion.{z}"),
            None => system_hostname(),
        });
        let metrics = Arc::new(SmtpMetrics::default());
        let queue = Arc::new(
            Queue::open(&cfg.spool_path(main.state_dir)).context("opening the mail spool")?,
        );
        let tls = if cfg.starttls {
            let pki = main.pki;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                server::tls_config(&pki.server_cert, &pki.server_key)
                    .context("smtp.starttls: loading the server certificate")?,
            )))
        } else {
            None
        };
        let relay = relay::Relay::new(&cfg, &hostname).context("smtp.relay")?;
        Ok(Self {
            cfg,
            hostname,
            zone,
            registry,
            queue,
            metrics,
            tls,
            relay,
        })
    }

    pub fn handle(&self) -> MailHandle {
        MailHandle {
            queue: self.queue.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Serves SMTP on `listener` and runs the queue until `shutdown`. Sessions in DATA get a
/// short grace to finish; anything acknowledged is already on disk.
pub async fn run(
    svc: Smtp,
    listener: crate::listeners::TcpListeners,
    shutdown: CancellationToken,
) -> Result<()> {
    let rewriter = Arc::new(rewrite::Rewriter::new(
        &svc.cfg,
        svc.zone.clone(),
        svc.hostname.clone(),
        svc.registry.clone(),
    ));
    let runner = {
        let (q, m, t) = (svc.queue.clone(), svc.metrics.clone(), shutdown.clone());
        let relay = svc.relay;
        let hostname = svc.hostname.clone();
        let postmaster = svc.cfg.postmaster.clone();
        let clock = Arc::new(relay::SystemClock);
        tokio::spawn(
            async move { relay::run_queue(relay, q, m, hostname, postmaster, clock, t).await },
        )
    };
    let shared = Arc::new(server::Shared::new(
        svc.cfg,
        svc.hostname,
        svc.registry,
        svc.queue,
        svc.metrics,
        svc.tls,
        rewriter,
    ));
    let served = server::serve(shared, listener, shutdown).await;
    match runner.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context("mail queue runner")),
        Err(e) => anyhow::bail!("mail queue runner panicked: {e}"),
    }
    served
}

/// The admin socket's `mail` requests.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum MailRequest {
    MailQueue,
    MailFlush,
    MailRetry { id: String },
    MailDelete { id: String },
}

/// Answers the admin socket's `mail` requests.
pub fn admin(mail: &MailHandle, req: MailRequest) -> Result<serde_json::Value> {
    use MailRequest as R;
    Ok(match req {
        R::MailQueue => serde_json::json!({
            "messages": mail.queue.list(),
            "dead": mail.queue.dead_count(),
            "spool": mail.queue.root().display().to_string(),
            "metrics": mail.metrics.snapshot(&mail.queue),
        }),
        R::MailFlush => serde_json::json!({ "scheduled": mail.queue.flush(None)? }),
        R::MailRetry { id } => {
            if !spool::valid_id(&id) {
                anyhow::bail!("{id:?} is not a message id");
            }
            serde_json::json!({ "scheduled": mail.queue.flush(Some(&id))? })
        }
        R::MailDelete { id } => {
            mail.queue.delete(&id)?;
            tracing::info!(id = %id, "mail deleted from the queue by an admin");
            serde_json::Value::Null
        }
    })
}
