//! The registry snapshot a plan needs, exported from a running bastion
//! (`bastide config snapshot --out FILE`) so that `bastide config plan --offline` can run
//! where there is no bastion: a CI job on the git server, against a checkout of a merge
//! request. It holds, per active agent, what its templates read (name, labels, facts) and
//! what the plan compares with (the files and settings it applied, see [`super::plan::basis`]),
//! and the bastion's side of rendering (its place in the tree, the `bastion` variable).
//! The files are rendered configuration, secrets included: the snapshot is written 0600.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bastide_proto::v1::{AgentSettings, ConfigPush as PushMsg, LogSource, ManagedFile};
use serde::{Deserialize, Serialize};

use super::plan::{self, Plan};
use super::render::Prepared;
use super::tree::{Position, Tree};
use super::{lock, render_many, ConfigPushHandle, Job};
use crate::registry::AgentInfo;

/// The `kind` of a snapshot file.
pub const KIND: &str = "bastide-config-snapshot";
/// Its format version (a reader refuses another).
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub kind: String,
    pub format: u32,
    /// Unix time of the export.
    pub exported_at: i64,
    pub bastion_version: String,
    /// Where the bastion sits in the tree (`project`: the project's directory name).
    pub cloud: String,
    pub site: String,
    pub instance: String,
    pub project: String,
    pub group_label: String,
    /// The template variable `bastion` (project, zone, address, services).
    pub bastion: serde_json::Value,
    /// The commit in force (git source).
    #[serde(default)]
    pub commit: Option<String>,
    pub agents: Vec<SnapAgent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapAgent {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The template variable `agent` (name, hostname, fqdn, addresses, labels, os).
    pub facts: serde_json::Value,
    /// Applied revision, the bastion's revision in force, the configuration state.
    pub applied: String,
    pub in_force: String,
    pub state: String,
    /// What `push` is (see `AgentPlan::basis`).
    pub basis: String,
    /// What the plan compares with (absent: the agent applied nothing).
    #[serde(default)]
    pub push: Option<SnapPush>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapPush {
    pub revision: String,
    pub files: Vec<SnapFile>,
    #[serde(default)]
    pub settings: Option<SnapSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapFile {
    pub path: String,
    /// Octal, e.g. `0644`.
    pub mode: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub on_change: String,
    /// The content as text, or (not UTF-8) as hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hex: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapSettings {
    #[serde(default)]
    pub metrics_interval_secs: Option<u32>,
    /// (path, multiline_start)
    #[serde(default)]
    pub log_sources: Vec<(String, String)>,
}

impl From<&PushMsg> for SnapPush {
    fn from(p: &PushMsg) -> Self {
        Self {
            revision: p.revision.clone(),
            files: p
                .files
                .iter()
                .map(|f| {
                    let (text, hex) = match std::str::from_utf8(&f.content) {
                        Ok(t) => (Some(t.to_string()), None),
                        Err(_) => (None, Some(hex::encode(&f.content))),
                    };
                    SnapFile {
                        path: f.path.clone(),
                        mode: format!("{:04o}", f.mode),
                        owner: f.owner.clone(),
                        group: f.group.clone(),
                        on_change: f.on_change.clone(),
                        text,
                        hex,
                    }
                })
                .collect(),
            settings: p.settings.as_ref().map(|s| SnapSettings {
                metrics_interval_secs: s.metrics_interval_secs,
                log_sources: s
                    .log_sources
                    .iter()
                    .map(|l| (l.path.clone(), l.multiline_start.clone()))
                    .collect(),
            }),
        }
    }
}

impl SnapPush {
    fn to_push(&self, agent: &str) -> Result<PushMsg> {
        let files = self
            .files
            .iter()
            .map(|f| {
                let content = match (&f.text, &f.hex) {
                    (Some(t), None) => t.as_bytes().to_vec(),
                    (None, Some(h)) => hex::decode(h)
                        .with_context(|| format!("agent {agent}: file {}: bad hex", f.path))?,
                    _ => bail!(
                        "agent {agent}: file {}: exactly one of text and hex is needed",
                        f.path
                    ),
                };
                let mode = u32::from_str_radix(&f.mode, 8)
                    .with_context(|| format!("agent {agent}: file {}: bad mode", f.path))?;
                Ok(ManagedFile {
                    path: f.path.clone(),
                    content,
                    owner: f.owner.clone(),
                    group: f.group.clone(),
                    mode,
                    on_change: f.on_change.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PushMsg {
            revision: self.revision.clone(),
            files,
            settings: self.settings.as_ref().map(|s| AgentSettings {
                metrics_interval_secs: s.metrics_interval_secs,
                log_sources: s
                    .log_sources
                    .iter()
                    .map(|(path, m)| LogSource {
                        path: path.clone(),
                        multiline_start: m.clone(),
                    })
                    .collect(),
            }),
        })
    }
}

impl ConfigPushHandle {
    /// `bastide config snapshot`: every active agent as a plan sees it. Blocking.
    pub fn snapshot(&self) -> Snapshot {
        let i = &self.inner;
        let snap = i.registry.snapshot();
        let states = i.registry.config_states();
        let agents = lock(&i.agents);
        let list = snap
            .active()
            .map(|a| {
                let st = states.get(&a.name).cloned().unwrap_or_default();
                let with = self.against(agents.get(&a.name), st.applied.clone());
                SnapAgent {
                    name: a.name.clone(),
                    labels: a.labels.clone(),
                    facts: self.facts(a),
                    applied: with.applied,
                    in_force: with.in_force,
                    state: st.summary().to_string(),
                    basis: with.basis,
                    push: with.push.as_deref().map(SnapPush::from),
                }
            })
            .collect();
        Snapshot {
            kind: KIND.into(),
            format: FORMAT,
            exported_at: crate::unix_now(),
            bastion_version: crate::VERSION.into(),
            cloud: i.pos.cloud.clone(),
            site: i.pos.site.clone(),
            instance: i.pos.instance.clone(),
            project: i.pos.project.clone(),
            group_label: i.cfg.group_label.clone(),
            bastion: i.registry.cluster().template_vars(&i.bastion),
            commit: self.commit(),
            agents: list,
        }
    }
}

impl Snapshot {
    /// Reads a snapshot file written by `bastide config snapshot`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Snapshot = serde_json::from_slice(&text).with_context(|| {
            format!(
                "{}: not a registry snapshot of `bastide config snapshot`",
                path.display()
            )
        })?;
        if s.kind != KIND || s.format != FORMAT {
            bail!(
                "{}: a {:?} snapshot of format {}, this bastide reads {KIND:?} of format {FORMAT}",
                path.display(),
                s.kind,
                s.format
            );
        }
        Ok(s)
    }

    /// `bastide config plan --offline`: what the tree at `dir` would change for each agent of
    /// the snapshot (or the one named), with no bastion. Blocking.
    pub fn plan(&self, dir: &Path, agent: Option<&str>) -> Plan {
        let mut out = Plan {
            source: format!("dir {}", dir.display()),
            ..Default::default()
        };
        let pos = Position {
            cloud: self.cloud.clone(),
            site: self.site.clone(),
            instance: self.instance.clone(),
            project: self.project.clone(),
        };
        let prepared = match Tree::load(dir, &pos, &self.group_label)
            .and_then(|t| Prepared::new(t, &self.bastion))
        {
            Ok(p) => p,
            Err(errors) => {
                out.tree_errors = errors;
                return out;
            }
        };
        let names: Option<HashSet<&str>> = agent.map(|a| HashSet::from([a]));
        let mut against = HashMap::new();
        let mut jobs: Vec<Job> = Vec::new();
        for a in &self.agents {
            if names.as_ref().is_some_and(|n| !n.contains(a.name.as_str())) {
                continue;
            }
            let push = match a.push.as_ref().map(|p| p.to_push(&a.name)).transpose() {
                Ok(p) => p.map(Arc::new),
                Err(e) => {
                    out.tree_errors.push(format!("snapshot: {e:#}"));
                    continue;
                }
            };
            against.insert(
                a.name.clone(),
                plan::Against {
                    applied: a.applied.clone(),
                    in_force: a.in_force.clone(),
                    basis: a.basis.clone(),
                    push,
                },
            );
            // What rendering reads of an agent: its name, labels (the group file) and facts.
            let info = AgentInfo {
                name: a.name.clone(),
                labels: a.labels.clone(),
                ..Default::default()
            };
            jobs.push((Arc::new(info), a.facts.clone(), 0));
        }
        if !out.tree_errors.is_empty() {
            return out;
        }
        if let (Some(a), true) = (agent, jobs.is_empty()) {
            out.tree_errors.push(format!(
                "unknown or inactive agent {a:?} (not in the snapshot)"
            ));
            return out;
        }
        let mut rows: Vec<plan::AgentPlan> = render_many(&prepared, jobs)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_survive_the_snapshot_format() {
        let p = PushMsg {
            revision: "r1".into(),
            files: vec![
                ManagedFile {
                    path: "/etc/a".into(),
                    content: b"text\n".to_vec(),
                    owner: "root".into(),
                    group: "adm".into(),
                    mode: 0o640,
                    on_change: "reload".into(),
                },
                ManagedFile {
                    path: "/etc/b".into(),
                    content: vec![0xff, 0, 1],
                    mode: 0o600,
                    ..Default::default()
                },
            ],
            settings: Some(AgentSettings {
                metrics_interval_secs: Some(7),
                log_sources: vec![LogSource {
                    path: "/var/log/x".into(),
                    multiline_start: "^\\d".into(),
                }],
            }),
        };
        let s = SnapPush::from(&p);
        assert_eq!(s.files[0].mode, "0640");
        assert_eq!(s.files[1].hex.as_deref(), Some("ff0001"));
        let back: SnapPush = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.to_push("a").unwrap(), p);
    }
}
