//! `bastide config plan`: what a candidate tree (a commit, a directory) would change for each
//! agent, without pushing: per agent the unified diff of every managed file and the settings
//! that change, against what the agent applied (see [`basis`]), then a summary. Exit codes a
//! merge-request job can gate on: 0 nothing to change, 2 changes, 1 errors.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bastide_proto::v1::{AgentSettings, ConfigPush as PushMsg, ManagedFile};
use serde::{Deserialize, Serialize};

/// Lines of context around each change.
const CONTEXT: usize = 3;
/// Beyond this many lines differing between two versions of a file (after the common start
/// and end), the diff is summarised rather than computed (its cost is their product).
const MAX_DIFF_LINES: usize = 2_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    /// `commit <id>` or `dir <path>`.
    pub source: String,
    /// Why the source would refuse this commit (signature, rewind), if it would.
    #[serde(default)]
    pub refusal: Option<String>,
    /// Errors of the tree itself (TOML, templates): nothing renders.
    #[serde(default)]
    pub tree_errors: Vec<String>,
    pub agents: Vec<AgentPlan>,
    pub summary: PlanSummary,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlanSummary {
    pub agents: usize,
    pub changed: usize,
    pub files_added: usize,
    pub files_changed: usize,
    pub files_removed: usize,
    pub files_unchanged: usize,
    pub errors: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentPlan {
    pub agent: String,
    /// `changed`, `unchanged` or `error`.
    pub status: String,
    /// The agent's applied revision, and the revision the bastion has in force for it.
    pub applied: String,
    pub in_force: String,
    /// What the candidate is compared with: `applied` (the files of the agent's applied
    /// revision), `nothing applied` (every file is new to the agent), or `in force` (the
    /// applied revision's files are not known here: the bastion restarted since the agent
    /// applied it, and the bastion's revision differs).
    #[serde(default)]
    pub basis: String,
    /// The candidate's revision (empty on error).
    pub candidate: String,
    pub files: Vec<FilePlan>,
    /// `key: old -> new` for each setting that changes.
    pub settings: Vec<String>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FilePlan {
    pub path: String,
    /// `added`, `changed`, `removed` (no longer managed: left in place) or `unchanged`.
    pub change: String,
    /// Mode, owner, group or on_change changes, as `key: old -> new`.
    #[serde(default)]
    pub meta: Vec<String>,
    /// Unified diff of the content (empty when it is the same).
    #[serde(default)]
    pub diff: String,
}

impl Plan {
    /// 0 nothing to change, 2 changes, 1 errors.
    pub fn exit_code(&self) -> i32 {
        if !self.tree_errors.is_empty() || self.summary.errors > 0 {
            1
        } else if self.summary.changed > 0 {
            2
        } else {
            0
        }
    }

    /// Adds one agent's plan and counts it.
    pub fn push_agent(&mut self, a: AgentPlan) {
        let s = &mut self.summary;
        s.agents += 1;
        match a.status.as_str() {
            "changed" => s.changed += 1,
            "error" => s.errors += 1,
            _ => {}
        }
        for f in &a.files {
            match f.change.as_str() {
                "added" => s.files_added += 1,
                "changed" => s.files_changed += 1,
                "removed" => s.files_removed += 1,
                _ => s.files_unchanged += 1,
            }
        }
        self.agents.push(a);
    }
}

/// What the plan compares an agent's candidate with: the push the agent applied when the
/// bastion knows it, and the basis's name (see [`AgentPlan::basis`]). The bastion keeps the
/// push an agent last ACKed while it runs; after a restart only the revision is known, and
/// the push in force (same revision, same content) stands for it when the revisions match.
pub fn basis<'a>(
    applied: &str,
    in_force: Option<&'a PushMsg>,
    applied_push: Option<&'a PushMsg>,
) -> (Option<&'a PushMsg>, &'static str) {
    if applied.is_empty() {
        return (None, BASIS_NONE);
    }
    if let Some(p) = applied_push.filter(|p| p.revision == applied) {
        return (Some(p), BASIS_APPLIED);
    }
    match in_force {
        Some(p) if p.revision == applied => (Some(p), BASIS_APPLIED),
        other => (other, BASIS_IN_FORCE),
    }
}

pub const BASIS_APPLIED: &str = "applied";
pub const BASIS_NONE: &str = "nothing applied";
pub const BASIS_IN_FORCE: &str = "in force";

/// What a candidate is compared with for one agent.
#[derive(Debug, Clone, Default)]
pub struct Against {
    /// The agent's applied revision and the bastion's revision in force for it.
    pub applied: String,
    pub in_force: String,
    /// See [`AgentPlan::basis`].
    pub basis: String,
    pub push: Option<std::sync::Arc<PushMsg>>,
}

impl Against {
    /// From what the bastion has for an agent (see [`basis`]).
    pub fn new(
        applied: String,
        in_force: Option<&std::sync::Arc<PushMsg>>,
        applied_push: Option<&std::sync::Arc<PushMsg>>,
    ) -> Self {
        let (p, name) = basis(
            &applied,
            in_force.map(|p| p.as_ref()),
            applied_push.map(|p| p.as_ref()),
        );
        // The same Arc as the one given: no copy of the files.
        let push = p.and_then(|p| {
            [in_force, applied_push]
                .into_iter()
                .flatten()
                .find(|x| std::ptr::eq(x.as_ref(), p))
                .cloned()
        });
        Self {
            in_force: in_force.map(|p| p.revision.clone()).unwrap_or_default(),
            applied,
            basis: name.to_string(),
            push,
        }
    }
}

/// One agent's row: its candidate (or render errors) against what it has.
pub fn row(agent: &str, candidate: Result<PushMsg, Vec<String>>, against: Against) -> AgentPlan {
    let mut r = match candidate {
        Ok(push) => compare(agent, against.push.as_deref(), &push),
        Err(errors) => AgentPlan {
            agent: agent.to_string(),
            status: "error".into(),
            errors,
            ..Default::default()
        },
    };
    r.applied = against.applied;
    r.in_force = against.in_force;
    r.basis = against.basis;
    r
}

/// Compares the candidate push with the agent's basis (`None`: the agent has none).
pub fn compare(agent: &str, old: Option<&PushMsg>, new: &PushMsg) -> AgentPlan {
    let empty = PushMsg::default();
    let old_push = old.unwrap_or(&empty);
    let olds: BTreeMap<&str, &ManagedFile> = old_push
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let news: BTreeMap<&str, &ManagedFile> =
        new.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut files = Vec::new();
    for (path, n) in &news {
        let fp = match olds.get(path) {
            None => FilePlan {
                path: path.to_string(),
                change: "added".into(),
                meta: meta(None, n),
                diff: unified(path, b"", &n.content),
            },
            Some(o) => {
                let m = meta(Some(o), n);
                let diff = if o.content == n.content {
                    String::new()
                } else {
                    unified(path, &o.content, &n.content)
                };
                let change = if m.is_empty() && diff.is_empty() {
                    "unchanged"
                } else {
                    "changed"
                };
                FilePlan {
                    path: path.to_string(),
                    change: change.into(),
                    meta: m,
                    diff,
                }
            }
        };
        files.push(fp);
    }
    for path in olds.keys().filter(|p| !news.contains_key(*p)) {
        files.push(FilePlan {
            path: path.to_string(),
            change: "removed".into(),
            meta: Vec::new(),
            diff: String::new(),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let settings = settings_diff(
        old_push
            .settings
            .as_ref()
            .unwrap_or(&AgentSettings::default()),
        new.settings.as_ref().unwrap_or(&AgentSettings::default()),
    );
    let changed = !settings.is_empty() || files.iter().any(|f| f.change != "unchanged");
    AgentPlan {
        agent: agent.to_string(),
        status: if changed { "changed" } else { "unchanged" }.into(),
        candidate: new.revision.clone(),
        files,
        settings,
        ..Default::default()
    }
}

fn meta(old: Option<&ManagedFile>, new: &ManagedFile) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |k: &str, o: String, n: String| {
        if o != n {
            let show = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            out.push(format!("{k}: {} -> {}", show(&o), show(&n)));
        }
    };
    let o = |f: fn(&ManagedFile) -> String| old.map(f).unwrap_or_default();
    cmp(
        "mode",
        o(|f| format!("{:04o}", f.mode)),
        format!("{:04o}", new.mode),
    );
    cmp("owner", o(|f| f.owner.clone()), new.owner.clone());
    cmp("group", o(|f| f.group.clone()), new.group.clone());
    cmp(
        "on_change",
        o(|f| f.on_change.clone()),
        new.on_change.clone(),
    );
    out
}

fn settings_diff(old: &AgentSettings, new: &AgentSettings) -> Vec<String> {
    let mut out = Vec::new();
    if old.metrics_interval_secs != new.metrics_interval_secs {
        let s = |v: Option<u32>| v.map(|s| format!("{s}s")).unwrap_or_else(|| "local".into());
        out.push(format!(
            "agent.metrics_interval: {} -> {}",
            s(old.metrics_interval_secs),
            s(new.metrics_interval_secs)
        ));
    }
    if old.log_sources != new.log_sources {
        let s = |v: &AgentSettings| {
            if v.log_sources.is_empty() {
                "local".to_string()
            } else {
                v.log_sources
                    .iter()
                    .map(|l| l.path.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        out.push(format!("agent.log_sources: {} -> {}", s(old), s(new)));
    }
    out
}

/// A unified diff (`--- a/path`, `+++ b/path`, hunks with 3 lines of context).
pub fn unified(path: &str, old: &[u8], new: &[u8]) -> String {
    if old == new {
        return String::new();
    }
    let (o, n) = (String::from_utf8_lossy(old), String::from_utf8_lossy(new));
    let a: Vec<&str> = if o.is_empty() {
        Vec::new()
    } else {
        o.split_inclusive('\n').collect()
    };
    let b: Vec<&str> = if n.is_empty() {
        Vec::new()
    } else {
        n.split_inclusive('\n').collect()
    };
    let mut out = format!(
        "--- {}\n+++ b{path}\n",
        if old.is_empty() {
            "/dev/null".to_string()
        } else {
            format!("a{path}")
        }
    );
    // Common start and end, then the edit script of the middle.
    let pre = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suf = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    if am.len().saturating_mul(bm.len()) > MAX_DIFF_LINES * MAX_DIFF_LINES / 4 {
        let _ = writeln!(
            out,
            "@@ too large to diff: {} lines -> {} lines @@",
            a.len(),
            b.len()
        );
        return out;
    }
    // Ops over the whole files: ' ' kept, '-' removed, '+' added.
    let mut ops: Vec<(char, &str)> = a[..pre].iter().map(|l| (' ', *l)).collect();
    ops.extend(lcs_ops(am, bm));
    ops.extend(a[a.len() - suf..].iter().map(|l| (' ', *l)));
    // Hunks: runs of changes with CONTEXT lines around, merged when close.
    let changes: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| *k != ' ')
        .map(|(i, _)| i)
        .collect();
    let mut i = 0;
    while i < changes.len() {
        let start = changes[i].saturating_sub(CONTEXT);
        let mut end = changes[i];
        while i + 1 < changes.len() && changes[i + 1] <= end + 2 * CONTEXT + 1 {
            i += 1;
            end = changes[i];
        }
        let end = (end + CONTEXT + 1).min(ops.len());
        // Line numbers at the hunk's start.
        let (mut la, mut lb) = (1, 1);
        for (k, _) in &ops[..start] {
            match k {
                '-' => la += 1,
                '+' => lb += 1,
                _ => {
                    la += 1;
                    lb += 1;
                }
            }
        }
        let ca = ops[start..end].iter().filter(|(k, _)| *k != '+').count();
        let cb = ops[start..end].iter().filter(|(k, _)| *k != '-').count();
        let _ = writeln!(
            out,
            "@@ -{},{ca} +{},{cb} @@",
            if ca == 0 { la - 1 } else { la },
            if cb == 0 { lb - 1 } else { lb }
        );
        for (k, l) in &ops[start..end] {
            out.push(*k);
            out.push_str(l);
            if !l.ends_with('\n') {
                out.push_str("\n\\ No newline at end of file\n");
            }
        }
        i += 1;
    }
    out
}

/// The edit script from `a` to `b` by longest common subsequence.
fn lcs_ops<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<(char, &'a str)> {
    let (n, m) = (a.len(), b.len());
    // len[i][j]: LCS of a[i..] and b[j..].
    let mut len = vec![0u32; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            len[at(i, j)] = if a[i] == b[j] {
                len[at(i + 1, j + 1)] + 1
            } else {
                len[at(i + 1, j)].max(len[at(i, j + 1)])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(n + m);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || len[at(i, j + 1)] >= len[at(i + 1, j)]) {
            ops.push(('+', b[j]));
            j += 1;
        } else {
            ops.push(('-', a[i]));
            i += 1;
        }
    }
    // Removals before additions within a change, as diff(1) prints them.
    let mut k = 0;
    while k < ops.len() {
        if ops[k].0 == ' ' {
            k += 1;
            continue;
        }
        let s = k;
        while k < ops.len() && ops[k].0 != ' ' {
            k += 1;
        }
        ops[s..k].sort_by_key(|(c, _)| *c != '-');
    }
    ops
}

/// The plan as text: per changed or failing agent its files and settings, then the summary.
pub fn print(p: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# plan of {}", p.source);
    if let Some(r) = &p.refusal {
        let _ = writeln!(out, "# WARNING: the bastion would refuse this commit: {r}");
    }
    for e in &p.tree_errors {
        let _ = writeln!(out, "error: {e}");
    }
    for a in &p.agents {
        match a.status.as_str() {
            "unchanged" => continue,
            "error" => {
                let _ = writeln!(out, "\n## agent {}: ERROR", a.agent);
                for e in &a.errors {
                    let _ = writeln!(out, "  {e}");
                }
                continue;
            }
            _ => {}
        }
        let short = |s: &str| {
            if s.is_empty() {
                "none".to_string()
            } else {
                s.chars().take(12).collect()
            }
        };
        let _ = writeln!(
            out,
            "\n## agent {} (applied {}, in force {}, candidate {})",
            a.agent,
            short(&a.applied),
            short(&a.in_force),
            short(&a.candidate)
        );
        match a.basis.as_str() {
            BASIS_NONE => {
                let _ = writeln!(
                    out,
                    "(the agent has applied nothing: every file is new to it)"
                );
            }
            BASIS_IN_FORCE => {
                let _ = writeln!(
                    out,
                    "(compared with the revision in force: this bastion does not hold the files of the applied revision, as after a restart)"
                );
            }
            _ => {}
        }
        for f in a.files.iter().filter(|f| f.change != "unchanged") {
            let _ = writeln!(out, "{} {}", f.change, f.path);
            for m in &f.meta {
                let _ = writeln!(out, "  {m}");
            }
            if f.change == "removed" {
                let _ = writeln!(
                    out,
                    "  (no longer managed: the agent leaves the file in place)"
                );
            }
            out.push_str(&f.diff);
        }
        for s in &a.settings {
            let _ = writeln!(out, "setting {s}");
        }
    }
    let s = &p.summary;
    let _ = writeln!(
        out,
        "\n{} agent(s): {} changed, {} error(s); files: {} added, {} changed, {} removed, {} unchanged",
        s.agents, s.changed, s.errors + p.tree_errors.len(), s.files_added, s.files_changed, s.files_removed, s.files_unchanged
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_diff_has_hunks_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n";
        let new = "a\nB\nc\nd\ne\nf\ng\nh\ni\nj\nk\n";
        let d = unified("/etc/x", old.as_bytes(), new.as_bytes());
        assert_eq!(
            d,
            "--- a/etc/x\n+++ b/etc/x\n@@ -1,5 +1,5 @@\n a\n-b\n+B\n c\n d\n e\n@@ -8,3 +8,4 @@\n h\n i\n j\n+k\n"
        );
        let d = unified("/etc/y", b"", b"one\n");
        assert_eq!(d, "--- /dev/null\n+++ b/etc/y\n@@ -0,0 +1,1 @@\n+one\n");
        assert_eq!(unified("/x", b"same\n", b"same\n"), "");
    }

    #[test]
    fn diff_output_is_accepted_by_patch() {
        // The diff applies with patch(1) semantics: check by replaying it.
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\n";
        let new = "1\n2\nx\n4\n5\n6\n7\n8\n9\n10\ny\n12\n13\n";
        let d = unified("/f", old.as_bytes(), new.as_bytes());
        let mut out: Vec<&str> = Vec::new();
        let lines: Vec<&str> = old.split_inclusive('\n').collect();
        let mut pos = 0;
        for l in d.split_inclusive('\n').skip(2) {
            if let Some(h) = l.strip_prefix("@@ -") {
                let start: usize = h.split(',').next().unwrap().parse().unwrap();
                while pos < start - 1 {
                    out.push(lines[pos]);
                    pos += 1;
                }
            } else if let Some(t) = l.strip_prefix('+') {
                out.push(t);
            } else if l.starts_with('-') {
                pos += 1;
            } else if let Some(t) = l.strip_prefix(' ') {
                out.push(t);
                pos += 1;
            }
        }
        out.extend(&lines[pos..]);
        assert_eq!(out.concat(), new);
    }

    /// An agent behind the bastion (a NACK, offline, not reached by a rollout) is compared
    /// with what it applied; after a restart (its push unknown), with the push in force.
    #[test]
    fn the_basis_is_what_the_agent_applied() {
        let p = |r: &str| PushMsg {
            revision: r.into(),
            ..Default::default()
        };
        let (r1, r2) = (p("r1"), p("r2"));
        let rev = |b: (Option<&PushMsg>, &str)| (b.0.map(|p| p.revision.clone()), b.1.to_string());
        assert_eq!(
            rev(basis("r1", Some(&r2), Some(&r1))),
            (Some("r1".into()), BASIS_APPLIED.into())
        );
        assert_eq!(
            rev(basis("r2", Some(&r2), Some(&r1))),
            (Some("r2".into()), BASIS_APPLIED.into())
        );
        assert_eq!(
            rev(basis("r1", Some(&r2), None)),
            (Some("r2".into()), BASIS_IN_FORCE.into())
        );
        assert_eq!(rev(basis("", Some(&r2), None)), (None, BASIS_NONE.into()));
    }

    #[test]
    fn compare_counts_added_changed_removed_and_settings() {
        let f = |p: &str, c: &str, mode| ManagedFile {
            path: p.into(),
            content: c.as_bytes().to_vec(),
            mode,
            ..Default::default()
        };
        let old = PushMsg {
            revision: "r1".into(),
            files: vec![
                f("/a", "x\n", 0o644),
                f("/b", "y\n", 0o644),
                f("/c", "z\n", 0o644),
            ],
            settings: Some(AgentSettings {
                metrics_interval_secs: Some(15),
                ..Default::default()
            }),
        };
        let new = PushMsg {
            revision: "r2".into(),
            files: vec![
                f("/a", "x\n", 0o600),
                f("/b", "y\n", 0o644),
                f("/d", "w\n", 0o644),
            ],
            settings: Some(AgentSettings::default()),
        };
        let a = compare("web", Some(&old), &new);
        assert_eq!(a.status, "changed");
        let ch: Vec<_> = a
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.change.as_str()))
            .collect();
        assert_eq!(
            ch,
            [
                ("/a", "changed"),
                ("/b", "unchanged"),
                ("/c", "removed"),
                ("/d", "added")
            ]
        );
        assert_eq!(a.files[0].meta, ["mode: 0644 -> 0600"]);
        assert_eq!(a.settings, ["agent.metrics_interval: 15s -> local"]);
        let mut p = Plan::default();
        p.push_agent(a);
        assert_eq!(p.exit_code(), 2);
        let same = compare("web", Some(&new), &new);
        assert_eq!(same.status, "unchanged");
        let mut p = Plan::default();
        p.push_agent(same);
        assert_eq!(p.exit_code(), 0);
    }
}
