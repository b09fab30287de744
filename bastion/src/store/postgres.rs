//! The PostgreSQL backend of the registry store (`[store] backend = "postgres"`): the state
//! several bastions of a project share.
//!
//! The client is tokio-postgres behind a deadpool-postgres pool (a broken connection is
//! replaced on the next call), TLS through rustls (never OpenSSL). The registry's store
//! interface is synchronous (see the module above), so this backend owns a one-thread tokio
//! runtime: each call is spawned there and the caller waits on a plain channel, as it would
//! wait on an fsync. A runtime of its own, not the daemon's, because the caller may itself
//! be a worker of the daemon's runtime: waiting there on a future that needs that same
//! worker could deadlock. Every call is bounded by `[store] timeout`; a call that times out
//! is reported as failed although the server may still commit it: the registry's memory then
//! lags the store until the change's notification or the next resync (`crate::cluster`).
//!
//! Schema migrations are versioned in `schema_migrations` (one row per step applied) and
//! run at connect, in one transaction that first takes a transaction-level advisory lock:
//! nodes starting together apply each step once, one after the other, and a failed step
//! leaves nothing half-applied (PostgreSQL's DDL is transactional).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;

use super::{
    json, unjson, AgentRow, Backend, CertRow, Dump, PgSettings, Result, SshCertRow, StoreError,
    TokenRow, SSH_CERT_KEEP,
};

/// Key of the advisory lock the schema migrations hold ("bastide" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x0062_6173_7469_6465;

/// Schema steps, version `i + 1` at index `i`. Never edit a released step: add one.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "registry: tokens, agents, certificates",
        "CREATE TABLE tokens (
        id TEXT PRIMARY KEY, hash BYTEA NOT NULL, created BIGINT NOT NULL,
        expires BIGINT NOT NULL, uses_left BIGINT NOT NULL CHECK (uses_left >= 0),
        uses_total BIGINT NOT NULL, name_pattern TEXT, labels TEXT NOT NULL,
        replace BOOLEAN NOT NULL, revoked BOOLEAN NOT NULL);
     CREATE TABLE agents (
        name TEXT PRIMARY KEY, labels TEXT NOT NULL, revoked BOOLEAN NOT NULL,
        enrolled_at BIGINT NOT NULL, hostname TEXT NOT NULL, addresses TEXT NOT NULL,
        os TEXT NOT NULL, agent_version TEXT NOT NULL, ssh_host_keys TEXT NOT NULL,
        last_seen BIGINT, cert_serial TEXT NOT NULL, cert_not_after BIGINT NOT NULL,
        token_id TEXT NOT NULL,
        config_desired TEXT NOT NULL DEFAULT '', config_applied TEXT NOT NULL DEFAULT '',
        config_error TEXT NOT NULL DEFAULT '');
     CREATE TABLE certs (
        serial TEXT PRIMARY KEY, agent TEXT NOT NULL, issued_at BIGINT NOT NULL,
        not_after BIGINT NOT NULL, revoked BOOLEAN NOT NULL);
     CREATE INDEX certs_agent ON certs(agent);",
    ),
    (
        "identity: the project's agent CA pin",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    ),
    (
        "cluster: nodes and the agent sessions each holds",
        "CREATE TABLE nodes (id TEXT PRIMARY KEY, heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
        started TIMESTAMPTZ NOT NULL DEFAULT now(), services TEXT NOT NULL DEFAULT '{}');
     CREATE TABLE sessions (agent TEXT PRIMARY KEY, node TEXT NOT NULL,
        since TIMESTAMPTZ NOT NULL DEFAULT now(), observed TEXT NOT NULL DEFAULT '');
     CREATE INDEX sessions_node ON sessions(node);",
    ),
    (
        "ssh: user certificates issued after a single sign-on",
        "CREATE TABLE ssh_certs (
        serial BIGINT PRIMARY KEY, admin TEXT NOT NULL, sub TEXT NOT NULL,
        groups TEXT NOT NULL, key_fingerprint TEXT NOT NULL, valid_after BIGINT NOT NULL,
        valid_before BIGINT NOT NULL, issued_at BIGINT NOT NULL, source TEXT NOT NULL,
        revoked BOOLEAN NOT NULL);
     CREATE INDEX ssh_certs_admin ON ssh_certs(admin);
     CREATE INDEX ssh_certs_key ON ssh_certs(key_fingerprint);",
    ),
];

