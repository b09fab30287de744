//! The registry's persistent store, behind one interface ([`Backend`]) with two
//! implementations: SQLite in the state directory (the default, for a single bastion) and
//! PostgreSQL (`[store] backend = "postgres"`, the state several bastions can share). Only the
//! registry writes it.
//!
//! The interface is synchronous, as the SQLite store always was: the registry calls it under
//! its own lock, from `spawn_blocking` on the hot paths (enrollment, registration), and an
//! `await` there would add a task hop to every SQLite write for nothing. The PostgreSQL
//! backend runs its asynchronous client (tokio-postgres, deadpool-postgres) on a runtime of
//! its own and blocks the caller on the answer, like a disk write (see `postgres.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

pub mod copy;
pub mod postgres;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("registry store {path}: {message}")]
    Open { path: String, message: String },
    #[error("registry store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("registry store (PostgreSQL): {0}")]
    Postgres(String),
    #[error("registry store (PostgreSQL) unavailable: {0}")]
    Unavailable(String),
    #[error("registry store: corrupt row: {0}")]
    Corrupt(String),
    /// A group commit (several registrations in one transaction) failed: its error, shared.
    #[error("registry store: {0}")]
    Batch(String),
    /// The token's last use was taken meanwhile (by another enrollment, maybe on another node).
    #[error("token {0} has no use left")]
    TokenUsed(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub hash: Vec<u8>,
    pub created: i64,
    pub expires: i64,
    pub uses_left: u32,
    pub uses_total: u32,
    pub name_pattern: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub replace: bool,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentRow {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub revoked: bool,
    pub enrolled_at: i64,
    pub hostname: String,
    pub addresses: Vec<String>,
    pub os: String,
    pub agent_version: String,
    pub ssh_host_keys: Vec<String>,
    pub last_seen: Option<i64>,
    pub cert_serial: String,
    pub cert_not_after: i64,
    pub token_id: String,
    /// Pushed configuration: revision wanted, revision applied, last error (empty: none).
    pub config_desired: String,
    pub config_applied: String,
    pub config_error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRow {
    pub serial: String,
    pub agent: String,
    pub issued_at: i64,
    pub not_after: i64,
    pub revoked: bool,
}

/// An SSH user certificate the bastion issued after a single sign-on (`[ssh.sso]`): the
/// groups it carries for `[[ssh.rules]]`, and whether it was revoked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SshCertRow {
    /// The certificate's serial (below 2^63, so that both backends store it as a signed
    /// 64-bit integer).
    pub serial: i64,
    pub admin: String,
    /// The ID token's `sub` at the provider.
    pub sub: String,
    pub groups: Vec<String>,
    /// SHA-256 fingerprint of the certified key.
    pub key_fingerprint: String,
    pub valid_after: i64,
    pub valid_before: i64,
    pub issued_at: i64,
    /// Address the login came from.
    pub source: String,
    pub revoked: bool,
}

/// How long an expired SSH certificate's row is kept: it still tells who used that key
/// (a key is one admin's only).
pub const SSH_CERT_KEEP: i64 = 30 * 24 * 3600;

/// Every row of a store: what `bastide store migrate` copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    pub tokens: Vec<TokenRow>,
    pub agents: Vec<AgentRow>,
    pub certs: Vec<CertRow>,
    /// The SSH user certificates issued after single sign-on (revocations included).
    pub ssh_certs: Vec<SshCertRow>,
    /// The project's identity facts ([`Backend::identity`]).
    pub identity: BTreeMap<String, String>,
}

/// Identity key: the pin (`sha256:...` of its SubjectPublicKeyInfo) of the agent CA every
/// node of the project must present.
pub const AGENT_CA_PIN: &str = "agent_ca_pin";

