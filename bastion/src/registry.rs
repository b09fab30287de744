//! The registry: the one owner of agent state. It alone writes the store; services read its
//! snapshot (a `watch` of an immutable map) and subscribe to its events. Enrollment, token
//! use, renewal and revocation all go through here, serialised by one lock so that a token's
//! last use cannot be spent twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use globset::Glob;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::addresses::{resolve_conflicts, AddressPolicy, Candidate, Judged, Refusal};
use crate::coalesce::{GroupCommit, Throttle};
use crate::pki::{valid_agent_name, AgentCa, AgentIdentity, PkiError};
use crate::store::{AgentRow, CertRow, Store, StoreError, TokenRow};
use crate::unix_now;

mod sync;
pub use sync::{ClusterState, RemoteUpdate};

/// Bounds on what an agent may report about itself.
const MAX_ADDRESSES: usize = 64;
const MAX_SSH_KEYS: usize = 16;
const MAX_SSH_KEY_LEN: usize = 16 * 1024;
const MAX_TEXT: usize = 256;
/// Bounds on tokens.
pub const MAX_TOKEN_USES: u32 = 10_000;
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What services see of an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub revoked: bool,
    pub online: bool,
    pub hostname: String,
    /// The ACCEPTED addresses (see `crate::addresses`): the only ones any service may use
    /// for a decision. Unique across agents.
    pub addresses: Vec<IpAddr>,
    /// What the agent claimed at its last registration (for display only).
    pub claimed: Vec<IpAddr>,
    /// The address its mTLS connection came from at its last registration since the
    /// bastion started (for display and the policy only).
    pub observed: Option<IpAddr>,
    /// Claims not used, with the reason.
    pub refused: Vec<RefusedAddress>,
    /// `address-mismatch` (the observed address is none of the claimed ones),
    /// `address-conflict` (a claim is held by other agents too).
    pub flags: Vec<String>,
    pub os: String,
    pub agent_version: String,
    pub ssh_host_keys: Vec<String>,
    pub enrolled_at: i64,
    pub cert_serial: String,
    pub cert_not_after: i64,
    /// Node holding its session (several bastions on PostgreSQL; empty: none, or a single
    /// bastion).
    pub node: String,
    /// Whether this bastion holds its session.
    pub here: bool,
}

/// A claimed address the address policy did not accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedAddress {
    pub address: IpAddr,
    pub reason: String,
}

pub const FLAG_MISMATCH: &str = "address-mismatch";
pub const FLAG_CONFLICT: &str = "address-conflict";

/// An immutable view of every agent, replaced on each change.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub agents: BTreeMap<String, Arc<AgentInfo>>,
}

impl Snapshot {
    /// Agents that are enrolled and not revoked.
    pub fn active(&self) -> impl Iterator<Item = &Arc<AgentInfo>> {
        self.agents.values().filter(|a| !a.revoked)
    }
}

/// A change in the registry, for services that react to events rather than snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    Enrolled(String),
    Registered(String),
    Online(String),
    Offline(String),
    Renewed(String),
    Revoked(String),
    /// An SSH user certificate (serial) revoked on another node sharing the store
    /// (`crate::cluster`): this node cuts the connections authenticated with it.
    SshCertRevoked(i64),
}

/// The admin view of an agent (`bastide agents list`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStatus {
    pub name: String,
    pub state: String,
    /// Accepted addresses: what SSH, DNS, SMTP and syslog use.
    pub addresses: Vec<String>,
    /// Address the agent's connection came from (empty: not seen since the bastion started).
    #[serde(default)]
    pub observed: String,
    #[serde(default)]
    pub claimed: Vec<String>,
    /// Refused claims, each "ADDRESS: reason".
    #[serde(default)]
    pub refused: Vec<String>,
    /// `address-mismatch`, `address-conflict`.
    #[serde(default)]
    pub flags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    pub last_seen: Option<i64>,
    pub enrolled_at: i64,
    pub cert_serial: String,
    pub cert_not_after: i64,
    /// Pushed configuration: revision wanted, revision applied, last error (empty: none).
    #[serde(default)]
    pub config_desired: String,
    #[serde(default)]
    pub config_applied: String,
    #[serde(default)]
    pub config_error: String,
    /// `none`, `in-sync`, `pending`, `refused` or `render-error` (see [`ConfigState::summary`]).
    #[serde(default)]
    pub config_state: String,
    /// Node holding its session (several bastions; empty: none, or a single bastion).
    #[serde(default)]
    pub node: String,
}

/// Where an agent stands with its pushed configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigState {
    /// Revision rendered for it (empty: nothing to push yet).
    pub desired: String,
    /// Revision it reported applied in full.
    pub applied: String,
    /// Last error: a NACK, or a render error on the bastion (empty: none).
    pub error: String,
    /// Revision the agent refused (NACK) and that was not sent again since (empty: none).
    /// Not stored: a reconnection sends the desired revision again, which clears it.
    pub refused: String,
}

impl ConfigState {
    /// One word for `bastide agents list` and the metrics: `none` (nothing rendered),
    /// `render-error` (the bastion could not render it; the last good revision stays),
    /// `refused` (the agent NACKed the desired revision; not sent again until the tree
    /// changes, the agent reconnects or `bastide config reload`), `in-sync` or `pending`.
    pub fn summary(&self) -> &'static str {
        if self.error.starts_with("bastion: ") {
            "render-error"
        } else if self.desired.is_empty() {
            "none"
        } else if self.refused == self.desired {
            "refused"
        } else if self.desired == self.applied {
            "in-sync"
        } else {
            "pending"
        }
    }
}

/// The admin view of a token (`bastide token list`); never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenStatus {
    pub id: String,
    pub created: i64,
    pub expires: i64,
    pub uses_left: u32,
    pub uses_total: u32,
    pub name_pattern: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub replace: bool,
    pub state: String,
}

/// What `bastide token create` asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenSpec {
    pub ttl_secs: u64,
    pub uses: u32,
    pub name_pattern: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub replace: bool,
}

