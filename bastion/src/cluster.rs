//! Several bastions sharing one PostgreSQL store (`[store] backend = "postgres"`): how each
//! node learns what the others changed, tells where its agents' sessions are, and how one of
//! them is elected for the jobs that must run once. PostgreSQL's own means only, no
//! consensus of ours:
//!
//! - every write that changes an agent (enrollment, registration, renewal, revocation,
//!   session taken or left) sends `NOTIFY bastide_registry, '<agent>'` in its transaction;
//!   each node LISTENs on a dedicated connection and reloads the agents named (certificates
//!   and session holder included) into its registry, cutting the connections of an agent
//!   revoked elsewhere. Notifications sent while that connection is down are lost, so every
//!   (re)connection starts with a full reload;
//! - every revocation of an SSH user certificate sends `NOTIFY bastide_ssh_certs, '<serial>'`
//!   in its transaction; each node cuts its connections authenticated with that serial
//!   (`ssh::issued`; the 30 s recheck covers notifications lost while disconnected);
//! - the `sessions` table says which node holds each agent's session (`agents list` on any
//!   node); a node writes its own rows, and the leader deletes the rows of a node whose
//!   heartbeat (`nodes`, every second) is older than [`DEAD_AFTER_SECS`];
//! - the leader is the node holding `pg_try_advisory_lock(LEADER_LOCK)` on a session of its
//!   own: the lock goes with that connection, so a dead or cut-off node loses it and another
//!   node takes it at its next attempt. The leader runs the sweep of dead nodes' sessions and
//!   the pruning of expired certificates and tokens (each node keeps flushing the last-seen
//!   times of the sessions it holds, which only move forward in the store).
//!
//! While the store is unreachable the node serves from its last snapshot, refuses what needs
//! the store (enrollment, revocation, renewal), and after `[store] max_disconnected` refuses
//! new agent sessions (see `registry::sync`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::names;
use crate::registry::{Registry, RegistryEvent, RemoteUpdate};
use crate::service::{Ctx, Service};
use crate::store::postgres::{
    agent_row, cert_row, pg_err, tls_config, AGENT_COLS, NOTIFY_CHANNEL, SSH_CERTS_CHANNEL,
};
use crate::store::{BackendKind, PgSettings};

/// How often a node says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Delay between attempts to reach the store.
const RETRY: Duration = Duration::from_secs(1);
/// A node silent for this long is dead: the leader clears the sessions it held.
pub const DEAD_AFTER_SECS: i64 = 10;
/// Advisory lock of the leader ("bastidf": next to the migrations' lock).
const LEADER_LOCK: i64 = 0x0062_6173_7469_6466;
/// How often the leader sweeps dead nodes' sessions.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How often the leader prunes expired rows.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Tokens expired for this long are deleted (as `token list` does).
const TOKEN_GRACE_SECS: i64 = 7 * 86400;

const CERT_COLS: &str = "serial, agent, issued_at, not_after, revoked";

pub struct Cluster {
    settings: PgSettings,
    node: String,
    /// This node's service addresses, published in `nodes.services`.
    services: String,
}

impl Service for Cluster {
    const NAME: &'static str = "cluster";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        if cfg.store.backend != BackendKind::Postgres {
            return Ok(None);
        }
        let settings = cfg
            .store
            .postgres_settings(None)
            .map_err(|e| anyhow::anyhow!("[store]: {e}"))?;
        let node = cfg.store.node_name();
        let max = cfg.store.max_disconnected;
        ctx.registry.set_cluster_node(&node, max);
        let r = ctx.registry.clone();
        ctx.admin.status("cluster", move || {
            let c = r.cluster();
            let refusal = c.refuses_sessions();
            serde_json::json!({
                "node": c.node(),
                "leader": c.is_leader(),
                "store_connected": c.connected.load(std::sync::atomic::Ordering::Relaxed),
                "disconnected_secs": c.disconnected_for().map(|d| d.as_secs()),
                "max_disconnected_secs": max.as_secs(),
                "accepting_sessions": refusal.is_none(),
                "refusal": refusal,
            })
        });
        Ok(Some(Self {
            settings,
            node,
            services: crate::config_push::service::bastion_vars(cfg)["services"].to_string(),
        }))
    }

    async fn run(self, ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        let leader = tokio::spawn(lead(
            self.settings.clone(),
            self.node.clone(),
            ctx.registry.clone(),
            shutdown.clone(),
        ));
        follow(&self, &ctx.registry, &shutdown).await;
        let _ = leader.await;
        Ok(())
    }
}

