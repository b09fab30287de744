//! The `[ssh]` table and the policy compiled from it: admins with their keys and certificate
//! authorities, groups and access rules. The policy is rebuilt on reload and read per
//! connection, so open sessions keep the policy they authenticated with for their identity
//! while new channels see the new rules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, HashAlg, PublicKey};
use serde::Deserialize;

/// Smallest RSA modulus accepted for admin keys and CAs.
pub const MIN_RSA_BITS: u32 = 3072;

/// `[ssh]`: the jump-host service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// Addresses admins connect to (one string or a list).
    #[serde(deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Append-only JSON-lines audit log of every jump attempt (default:
    /// `<state_dir>/ssh-audit.jsonl`, see [`SshConfig::audit_log_path`]).
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// false (the default): a jump whose start line cannot be written to `audit_log` (disk
    /// full, I/O error) is refused, so no session runs unaudited. true: it is let through and
    /// only logged. Read at start-up, like `audit_log`.
    #[serde(default)]
    pub audit_fail_open: bool,
    /// Name (or address) admins use to reach the bastion, for `bastide ssh config` and
    /// `bastide ssh known-hosts`. Default: the listen address.
    #[serde(default)]
    pub public_host: Option<String>,
    /// Port admins use to reach the bastion. Default: the listen port.
    #[serde(default)]
    pub public_port: Option<u16>,
    /// Time a client has to authenticate (OpenSSH's LoginGraceTime).
    #[serde(default = "default_auth_timeout", with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Failed authentication attempts before the connection is closed (MaxAuthTries).
    #[serde(default = "default_max_auth_attempts")]
    pub max_auth_attempts: usize,
    /// Delay on each refused authentication attempt (never on the first "none" probe).
    #[serde(default = "default_auth_rejection_delay", with = "humantime_serde")]
    pub auth_rejection_delay: Duration,
    /// Per source address: connections that fail to authenticate allowed in a burst...
    #[serde(default = "default_rate_burst")]
    pub rate_limit_burst: u32,
    /// ...and the time it takes to earn one more.
    #[serde(default = "default_rate_refill", with = "humantime_serde")]
    pub rate_limit_refill: Duration,
    /// Most jump sessions (channels) open at once per admin.
    #[serde(default = "default_max_sessions")]
    pub max_sessions_per_admin: usize,
    /// Most SSH connections at once (authenticated or not).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A jump channel with no data either way for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// SSH keepalive probe interval towards silent clients (also TCP keepalive time).
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Time allowed to connect to a target.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Host-certificate CA public keys, printed as `@cert-authority` lines by
    /// `bastide ssh known-hosts`.
    #[serde(default)]
    pub host_cert_authorities: Vec<String>,
    #[serde(default)]
    pub admins: Vec<AdminEntry>,
    #[serde(default)]
    pub rules: Vec<RuleEntry>,
    /// The bastion starts a key re-exchange after this many bytes either way on a
    /// connection (at most 1 GiB, the default, RFC 4253 section 9)...
    #[serde(default = "default_rekey_limit")]
    pub rekey_limit: usize,
    /// ...or after this long.
    #[serde(default = "default_rekey_interval", with = "humantime_serde")]
    pub rekey_interval: Duration,
    /// `[ssh.sso]`: single sign-on with an OpenID Connect provider (read at start).
    #[serde(default)]
    pub sso: Option<super::sso::config::SsoConfig>,
    /// A jump channel whose target accepts no byte for this long while its buffer
    /// (`target_buffer` bytes) is full is closed: until then the whole connection waits
    /// (russh re-opens a channel's window as data arrives, not as the target takes it).
    #[serde(default = "default_target_stall_timeout", with = "humantime_serde")]
    pub target_stall_timeout: Duration,
}

/// `[[ssh.admins]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminEntry {
    /// The login name (`ssh -J alice@bastion`).
    pub name: String,
    /// `authorized_keys` lines: plain keys, or `cert-authority[,principals="a,b"] KEY` for a
    /// user-certificate CA.
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `[[ssh.rules]]`: who may reach what. Selectors that are given must all match; at least
/// one of `agents`, `labels`, `cidrs`, `hosts` is required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Globs on enrolled agent names.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Labels the agent must all carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Networks the resolved target address must be in.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Globs on host names that are not agents (resolved with DNS by the bastion).
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
}

