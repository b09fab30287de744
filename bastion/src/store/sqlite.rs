//! The SQLite backend of the registry store: one file in the state directory (rusqlite,
//! bundled), the default for a single bastion.
//!
//! Why SQLite rather than redb: enrollment must consume a token, record a certificate and
//! create or replace an agent in one atomic step, which a SQL transaction states directly;
//! the file can be inspected by an admin with the stock `sqlite3` tool; and WAL mode with
//! `synchronous=FULL` gives the durability we need at the write rates of a registry
//! (enrollments, registrations and revocations, not heartbeats). Calls are synchronous and
//! made under the registry's lock, as before the store had a second backend.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{
    json, unjson, AgentRow, Backend, CertRow, Dump, Result, SshCertRow, StoreError, TokenRow,
    SSH_CERT_KEEP,
};

const SCHEMA_VERSION: i64 = 3;

/// Schema migrations, each taking the store from version `i + 1` to `i + 2`; run in one
/// transaction at open. Never edit a released step: add one.
const MIGRATIONS: &[&str] = &[
    // 2: pushed configuration revisions and the last apply error of each agent.
    "ALTER TABLE agents ADD COLUMN config_desired TEXT NOT NULL DEFAULT '';
     ALTER TABLE agents ADD COLUMN config_applied TEXT NOT NULL DEFAULT '';
     ALTER TABLE agents ADD COLUMN config_error TEXT NOT NULL DEFAULT '';",
    // 3: SSH user certificates issued after a single sign-on.
    "CREATE TABLE ssh_certs (
        serial INTEGER PRIMARY KEY, admin TEXT NOT NULL, sub TEXT NOT NULL,
        groups TEXT NOT NULL, key_fingerprint TEXT NOT NULL, valid_after INTEGER NOT NULL,
        valid_before INTEGER NOT NULL, issued_at INTEGER NOT NULL, source TEXT NOT NULL,
        revoked INTEGER NOT NULL);
     CREATE INDEX ssh_certs_admin ON ssh_certs(admin);
     CREATE INDEX ssh_certs_key ON ssh_certs(key_fingerprint);",
];

const SSH_CERT_COLS: &str = "serial, admin, sub, groups, key_fingerprint, valid_after, valid_before, issued_at, source, revoked";

fn ssh_cert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(SshCertRow, String)> {
    Ok((
        SshCertRow {
            serial: r.get(0)?,
            admin: r.get(1)?,
            sub: r.get(2)?,
            groups: Vec::new(),
            key_fingerprint: r.get(4)?,
            valid_after: r.get(5)?,
            valid_before: r.get(6)?,
            issued_at: r.get(7)?,
            source: r.get(8)?,
            revoked: r.get(9)?,
        },
        r.get(3)?,
    ))
}

fn with_groups((mut c, groups): (SshCertRow, String)) -> Result<SshCertRow> {
    c.groups = unjson(&groups)?;
    Ok(c)
}

pub struct SqliteStore {
    conn: Connection,
    path: std::path::PathBuf,
}