/// Notifications (channel, payload) of a dedicated connection; an `Err` ends it.
type Notes = mpsc::UnboundedReceiver<std::result::Result<(String, String), String>>;

fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>) -> Notes
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx
                        .send(Ok((n.channel().to_string(), n.payload().to_string())))
                        .is_err()
                    {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx.send(Err(pg_err(e).to_string()));
                    return;
                }
                None => {
                    let _ = tx.send(Err("connection closed".into()));
                    return;
                }
            }
        }
    });
    rx
}

/// A connection of its own (not the pool's): LISTEN and the leader's lock live with it.
async fn connect(s: &PgSettings, app: &str) -> std::result::Result<(Client, Notes), String> {
    let mut cfg = s.config.clone();
    cfg.application_name(app);
    let connecting = async {
        match &s.tls_ca {
            Some(ca) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
                    tls_config(ca).map_err(|e| e.to_string())?,
                );
                let (c, conn) = cfg.connect(tls).await.map_err(|e| pg_err(e).to_string())?;
                Ok((c, drive(conn)))
            }
            None => {
                let (c, conn) = cfg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| pg_err(e).to_string())?;
                Ok((c, drive(conn)))
            }
        }
    };
    tokio::time::timeout(s.timeout, connecting)
        .await
        .map_err(|_| "no answer from PostgreSQL".to_string())?
}

fn e2s(e: tokio_postgres::Error) -> String {
    pg_err(e).to_string()
}

