//! The environment tree from a git repository (`[config_push] git = { ... }`): the bastion
//! fetches the branch itself with Debian's `git` program, on an interval and when the git
//! server's push webhook calls, checks the new head (signatures against an OpenSSH
//! allowed-signers file, no rewind of the branch), exports that commit into a fresh
//! directory and hands it to the tree loader. The commit id becomes the tree's revision.
//! A refused commit (unsigned, unknown signer, rewound branch, render error) leaves the last
//! good one in force.
//!
//! `git` runs with a fixed environment: no system or user configuration, a private HOME, no
//! terminal prompt, credentials only from the files configured here. The program rather than
//! a library: its signature checking is the one operators already use (`git verify-commit`
//! with `gpg.format=ssh`), and the bastion's dependency tree stays free of a git stack.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::ConfigPushHandle;
use crate::metrics::names;

/// `[config_push] git = { ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// `https://...`, `ssh://...`, `git@host:path`, `git://...` or `file://...`.
    pub url: String,
    #[serde(default = "default_branch")]
    pub branch: String,
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// SSH deploy key (mode 0600): used with `ssh_known_hosts`, never the user's agent.
    #[serde(default)]
    pub ssh_key: Option<PathBuf>,
    /// The server's pinned host key(s), in known_hosts format (required with `ssh_key`).
    #[serde(default)]
    pub ssh_known_hosts: Option<PathBuf>,
    /// CA bundle the HTTPS server's certificate must chain to (`http.sslCAInfo`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// OpenSSH allowed-signers file: when set, only commits signed by one of its keys apply.
    #[serde(default)]
    pub allowed_signers: Option<PathBuf>,
    /// Which commits must be signed: the new head, or every commit since the last applied.
    #[serde(default)]
    pub verify: Verify,
    /// Accept a head that does not descend from the last applied commit.
    #[serde(default)]
    pub allow_force_push: bool,
    /// Longest a fetch or export may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// `POST /hooks/config` from the git server's push event.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    #[default]
    Head,
    All,
}

/// The push webhook's listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    /// The shared secret (mode 0600): GitLab's `X-Gitlab-Token`, or the key of Gitea's
    /// (and GitHub's) HMAC-SHA256 body signature.
    pub secret_file: PathBuf,
    /// Client networks allowed to call (default: loopback only).
    #[serde(default = "default_allow")]
    pub allow: Vec<IpNet>,
    /// Connections served at once; beyond, a new one is closed at once (logged, counted).
    #[serde(default = "default_hook_connections")]
    pub max_connections: usize,
    /// Connections at once from one client address: a client holding idle connections
    /// cannot take every slot from the git server.
    #[serde(default = "default_hook_per_client")]
    pub max_connections_per_client: usize,
    /// Longest a connection may take to send its request (headers and body) and be
    /// answered; it is then closed (one request per connection: no keep-alive).
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_hook_connections() -> usize {
    64
}
fn default_hook_per_client() -> usize {
    8
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_branch() -> String {
    "main".into()
}
fn default_poll() -> Duration {
    Duration::from_secs(60)
}
fn default_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_allow() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

impl GitConfig {
    /// Problems as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |k: &str, r: String| out.push((format!("config_push.git.{k}"), r));
        if self.url.is_empty() || self.url.starts_with('-') || self.url.contains(['\n', '\0']) {
            bad("url", "must be a repository URL".into());
        }
        if self.url.starts_with("ext::") || self.url.contains("::") {
            bad(
                "url",
                "remote helpers (\"ext::\" and the like) are refused".into(),
            );
        }
        if !valid_branch(&self.branch) {
            bad(
                "branch",
                format!("{:?} is not a plain branch name", self.branch),
            );
        }
        if self.poll_interval < Duration::from_secs(1) {
            bad("poll_interval", "must be at least 1s".into());
        }
        if self.timeout < Duration::from_secs(1) {
            bad("timeout", "must be at least 1s".into());
        }
        match (&self.ssh_key, &self.ssh_known_hosts) {
            (Some(k), Some(h)) => {
                if let Err(e) = crate::fsutil::check_secret_file(k) {
                    bad("ssh_key", format!("{e:#}"));
                }
                if !h.is_file() {
                    bad("ssh_known_hosts", format!("{} is not a file", h.display()));
                }
            }
            (Some(_), None) => bad(
                "ssh_known_hosts",
                "required with ssh_key: the server's host key is pinned, never learned".into(),
            ),
            (None, Some(_)) => bad("ssh_key", "ssh_known_hosts needs ssh_key".into()),
            (None, None) => {}
        }
        for (k, f) in [
            ("ca_file", &self.ca_file),
            ("allowed_signers", &self.allowed_signers),
        ] {
            if let Some(f) = f {
                if !f.is_file() {
                    bad(k, format!("{} is not a file", f.display()));
                }
            }
        }
        if self.allowed_signers.is_none() && self.verify == Verify::All {
            bad("verify", "needs allowed_signers".into());
        }
        if let Some(w) = &self.webhook {
            if let Err(e) = crate::fsutil::check_secret_file(&w.secret_file) {
                bad("webhook.secret_file", format!("{e:#}"));
            } else if read_secret(&w.secret_file).is_err() {
                bad(
                    "webhook.secret_file",
                    format!("{} is empty or unreadable", w.secret_file.display()),
                );
            }
            if w.allow.is_empty() {
                bad("webhook.allow", "empty: no git server could call".into());
            }
            if w.max_connections == 0 || w.max_connections_per_client == 0 {
                bad(
                    "webhook.max_connections",
                    "max_connections and max_connections_per_client must be at least 1".into(),
                );
            }
            if w.timeout.is_zero() || w.timeout > Duration::from_secs(300) {
                bad("webhook.timeout", "must be over 0s and at most 5m".into());
            }
        }
        out
    }
}