impl SqliteStore {
    /// The tables of the file, for the copy to PostgreSQL: it refuses a table it does not
    /// know rather than leave it behind.
    pub fn table_names(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Creates a new, empty store. Fails if the file exists.
    pub fn create(path: &Path) -> Result<Self> {
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        if path.exists() {
            return Err(open_err("already exists".into()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
        .map_err(|e| open_err(e.to_string()))?;
        let store = Self {
            conn,
            path: path.to_path_buf(),
        };
        store.pragmas()?;
        store.conn.execute_batch(
            "BEGIN;
             CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE tokens (
                id TEXT PRIMARY KEY, hash BLOB NOT NULL, created INTEGER NOT NULL,
                expires INTEGER NOT NULL, uses_left INTEGER NOT NULL, uses_total INTEGER NOT NULL,
                name_pattern TEXT, labels TEXT NOT NULL, replace INTEGER NOT NULL,
                revoked INTEGER NOT NULL);
             CREATE TABLE agents (
                name TEXT PRIMARY KEY, labels TEXT NOT NULL, revoked INTEGER NOT NULL,
                enrolled_at INTEGER NOT NULL, hostname TEXT NOT NULL, addresses TEXT NOT NULL,
                os TEXT NOT NULL, agent_version TEXT NOT NULL, ssh_host_keys TEXT NOT NULL,
                last_seen INTEGER, cert_serial TEXT NOT NULL, cert_not_after INTEGER NOT NULL,
                token_id TEXT NOT NULL);
             CREATE TABLE certs (
                serial TEXT PRIMARY KEY, agent TEXT NOT NULL, issued_at INTEGER NOT NULL,
                not_after INTEGER NOT NULL, revoked INTEGER NOT NULL);
             CREATE INDEX certs_agent ON certs(agent);
             COMMIT;",
        )?;
        store.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', '1')",
            [],
        )?;
        let mut store = store;
        store.migrate(1)?;
        Ok(store)
    }

    /// Opens an existing store; a missing, unreadable or corrupt file is an error, never
    /// silently replaced by an empty one.
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        if !path.is_file() {
            return Err(open_err("missing (create it with `bastide init`)".into()));
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| open_err(e.to_string()))?;
        let store = Self {
            conn,
            path: path.to_path_buf(),
        };
        store.pragmas().map_err(|e| open_err(e.to_string()))?;
        let check: String = store
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| open_err(format!("integrity check failed: {e}")))?;
        if check != "ok" {
            return Err(open_err(format!("integrity check failed: {check}")));
        }
        let version: Option<String> = store
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| open_err(format!("not a bastide registry: {e}")))?;
        let mut store = store;
        match version.as_deref().map(|v| v.parse::<i64>()) {
            Some(Ok(v)) if v == SCHEMA_VERSION => Ok(store),
            Some(Ok(v)) if (1..SCHEMA_VERSION).contains(&v) => {
                store.migrate(v).map_err(|e| {
                    open_err(format!("migrating schema {v} to {SCHEMA_VERSION}: {e}"))
                })?;
                Ok(store)
            }
            Some(_) => Err(open_err(format!(
                "schema version {}, this bastide knows 1 to {SCHEMA_VERSION}",
                version.unwrap_or_default()
            ))),
            None => Err(open_err(
                "not a bastide registry (no schema version)".into(),
            )),
        }
    }