/// Bounds a call on a dedicated connection.
async fn bounded<T>(
    s: &PgSettings,
    f: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, String> {
    tokio::time::timeout(s.timeout, f)
        .await
        .map_err(|_| "no answer from PostgreSQL".to_string())?
        .map_err(e2s)
}

fn gauges(reg: &Registry) {
    let c = reg.cluster();
    metrics::gauge!(names::STORE_CONNECTED).set(
        if c.connected.load(std::sync::atomic::Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    metrics::gauge!(names::STORE_DISCONNECTED_SECONDS)
        .set(c.disconnected_for().map_or(0.0, |d| d.as_secs_f64()));
    metrics::gauge!(names::STORE_SESSIONS_REFUSED).set(if c.refuses_sessions().is_some() {
        1.0
    } else {
        0.0
    });
    metrics::gauge!(names::CLUSTER_LEADER).set(if c.is_leader() { 1.0 } else { 0.0 });
}

/// Keeps this node's registry in step with the store until shutdown.
async fn follow(c: &Cluster, reg: &Registry, shutdown: &CancellationToken) {
    let mut events = reg.events();
    let mut warned = false;
    let mut cut_off_said = false;
    loop {
        match follow_once(c, reg, &mut events, shutdown).await {
            Ok(()) => return,
            Err(e) => {
                reg.cluster().set_connected(false);
                if !warned {
                    warn!(error = %e, "registry's database unreachable: serving from the last snapshot; enrollment, revocation and renewal refused until it is back");
                    warned = true;
                }
            }
        }
        gauges(reg);
        match reg.cluster().refuses_sessions() {
            Some(why) if !cut_off_said => {
                warn!("{why}");
                cut_off_said = true;
            }
            None => cut_off_said = false,
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
        if reg
            .cluster()
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            warned = false;
        }
    }
}

/// One connection's life: LISTEN, say which sessions we hold, reload everything, then apply
/// notifications and write our session changes until the connection fails (`Err`) or
/// shutdown (`Ok`).
async fn follow_once(
    c: &Cluster,
    reg: &Registry,
    events: &mut broadcast::Receiver<RegistryEvent>,
    shutdown: &CancellationToken,
) -> std::result::Result<(), String> {
    let s = &c.settings;
    let (mut client, mut notes) = connect(s, &format!("bastide {}", c.node)).await?;
    // LISTEN before reading: a change committed meanwhile is read, or notified, or both.
    bounded(
        s,
        client.batch_execute(&format!(
            "LISTEN {NOTIFY_CHANNEL}; LISTEN {SSH_CERTS_CHANNEL}"
        )),
    )
    .await?;
    bounded(
        s,
        client.execute(
            "INSERT INTO nodes(id, services) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET heartbeat = now(), services = EXCLUDED.services",
            &[&c.node, &c.services],
        ),
    )
    .await?;
    let r = reg.clone();
    match tokio::task::spawn_blocking(move || r.flush_pending_facts()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => info!(
            agents = n,
            "registrations made while the database was away written"
        ),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    }
    // Events queued so far are covered by writing the whole set of our sessions.
    while events.try_recv().is_ok() {}
    sync_sessions(s, &client, &c.node, &reg.local_sessions()).await?;
    reload(s, &mut client, reg, None).await?;
    read_nodes(s, &client, reg).await?;
    metrics::counter!(names::CLUSTER_RESYNCS).increment(1);
    if reg.cluster().disconnected_for().is_some() {
        info!("registry's database reachable again: resynced");
    }
    reg.cluster().set_connected(true);
    gauges(reg);
    info!(node = %c.node, "registry in step with the shared store");
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Leaving: the sessions we held are no longer ours.
                let _ = bounded(s, client.execute(
                    "WITH gone AS (DELETE FROM sessions WHERE node = $1 RETURNING agent)
                     SELECT pg_notify('bastide_registry', agent) FROM gone", &[&c.node])).await;
                let _ = bounded(s, client.execute("DELETE FROM nodes WHERE id = $1", &[&c.node])).await;
                return Ok(());
            }
            n = notes.recv() => {
                let mut names = BTreeSet::new();
                match n {
                    Some(Ok(n)) => note(reg, &mut names, n),
                    Some(Err(e)) => return Err(e),
                    None => return Err("connection closed".into()),
                }
                // Everything already queued goes in the same reload.
                loop {
                    match notes.try_recv() {
                        Ok(Ok(n)) => note(reg, &mut names, n),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => break,
                    }
                }
                if !names.is_empty() {
                    reload(s, &mut client, reg, Some(names)).await?;
                }
            }
            ev = events.recv() => {
                let mut online = BTreeSet::new();
                let mut offline = BTreeSet::new();
                let mut lagged = false;
                let mut note = |ev: std::result::Result<RegistryEvent, broadcast::error::TryRecvError>| match ev {
                    Ok(RegistryEvent::Online(n)) => { offline.remove(&n); online.insert(n); }
                    Ok(RegistryEvent::Offline(n)) => { online.remove(&n); offline.insert(n); }
                    Ok(_) => {}
                    Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                    Err(_) => {}
                };
                match ev {
                    Ok(e) => note(Ok(e)),
                    Err(broadcast::error::RecvError::Lagged(n)) => note(Err(broadcast::error::TryRecvError::Lagged(n))),
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
                loop {
                    match events.try_recv() {
                        Err(broadcast::error::TryRecvError::Empty) | Err(broadcast::error::TryRecvError::Closed) => break,
                        r => note(r),
                    }
                }
                if lagged {
                    sync_sessions(s, &client, &c.node, &reg.local_sessions()).await?;
                } else {
                    let online = online.into_iter().map(|n| { let o = reg.observed(&n); (n, o) }).collect();
                    write_sessions(s, &client, &c.node, online, offline).await?;
                }
            }
            _ = beat.tick() => {
                let n = bounded(s, client.execute("UPDATE nodes SET heartbeat = now() WHERE id = $1", &[&c.node])).await?;
                if n == 0 {
                    // Declared dead by the leader (we were silent too long): back in, with
                    // the sessions we hold.
                    warn!(node = %c.node, "this node had been declared dead by the cluster: rejoining");
                    bounded(s, client.execute("INSERT INTO nodes(id, services) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", &[&c.node, &c.services])).await?;
                    sync_sessions(s, &client, &c.node, &reg.local_sessions()).await?;
                }
                read_nodes(s, &client, reg).await?;
                gauges(reg);
            }
        }
    }
}

/// Sorts one notification: an agent to reload, or an SSH user certificate revoked (its
/// connections on this node are cut at once, through the registry's events).
fn note(reg: &Registry, names: &mut BTreeSet<String>, (channel, payload): (String, String)) {
    if channel == SSH_CERTS_CHANNEL {
        match payload.parse() {
            Ok(serial) => reg.ssh_cert_revoked_elsewhere(serial),
            Err(_) => warn!(%payload, "unreadable SSH certificate revocation notice"),
        }
    } else {
        names.insert(payload);
    }
}

/// The live nodes and their services (for the templates' `bastion.services`).
async fn read_nodes(
    s: &PgSettings,
    client: &Client,
    reg: &Registry,
) -> std::result::Result<(), String> {
    let rows = bounded(s, client.query("SELECT id, services FROM nodes", &[])).await?;
    let mut nodes = std::collections::BTreeMap::new();
    for r in rows {
        let id: String = r.try_get(0).map_err(e2s)?;
        let services: String = r.try_get(1).map_err(e2s)?;
        nodes.insert(id, serde_json::from_str(&services).unwrap_or_default());
    }
    reg.cluster().set_nodes(nodes);
    Ok(())
}

/// Writes the sessions this node took and left (each notified).
async fn write_sessions(
    s: &PgSettings,
    client: &Client,
    node: &str,
    online: Vec<(String, String)>,
    offline: BTreeSet<String>,
) -> std::result::Result<(), String> {
    if !online.is_empty() {
        let (v, o): (Vec<String>, Vec<String>) = online.into_iter().unzip();
        bounded(
            s,
            client.execute(
                "WITH up AS (INSERT INTO sessions(agent, node, observed)
                    SELECT v.a, $2, v.o FROM unnest($1::TEXT[], $3::TEXT[]) AS v(a, o)
                    ON CONFLICT (agent) DO UPDATE SET node = EXCLUDED.node, since = now(),
                        observed = EXCLUDED.observed
                    RETURNING agent)
                 SELECT pg_notify('bastide_registry', agent) FROM up",
                &[&v, &node, &o],
            ),
        )
        .await?;
    }
    if !offline.is_empty() {
        let v: Vec<String> = offline.into_iter().collect();
        bounded(
            s,
            client.execute(
                "WITH gone AS (DELETE FROM sessions WHERE node = $2 AND agent = ANY($1)
                    RETURNING agent)
                 SELECT pg_notify('bastide_registry', agent) FROM gone",
                &[&v, &node],
            ),
        )
        .await?;
    }
    Ok(())
}

/// Makes the store's rows of this node exactly `held`.
async fn sync_sessions(
    s: &PgSettings,
    client: &Client,
    node: &str,
    held: &[(String, String)],
) -> std::result::Result<(), String> {
    let (held, observed): (Vec<String>, Vec<String>) = held.iter().cloned().unzip();
    bounded(
        s,
        client.execute(
            "WITH gone AS (DELETE FROM sessions WHERE node = $2 AND NOT (agent = ANY($1))
                RETURNING agent),
             up AS (INSERT INTO sessions(agent, node, observed)
                SELECT v.a, $2, v.o FROM unnest($1::TEXT[], $3::TEXT[]) AS v(a, o)
                ON CONFLICT (agent) DO UPDATE SET node = EXCLUDED.node,
                    observed = EXCLUDED.observed
                WHERE sessions.node <> EXCLUDED.node OR sessions.observed <> EXCLUDED.observed
                RETURNING agent)
             SELECT pg_notify('bastide_registry', agent)
             FROM (SELECT agent FROM gone UNION SELECT agent FROM up) AS x",
            &[&held, &node, &observed],
        ),
    )
    .await?;
    Ok(())
}