/// What the registry asks of its store. Each call is one transaction: it has happened
/// durably when it returns `Ok`.
pub trait Backend: Send {
    fn insert_token(&mut self, t: &TokenRow) -> Result<()>;
    fn token(&mut self, id: &str) -> Result<Option<TokenRow>>;
    /// Every token, oldest first.
    fn tokens(&mut self) -> Result<Vec<TokenRow>>;
    fn revoke_token(&mut self, id: &str) -> Result<bool>;
    /// Removes tokens expired for more than `grace` seconds.
    fn purge_tokens(&mut self, now: i64, grace: i64) -> Result<usize>;
    /// Every agent, by name.
    fn agents(&mut self) -> Result<Vec<AgentRow>>;
    fn certs(&mut self) -> Result<Vec<CertRow>>;
    /// Records an enrollment in one transaction: the token use (refused with
    /// [`StoreError::TokenUsed`] when none is left), the new certificate, the agent row
    /// (replacing any previous one of that name, its pushed-configuration state included)
    /// and the revocation of the previous holder's certificates.
    fn commit_enrollment(&mut self, token_id: &str, agent: &AgentRow, cert: &CertRow)
        -> Result<()>;
    /// Records a renewed certificate for an existing agent, in the same transaction as the
    /// pruning that keeps the table bounded (see [`Backend::prune_certs`]): the agent's other
    /// unrevoked certificates than `proving` (the one the renewal came on) and the new one
    /// are superseded and deleted. Returns the number of rows deleted.
    fn commit_renewal(
        &mut self,
        agent: &str,
        proving: &str,
        cert: &CertRow,
        now: i64,
    ) -> Result<usize>;
    /// Deletes certificates past their expiry. What the handshake check needs is kept: a
    /// revoked certificate stays known as revoked until it expires (so that its holder hears
    /// "revoked", and stops), and an expired one is refused by the certificate verifier before
    /// its serial is looked up. A serial missing from the table is refused too, so pruning
    /// can change why a certificate is refused, never whether.
    fn prune_certs(&mut self, now: i64) -> Result<usize>;
    /// Marks an agent and all its certificates revoked.
    fn revoke_agent(&mut self, name: &str) -> Result<bool>;
    /// Stores the facts an agent registered.
    fn update_facts(&mut self, a: &AgentRow) -> Result<()>;
    /// Stores the facts of several registrations (a group commit, see
    /// `crate::coalesce::GroupCommit`). One transaction where the backend overrides it; by
    /// default one per row, each durable when this returns.
    fn update_facts_many(&mut self, rows: &[AgentRow]) -> Result<()> {
        for a in rows {
            self.update_facts(a)?;
        }
        Ok(())
    }
    /// Persists last-seen times in one transaction (they are kept in memory between flushes).
    fn flush_last_seen(&mut self, seen: &[(String, i64)]) -> Result<()>;
    /// Persists pushed-configuration states (kept in memory between flushes) in one
    /// transaction: (name, desired, applied, error).
    fn flush_config(&mut self, rows: &[(String, String, String, String)]) -> Result<()>;
    /// A fact about the project this store belongs to ([`AGENT_CA_PIN`]), if recorded.
    fn identity(&mut self, key: &str) -> Result<Option<String>>;
    /// Every identity fact.
    fn identities(&mut self) -> Result<BTreeMap<String, String>>;
    /// Records `value` under `key` unless a value is there already; returns the value the
    /// store holds afterwards (the first node to claim wins, the others compare).
    fn claim_identity(&mut self, key: &str, value: &str) -> Result<String>;
    /// Whether the store holds no token, agent or certificate.
    fn is_empty(&mut self) -> Result<bool>;
    /// Writes every row of `d` in one transaction (into an empty store: the copy of
    /// `bastide store migrate`, and tests).
    fn import(&mut self, d: &Dump) -> Result<()>;
    /// Every row, for the copy.
    fn dump(&mut self) -> Result<Dump> {
        Ok(Dump {
            tokens: self.tokens()?,
            agents: self.agents()?,
            certs: self.certs()?,
            ssh_certs: self.ssh_certs()?,
            identity: self.identities()?,
        })
    }
    /// Which store this is, for logs ("SQLite /var/lib/bastide/registry.sqlite").
    fn describe(&self) -> String;
    /// Records an issued SSH user certificate, and deletes rows expired for more than
    /// [`SSH_CERT_KEEP`] in the same transaction.
    fn insert_ssh_cert(&mut self, c: &SshCertRow, now: i64) -> Result<()>;
    /// The issued SSH certificate of that serial.
    fn ssh_cert(&mut self, serial: i64) -> Result<Option<SshCertRow>>;
    /// Every issued SSH certificate row, by serial.
    fn ssh_certs(&mut self) -> Result<Vec<SshCertRow>>;
    /// Revokes the unrevoked certificates of that serial or of that admin (at least one
    /// given); returns the serials revoked.
    fn revoke_ssh_certs(&mut self, serial: Option<i64>, admin: Option<&str>) -> Result<Vec<i64>>;
}

/// The registry's store: one of the two backends.
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Store {
    /// Creates a new, empty SQLite store (`bastide init`). Fails if the file exists.
    pub fn create(path: &Path) -> Result<Self> {
        Ok(Self::Sqlite(SqliteStore::create(path)?))
    }

    /// Opens an existing SQLite store; a missing, unreadable or corrupt file is an error,
    /// never silently replaced by an empty one.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self::Sqlite(SqliteStore::open(path)?))
    }

    /// Opens the store `[store]` names: the SQLite file of the state directory, or the
    /// PostgreSQL database (whose schema is brought up to date first, one node at a time).
    pub fn open_configured(cfg: &StoreConfig, state_dir: &Path) -> Result<Self> {
        match cfg.backend {
            BackendKind::Sqlite => Self::open(&cfg.sqlite_path(state_dir)),
            BackendKind::Postgres => {
                let settings = cfg.postgres_settings(None).map_err(|e| StoreError::Open {
                    path: "[store]".into(),
                    message: e,
                })?;
                Ok(Self::Postgres(PgStore::connect(&settings)?))
            }
        }
    }
}

