//! Configuration push: the environment tree (see [`tree`]) is rendered per agent into files
//! and agent settings ([`render`]); each agent gets a desired revision, and every session
//! sends its agent the newest revision it has not applied. The tree is watched (inotify via
//! `notify`) and reloaded within the debounce delay of a change; a tree with any error is
//! refused whole, and the last good one stays in force.
//!
//! The registry keeps desired and applied revisions and the last error; this module keeps
//! only the rendered pushes, one `watch` per agent that its session follows.

pub mod render;
pub mod tree;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Result;
use bastide_proto::v1::{bastion_message, BastionMessage, ConfigPush as PushMsg, ConfigResult};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::metrics::names;
use crate::registry::{AgentInfo, Registry, RegistryEvent};
use render::{agent_facts, Templates};
use tree::{Position, Tree};

/// `[config_push]`: where the environment tree is and where this bastion sits in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPushConfig {
    /// Root of the environment tree (typically a git checkout).
    pub dir: PathBuf,
    pub cloud: String,
    pub site: String,
    /// e.g. "production", "test".
    pub instance: String,
    /// The project's directory name in the tree (default: the bastion's `project`).
    #[serde(default)]
    pub project: Option<String>,
    /// The enrollment label whose value names the agent's group file.
    #[serde(default = "default_group_label")]
    pub group_label: String,
    /// Address the VMs reach the bastion at (template variable `bastion.address`; default:
    /// the agents endpoint's address when it is not a wildcard).
    #[serde(default)]
    pub bastion_address: Option<IpAddr>,
    /// Quiet time after a change in the tree before it is reloaded (editors and git write
    /// several files).
    #[serde(default = "default_debounce", with = "humantime_serde")]
    pub debounce: Duration,
}

fn default_group_label() -> String {
    "group".into()
}
fn default_debounce() -> Duration {
    Duration::from_millis(100)
}

impl ConfigPushConfig {
    /// Problems as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.dir.is_dir() {
            out.push((
                "config_push.dir".into(),
                format!("{} is not a directory", self.dir.display()),
            ));
        }
        for (k, v) in [
            ("cloud", Some(&self.cloud)),
            ("site", Some(&self.site)),
            ("instance", Some(&self.instance)),
            ("project", self.project.as_ref()),
            ("group_label", Some(&self.group_label)),
        ] {
            if let Some(v) = v {
                if !tree::valid_component(v) {
                    out.push((
                        format!("config_push.{k}"),
                        format!("{v:?} must be a plain directory name"),
                    ));
                }
            }
        }
        if self.debounce > Duration::from_secs(1) {
            out.push((
                "config_push.debounce".into(),
                "must be at most 1s (pushes are due within 1s of a change)".into(),
            ));
        }
        out
    }
}

/// The template variable `bastion`: the bastion's project, zone, address and the addresses
/// of its services, so that templates can point a VM's resolver, relay and logs at it.
pub fn bastion_vars(cfg: &crate::config::Config) -> serde_json::Value {
    let cp = cfg.config_push.as_ref();
    let agents = cfg.agents.as_ref().map(|a| a.listen);
    let address = cp
        .and_then(|c| c.bastion_address)
        .or_else(|| agents.map(|a| a.ip()).filter(|ip| !ip.is_unspecified()));
    let endpoint = |sa: SocketAddr| {
        let host = if sa.ip().is_unspecified() {
            address.unwrap_or(sa.ip())
        } else {
            sa.ip()
        };
        serde_json::json!({ "host": host.to_string(), "port": sa.port() })
    };
    let mut services = serde_json::Map::new();
    if let Some(a) = agents {
        services.insert("agents".into(), endpoint(a));
    }
    if let Some(d) = cfg.dns.as_ref().and_then(|d| d.listen.first()) {
        services.insert("dns".into(), endpoint(*d));
    }
    if let Some(s) = &cfg.smtp {
        services.insert("smtp".into(), endpoint(s.listen));
    }
    if let Some(s) = &cfg.ssh {
        services.insert("ssh".into(), endpoint(s.listen));
    }
    if let Some(m) = &cfg.metrics {
        services.insert("metrics".into(), endpoint(m.listen));
    }
    // Where a VM's rsyslog forwards to: TCP when the receiver has it (no loss on a full
    // socket buffer), else UDP.
    if let Some(s) = &cfg.syslog {
        let (addr, protocol) = match (s.tcp.first(), s.udp.first()) {
            (Some(t), _) => (Some(*t), "tcp"),
            (None, Some(u)) => (Some(*u), "udp"),
            _ => (None, ""),
        };
        if let Some(a) = addr {
            let mut e = endpoint(a);
            e["protocol"] = serde_json::json!(protocol);
            services.insert("syslog".into(), e);
        }
    }
    serde_json::json!({
        "project": cfg.project,
        "zone": cfg.zone.clone().unwrap_or_default(),
        "address": address.map(|a| a.to_string()).unwrap_or_default(),
        "services": services,
    })
}