fn valid_branch(b: &str) -> bool {
    !b.is_empty()
        && !b.starts_with(['-', '/', '.'])
        && !b.ends_with(['/', '.'])
        && !b.contains("..")
        && !b.contains("//")
        && !b.ends_with(".lock")
        && b.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn read_secret(f: &Path) -> Result<Vec<u8>> {
    let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
    let s = s.trim();
    if s.is_empty() {
        bail!("{} is empty", f.display());
    }
    Ok(s.as_bytes().to_vec())
}

/// Why a commit was not applied (the `reason` label of the refusals counter).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    pub commit: String,
    /// `unsigned`, `unknown_signer`, `bad_signature`, `force_push` or `render`.
    pub reason: String,
    /// The signer's principal (as the allowed-signers file names it) or key fingerprint.
    #[serde(default)]
    pub signer: String,
    pub detail: String,
    pub at: i64,
}

/// What `bastide status` shows of the source.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceStatus {
    pub url: String,
    pub branch: String,
    /// The commit in force (empty: none yet).
    pub commit: String,
    pub applied_at: i64,
    /// Head of the branch at the last fetch.
    pub fetched: String,
    pub fetched_at: i64,
    /// The last fetch's failure (empty once a fetch succeeds).
    pub fetch_error: String,
    /// The last commit refused, while the branch's head is still that commit.
    pub refused: Option<Refusal>,
    pub refused_total: u64,
}

/// The fetched repository and what was applied from it.
pub struct GitSource {
    cfg: GitConfig,
    /// `<state_dir>/config-git`
    root: PathBuf,
    status: Mutex<SourceStatus>,
    /// Wakes the poll loop (webhook).
    pub trigger: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ref the branch is fetched into.
const FETCHED: &str = "refs/bastide/fetched";

impl GitSource {
    pub fn new(cfg: GitConfig, state_dir: &Path) -> Self {
        let status = SourceStatus {
            url: redact(&cfg.url),
            branch: cfg.branch.clone(),
            ..Default::default()
        };
        Self {
            cfg,
            root: state_dir.join("config-git"),
            status: Mutex::new(status),
            trigger: Arc::new(Notify::new()),
        }
    }

    pub fn config(&self) -> &GitConfig {
        &self.cfg
    }

    fn repo(&self) -> PathBuf {
        self.root.join("repo.git")
    }
    fn trees(&self) -> PathBuf {
        self.root.join("trees")
    }
    fn applied_file(&self) -> PathBuf {
        self.root.join("applied")
    }

    pub fn status(&self) -> SourceStatus {
        lock(&self.status).clone()
    }

    /// The commit in force, if any.
    pub fn commit(&self) -> Option<String> {
        let c = lock(&self.status).commit.clone();
        (!c.is_empty()).then_some(c)
    }

