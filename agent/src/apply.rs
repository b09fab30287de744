//! Applying a configuration pushed by the bastion, within what the local configuration allows
//! (the bastion cannot change it): files only under `[config] allow_dirs`, reached without any
//! symbolic link through descriptors of the allowed directory opened once ([`crate::beneath`]);
//! no setuid/setgid/sticky mode unless `allow_special_modes`; actions only those named in
//! `[config.actions]`; log sources only within `allow_log_sources`; a metrics interval no
//! shorter than `min_metrics_interval`. Everything is checked before anything is written;
//! missing parent directories are created (0755, the file's owner and group) only below an
//! allowed directory; each changed file is written atomically (temporary file in the same
//! directory, fsync, owner and mode on its descriptor, rename, fsync of the directory),
//! unchanged files are left alone (mtime kept). If an `on_change` action fails, the
//! revision's files are restored (through the same walk) and the revision is refused (NACK).
//! The applied revision and its agent settings are kept in the state directory, so that a
//! restarted agent reports it and keeps its settings.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bastide_proto::v1::{
    agent_message, AgentMessage, AgentSettings, ConfigPush, ConfigResult, LogSource, ManagedFile,
};
use prost::Message;
use serde::Deserialize;
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{info, warn};

use crate::beneath::{Dir, Existing, Root};
use crate::logs::allow::{self, AllowList};

/// `[config]` of the agent's local configuration. Defaults allow nothing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushPolicy {
    /// Directories pushed files may be written under (absolute).
    #[serde(default)]
    pub allow_dirs: Vec<PathBuf>,
    /// Actions a pushed file may name as `on_change`: name -> command.
    #[serde(default)]
    pub actions: BTreeMap<String, Action>,
    /// Longest an action may run before it counts as failed.
    #[serde(default = "default_action_timeout", with = "humantime_serde")]
    pub action_timeout: Duration,
    /// Globs of the real paths (symbolic links resolved) pushed log sources may read; `*`
    /// stays within a directory, `**` spans directories. Empty (the default): a revision
    /// with log sources is refused.
    #[serde(default)]
    pub allow_log_sources: Vec<String>,
    /// Shortest host metrics interval a push may set (a push of 0, metrics off, is allowed).
    #[serde(default = "default_min_metrics_interval", with = "humantime_serde")]
    pub min_metrics_interval: Duration,
    /// Whether a pushed file mode may carry the setuid, setgid or sticky bit (refused by
    /// default: a pushed setuid-root program is a root shell for every local user).
    #[serde(default)]
    pub allow_special_modes: bool,
}

fn default_min_metrics_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_action_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for PushPolicy {
    fn default() -> Self {
        Self {
            allow_dirs: Vec::new(),
            actions: BTreeMap::new(),
            action_timeout: default_action_timeout(),
            allow_log_sources: Vec::new(),
            min_metrics_interval: default_min_metrics_interval(),
            allow_special_modes: false,
        }
    }
}

/// A command, run without a shell: a string is split on whitespace (no quoting), an array
/// is taken as is. For shell syntax, say so: `["/bin/sh", "-c", "..."]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Action {
    Line(String),
    Argv(Vec<String>),
}

impl Action {
    pub fn argv(&self) -> Vec<String> {
        match self {
            Action::Line(s) => s.split_whitespace().map(str::to_string).collect(),
            Action::Argv(v) => v.clone(),
        }
    }
}