/// Outcome of a reload or check.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub agents: usize,
    pub files: usize,
    /// Agents whose desired revision changed (reload only).
    pub changed: usize,
    pub render_ms: f64,
    #[serde(default)]
    pub errors: Vec<String>,
}

/// `bastide config render AGENT`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenderView {
    pub agent: String,
    pub revision: String,
    /// The merged document (vars, files, agent) as TOML.
    pub merged: String,
    /// (dotted key, value as TOML, level, file) of every leaf.
    pub explain: Vec<(String, String, String, String)>,
    /// (path, mode, owner, group, on_change, content as text)
    pub files: Vec<(String, String, String, String, String, String)>,
}

struct Loaded {
    tree: Tree,
    templates: Templates,
}

type Reload = oneshot::Sender<Summary>;

/// Characters kept of each string of an agent's `ConfigResult` (revision, file, error).
const MAX_RESULT_TEXT: usize = 1024;

/// An agent, the facts it was rendered with, and its push.
type RenderedAgent = (Arc<AgentInfo>, serde_json::Value, PushMsg);

struct Inner {
    cfg: ConfigPushConfig,
    pos: Position,
    zone: Option<String>,
    bastion: serde_json::Value,
    registry: Registry,
    current: Mutex<Option<Arc<Loaded>>>,
    /// Per agent: the facts its push was rendered from, and the push its session follows.
    agents: Mutex<HashMap<String, AgentPush>>,
    reload: mpsc::Sender<Reload>,
    reload_rx: Mutex<Option<mpsc::Receiver<Reload>>>,
}

struct AgentPush {
    facts: Option<serde_json::Value>,
    tx: watch::Sender<Option<Arc<PushMsg>>>,
}

/// Cheap to clone: the push service's shared state.
#[derive(Clone)]
pub struct ConfigPushHandle {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConfigPushHandle {
    pub fn new(
        cfg: ConfigPushConfig,
        project: &str,
        zone: Option<String>,
        bastion: serde_json::Value,
        registry: Registry,
    ) -> Self {
        let pos = Position {
            cloud: cfg.cloud.clone(),
            site: cfg.site.clone(),
            instance: cfg.instance.clone(),
            project: cfg.project.clone().unwrap_or_else(|| project.to_string()),
        };
        let (reload, rx) = mpsc::channel(8);
        Self {
            inner: Arc::new(Inner {
                cfg,
                pos,
                zone,
                bastion,
                registry,
                current: Mutex::new(None),
                agents: Mutex::new(HashMap::new()),
                reload,
                reload_rx: Mutex::new(Some(rx)),
            }),
        }
    }

    fn load(&self) -> Result<Loaded, Vec<String>> {
        let i = &self.inner;
        let tree = Tree::load(&i.cfg.dir, &i.pos, &i.cfg.group_label)?;
        let templates = Templates::compile(&tree)?;
        Ok(Loaded { tree, templates })
    }

    fn facts(&self, a: &AgentInfo) -> serde_json::Value {
        agent_facts(a, self.inner.zone.as_deref())
    }

    /// Renders every active agent against `loaded`; all errors at once.
    fn render_all(&self, loaded: &Loaded) -> (Vec<RenderedAgent>, Vec<String>) {
        let snap = self.inner.registry.snapshot();
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for a in snap.active() {
            let facts = self.facts(a);
            match render::render(
                &loaded.tree,
                &loaded.templates,
                a,
                &facts,
                &self.inner.bastion,
            ) {
                Ok(r) => out.push((a.clone(), facts, r.push)),
                Err(e) => errors.extend(e),
            }
        }
        (out, errors)
    }