/// A freshly created token: the only time the secret exists outside the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreatedToken {
    pub id: String,
    pub token: String,
    pub expires: i64,
}

/// Facts an agent reports at registration.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub claimed_name: String,
    pub hostname: String,
    pub addresses: Vec<String>,
    pub os: String,
    pub agent_version: String,
    pub ssh_host_keys: Vec<String>,
    /// Configuration revision the agent has applied.
    pub config_revision: String,
}

/// What an enrollment produced.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub name: String,
    pub certificate_pem: String,
    pub not_after: i64,
}

#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("invalid enrollment token")]
    InvalidToken,
    #[error("enrollment token expired")]
    TokenExpired,
    #[error("enrollment token already used")]
    TokenUsed,
    #[error("enrollment token revoked")]
    TokenRevoked,
    #[error(
        "name {0:?} is not a valid agent name (lowercase letters, digits and '-', at most 63)"
    )]
    InvalidName(String),
    #[error("name {name:?} is not allowed by this token (pattern {pattern:?})")]
    NameNotAllowed { name: String, pattern: String },
    #[error("name {0:?} is held by another enrolled agent (revoke it, or use a token created with --replace)")]
    NameTaken(String),
    #[error("{0}")]
    Csr(#[from] PkiError),
    #[error("internal error: {0}")]
    Internal(String),
    /// The shared store (PostgreSQL) cannot be reached: nothing can be enrolled until it is.
    #[error(
        "the registry's database is unreachable, enrollment is refused until it is back ({0})"
    )]
    StoreUnavailable(String),
}

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("agent {0:?} is revoked")]
    Revoked(String),
    #[error("unknown token {0:?}")]
    UnknownToken(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Cut off from the shared store for longer than `[store] max_disconnected`.
    #[error("{0}")]
    CutOff(String),
}

/// Why a certificate serial is refused at handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SerialRefusal {
    #[error("certificate revoked")]
    Revoked,
    #[error("certificate unknown to this bastion")]
    Unknown,
}

/// Settings the registry needs from the configuration.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub cert_lifetime: Duration,
    /// Which claimed addresses services may use.
    pub addresses: AddressPolicy,
}

/// What cuts one authenticated agent connection: its revocation (at once) or the expiry of
/// its certificate (the endpoint's sweep, [`Registry::cut_expired`], within a second). The
/// connection polls it at every read and write. A flag and a waker: at fleet scale a
/// cancellation token with its own timer cost each connection several hundred bytes more.
pub struct ConnCut {
    agent: Box<str>,
    /// Unix seconds.
    not_after: i64,
    state: AtomicU8,
    waker: AtomicWaker,
}

impl ConnCut {
    const OPEN: u8 = 0;
    const REVOKED: u8 = 1;
    const EXPIRED: u8 = 2;

    fn cut(&self, why: u8) {
        let _ = self
            .state
            .compare_exchange(Self::OPEN, why, Ordering::AcqRel, Ordering::Acquire);
        self.waker.wake();
    }

    /// Why the connection was cut, if it was.
    pub fn reason(&self) -> Option<&'static str> {
        match self.state.load(Ordering::Acquire) {
            Self::OPEN => None,
            Self::REVOKED => Some("certificate revoked"),
            _ => Some("certificate expired"),
        }
    }

    /// Ready with the reason once cut; otherwise wakes `cx` when it is.
    pub fn poll_cut(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<&'static str> {
        if let Some(r) = self.reason() {
            return std::task::Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        // A cut between the first look and the registration woke no one: look again.
        match self.reason() {
            Some(r) => std::task::Poll::Ready(r),
            None => std::task::Poll::Pending,
        }
    }

    /// Cuts it as revoked (the registry's check right after the handshake).
    pub fn revoke(&self) {
        self.cut(Self::REVOKED);
    }

    /// Cuts it as expired (a certificate that expired during the handshake).
    pub fn expire(&self) {
        self.cut(Self::EXPIRED);
    }
}

#[derive(Default)]
struct State {
    agents: BTreeMap<String, AgentRow>,
    certs: HashMap<String, CertRow>,
    sessions: HashMap<String, u32>,
    /// Peer address of each agent's last registration (not stored: evidence from this run).
    observed: HashMap<String, IpAddr>,
    /// Node holding each agent's session, as the shared store says (several bastions).
    holders: HashMap<String, String>,
    /// Agents whose registered facts could not be written (store unreachable): written at
    /// the resync.
    pending_facts: HashSet<String>,
}

struct Inner {
    store: Mutex<Store>,
    /// Which store, for `status` (read without waiting for the store's lock).
    store_describe: String,
    ca: AgentCa,
    settings: RwLock<RegistrySettings>,
    state: RwLock<State>,
    last_seen: Mutex<HashMap<String, i64>>,
    view: watch::Sender<Arc<Snapshot>>,
    events: broadcast::Sender<RegistryEvent>,
    /// Authenticated agent connections, by connection id, for revocation and expiry cuts.
    conns: Mutex<HashMap<u64, Arc<ConnCut>>>,
    next_conn: AtomicU64,
    /// Pushed-configuration states, and the names changed since the last flush: results
    /// arrive by thousands after a change, so they are written in batches, not one by one.
    config: Mutex<(HashMap<String, ConfigState>, HashSet<String>)>,
    /// Refused claims and flags last logged per agent: logged once per change.
    address_log: Mutex<HashMap<String, AddressVerdict>>,
    /// Several bastions on one store (see `sync`).
    cluster: ClusterState,
    /// Registrations share transactions (one fsync for many in a reconnection storm).
    facts: GroupCommit<AgentRow>,
    /// Snapshot rebuilds of the connection hot paths (registration, session start and end)
    /// are throttled; `publishing` keeps concurrent rebuilds from sending an older snapshot
    /// after a newer one.
    throttle: Arc<Throttle<RegistryEvent>>,
    publishing: Mutex<()>,
}

