//! The bastion's configuration: one TOML file, one table per service. A service whose table is
//! absent is off. Unknown keys are refused, and validation reports every problem at once,
//! each naming the file, the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::pki::{valid_zone, PkiPaths};

/// What to put in each required key, said when it is missing (`[]`: any index). Every key
/// without a default is here (`required_keys_have_hints` checks it).
pub const REQUIRED_KEY_HINTS: &[(&str, &str)] = &[
    (
        "project",
        "the cloud project's name, a lowercase DNS label (\"myproj\")",
    ),
    (
        "state_dir",
        "the directory `bastide init` created (\"/var/lib/bastide\")",
    ),
    (
        "agents.listen",
        "the addresses agents dial, e.g. [\"0.0.0.0:4443\"] (`bastide init --agents-listen` picks a free one)",
    ),
    (
        "admin.socket",
        "the admin CLI's Unix socket, e.g. \"/run/bastide/admin.sock\"",
    ),
    (
        "metrics.listen",
        "the addresses Prometheus scrapes, e.g. [\"127.0.0.1:9469\"] (`bastide init --metrics-listen` picks a free one)",
    ),
    (
        "dns.listen",
        "the addresses VMs query, e.g. [\"10.0.0.1:53\"]",
    ),
    (
        "smtp.listen",
        "the addresses VMs relay mail to, e.g. [\"10.0.0.1:25\"]",
    ),
    (
        "dns.records[].name",
        "the record's name, relative to the zone (\"www\", \"@\" for the apex)",
    ),
    (
        "dns.records[].type",
        "the record's type: A, AAAA, CNAME, TXT, SRV or MX",
    ),
    (
        "dns.records[].value",
        "the record's data, e.g. \"10.0.0.1\" for an A record",
    ),
    (
        "logs.forward.target",
        "the central collector as host:port, e.g. \"logs.example.org:6514\"",
    ),
    (
        "smtp.relay",
        "a [smtp.relay] table naming the smarthost (host, port, tls)",
    ),
    ("smtp.relay.host", "the smarthost's name or address"),
    (
        "ssh.listen",
        "the addresses admins connect to, e.g. [\"0.0.0.0:22\"]",
    ),
    (
        "ssh.admins[].name",
        "the admin's name (the SSH user name they jump as)",
    ),
    (
        "config_push.cloud",
        "this bastion's cloud in the environment tree, e.g. \"ovh\"",
    ),
    (
        "config_push.site",
        "this bastion's site in the environment tree, e.g. \"gra\"",
    ),
    (
        "config_push.instance",
        "this bastion's instance in the environment tree, e.g. \"production\"",
    ),
];