    /// Loads and renders the tree from disk without changing anything.
    pub fn check(&self) -> Summary {
        let t = Instant::now();
        let loaded = match self.load() {
            Ok(l) => l,
            Err(errors) => {
                return Summary {
                    errors,
                    ..Summary::default()
                }
            }
        };
        let (out, errors) = self.render_all(&loaded);
        Summary {
            agents: out.len(),
            files: out.iter().map(|(_, _, p)| p.files.len()).sum(),
            changed: 0,
            render_ms: t.elapsed().as_secs_f64() * 1000.0,
            errors,
        }
    }

    /// Loads the tree and, if every agent renders, makes it current and pushes what
    /// changed. A tree with any error is refused whole. Blocking.
    fn reload_now(&self) -> Summary {
        let t = Instant::now();
        let loaded = match self.load() {
            Ok(l) => l,
            Err(errors) => return self.refused(errors),
        };
        let (out, errors) = self.render_all(&loaded);
        if !errors.is_empty() {
            return self.refused(errors);
        }
        let render_ms = t.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!(names::CONFIG_RENDER_DURATION).record(t.elapsed().as_secs_f64());
        let files = out.iter().map(|(_, _, p)| p.files.len()).sum();
        let agents = out.len();
        *lock(&self.inner.current) = Some(Arc::new(loaded));
        let changed = self.publish(out);
        metrics::counter!(names::CONFIG_RELOADS, "result" => "ok").increment(1);
        info!(
            agents,
            files, changed, render_ms, "configuration tree loaded"
        );
        Summary {
            agents,
            files,
            changed,
            render_ms,
            errors: Vec::new(),
        }
    }

    fn refused(&self, errors: Vec<String>) -> Summary {
        metrics::counter!(names::CONFIG_RELOADS, "result" => "refused").increment(1);
        for e in errors.iter().take(20) {
            error!(error = %e, "configuration tree refused: the last good one stays");
        }
        Summary {
            errors,
            ..Summary::default()
        }
    }

    /// Makes rendered pushes current; returns how many changed revision.
    fn publish(&self, out: Vec<RenderedAgent>) -> usize {
        let mut changed = 0;
        let mut desired = Vec::with_capacity(out.len());
        {
            let mut agents = lock(&self.inner.agents);
            for (a, facts, push) in out {
                let entry = agents.entry(a.name.clone()).or_insert_with(|| AgentPush {
                    facts: None,
                    tx: watch::channel(None).0,
                });
                entry.facts = Some(facts);
                desired.push((a.name.clone(), Ok(push.revision.clone())));
                let same = entry
                    .tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|p| p.revision == push.revision);
                if !same {
                    changed += 1;
                    entry.tx.send_replace(Some(Arc::new(push)));
                }
            }
        }
        self.inner.registry.set_config_desired(&desired);
        changed
    }