impl Store {
    /// Opens the configured store to read it (`check-config`): the PostgreSQL schema is not
    /// migrated (another version of bastide may be serving from it).
    pub fn open_for_check(cfg: &StoreConfig, state_dir: &Path) -> Result<Self> {
        match cfg.backend {
            BackendKind::Sqlite => Self::open(&cfg.sqlite_path(state_dir)),
            BackendKind::Postgres => {
                let settings = cfg.postgres_settings(None).map_err(|e| StoreError::Open {
                    path: "[store]".into(),
                    message: e,
                })?;
                Ok(Self::Postgres(PgStore::connect_without_migrating(
                    &settings,
                )?))
            }
        }
    }
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(p) => p,
        }
    }
}

impl std::ops::DerefMut for Store {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(p) => p,
        }
    }
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

pub(crate) fn unjson<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

// ---- configuration ----

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SslMode {
    /// TLS, the server's certificate checked against `ca_file` and its name against `host`.
    #[default]
    #[serde(rename = "verify-full")]
    VerifyFull,
    /// No TLS: only for a server on loopback or a Unix socket.
    #[serde(rename = "disable")]
    Disable,
}

/// `[store]`: where the registry lives. Absent: SQLite in the state directory. The PostgreSQL
/// keys may be set while `backend` is still "sqlite": that is how `bastide store migrate`
/// finds its target before the switch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: BackendKind,
    /// SQLite file (default `<state_dir>/registry.sqlite`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// PostgreSQL connection string, a URL ("postgresql://bastide@db1:5432/bastide") or
    /// key=value pairs; without password or sslmode (see `password_file`, `sslmode`).
    /// Instead of `host`, `port`, `dbname` and `user`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub dbname: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the password (mode 0600 or stricter); absent: no password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA certificate(s), PEM, that the server's certificate must chain to (verify-full).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Connections kept open to the server.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Bound on connecting and on each store operation.
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// This node's name among the bastions sharing the PostgreSQL store (default: the host
    /// name). Unique per node: it marks the agent sessions the node holds.
    #[serde(default)]
    pub node: Option<String>,
    /// A node cut off from PostgreSQL for longer than this stops accepting new agent
    /// sessions (a revocation made on another node could otherwise be dodged here).
    #[serde(default = "default_max_disconnected", with = "humantime_serde")]
    pub max_disconnected: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::default(),
            path: None,
            url: None,
            host: None,
            port: None,
            dbname: None,
            user: None,
            password_file: None,
            sslmode: SslMode::default(),
            ca_file: None,
            pool_size: default_pool_size(),
            timeout: default_store_timeout(),
            node: None,
            max_disconnected: default_max_disconnected(),
        }
    }
}

fn default_max_disconnected() -> Duration {
    Duration::from_secs(60)
}

fn default_pool_size() -> usize {
    4
}

fn default_store_timeout() -> Duration {
    Duration::from_secs(10)
}

/// What the PostgreSQL backend connects with, checked and resolved (password read).
#[derive(Clone)]
pub struct PgSettings {
    pub config: tokio_postgres::Config,
    /// PEM CA certificates when TLS is on.
    pub tls_ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    pub pool_size: usize,
    pub timeout: Duration,
    /// "postgresql://user@host:port/dbname (TLS verify-full)", for logs; no secret.
    pub describe: String,
}