impl PushPolicy {
    /// Problems of the local policy, for the config loader.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.allow_dirs {
            if !d.is_absolute() || d.components().any(|c| matches!(c, Component::ParentDir)) {
                out.push(format!(
                    "config.allow_dirs: {} must be absolute, without ..",
                    d.display()
                ));
            }
        }
        for (name, a) in &self.actions {
            let argv = a.argv();
            if argv.is_empty() || !Path::new(&argv[0]).is_absolute() {
                out.push(format!(
                    "config.actions.{name}: the command must start with an absolute program path"
                ));
            }
        }
        if self.action_timeout.is_zero() {
            out.push("config.action_timeout: must be positive".into());
        }
        if let Err(p) = AllowList::new(&self.allow_log_sources) {
            out.extend(p);
        }
        if self.min_metrics_interval < Duration::from_secs(1) {
            out.push("config.min_metrics_interval: must be at least 1s".into());
        }
        out
    }

    /// Why the pushed agent settings may not take effect here, if they may not: the
    /// setting (as `ConfigResult.file`) and the reason, naming the local key to change.
    pub fn refuse_settings(&self, s: &AgentSettings) -> Option<(String, String)> {
        if let Some(n) = s.metrics_interval_secs {
            let every = Duration::from_secs(u64::from(n));
            if n != 0 && every < self.min_metrics_interval {
                return Some((
                    "agent.metrics_interval".into(),
                    format!(
                        "pushed metrics interval {n}s is below the agent's local [config] min_metrics_interval ({}s)",
                        self.min_metrics_interval.as_secs()
                    ),
                ));
            }
        }
        if s.log_sources.len() > MAX_PUSHED_LOG_SOURCES {
            return Some((
                "agent.logs.sources".into(),
                format!("more than {MAX_PUSHED_LOG_SOURCES} pushed log sources"),
            ));
        }
        let allow = AllowList::from_valid(&self.allow_log_sources);
        for (i, l) in s.log_sources.iter().enumerate() {
            let mut cfg = crate::logs::LogSourceConfig::file(&l.path);
            if !l.multiline_start.is_empty() {
                cfg.multiline_start = Some(l.multiline_start.clone());
            }
            let problems = cfg.validate(&format!("agent.logs.sources[{i}]"));
            if !problems.is_empty() {
                return Some((l.path.clone(), problems.join("; ")));
            }
            if let Err(why) = allow::check_pushed(&allow, &l.path) {
                return Some((l.path.clone(), why));
            }
        }
        None
    }
}

/// Most log sources one revision may push.
const MAX_PUSHED_LOG_SOURCES: usize = 64;

/// Settings the bastion pushed, as in force now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushedSettings {
    /// Host metrics interval; `None`: the local setting.
    pub metrics_interval: Option<Duration>,
    /// Log sources (path glob, multi-line start regex); empty: the local ones. The log
    /// shipper follows [`Applier::log_sources`].
    pub log_sources: Vec<LogSource>,
}

impl From<&AgentSettings> for PushedSettings {
    fn from(s: &AgentSettings) -> Self {
        Self {
            metrics_interval: s
                .metrics_interval_secs
                .map(|n| Duration::from_secs(u64::from(n))),
            log_sources: s.log_sources.clone(),
        }
    }
}

struct Inner {
    policy: PushPolicy,
    state_file: PathBuf,
    /// Serialises applies: a push arriving during an apply waits for it.
    applying: Mutex<()>,
    applied: std::sync::Mutex<String>,
    settings: watch::Sender<PushedSettings>,
    log_sources: watch::Sender<Vec<LogSource>>,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Applier {
    inner: Arc<Inner>,
}

impl Applier {
    /// Loads the last applied revision and settings from the state directory.
    pub fn open(state_dir: &Path, policy: PushPolicy) -> Self {
        let state_file = state_dir.join("config-applied.pb");
        let mut saved = fs::read(&state_file)
            .ok()
            .and_then(|b| ConfigPush::decode(b.as_slice()).ok())
            .unwrap_or_default();
        // The local file may have narrowed since: what it no longer allows is dropped, and
        // the revision forgotten so that the bastion pushes it again and hears why.
        if let Some((what, why)) =
            policy.refuse_settings(&saved.settings.clone().unwrap_or_default())
        {
            warn!(revision = %saved.revision, setting = %what, reason = %why, "the applied revision's settings are no longer allowed by the local file: dropped");
            saved = ConfigPush::default();
        }
        let settings = PushedSettings::from(&saved.settings.unwrap_or_default());
        let (log_sources, _) = watch::channel(settings.log_sources.clone());
        let (settings, _) = watch::channel(settings);
        Self {
            inner: Arc::new(Inner {
                policy,
                state_file,
                applying: Mutex::new(()),
                applied: std::sync::Mutex::new(saved.revision),
                settings,
                log_sources,
            }),
        }
    }