/// Reads the rows of `names` (None: all) in one snapshot and applies them to the registry.
async fn reload(
    s: &PgSettings,
    client: &mut Client,
    reg: &Registry,
    names: Option<BTreeSet<String>>,
) -> std::result::Result<(), String> {
    let read = async {
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let rows = match &names {
            None => (
                tx.query(&format!("SELECT {AGENT_COLS} FROM agents"), &[])
                    .await?,
                tx.query(&format!("SELECT {CERT_COLS} FROM certs"), &[])
                    .await?,
                tx.query("SELECT agent, node, observed FROM sessions", &[])
                    .await?,
            ),
            Some(n) => {
                let v: Vec<&str> = n.iter().map(String::as_str).collect();
                (
                    tx.query(
                        &format!("SELECT {AGENT_COLS} FROM agents WHERE name = ANY($1)"),
                        &[&v],
                    )
                    .await?,
                    tx.query(
                        &format!("SELECT {CERT_COLS} FROM certs WHERE agent = ANY($1)"),
                        &[&v],
                    )
                    .await?,
                    tx.query(
                        "SELECT agent, node, observed FROM sessions WHERE agent = ANY($1)",
                        &[&v],
                    )
                    .await?,
                )
            }
        };
        tx.commit().await?;
        Ok(rows)
    };
    let (agents, certs, sessions) = bounded(s, read).await?;
    let mut u = RemoteUpdate {
        names: names.map(|n| n.into_iter().collect()),
        ..RemoteUpdate::default()
    };
    for r in &agents {
        u.agents.push(agent_row(r).map_err(|e| e.to_string())?);
    }
    for r in &certs {
        u.certs.push(cert_row(r).map_err(|e| e.to_string())?);
    }
    for r in &sessions {
        u.sessions.push((
            r.try_get(0).map_err(e2s)?,
            r.try_get(1).map_err(e2s)?,
            r.try_get(2).map_err(e2s)?,
        ));
    }
    let n = u.names.as_ref().map_or(u.agents.len(), Vec::len);
    let r = reg.clone();
    tokio::task::spawn_blocking(move || r.apply_remote(u))
        .await
        .map_err(|e| e.to_string())?;
    metrics::counter!(names::CLUSTER_CHANGES).increment(n as u64);
    Ok(())
}