    /// Renders agents that are new or whose facts changed (enrollment, registration):
    /// those named, or all of them.
    fn render_changed(&self, names: Option<HashSet<String>>) {
        let Some(loaded) = lock(&self.inner.current).clone() else {
            return;
        };
        let snap = self.inner.registry.snapshot();
        let todo: Vec<(Arc<AgentInfo>, serde_json::Value)> = {
            let agents = lock(&self.inner.agents);
            snap.active()
                .filter(|a| names.as_ref().is_none_or(|n| n.contains(&a.name)))
                .filter_map(|a| {
                    let facts = self.facts(a);
                    let same = agents
                        .get(&a.name)
                        .and_then(|p| p.facts.as_ref())
                        .is_some_and(|f| *f == facts);
                    (!same).then(|| (a.clone(), facts))
                })
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (a, facts) in todo {
            match render::render(
                &loaded.tree,
                &loaded.templates,
                &a,
                &facts,
                &self.inner.bastion,
            ) {
                Ok(r) => ok.push((a, facts, r.push)),
                Err(e) => {
                    warn!(agent = %a.name, error = %e.join("; "), "configuration render failed");
                    failed.push((a.name.clone(), Err(e.join("; "))));
                    // Remember the facts so that the failure is not retried on every change.
                    lock(&self.inner.agents)
                        .entry(a.name.clone())
                        .or_insert_with(|| AgentPush {
                            facts: None,
                            tx: watch::channel(None).0,
                        })
                        .facts = Some(facts);
                }
            }
        }
        let n = self.publish(ok);
        self.inner.registry.set_config_desired(&failed);
        debug!(changed = n, "agents rendered after a registry change");
    }

    /// The push a session follows: the current value first, then every new one.
    pub fn subscribe(&self, agent: &str) -> watch::Receiver<Option<Arc<PushMsg>>> {
        let mut rx = lock(&self.inner.agents)
            .entry(agent.to_string())
            .or_insert_with(|| AgentPush {
                facts: None,
                tx: watch::channel(None).0,
            })
            .tx
            .subscribe();
        rx.mark_changed();
        rx
    }

    /// Asks the running service to reload the tree now and waits for the outcome.
    pub async fn reload(&self) -> Result<Summary> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .reload
            .send(tx)
            .await
            .map_err(|_| anyhow::anyhow!("the configuration push service is not running"))?;
        Ok(rx.await?)
    }

    /// `bastide config render AGENT` (from the tree on disk). Blocking.
    pub fn render_view(&self, agent: &str) -> Result<RenderView, Vec<String>> {
        let snap = self.inner.registry.snapshot();
        let Some(a) = snap.agents.get(agent) else {
            return Err(vec![format!("unknown agent {agent:?}")]);
        };
        let loaded = self.load()?;
        let r = render::render(
            &loaded.tree,
            &loaded.templates,
            a,
            &self.facts(a),
            &self.inner.bastion,
        )?;
        let mut leaves = Vec::new();
        tree::leaves(&r.merged.doc, "", &mut leaves);
        let explain = leaves
            .into_iter()
            .map(|(k, v)| {
                let o = r
                    .merged
                    .provenance
                    .get(&k)
                    .cloned()
                    .unwrap_or(tree::Origin {
                        level: "?".into(),
                        file: "?".into(),
                    });
                (k, v.to_string(), o.level, o.file)
            })
            .collect();
        Ok(RenderView {
            agent: agent.to_string(),
            revision: r.push.revision.clone(),
            merged: toml::to_string(&r.merged.doc).unwrap_or_default(),
            explain,
            files: r
                .push
                .files
                .iter()
                .map(|f| {
                    (
                        f.path.clone(),
                        format!("{:04o}", f.mode),
                        f.owner.clone(),
                        f.group.clone(),
                        f.on_change.clone(),
                        String::from_utf8_lossy(&f.content).to_string(),
                    )
                })
                .collect(),
        })
    }

    /// Called by an agent's session when it follows `rx`: the message to send, if the
    /// agent has not applied this revision yet.
    pub fn next_push(
        &self,
        agent: &str,
        rx: &mut watch::Receiver<Option<Arc<PushMsg>>>,
    ) -> Option<BastionMessage> {
        let push = rx.borrow_and_update().clone()?;
        let applied = self
            .inner
            .registry
            .config_state(agent)
            .map(|c| c.applied)
            .unwrap_or_default();
        if applied == push.revision {
            return None;
        }
        metrics::counter!(names::CONFIG_PUSHES).increment(1);
        debug!(agent = %agent, revision = %push.revision, "pushing configuration");
        Some(BastionMessage {
            kind: Some(bastion_message::Kind::Config((*push).clone())),
        })
    }

    /// An agent's ACK or NACK.
    pub fn result(&self, agent: &str, r: &ConfigResult) {
        let (revision, error) = result_text(r);
        self.inner
            .registry
            .config_result(agent, &revision, r.ok, &error);
        if r.ok {
            metrics::counter!(names::CONFIG_RESULTS, "result" => "ack").increment(1);
            info!(agent = %agent, revision = %revision.escape_debug(), "configuration applied");
        } else {
            metrics::counter!(names::CONFIG_RESULTS, "result" => "nack").increment(1);
            warn!(agent = %agent, revision = %revision.escape_debug(), error = %error.escape_debug(), "configuration refused by the agent");
        }
    }
}