fn default_auth_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_auth_attempts() -> usize {
    6
}
fn default_auth_rejection_delay() -> Duration {
    Duration::from_millis(500)
}
fn default_rate_burst() -> u32 {
    10
}
fn default_rate_refill() -> Duration {
    Duration::from_secs(6)
}
fn default_max_sessions() -> usize {
    64
}
fn default_max_connections() -> usize {
    4096
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_rekey_limit() -> usize {
    1 << 30
}
fn default_rekey_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_target_stall_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_ports() -> Vec<u16> {
    vec![22]
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A key an admin may log in with.
#[derive(Debug, Clone)]
pub struct AdminKey {
    pub key: KeyData,
}

/// A user-certificate CA trusted for one admin.
#[derive(Debug, Clone)]
pub struct CertAuthority {
    pub key: KeyData,
    /// `principals="..."`: names accepted instead of the login name.
    pub principals: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub name: String,
    pub keys: Vec<AdminKey>,
    pub cas: Vec<CertAuthority>,
    pub groups: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub admins: BTreeSet<String>,
    pub groups: BTreeSet<String>,
    pub agents: Vec<GlobMatcher>,
    pub labels: BTreeMap<String, String>,
    pub cidrs: Vec<Cidr>,
    pub hosts: Vec<GlobMatcher>,
    pub ports: BTreeSet<u16>,
    /// Position in the file, for audit reasons.
    pub index: usize,
}

/// Everything the service decides with, rebuilt on reload.
#[derive(Debug, Clone)]
pub struct Policy {
    pub admins: BTreeMap<String, Admin>,
    pub rules: Vec<Rule>,
    /// Project zone without the trailing dot, lowercase.
    pub zone: Option<String>,
    pub max_sessions_per_admin: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub target_stall_timeout: Duration,
}

fn glob(pattern: &str) -> Result<GlobMatcher, String> {
    Glob::new(&pattern.to_ascii_lowercase())
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{pattern:?}: {e}"))
}

fn key_problem(key: &PublicKey) -> Option<String> {
    key_data_problem(key.key_data())
}

/// Why a key is not acceptable (weak or obsolete algorithm), if it is not.
pub fn key_data_problem(key: &KeyData) -> Option<String> {
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => None,
        Algorithm::Rsa { .. } => match key.rsa() {
            Some(rsa) if rsa.key_size() >= MIN_RSA_BITS => None,
            Some(rsa) => Some(format!(
                "RSA key of {} bits: at least {MIN_RSA_BITS} required",
                rsa.key_size()
            )),
            None => Some("malformed RSA key".into()),
        },
        other => Some(format!(
            "{other} keys are not accepted (Ed25519, ECDSA, RSA >= 3072)"
        )),
    }
}

/// Splits an `authorized_keys` line into its options (if any) and the key, as sshd does:
/// the line starts with the key type, or with options up to the first unquoted space.
fn split_options(line: &str) -> (Option<&str>, &str) {
    let first = line.split_whitespace().next().unwrap_or("");
    if first.starts_with("ssh-") || first.starts_with("ecdsa-") || first.starts_with("sk-") {
        return (None, line);
    }
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return (Some(&line[..i]), line[i..].trim_start()),
            _ => {}
        }
    }
    (None, line)
}

