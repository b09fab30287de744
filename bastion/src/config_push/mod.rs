//! Configuration push: the environment tree (see [`tree`]) is rendered per agent into files
//! and agent settings ([`render`]); each agent gets a desired revision, and every session
//! sends its agent the newest revision it has not applied. The tree is watched (inotify via
//! `notify`) and reloaded within the debounce delay of a change; a tree with any error is
//! refused whole, and the last good one stays in force.
//!
//! With a git source ([`git`]) the tree is the export of the last good commit of a branch,
//! fetched by the bastion, and each agent's revision starts with that commit's id.
//!
//! The registry keeps desired and applied revisions and the last error; this module keeps
//! only the rendered pushes, one `watch` per agent that its session follows.

pub mod git;
pub mod plan;
pub mod render;
pub mod rollout;
pub mod service;
pub mod snapshot;
pub mod tree;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
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
use render::{agent_facts, Prepared};
use tree::{Position, Tree};

/// `[config_push]`: where the environment tree is and where this bastion sits in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPushConfig {
    /// Root of the environment tree on this machine (exactly one of `dir` and `git`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The environment tree from a git repository the bastion fetches itself.
    #[serde(default)]
    pub git: Option<git::GitConfig>,
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
    /// several files); a stream of changes is reloaded at most 4 x this after its first.
    #[serde(default = "default_debounce", with = "humantime_serde")]
    pub debounce: Duration,
    /// Rollouts in waves (absent: every agent is sent its new revision at once).
    #[serde(default)]
    pub rollout: Option<rollout::RolloutConfig>,
}

fn default_group_label() -> String {
    "group".into()
}
fn default_debounce() -> Duration {
    Duration::from_millis(50)
}

impl ConfigPushConfig {
    /// Problems as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match (&self.dir, &self.git) {
            (Some(dir), None) => {
                if !dir.is_dir() {
                    out.push((
                        "config_push.dir".into(),
                        format!("{} is not a directory", dir.display()),
                    ));
                }
            }
            (None, Some(g)) => out.extend(g.problems()),
            _ => out.push((
                "config_push".into(),
                "exactly one of dir (a tree on disk) and git (a repository to fetch) is required"
                    .into(),
            )),
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
        if let Some(r) = &self.rollout {
            out.extend(r.problems());
        }
        if self.debounce > Duration::from_millis(250) {
            out.push((
                "config_push.debounce".into(),
                "must be at most 250ms (x 4 at most before a reload; pushes are due within 1s of a change)".into(),
            ));
        }
        out
    }
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
    /// Agents rendered (the others' inputs had not changed since their last render).
    #[serde(default)]
    pub rendered: usize,
    /// Connected agents that had not applied their revision and were sent it again
    /// (`bastide config reload` only).
    #[serde(default)]
    pub repushed: usize,
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

/// An admin's reload (which also sends out-of-sync agents their revision again): where to
/// answer.
type Reload = oneshot::Sender<Summary>;

/// An agent to render: who, its facts, and the fingerprint of its layers.
type Job = (Arc<AgentInfo>, serde_json::Value, u64);
type Outcome = (Job, Result<PushMsg, Vec<String>>);

/// Characters kept of each string of an agent's `ConfigResult` (revision, file, error).
const MAX_RESULT_TEXT: usize = 1024;

struct Inner {
    cfg: ConfigPushConfig,
    pos: Position,
    zone: Option<String>,
    bastion: serde_json::Value,
    registry: Registry,
    /// The SSH rules, for each agent's `ssh_principals` (set by the service; none: empty).
    ssh_policy: Mutex<Option<Arc<crate::ssh::config::Policy>>>,
    current: Mutex<Option<Arc<Prepared>>>,
    /// The tree's directory and, from a git source, its commit (`None`: no commit yet).
    source: Mutex<Option<(PathBuf, Option<String>)>>,
    /// Held while a tree is loaded and made current (a reload and a new commit at once).
    loading: Mutex<()>,
    /// The last rollout (`[config_push.rollout]`).
    rollout: Mutex<Option<rollout::Rollout>>,
    /// Per agent: what its push was rendered from, and the push its session follows.
    agents: Mutex<HashMap<String, AgentPush>>,
    reload: mpsc::Sender<Reload>,
    reload_rx: Mutex<Option<mpsc::Receiver<Reload>>>,
}