/// The channel every change of an agent's rows is announced on (payload: the agent's name),
/// in the transaction that makes it: the other nodes reload that agent (`crate::cluster`).
pub const NOTIFY_CHANNEL: &str = "bastide_registry";

/// The channel every revocation of an SSH user certificate is announced on (payload: its
/// serial), in the transaction that makes it: the other nodes cut the connections
/// authenticated with it (`crate::cluster`).
pub const SSH_CERTS_CHANNEL: &str = "bastide_ssh_certs";

/// Announces a change of agent `$1` (see [`NOTIFY_CHANNEL`]).
const NOTIFY: &str = "SELECT pg_notify('bastide_registry', $1)";

const SSH_CERT_COLS: &str = "serial, admin, sub, groups, key_fingerprint, valid_after, valid_before, issued_at, source, revoked";

async fn put_ssh_cert(tx: &impl deadpool_postgres::GenericClient, c: &SshCertRow) -> Result<()> {
    tx.execute(
        &format!("INSERT INTO ssh_certs({SSH_CERT_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"),
        &[
            &c.serial,
            &c.admin,
            &c.sub,
            &json(&c.groups),
            &c.key_fingerprint,
            &c.valid_after,
            &c.valid_before,
            &c.issued_at,
            &c.source,
            &c.revoked,
        ],
    )
    .await?;
    Ok(())
}

fn ssh_cert_row(r: &Row) -> Result<SshCertRow> {
    let groups: String = r.try_get(3)?;
    Ok(SshCertRow {
        serial: r.try_get(0)?,
        admin: r.try_get(1)?,
        sub: r.try_get(2)?,
        groups: unjson(&groups)?,
        key_fingerprint: r.try_get(4)?,
        valid_after: r.try_get(5)?,
        valid_before: r.try_get(6)?,
        issued_at: r.try_get(7)?,
        source: r.try_get(8)?,
        revoked: r.try_get(9)?,
    })
}

/// The schema version this bastide writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub struct PgStore {
    pool: Pool,
    rt: Option<tokio::runtime::Runtime>,
    timeout: Duration,
    describe: String,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside another runtime's context.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!(
            "{} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        )),
        None => {
            // The top-level text is terse ("error connecting to server"): add the cause.
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            StoreError::Unavailable(s)
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg_err(e)
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} = {v}")))
}

fn token_row(r: &Row) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get(0)?,
        hash: r.try_get(1)?,
        created: r.try_get(2)?,
        expires: r.try_get(3)?,
        uses_left: to_u32(r.try_get(4)?, "uses_left")?,
        uses_total: to_u32(r.try_get(5)?, "uses_total")?,
        name_pattern: r.try_get(6)?,
        labels: unjson(r.try_get(7)?)?,
        replace: r.try_get(8)?,
        revoked: r.try_get(9)?,
    })
}

const TOKEN_COLS: &str =
    "id, hash, created, expires, uses_left, uses_total, name_pattern, labels, replace, revoked";
pub(crate) const AGENT_COLS: &str = "name, labels, revoked, enrolled_at, hostname, addresses, os,
    agent_version, ssh_host_keys, last_seen, cert_serial, cert_not_after, token_id,
    config_desired, config_applied, config_error";

pub(crate) fn agent_row(r: &Row) -> Result<AgentRow> {
    Ok(AgentRow {
        name: r.try_get(0)?,
        labels: unjson(r.try_get(1)?)?,
        revoked: r.try_get(2)?,
        enrolled_at: r.try_get(3)?,
        hostname: r.try_get(4)?,
        addresses: unjson(r.try_get(5)?)?,
        os: r.try_get(6)?,
        agent_version: r.try_get(7)?,
        ssh_host_keys: unjson(r.try_get(8)?)?,
        last_seen: r.try_get(9)?,
        cert_serial: r.try_get(10)?,
        cert_not_after: r.try_get(11)?,
        token_id: r.try_get(12)?,
        config_desired: r.try_get(13)?,
        config_applied: r.try_get(14)?,
        config_error: r.try_get(15)?,
    })
}

pub(crate) fn cert_row(r: &Row) -> Result<CertRow> {
    Ok(CertRow {
        serial: r.try_get(0)?,
        agent: r.try_get(1)?,
        issued_at: r.try_get(2)?,
        not_after: r.try_get(3)?,
        revoked: r.try_get(4)?,
    })
}