/// Splits options on unquoted commas.
fn options(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut start) = (false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

/// Parses one `authorized_keys` line of an admin.
fn parse_admin_key(line: &str) -> Result<Result<AdminKey, CertAuthority>, String> {
    let (opts, key) = split_options(line.trim());
    let public =
        PublicKey::from_openssh(key).map_err(|e| format!("not an authorized_keys line: {e}"))?;
    if let Some(p) = key_problem(&public) {
        return Err(p);
    }
    let mut ca = false;
    let mut principals = None;
    for opt in options(opts.unwrap_or("")) {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v.trim_matches('"'))),
            None => (opt, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("cert-authority", None) => ca = true,
            ("principals", Some(v)) => {
                principals = Some(
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            _ => {
                return Err(format!(
                    "option {opt:?} is not supported (cert-authority, principals=)"
                ))
            }
        }
    }
    let key = public.key_data().clone();
    if ca {
        Ok(Err(CertAuthority { key, principals }))
    } else if principals.is_some() {
        Err("principals= needs cert-authority".into())
    } else {
        Ok(Ok(AdminKey { key }))
    }
}

pub use super::names::valid_name;

/// Name of the SSH audit log in the state directory when `audit_log` is not set.
pub const DEFAULT_AUDIT_LOG: &str = "ssh-audit.jsonl";

impl SshConfig {
    /// The audit log: `audit_log`, else `<state_dir>/ssh-audit.jsonl` (always writable by
    /// the daemon, also under the systemd unit's sandbox; Teleport keeps its audit log under
    /// its data directory the same way).
    pub fn audit_log_path(&self, state_dir: &std::path::Path) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| state_dir.join(DEFAULT_AUDIT_LOG))
    }

    /// Every problem, each as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(e) = Policy::build(self, None) {
            out.extend(e);
        }
        let mut bad = |k: &str, r: &str| out.push((format!("ssh.{k}"), r.to_string()));
        if self.auth_timeout.is_zero() {
            bad("auth_timeout", "must be positive");
        }
        if self.max_auth_attempts == 0 {
            bad("max_auth_attempts", "must be positive");
        }
        if self.rate_limit_burst == 0 {
            bad("rate_limit_burst", "must be positive");
        }
        if self.rate_limit_refill.is_zero() {
            bad("rate_limit_refill", "must be positive");
        }
        if self.max_sessions_per_admin == 0 {
            bad("max_sessions_per_admin", "must be positive");
        }
        if self.max_connections == 0 {
            bad("max_connections", "must be positive");
        }
        if self.idle_timeout.is_zero() {
            bad("idle_timeout", "must be positive");
        }
        if !(1 << 16..=1 << 30).contains(&self.rekey_limit) {
            bad("rekey_limit", "must be between 64 KiB and 1 GiB (bytes)");
        }
        if self.rekey_interval < Duration::from_secs(1) {
            bad("rekey_interval", "must be at least 1s");
        }
        if self.keepalive_interval.is_zero() {
            bad("keepalive_interval", "must be positive");
        }
        if self.target_stall_timeout.is_zero() {
            bad("target_stall_timeout", "must be positive");
        }
        if self.connect_timeout.is_zero() {
            bad("connect_timeout", "must be positive");
        }
        // The default lives in the state directory, which is checked on its own.
        if let Some(f) = &self.audit_log {
            match f.parent() {
                Some(p) if p.is_dir() => {}
                _ => bad(
                    "audit_log",
                    &format!("the directory of {} does not exist", f.display()),
                ),
            }
        }
        let sso_problems = self.sso.as_ref().map(|s| s.problems()).unwrap_or_default();
        for (i, line) in self.host_cert_authorities.iter().enumerate() {
            match PublicKey::from_openssh(line.trim()) {
                Ok(k) => {
                    if let Some(p) = key_problem(&k) {
                        bad(&format!("host_cert_authorities[{i}]"), &p);
                    }
                }
                Err(e) => bad(
                    &format!("host_cert_authorities[{i}]"),
                    &format!("not an OpenSSH public key: {e}"),
                ),
            }
        }
        out.extend(sso_problems);
        out
    }
}