    /// The revision applied last (empty: none).
    pub fn applied_revision(&self) -> String {
        self.inner
            .applied
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    /// The pushed settings, now and as they change.
    pub fn settings(&self) -> watch::Receiver<PushedSettings> {
        self.inner.settings.subscribe()
    }

    /// The pushed log sources, now and as they change (for the log shipper).
    pub fn log_sources(&self) -> watch::Receiver<Vec<LogSource>> {
        self.inner.log_sources.subscribe()
    }

    /// Applies `push` in the background and sends the ACK or NACK on `tx`; the session keeps
    /// running (heartbeats) while actions run.
    pub fn handle(&self, push: ConfigPush, tx: mpsc::Sender<AgentMessage>) {
        let this = self.clone();
        tokio::spawn(async move {
            let _one = this.inner.applying.lock().await;
            let result = this.apply(push).await;
            let m = AgentMessage {
                kind: Some(agent_message::Kind::ConfigResult(result)),
            };
            let _ = tx.send(m).await;
        });
    }

    async fn apply(&self, push: ConfigPush) -> ConfigResult {
        let revision = push.revision.clone();
        let nack = |file: &str, e: anyhow::Error| {
            warn!(revision = %revision, file = %file, error = %format!("{e:#}"), "configuration refused");
            ConfigResult {
                revision: revision.clone(),
                ok: false,
                file: file.to_string(),
                error: format!("{e:#}"),
            }
        };
        if push.revision == self.applied_revision() {
            return ConfigResult {
                revision,
                ok: true,
                ..ConfigResult::default()
            };
        }
        // Settings first: a refused revision leaves nothing behind, files included.
        if let Some((what, why)) = self
            .inner
            .policy
            .refuse_settings(&push.settings.clone().unwrap_or_default())
        {
            return nack(&what, anyhow!(why));
        }
        let policy = self.inner.policy.clone();
        let files = push.files.clone();
        let written = match tokio::task::spawn_blocking(move || write_all(&policy, &files)).await {
            Ok(Ok(w)) => w,
            Ok(Err((file, e))) => return nack(&file, e),
            Err(e) => return nack("", anyhow!("apply task failed: {e}")),
        };
        // Actions of changed files, each once, in file order.
        let mut actions: Vec<(String, String)> = Vec::new();
        for w in &written {
            if !w.on_change.is_empty() && !actions.iter().any(|(a, _)| *a == w.on_change) {
                actions.push((w.on_change.clone(), w.target.path.display().to_string()));
            }
        }
        for (name, file) in actions {
            if let Err(e) = self.run_action(&name).await {
                let undo = written.clone();
                let restored = tokio::task::spawn_blocking(move || rollback(&undo)).await;
                let e = match restored {
                    Ok(Ok(())) => e.context(format!(
                        "action {name:?} failed: the revision's files were restored"
                    )),
                    Ok(Err(r)) => e.context(format!(
                        "action {name:?} failed, and restoring the files failed too: {r:#}"
                    )),
                    Err(r) => e.context(format!("action {name:?} failed; rollback task: {r}")),
                };
                return nack(&file, e);
            }
        }
        let mut saved = push.clone();
        saved.files.clear();
        let state_file = self.inner.state_file.clone();
        let persisted = tokio::task::spawn_blocking(move || {
            crate::fsutil::write_atomic(&state_file, &saved.encode_to_vec(), 0o600)
        })
        .await;
        if !matches!(persisted, Ok(Ok(()))) {
            warn!(revision = %revision, "could not record the applied revision in the state directory");
        }
        if let Ok(mut g) = self.inner.applied.lock() {
            *g = revision.clone();
        }
        let settings = PushedSettings::from(&push.settings.unwrap_or_default());
        self.inner.log_sources.send_if_modified(|l| {
            let changed = *l != settings.log_sources;
            if changed {
                *l = settings.log_sources.clone();
            }
            changed
        });
        self.inner.settings.send_if_modified(|s| {
            let changed = *s != settings;
            if changed {
                *s = settings;
            }
            changed
        });
        info!(revision = %revision, changed_files = written.len(), "configuration applied");
        ConfigResult {
            revision,
            ok: true,
            ..ConfigResult::default()
        }
    }

    async fn run_action(&self, name: &str) -> Result<()> {
        let argv = self
            .inner
            .policy
            .actions
            .get(name)
            .map(Action::argv)
            .ok_or_else(|| anyhow!("action {name:?} is not in the local [config.actions]"))?;
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("action {name:?} is empty"))?;
        info!(action = %name, "running on_change action");
        let child = tokio::process::Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {prog}"))?;
        let out = tokio::time::timeout(self.inner.policy.action_timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                anyhow!(
                    "timed out after {}s",
                    self.inner.policy.action_timeout.as_secs()
                )
            })??;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err
                .trim()
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(anyhow!("{} {}", out.status, tail))
        }
    }
}