/// An agent's refused claims and flags, as last logged.
type AddressVerdict = (Vec<RefusedAddress>, Vec<String>);

/// Cheap to clone: every clone is the same registry.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the data half-written in a way we rely on
    // (the store is transactional), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn enroll_store_error(e: StoreError) -> EnrollError {
    match e {
        StoreError::Unavailable(m) => EnrollError::StoreUnavailable(m),
        e => EnrollError::Internal(e.to_string()),
    }
}

/// Constant-time comparison of secrets (token hashes, bearer tokens).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn clip(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_TEXT)
        .collect()
}

/// An agent's SSH host key, checked and re-encoded as one `known_hosts`-safe line. A key
/// whose text holds a control character is refused: `ssh-key` keeps everything after the
/// base64 as the comment, newlines included, so "KEY comment\n@cert-authority * KEY2" would
/// have written a second line into the known_hosts file we generate (found by
/// fuzz/agent_register with its `hostile` seed).
fn host_key(k: &str) -> Result<String, String> {
    if k.len() > MAX_SSH_KEY_LEN {
        return Err("oversized".into());
    }
    let k = k.trim();
    if k.chars().any(char::is_control) {
        return Err("control character in the key text".into());
    }
    let pk = russh::keys::ssh_key::PublicKey::from_openssh(k).map_err(|e| e.to_string())?;
    let s = pk.to_openssh().map_err(|e| e.to_string())?;
    if s.chars().any(char::is_control) {
        return Err("control character in the key text".into());
    }
    Ok(s)
}

impl Registry {
    /// Opens the registry over an existing store and CA.
    pub fn open(
        store: Store,
        ca: AgentCa,
        settings: RegistrySettings,
    ) -> Result<Self, RegistryError> {
        let mut state = State::default();
        let mut store = store;
        let pruned = store.prune_certs(unix_now())?;
        if pruned > 0 {
            info!(
                certificates = pruned,
                "expired agent certificates pruned from the store"
            );
        }
        for a in store.agents()? {
            state.agents.insert(a.name.clone(), a);
        }
        for c in store.certs()? {
            state.certs.insert(c.serial.clone(), c);
        }
        let last_seen = state
            .agents
            .values()
            .filter_map(|a| a.last_seen.map(|t| (a.name.clone(), t)))
            .collect();
        let config = state
            .agents
            .values()
            .map(|a| {
                (
                    a.name.clone(),
                    ConfigState {
                        desired: a.config_desired.clone(),
                        applied: a.config_applied.clone(),
                        error: a.config_error.clone(),
                        refused: String::new(),
                    },
                )
            })
            .collect();
        let (view, _) = watch::channel(Arc::new(Snapshot::default()));
        let (events, _) = broadcast::channel(4096);
        let reg = Self {
            inner: Arc::new(Inner {
                store_describe: store.describe(),
                store: Mutex::new(store),
                ca,
                settings: RwLock::new(settings),
                state: RwLock::new(state),
                last_seen: Mutex::new(last_seen),
                view,
                events,
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                config: Mutex::new((config, HashSet::new())),
                address_log: Mutex::new(HashMap::new()),
                cluster: ClusterState::default(),
                facts: GroupCommit::default(),
                throttle: Arc::new(Throttle::default()),
                publishing: Mutex::new(()),
            }),
        };
        reg.publish();
        let throttle = reg.inner.throttle.clone();
        let weak = Arc::downgrade(&reg.inner);
        let spawned = std::thread::Builder::new()
            .name("registry-publish".into())
            .spawn(move || {
                throttle.run_worker(
                    || weak.strong_count() > 0,
                    |events| {
                        if let Some(inner) = weak.upgrade() {
                            Registry { inner }.publish_with(events);
                        }
                    },
                )
            });
        if let Err(e) = spawned {
            return Err(RegistryError::Invalid(format!(
                "cannot start the registry's publisher thread: {e}"
            )));
        }
        Ok(reg)
    }

    pub fn ca(&self) -> &AgentCa {
        &self.inner.ca
    }