impl Policy {
    /// Compiles the policy; every problem at once as (key, reason).
    pub fn build(cfg: &SshConfig, zone: Option<&str>) -> Result<Policy, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut admins = BTreeMap::new();
        for (i, a) in cfg.admins.iter().enumerate() {
            let k = format!("ssh.admins[{i}]");
            if !valid_name(&a.name) {
                problems.push((
                    format!("{k}.name"),
                    format!("{:?} is not a valid login name", a.name),
                ));
            }
            let mut admin = Admin {
                name: a.name.clone(),
                keys: Vec::new(),
                cas: Vec::new(),
                groups: a.groups.iter().cloned().collect(),
            };
            for (j, line) in a.keys.iter().enumerate() {
                match parse_admin_key(line) {
                    Ok(Ok(key)) => admin.keys.push(key),
                    Ok(Err(ca)) => admin.cas.push(ca),
                    Err(e) => problems.push((format!("{k}.keys[{j}]"), e)),
                }
            }
            if a.keys.is_empty() {
                problems.push((
                    format!("{k}.keys"),
                    "an admin needs at least one key or cert-authority".into(),
                ));
            }
            for g in &a.groups {
                if !valid_name(g) {
                    problems.push((
                        format!("{k}.groups"),
                        format!("{g:?} is not a valid group name"),
                    ));
                }
            }
            if admins.insert(a.name.clone(), admin).is_some() {
                problems.push((
                    format!("{k}.name"),
                    format!("admin {:?} is defined twice", a.name),
                ));
            }
        }
        let mut rules = Vec::new();
        for (i, r) in cfg.rules.iter().enumerate() {
            let k = format!("ssh.rules[{i}]");
            if r.admins.is_empty() && r.groups.is_empty() {
                problems.push((k.clone(), "names no admins and no groups".into()));
            }
            for a in &r.admins {
                if !cfg.admins.iter().any(|x| &x.name == a) {
                    problems.push((format!("{k}.admins"), format!("unknown admin {a:?}")));
                }
            }
            if r.agents.is_empty()
                && r.labels.is_empty()
                && r.cidrs.is_empty()
                && r.hosts.is_empty()
            {
                problems.push((
                    k.clone(),
                    "needs at least one of agents, labels, cidrs, hosts".into(),
                ));
            }
            if r.ports.is_empty() || r.ports.contains(&0) {
                problems.push((
                    format!("{k}.ports"),
                    "must list ports between 1 and 65535".into(),
                ));
            }
            let mut rule = Rule {
                admins: r.admins.iter().cloned().collect(),
                groups: r.groups.iter().cloned().collect(),
                agents: Vec::new(),
                labels: r.labels.clone(),
                cidrs: Vec::new(),
                hosts: Vec::new(),
                ports: r.ports.iter().copied().collect(),
                index: i,
            };
            for (field, list, out) in [
                ("agents", &r.agents, &mut rule.agents),
                ("hosts", &r.hosts, &mut rule.hosts),
            ] {
                for p in list {
                    match glob(p) {
                        Ok(g) => out.push(g),
                        Err(e) => problems.push((format!("{k}.{field}"), e)),
                    }
                }
            }
            for c in &r.cidrs {
                match c.parse::<Cidr>() {
                    Ok(c) => rule.cidrs.push(c),
                    Err(e) => problems.push((format!("{k}.cidrs"), e)),
                }
            }
            rules.push(rule);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Policy {
            admins,
            rules,
            zone: zone.map(|z| z.trim_end_matches('.').to_ascii_lowercase()),
            max_sessions_per_admin: cfg.max_sessions_per_admin,
            idle_timeout: cfg.idle_timeout,
            connect_timeout: cfg.connect_timeout,
            keepalive_interval: cfg.keepalive_interval,
            target_stall_timeout: cfg.target_stall_timeout,
        })
    }
}

/// SHA-256 fingerprint as OpenSSH prints it.
pub fn fingerprint(key: &KeyData) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let one: Cidr = "fd00::1".parse().unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn admin_key_lines() {
        let ed =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D a@b";
        assert!(matches!(parse_admin_key(ed), Ok(Ok(_))));
        let ca = format!("cert-authority,principals=\"ops,alice\" {ed}");
        match parse_admin_key(&ca) {
            Ok(Err(ca)) => assert_eq!(ca.principals.unwrap(), vec!["ops", "alice"]),
            other => panic!("{other:?}"),
        }
        assert!(parse_admin_key(&format!("from=\"1.2.3.4\" {ed}")).is_err());
        assert!(parse_admin_key("ssh-ed25519 garbage").is_err());
        let bare = ed.trim_end_matches(" a@b");
        assert!(matches!(
            parse_admin_key(&format!("cert-authority {bare}")),
            Ok(Err(_))
        ));
        assert!(matches!(parse_admin_key(bare), Ok(Ok(_))));
    }
}