/// Largest existing file a push may replace (its content is kept for a rollback).
const MAX_EXISTING: u64 = 16 * 1024 * 1024;

/// Most parent directories one file may need created.
const MAX_NEW_DIRS: usize = 16;

/// Where a managed file goes: an allowed directory (opened once per apply), the
/// directories below it, and its name.
#[derive(Debug, Clone)]
struct Target {
    root: Arc<Root>,
    dirs: Vec<OsString>,
    name: OsString,
    /// The full path, for messages and actions.
    path: PathBuf,
}

impl Target {
    fn dir(
        &self,
        create: bool,
        uid: Option<u32>,
        gid: Option<u32>,
        created: &mut Vec<Vec<OsString>>,
    ) -> Result<Dir> {
        self.root.walk(&self.dirs, create, uid, gid, created)
    }
}

/// A file this revision changed, and what to put back.
#[derive(Debug, Clone)]
struct Written {
    target: Target,
    on_change: String,
    /// Previous content, mode and owner; `None`: the file did not exist.
    previous: Option<Existing>,
    /// Parent directories created for it, outermost first, as components below the root
    /// (removed by a rollback).
    created_dirs: Vec<Vec<OsString>>,
}

/// Resolved target of one managed file.
struct Plan<'a> {
    file: &'a ManagedFile,
    target: Target,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// The allowed directory `path` lies under, and its place there: `path` must be absolute,
/// without `.` or `..`, strictly below an entry of `[config] allow_dirs`. Each allowed
/// directory is opened once per apply (`roots`); nothing below it is reached by path.
fn target(policy: &PushPolicy, roots: &mut Vec<Arc<Root>>, path: &Path) -> Result<Target> {
    let normal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal {
        return Err(anyhow!("not an absolute path without . or .."));
    }
    let Some(allowed) = policy
        .allow_dirs
        .iter()
        .find(|d| path.starts_with(d) && path != d.as_path())
    else {
        return Err(anyhow!(
            "outside the directories this agent allows ([config] allow_dirs)"
        ));
    };
    let rel = path
        .strip_prefix(allowed)
        .map_err(|_| anyhow!("outside the directories this agent allows ([config] allow_dirs)"))?;
    let mut comps: Vec<OsString> = rel.iter().map(OsString::from).collect();
    let name = comps.pop().ok_or_else(|| anyhow!("no file name"))?;
    let root = match roots.iter().find(|r| r.path() == allowed.as_path()) {
        Some(r) => r.clone(),
        None => {
            let r = Arc::new(Root::open(allowed)?);
            roots.push(r.clone());
            r
        }
    };
    Ok(Target {
        root,
        dirs: comps,
        name,
        path: path.to_path_buf(),
    })
}