type Client = deadpool_postgres::Object;

async fn client(pool: &Pool) -> Result<Client> {
    pool.get().await.map_err(pool_err)
}

// The writers below use prepared statements cached per connection: one round trip each
// instead of two, which the copy of a large registry feels. Safe across schema steps because
// they return no rows (a cached SELECT could see its result type change).

async fn insert_token(c: &impl deadpool_postgres::GenericClient, t: &TokenRow) -> Result<()> {
    let stmt = c
        .prepare_cached(&format!(
            "INSERT INTO tokens({TOKEN_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
        ))
        .await?;
    c.execute(
        &stmt,
        &[
            &t.id,
            &t.hash,
            &t.created,
            &t.expires,
            &i64::from(t.uses_left),
            &i64::from(t.uses_total),
            &t.name_pattern,
            &json(&t.labels),
            &t.replace,
            &t.revoked,
        ],
    )
    .await?;
    Ok(())
}

/// Inserts or replaces an agent row whole, as SQLite's `INSERT OR REPLACE` does (the
/// pushed-configuration state of a replaced agent starts over).
async fn put_agent(c: &impl deadpool_postgres::GenericClient, a: &AgentRow) -> Result<()> {
    let stmt = c
        .prepare_cached(&format!(
            "INSERT INTO agents({AGENT_COLS})
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)
             ON CONFLICT (name) DO UPDATE SET labels = EXCLUDED.labels,
                revoked = EXCLUDED.revoked, enrolled_at = EXCLUDED.enrolled_at,
                hostname = EXCLUDED.hostname, addresses = EXCLUDED.addresses, os = EXCLUDED.os,
                agent_version = EXCLUDED.agent_version, ssh_host_keys = EXCLUDED.ssh_host_keys,
                last_seen = EXCLUDED.last_seen, cert_serial = EXCLUDED.cert_serial,
                cert_not_after = EXCLUDED.cert_not_after, token_id = EXCLUDED.token_id,
                config_desired = EXCLUDED.config_desired,
                config_applied = EXCLUDED.config_applied, config_error = EXCLUDED.config_error"
        ))
        .await?;
    c.execute(
        &stmt,
        &[
            &a.name,
            &json(&a.labels),
            &a.revoked,
            &a.enrolled_at,
            &a.hostname,
            &json(&a.addresses),
            &a.os,
            &a.agent_version,
            &json(&a.ssh_host_keys),
            &a.last_seen,
            &a.cert_serial,
            &a.cert_not_after,
            &a.token_id,
            &a.config_desired,
            &a.config_applied,
            &a.config_error,
        ],
    )
    .await?;
    Ok(())
}

async fn put_cert(c: &impl deadpool_postgres::GenericClient, x: &CertRow) -> Result<()> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO certs(serial, agent, issued_at, not_after, revoked) VALUES ($1,$2,$3,$4,$5)",
        )
        .await?;
    c.execute(
        &stmt,
        &[&x.serial, &x.agent, &x.issued_at, &x.not_after, &x.revoked],
    )
    .await?;
    Ok(())
}

async fn delete_expired(c: &impl deadpool_postgres::GenericClient, now: i64) -> Result<usize> {
    Ok(c.execute("DELETE FROM certs WHERE not_after < $1", &[&now])
        .await? as usize)
}