    /// Brings a store at schema `from` up to `SCHEMA_VERSION` in one transaction.
    fn migrate(&mut self, from: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        for v in from..SCHEMA_VERSION {
            let step = MIGRATIONS
                .get((v - 1) as usize)
                .ok_or_else(|| StoreError::Corrupt(format!("no migration from schema {v}")))?;
            tx.execute_batch(step)?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
            params![SCHEMA_VERSION.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn pragmas(&self) -> Result<()> {
        self.conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )?;
        self.conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(())
    }

    fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(TokenRow, String)> {
        Ok((
            TokenRow {
                id: r.get(0)?,
                hash: r.get(1)?,
                created: r.get(2)?,
                expires: r.get(3)?,
                uses_left: r.get(4)?,
                uses_total: r.get(5)?,
                name_pattern: r.get(6)?,
                labels: BTreeMap::new(),
                replace: r.get(8)?,
                revoked: r.get(9)?,
            },
            r.get(7)?,
        ))
    }

    const TOKEN_COLS: &'static str =
        "id, hash, created, expires, uses_left, uses_total, name_pattern, labels, replace, revoked";

    const AGENT_COLS: &'static str = "name, labels, revoked, enrolled_at, hostname, addresses, os,
        agent_version, ssh_host_keys, last_seen, cert_serial, cert_not_after, token_id";
    const CONFIG_COLS: &'static str = "config_desired, config_applied, config_error";

    fn delete_expired(tx: &rusqlite::Transaction<'_>, now: i64) -> Result<usize> {
        Ok(tx.execute("DELETE FROM certs WHERE not_after < ?1", params![now])?)
    }

    fn put_agent(tx: &rusqlite::Transaction<'_>, a: &AgentRow) -> Result<()> {
        tx.execute(
            &format!(
                "INSERT OR REPLACE INTO agents({}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)",
                Self::AGENT_COLS
            ),
            params![
                a.name,
                json(&a.labels),
                a.revoked,
                a.enrolled_at,
                a.hostname,
                json(&a.addresses),
                a.os,
                a.agent_version,
                json(&a.ssh_host_keys),
                a.last_seen,
                a.cert_serial,
                a.cert_not_after,
                a.token_id
            ],
        )?;
        Ok(())
    }

    fn put_ssh_cert(tx: &rusqlite::Transaction<'_>, c: &SshCertRow) -> Result<()> {
        tx.execute(
            &format!(
                "INSERT INTO ssh_certs({SSH_CERT_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)"
            ),
            params![
                c.serial,
                c.admin,
                c.sub,
                json(&c.groups),
                c.key_fingerprint,
                c.valid_after,
                c.valid_before,
                c.issued_at,
                c.source,
                c.revoked
            ],
        )?;
        Ok(())
    }

    fn put_cert(tx: &rusqlite::Transaction<'_>, c: &CertRow) -> Result<()> {
        tx.execute(
            "INSERT INTO certs(serial, agent, issued_at, not_after, revoked) VALUES (?1,?2,?3,?4,?5)",
            params![c.serial, c.agent, c.issued_at, c.not_after, c.revoked],
        )?;
        Ok(())
    }
}

impl Backend for SqliteStore {
    /// Persists pushed-configuration states (kept in memory between flushes) in one
    /// transaction: (name, desired, applied, error).
    fn flush_config(&mut self, rows: &[(String, String, String, String)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "UPDATE agents SET config_desired = ?2, config_applied = ?3, config_error = ?4
                 WHERE name = ?1",
            )?;
            for (name, d, a, e) in rows {
                stmt.execute(params![name, d, a, e])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn insert_token(&mut self, t: &TokenRow) -> Result<()> {
        self.conn.execute(
            "INSERT INTO tokens(id, hash, created, expires, uses_left, uses_total, name_pattern,
                labels, replace, revoked) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
            params![
                t.id,
                t.hash,
                t.created,
                t.expires,
                t.uses_left,
                t.uses_total,
                t.name_pattern,
                json(&t.labels),
                t.replace,
                t.revoked
            ],
        )?;
        Ok(())
    }

    fn token(&mut self, id: &str) -> Result<Option<TokenRow>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {} FROM tokens WHERE id = ?1", Self::TOKEN_COLS),
                params![id],
                Self::token_from_row,
            )
            .optional()?;
        row.map(|(mut t, labels)| {
            t.labels = unjson(&labels)?;
            Ok(t)
        })
        .transpose()
    }

    fn tokens(&mut self) -> Result<Vec<TokenRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM tokens ORDER BY created",
            Self::TOKEN_COLS
        ))?;
        let rows = stmt.query_map([], Self::token_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            let (mut t, labels) = row?;
            t.labels = unjson(&labels)?;
            out.push(t);
        }
        Ok(out)
    }

    fn revoke_token(&mut self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", params![id])?
            > 0)
    }

    /// Removes tokens expired for more than `grace` seconds.
    fn purge_tokens(&mut self, now: i64, grace: i64) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM tokens WHERE expires < ?1",
            params![now - grace],
        )?)
    }

    fn agents(&mut self) -> Result<Vec<AgentRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {}, {} FROM agents ORDER BY name",
            Self::AGENT_COLS,
            Self::CONFIG_COLS
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok((
                AgentRow {
                    name: r.get(0)?,
                    revoked: r.get(2)?,
                    enrolled_at: r.get(3)?,
                    hostname: r.get(4)?,
                    os: r.get(6)?,
                    agent_version: r.get(7)?,
                    last_seen: r.get(9)?,
                    cert_serial: r.get(10)?,
                    cert_not_after: r.get(11)?,
                    token_id: r.get(12)?,
                    config_desired: r.get(13)?,
                    config_applied: r.get(14)?,
                    config_error: r.get(15)?,
                    ..AgentRow::default()
                },
                r.get::<_, String>(1)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut a, labels, addresses, keys) = row?;
            a.labels = unjson(&labels)?;
            a.addresses = unjson(&addresses)?;
            a.ssh_host_keys = unjson(&keys)?;
            out.push(a);
        }
        Ok(out)
    }

    fn certs(&mut self) -> Result<Vec<CertRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT serial, agent, issued_at, not_after, revoked FROM certs")?;
        let rows = stmt.query_map([], |r| {
            Ok(CertRow {
                serial: r.get(0)?,
                agent: r.get(1)?,
                issued_at: r.get(2)?,
                not_after: r.get(3)?,
                revoked: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Records an enrollment in one transaction: the token use, the new certificate, the
    /// agent row (replacing any previous one of that name) and the revocation of the
    /// previous holder's certificates.
    fn commit_enrollment(
        &mut self,
        token_id: &str,
        agent: &AgentRow,
        cert: &CertRow,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        let used = tx.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0",
            params![token_id],
        )?;
        if used != 1 {
            return Err(StoreError::TokenUsed(token_id.to_string()));
        }
        tx.execute(
            "UPDATE certs SET revoked = 1 WHERE agent = ?1",
            params![agent.name],
        )?;
        Self::put_agent(&tx, agent)?;
        Self::put_cert(&tx, cert)?;
        tx.commit()?;
        Ok(())
    }

    /// Records a renewed certificate for an existing agent, in the same transaction as the
    /// pruning that keeps the table bounded (see [`SqliteStore::prune_certs`]): the agent's other
    /// unrevoked certificates than `proving` (the one the renewal came on) and the new one
    /// are superseded and deleted. Returns the number of rows deleted.
    fn commit_renewal(
        &mut self,
        agent: &str,
        proving: &str,
        cert: &CertRow,
        now: i64,
    ) -> Result<usize> {
        let tx = self.conn.transaction()?;
        Self::put_cert(&tx, cert)?;
        tx.execute(
            "UPDATE agents SET cert_serial = ?2, cert_not_after = ?3 WHERE name = ?1",
            params![agent, cert.serial, cert.not_after],
        )?;
        let superseded = tx.execute(
            "DELETE FROM certs WHERE agent = ?1 AND revoked = 0 AND serial <> ?2 AND serial <> ?3",
            params![agent, proving, cert.serial],
        )?;
        let expired = Self::delete_expired(&tx, now)?;
        tx.commit()?;
        Ok(superseded + expired)
    }

    /// Deletes certificates past their expiry. What the handshake check needs is kept: a
    /// revoked certificate stays known as revoked until it expires (so that its holder hears
    /// "revoked", and stops), and an expired one is refused by the certificate verifier before
    /// its serial is looked up. A serial missing from the table is refused too, so pruning
    /// can change why a certificate is refused, never whether.
    fn prune_certs(&mut self, now: i64) -> Result<usize> {
        let tx = self.conn.transaction()?;
        let n = Self::delete_expired(&tx, now)?;
        tx.commit()?;
        Ok(n)
    }

    /// Marks an agent and all its certificates revoked.
    fn revoke_agent(&mut self, name: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE agents SET revoked = 1 WHERE name = ?1",
            params![name],
        )?;
        tx.execute(
            "UPDATE certs SET revoked = 1 WHERE agent = ?1",
            params![name],
        )?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Stores the facts an agent registered.
    fn update_facts(&mut self, a: &AgentRow) -> Result<()> {
        self.conn.execute(
            "UPDATE agents SET hostname = ?2, addresses = ?3, os = ?4, agent_version = ?5,
                ssh_host_keys = ?6, last_seen = ?7 WHERE name = ?1",
            params![
                a.name,
                a.hostname,
                json(&a.addresses),
                a.os,
                a.agent_version,
                json(&a.ssh_host_keys),
                a.last_seen
            ],
        )?;
        Ok(())
    }

    /// One transaction, one fsync, for a whole group of registrations.
    fn update_facts_many(&mut self, rows: &[AgentRow]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE agents SET hostname = ?2, addresses = ?3, os = ?4, agent_version = ?5,
                    ssh_host_keys = ?6, last_seen = ?7 WHERE name = ?1",
            )?;
            for a in rows {
                stmt.execute(params![
                    a.name,
                    a.hostname,
                    json(&a.addresses),
                    a.os,
                    a.agent_version,
                    json(&a.ssh_host_keys),
                    a.last_seen
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Persists last-seen times in one transaction (they are kept in memory between flushes).
    fn flush_last_seen(&mut self, seen: &[(String, i64)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare("UPDATE agents SET last_seen = ?2 WHERE name = ?1")?;
            for (name, t) in seen {
                stmt.execute(params![name, t])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn is_empty(&mut self) -> Result<bool> {
        let n: i64 = self.conn.query_row(
            "SELECT (SELECT count(*) FROM tokens) + (SELECT count(*) FROM agents)
                + (SELECT count(*) FROM certs)",
            [],
            |r| r.get(0),
        )?;
        Ok(n == 0)
    }

    fn import(&mut self, d: &Dump) -> Result<()> {
        let tx = self.conn.transaction()?;
        for t in &d.tokens {
            tx.execute(
                &format!(
                    "INSERT INTO tokens({}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                    Self::TOKEN_COLS
                ),
                params![
                    t.id,
                    t.hash,
                    t.created,
                    t.expires,
                    t.uses_left,
                    t.uses_total,
                    t.name_pattern,
                    json(&t.labels),
                    t.replace,
                    t.revoked
                ],
            )?;
        }
        for a in &d.agents {
            Self::put_agent(&tx, a)?;
        }
        for c in &d.certs {
            Self::put_cert(&tx, c)?;
        }
        for c in &d.ssh_certs {
            Self::put_ssh_cert(&tx, c)?;
        }
        for (k, v) in d.identity.iter().filter(|(k, _)| *k != "schema_version") {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                params![k, v],
            )?;
        }
        {
            let mut stmt = tx.prepare(
                "UPDATE agents SET config_desired = ?2, config_applied = ?3, config_error = ?4
                 WHERE name = ?1",
            )?;
            for a in &d.agents {
                stmt.execute(params![
                    a.name,
                    a.config_desired,
                    a.config_applied,
                    a.config_error
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn identity(&mut self, key: &str) -> Result<Option<String>> {
        if key == "schema_version" {
            return Ok(None);
        }
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn identities(&mut self) -> Result<BTreeMap<String, String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT key, value FROM meta WHERE key <> 'schema_version'")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()?)
    }

    fn claim_identity(&mut self, key: &str, value: &str) -> Result<String> {
        if key == "schema_version" {
            return Err(StoreError::Corrupt("reserved key".into()));
        }
        self.conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })?)
    }

    fn insert_ssh_cert(&mut self, c: &SshCertRow, now: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        Self::put_ssh_cert(&tx, c)?;
        tx.execute(
            "DELETE FROM ssh_certs WHERE valid_before < ?1",
            params![now - SSH_CERT_KEEP],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn ssh_cert(&mut self, serial: i64) -> Result<Option<SshCertRow>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {SSH_CERT_COLS} FROM ssh_certs WHERE serial = ?1"),
                params![serial],
                ssh_cert_row,
            )
            .optional()?;
        row.map(with_groups).transpose()
    }

    fn ssh_certs(&mut self) -> Result<Vec<SshCertRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SSH_CERT_COLS} FROM ssh_certs ORDER BY serial"
        ))?;
        let rows = stmt.query_map([], ssh_cert_row)?;
        rows.map(|r| with_groups(r?)).collect()
    }

    fn revoke_ssh_certs(&mut self, serial: Option<i64>, admin: Option<&str>) -> Result<Vec<i64>> {
        if serial.is_none() && admin.is_none() {
            return Ok(Vec::new());
        }
        let tx = self.conn.transaction()?;
        let serials = {
            let mut stmt = tx.prepare(
                "UPDATE ssh_certs SET revoked = 1 WHERE revoked = 0
                    AND (?1 IS NULL OR serial = ?1) AND (?2 IS NULL OR admin = ?2) RETURNING serial",
            )?;
            let rows = stmt.query_map(params![serial, admin], |r| r.get::<_, i64>(0))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(serials)
    }

    fn describe(&self) -> String {
        format!("SQLite {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_missing_and_garbage() {
        let dir = std::env::temp_dir().join(format!("bastide-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.sqlite");
        assert!(SqliteStore::open(&p).is_err());
        std::fs::write(&p, b"this is not a database, it is garbage................").unwrap();
        assert!(SqliteStore::open(&p).is_err());
        std::fs::remove_file(&p).unwrap();
        SqliteStore::create(&p).unwrap();
        assert!(SqliteStore::create(&p).is_err());
        SqliteStore::open(&p).unwrap();
    }

    #[test]
    fn migrates_a_version_1_store() {
        let dir = std::env::temp_dir().join(format!("bastide-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.sqlite");
        {
            // A store as version 1 of bastide left it.
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('schema_version', '1');
                 CREATE TABLE tokens (id TEXT PRIMARY KEY, hash BLOB NOT NULL, created INTEGER NOT NULL,
                    expires INTEGER NOT NULL, uses_left INTEGER NOT NULL, uses_total INTEGER NOT NULL,
                    name_pattern TEXT, labels TEXT NOT NULL, replace INTEGER NOT NULL, revoked INTEGER NOT NULL);
                 CREATE TABLE agents (name TEXT PRIMARY KEY, labels TEXT NOT NULL, revoked INTEGER NOT NULL,
                    enrolled_at INTEGER NOT NULL, hostname TEXT NOT NULL, addresses TEXT NOT NULL,
                    os TEXT NOT NULL, agent_version TEXT NOT NULL, ssh_host_keys TEXT NOT NULL,
                    last_seen INTEGER, cert_serial TEXT NOT NULL, cert_not_after INTEGER NOT NULL,
                    token_id TEXT NOT NULL);
                 CREATE TABLE certs (serial TEXT PRIMARY KEY, agent TEXT NOT NULL, issued_at INTEGER NOT NULL,
                    not_after INTEGER NOT NULL, revoked INTEGER NOT NULL);
                 INSERT INTO agents VALUES ('web1', '{}', 0, 1, 'h', '[]', 'linux', '1', '[]', NULL, 's', 2, 't');",
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(&p).unwrap();
        let a = s.agents().unwrap();
        assert_eq!(a[0].name, "web1");
        assert_eq!(a[0].config_applied, "");
        s.flush_config(&[("web1".into(), "d".into(), "a".into(), "e".into())])
            .unwrap();
        drop(s);
        let mut s = SqliteStore::open(&p).unwrap();
        let a = s.agents().unwrap();
        assert_eq!(
            (
                a[0].config_desired.as_str(),
                a[0].config_applied.as_str(),
                a[0].config_error.as_str()
            ),
            ("d", "a", "e")
        );
        let v: String = s
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_string());
    }
}