/// Checks every file, then writes those whose content differs. On a write error, what was
/// written is restored. Returns the files changed, or the failing file and why.
fn write_all(
    policy: &PushPolicy,
    files: &[ManagedFile],
) -> std::result::Result<Vec<Written>, (String, anyhow::Error)> {
    let mut roots = Vec::new();
    let mut plans = Vec::with_capacity(files.len());
    for f in files {
        let fail = |e: anyhow::Error| (f.path.clone(), e);
        let target = target(policy, &mut roots, Path::new(&f.path)).map_err(fail)?;
        if !f.on_change.is_empty() && !policy.actions.contains_key(&f.on_change) {
            return Err(fail(anyhow!(
                "on_change action {:?} is not in the local [config.actions]: nothing applied",
                f.on_change
            )));
        }
        if f.mode > 0o7777 {
            return Err(fail(anyhow!("invalid mode {:o}", f.mode)));
        }
        if f.mode & 0o7000 != 0 && !policy.allow_special_modes {
            return Err(fail(anyhow!(
                "mode {:04o} has the setuid, setgid or sticky bit: refused unless the local [config] allow_special_modes = true",
                f.mode
            )));
        }
        let uid = if f.owner.is_empty() {
            None
        } else {
            Some(
                nix::unistd::User::from_name(&f.owner)
                    .ok()
                    .flatten()
                    .ok_or_else(|| fail(anyhow!("unknown user {:?}", f.owner)))?
                    .uid
                    .as_raw(),
            )
        };
        let gid = if f.group.is_empty() {
            None
        } else {
            Some(
                nix::unistd::Group::from_name(&f.group)
                    .ok()
                    .flatten()
                    .ok_or_else(|| fail(anyhow!("unknown group {:?}", f.group)))?
                    .gid
                    .as_raw(),
            )
        };
        // Walked now without creating anything: links, non-directories, too many missing
        // directories and unmanageable existing files refuse the revision before any write.
        let missing = target.root.missing(&target.dirs).map_err(fail)?;
        if missing > MAX_NEW_DIRS {
            return Err(fail(anyhow!(
                "more than {MAX_NEW_DIRS} missing parent directories"
            )));
        }
        if missing == 0 {
            let dir = target
                .dir(false, None, None, &mut Vec::new())
                .map_err(fail)?;
            dir.read_existing(&target.name, MAX_EXISTING)
                .map_err(fail)?;
        }
        plans.push(Plan {
            file: f,
            target,
            uid,
            gid,
        });
    }
    let mut written: Vec<Written> = Vec::new();
    for p in plans {
        let mut created_dirs = Vec::new();
        let result = (|| -> Result<Option<Existing>> {
            let dir = p.target.dir(true, p.uid, p.gid, &mut created_dirs)?;
            let previous = dir.read_existing(&p.target.name, MAX_EXISTING)?;
            if let Some(old) = &previous {
                if old.content == p.file.content {
                    // Same content: never rewritten; fix only owner and mode if they differ.
                    let want_uid = p.uid.unwrap_or(old.uid);
                    let want_gid = p.gid.unwrap_or(old.gid);
                    if old.mode != p.file.mode || want_uid != old.uid || want_gid != old.gid {
                        dir.set_attrs(&p.target.name, p.file.mode, Some(want_uid), Some(want_gid))?;
                    }
                    return Ok(previous);
                }
            }
            let (uid, gid) = match &previous {
                Some(old) => (p.uid.or(Some(old.uid)), p.gid.or(Some(old.gid))),
                None => (p.uid, p.gid),
            };
            dir.write_file(&p.target.name, &p.file.content, p.file.mode, uid, gid)?;
            Ok(previous)
        })();
        match result {
            Ok(Some(old)) if old.content == p.file.content => {}
            Ok(previous) => written.push(Written {
                target: p.target,
                on_change: p.file.on_change.clone(),
                previous,
                created_dirs,
            }),
            Err(e) => {
                p.target.root.remove_dirs(&created_dirs);
                let _ = rollback(&written);
                return Err((p.file.path.clone(), e));
            }
        }
    }
    Ok(written)
}