struct AgentPush {
    /// Fingerprint of the layers and the facts the current push was rendered from.
    inputs: Option<(u64, serde_json::Value)>,
    tx: watch::Sender<Option<Arc<PushMsg>>>,
    /// The push the agent last ACKed, when it was the one in force at its ACK (mostly the
    /// same `Arc` as the push in force): what a plan compares with when the agent is behind
    /// (it NACKed, was offline, or a rollout has not reached it). Not kept across restarts.
    applied: Option<Arc<PushMsg>>,
}

impl AgentPush {
    fn new() -> Self {
        Self {
            inputs: None,
            tx: watch::channel(None).0,
            applied: None,
        }
    }
}

/// Cheap to clone: the push service's shared state.
#[derive(Clone)]
pub struct ConfigPushHandle {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Agents per rendering thread below which one thread is enough.
const RENDER_CHUNK: usize = 128;

/// Renders agents on every core (rendering is CPU only: templates and a hash). Blocking.
fn render_many(p: &Prepared, jobs: Vec<Job>) -> Vec<Outcome> {
    let one = |job: Job| {
        let r = p.render(&job.0, &job.1).map(|r| r.push);
        (job, r)
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len() / RENDER_CHUNK + 1);
    if threads <= 1 {
        return jobs.into_iter().map(one).collect();
    }
    let per = jobs.len().div_ceil(threads);
    let mut parts = Vec::with_capacity(threads);
    let mut rest = jobs;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().saturating_sub(per));
        parts.push(tail);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| s.spawn(move || part.into_iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                // A render never panics; if one did, its agents keep their revision.
                Err(_) => {
                    error!("a rendering thread panicked");
                    Vec::new()
                }
            })
            .collect()
    })
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
        let source = cfg.dir.clone().map(|d| (d, None));
        Self {
            inner: Arc::new(Inner {
                cfg,
                pos,
                zone,
                bastion,
                registry,
                ssh_policy: Mutex::new(None),
                source: Mutex::new(source),
                loading: Mutex::new(()),
                rollout: Mutex::new(None),
                current: Mutex::new(None),
                agents: Mutex::new(HashMap::new()),
                reload,
                reload_rx: Mutex::new(Some(rx)),
            }),
        }
    }

    /// Reads the tree in force, compiles its templates and merges its shared levels.
    /// Blocking.
    fn load(&self) -> Result<Prepared, Vec<String>> {
        let Some((dir, commit)) = lock(&self.inner.source).clone() else {
            return Err(vec![
                "no commit of the configuration repository applied yet".into(),
            ]);
        };
        self.load_at(&dir, commit)
    }

    fn load_at(
        &self,
        dir: &std::path::Path,
        commit: Option<String>,
    ) -> Result<Prepared, Vec<String>> {
        let i = &self.inner;
        let tree = Tree::load(dir, &i.pos, &i.cfg.group_label)?;
        // `bastion.services.*`: lists of every live node's endpoints (`bastion.nodes` too).
        let vars = i.registry.cluster().template_vars(&i.bastion);
        let mut p = Prepared::new(tree, &vars)?;
        p.source = commit;
        Ok(p)
    }

    /// The directory of the tree in force.
    pub fn dir(&self) -> Option<PathBuf> {
        lock(&self.inner.source).as_ref().map(|s| s.0.clone())
    }

    /// The commit in force (git source).
    pub fn commit(&self) -> Option<String> {
        lock(&self.inner.source).as_ref().and_then(|s| s.1.clone())
    }

    /// Loads the tree at `dir` (from `commit`) and, if every agent renders, makes it the
    /// tree in force and pushes what changed; otherwise the one in force stays. Blocking.
    pub fn load_source(&self, dir: PathBuf, commit: Option<String>) -> Summary {
        let _g = lock(&self.inner.loading);
        let t = Instant::now();
        match self.load_at(&dir, commit.clone()) {
            Ok(p) => {
                let s = self.make_current(p, false, t);
                if s.errors.is_empty() {
                    *lock(&self.inner.source) = Some((dir, commit));
                }
                s
            }
            Err(errors) => self.refused(errors),
        }
    }

    fn facts(&self, a: &AgentInfo) -> serde_json::Value {
        let mut f = agent_facts(a, self.inner.zone.as_deref());
        // Who may log in to the VM with a single sign-on certificate (templates
        // bastide-principals.j2): by the same [[ssh.rules]] as the jumps.
        let principals = match &*lock(&self.inner.ssh_policy) {
            Some(p) => crate::ssh::rules::principals_for(p, a),
            None => Vec::new(),
        };
        if let Some(o) = f.as_object_mut() {
            o.insert("ssh_principals".into(), serde_json::json!(principals));
        }
        f
    }

    /// The SSH rules `agent.ssh_principals` follow.
    pub fn set_ssh_policy(&self, policy: Option<Arc<crate::ssh::config::Policy>>) {
        *lock(&self.inner.ssh_policy) = policy;
    }

    /// The active agents (those named, or all) as render jobs against `p`; with `skip`,
    /// only those whose layers or facts changed since their push was rendered.
    fn jobs(&self, p: &Prepared, names: Option<&HashSet<String>>, skip: bool) -> Vec<Job> {
        let snap = self.inner.registry.snapshot();
        let agents = lock(&self.inner.agents);
        snap.active()
            .filter(|a| names.is_none_or(|n| n.contains(&a.name)))
            .filter_map(|a| {
                let facts = self.facts(a);
                let inputs = p.inputs(a);
                let same = skip
                    && agents.get(&a.name).is_some_and(|e| {
                        e.tx.borrow().is_some()
                            && e.inputs
                                .as_ref()
                                .is_some_and(|(i, f)| *i == inputs && *f == facts)
                    });
                (!same).then(|| (a.clone(), facts, inputs))
            })
            .collect()
    }

    /// Loads and renders the tree from disk without changing anything.
    pub fn check(&self) -> Summary {
        let t = Instant::now();
        let prepared = match self.load() {
            Ok(l) => l,
            Err(errors) => {
                return Summary {
                    errors,
                    ..Summary::default()
                }
            }
        };
        let jobs = self.jobs(&prepared, None, false);
        let out = render_many(&prepared, jobs);
        let mut errors = Vec::new();
        let mut files = 0;
        let mut agents = 0;
        for (_, r) in out {
            match r {
                Ok(p) => {
                    agents += 1;
                    files += p.files.len();
                }
                Err(e) => errors.extend(e),
            }
        }
        Summary {
            agents,
            rendered: agents,
            files,
            render_ms: t.elapsed().as_secs_f64() * 1000.0,
            errors,
            ..Summary::default()
        }
    }

    /// Loads the tree and, if every agent renders, makes it current and pushes what
    /// changed; `explicit` (the admin's reload) also sends connected agents that have not
    /// applied their revision (a NACK for a transient cause) that revision again. A tree
    /// with any error is refused whole. Blocking.
    fn reload_now(&self, explicit: bool) -> Summary {
        let _g = lock(&self.inner.loading);
        let t = Instant::now();
        match self.load() {
            Ok(p) => self.make_current(p, explicit, t),
            Err(errors) => self.refused(errors),
        }
    }

    /// Renders every agent from `prepared` and, if all render, makes it current.
    fn make_current(&self, prepared: Prepared, explicit: bool, t: Instant) -> Summary {
        // Agents whose layers and facts are unchanged render the same: skipped.
        let jobs = self.jobs(&prepared, None, true);
        let rendered = jobs.len();
        let out = render_many(&prepared, jobs);
        let errors: Vec<String> = out
            .iter()
            .filter_map(|(_, r)| r.as_ref().err())
            .flatten()
            .cloned()
            .collect();
        if !errors.is_empty() {
            return self.refused(errors);
        }
        let render_ms = t.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!(names::CONFIG_RENDER_DURATION).record(t.elapsed().as_secs_f64());
        let candidate = prepared.source.clone();
        let previous = lock(&self.inner.current).replace(Arc::new(prepared));
        let changed = match &self.inner.cfg.rollout {
            Some(rc) => self.start_rollout(rc, out, candidate, previous),
            None => self.publish(out),
        };
        let repushed = if explicit { self.repush() } else { 0 };
        let (agents, files) = self.counts();
        metrics::counter!(names::CONFIG_RELOADS, "result" => "ok").increment(1);
        info!(
            agents,
            files, rendered, changed, repushed, render_ms, "configuration tree loaded"
        );
        Summary {
            agents,
            files,
            changed,
            render_ms,
            errors: Vec::new(),
            rendered,
            repushed,
        }
    }

    /// Starts a rollout of `out` (superseding any): agents whose revision changes get it
    /// wave by wave; the others (same revision, or none in force yet: new agents, a
    /// restart) at once. Returns how many agents have a new revision to come.
    fn start_rollout(
        &self,
        rc: &rollout::RolloutConfig,
        out: Vec<Outcome>,
        candidate: Option<String>,
        previous_tree: Option<Arc<Prepared>>,
    ) -> usize {
        let (mut now, mut later) = (Vec::new(), Vec::new());
        let mut previous = HashMap::new();
        {
            let agents = lock(&self.inner.agents);
            for o in out {
                let cur = agents
                    .get(&o.0 .0.name)
                    .map(|e| (e.inputs.clone(), e.tx.borrow().clone()));
                let wave = match (&o.1, &cur) {
                    (Ok(p), Some((_, Some(c)))) => c.revision != p.revision,
                    _ => false,
                };
                if wave {
                    if let Some(c) = cur {
                        previous.insert(o.0 .0.name.clone(), c);
                    }
                    later.push(o);
                } else {
                    now.push(o);
                }
            }
        }
        self.publish(now);
        if later.is_empty() {
            return 0;
        }
        let infos: Vec<Arc<AgentInfo>> = later.iter().map(|o| o.0 .0.clone()).collect();
        let waves = rollout::assign(rc, &infos);
        let n = later.len();
        let pending = later
            .into_iter()
            .filter_map(|((a, f, i), r)| r.ok().map(|p| (a.name.clone(), (a, f, i, p))))
            .collect();
        let source = candidate.unwrap_or_else(|| "tree".into());
        let mut r = rollout::Rollout {
            status: rollout::RolloutStatus {
                state: "rolling".into(),
                source: source.clone(),
                started_at: crate::unix_now(),
                wave: 0,
                waves: waves
                    .into_iter()
                    .map(|(name, agents)| rollout::WaveStatus {
                        name,
                        agents,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            pending,
            reached: HashMap::new(),
            previous,
            previous_tree: Some((previous_tree, lock(&self.inner.source).clone())),
            bake_until: None,
            bake_time: rc.bake_time,
        };
        let step = r.next_wave();
        let superseded = lock(&self.inner.rollout)
            .replace(r)
            .is_some_and(|old| old.active());
        info!(source = %source, agents = n, superseded, "configuration rollout started");
        self.rollout_apply(step);
        n
    }

    /// Sends a wave its pushes.
    fn rollout_apply(&self, step: rollout::Step) {
        let rollout::Step::Reach(i) = step else {
            return;
        };
        let items: Vec<Outcome> = {
            let mut g = lock(&self.inner.rollout);
            let Some(r) = g.as_mut() else { return };
            let Some(w) = r.status.waves.get_mut(i) else {
                return;
            };
            w.reached = true;
            let names = w.agents.clone();
            info!(wave = i + 1, name = %w.name, agents = names.len(), source = %r.status.source, "configuration rollout: wave reached");
            names
                .into_iter()
                .filter_map(|n| {
                    let (a, f, inputs, p) = r.pending.remove(&n)?;
                    r.reached.insert(n, p.revision.clone());
                    Some(((a, f, inputs), Ok(p)))
                })
                .collect()
        };
        self.publish(items);
    }

    /// Advances the rollout with the agents' ACKs, NACKs and sessions.
    pub fn rollout_tick(&self) {
        let step = {
            let mut g = lock(&self.inner.rollout);
            let Some(r) = g.as_mut().filter(|r| r.active()) else {
                return;
            };
            let states = self.inner.registry.config_states();
            let snap = self.inner.registry.snapshot();
            let online = |n: &str| snap.agents.get(n).is_some_and(|a| a.online && !a.revoked);
            let step = r.step(&states, online, Instant::now());
            match r.status.state.as_str() {
                "halted" => {
                    if let Some(f) = &r.status.failure {
                        metrics::counter!(names::CONFIG_ROLLOUTS, "result" => "halted")
                            .increment(1);
                        error!(source = %r.status.source, wave = f.wave, agent = %f.agent, reason = %f.reason, error = %f.error, "configuration rollout halted: agents not reached keep their revision");
                    }
                }
                "done" => {
                    metrics::counter!(names::CONFIG_ROLLOUTS, "result" => "done").increment(1);
                    info!(source = %r.status.source, "configuration rollout done");
                }
                _ => {}
            }
            step
        };
        self.rollout_apply(step);
    }

    /// `bastide config rollout status`.
    pub fn rollout_status(&self) -> Option<rollout::RolloutStatus> {
        lock(&self.inner.rollout).as_ref().map(|r| r.status.clone())
    }

    /// `bastide config rollout resume`: a halted rollout goes on to its next wave.
    pub fn rollout_resume(&self) -> Result<rollout::RolloutStatus> {
        let (step, status) = {
            let mut g = lock(&self.inner.rollout);
            let Some(r) = g.as_mut().filter(|r| r.status.state == "halted") else {
                anyhow::bail!("no halted rollout to resume");
            };
            let step = r.next_wave();
            info!(source = %r.status.source, "configuration rollout resumed by the admin");
            (step, r.status.clone())
        };
        self.rollout_apply(step);
        Ok(self.rollout_status().unwrap_or(status))
    }

    /// `bastide config rollout abort`: the agents reached get their previous push back,
    /// the previous tree is in force again. Returns the commit now in force.
    pub fn rollout_abort(&self) -> Result<(rollout::RolloutStatus, Option<String>)> {
        let _g = lock(&self.inner.loading);
        let (reached, previous, tree, status) = {
            let mut g = lock(&self.inner.rollout);
            let Some(r) = g
                .as_mut()
                .filter(|r| matches!(r.status.state.as_str(), "rolling" | "baking" | "halted"))
            else {
                anyhow::bail!("no rollout in progress or halted to abort");
            };
            r.status.state = "aborted".into();
            r.pending.clear();
            let reached: Vec<String> = r.reached.keys().cloned().collect();
            (
                reached,
                std::mem::take(&mut r.previous),
                r.previous_tree.take(),
                r.status.clone(),
            )
        };
        let mut desired = Vec::new();
        {
            let mut agents = lock(&self.inner.agents);
            for name in &reached {
                let (Some((inputs, push)), Some(e)) = (previous.get(name), agents.get_mut(name))
                else {
                    continue;
                };
                e.inputs = inputs.clone();
                if let Some(p) = push {
                    desired.push((name.clone(), Ok(p.revision.clone())));
                }
                e.tx.send_replace(push.clone());
            }
        }
        self.inner.registry.set_config_desired(&desired);
        if let Some((prepared, source)) = tree {
            if let Some(p) = prepared {
                *lock(&self.inner.current) = Some(p);
            }
            if source.is_some() {
                *lock(&self.inner.source) = source;
            }
        }
        metrics::counter!(names::CONFIG_ROLLOUTS, "result" => "aborted").increment(1);
        warn!(source = %status.source, agents = reached.len(), "configuration rollout aborted: the agents reached get their previous revision back");
        Ok((status, self.commit()))
    }

    /// Active agents with a push, and their files.
    fn counts(&self) -> (usize, usize) {
        let snap = self.inner.registry.snapshot();
        let agents = lock(&self.inner.agents);
        snap.active()
            .filter_map(|a| agents.get(&a.name))
            .filter_map(|e| e.tx.borrow().as_ref().map(|p| p.files.len()))
            .fold((0, 0), |(n, f), k| (n + 1, f + k))
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

    /// Makes rendered pushes current (render errors are recorded for their agents);
    /// returns how many changed revision. Each session sends its push as soon as it is
    /// replaced here.
    fn publish(&self, out: Vec<Outcome>) -> usize {
        let mut desired = Vec::with_capacity(out.len());
        let mut fresh = Vec::with_capacity(out.len());
        for ((a, facts, inputs), r) in out {
            match r {
                Ok(push) => {
                    desired.push((a.name.clone(), Ok(push.revision.clone())));
                    fresh.push((a, facts, inputs, push));
                }
                Err(e) => {
                    warn!(agent = %a.name, error = %e.join("; "), "configuration render failed");
                    desired.push((a.name.clone(), Err(e.join("; "))));
                }
            }
        }
        // The registry knows the new desired revisions before any agent can ACK them, so
        // that the out-of-sync count never reads 0 while pushes are on their way.
        self.inner.registry.set_config_desired(&desired);
        let mut changed = 0;
        let mut agents = lock(&self.inner.agents);
        for (a, facts, inputs, push) in fresh {
            let entry = agents.entry(a.name.clone()).or_insert_with(AgentPush::new);
            entry.inputs = Some((inputs, facts));
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
        changed
    }

    /// Wakes the session of every connected agent that has not applied its desired
    /// revision, which then sends it again. Returns how many.
    fn repush(&self) -> usize {
        let states = self.inner.registry.config_states();
        let agents = lock(&self.inner.agents);
        let mut n = 0;
        for (name, e) in agents.iter() {
            let Some(c) = states.get(name) else { continue };
            let current =
                e.tx.borrow()
                    .as_ref()
                    .is_some_and(|p| !c.desired.is_empty() && p.revision == c.desired);
            if current && c.desired != c.applied && e.tx.receiver_count() > 0 {
                e.tx.send_modify(|_| {});
                n += 1;
            }
        }
        if n > 0 {
            info!(agents = n, "configuration sent again to agents out of sync");
        }
        n
    }

    /// Renders agents that are new or whose facts changed (enrollment, registration):
    /// those named, or all of them.
    fn render_changed(&self, names: Option<HashSet<String>>) {
        let Some(prepared) = lock(&self.inner.current).clone() else {
            return;
        };
        let mut jobs = self.jobs(&prepared, names.as_ref(), true);
        // Agents a rollout has not reached yet (it may be halted) wait for their wave.
        if let Some(r) = lock(&self.inner.rollout).as_ref() {
            jobs.retain(|j| !r.pending.contains_key(&j.0.name));
        }
        if jobs.is_empty() {
            return;
        }
        let out = render_many(&prepared, jobs);
        let n = self.publish(out);
        debug!(changed = n, "agents rendered after a registry change");
    }

    /// The push a session follows: the current value first, then every new one.
    pub fn subscribe(&self, agent: &str) -> watch::Receiver<Option<Arc<PushMsg>>> {
        let mut rx = lock(&self.inner.agents)
            .entry(agent.to_string())
            .or_insert_with(AgentPush::new)
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
        let prepared = self.load()?;
        let r = prepared.render(a, &self.facts(a))?;
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

    /// What the tree at `dir` (from `commit`) would change for each active agent (or the
    /// one named) against the push in force, without changing anything. Blocking.
    pub fn plan(
        &self,
        dir: &std::path::Path,
        commit: Option<String>,
        agent: Option<&str>,
    ) -> plan::Plan {
        let mut out = plan::Plan {
            source: match &commit {
                Some(c) => format!("commit {c}"),
                None => format!("dir {}", dir.display()),
            },
            ..Default::default()
        };
        let prepared = match self.load_at(dir, commit) {
            Ok(p) => p,
            Err(errors) => {
                out.tree_errors = errors;
                return out;
            }
        };
        let names = agent.map(|a| HashSet::from([a.to_string()]));
        let jobs = self.jobs(&prepared, names.as_ref(), false);
        if let (Some(a), true) = (agent, jobs.is_empty()) {
            out.tree_errors
                .push(format!("unknown or inactive agent {a:?}"));
            return out;
        }
        let rendered = render_many(&prepared, jobs);
        let states = self.inner.registry.config_states();
        let mut against: HashMap<String, plan::Against> = {
            let agents = lock(&self.inner.agents);
            rendered
                .iter()
                .map(|((a, _, _), _)| {
                    let applied = states
                        .get(&a.name)
                        .map(|c| c.applied.clone())
                        .unwrap_or_default();
                    (a.name.clone(), self.against(agents.get(&a.name), applied))
                })
                .collect()
        };
        let mut rows: Vec<plan::AgentPlan> = rendered
            .into_iter()
            .map(|((a, _, _), r)| {
                let with = against.remove(&a.name).unwrap_or_default();
                plan::row(&a.name, r, with)
            })
            .collect();
        rows.sort_by(|a, b| a.agent.cmp(&b.agent));
        for r in rows {
            out.push_agent(r);
        }
        out
    }

    /// What a plan compares an agent's candidate with (see [`plan::basis`]).
    fn against(&self, e: Option<&AgentPush>, applied: String) -> plan::Against {
        let in_force = e.and_then(|e| e.tx.borrow().clone());
        plan::Against::new(
            applied,
            in_force.as_ref(),
            e.and_then(|e| e.applied.as_ref()),
        )
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
        self.inner.registry.config_sent(agent, &push.revision);
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
            // Keep the push it applied (for plans), if it is still the one in force.
            if let Some(e) = lock(&self.inner.agents).get_mut(agent) {
                let cur = e.tx.borrow().clone();
                e.applied = cur.filter(|p| p.revision == revision);
            }
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
    // A git source loads its first commit itself (`git::run`).
    if handle.inner.cfg.dir.is_some() {
        let h = handle.clone();
        let _ = tokio::task::spawn_blocking(move || h.reload_now(false)).await;
    }

    let (fs_tx, mut fs_rx) = mpsc::channel::<()>(1);
    let watcher = match &handle.inner.cfg.dir {
        Some(dir) => {
            use notify::{RecursiveMode, Watcher};
            let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                if let Ok(ev) = ev {
                    if !ev.kind.is_access() {
                        let _ = fs_tx.try_send(());
                    }
                }
            })?;
            w.watch(dir, RecursiveMode::Recursive)?;
            info!(dir = %dir.display(), "watching the configuration tree");
            Some(w)
        }
        None => None,
    };
    let mut events = handle.inner.registry.events();
    // Agents to render again, gathered for a moment so that a wave of reconnections costs
    // one pass; `None` inside means all of them (the event channel lagged).
    let mut dirty: Option<HashSet<String>> = Some(HashSet::new());
    let mut render_tick = tokio::time::interval(Duration::from_millis(100));
    render_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let debounce = handle.inner.cfg.debounce;
    let mut rollout_tick = tokio::time::interval(Duration::from_millis(200));
    rollout_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rollouts = handle.inner.cfg.rollout.is_some();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rollout_tick.tick(), if rollouts => {
                let h = handle.clone();
                let _ = tokio::task::spawn_blocking(move || h.rollout_tick()).await;
            }
            Some(()) = fs_rx.recv() => {
                // Let a burst of writes (git checkout, editor) finish: reload once the tree
                // has been quiet for `debounce`, or `debounce` x 4 after the first change
                // at most, so that a stream of writes cannot hold pushes back.
                let deadline = tokio::time::Instant::now() + debounce * 4;
                loop {
                    let quiet = tokio::time::sleep(debounce);
                    tokio::select! {
                        _ = quiet => break,
                        _ = tokio::time::sleep_until(deadline) => break,
                        more = fs_rx.recv() => if more.is_none() { break },
                    }
                }
                let h = handle.clone();
                let _ = tokio::task::spawn_blocking(move || h.reload_now(false)).await;
            }
            Some(done) = reload_rx.recv() => {
                let h = handle.clone();
                if let Ok(s) = tokio::task::spawn_blocking(move || h.reload_now(true)).await {
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
            ..Default::default()
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
        let bastion = serde_json::json!({
            "project": "demo", "zone": "demo.example.org.", "address": "10.0.0.1",
            "services": {
                "dns": [{ "host": "10.0.0.1", "port": 53 }],
                "syslog": [{ "host": "10.0.0.1", "port": 514, "protocol": "tcp" }],
            },
        });
        let file = |r: &render::Rendered, path: &str| -> Option<String> {
            r.push
                .files
                .iter()
                .find(|f| f.path == path)
                .map(|f| String::from_utf8_lossy(&f.content).to_string())
        };
        let p = Prepared::new(tree, &bastion).unwrap();
        let web = agent("web01", None);
        let r = p
            .render(&web, &agent_facts(&web, Some("demo.example.org.")))
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
        let r = p.render(&db, &agent_facts(&db, None)).unwrap();
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