impl StoreConfig {
    /// This node's name in the cluster: `node`, else the host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "bastion".to_string())
        })
    }

    pub fn sqlite_path(&self, state_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| state_dir.join("registry.sqlite"))
    }

    /// Whether any PostgreSQL key is set (they are then checked, whatever `backend` says).
    pub fn has_postgres_keys(&self) -> bool {
        self.url.is_some()
            || self.host.is_some()
            || self.port.is_some()
            || self.dbname.is_some()
            || self.user.is_some()
            || self.password_file.is_some()
            || self.ca_file.is_some()
    }

    /// Every problem of the section, as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.pool_size == 0 {
            out.push(("store.pool_size".into(), "must be at least 1".into()));
        }
        if self.timeout.is_zero() {
            out.push(("store.timeout".into(), "must be positive".into()));
        }
        if self.max_disconnected.is_zero() {
            out.push(("store.max_disconnected".into(), "must be positive".into()));
        }
        if let Some(n) = &self.node {
            let ok = !n.is_empty()
                && n.len() <= 63
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                out.push(("store.node".into(), "1-63 of [A-Za-z0-9._-]".into()));
            }
        }
        if self.backend == BackendKind::Postgres && self.path.is_some() {
            out.push((
                "store.path".into(),
                "is the SQLite file: not with backend = \"postgres\"".into(),
            ));
        }
        if self.backend == BackendKind::Postgres || self.has_postgres_keys() {
            if self.backend == BackendKind::Postgres && self.url.is_none() && self.host.is_none() {
                out.push((
                    "store".into(),
                    "backend = \"postgres\" needs `url` or `host`".into(),
                ));
            }
            if let Err(e) = self.postgres_settings(None) {
                out.push(("store".into(), e));
            }
        }
        out
    }

    /// The PostgreSQL settings of this section; `url` (from `bastide store migrate --url`)
    /// replaces the section's connection keys, the password file and TLS keys still apply.
    pub fn postgres_settings(&self, url: Option<&str>) -> std::result::Result<PgSettings, String> {
        let mut config = match url.or(self.url.as_deref()) {
            Some(u) => {
                if url.is_none()
                    && (self.host.is_some()
                        || self.port.is_some()
                        || self.dbname.is_some()
                        || self.user.is_some())
                {
                    return Err(
                        "set either `url` or `host`/`port`/`dbname`/`user`, not both".into(),
                    );
                }
                if u.contains("sslmode") || u.contains("sslrootcert") {
                    return Err(
                        "the connection string must not carry sslmode or sslrootcert: set `sslmode` and `ca_file` in [store]"
                            .into(),
                    );
                }
                let c: tokio_postgres::Config =
                    u.parse().map_err(|e| format!("connection string: {e}"))?;
                if c.get_password().is_some() {
                    return Err(
                        "the connection string must not carry the password: put it in a file named by `password_file` (mode 0600)"
                            .into(),
                    );
                }
                c
            }
            None => {
                let mut c = tokio_postgres::Config::new();
                c.host(self.host.as_deref().unwrap_or("localhost"));
                c.port(self.port.unwrap_or(5432));
                c.dbname(self.dbname.as_deref().unwrap_or("bastide"));
                c.user(self.user.as_deref().unwrap_or("bastide"));
                c
            }
        };
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        if config.get_user().is_none() {
            config.user("bastide");
        }
        if config.get_dbname().is_none() {
            let user = config.get_user().unwrap_or("bastide").to_string();
            config.dbname(&user);
        }
        if let Some(p) = &self.password_file {
            crate::fsutil::check_secret_file(p).map_err(|e| format!("password_file: {e:#}"))?;
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("password_file {}: {e}", p.display()))?;
            let pw = text.trim_end_matches(['\n', '\r']);
            if pw.is_empty() || pw.contains('\n') {
                return Err(format!(
                    "password_file {}: must hold the password on one line",
                    p.display()
                ));
            }
            config.password(pw);
        }
        config.application_name("bastide");
        config.connect_timeout(self.timeout);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let tls_ca = match self.sslmode {
            SslMode::Disable => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
            SslMode::VerifyFull => {
                let Some(ca) = &self.ca_file else {
                    return Err(
                        "sslmode = \"verify-full\" (the default) needs `ca_file`, the CA that signed the server's certificate (or sslmode = \"disable\" for a server on loopback)"
                            .into(),
                    );
                };
                use rustls_pki_types::pem::PemObject;
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                    .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
                if certs.is_empty() {
                    return Err(format!("ca_file {}: no certificate in it", ca.display()));
                }
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(certs)
            }
        };
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(|p| p.to_string()).collect();
        let describe = format!(
            "PostgreSQL {}@{}:{}/{} ({})",
            config.get_user().unwrap_or(""),
            hosts.join(","),
            if ports.is_empty() {
                "5432".to_string()
            } else {
                ports.join(",")
            },
            config.get_dbname().unwrap_or(""),
            match self.sslmode {
                SslMode::Disable => "no TLS",
                SslMode::VerifyFull => "TLS verify-full",
            }
        );
        Ok(PgSettings {
            config,
            tls_ca,
            pool_size: self.pool_size.max(1),
            timeout: self.timeout,
            describe,
        })
    }
}