/// Competes for leadership and, while holding it, runs the cluster's run-once jobs.
async fn lead(s: PgSettings, node: String, reg: Registry, shutdown: CancellationToken) {
    loop {
        if let Ok((client, mut notes)) = connect(&s, &format!("bastide {node} leader")).await {
            let r = lead_on(&s, &client, &mut notes, &reg, &shutdown).await;
            if reg.cluster().is_leader() {
                if let Err(e) = r {
                    warn!(error = %e, "leadership lost with its connection to the database");
                }
            }
        }
        reg.cluster()
            .leader
            .store(false, std::sync::atomic::Ordering::Relaxed);
        gauges(&reg);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn lead_on(
    s: &PgSettings,
    client: &Client,
    notes: &mut Notes,
    reg: &Registry,
    shutdown: &CancellationToken,
) -> std::result::Result<(), String> {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            n = notes.recv() => match n {
                Some(Err(e)) => return Err(e),
                None => return Err("connection closed".into()),
                Some(Ok(_)) => continue,
            },
            _ = tick.tick() => {}
        }
        if !reg.cluster().is_leader() {
            let got: bool = bounded(
                s,
                client.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]),
            )
            .await?
            .try_get(0)
            .map_err(e2s)?;
            if !got {
                continue;
            }
            reg.cluster()
                .leader
                .store(true, std::sync::atomic::Ordering::Relaxed);
            gauges(reg);
            info!("this node now runs the cluster's run-once jobs (leader)");
        }
        // Sessions of dead nodes, of nodes gone, and of revoked agents.
        bounded(
            s,
            client.execute(
                "WITH dead AS (DELETE FROM nodes
                    WHERE heartbeat < now() - make_interval(secs => $1::FLOAT8) RETURNING id),
                 gone AS (DELETE FROM sessions s WHERE s.node IN (SELECT id FROM dead)
                    OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = s.node)
                    OR EXISTS (SELECT 1 FROM agents a WHERE a.name = s.agent AND a.revoked)
                    RETURNING agent)
                 SELECT pg_notify('bastide_registry', agent) FROM gone",
                &[&(DEAD_AFTER_SECS as f64)],
            ),
        )
        .await?;
        if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            let now = crate::unix_now();
            let certs = bounded(
                s,
                client.execute("DELETE FROM certs WHERE not_after < $1", &[&now]),
            )
            .await?;
            let tokens = bounded(
                s,
                client.execute(
                    "DELETE FROM tokens WHERE expires < $1",
                    &[&(now - TOKEN_GRACE_SECS)],
                ),
            )
            .await?;
            if certs + tokens > 0 {
                info!(
                    certificates = certs,
                    tokens, "expired rows pruned from the shared store"
                );
            }
            pruned = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::issued::IssuedCerts;
    use crate::store::{SshCertRow, Store};

    /// A revocation written by another node (its own store connection) reaches this node's
    /// cut path through `NOTIFY bastide_ssh_certs`: no recheck runs here, so only the
    /// notification can cut the tracked connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_notified_by_another_node_cuts_at_once() {
        let pg = bastide_tests::Postgres::start();
        pg.create_db("registry");
        let dir = std::env::temp_dir().join(format!("bastide-cluster-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = crate::store::tests::pg_config(&pg, "registry", &dir);
        let paths = crate::pki::PkiPaths::new(&dir);
        crate::pki::init(&paths, "p", None, &[]).unwrap();
        let ca = crate::pki::AgentCa::load(&paths, "p", None).unwrap();
        let reg = tokio::task::block_in_place(|| {
            Registry::open(
                Store::open_configured(&cfg, &dir).unwrap(),
                ca,
                crate::registry::RegistrySettings {
                    cert_lifetime: Duration::from_secs(3600),
                    addresses: Default::default(),
                },
            )
        })
        .unwrap();
        reg.set_cluster_node("b", Duration::from_secs(60));
        let cluster = Cluster {
            settings: cfg.postgres_settings(None).unwrap(),
            node: "b".into(),
            services: "{}".into(),
        };
        let shutdown = CancellationToken::new();
        let (r, sd) = (reg.clone(), shutdown.clone());
        let following = tokio::spawn(async move { follow(&cluster, &r, &sd).await });
        let certs = IssuedCerts::new(reg.clone());
        tokio::spawn(certs.clone().cut_on_events(shutdown.clone()));

        // Node "a": its own connection to the store.
        let mut a = tokio::task::block_in_place(|| Store::open_configured(&cfg, &dir)).unwrap();
        let now = crate::unix_now();
        let row = |serial| SshCertRow {
            serial,
            admin: "alice".into(),
            sub: "s".into(),
            groups: vec![],
            key_fingerprint: "SHA256:x".into(),
            valid_after: now - 10,
            valid_before: now + 3600,
            issued_at: now,
            source: "127.0.0.1".into(),
            revoked: false,
        };
        tokio::task::block_in_place(|| a.insert_ssh_cert(&row(7), now)).unwrap();
        tokio::task::block_in_place(|| a.insert_ssh_cert(&row(8), now)).unwrap();
        let (cut7, cut8) = (CancellationToken::new(), CancellationToken::new());
        let _t7 = certs.track(7, cut7.clone());
        let _t8 = certs.track(8, cut8.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reg
            .cluster()
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            assert!(Instant::now() < deadline, "node b never followed the store");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let t = Instant::now();
        assert_eq!(
            tokio::task::block_in_place(|| a.revoke_ssh_certs(Some(7), None)).unwrap(),
            vec![7]
        );
        tokio::time::timeout(Duration::from_secs(5), cut7.cancelled())
            .await
            .expect("the revocation notice did not cut the connection on node b");
        println!("revocation on a cut b's connection after {:?}", t.elapsed());
        assert!(!cut8.is_cancelled(), "another serial is not cut");
        shutdown.cancel();
        following.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