/// Default path of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/bastide/bastide.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{}", .problems.join("\n"))]
    Invalid { problems: Vec<String> },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the cloud project this bastion serves (a DNS label).
    pub project: String,
    /// DNS zone of the project's VMs, e.g. "proj.example.org.".
    #[serde(default)]
    pub zone: Option<String>,
    /// Directory holding the registry store, the PKI and the SSH host key.
    pub state_dir: PathBuf,
    #[serde(default)]
    pub agents: Option<AgentsConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub metrics: Option<crate::metrics::MetricsConfig>,
    #[serde(default)]
    pub dns: Option<crate::dns::DnsConfig>,
    /// `[smtp]`: the VMs' mail relay (off when absent).
    #[serde(default)]
    pub smtp: Option<crate::smtp::SmtpConfig>,
    /// `[ssh]`: the jump host.
    #[serde(default)]
    pub ssh: Option<crate::ssh::config::SshConfig>,
    /// `[logs]`: the log store (agents' logs and syslog).
    #[serde(default)]
    pub logs: Option<crate::logs::LogsConfig>,
    /// `[syslog]`: the syslog receiver (needs `[logs]`).
    #[serde(default)]
    pub syslog: Option<crate::syslog::SyslogConfig>,
    /// `[config_push]`: the environment tree rendered and pushed to agents.
    #[serde(default)]
    pub config_push: Option<crate::config_push::ConfigPushConfig>,
    /// `[store]`: the registry's store, SQLite in the state directory unless set.
    #[serde(default)]
    pub store: crate::store::StoreConfig,
    /// Path of the file this was read from (not a TOML key).
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[agents]`: the mTLS gRPC endpoint agents dial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// Addresses agents dial (one string or a list).
    #[serde(deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Lifetime of the client certificates given to agents.
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub cert_lifetime: Duration,
    /// Interval agents are told to send heartbeats at.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which an agent's session is closed and the agent marked offline.
    #[serde(default = "default_heartbeat_timeout", with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Most agent connections at once (TLS handshakes included).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to complete its TLS handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Agent networks: an address an agent claims is used (SSH, DNS, SMTP, syslog) only
    /// inside these. Absent: the networks of the bastion's own interfaces, loopback
    /// excluded. A loopback network ("127.0.0.0/8") must be listed to admit loopback
    /// addresses (tests, single-machine demos); the bastion's own addresses never are.
    #[serde(default)]
    pub networks: Option<Vec<ipnet::IpNet>>,
    /// "observed" (default): only the claimed address the agent's connection comes from
    /// is used. "networks": every claimed address inside `networks` (NAT, multi-homed VMs).
    #[serde(default)]
    pub claimed_addresses: crate::addresses::ClaimedAddresses,
    /// Most connections without a client certificate at once (they can only enroll).
    #[serde(default = "default_max_unauthenticated_connections")]
    pub max_unauthenticated_connections: usize,
    /// Most connections from one source address that have not shown a client certificate:
    /// TLS handshakes in progress and certificate-less connections together.
    #[serde(default = "default_max_unauthenticated_per_address")]
    pub max_unauthenticated_per_address: usize,
    /// A connection without a client certificate is closed after this long without a byte
    /// from the client, and a short grace after its enrollment call answered.
    #[serde(
        default = "default_unauthenticated_idle_timeout",
        with = "humantime_serde"
    )]
    pub unauthenticated_idle_timeout: Duration,
    /// A connection without a client certificate is closed this long after its handshake,
    /// busy or not.
    #[serde(default = "default_unauthenticated_lifetime", with = "humantime_serde")]
    pub unauthenticated_lifetime: Duration,
    /// Renewals an agent may make in a burst.
    #[serde(default = "default_renew_burst")]
    pub renew_burst: u32,
    /// One more renewal is allowed per this interval, up to `renew_burst` (default: a tenth
    /// of `cert_lifetime`; agents renew at two thirds of it).
    #[serde(default, with = "humantime_serde")]
    pub renew_interval: Option<Duration>,
}

impl AgentsConfig {
    /// The renewal refill interval, defaulted from the certificate lifetime.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval.unwrap_or(self.cert_lifetime / 10)
    }
}

/// `[admin]`: the Unix socket the admin CLI talks to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub socket: PathBuf,
    /// File mode of the socket: 0o600 (default) or 0o660 for an admin group.
    #[serde(default = "default_socket_mode")]
    pub mode: u32,
}

fn default_cert_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(35)
}
fn default_max_connections() -> usize {
    20_000
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_unauthenticated_connections() -> usize {
    256
}
fn default_max_unauthenticated_per_address() -> usize {
    32
}
fn default_unauthenticated_idle_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_unauthenticated_lifetime() -> Duration {
    Duration::from_secs(30)
}
fn default_renew_burst() -> u32 {
    5
}
fn default_socket_mode() -> u32 {
    0o600
}

impl Config {
    /// Reads and parses a file without checking what it points at.
    pub fn parse_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config =
            bastide_common::tomlcfg::parse(&text, REQUIRED_KEY_HINTS).map_err(|problems| {
                ConfigError::Invalid {
                    problems: problems
                        .into_iter()
                        .map(|p| format!("{}: {p}", path.display()))
                        .collect(),
                }
            })?;
        cfg.source = path.to_path_buf();
        Ok(cfg)
    }

    /// Reads, parses and validates a file: what `serve` and `check-config` use.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::parse_file(path)?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    pub fn pki_paths(&self) -> PkiPaths {
        PkiPaths::new(&self.state_dir)
    }

    /// The SQLite registry file (the store itself with the default backend, the source of
    /// `bastide store migrate` otherwise).
    pub fn store_path(&self) -> PathBuf {
        self.store.sqlite_path(&self.state_dir)
    }

    /// Every address a listener of this configuration is bound to (for the address
    /// policy: an agent may never claim one).
    pub fn listen_addresses(&self) -> Vec<std::net::IpAddr> {
        let mut v: Vec<SocketAddr> = Vec::new();
        v.extend(self.agents.iter().flat_map(|a| &a.listen));
        v.extend(self.metrics.iter().flat_map(|m| &m.listen));
        v.extend(self.smtp.iter().flat_map(|s| &s.listen));
        v.extend(self.ssh.iter().flat_map(|s| &s.listen));
        v.extend(self.dns.iter().flat_map(|d| &d.listen));
        if let Some(s) = &self.syslog {
            v.extend(s.udp.iter().chain(&s.tcp).chain(&s.tls).copied());
        }
        v.into_iter().map(|a| a.ip()).collect()
    }

    /// The address policy of this configuration (reads the host's interfaces).
    pub fn address_policy(&self) -> crate::addresses::AddressPolicy {
        crate::addresses::AddressPolicy::new(
            self.agents.as_ref().and_then(|a| a.networks.clone()),
            self.listen_addresses(),
            self.agents
                .as_ref()
                .map(|a| a.claimed_addresses)
                .unwrap_or_default(),
        )
    }

    /// Every problem in the configuration, each as "file: key: reason".
    pub fn validate(&self) -> Vec<String> {
        let file = self.source.display().to_string();
        let mut problems = Vec::new();
        let mut bad = |key: &str, reason: String| problems.push(format!("{file}: {key}: {reason}"));

        if !crate::pki::valid_agent_name(&self.project) {
            bad(
                "project",
                format!("{:?} is not a lowercase DNS label", self.project),
            );
        }
        if let Some(z) = &self.zone {
            if !valid_zone(z) {
                bad("zone", format!("{z:?} is not a valid DNS zone name"));
            }
        }
        if !self.state_dir.is_dir() {
            bad(
                "state_dir",
                format!(
                    "{} is not a directory (create it with `bastide init`)",
                    self.state_dir.display()
                ),
            );
        } else {
            let pki = self.pki_paths();
            for (key, path) in [("ca key", &pki.ca_key), ("server key", &pki.server_key)] {
                if let Err(e) = crate::fsutil::check_secret_file(path) {
                    bad("state_dir", format!("{key}: {e:#}"));
                }
            }
            if let Err(e) = crate::pki::read_cert_pem(&pki.ca_cert) {
                bad("state_dir", format!("{e:#}"));
            }
            if self.store.backend == crate::store::BackendKind::Sqlite
                && !self.store_path().is_file()
            {
                bad(
                    "state_dir",
                    format!(
                        "registry store {} is missing (create it with `bastide init`)",
                        self.store_path().display()
                    ),
                );
            }
        }
        for (key, list) in [
            ("agents.listen", self.agents.as_ref().map(|a| &a.listen)),
            ("metrics.listen", self.metrics.as_ref().map(|m| &m.listen)),
            ("smtp.listen", self.smtp.as_ref().map(|s| &s.listen)),
            ("ssh.listen", self.ssh.as_ref().map(|s| &s.listen)),
        ] {
            if list.is_some_and(|l| l.is_empty()) {
                bad(key, "at least one address is needed".into());
            }
        }
        for (key, reason) in self.store.problems() {
            bad(&key, reason);
        }
        if let Some(a) = &self.agents {
            if a.cert_lifetime < Duration::from_secs(2) {
                bad("agents.cert_lifetime", "must be at least 2s".into());
            }
            if a.heartbeat_interval.is_zero() {
                bad("agents.heartbeat_interval", "must be positive".into());
            }
            if a.heartbeat_timeout <= a.heartbeat_interval {
                bad(
                    "agents.heartbeat_timeout",
                    "must be longer than agents.heartbeat_interval".into(),
                );
            }
            if a.max_connections == 0 {
                bad("agents.max_connections", "must be positive".into());
            }
            if a.handshake_timeout.is_zero() {
                bad("agents.handshake_timeout", "must be positive".into());
            }
            if a.max_unauthenticated_connections == 0 {
                bad(
                    "agents.max_unauthenticated_connections",
                    "must be positive (enrollment needs it)".into(),
                );
            }
            if a.max_unauthenticated_per_address == 0 {
                bad(
                    "agents.max_unauthenticated_per_address",
                    "must be positive (every handshake counts until its certificate is seen)"
                        .into(),
                );
            }
            if a.unauthenticated_idle_timeout.is_zero() {
                bad(
                    "agents.unauthenticated_idle_timeout",
                    "must be positive".into(),
                );
            }
            if a.unauthenticated_lifetime.is_zero() {
                bad("agents.unauthenticated_lifetime", "must be positive".into());
            }
            if a.renew_burst == 0 {
                bad("agents.renew_burst", "must be at least 1".into());
            }
            if a.renew_interval().is_zero() {
                bad("agents.renew_interval", "must be positive".into());
            }
        }
        if let Some(adm) = &self.admin {
            if adm.mode & !0o660 != 0 || adm.mode & 0o600 != 0o600 {
                bad(
                    "admin.mode",
                    format!(
                        "{:o} must be 0o600 or 0o660 (never world-accessible)",
                        adm.mode
                    ),
                );
            }
            match adm.socket.parent() {
                Some(p) if p.as_os_str().is_empty() || p.is_dir() => {}
                _ => bad(
                    "admin.socket",
                    format!("the directory of {} does not exist", adm.socket.display()),
                ),
            }
        }
        if let Some(d) = &self.dns {
            for (key, reason) in d.problems(self.zone.as_deref()) {
                bad(&format!("dns.{key}"), reason);
            }
        }
        if let Some(smtp) = &self.smtp {
            for (key, reason) in smtp.validate(&self.state_dir) {
                bad(&key, reason);
            }
        }
        if let Some(ssh) = &self.ssh {
            for (key, reason) in ssh.problems() {
                bad(&key, reason);
            }
        }
        if let Some(m) = &self.metrics {
            for p in m.validate() {
                problems.push(format!("{file}: {p}"));
            }
        }
        if let Some(l) = &self.logs {
            for (key, reason) in l.validate(&self.state_dir) {
                problems.push(format!("{file}: {key}: {reason}"));
            }
        }
        if let Some(s) = &self.syslog {
            for (key, reason) in s.validate(self.logs.is_some()) {
                let key = key.trim_end_matches('.');
                problems.push(format!("{file}: {key}: {reason}"));
            }
        }
        if let Some(c) = &self.config_push {
            for (key, reason) in c.problems() {
                problems.push(format!("{file}: {key}: {reason}"));
            }
            if self.agents.is_none() {
                problems.push(format!(
                    "{file}: config_push: needs the [agents] endpoint to push over"
                ));
            }
        }
        problems
    }
}

pub use bastide_common::tomlcfg::networks;

/// The listeners `bastide init` chose (see `cli::init`).
pub struct InitListen {
    pub agents: Vec<SocketAddr>,
    pub metrics: Vec<SocketAddr>,
}

/// A `listen` list as TOML.
fn toml_list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
}

/// The commented configuration `bastide init` writes.
pub fn default_file(
    project: &str,
    zone: Option<&str>,
    state_dir: &Path,
    listen: &InitListen,
) -> String {
    let agents_listen = toml_list(&listen.agents);
    let metrics_listen = toml_list(&listen.metrics);
    let zone_line = match zone {
        Some(z) => format!("zone = {z:?}"),
        None => "# zone = \"project.example.org.\"".to_string(),
    };
    let dir = state_dir.display();
    format!(
        r#"# Bastide bastion configuration. One table per service; a service whose table is
# absent is off. Unknown keys are refused. Check with: bastide check-config --config FILE

# Name of the cloud project this bastion serves (a lowercase DNS label).
project = {project:?}
# DNS zone the project's VMs are named in.
{zone_line}
# Registry store, agent CA, server certificate and SSH host key.
state_dir = "{dir}"

# mTLS gRPC endpoint that agents dial (enrollment, session, renewal). Every `listen` is a
# list of addresses (a single "address:port" string is accepted too).
[agents]
listen = {agents_listen}
# Lifetime of agent client certificates; agents renew at 2/3 of it.
cert_lifetime = "24h"
heartbeat_interval = "10s"
# Silence after which an agent is marked offline.
heartbeat_timeout = "35s"
max_connections = 20000
handshake_timeout = "10s"
# Agent networks: an address an agent claims is used by SSH, DNS, SMTP and syslog only
# inside these (never loopback unless a loopback network is listed, never link-local, never
# the bastion's own addresses). Default: the networks of this host's interfaces.
# networks = ["10.0.0.0/16"]
# "observed": use a claimed address only when the agent's connection comes from it (safe
# default). "networks": any claimed address inside the networks (VMs behind NAT).
# claimed_addresses = "observed"
# Connections without a client certificate can only enroll: at most this many at once,
# at most this many per source address (handshakes in progress count too), closed when
# idle or after their lifetime.
max_unauthenticated_connections = 256
max_unauthenticated_per_address = 32
unauthenticated_idle_timeout = "5s"
unauthenticated_lifetime = "30s"
# Renewals per agent: a burst, then one per interval (default: cert_lifetime / 10).
renew_burst = 5
# renew_interval = "2h24m"

# Registry store: SQLite in state_dir (the default, one bastion). PostgreSQL holds the
# registry several bastions share; copy an existing SQLite registry into it once with
# `bastide store migrate --to postgres` (see docs/store.md). Changes need a restart.
# [store]
# backend = "postgres"
# host = "db1.example.org"        # or url = "postgresql://bastide@db1.example.org:5432/bastide"
# port = 5432
# dbname = "bastide"
# user = "bastide"
# password_file = "/etc/bastide/postgres.password"   # mode 0600
# sslmode = "verify-full"         # or "disable", for a server on loopback or a Unix socket
# ca_file = "/etc/bastide/postgres-ca.pem"
# pool_size = 4
# timeout = "10s"
# node = "bastion-a"              # this node's name among the bastions (default: host name)
# max_disconnected = "60s"        # cut off from PostgreSQL longer: no new agent session

# Unix socket of the admin CLI (never a TCP port).
[admin]
socket = "{dir}/admin.sock"
# 0o600, or 0o660 to let the daemon's group administer it.
mode = 0o600

# Prometheus endpoint: /metrics (the bastion), /metrics/agents[/NAME] (the VMs' host
# metrics), /sd (HTTP service discovery, one target per agent).
[metrics]
listen = {metrics_listen}
# Client networks allowed to scrape.
allow = ["127.0.0.0/8", "::1/128"]
# bearer_token_file = "/etc/bastide/metrics.token"
# tls = true                      # HTTPS with the bastion's server certificate
stale_after = "5m"                # drop an agent's host metrics after this silence
# Mail relay for the VMs' system mail (off while commented out; see the README).
# [smtp]
# listen = ["10.0.0.1:25"]
# allow = ["10.0.0.0/24"]         # client networks; enrolled agents' addresses are allowed too
# sender_address = "vm-mail@example.org"
# admin_address = "ops@example.org"
# [smtp.relay]
# host = "smtp.example.org"
# port = 587
# tls = "required"

# SSH jump host (ssh -J admin@bastion root@vm). Uncomment and add admins and rules.
# [ssh]
# listen = ["0.0.0.0:22"]
# audit_log = "/var/log/bastide/ssh-audit.jsonl"   # default: <state_dir>/ssh-audit.jsonl
# public_host = "bastion.example.org"             # default: from the first listen address
#
# [[ssh.admins]]
# name = "alice"
# keys = ["ssh-ed25519 AAAA... alice@laptop"]
# groups = ["ops"]
#
# [[ssh.rules]]
# groups = ["ops"]
# agents = ["*"]
# ports = [22]

# Log store: agents ship their logs here, and [syslog] writes here too. Files are
# <dir>/<host>/<YYYY-MM-DD>.log (UTC day of reception), one line per event.
# [logs]
# dir = "{dir}/logs"
# retention_days = 90             # today included; 0 keeps everything
# max_total_bytes = 0             # oldest days deleted beyond this; 0: no limit
# compress_after_days = 2         # gzip older days (DAY.log.gz); 0: never
# max_event_bytes = 65536         # longer agent messages are truncated (and counted)
# retention_interval = "1h"
#
# Forward every event, as RFC 5424, to a central collector (bounded disk queue, retries).
# [logs.forward]
# target = "logs.example.org:6514"
# protocol = "tls"                # or "tcp"
# ca_file = "/etc/bastide/collector-ca.pem"
# max_queue_bytes = 1073741824
# retry_initial = "1s"
# retry_max = "60s"

# Syslog receiver for machines without an agent (needs [logs]). Each protocol has its list
# of addresses.
# [syslog]
# udp = ["0.0.0.0:514"]
# tcp = ["0.0.0.0:514"]           # octet-counting and newline framing
# tls = ["0.0.0.0:6514"]          # RFC 5425, with the bastion's server certificate
# allow = ["10.0.0.0/24"]         # enrolled agents' addresses are allowed too
# allow_agents = true
# max_message_bytes = 8192        # longer messages are truncated (and counted)
# max_connections = 1024
# idle_timeout = "1h"
# Configuration push: the environment tree (a git checkout) rendered per agent and pushed
# over the agents' sessions. See "Configuration push" in the README.
# [config_push]
# dir = "/srv/env"
# # or, instead of dir, a repository the bastion fetches (see the README):
# # git = {{ url = "ssh://git@gitlab.example/infra/env.git", branch = "main", poll_interval = "60s",
# #         ssh_key = "/etc/bastide/env-deploy-key", ssh_known_hosts = "/etc/bastide/gitlab.known_hosts",
# #         allowed_signers = "/etc/bastide/env-signers", verify = "all" }}
# cloud = "ovh"
# site = "gra"
# instance = "production"
# bastion_address = "10.0.0.1"   # how VMs reach the bastion (template variable)
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let dir = std::env::temp_dir().join(format!("bastide-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.toml");
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/x\"\n[agents]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("b.toml"), "{e}");
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/x\"\n[agents]\nlisten = \"nope\"\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
    }

    /// Every table, with every key that has no default.
    const EVERY_TABLE: &str = r#"
project = "p"
state_dir = "/x"
[agents]
listen = "127.0.0.1:1"
[admin]
socket = "/x/admin.sock"
[metrics]
listen = "127.0.0.1:2"
[dns]
listen = "127.0.0.1:3"
[[dns.records]]
name = "www"
type = "A"
value = "10.0.0.1"
[smtp]
listen = "127.0.0.1:4"
[smtp.relay]
host = "smtp.example.org"
[ssh]
listen = "127.0.0.1:5"
[[ssh.admins]]
name = "alice"
[[ssh.rules]]
[logs]
[logs.forward]
target = "logs.example.org:6514"
[syslog]
udp = "127.0.0.1:6"
[config_push]
dir = "/srv/env"
cloud = "c"
site = "s"
instance = "i"
"#;

    /// Each key of `v` as a path (`dns.records[0].name`), leaves and tables alike.
    fn key_paths(v: &toml::Value, out: &mut Vec<Vec<String>>, at: Vec<String>) {
        let mut push = |k: String, v: &toml::Value| {
            let mut at = at.clone();
            at.push(k);
            out.push(at.clone());
            key_paths(v, out, at);
        };
        match v {
            toml::Value::Table(t) => t.iter().for_each(|(k, v)| push(k.clone(), v)),
            toml::Value::Array(a) if a.iter().all(|v| v.is_table()) => {
                a.iter().enumerate().for_each(|(i, v)| {
                    key_paths(v, out, {
                        let mut at = at.clone();
                        at.push(format!("[{i}]"));
                        at
                    })
                })
            }
            _ => {}
        }
    }

    fn without(v: &toml::Value, path: &[String]) -> toml::Value {
        let mut v = v.clone();
        let mut cur = &mut v;
        for (n, seg) in path.iter().enumerate() {
            let last = n + 1 == path.len();
            cur = match cur {
                toml::Value::Table(t) if last => {
                    t.remove(seg);
                    break;
                }
                toml::Value::Table(t) => t.get_mut(seg).unwrap(),
                toml::Value::Array(a) => {
                    let i: usize = seg.trim_matches(['[', ']']).parse().unwrap();
                    &mut a[i]
                }
                _ => unreachable!(),
            };
        }
        v
    }

    /// Every key without a default, in every table, says what to put there when missing.
    #[test]
    fn required_keys_have_hints() {
        let full: toml::Value = toml::from_str(EVERY_TABLE).unwrap();
        bastide_common::tomlcfg::parse::<Config>(EVERY_TABLE, REQUIRED_KEY_HINTS).unwrap();
        let mut paths = Vec::new();
        key_paths(&full, &mut paths, Vec::new());
        let mut required = Vec::new();
        for p in paths {
            let text = toml::to_string(&without(&full, &p)).unwrap();
            let Err(problems) = bastide_common::tomlcfg::parse::<Config>(&text, REQUIRED_KEY_HINTS)
            else {
                continue;
            };
            for pr in problems
                .iter()
                .filter(|p| p.contains("required key missing"))
            {
                required.push(pr.clone());
                assert!(
                    pr.contains("required key missing: "),
                    "no hint in REQUIRED_KEY_HINTS for: {pr}"
                );
            }
        }
        // The probe finds them: tables, listeners, names.
        for k in [
            "project",
            "agents.listen",
            "ssh.admins[0].name",
            "smtp.relay.host",
        ] {
            assert!(
                required.iter().any(|r| r.starts_with(&format!("{k}: "))),
                "{k} not found required in {required:#?}"
            );
        }
        // And ssh.audit_log is not required any more: it has a default.
        assert!(!required.iter().any(|r| r.contains("audit_log")));
    }

    #[test]
    fn every_listen_takes_one_address_or_a_list() {
        let dir = std::env::temp_dir().join(format!("bastide-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.toml");
        let lists = EVERY_TABLE
            .replace(
                "listen = \"127.0.0.1:1\"",
                "listen = [\"127.0.0.1:1\", \"[::1]:1\"]",
            )
            .replace(
                "listen = \"127.0.0.1:5\"",
                "listen = [\"127.0.0.1:5\", \"10.0.0.7:22\"]",
            )
            .replace(
                "udp = \"127.0.0.1:6\"",
                "udp = [\"127.0.0.1:6\"]\ntcp = \"127.0.0.1:6\"",
            );
        std::fs::write(&f, &lists).unwrap();
        let cfg = Config::parse_file(&f).unwrap();
        assert_eq!(cfg.agents.as_ref().unwrap().listen.len(), 2);
        assert_eq!(cfg.metrics.as_ref().unwrap().listen.len(), 1);
        assert_eq!(cfg.syslog.as_ref().unwrap().tcp.len(), 1);
        // The advertised SSH address is the first specific one, its port the default port.
        assert_eq!(
            crate::ssh::hosts::public_endpoint(&cfg),
            Some(("127.0.0.1".into(), 5))
        );
        let own = cfg.listen_addresses();
        for ip in ["127.0.0.1", "::1", "10.0.0.7"] {
            assert!(own.contains(&ip.parse().unwrap()), "{ip} {own:?}");
        }
        // `allow` takes CIDRs or addresses in every table.
        std::fs::write(
            &f,
            format!("{lists}\n")
                .replace(
                    "[metrics]\n",
                    "[metrics]\nallow = [\"10.0.0.5\", \"10.1.0.0/16\"]\n",
                )
                .replace("[syslog]\n", "[syslog]\nallow = \"10.0.0.9\"\n"),
        )
        .unwrap();
        let cfg = Config::parse_file(&f).unwrap();
        assert_eq!(
            cfg.metrics.unwrap().allow,
            vec![
                "10.0.0.5/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(
            cfg.syslog.unwrap().allow,
            vec!["10.0.0.9/32".parse().unwrap()]
        );
        std::fs::write(
            &f,
            lists.replace(
                "[metrics]\n",
                "[metrics]\nallow = [\"10.0.0.5\", \"nope\"]\n",
            ),
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("metrics.allow[1]: \"nope\" is not a network"),
            "{e}"
        );
        std::fs::write(&f, lists.replace("listen = \"127.0.0.1:4\"", "listen = []")).unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("smtp.listen: at least one address is needed"),
            "{e}"
        );
    }

    #[test]
    fn agent_networks_and_claimed_addresses() {
        let dir = std::env::temp_dir().join(format!("bastide-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.toml");
        let base = "project = \"p\"\nstate_dir = \"/x\"\n[agents]\nlisten = \"10.0.0.1:4443\"\n";
        std::fs::write(&f, format!("{base}networks = [\"10.0.0.0/33\"]\n")).unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("networks"), "{e}");
        std::fs::write(&f, format!("{base}claimed_addresses = \"all\"\n")).unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("claimed_addresses") || e.contains("observed"),
            "{e}"
        );
        std::fs::write(
            &f,
            format!("{base}networks = [\"127.0.0.0/8\"]\nclaimed_addresses = \"networks\"\n[ssh]\nlisten = \"127.0.0.5:22\"\naudit_log = \"/tmp/a\"\n"),
        )
        .unwrap();
        let cfg = Config::parse_file(&f).unwrap();
        let p = cfg.address_policy();
        assert_eq!(p.claimed, crate::addresses::ClaimedAddresses::Networks);
        // Listen addresses are the bastion's own, never an agent's.
        for own in ["10.0.0.1", "127.0.0.5", "127.0.0.1"] {
            assert!(p.check(own.parse().unwrap()).is_err(), "{own}");
        }
        assert!(p.check("127.0.0.6".parse().unwrap()).is_ok());
    }

    #[test]
    fn all_problems_at_once() {
        let dir = std::env::temp_dir().join(format!("bastide-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.toml");
        std::fs::write(
            &f,
            "project = \"Bad Name\"\nstate_dir = \"/nonexistent\"\n[agents]\nlisten = \"127.0.0.1:1\"\nheartbeat_interval = \"10s\"\nheartbeat_timeout = \"5s\"\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("project"), "{e}");
        assert!(e.contains("state_dir"), "{e}");
        assert!(e.contains("heartbeat_timeout"), "{e}");
    }

    #[test]
    fn agents_endpoint_bounds_are_checked() {
        let dir = std::env::temp_dir().join(format!("bastide-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.toml");
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/nonexistent\"\n[agents]\nlisten = \"127.0.0.1:1\"\nmax_unauthenticated_connections = 0\nmax_unauthenticated_per_address = 0\nunauthenticated_idle_timeout = \"0s\"\nunauthenticated_lifetime = \"0s\"\nrenew_burst = 0\nrenew_interval = \"0s\"\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        for key in [
            "agents.max_unauthenticated_connections",
            "agents.max_unauthenticated_per_address",
            "agents.unauthenticated_idle_timeout",
            "agents.unauthenticated_lifetime",
            "agents.renew_burst",
            "agents.renew_interval",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/x\"\n[agents]\nlisten = \"127.0.0.1:1\"\ncert_lifetime = \"10h\"\n",
        )
        .unwrap();
        let a = Config::parse_file(&f).unwrap().agents.unwrap();
        assert_eq!(a.renew_interval(), Duration::from_secs(3600));
        assert_eq!(a.max_unauthenticated_per_address, 32);
    }

    #[test]
    fn dns_problems_are_named() {
        let dir = std::env::temp_dir().join(format!("bastide-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.toml");
        std::fs::write(
            &f,
            "project = \"p\"\nzone = \"p.test.\"\nstate_dir = \"/x\"\n[dns]\nlisten = [\"127.0.0.1:53\"]\nallow = [\"10.0.0.0/33\"]\nservfail_ttl = \"1m\"\n[[dns.records]]\nname = \"a\"\ntype = \"A\"\nvalue = \"x\"\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("b.toml: dns.allow:"), "{e}");
        assert!(e.contains("dns.servfail_ttl"), "{e}");
        assert!(e.contains("dns.records[0]"), "{e}");
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/x\"\n[dns]\nlisten = [\"127.0.0.1:53\"]\nbogus = 1\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn logs_and_syslog_problems_are_named() {
        let dir = std::env::temp_dir().join(format!("bastide-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.toml");
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/x\"\n[syslog]\nallow_agents = false\nmax_message_bytes = 10\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("b.toml: syslog: needs a [logs] table"), "{e}");
        assert!(e.contains("syslog.udp: no listener"), "{e}");
        assert!(e.contains("syslog.allow:"), "{e}");
        assert!(e.contains("syslog.max_message_bytes"), "{e}");
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/x\"\n[logs]\ndir = \"rel\"\n[logs.forward]\ntarget = \"nohost\"\nprotocol = \"tls\"\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("logs.dir"), "{e}");
        assert!(e.contains("logs.forward.target"), "{e}");
        assert!(e.contains("logs.forward.ca_file"), "{e}");
        std::fs::write(
            &f,
            "project = \"p\"\nstate_dir = \"/x\"\n[logs]\nbogus = 1\n",
        )
        .unwrap();
        let e = Config::load(&f).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