/// The revision and error of an agent's result as they are recorded and logged. The agent's
/// strings may be as large as a gRPC message (16 MiB): only the start of each is kept (the
/// registry then keeps 256 characters without control characters).
fn result_text(r: &ConfigResult) -> (String, String) {
    let short = |s: &str| -> String { s.chars().take(MAX_RESULT_TEXT).collect() };
    let error = if r.file.is_empty() {
        short(&r.error)
    } else {
        format!("{}: {}", short(&r.file), short(&r.error))
    };
    (short(&r.revision), error)
}

/// Runs the push service: first load, then reloads on changes of the tree (inotify) or on
/// request, renders for new or changed agents, and flushes revisions to the store.
pub async fn run(handle: ConfigPushHandle, shutdown: CancellationToken) -> Result<()> {
    let Some(mut reload_rx) = lock(&handle.inner.reload_rx).take() else {
        anyhow::bail!("configuration push service started twice");
    };
    let h = handle.clone();
    let _ = tokio::task::spawn_blocking(move || h.reload_now()).await;

    let (fs_tx, mut fs_rx) = mpsc::channel::<()>(1);
    let watcher = {
        use notify::{RecursiveMode, Watcher};
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if !ev.kind.is_access() {
                    let _ = fs_tx.try_send(());
                }
            }
        })?;
        w.watch(&handle.inner.cfg.dir, RecursiveMode::Recursive)?;
        w
    };
    info!(dir = %handle.inner.cfg.dir.display(), "watching the configuration tree");
    let mut events = handle.inner.registry.events();
    // Agents to render again, gathered for a moment so that a wave of reconnections costs
    // one pass; `None` inside means all of them (the event channel lagged).
    let mut dirty: Option<HashSet<String>> = Some(HashSet::new());
    let mut render_tick = tokio::time::interval(Duration::from_millis(100));
    render_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let debounce = handle.inner.cfg.debounce;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = fs_rx.recv() => {
                // Let a burst of writes (git checkout, editor) finish.
                tokio::time::sleep(debounce).await;
                while fs_rx.try_recv().is_ok() {}
                let h = handle.clone();
                let _ = tokio::task::spawn_blocking(move || h.reload_now()).await;
            }
            Some(done) = reload_rx.recv() => {
                let h = handle.clone();
                if let Ok(s) = tokio::task::spawn_blocking(move || h.reload_now()).await {
                    let _ = done.send(s);
                }
            }
            ev = events.recv() => match ev {
                Ok(RegistryEvent::Enrolled(n) | RegistryEvent::Registered(n)) => {
                    if let Some(d) = dirty.as_mut() {
                        d.insert(n);
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => dirty = None,
                Err(_) => break,
            },
            _ = render_tick.tick(), if dirty.as_ref().is_none_or(|d| !d.is_empty()) => {
                let names = dirty.replace(HashSet::new());
                let h = handle.clone();
                let _ = tokio::task::spawn_blocking(move || h.render_changed(names)).await;
            }
            _ = flush.tick() => {
                let r = handle.inner.registry.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || r.flush_config()).await {
                    warn!(error = %e, "writing configuration revisions failed");
                }
            }
        }
    }
    drop(watcher);
    let r = handle.inner.registry.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || r.flush_config()).await {
        warn!(error = %e, "writing configuration revisions failed");
    }
    Ok(())
}