/// The interface's tests, run against both backends: SQLite in a temporary directory and a
/// real PostgreSQL started for the test (`bastide_tests::Postgres`; the test fails when
/// PostgreSQL's programs are missing).
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bastide_tests::Postgres;

    /// A store of one backend, with what it needs kept alive.
    #[allow(dead_code)] // `pg` and `dir` are kept alive for the store, not read.
    pub(crate) struct Fixture {
        pub store: Store,
        pub pg: Option<Postgres>,
        pub dir: PathBuf,
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bastide-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub(crate) fn sqlite() -> Fixture {
        let dir = temp_dir();
        let store = Store::create(&dir.join("r.sqlite")).unwrap();
        Fixture {
            store,
            pg: None,
            dir,
        }
    }

    /// `[store]` for a database of `pg`, password in a 0600 file of `dir`.
    pub(crate) fn pg_config(pg: &Postgres, db: &str, dir: &Path) -> StoreConfig {
        let pw = dir.join(format!("pg-password-{db}"));
        pg.write_password_file(&pw);
        StoreConfig {
            backend: BackendKind::Postgres,
            url: Some(pg.url(db)),
            password_file: Some(pw),
            sslmode: SslMode::Disable,
            ..StoreConfig::default()
        }
    }

    pub(crate) fn postgres() -> Fixture {
        let pg = Postgres::start();
        let dir = temp_dir();
        pg.create_db("registry");
        let cfg = pg_config(&pg, "registry", &dir);
        let store = Store::open_configured(&cfg, &dir).unwrap();
        Fixture {
            store,
            pg: Some(pg),
            dir,
        }
    }

    /// Runs `f` on a fresh store of each backend.
    fn each_backend(f: impl Fn(&mut Store)) {
        for mut fx in [sqlite(), postgres()] {
            let what = fx.store.describe();
            eprintln!("--- {what}");
            f(&mut fx.store);
        }
    }

    #[test]
    fn ssh_certs_record_revoke_and_prune() {
        each_backend(|s| {
            let row = |serial: i64, admin: &str, before: i64| SshCertRow {
                serial,
                admin: admin.into(),
                sub: format!("sub-{admin}"),
                groups: vec!["ops".into(), "dba".into()],
                key_fingerprint: format!("SHA256:{serial}"),
                valid_after: 100,
                valid_before: before,
                issued_at: 100,
                source: "127.0.0.1".into(),
                revoked: false,
            };
            let big = i64::MAX - 1;
            s.insert_ssh_cert(&row(big, "alice", 1000), 200).unwrap();
            s.insert_ssh_cert(&row(2, "alice", 1000), 200).unwrap();
            s.insert_ssh_cert(&row(3, "bob", 1000), 200).unwrap();
            assert_eq!(s.ssh_cert(big).unwrap().unwrap(), row(big, "alice", 1000));
            assert!(s.ssh_cert(4).unwrap().is_none());
            assert!(
                s.insert_ssh_cert(&row(3, "bob", 1000), 200).is_err(),
                "serials are unique"
            );
            let mut r = s.revoke_ssh_certs(None, Some("alice")).unwrap();
            r.sort();
            assert_eq!(r, vec![2, big]);
            assert!(s.revoke_ssh_certs(None, Some("alice")).unwrap().is_empty());
            assert_eq!(s.revoke_ssh_certs(Some(3), None).unwrap(), vec![3]);
            assert!(s.revoke_ssh_certs(None, None).unwrap().is_empty());
            assert!(s.ssh_certs().unwrap().iter().all(|c| c.revoked));
            // Rows expired for longer than SSH_CERT_KEEP go at the next issue.
            s.insert_ssh_cert(&row(5, "carol", 2000), 1000 + SSH_CERT_KEEP + 1)
                .unwrap();
            let left: Vec<i64> = s.ssh_certs().unwrap().iter().map(|c| c.serial).collect();
            assert_eq!(left, vec![5]);
        });
    }

    fn token(id: &str, uses: u32, created: i64) -> TokenRow {
        TokenRow {
            id: id.into(),
            hash: vec![1, 2, 3, 0, 255],
            created,
            expires: created + 100,
            uses_left: uses,
            uses_total: uses,
            name_pattern: Some("web*".into()),
            labels: [("env".to_string(), "prod".to_string())].into(),
            replace: false,
            revoked: false,
        }
    }

    fn agent(name: &str, serial: &str, token_id: &str) -> AgentRow {
        AgentRow {
            name: name.into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            enrolled_at: 10,
            agent_version: "0.1.0".into(),
            cert_serial: serial.into(),
            cert_not_after: 1000,
            token_id: token_id.into(),
            ..AgentRow::default()
        }
    }

    fn cert(serial: &str, agent: &str, not_after: i64, revoked: bool) -> CertRow {
        CertRow {
            serial: serial.into(),
            agent: agent.into(),
            issued_at: 0,
            not_after,
            revoked,
        }
    }

    #[test]
    fn tokens_round_trip_revoke_and_purge() {
        each_backend(|s| {
            assert!(s.is_empty().unwrap());
            s.insert_token(&token("bbbb", 2, 20)).unwrap();
            s.insert_token(&token("aaaa", 1, 10)).unwrap();
            assert!(
                s.insert_token(&token("aaaa", 1, 10)).is_err(),
                "duplicate id"
            );
            assert_eq!(s.token("aaaa").unwrap(), Some(token("aaaa", 1, 10)));
            assert_eq!(s.token("nope").unwrap(), None);
            let all: Vec<String> = s.tokens().unwrap().into_iter().map(|t| t.id).collect();
            assert_eq!(all, ["aaaa", "bbbb"], "oldest first");
            assert!(s.revoke_token("bbbb").unwrap());
            assert!(!s.revoke_token("nope").unwrap());
            assert!(s.token("bbbb").unwrap().unwrap().revoked);
            // "aaaa" expires at 110, "bbbb" at 120: purge what expired before 115.
            assert_eq!(s.purge_tokens(125, 10).unwrap(), 1);
            assert_eq!(s.tokens().unwrap().len(), 1);
            assert!(!s.is_empty().unwrap());
        });
    }

    #[test]
    fn enrollment_uses_the_token_once_and_replaces_the_previous_holder() {
        each_backend(|s| {
            s.insert_token(&token("t1", 2, 0)).unwrap();
            s.commit_enrollment(
                "t1",
                &agent("web01", "s1", "t1"),
                &cert("s1", "web01", 1000, false),
            )
            .unwrap();
            s.flush_config(&[("web01".into(), "d1".into(), "a1".into(), "e1".into())])
                .unwrap();
            assert_eq!(s.agents().unwrap()[0].config_desired, "d1");
            // Re-enrollment under the same name: the old certificate is revoked, the agent
            // row replaced whole (its pushed-configuration state starts over).
            s.commit_enrollment(
                "t1",
                &agent("web01", "s2", "t1"),
                &cert("s2", "web01", 1000, false),
            )
            .unwrap();
            let a = s.agents().unwrap();
            assert_eq!(a.len(), 1);
            assert_eq!(a[0], agent("web01", "s2", "t1"));
            let mut certs = s.certs().unwrap();
            certs.sort_by(|a, b| a.serial.cmp(&b.serial));
            assert_eq!(
                certs,
                [
                    cert("s1", "web01", 1000, true),
                    cert("s2", "web01", 1000, false)
                ]
            );
            assert_eq!(s.token("t1").unwrap().unwrap().uses_left, 0);
            // No use left: refused, and nothing written.
            let e = s
                .commit_enrollment(
                    "t1",
                    &agent("web02", "s3", "t1"),
                    &cert("s3", "web02", 1000, false),
                )
                .unwrap_err();
            assert!(matches!(e, StoreError::TokenUsed(_)), "{e}");
            assert_eq!(s.agents().unwrap().len(), 1);
            assert_eq!(s.certs().unwrap().len(), 2);
        });
    }

    #[test]
    fn renewal_prunes_superseded_and_expired_keeps_revoked_until_expiry() {
        each_backend(|s| {
            s.import(&Dump {
                tokens: vec![],
                agents: vec![agent("web01", "proving", "t"), agent("db01", "other", "t")],
                certs: vec![
                    cert("old", "web01", 1000, false),
                    cert("proving", "web01", 1000, false),
                    cert("replaced", "web01", 1000, true),
                    cert("expired", "web01", 10, true),
                    cert("other", "db01", 1000, false),
                    cert("other-expired", "db01", 10, false),
                ],
                identity: BTreeMap::new(),
                ssh_certs: vec![],
            })
            .unwrap();
            let pruned = s
                .commit_renewal("web01", "proving", &cert("new", "web01", 2000, false), 100)
                .unwrap();
            assert_eq!(pruned, 3);
            let mut left: Vec<String> = s.certs().unwrap().into_iter().map(|c| c.serial).collect();
            left.sort();
            assert_eq!(left, ["new", "other", "proving", "replaced"]);
            let a = s.agents().unwrap();
            let web = a.iter().find(|a| a.name == "web01").unwrap();
            assert_eq!(
                (web.cert_serial.as_str(), web.cert_not_after),
                ("new", 2000)
            );
            assert_eq!(s.prune_certs(1500).unwrap(), 3);
            assert_eq!(s.certs().unwrap().len(), 1);
        });
    }

    #[test]
    fn revocation_facts_last_seen_and_config_states_persist() {
        each_backend(|s| {
            s.import(&Dump {
                tokens: vec![token("t", 1, 0)],
                agents: vec![agent("web01", "a", "t"), agent("web02", "b", "t")],
                certs: vec![
                    cert("a", "web01", 1000, false),
                    cert("b", "web02", 1000, false),
                ],
                identity: BTreeMap::new(),
                ssh_certs: vec![],
            })
            .unwrap();
            assert!(s.revoke_agent("web02").unwrap());
            assert!(!s.revoke_agent("nobody").unwrap());
            let mut facts = agent("web01", "a", "t");
            facts.hostname = "web01.internal".into();
            facts.addresses = vec!["10.0.0.5".into(), "fd00::5".into()];
            facts.os = "Debian 13".into();
            facts.agent_version = "0.2.0".into();
            facts.ssh_host_keys = vec!["ssh-ed25519 AAAA web01".into()];
            facts.last_seen = Some(50);
            s.update_facts(&facts).unwrap();
            s.flush_last_seen(&[
                ("web01".into(), 77),
                ("web02".into(), 78),
                ("gone".into(), 1),
            ])
            .unwrap();
            s.flush_config(&[
                ("web01".into(), "d".into(), "a".into(), "".into()),
                ("web02".into(), "d2".into(), "".into(), "refused: x".into()),
            ])
            .unwrap();
            let a = s.agents().unwrap();
            let mut want1 = facts.clone();
            want1.last_seen = Some(77);
            want1.config_desired = "d".into();
            want1.config_applied = "a".into();
            assert_eq!(a[0], want1);
            assert!(a[1].revoked);
            assert_eq!(a[1].last_seen, Some(78));
            assert_eq!(a[1].config_error, "refused: x");
            let certs = s.certs().unwrap();
            assert!(certs.iter().find(|c| c.serial == "b").unwrap().revoked);
            assert!(!certs.iter().find(|c| c.serial == "a").unwrap().revoked);
        });
    }

    #[test]
    fn identity_is_claimed_once() {
        each_backend(|s| {
            assert_eq!(s.identity(AGENT_CA_PIN).unwrap(), None);
            assert_eq!(
                s.claim_identity(AGENT_CA_PIN, "sha256:aa").unwrap(),
                "sha256:aa"
            );
            assert_eq!(
                s.claim_identity(AGENT_CA_PIN, "sha256:bb").unwrap(),
                "sha256:aa"
            );
            assert_eq!(
                s.identity(AGENT_CA_PIN).unwrap().as_deref(),
                Some("sha256:aa")
            );
            assert_eq!(s.identities().unwrap().len(), 1, "no internal key shown");
        });
    }

    #[test]
    fn dump_and_import_round_trip() {
        each_backend(|s| {
            let mut a = agent("web01", "a", "t");
            a.last_seen = None;
            a.config_applied = "rev-3".into();
            let mut t = token("t", 3, 5);
            t.name_pattern = None;
            t.labels.clear();
            let d = Dump {
                tokens: vec![t],
                agents: vec![a],
                certs: vec![cert("a", "web01", 1000, false)],
                ssh_certs: vec![SshCertRow {
                    serial: i64::MAX - 2,
                    admin: "alice".into(),
                    sub: "sub-alice".into(),
                    groups: vec!["ops".into()],
                    key_fingerprint: "SHA256:k".into(),
                    valid_after: 100,
                    valid_before: 1000,
                    issued_at: 100,
                    source: "127.0.0.1".into(),
                    revoked: true,
                }],
                identity: [(AGENT_CA_PIN.to_string(), "sha256:00ff".to_string())].into(),
            };
            s.import(&d).unwrap();
            assert_eq!(s.dump().unwrap(), d);
        });
    }

    #[test]
    fn postgres_migrations_are_versioned_and_run_once_across_nodes() {
        let pg = Postgres::start();
        let dir = temp_dir();
        pg.create_db("reg");
        let cfg = pg_config(&pg, "reg", &dir);
        // Nodes starting together: each applies the steps under the advisory lock, so the
        // steps run once and every node opens.
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let cfg = cfg.clone();
                let dir = dir.clone();
                std::thread::spawn(move || Store::open_configured(&cfg, &dir).map(|_| ()))
            })
            .collect();
        for t in opened {
            t.join().unwrap().unwrap();
        }
        assert_eq!(
            pg.psql(
                "reg",
                "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"
            ),
            (1..=postgres::SCHEMA_VERSION)
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        // A schema newer than this bastide is refused, not written to.
        pg.psql(
            "reg",
            &format!(
                "INSERT INTO schema_migrations(version, description) VALUES ({}, 'from the future')",
                postgres::SCHEMA_VERSION + 1
            ),
        );
        let e = Store::open_configured(&cfg, &dir)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("upgrade bastide"), "{e}");
    }

    #[test]
    fn postgres_token_is_single_use_across_nodes() {
        let pg = Postgres::start();
        let dir = temp_dir();
        pg.create_db("reg");
        let cfg = pg_config(&pg, "reg", &dir);
        let mut first = Store::open_configured(&cfg, &dir).unwrap();
        first.insert_token(&token("once", 1, 0)).unwrap();
        // Two "nodes" (stores), ten enrollments each, on one single-use token.
        let workers: Vec<_> = (0..20)
            .map(|i| {
                let cfg = cfg.clone();
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let mut s = Store::open_configured(&cfg, &dir).unwrap();
                    let name = format!("vm{i}");
                    let serial = format!("serial{i}");
                    s.commit_enrollment(
                        "once",
                        &agent(&name, &serial, "once"),
                        &cert(&serial, &name, 1000, false),
                    )
                })
            })
            .collect();
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{results:?}");
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, StoreError::TokenUsed(_))));
        assert_eq!(first.agents().unwrap().len(), 1);
        assert_eq!(first.certs().unwrap().len(), 1);
    }

    #[test]
    fn postgres_settings_are_checked() {
        let dir = temp_dir();
        let pw = dir.join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let base = StoreConfig {
            backend: BackendKind::Postgres,
            host: Some("db1.example".into()),
            password_file: Some(pw.clone()),
            sslmode: SslMode::Disable,
            ..StoreConfig::default()
        };
        let e = base.postgres_settings(None).err().unwrap();
        assert!(
            e.contains("must not be accessible by group or others"),
            "{e}"
        );
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = base.postgres_settings(None).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"secret"[..]));
        assert_eq!(s.config.get_dbname(), Some("bastide"));
        assert_eq!(
            s.describe,
            "PostgreSQL bastide@db1.example:5432/bastide (no TLS)"
        );
        // The default is verify-full, which needs a CA file.
        let tls = StoreConfig {
            sslmode: SslMode::VerifyFull,
            ..base.clone()
        };
        assert!(tls
            .postgres_settings(None)
            .err()
            .unwrap()
            .contains("ca_file"));
        let with_pw = StoreConfig {
            host: None,
            url: Some("postgresql://bastide:hunter2@db1/bastide".into()),
            ..base.clone()
        };
        assert!(with_pw
            .postgres_settings(None)
            .err()
            .unwrap()
            .contains("password_file"));
        let both = StoreConfig {
            url: Some("postgresql://bastide@db1/bastide".into()),
            ..base.clone()
        };
        assert!(both
            .postgres_settings(None)
            .err()
            .unwrap()
            .contains("not both"));
        // `--url` replaces the connection keys.
        let s = base
            .postgres_settings(Some("postgresql://other@db2:6543/reg"))
            .unwrap();
        assert_eq!(s.describe, "PostgreSQL other@db2:6543/reg (no TLS)");
        let sqlite_with_path = StoreConfig {
            path: Some(dir.join("x.sqlite")),
            ..base
        };
        assert!(sqlite_with_path
            .problems()
            .iter()
            .any(|(k, _)| k == "store.path"));
        assert!(StoreConfig::default().problems().is_empty());
    }

    #[test]
    fn postgres_tls_verify_full() {
        let pg = Postgres::start_tls();
        let dir = temp_dir();
        pg.create_db("reg");
        let ca = dir.join("pg-ca.pem");
        std::fs::write(&ca, pg.ca_pem.as_deref().unwrap()).unwrap();
        let cfg = StoreConfig {
            sslmode: SslMode::VerifyFull,
            ca_file: Some(ca),
            ..pg_config(&pg, "reg", &dir)
        };
        let mut s = Store::open_configured(&cfg, &dir).unwrap();
        assert!(s.is_empty().unwrap());
        assert!(s.describe().contains("TLS verify-full"));
        // The server refuses TCP without TLS.
        let plain = StoreConfig {
            sslmode: SslMode::Disable,
            ..cfg.clone()
        };
        assert!(Store::open_configured(&plain, &dir).is_err());
        // A certificate from another CA is refused.
        let other = rcgen_ca_pem();
        let wrong = dir.join("other-ca.pem");
        std::fs::write(&wrong, other).unwrap();
        let cfg_wrong = StoreConfig {
            ca_file: Some(wrong),
            ..cfg
        };
        let e = Store::open_configured(&cfg_wrong, &dir)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("certificate") || e.contains("Unknown"), "{e}");
    }

    /// Rates of the hot store operations on each backend, printed (not asserted):
    /// `cargo test -p bastide --lib store::tests::op_rates -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test: prints rates, asserts nothing; run by hand with --ignored --nocapture"]
    fn op_rates() {
        for mut fx in [sqlite(), postgres()] {
            let s = &mut fx.store;
            let n = 300;
            s.insert_token(&token("t", n, 0)).unwrap();
            let start = std::time::Instant::now();
            for i in 0..n {
                let name = format!("vm{i:04}");
                let serial = format!("s{i}");
                s.commit_enrollment(
                    "t",
                    &agent(&name, &serial, "t"),
                    &cert(&serial, &name, 1000, false),
                )
                .unwrap();
            }
            let enroll = n as f64 / start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            for i in 0..n {
                let mut a = agent(&format!("vm{i:04}"), "x", "t");
                a.hostname = "h".into();
                a.last_seen = Some(i as i64);
                s.update_facts(&a).unwrap();
            }
            let register = n as f64 / start.elapsed().as_secs_f64();
            let seen: Vec<(String, i64)> = (0..n).map(|i| (format!("vm{i:04}"), 9)).collect();
            let start = std::time::Instant::now();
            s.flush_last_seen(&seen).unwrap();
            let flush = start.elapsed();
            eprintln!(
                "{}: {enroll:.0} enrollments/s, {register:.0} registrations/s, last-seen flush of {n} agents in {flush:?}",
                s.describe()
            );
        }
    }

    fn rcgen_ca_pem() -> String {
        let k = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&k).unwrap().pem()
    }
}