/// Brings the schema up to [`SCHEMA_VERSION`], one node at a time.
async fn migrate(pool: &Pool) -> Result<i64> {
    let mut c = client(pool).await?;
    let tx = c.transaction().await?;
    // Held until commit or rollback: a second node starting now waits here, then finds the
    // steps applied.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, description TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "schema version {current}, this bastide knows 1 to {SCHEMA_VERSION}: upgrade bastide"
        )));
    }
    for (i, (description, step)) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        tx.batch_execute(step).await.map_err(|e| {
            StoreError::Postgres(format!(
                "schema step {version} ({description}): {}",
                pg_err(e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations(version, description) VALUES ($1, $2)",
            &[&version, description],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(current)
}

pub(crate) fn tls_config(
    ca: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| StoreError::Unavailable(format!("ca_file: {e}")))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Unavailable(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

impl PgStore {
    /// Connects (failing if the server cannot be reached within the timeout) and brings the
    /// schema up to date.
    pub fn connect(s: &PgSettings) -> Result<Self> {
        let store = Self::connect_without_migrating(s)?;
        let open_err = |e: StoreError| StoreError::Open {
            path: s.describe.clone(),
            message: e.to_string(),
        };
        let from = store
            .run(|pool| async move { migrate(&pool).await })
            .map_err(open_err)?;
        if from < SCHEMA_VERSION {
            tracing::info!(store = %s.describe, from, to = SCHEMA_VERSION, "registry schema migrated");
        }
        Ok(store)
    }

    /// Connects and checks the server answers, leaving the schema as it is.
    pub fn connect_without_migrating(s: &PgSettings) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bastide-store-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("starting the store's runtime: {e}")))?;
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &s.tls_ca {
            Some(ca) => Manager::from_config(
                s.config.clone(),
                tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(ca)?),
                mgr_cfg,
            ),
            None => Manager::from_config(s.config.clone(), tokio_postgres::NoTls, mgr_cfg),
        };
        let pool = Pool::builder(mgr)
            .max_size(s.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(s.timeout))
            .create_timeout(Some(s.timeout))
            .recycle_timeout(Some(s.timeout))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let store = Self {
            pool,
            rt: Some(rt),
            timeout: s.timeout,
            describe: s.describe.clone(),
        };
        store
            .run(|pool| async move {
                client(&pool).await?.simple_query("SELECT 1").await?;
                Ok(())
            })
            .map_err(|e| StoreError::Open {
                path: s.describe.clone(),
                message: e.to_string(),
            })?;
        Ok(store)
    }

    /// Runs `f` on the store's runtime and waits for its answer, within the timeout.
    fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
        let fut = f(self.pool.clone());
        let timeout = self.timeout;
        let (tx, rx) = sync_channel(1);
        rt.spawn(async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "no answer from PostgreSQL within {}",
                    humantime::format_duration(timeout)
                ))),
            };
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Unavailable("store runtime stopped".into())))
    }

    /// Schema version of the database (tests, `store migrate`).
    pub fn schema_version(&self) -> Result<i64> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            Ok(
                c.query_one("SELECT max(version)::BIGINT FROM schema_migrations", &[])
                    .await?
                    .try_get(0)?,
            )
        })
    }
}

impl Backend for PgStore {
    fn insert_token(&mut self, t: &TokenRow) -> Result<()> {
        let t = t.clone();
        self.run(|pool| async move { insert_token(&client(&pool).await?, &t).await })
    }

    fn token(&mut self, id: &str) -> Result<Option<TokenRow>> {
        let id = id.to_string();
        self.run(|pool| async move {
            let c = client(&pool).await?;
            let row = c
                .query_opt(
                    &format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = $1"),
                    &[&id],
                )
                .await?;
            row.as_ref().map(token_row).transpose()
        })
    }