/// Puts back what `written` replaced, last first, through the same walk as the apply: files
/// that did not exist are removed, and so are the directories created for them.
fn rollback(written: &[Written]) -> Result<()> {
    let mut first_err = None;
    for w in written.iter().rev() {
        let t = &w.target;
        let r = t
            .dir(false, None, None, &mut Vec::new())
            .and_then(|dir| match &w.previous {
                Some(old) => dir.write_file(
                    &t.name,
                    &old.content,
                    old.mode,
                    Some(old.uid),
                    Some(old.gid),
                ),
                None => dir.remove_file(&t.name),
            });
        if let Err(e) = r {
            warn!(file = %t.path.display(), error = %format!("{e:#}"), "rollback of a file failed");
            first_err.get_or_insert(e);
        }
        t.root.remove_dirs(&w.created_dirs);
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("bastide-apply-{}", rand::random::<u64>()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn file(path: &Path, content: &str, on_change: &str) -> ManagedFile {
        ManagedFile {
            path: path.display().to_string(),
            content: content.as_bytes().to_vec(),
            owner: String::new(),
            group: String::new(),
            mode: 0o640,
            on_change: on_change.into(),
        }
    }

    #[test]
    fn refuses_outside_the_allow_list_and_symlink_escapes() {
        let d = tmpdir();
        let allowed_dir = d.join("etc");
        let outside = d.join("outside");
        fs::create_dir_all(&allowed_dir).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed_dir.join("link")).unwrap();
        let policy = PushPolicy {
            allow_dirs: vec![allowed_dir.clone()],
            ..PushPolicy::default()
        };
        let ok = [file(&allowed_dir.join("a.conf"), "x", "")];
        assert_eq!(write_all(&policy, &ok).unwrap().len(), 1);
        for bad in [
            outside.join("b.conf"),
            allowed_dir.join("link/c.conf"),
            PathBuf::from(format!("{}/../outside/d.conf", allowed_dir.display())),
        ] {
            let e = write_all(&policy, &[file(&bad, "x", "")]).unwrap_err();
            assert_eq!(e.0, bad.display().to_string());
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // Nothing is allowed by default.
        assert!(write_all(&PushPolicy::default(), &ok).is_err());
    }

    #[test]
    fn unchanged_content_is_not_rewritten_and_rollback_restores() {
        let d = tmpdir();
        let policy = PushPolicy {
            allow_dirs: vec![d.clone()],
            ..PushPolicy::default()
        };
        let a = d.join("a.conf");
        let b = d.join("b.conf");
        fs::write(&a, "old").unwrap();
        let w = write_all(&policy, &[file(&a, "new", ""), file(&b, "fresh", "")]).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(fs::metadata(&a).unwrap().mode() & 0o7777, 0o640);
        let ino = fs::metadata(&a).unwrap().ino();
        let again = write_all(&policy, &[file(&a, "new", ""), file(&b, "fresh", "")]).unwrap();
        assert!(again.is_empty());
        assert_eq!(fs::metadata(&a).unwrap().ino(), ino);
        rollback(&w).unwrap();
        assert_eq!(fs::read_to_string(&a).unwrap(), "old");
        assert!(!b.exists());
    }

    #[test]
    fn absent_config_table_allows_nothing_with_the_default_timeout() {
        let cfg: crate::config::AgentConfig = toml::from_str("").unwrap();
        assert!(cfg.config.allow_dirs.is_empty() && cfg.config.actions.is_empty());
        assert_eq!(cfg.config.action_timeout, Duration::from_secs(60));
        assert!(cfg.config.problems().is_empty());
        assert!(cfg.config.allow_log_sources.is_empty() && !cfg.config.allow_special_modes);
        assert_eq!(cfg.config.min_metrics_interval, Duration::from_secs(1));
        // The keys as the README and packaging/agent.toml show them.
        let cfg: crate::config::AgentConfig = toml::from_str(
            "[config]\nallow_dirs = [\"/etc/chrony\"]\naction_timeout = \"60s\"\nallow_log_sources = [\"/var/log/app/*.log\"]\nmin_metrics_interval = \"1s\"\nallow_special_modes = false\n[config.actions]\nchrony = \"/usr/bin/systemctl restart chrony\"\n",
        )
        .unwrap();
        assert!(cfg.config.problems().is_empty());
        let bad: crate::config::AgentConfig =
            toml::from_str("[config]\nallow_log_sources = [\"var/log/*\", \"/a/../b\"]\nmin_metrics_interval = \"0s\"\n")
                .unwrap();
        assert_eq!(
            bad.config.problems().len(),
            3,
            "{:?}",
            bad.config.problems()
        );
    }

    #[test]
    fn missing_parents_are_created_0755_only_under_an_allowed_dir_and_rolled_back() {
        let d = tmpdir();
        let allowed_dir = d.join("etc");
        let outside = d.join("outside");
        fs::create_dir_all(&allowed_dir).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed_dir.join("link")).unwrap();
        let policy = PushPolicy {
            allow_dirs: vec![allowed_dir.clone(), d.join("absent")],
            ..PushPolicy::default()
        };
        // Two files in the same new directories: created once, 0755 whatever the umask.
        let a = allowed_dir.join("app/conf.d/a.conf");
        let b = allowed_dir.join("app/conf.d/b.conf");
        let w = write_all(&policy, &[file(&a, "a", ""), file(&b, "b", "")]).unwrap();
        assert_eq!(fs::read_to_string(&a).unwrap(), "a");
        for dir in [allowed_dir.join("app"), allowed_dir.join("app/conf.d")] {
            assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
        }
        // A rollback removes the files and the directories the revision created.
        rollback(&w).unwrap();
        assert!(!allowed_dir.join("app").exists());

        // Never through a symlink leading out, nor above an allowed dir that does not exist.
        for bad in [
            allowed_dir.join("link/new/c.conf"),
            d.join("absent/sub/d.conf"),
            outside.join("new/e.conf"),
        ] {
            let e = write_all(&policy, &[file(&bad, "x", "")]).unwrap_err();
            assert_eq!(e.0, bad.display().to_string());
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!d.join("absent").exists());
        // A regular file in the way is an error, not a directory.
        fs::write(allowed_dir.join("plain"), "x").unwrap();
        let e = write_all(&policy, &[file(&allowed_dir.join("plain/f"), "x", "")]).unwrap_err();
        assert!(
            format!("{:#}", e.1).contains("not a directory"),
            "{:#}",
            e.1
        );
    }

    #[test]
    fn setuid_setgid_and_sticky_modes_are_refused_unless_allowed() {
        let d = tmpdir();
        let mut policy = PushPolicy {
            allow_dirs: vec![d.clone()],
            ..PushPolicy::default()
        };
        for mode in [0o4755, 0o2755, 0o1777, 0o6755] {
            let mut f = file(&d.join("prog"), "#!/bin/sh\n", "");
            f.mode = mode;
            let e = write_all(&policy, &[f]).unwrap_err();
            assert!(
                format!("{:#}", e.1).contains("allow_special_modes"),
                "{:#}",
                e.1
            );
            assert!(!d.join("prog").exists());
        }
        // Same content already there: the mode is not changed to a refused one either.
        fs::write(d.join("same"), "x").unwrap();
        let mut f = file(&d.join("same"), "x", "");
        f.mode = 0o4755;
        assert!(write_all(&policy, &[f.clone()]).is_err());
        assert_eq!(fs::metadata(d.join("same")).unwrap().mode() & 0o7000, 0);
        policy.allow_special_modes = true;
        write_all(&policy, &[f]).unwrap();
        assert_eq!(
            fs::metadata(d.join("same")).unwrap().mode() & 0o7777,
            0o4755
        );
    }

    #[test]
    fn links_in_the_middle_or_at_the_end_refuse_the_revision_and_write_nothing() {
        let d = tmpdir();
        let allowed_dir = d.join("etc");
        let outside = d.join("outside");
        fs::create_dir_all(allowed_dir.join("app")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("shadow"), "secret").unwrap();
        std::os::unix::fs::symlink(&outside, allowed_dir.join("app/sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("shadow"), allowed_dir.join("app/x.conf")).unwrap();
        let policy = PushPolicy {
            allow_dirs: vec![allowed_dir.clone()],
            ..PushPolicy::default()
        };
        let ok = file(&allowed_dir.join("ok.conf"), "fine", "");
        for bad in [
            allowed_dir.join("app/sub/new.conf"),
            allowed_dir.join("app/sub/deeper/new.conf"),
            allowed_dir.join("app/x.conf"),
        ] {
            let e = write_all(&policy, &[ok.clone(), file(&bad, "owned", "")]).unwrap_err();
            assert_eq!(e.0, bad.display().to_string());
            assert!(format!("{:#}", e.1).contains("symbolic link"), "{:#}", e.1);
        }
        // Nothing applied, nothing read or written outside.
        assert!(!allowed_dir.join("ok.conf").exists());
        assert_eq!(
            fs::read_to_string(outside.join("shadow")).unwrap(),
            "secret"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn pushed_settings_are_bounded_by_the_local_file() {
        let d = tmpdir();
        let policy = PushPolicy {
            min_metrics_interval: Duration::from_secs(10),
            allow_log_sources: vec![format!("{}/*.log", d.display())],
            ..PushPolicy::default()
        };
        let s = |secs: Option<u32>, paths: &[&str]| AgentSettings {
            metrics_interval_secs: secs,
            log_sources: paths
                .iter()
                .map(|p| LogSource {
                    path: p.to_string(),
                    multiline_start: String::new(),
                })
                .collect(),
        };
        let (what, why) = policy.refuse_settings(&s(Some(1), &[])).unwrap();
        assert_eq!(what, "agent.metrics_interval");
        assert!(why.contains("min_metrics_interval"), "{why}");
        assert!(policy.refuse_settings(&s(Some(0), &[])).is_none());
        assert!(policy.refuse_settings(&s(Some(10), &[])).is_none());
        let app = format!("{}/*.log", d.display());
        assert!(policy.refuse_settings(&s(None, &[&app])).is_none());
        let (what, why) = policy.refuse_settings(&s(None, &["/etc/shadow"])).unwrap();
        assert_eq!(what, "/etc/shadow");
        assert!(why.contains("allow_log_sources"), "{why}");
        // Nothing pushed is read by default.
        assert!(PushPolicy::default()
            .refuse_settings(&s(None, &[&app]))
            .is_some());
        let many: Vec<String> = (0..=MAX_PUSHED_LOG_SOURCES)
            .map(|i| format!("{}/{i}.log", d.display()))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(policy.refuse_settings(&s(None, &many)).is_some());
    }

    #[test]
    fn unknown_action_refuses_before_writing() {
        let d = tmpdir();
        let policy = PushPolicy {
            allow_dirs: vec![d.clone()],
            ..PushPolicy::default()
        };
        let e = write_all(&policy, &[file(&d.join("a"), "x", "reload")]).unwrap_err();
        assert!(format!("{:#}", e.1).contains("reload"));
        assert!(!d.join("a").exists());
    }
}