    /// Runs `f` on the store under the registry's lock, for the rows the registry keeps for
    /// another service (the SSH user certificates of `crate::ssh::issued`). Blocking (one
    /// transaction): call from `spawn_blocking`.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut lock(&self.inner.store))
    }

    /// Which store the registry lives in ("SQLite /var/lib/bastide/registry.sqlite").
    pub fn store_description(&self) -> &str {
        &self.inner.store_describe
    }

    /// New settings (reload): the address policy is applied again to every agent.
    pub fn set_settings(&self, settings: RegistrySettings) {
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|e| e.into_inner()) = settings;
        self.publish();
    }

    fn settings(&self) -> RegistrySettings {
        self.inner
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current view of all agents.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.view.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.view.subscribe()
    }

    /// A receiver of change events.
    pub fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }

    /// Announces that another node revoked SSH user certificate `serial`.
    pub fn ssh_cert_revoked_elsewhere(&self, serial: i64) {
        self.emit(RegistryEvent::SshCertRevoked(serial));
    }

    fn emit(&self, ev: RegistryEvent) {
        let _ = self.inner.events.send(ev);
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a new snapshot now, then hands out `events` (which it includes).
    fn publish_with(&self, events: Vec<RegistryEvent>) {
        let t = std::time::Instant::now();
        self.publish();
        self.inner.throttle.cost(t.elapsed());
        for ev in events {
            self.emit(ev);
        }
    }

    /// A snapshot change from a connection hot path: published now, or folded with others
    /// into one rebuild a little later during a storm (see [`Throttle`]); `event` is handed
    /// out once a snapshot includes the change.
    fn publish_soon(&self, event: Option<RegistryEvent>) {
        if let Some(events) = self.inner.throttle.request(event) {
            self.publish_with(events);
        }
    }

    fn publish(&self) {
        let _one_at_a_time = lock(&self.inner.publishing);
        let policy = self.settings().addresses;
        let me = self.inner.cluster.node();
        let snap = {
            let st = self.read_state();
            // Each agent's claims judged alone, then addresses held by several agents.
            let judged: BTreeMap<&str, (Vec<IpAddr>, bool, Judged)> = st
                .agents
                .values()
                .map(|a| {
                    let claimed: Vec<IpAddr> =
                        a.addresses.iter().filter_map(|s| s.parse().ok()).collect();
                    let here = st.sessions.get(&a.name).copied().unwrap_or(0) > 0;
                    // A session another node holds (our own rows only count while we hold it).
                    let elsewhere = st.holders.get(&a.name).is_some_and(|n| *n != me);
                    let online = !a.revoked && (here || elsewhere);
                    let j = policy.judge(&claimed, st.observed.get(&a.name).copied());
                    (a.name.as_str(), (claimed, online, j))
                })
                .collect();
            let candidates: Vec<Candidate<'_>> = st
                .agents
                .values()
                .filter(|a| !a.revoked)
                .filter_map(|a| {
                    judged.get(a.name.as_str()).map(|(_, online, j)| Candidate {
                        name: &a.name,
                        online: *online,
                        accepted: &j.accepted,
                    })
                })
                .collect();
            let conflicts = resolve_conflicts(&candidates);
            let agents = st
                .agents
                .values()
                .map(|a| {
                    let (claimed, online, j) =
                        judged.get(a.name.as_str()).cloned().unwrap_or_default();
                    let mut addresses = Vec::new();
                    let mut refused: Vec<RefusedAddress> = j
                        .refused
                        .iter()
                        .map(|(ip, r)| RefusedAddress {
                            address: *ip,
                            reason: r.to_string(),
                        })
                        .collect();
                    let mut flags = Vec::new();
                    if j.mismatch {
                        flags.push(FLAG_MISMATCH.to_string());
                    }
                    for ip in j.accepted {
                        match conflicts.get(&ip) {
                            Some((losers, all)) if !a.revoked && losers.contains(&a.name) => {
                                refused.push(RefusedAddress {
                                    address: ip,
                                    reason: Refusal::Conflict(all.clone()).to_string(),
                                });
                                if !flags.iter().any(|f| f == FLAG_CONFLICT) {
                                    flags.push(FLAG_CONFLICT.to_string());
                                }
                            }
                            _ => addresses.push(ip),
                        }
                    }
                    let info = AgentInfo {
                        name: a.name.clone(),
                        labels: a.labels.clone(),
                        revoked: a.revoked,
                        online,
                        hostname: a.hostname.clone(),
                        addresses,
                        claimed,
                        observed: st.observed.get(&a.name).copied(),
                        refused,
                        flags,
                        os: a.os.clone(),
                        agent_version: a.agent_version.clone(),
                        ssh_host_keys: a.ssh_host_keys.clone(),
                        enrolled_at: a.enrolled_at,
                        cert_serial: a.cert_serial.clone(),
                        cert_not_after: a.cert_not_after,
                        here: online && st.sessions.get(&a.name).copied().unwrap_or(0) > 0,
                        node: match st.holders.get(&a.name) {
                            _ if !online => String::new(),
                            _ if st.sessions.get(&a.name).copied().unwrap_or(0) > 0 => me.clone(),
                            Some(n) => n.clone(),
                            None => String::new(),
                        },
                    };
                    (a.name.clone(), Arc::new(info))
                })
                .collect();
            Snapshot { agents }
        };
        self.log_address_changes(&snap);
        self.inner.view.send_replace(Arc::new(snap));
    }

    /// Logs refused claims and flags when they change for an agent, not at every publish.
    /// Only agents with something to say are remembered.
    fn log_address_changes(&self, snap: &Snapshot) {
        let mut seen = lock(&self.inner.address_log);
        seen.retain(|name, _| snap.agents.get(name).is_some_and(|a| !a.revoked));
        for a in snap.active() {
            let clean = a.refused.is_empty() && a.flags.is_empty();
            match seen.get(&a.name) {
                Some((r, f)) if *r == a.refused && *f == a.flags => continue,
                None if clean => continue,
                _ => {}
            }
            if clean {
                seen.remove(&a.name);
                info!(agent = %a.name, accepted = ?a.addresses, "agent addresses: every claim accepted, no flag");
                continue;
            }
            let refused: Vec<String> = a
                .refused
                .iter()
                .map(|r| format!("{}: {}", r.address, r.reason))
                .collect();
            warn!(
                agent = %a.name,
                accepted = ?a.addresses,
                observed = ?a.observed,
                refused = ?refused,
                flags = ?a.flags,
                "agent address claims refused or flagged"
            );
            seen.insert(a.name.clone(), (a.refused.clone(), a.flags.clone()));
        }
    }

    // ---- tokens ----

    pub fn create_token(&self, spec: &TokenSpec) -> Result<CreatedToken, RegistryError> {
        if spec.uses == 0 || spec.uses > MAX_TOKEN_USES {
            return Err(RegistryError::Invalid(format!(
                "uses must be between 1 and {MAX_TOKEN_USES}"
            )));
        }
        if spec.ttl_secs == 0 || spec.ttl_secs > MAX_TOKEN_TTL.as_secs() {
            return Err(RegistryError::Invalid(
                "ttl must be between 1s and 30 days".into(),
            ));
        }
        if let Some(p) = &spec.name_pattern {
            Glob::new(p).map_err(|e| RegistryError::Invalid(format!("name pattern: {e}")))?;
        }
        for (k, v) in &spec.labels {
            let ok = |s: &str| {
                !s.is_empty()
                    && s.len() <= 63
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            };
            if !ok(k) || !ok(v) {
                return Err(RegistryError::Invalid(format!(
                    "label {k}={v}: keys and values are 1-63 of [A-Za-z0-9._-]"
                )));
            }
        }
        let id = hex::encode(rand::random::<[u8; 8]>());
        let secret = hex::encode(rand::random::<[u8; 24]>());
        let now = unix_now();
        let row = TokenRow {
            id: id.clone(),
            hash: Sha256::digest(secret.as_bytes()).to_vec(),
            created: now,
            expires: now + spec.ttl_secs as i64,
            uses_left: spec.uses,
            uses_total: spec.uses,
            name_pattern: spec.name_pattern.clone(),
            labels: spec.labels.clone(),
            replace: spec.replace,
            revoked: false,
        };
        lock(&self.inner.store).insert_token(&row)?;
        info!(token_id = %id, uses = spec.uses, ttl_secs = spec.ttl_secs, replace = spec.replace, "enrollment token created");
        Ok(CreatedToken {
            token: format!("{id}.{secret}"),
            id,
            expires: row.expires,
        })
    }

    pub fn list_tokens(&self) -> Result<Vec<TokenStatus>, RegistryError> {
        let now = unix_now();
        let mut store = lock(&self.inner.store);
        // Tokens expired for a week are of no use even for the record.
        store.purge_tokens(now, 7 * 86400)?;
        Ok(store
            .tokens()?
            .into_iter()
            .map(|t| TokenStatus {
                state: if t.revoked {
                    "revoked"
                } else if t.uses_left == 0 {
                    "used"
                } else if t.expires <= now {
                    "expired"
                } else {
                    "valid"
                }
                .to_string(),
                id: t.id,
                created: t.created,
                expires: t.expires,
                uses_left: t.uses_left,
                uses_total: t.uses_total,
                name_pattern: t.name_pattern,
                labels: t.labels,
                replace: t.replace,
            })
            .collect())
    }

    pub fn revoke_token(&self, id: &str) -> Result<(), RegistryError> {
        if lock(&self.inner.store).revoke_token(id)? {
            info!(token_id = %id, "enrollment token revoked");
            Ok(())
        } else {
            Err(RegistryError::UnknownToken(id.to_string()))
        }
    }

    // ---- enrollment ----

    /// Checks the token and the name, signs a certificate for the CSR's key and records it,
    /// all under one lock. Blocking (fsync): call from `spawn_blocking`.
    pub fn enroll(
        &self,
        token: &str,
        name: &str,
        csr_der: &[u8],
        agent_version: &str,
    ) -> Result<Enrolled, EnrollError> {
        if !valid_agent_name(name) {
            return Err(EnrollError::InvalidName(clip(name)));
        }
        let (id, secret) = token.split_once('.').ok_or(EnrollError::InvalidToken)?;
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EnrollError::InvalidToken);
        }
        let mut store = lock(&self.inner.store);
        let row = store
            .token(id)
            .map_err(enroll_store_error)?
            .ok_or(EnrollError::InvalidToken)?;
        if !ct_eq(&row.hash, &Sha256::digest(secret.as_bytes())) {
            return Err(EnrollError::InvalidToken);
        }
        if row.revoked {
            return Err(EnrollError::TokenRevoked);
        }
        let now = unix_now();
        if row.expires <= now {
            return Err(EnrollError::TokenExpired);
        }
        if row.uses_left == 0 {
            return Err(EnrollError::TokenUsed);
        }
        if let Some(p) = &row.name_pattern {
            let matcher = Glob::new(p)
                .map_err(|e| EnrollError::Internal(e.to_string()))?
                .compile_matcher();
            if !matcher.is_match(name) {
                return Err(EnrollError::NameNotAllowed {
                    name: name.to_string(),
                    pattern: p.clone(),
                });
            }
        }
        let replacing = {
            let st = self.read_state();
            match st.agents.get(name) {
                Some(a) if !a.revoked && !row.replace => {
                    return Err(EnrollError::NameTaken(name.to_string()))
                }
                Some(a) => !a.revoked,
                None => false,
            }
        };
        let issued = self
            .inner
            .ca
            .sign_agent(csr_der, name, self.settings().cert_lifetime)?;
        let agent = AgentRow {
            name: name.to_string(),
            labels: row.labels.clone(),
            revoked: false,
            enrolled_at: now,
            agent_version: clip(agent_version),
            cert_serial: issued.serial.clone(),
            cert_not_after: issued.not_after,
            token_id: row.id.clone(),
            ..AgentRow::default()
        };
        let cert = CertRow {
            serial: issued.serial.clone(),
            agent: name.to_string(),
            issued_at: now,
            not_after: issued.not_after,
            revoked: false,
        };
        store
            .commit_enrollment(&row.id, &agent, &cert)
            .map_err(|e| match e {
                // The last use went to another enrollment meanwhile (another node's).
                StoreError::TokenUsed(_) => EnrollError::TokenUsed,
                e => enroll_store_error(e),
            })?;
        {
            let mut st = self.write_state();
            for c in st.certs.values_mut().filter(|c| c.agent == name) {
                c.revoked = true;
            }
            st.certs.insert(cert.serial.clone(), cert);
            st.agents.insert(name.to_string(), agent);
        }
        drop(store);
        if replacing {
            warn!(agent = %name, token_id = %row.id, "agent replaced by a new enrollment: previous certificates revoked");
            self.cut_connections(name);
        }
        self.publish();
        self.emit(RegistryEvent::Enrolled(name.to_string()));
        info!(agent = %name, token_id = %row.id, serial = %issued.serial, not_after = issued.not_after, "agent enrolled");
        Ok(Enrolled {
            name: name.to_string(),
            certificate_pem: issued.pem,
            not_after: issued.not_after,
        })
    }

    /// Issues a fresh certificate to an agent proving its current one.
    pub fn renew(&self, id: &AgentIdentity, csr_der: &[u8]) -> Result<Enrolled, RegistryError> {
        let mut store = lock(&self.inner.store);
        {
            let st = self.read_state();
            match st.agents.get(&id.name) {
                None => return Err(RegistryError::UnknownAgent(id.name.clone())),
                Some(a) if a.revoked => return Err(RegistryError::Revoked(id.name.clone())),
                Some(_) => {}
            }
        }
        let issued = self
            .inner
            .ca
            .sign_agent(csr_der, &id.name, self.settings().cert_lifetime)?;
        let cert = CertRow {
            serial: issued.serial.clone(),
            agent: id.name.clone(),
            issued_at: unix_now(),
            not_after: issued.not_after,
            revoked: false,
        };
        let now = cert.issued_at;
        let pruned = store.commit_renewal(&id.name, &id.serial, &cert, now)?;
        {
            let mut st = self.write_state();
            // The same pruning as the store's (superseded and expired certificates go).
            st.certs.retain(|serial, c| {
                c.not_after >= now && !(c.agent == id.name && !c.revoked && *serial != id.serial)
            });
            st.certs.insert(cert.serial.clone(), cert);
            if let Some(a) = st.agents.get_mut(&id.name) {
                a.cert_serial = issued.serial.clone();
                a.cert_not_after = issued.not_after;
            }
        }
        drop(store);
        self.publish();
        self.emit(RegistryEvent::Renewed(id.name.clone()));
        info!(agent = %id.name, old_serial = %id.serial, serial = %issued.serial, not_after = issued.not_after, certificates_pruned = pruned, "agent certificate renewed");
        Ok(Enrolled {
            name: id.name.clone(),
            certificate_pem: issued.pem,
            not_after: issued.not_after,
        })
    }

    /// Revokes an agent: all its certificates are refused from now on and its open
    /// connections are cut at once.
    pub fn revoke_agent(&self, name: &str) -> Result<(), RegistryError> {
        {
            let mut store = lock(&self.inner.store);
            if !self.read_state().agents.contains_key(name) {
                return Err(RegistryError::UnknownAgent(name.to_string()));
            }
            store.revoke_agent(name)?;
            let mut st = self.write_state();
            if let Some(a) = st.agents.get_mut(name) {
                a.revoked = true;
            }
            for c in st.certs.values_mut().filter(|c| c.agent == name) {
                c.revoked = true;
            }
            st.sessions.remove(name);
            st.observed.remove(name);
        }
        let cut = self.cut_connections(name);
        metrics::counter!(crate::metrics::names::REVOCATIONS).increment(1);
        self.publish();
        self.emit(RegistryEvent::Revoked(name.to_string()));
        info!(agent = %name, connections_cut = cut, "agent revoked");
        Ok(())
    }

    /// Whether a certificate serial may be used (checked at every TLS handshake).
    pub fn check_serial(&self, serial: &str) -> Result<(), SerialRefusal> {
        let st = self.read_state();
        match st.certs.get(serial) {
            None => Err(SerialRefusal::Unknown),
            Some(c) if c.revoked => Err(SerialRefusal::Revoked),
            Some(c) => match st.agents.get(&c.agent) {
                Some(a) if !a.revoked => Ok(()),
                _ => Err(SerialRefusal::Revoked),
            },
        }
    }

    // ---- connections and sessions ----

    /// Tracks an authenticated connection of `agent`, whose certificate ends at `not_after`
    /// (unix seconds), so that revocation and expiry cut it (see [`ConnCut`]).
    pub fn connection_opened(&self, agent: &str, not_after: i64) -> (u64, Arc<ConnCut>) {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let cut = Arc::new(ConnCut {
            agent: agent.into(),
            not_after,
            state: AtomicU8::new(ConnCut::OPEN),
            waker: AtomicWaker::new(),
        });
        lock(&self.inner.conns).insert(id, cut.clone());
        (id, cut)
    }

    pub fn connection_closed(&self, id: u64) {
        lock(&self.inner.conns).remove(&id);
    }

    /// Cuts every connection of `agent` (revocation). A walk over all connections: revocations
    /// are rare, and an index by agent would cost every connection its own entry.
    fn cut_connections(&self, agent: &str) -> usize {
        self.cut_where(ConnCut::REVOKED, |c| &*c.agent == agent)
    }

    /// Cuts the connections whose certificate has expired at `now` (unix seconds: past its
    /// `notAfter`, which is still valid, as at the handshake); returns how many. The agents'
    /// endpoint calls it every second.
    pub fn cut_expired(&self, now: i64) -> usize {
        self.cut_where(ConnCut::EXPIRED, |c| c.not_after < now)
    }

    /// Removes the connections `hit` selects and cuts them (outside the lock) for `why`.
    fn cut_where(&self, why: u8, hit: impl Fn(&ConnCut) -> bool) -> usize {
        let mut cut = Vec::new();
        lock(&self.inner.conns).retain(|_, c| {
            if hit(c) {
                cut.push(c.clone());
                return false;
            }
            true
        });
        for c in &cut {
            c.cut(why);
        }
        cut.len()
    }

    /// Records the facts an agent registered with; returns its labels.
    /// Blocking (fsync): call from `spawn_blocking`.
    pub fn register(
        &self,
        id: &AgentIdentity,
        facts: Facts,
        peer: Option<IpAddr>,
    ) -> Result<BTreeMap<String, String>, RegistryError> {
        if !facts.claimed_name.is_empty() && facts.claimed_name != id.name {
            warn!(agent = %id.name, claimed = %clip(&facts.claimed_name), "registration claims another name: recorded under the certificate's name");
        }
        // Claims are kept as claimed (valid addresses, deduplicated, bounded); what services
        // may use is decided in `publish` by the address policy, with the observed address.
        let mut addresses: Vec<String> = Vec::new();
        for a in facts.addresses.iter().take(MAX_ADDRESSES) {
            match a.parse::<IpAddr>() {
                Ok(ip) => {
                    let s = crate::addresses::canonical(ip).to_string();
                    if !addresses.contains(&s) {
                        addresses.push(s);
                    }
                }
                _ => warn!(agent = %id.name, address = %clip(a), "ignoring invalid address"),
            }
        }
        let peer = peer.map(crate::addresses::canonical);
        let mut keys = Vec::new();
        for k in facts.ssh_host_keys.iter().take(MAX_SSH_KEYS) {
            match host_key(k) {
                Ok(s) => keys.push(s),
                Err(e) => warn!(agent = %id.name, error = %e, "ignoring SSH host key"),
            }
        }
        if let Some(why) = self.inner.cluster.refuses_sessions() {
            return Err(RegistryError::CutOff(why));
        }
        let now = unix_now();
        let row = {
            let st = self.read_state();
            let mut row = match st.agents.get(&id.name) {
                None => return Err(RegistryError::UnknownAgent(id.name.clone())),
                Some(a) if a.revoked => return Err(RegistryError::Revoked(id.name.clone())),
                Some(a) => a.clone(),
            };
            row.hostname = clip(&facts.hostname);
            row.addresses = addresses;
            row.os = clip(&facts.os);
            row.agent_version = clip(&facts.agent_version);
            row.ssh_host_keys = keys;
            row.last_seen = Some(now);
            row
        };
        // Acknowledged only once its group's transaction is committed.
        let inner = &self.inner;
        inner
            .facts
            .submit(row.clone(), |rows| {
                metrics::counter!(crate::metrics::names::REGISTRATION_COMMITS).increment(1);
                let written = lock(&inner.store).update_facts_many(rows);
                let pending = match written {
                    Ok(()) => false,
                    // The shared store is down: serve from memory, write at the resync (see
                    // `sync`).
                    Err(StoreError::Unavailable(e)) => {
                        warn!(agents = rows.len(), error = %e, "registrations kept in memory: the registry's database is unreachable");
                        true
                    }
                    Err(e) => return Err(e.to_string()),
                };
                let mut st = self.write_state();
                for r in rows {
                    if pending {
                        st.pending_facts.insert(r.name.clone());
                    } else {
                        st.pending_facts.remove(&r.name);
                    }
                }
                Ok(())
            })
            .map_err(|e| RegistryError::Store(StoreError::Batch(e)))?;
        let labels = row.labels.clone();
        let changed = {
            let mut st = self.write_state();
            // Only the facts: a revocation or re-enrollment may have changed the rest of
            // the row while the commit ran.
            let changed = match st.agents.get_mut(&id.name) {
                Some(old) => {
                    let changed = old.addresses != row.addresses
                        || old.hostname != row.hostname
                        || old.ssh_host_keys != row.ssh_host_keys
                        || old.os != row.os
                        || old.agent_version != row.agent_version;
                    old.hostname = row.hostname;
                    old.addresses = row.addresses;
                    old.os = row.os;
                    old.agent_version = row.agent_version;
                    old.ssh_host_keys = row.ssh_host_keys;
                    old.last_seen = row.last_seen;
                    changed
                }
                None => false,
            };
            let observed_changed = match peer {
                Some(p) => st.observed.insert(id.name.clone(), p) != Some(p),
                None => st.observed.remove(&id.name).is_some(),
            };
            changed || observed_changed
        };
        lock(&self.inner.last_seen).insert(id.name.clone(), now);
        self.update_config(&id.name, |c| c.applied = clip(&facts.config_revision));
        let event = RegistryEvent::Registered(id.name.clone());
        if changed {
            self.publish_soon(Some(event));
        } else {
            self.emit(event);
        }
        info!(agent = %id.name, "agent registered");
        Ok(labels)
    }

    pub fn session_started(&self, name: &str) {
        let first = {
            let mut st = self.write_state();
            let n = st.sessions.entry(name.to_string()).or_insert(0);
            *n += 1;
            *n == 1
        };
        self.heartbeat(name);
        if first {
            self.publish_soon(Some(RegistryEvent::Online(name.to_string())));
            info!(agent = %name, "agent online");
        }
    }

    pub fn heartbeat(&self, name: &str) {
        lock(&self.inner.last_seen).insert(name.to_string(), unix_now());
    }

    pub fn session_ended(&self, name: &str) {
        let last = {
            let mut st = self.write_state();
            match st.sessions.get_mut(name) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    st.sessions.remove(name);
                    true
                }
                None => false,
            }
        };
        if last {
            self.publish_soon(Some(RegistryEvent::Offline(name.to_string())));
            info!(agent = %name, "agent offline");
        }
    }

    /// Last time each agent was heard from.
    pub fn last_seen(&self, name: &str) -> Option<i64> {
        lock(&self.inner.last_seen).get(name).copied()
    }

    /// Writes the in-memory last-seen times to the store. Blocking.
    pub fn flush_last_seen(&self) -> Result<(), RegistryError> {
        let seen: Vec<(String, i64)> = lock(&self.inner.last_seen)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        lock(&self.inner.store).flush_last_seen(&seen)?;
        Ok(())
    }

    /// Every agent, for `bastide agents list`.
    pub fn list_agents(&self) -> Vec<AgentStatus> {
        let snap = self.snapshot();
        snap.agents
            .values()
            .map(|a| (a, self.config_state(&a.name).unwrap_or_default()))
            .map(|(a, c)| AgentStatus {
                name: a.name.clone(),
                state: if a.revoked {
                    "revoked"
                } else if a.online {
                    "online"
                } else {
                    "offline"
                }
                .to_string(),
                addresses: a.addresses.iter().map(|i| i.to_string()).collect(),
                observed: a.observed.map(|i| i.to_string()).unwrap_or_default(),
                claimed: a.claimed.iter().map(|i| i.to_string()).collect(),
                refused: a
                    .refused
                    .iter()
                    .map(|r| format!("{}: {}", r.address, r.reason))
                    .collect(),
                flags: a.flags.clone(),
                labels: a.labels.clone(),
                hostname: a.hostname.clone(),
                os: a.os.clone(),
                agent_version: a.agent_version.clone(),
                last_seen: self.last_seen(&a.name),
                enrolled_at: a.enrolled_at,
                cert_serial: a.cert_serial.clone(),
                cert_not_after: a.cert_not_after,
                config_state: c.summary().to_string(),
                config_desired: c.desired,
                config_applied: c.applied,
                config_error: c.error,
                node: a.node.clone(),
            })
            .collect()
    }

    // ---- pushed configuration ----

    fn update_config(&self, name: &str, f: impl FnOnce(&mut ConfigState)) {
        if !self.read_state().agents.contains_key(name) {
            return;
        }
        let mut g = lock(&self.inner.config);
        let (states, dirty) = &mut *g;
        let c = states.entry(name.to_string()).or_default();
        let before = c.clone();
        f(c);
        if *c != before {
            dirty.insert(name.to_string());
        }
    }

    /// An agent's pushed-configuration state.
    pub fn config_state(&self, name: &str) -> Option<ConfigState> {
        lock(&self.inner.config).0.get(name).cloned()
    }

    /// Every agent's pushed-configuration state (for metrics).
    pub fn config_states(&self) -> HashMap<String, ConfigState> {
        lock(&self.inner.config).0.clone()
    }

    /// Records the revisions rendered for agents. A render error is kept as the last error
    /// until the next successful render.
    pub fn set_config_desired(&self, desired: &[(String, Result<String, String>)]) {
        for (name, d) in desired {
            self.update_config(name, |c| match d {
                Ok(rev) => {
                    c.desired = rev.clone();
                    if c.error.starts_with("bastion: ") {
                        c.error.clear();
                    }
                }
                Err(e) => c.error = format!("bastion: {}", clip(e)),
            });
        }
    }

    /// Records an agent's answer to a push: ACK (applied in full) or NACK (nothing applied).
    pub fn config_result(&self, name: &str, revision: &str, ok: bool, error: &str) {
        self.update_config(name, |c| {
            if ok {
                c.applied = clip(revision);
                c.error.clear();
                c.refused.clear();
            } else {
                c.error = clip(&format!("revision {}: {}", clip(revision), error));
                c.refused = clip(revision);
            }
        });
    }

    /// A revision was sent (again) to the agent: no longer refused until it answers.
    pub fn config_sent(&self, name: &str, revision: &str) {
        let mut g = lock(&self.inner.config);
        if let Some(c) = g.0.get_mut(name) {
            if c.refused == revision {
                c.refused.clear();
            }
        }
    }

    /// Writes the changed pushed-configuration states to the store. Blocking.
    pub fn flush_config(&self) -> Result<(), RegistryError> {
        let rows: Vec<(String, String, String, String)> = {
            let mut g = lock(&self.inner.config);
            let (states, dirty) = &mut *g;
            dirty
                .drain()
                .filter_map(|n| {
                    states
                        .get(&n)
                        .map(|c| (n, c.desired.clone(), c.applied.clone(), c.error.clone()))
                })
                .collect()
        };
        if rows.is_empty() {
            return Ok(());
        }
        if let Err(e) = lock(&self.inner.store).flush_config(&rows) {
            // Keep them dirty for the next flush.
            lock(&self.inner.config)
                .1
                .extend(rows.into_iter().map(|r| r.0));
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll};

    struct Wakes(AtomicUsize);

    impl futures_util::task::ArcWake for Wakes {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Revocation cuts every connection of the revoked agent and no other; the endpoint's
    /// sweep cuts a connection once its certificate has expired, not before; each cut wakes
    /// the connection's task with its reason, and a cut connection leaves the registry.
    #[test]
    fn connections_are_cut_by_revocation_and_by_certificate_expiry() {
        let dir = std::env::temp_dir().join(format!("bastide-conncut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let paths = crate::pki::PkiPaths::new(&dir);
        crate::pki::init(&paths, "p", None, &[]).unwrap();
        let store = Store::create(&dir.join("registry.sqlite")).unwrap();
        let ca = AgentCa::load(&paths, "p", None).unwrap();
        let settings = RegistrySettings {
            cert_lifetime: Duration::from_secs(3600),
            addresses: Default::default(),
        };
        let reg = Registry::open(store, ca, settings).unwrap();
        let now = unix_now();
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = futures_util::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        let (_, a1) = reg.connection_opened("web01", now + 3600);
        let (_, a2) = reg.connection_opened("web01", now + 3600);
        let (_, b) = reg.connection_opened("db01", now + 30);
        let (closed, c) = reg.connection_opened("mail01", now + 3600);
        for conn in [&a1, &a2, &b, &c] {
            assert_eq!(conn.poll_cut(&mut cx), Poll::Pending);
        }
        reg.connection_closed(closed);
        assert_eq!(lock(&reg.inner.conns).len(), 3);

        assert_eq!(reg.cut_connections("web01"), 2);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert_eq!(a1.poll_cut(&mut cx), Poll::Ready("certificate revoked"));
        assert_eq!(a2.reason(), Some("certificate revoked"));
        assert_eq!(b.reason(), None);
        assert_eq!(reg.cut_connections("web01"), 0);

        // Valid through its last second, then expired.
        assert_eq!(reg.cut_expired(now + 30), 0);
        assert_eq!(b.poll_cut(&mut cx), Poll::Pending);
        assert_eq!(reg.cut_expired(now + 31), 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 3);
        assert_eq!(b.poll_cut(&mut cx), Poll::Ready("certificate expired"));
        assert!(lock(&reg.inner.conns).is_empty());

        // A connection revoked once stays revoked: a later expiry does not rename its cut.
        let (_, d) = reg.connection_opened("web01", now + 30);
        d.revoke();
        d.expire();
        assert_eq!(d.reason(), Some("certificate revoked"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// fuzz/seeds/agent_register/hostile: a host key with a newline in its comment must not
    /// reach the known_hosts file as two lines.
    #[test]
    fn host_keys_with_control_characters_are_refused() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D";
        assert_eq!(
            host_key(&format!("  {key} root@web01\n")).unwrap(),
            format!("{key} root@web01")
        );
        for bad in [
            format!("{key} root@web01\nssh-rsa AAAA"),
            format!("{key} a\r\n@cert-authority * {key}"),
            format!("{key} x\u{1b}[31m"),
            "ssh-ed25519 AAAA".to_string(),
            "x".repeat(MAX_SSH_KEY_LEN + 1),
        ] {
            assert!(host_key(&bad).is_err(), "{bad:?}");
        }
    }
}