    /// `git` with the fixed environment.
    fn git(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("git");
        c.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.root.join("home"))
            .env("LC_ALL", "C")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("GIT_DIR", self.repo())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let (Some(key), Some(kh)) = (&self.cfg.ssh_key, &self.cfg.ssh_known_hosts) {
            c.env(
                "GIT_SSH_COMMAND",
                format!(
                    "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o IdentityAgent=none -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null",
                    shell_quote(&key.display().to_string()),
                    shell_quote(&kh.display().to_string())
                ),
            );
        }
        // Local transports are the operator's business (tests, a mirror on disk); the `ext`
        // helper would run commands.
        c.args(["-c", "protocol.ext.allow=never"]);
        if let Some(ca) = &self.cfg.ca_file {
            c.arg("-c").arg(format!("http.sslCAInfo={}", ca.display()));
        }
        if let Some(s) = &self.cfg.allowed_signers {
            c.args(["-c", "gpg.format=ssh"])
                .arg("-c")
                .arg(format!("gpg.ssh.allowedSignersFile={}", s.display()));
        }
        c
    }

    /// Runs `git args`; its stdout, or an error with its stderr.
    async fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args).await?;
        if !out.status.success() {
            bail!(
                "git {}: {}",
                args.first().unwrap_or(&""),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn output(&self, args: &[&str]) -> Result<std::process::Output> {
        let fut = self.git().args(args).output();
        match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(r) => r.context("running git (install Debian's git package)"),
            Err(_) => bail!("git {} timed out", args.first().unwrap_or(&"")),
        }
    }

    /// Creates the private repository and home on first use.
    async fn init(&self) -> Result<()> {
        crate::fsutil::ensure_dir(&self.root, 0o700)?;
        crate::fsutil::ensure_dir(&self.root.join("home"), 0o700)?;
        crate::fsutil::ensure_dir(&self.trees(), 0o700)?;
        if !self.repo().join("HEAD").exists() {
            let _ = std::fs::remove_dir_all(self.repo());
            self.run(&["init", "--quiet", "--bare"]).await?;
        }
        Ok(())
    }

    /// Fetches the branch; its head.
    async fn fetch(&self) -> Result<String> {
        let spec = format!("+refs/heads/{}:{FETCHED}", self.cfg.branch);
        self.run(&[
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
            &self.cfg.url,
            &spec,
        ])
        .await
        .map_err(|e| anyhow::anyhow!("{}", redact(&format!("{e:#}"))))?;
        let head = self.run(&["rev-parse", "--verify", FETCHED]).await?;
        Ok(head.trim().to_string())
    }

    /// Whether `head` may be applied after `last`.
    async fn check(&self, last: Option<&str>, head: &str) -> Result<(), Refusal> {
        let refusal = |reason: &str, signer: &str, detail: String| Refusal {
            commit: head.to_string(),
            reason: reason.into(),
            signer: signer.into(),
            detail,
            at: crate::unix_now(),
        };
        if let Some(last) = last.filter(|l| *l != head) {
            if !self.cfg.allow_force_push {
                let ok = self
                    .output(&["merge-base", "--is-ancestor", last, head])
                    .await
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if !ok {
                    return Err(refusal(
                        "force_push",
                        "",
                        format!("{head} does not descend from the applied commit {last} (the branch was rewound; allow_force_push = true accepts it)"),
                    ));
                }
            }
        }
        if self.cfg.allowed_signers.is_none() {
            return Ok(());
        }
        let commits = match (self.cfg.verify, last) {
            (Verify::All, Some(last)) if last != head => {
                let range = format!("{last}..{head}");
                self.run(&["rev-list", &range])
                    .await
                    .map_err(|e| refusal("bad_signature", "", format!("{e:#}")))?
                    .lines()
                    .map(str::to_string)
                    .collect()
            }
            _ => vec![head.to_string()],
        };
        for c in commits {
            let out = self
                .run(&["log", "-1", "--format=%G?%x00%GS%x00%GK", &c])
                .await
                .map_err(|e| refusal("bad_signature", "", format!("{e:#}")))?;
            let mut parts = out.trim_end().split('\0');
            let code = parts.next().unwrap_or("");
            let principal = parts.next().unwrap_or("");
            let key = parts.next().unwrap_or("");
            let signer = if principal.is_empty() { key } else { principal };
            let which = if c == head {
                "the head commit".to_string()
            } else {
                format!("commit {c} (since the applied one)")
            };
            match code {
                "G" => {}
                "N" => {
                    return Err(refusal("unsigned", "", format!("{which} is not signed")));
                }
                "U" | "E" => {
                    return Err(refusal(
                        "unknown_signer",
                        signer,
                        format!("{which} is signed by a key not in allowed_signers"),
                    ))
                }
                other => {
                    return Err(refusal(
                        "bad_signature",
                        signer,
                        format!("{which} has a bad or expired signature (git: {other})"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Exports `commit`'s tree into a fresh directory (`git archive | tar -x`).
    async fn export(&self, commit: &str) -> Result<PathBuf> {
        let dest = self.trees().join(commit);
        if dest.is_dir() {
            return Ok(dest);
        }
        let tmp = self.trees().join(format!(".tmp-{commit}"));
        self.export_into(commit, &tmp).await?;
        std::fs::rename(&tmp, &dest).context("moving the exported tree in place")?;
        Ok(dest)
    }

    /// A commit to plan: `rev` (resolved in the fetched repository, else fetched from the
    /// remote by that name, e.g. `refs/merge-requests/7/head`) or the branch's head, exported
    /// into a directory of its own (the caller removes it); with why it would be refused.
    pub async fn plan_source(
        &self,
        rev: Option<&str>,
    ) -> Result<(PathBuf, String, Option<String>)> {
        self.init().await?;
        if let Some(r) = rev {
            if r.is_empty() || r.starts_with('-') || r.contains(['\n', '\0', ' ', ':']) {
                bail!("{r:?} is not a revision");
            }
        }
        let fetched = self.fetch().await;
        let commit = match rev {
            // A fetch that failed (the poll loop's running at the same moment, the server
            // down): the head fetched last.
            None => match fetched {
                Ok(c) => c,
                Err(e) => match self.run(&["rev-parse", "--verify", FETCHED]).await {
                    Ok(c) => c.trim().to_string(),
                    Err(_) => return Err(e),
                },
            },
            Some(r) => {
                let spec = format!("{r}^{{commit}}");
                match self.run(&["rev-parse", "--verify", "--quiet", &spec]).await {
                    Ok(c) => c.trim().to_string(),
                    Err(_) => {
                        let refspec = format!("+{r}:refs/bastide/plan");
                        self.run(&[
                            "fetch",
                            "--quiet",
                            "--no-tags",
                            "--no-write-fetch-head",
                            "--",
                            &self.cfg.url,
                            &refspec,
                        ])
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "{r}: not in the repository: {}",
                                redact(&format!("{e:#}"))
                            )
                        })?;
                        self.run(&["rev-parse", "--verify", "refs/bastide/plan^{commit}"])
                            .await?
                            .trim()
                            .to_string()
                    }
                }
            }
        };
        let dest = self
            .root
            .join("plan")
            .join(format!("{commit}-{:016x}", rand::random::<u64>()));
        crate::fsutil::ensure_dir(&self.root.join("plan"), 0o700)?;
        self.export_into(&commit, &dest).await?;
        let last = self.commit();
        let refusal = self.check(last.as_deref(), &commit).await.err().map(|r| {
            let signer = if r.signer.is_empty() {
                String::new()
            } else {
                format!(" (signer {})", r.signer)
            };
            format!("{}{signer}: {}", r.reason, r.detail)
        });
        Ok((dest, commit, refusal))
    }

    async fn export_into(&self, commit: &str, tmp: &Path) -> Result<()> {
        let _ = std::fs::remove_dir_all(tmp);
        crate::fsutil::ensure_dir(tmp, 0o700)?;
        let mut archive = self
            .git()
            .args(["archive", "--format=tar", commit])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running git archive")?;
        let stdout: Stdio = archive
            .stdout
            .take()
            .context("git archive output")?
            .try_into()
            .context("git archive output")?;
        let tar = tokio::process::Command::new("tar")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .args(["-x", "--no-same-owner", "--no-same-permissions", "-C"])
            .arg(tmp)
            .stdin(stdout)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let both = async { tokio::join!(archive.wait_with_output(), tar) };
        let (a, t) = tokio::time::timeout(self.cfg.timeout, both)
            .await
            .context("exporting the commit timed out")?;
        let (a, t) = (a?, t?);
        if !a.status.success() {
            bail!("git archive: {}", String::from_utf8_lossy(&a.stderr).trim());
        }
        if !t.status.success() {
            bail!("tar: {}", String::from_utf8_lossy(&t.stderr).trim());
        }
        Ok(())
    }

    /// Removes exported trees but `keep`.
    fn prune(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(self.trees()) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name() != keep {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// A rollout of `aborted` was aborted and `commit` is in force again: recorded, and the
    /// aborted head is not applied again until the branch moves.
    pub fn restored(&self, aborted: &str, commit: Option<String>) {
        if let Some(c) = &commit {
            if let Err(e) = crate::fsutil::write_atomic(
                &self.applied_file(),
                format!("{c}\n").as_bytes(),
                0o600,
            ) {
                warn!(error = %format!("{e:#}"), "recording the applied commit failed");
            }
        }
        let mut s = lock(&self.status);
        s.commit = commit.unwrap_or_default();
        s.applied_at = crate::unix_now();
        s.refused = Some(Refusal {
            commit: aborted.to_string(),
            reason: "aborted".into(),
            signer: String::new(),
            detail: "its rollout was aborted by the admin; a new commit on the branch is needed"
                .into(),
            at: crate::unix_now(),
        });
    }

    fn refuse(&self, r: Refusal) {
        metrics::counter!(names::CONFIG_SOURCE_REFUSED, "reason" => r.reason.clone()).increment(1);
        error!(
            commit = %r.commit,
            reason = %r.reason,
            signer = %r.signer,
            detail = %r.detail,
            "configuration commit refused: the last good one stays"
        );
        let mut s = lock(&self.status);
        s.refused_total += 1;
        s.refused = Some(r);
    }

    /// Fetches and applies the branch's head if it is new and acceptable.
    async fn sync(&self, handle: &ConfigPushHandle) {
        let head = match self.fetch().await {
            Ok(h) => h,
            Err(e) => {
                metrics::counter!(names::CONFIG_SOURCE_FETCH_FAILURES).increment(1);
                warn!(url = %redact(&self.cfg.url), error = %format!("{e:#}"), "fetching the configuration repository failed");
                let mut s = lock(&self.status);
                s.fetch_error = format!("{e:#}");
                return;
            }
        };
        let last = {
            let mut s = lock(&self.status);
            s.fetched = head.clone();
            s.fetched_at = crate::unix_now();
            s.fetch_error.clear();
            if s.commit == head {
                s.refused = None;
                return;
            }
            // Refused once: not again (nor logged and counted again) until the head moves.
            if s.refused.as_ref().is_some_and(|r| r.commit == head) {
                return;
            }
            (!s.commit.is_empty()).then(|| s.commit.clone())
        };
        if let Err(r) = self.check(last.as_deref(), &head).await {
            self.refuse(r);
            return;
        }
        self.apply(handle, &head).await;
    }

    /// Exports and loads `commit`; records it as applied if its tree renders.
    async fn apply(&self, handle: &ConfigPushHandle, commit: &str) -> bool {
        let dir = match self.export(commit).await {
            Ok(d) => d,
            Err(e) => {
                error!(commit = %commit, error = %format!("{e:#}"), "exporting the configuration commit failed");
                return false;
            }
        };
        let h = handle.clone();
        let (d, c) = (dir.clone(), commit.to_string());
        let summary = match tokio::task::spawn_blocking(move || h.load_source(d, Some(c))).await {
            Ok(s) => s,
            Err(_) => return false,
        };
        if !summary.errors.is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
            self.refuse(Refusal {
                commit: commit.to_string(),
                reason: "render".into(),
                signer: String::new(),
                detail: summary
                    .errors
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
                at: crate::unix_now(),
            });
            return false;
        }
        if let Err(e) = crate::fsutil::write_atomic(
            &self.applied_file(),
            format!("{commit}\n").as_bytes(),
            0o600,
        ) {
            warn!(error = %format!("{e:#}"), "recording the applied commit failed");
        }
        {
            let mut s = lock(&self.status);
            s.commit = commit.to_string();
            s.applied_at = crate::unix_now();
            s.refused = None;
        }
        self.prune(commit);
        info!(commit = %commit, agents = summary.agents, changed = summary.changed, "configuration commit applied");
        true
    }
}

/// Runs the source: the commit applied before a restart first (same revisions, nothing
/// pushed again), then a fetch at every poll interval and webhook call.
pub async fn run(handle: ConfigPushHandle, git: Arc<GitSource>, shutdown: CancellationToken) {
    if let Err(e) = git.init().await {
        error!(error = %format!("{e:#}"), "preparing the configuration repository failed");
        lock(&git.status).fetch_error = format!("{e:#}");
    }
    if let Some(c) = std::fs::read_to_string(git.applied_file())
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| s.len() >= 40 && s.chars().all(|c| c.is_ascii_hexdigit()))
    {
        git.apply(&handle, &c).await;
    }
    info!(url = %redact(&git.cfg.url), branch = %git.cfg.branch, "following the configuration repository");
    loop {
        git.sync(&handle).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(git.cfg.poll_interval) => {}
            _ = git.trigger.notified() => {}
        }
    }
}

/// The URL without its password, for logs and status.
fn redact(s: &str) -> String {
    // scheme://user:password@host
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest.find(['/', ' ', '\'']).unwrap_or(rest.len());
        match rest[..end].rfind('@') {
            Some(at) => {
                let user = &rest[..at];
                let user = user.split(':').next().unwrap_or("");
                out.push_str(user);
                if rest[..at].contains(':') {
                    out.push_str(":***");
                }
                out.push_str(&rest[at..end]);
            }
            None => out.push_str(&rest[..end]),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`, as the `hmac` crate computes it.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    // HMAC takes keys of any length: a longer one is hashed, a shorter one padded.
    let Ok(mut mac) = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        unreachable!("HMAC accepts keys of every length")
    };
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

#[derive(Clone)]
struct Hook {
    secret: Arc<[u8]>,
    allow: Arc<[IpNet]>,
    branch: Arc<str>,
    trigger: Arc<Notify>,
}

/// Whether the request carries the shared secret: GitLab's token, or a body signature
/// (Gitea's and Gogs' hex HMAC-SHA256, GitHub's `sha256=` form).
fn authentic(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(t) = h("x-gitlab-token") {
        return crate::registry::ct_eq(t.as_bytes(), secret);
    }
    let sig = h("x-gitea-signature")
        .or_else(|| h("x-gogs-signature"))
        .or_else(|| h("x-hub-signature-256").map(|s| s.strip_prefix("sha256=").unwrap_or(s)));
    match sig {
        Some(sig) => {
            let want = hex::encode(hmac_sha256(secret, body));
            crate::registry::ct_eq(sig.to_ascii_lowercase().as_bytes(), want.as_bytes())
        }
        None => false,
    }
}

async fn hook(
    State(s): State<Hook>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ip = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(std::net::IpAddr::V6(v6)),
        v4 => v4,
    };
    if !s.allow.iter().any(|n| n.contains(&ip)) {
        metrics::counter!(names::CONFIG_WEBHOOK_CALLS, "result" => "network").increment(1);
        warn!(%peer, "configuration webhook: client network not allowed");
        return (StatusCode::FORBIDDEN, "403 Forbidden\n").into_response();
    }
    if !authentic(&s.secret, &headers, &body) {
        metrics::counter!(names::CONFIG_WEBHOOK_CALLS, "result" => "unauthorized").increment(1);
        warn!(%peer, "configuration webhook refused: bad or missing secret");
        return (
            StatusCode::UNAUTHORIZED,
            "401 Unauthorized: bad or missing secret\n",
        )
            .into_response();
    }
    // A push to another branch: nothing to fetch.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(r) = v.get("ref").and_then(|r| r.as_str()) {
            if r != format!("refs/heads/{}", s.branch) {
                metrics::counter!(names::CONFIG_WEBHOOK_CALLS, "result" => "ignored").increment(1);
                return (StatusCode::ACCEPTED, "ignored: another branch\n").into_response();
            }
        }
    }
    metrics::counter!(names::CONFIG_WEBHOOK_CALLS, "result" => "fetch").increment(1);
    info!(%peer, "configuration webhook: fetching");
    s.trigger.notify_one();
    (StatusCode::ACCEPTED, "fetch scheduled\n").into_response()
}

/// Connection slots of the webhook: `max_connections` in all, `max_connections_per_client`
/// per client address.
struct Slots {
    total: Arc<tokio::sync::Semaphore>,
    per_client: Mutex<std::collections::HashMap<IpAddr, usize>>,
    max_per_client: usize,
}

/// One connection's slot, given back when it is dropped.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let mut m = lock(&self.per_client);
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_client {
            return None;
        }
        *n += 1;
        Some(Slot {
            _permit: permit,
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = lock(&self.slots.per_client);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (allow-lists are written in IPv4).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Serves `POST /hooks/config` on `listener` until `shutdown`. Bounded like the other
/// listeners: the allow-list is checked before anything is read or a slot taken, then
/// `max_connections` (and per client address `max_connections_per_client`) connections at
/// once, each closed after one request or `timeout`, whichever comes first: idle or slow
/// connections cannot hold the listener longer than that, nor one client take every slot.
pub async fn serve_webhook(
    cfg: WebhookConfig,
    branch: String,
    trigger: Arc<Notify>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let secret = read_secret(&cfg.secret_file)?;
    let allow: Arc<[IpNet]> = cfg.allow.clone().into();
    let state = Hook {
        secret: secret.into(),
        allow: allow.clone(),
        branch: branch.into(),
        trigger,
    };
    let app = Router::new()
        .route("/hooks/config", post(hook))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state);
    let slots = Arc::new(Slots {
        total: Arc::new(tokio::sync::Semaphore::new(cfg.max_connections)),
        per_client: Mutex::new(std::collections::HashMap::new()),
        max_per_client: cfg.max_connections_per_client,
    });
    // Refusals are logged at most every 10 s (with how many), not once per connection.
    let mut refused: u64 = 0;
    let mut last_log: Option<std::time::Instant> = None;
    info!(listen = %listener.local_addr()?, max_connections = cfg.max_connections, "configuration webhook listening");
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = crate::listeners::accept(&listener, "configuration webhook") => c,
        };
        let ip = canonical(peer.ip());
        if !allow.iter().any(|n| n.contains(&ip)) {
            metrics::counter!(names::CONFIG_WEBHOOK_CALLS, "result" => "network").increment(1);
            warn!(%peer, "configuration webhook: client network not allowed: closing");
            continue;
        }
        let Some(slot) = slots.take(ip) else {
            metrics::counter!(names::CONFIG_WEBHOOK_CALLS, "result" => "too_many_connections")
                .increment(1);
            refused += 1;
            if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                warn!(%peer, refused, max_connections = cfg.max_connections, max_connections_per_client = cfg.max_connections_per_client, "configuration webhook: too many connections: closing");
                last_log = Some(std::time::Instant::now());
                refused = 0;
            }
            continue;
        };
        let svc = TowerToHyperService::new(app.clone().layer(axum::Extension(ConnectInfo(peer))));
        let (shutdown, timeout) = (shutdown.clone(), cfg.timeout);
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
            builder.http1().keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                r = tokio::time::timeout(timeout, conn) => match r {
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "configuration webhook: connection error"),
                    Err(_) => tracing::debug!(%peer, "configuration webhook: connection timed out: closed"),
                    Ok(Ok(())) => {}
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn webhook_secrets() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut h = HeaderMap::new();
        assert!(!authentic(b"s3cret", &h, body));
        h.insert("x-gitlab-token", "s3cret".parse().unwrap());
        assert!(authentic(b"s3cret", &h, body));
        assert!(!authentic(b"other", &h, body));
        let mut h = HeaderMap::new();
        let sig = hex::encode(hmac_sha256(b"s3cret", body));
        h.insert("x-gitea-signature", sig.parse().unwrap());
        assert!(authentic(b"s3cret", &h, body));
        assert!(!authentic(b"s3cret", &h, b"tampered"));
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            format!("sha256={sig}").parse().unwrap(),
        );
        assert!(authentic(b"s3cret", &h, body));
    }

    #[test]
    fn urls_lose_their_password_and_branches_are_plain() {
        assert_eq!(
            redact("fetch https://bot:tok@git.example/env.git failed"),
            "fetch https://bot:***@git.example/env.git failed"
        );
        assert_eq!(redact("ssh://git@h/env"), "ssh://git@h/env");
        assert_eq!(redact("git@h:env"), "git@h:env");
        assert!(valid_branch("main") && valid_branch("env/prod"));
        for b in ["", "-x", "a..b", "a b", "x.lock", "/a", "a/"] {
            assert!(!valid_branch(b), "{b}");
        }
    }
}