/// Prints a render view for the CLI.
pub fn print_render(v: &RenderView, explain: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "# agent {}  revision {}", v.agent, v.revision);
    if explain {
        let w = v.explain.iter().map(|e| e.0.len()).max().unwrap_or(0);
        for (k, val, level, file) in &v.explain {
            let _ = writeln!(out, "{k:<w$} = {val}    # {level}: {file}");
        }
    } else {
        out.push_str(&v.merged);
    }
    let by_path: BTreeMap<_, _> = v.files.iter().map(|f| (f.0.clone(), f)).collect();
    for (path, f) in by_path {
        let _ = writeln!(
            out,
            "\n# file {path}  mode {}  owner {}:{}  on_change {}",
            f.1,
            if f.2.is_empty() { "-" } else { &f.2 },
            if f.3.is_empty() { "-" } else { &f.3 },
            if f.4.is_empty() { "-" } else { &f.4 }
        );
        if !explain {
            out.push_str(&f.5);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, group: Option<&str>) -> AgentInfo {
        AgentInfo {
            name: name.into(),
            labels: group
                .map(|g| [("group".to_string(), g.to_string())].into())
                .unwrap_or_default(),
            revoked: false,
            online: true,
            hostname: name.into(),
            addresses: vec!["10.0.0.7".parse().unwrap()],
            os: "linux".into(),
            agent_version: "t".into(),
            ssh_host_keys: vec![],
            enrolled_at: 0,
            cert_serial: String::new(),
            cert_not_after: 0,
        }
    }

    /// A hostile agent's NACK with 16 MiB strings is cut before it is formatted and logged.
    #[test]
    fn huge_config_result_is_bounded() {
        let big = "e\n".repeat(8 * 1024 * 1024);
        let r = ConfigResult {
            revision: big.clone(),
            ok: false,
            file: big.clone(),
            error: big,
        };
        let (revision, error) = result_text(&r);
        assert_eq!(revision.chars().count(), MAX_RESULT_TEXT);
        assert!(error.chars().count() <= 2 * MAX_RESULT_TEXT + 2);
        let (_, e) = result_text(&ConfigResult {
            file: String::new(),
            error: "denied".into(),
            ..r
        });
        assert_eq!(e, "denied");
    }

    /// The sample tree of the repository renders, and says what the README says it does.
    #[test]
    fn example_tree_renders() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/env");
        let pos = Position {
            cloud: "ovh".into(),
            site: "gra".into(),
            instance: "production".into(),
            project: "demo".into(),
        };
        let tree = Tree::load(&root, &pos, "group").unwrap();
        let tpl = Templates::compile(&tree).unwrap();
        let bastion = serde_json::json!({
            "project": "demo", "zone": "demo.example.org.", "address": "10.0.0.1",
            "services": {
                "dns": { "host": "10.0.0.1", "port": 53 },
                "syslog": { "host": "10.0.0.1", "port": 514, "protocol": "tcp" },
            },
        });
        let file = |r: &render::Rendered, path: &str| -> Option<String> {
            r.push
                .files
                .iter()
                .find(|f| f.path == path)
                .map(|f| String::from_utf8_lossy(&f.content).to_string())
        };
        let web = agent("web01", None);
        let r = render::render(
            &tree,
            &tpl,
            &web,
            &agent_facts(&web, Some("demo.example.org.")),
            &bastion,
        )
        .unwrap();
        let chrony = file(&r, "/etc/chrony/chrony.conf").unwrap();
        assert!(chrony.contains("server 10.0.0.1 iburst"), "{chrony}");
        assert!(file(&r, "/etc/rsyslog.d/90-bastide.conf").is_none());
        assert_eq!(
            file(&r, "/etc/mailname").unwrap(),
            "web01.demo.example.org\n"
        );
        let resolv = file(&r, "/etc/resolv.conf").unwrap();
        assert!(
            resolv.contains("nameserver 10.0.0.1\nsearch demo.example.org\n"),
            "{resolv}"
        );
        let s = r.push.settings.unwrap();
        assert_eq!(s.metrics_interval_secs, Some(15));
        assert_eq!(s.log_sources.len(), 2);
        assert_eq!(r.merged.provenance["vars.ntp_servers"].level, "host");

        let db = agent("db01", Some("db"));
        let r = render::render(&tree, &tpl, &db, &agent_facts(&db, None), &bastion).unwrap();
        assert!(file(&r, "/etc/chrony/chrony.conf")
            .unwrap()
            .contains("server ntp.ovh.net iburst"));
        assert!(file(&r, "/etc/rsyslog.d/90-bastide.conf")
            .unwrap()
            .contains(r#"target="10.0.0.1" port="514" protocol="tcp""#));
        assert!(file(&r, "/etc/resolv.conf")
            .unwrap()
            .contains("options edns0 timeout:1"));
        assert_eq!(r.merged.provenance["vars.resolver.options"].level, "group");
    }
}