    fn tokens(&mut self) -> Result<Vec<TokenRow>> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.query(
                &format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created, id"),
                &[],
            )
            .await?
            .iter()
            .map(token_row)
            .collect()
        })
    }

    fn revoke_token(&mut self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.run(|pool| async move {
            let c = client(&pool).await?;
            Ok(
                c.execute("UPDATE tokens SET revoked = TRUE WHERE id = $1", &[&id])
                    .await?
                    > 0,
            )
        })
    }

    fn purge_tokens(&mut self, now: i64, grace: i64) -> Result<usize> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            Ok(
                c.execute("DELETE FROM tokens WHERE expires < $1", &[&(now - grace)])
                    .await? as usize,
            )
        })
    }

    fn agents(&mut self) -> Result<Vec<AgentRow>> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.query(
                &format!("SELECT {AGENT_COLS} FROM agents ORDER BY name"),
                &[],
            )
            .await?
            .iter()
            .map(agent_row)
            .collect()
        })
    }

    fn certs(&mut self) -> Result<Vec<CertRow>> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.query(
                "SELECT serial, agent, issued_at, not_after, revoked FROM certs ORDER BY serial",
                &[],
            )
            .await?
            .iter()
            .map(cert_row)
            .collect()
        })
    }

    fn commit_enrollment(
        &mut self,
        token_id: &str,
        agent: &AgentRow,
        cert: &CertRow,
    ) -> Result<()> {
        let (token_id, agent, cert) = (token_id.to_string(), agent.clone(), cert.clone());
        self.run(|pool| async move {
            let mut c = client(&pool).await?;
            let tx = c.transaction().await?;
            // The row lock makes the use count exact across nodes: a second enrollment on the
            // same last use waits for this one, then finds none left.
            let used = tx
                .execute(
                    "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = $1 AND uses_left > 0",
                    &[&token_id],
                )
                .await?;
            if used != 1 {
                return Err(StoreError::TokenUsed(token_id));
            }
            tx.execute(
                "UPDATE certs SET revoked = TRUE WHERE agent = $1",
                &[&agent.name],
            )
            .await?;
            let fresh = AgentRow {
                config_desired: String::new(),
                config_applied: String::new(),
                config_error: String::new(),
                ..agent
            };
            put_agent(&tx, &fresh).await?;
            put_cert(&tx, &cert).await?;
            tx.execute(NOTIFY, &[&fresh.name]).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn commit_renewal(
        &mut self,
        agent: &str,
        proving: &str,
        cert: &CertRow,
        now: i64,
    ) -> Result<usize> {
        let (agent, proving, cert) = (agent.to_string(), proving.to_string(), cert.clone());
        self.run(|pool| async move {
            let mut c = client(&pool).await?;
            let tx = c.transaction().await?;
            put_cert(&tx, &cert).await?;
            tx.execute(
                "UPDATE agents SET cert_serial = $2, cert_not_after = $3 WHERE name = $1",
                &[&agent, &cert.serial, &cert.not_after],
            )
            .await?;
            let superseded = tx
                .execute(
                    "DELETE FROM certs WHERE agent = $1 AND NOT revoked AND serial <> $2 AND serial <> $3",
                    &[&agent, &proving, &cert.serial],
                )
                .await? as usize;
            let expired = delete_expired(&tx, now).await?;
            tx.execute(NOTIFY, &[&agent]).await?;
            tx.commit().await?;
            Ok(superseded + expired)
        })
    }

    fn prune_certs(&mut self, now: i64) -> Result<usize> {
        self.run(|pool| async move { delete_expired(&client(&pool).await?, now).await })
    }

    fn revoke_agent(&mut self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.run(|pool| async move {
            let mut c = client(&pool).await?;
            let tx = c.transaction().await?;
            let n = tx
                .execute("UPDATE agents SET revoked = TRUE WHERE name = $1", &[&name])
                .await?;
            tx.execute("UPDATE certs SET revoked = TRUE WHERE agent = $1", &[&name])
                .await?;
            tx.execute(NOTIFY, &[&name]).await?;
            tx.commit().await?;
            Ok(n > 0)
        })
    }

    fn update_facts(&mut self, a: &AgentRow) -> Result<()> {
        let a = a.clone();
        self.run(|pool| async move {
            let c = client(&pool).await?;
            let stmt = c
                .prepare_cached(
                    "WITH u AS (UPDATE agents SET hostname = $2, addresses = $3, os = $4,
                        agent_version = $5, ssh_host_keys = $6, last_seen = $7 WHERE name = $1
                        RETURNING name)
                     SELECT pg_notify('bastide_registry', name) FROM u",
                )
                .await?;
            c.execute(
                &stmt,
                &[
                    &a.name,
                    &a.hostname,
                    &json(&a.addresses),
                    &a.os,
                    &a.agent_version,
                    &json(&a.ssh_host_keys),
                    &a.last_seen,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn flush_last_seen(&mut self, seen: &[(String, i64)]) -> Result<()> {
        let (names, times): (Vec<String>, Vec<i64>) = seen.iter().cloned().unzip();
        self.run(|pool| async move {
            let c = client(&pool).await?;
            // One statement for the whole batch (thousands of agents), not one per row.
            c.execute(
                // Each node holds the times of its own sessions: never move one back.
                "UPDATE agents SET last_seen = GREATEST(agents.last_seen, v.t)
                 FROM unnest($1::TEXT[], $2::BIGINT[]) AS v(n, t) WHERE agents.name = v.n",
                &[&names, &times],
            )
            .await?;
            Ok(())
        })
    }

    fn flush_config(&mut self, rows: &[(String, String, String, String)]) -> Result<()> {
        let mut cols: (Vec<String>, Vec<String>, Vec<String>, Vec<String>) = Default::default();
        for (n, d, a, e) in rows {
            cols.0.push(n.clone());
            cols.1.push(d.clone());
            cols.2.push(a.clone());
            cols.3.push(e.clone());
        }
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.execute(
                "UPDATE agents SET config_desired = v.d, config_applied = v.a, config_error = v.e
                 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) AS v(n, d, a, e)
                 WHERE agents.name = v.n",
                &[&cols.0, &cols.1, &cols.2, &cols.3],
            )
            .await?;
            Ok(())
        })
    }

    fn is_empty(&mut self) -> Result<bool> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            let n: i64 = c
                .query_one(
                    "SELECT (SELECT count(*) FROM tokens) + (SELECT count(*) FROM agents)
                        + (SELECT count(*) FROM certs)",
                    &[],
                )
                .await?
                .try_get(0)?;
            Ok(n == 0)
        })
    }

    fn import(&mut self, d: &Dump) -> Result<()> {
        let d = d.clone();
        self.run(|pool| async move {
            let mut c = client(&pool).await?;
            let tx = c.transaction().await?;
            for t in &d.tokens {
                insert_token(&tx, t).await?;
            }
            for a in &d.agents {
                put_agent(&tx, a).await?;
            }
            for x in &d.certs {
                put_cert(&tx, x).await?;
            }
            for x in &d.ssh_certs {
                put_ssh_cert(&tx, x).await?;
            }
            for (k, v) in &d.identity {
                tx.execute("INSERT INTO meta(key, value) VALUES ($1, $2)", &[k, v])
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn identity(&mut self, key: &str) -> Result<Option<String>> {
        let key = key.to_string();
        self.run(|pool| async move {
            let c = client(&pool).await?;
            // Also asked by `check-config` before this node migrated the schema.
            let exists: bool = c
                .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
                .await?
                .try_get(0)?;
            if !exists {
                return Ok(None);
            }
            Ok(
                c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?,
            )
        })
    }

    fn identities(&mut self) -> Result<BTreeMap<String, String>> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.query("SELECT key, value FROM meta", &[])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }

    fn claim_identity(&mut self, key: &str, value: &str) -> Result<String> {
        let (key, value) = (key.to_string(), value.to_string());
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.execute(
                "INSERT INTO meta(key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )
            .await?;
            Ok(
                c.query_one("SELECT value FROM meta WHERE key = $1", &[&key])
                    .await?
                    .try_get(0)?,
            )
        })
    }

    fn insert_ssh_cert(&mut self, c: &SshCertRow, now: i64) -> Result<()> {
        let c = c.clone();
        self.run(|pool| async move {
            let mut client = client(&pool).await?;
            let tx = client.transaction().await?;
            put_ssh_cert(&tx, &c).await?;
            tx.execute(
                "DELETE FROM ssh_certs WHERE valid_before < $1",
                &[&(now - SSH_CERT_KEEP)],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn ssh_cert(&mut self, serial: i64) -> Result<Option<SshCertRow>> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.query_opt(
                &format!("SELECT {SSH_CERT_COLS} FROM ssh_certs WHERE serial = $1"),
                &[&serial],
            )
            .await?
            .as_ref()
            .map(ssh_cert_row)
            .transpose()
        })
    }

    fn ssh_certs(&mut self) -> Result<Vec<SshCertRow>> {
        self.run(|pool| async move {
            let c = client(&pool).await?;
            c.query(
                &format!("SELECT {SSH_CERT_COLS} FROM ssh_certs ORDER BY serial"),
                &[],
            )
            .await?
            .iter()
            .map(ssh_cert_row)
            .collect()
        })
    }

    fn revoke_ssh_certs(&mut self, serial: Option<i64>, admin: Option<&str>) -> Result<Vec<i64>> {
        if serial.is_none() && admin.is_none() {
            return Ok(Vec::new());
        }
        let admin = admin.map(str::to_string);
        self.run(|pool| async move {
            let c = client(&pool).await?;
            let rows = c
                .query(
                    "WITH u AS (UPDATE ssh_certs SET revoked = TRUE WHERE NOT revoked
                        AND ($1::BIGINT IS NULL OR serial = $1) AND ($2::TEXT IS NULL OR admin = $2)
                        RETURNING serial)
                     SELECT serial, pg_notify('bastide_ssh_certs', serial::TEXT) FROM u",
                    &[&serial, &admin],
                )
                .await?;
            rows.iter()
                .map(|r| r.try_get::<_, i64>(0).map_err(Into::into))
                .collect()
        })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
