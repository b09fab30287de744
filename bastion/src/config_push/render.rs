//! Rendering one agent's desired state: its merged layers, its registry facts and the
//! bastion's own addresses go into minijinja templates (undefined variables are errors), and
//! the result is a `ConfigPush` whose revision is a hash of its whole content.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bastide_proto::v1::{AgentSettings, ConfigPush, LogSource, ManagedFile};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior, Value as JValue};
use prost::Message;
use sha2::{Digest, Sha256};
use toml::{Table, Value};

use super::tree::{merge, merge_into, normal_absolute, Merged, Tree};
use crate::registry::AgentInfo;

/// Bounds on what one agent is sent (the agent's gRPC limit is 4 MiB per message).
pub const MAX_FILES: usize = 256;
pub const MAX_TOTAL: usize = 3 * 1024 * 1024;
pub const MAX_LOG_SOURCES: usize = 64;
/// minijinja fuel for one file's render: about one unit per instruction and per 64 bytes
/// created, so it bounds both the time a template runs (nested loops over `range`) and the
/// memory it allocates (`"x" * 10**8`, output). 200 000 units is some 12 MiB (room for a
/// 3 MiB file) and a fraction of a second; a real configuration template needs a few
/// thousand. (The `config_tree` fuzzer found 1 000 000 too generous: `'x' * 60000000`
/// fitted and took 5 s to render twice on a loaded machine.)
pub const FUEL: u64 = 200_000;

/// The compiled templates of a tree: the files under `templates/` by their name, and every
/// inline `content` of a level file, compiled once per load rather than once per agent.
pub struct Templates {
    env: Environment<'static>,
    /// Inline content source -> its template's name.
    inline: HashMap<String, String>,
}

impl Templates {
    /// Compiles every template and inline content; every syntax error is reported.
    pub fn compile(tree: &Tree) -> Result<Self, Vec<String>> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        // Config files are not HTML.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        let mut errors = Vec::new();
        match SyntaxConfig::builder().keep_trailing_newline(true).build() {
            Ok(syntax) => env.set_syntax(syntax),
            Err(e) => errors.push(format!("template syntax: {e}")),
        }
        for (name, src) in &tree.templates {
            if let Err(e) = env.add_template_owned(name.clone(), src.clone()) {
                errors.push(format!("templates/{name}: {}", describe(&e)));
            }
        }
        let mut inline = HashMap::new();
        let levels = tree
            .common
            .iter()
            .chain(tree.groups.values())
            .chain(tree.hosts.values());
        for l in levels {
            let Some(Value::Table(decl)) = l.doc.get("files") else {
                continue;
            };
            for (id, spec) in decl {
                let Some(src) = spec.get("content").and_then(Value::as_str) else {
                    continue;
                };
                if inline.contains_key(src) {
                    continue;
                }
                let mut name = format!("{}: {}", l.file, super::tree::join("files", id));
                while tree.templates.contains_key(&name) {
                    name.push('~');
                }
                match env.add_template_owned(name.clone(), src.to_string()) {
                    Ok(()) => {
                        inline.insert(src.to_string(), name);
                    }
                    Err(e) => errors.push(format!(
                        "{}: {}: content: {}",
                        l.file,
                        super::tree::join("files", id),
                        describe(&e)
                    )),
                }
            }
        }
        if errors.is_empty() {
            Ok(Self { env, inline })
        } else {
            Err(errors)
        }
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// What one agent gets, plus how it was derived (for `config render`).
#[derive(Debug, Clone)]
pub struct Rendered {
    pub push: ConfigPush,
    pub merged: Arc<Merged>,
}

/// The registry facts of an agent, as the template variable `agent`.
pub fn agent_facts(a: &AgentInfo, zone: Option<&str>) -> serde_json::Value {
    let fqdn = zone
        .map(|z| format!("{}.{}", a.name, z.trim_end_matches('.')))
        .unwrap_or_default();
    serde_json::json!({
        "name": a.name,
        "hostname": a.hostname,
        "fqdn": fqdn,
        "addresses": a.addresses.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        "labels": a.labels,
        "os": a.os,
    })
}

/// Merged layers shared by agents, and the template variables built from them.
struct Base {
    merged: Arc<Merged>,
    vars: BTreeMap<String, JValue>,
    /// Problems of the merged variables themselves (reserved names).
    errors: Vec<String>,
}

impl Base {
    fn new(merged: Merged) -> Self {
        let mut errors = Vec::new();
        let mut vars = BTreeMap::new();
        if let Some(Value::Table(t)) = merged.doc.get("vars") {
            for reserved in ["agent", "bastion"] {
                if t.contains_key(reserved) {
                    errors.push(format!(
                        "vars.{reserved}: reserved for the {reserved}'s facts"
                    ));
                }
            }
            vars = t
                .iter()
                .map(|(k, v)| (k.clone(), JValue::from(Serde(v))))
                .collect();
        }
        Self {
            merged: Arc::new(merged),
            vars,
            errors,
        }
    }
}

/// Everything a loaded tree gives agents alike, computed once per change rather than once
/// per agent: the compiled templates, the common levels (global .. project) merged once and
/// then once more per group file, the template variables built from those, and the bastion's
/// variables. Only an agent with a host file merges (one more layer) for itself.
pub struct Prepared {
    pub tree: Tree,
    templates: Templates,
    bastion: JValue,
    /// Agents without a host file share the base of their group file (`None`: no group file).
    bases: HashMap<Option<String>, Arc<Base>>,
    /// Fingerprint of the common levels, the templates and the bastion's variables.
    common_fp: u64,
    /// The commit the tree was exported from (git source): it leads every revision, so
    /// that each agent's applied revision names the commit it follows.
    pub source: Option<String>,
}

impl Prepared {
    /// Compiles and merges what is shared; every template error is reported.
    pub fn new(tree: Tree, bastion: &serde_json::Value) -> Result<Self, Vec<String>> {
        let templates = Templates::compile(&tree)?;
        let common = merge(&tree.common.iter().collect::<Vec<_>>());
        let mut bases = HashMap::with_capacity(tree.groups.len() + 1);
        for (g, layer) in &tree.groups {
            let mut m = common.clone();
            merge_into(&mut m, layer);
            bases.insert(Some(g.clone()), Arc::new(Base::new(m)));
        }
        bases.insert(None, Arc::new(Base::new(common)));
        let mut h = DefaultHasher::new();
        for l in &tree.common {
            (&l.file, l.fingerprint).hash(&mut h);
        }
        tree.templates.hash(&mut h);
        tree.group_label.hash(&mut h);
        bastion.to_string().hash(&mut h);
        Ok(Self {
            templates,
            bastion: JValue::from(Serde(bastion)),
            bases,
            common_fp: h.finish(),
            tree,
            source: None,
        })
    }

    fn group_of<'a>(&'a self, agent: &'a AgentInfo) -> Option<&'a String> {
        agent
            .labels
            .get(&self.tree.group_label)
            .filter(|g| self.tree.groups.contains_key(*g))
    }

    /// A fingerprint of every input of an agent's render but its facts: the same
    /// fingerprint and facts render the same push, so the render can be skipped.
    pub fn inputs(&self, agent: &AgentInfo) -> u64 {
        let mut h = DefaultHasher::new();
        self.common_fp.hash(&mut h);
        self.source.hash(&mut h);
        self.group_of(agent)
            .and_then(|g| self.tree.groups.get(g))
            .map(|l| (&l.file, l.fingerprint))
            .hash(&mut h);
        self.tree
            .hosts
            .get(&agent.name)
            .map(|l| (&l.file, l.fingerprint))
            .hash(&mut h);
        h.finish()
    }

    /// Renders one agent.
    pub fn render(
        &self,
        agent: &AgentInfo,
        facts: &serde_json::Value,
    ) -> Result<Rendered, Vec<String>> {
        let shared = self
            .bases
            .get(&self.group_of(agent).cloned())
            .or_else(|| self.bases.get(&None))
            .cloned()
            .ok_or_else(|| vec![format!("agent {}: no merged layers", agent.name)])?;
        let base = match self.tree.hosts.get(&agent.name) {
            Some(host) => {
                let mut m = (*shared.merged).clone();
                merge_into(&mut m, host);
                Arc::new(Base::new(m))
            }
            None => shared,
        };
        let mut r = render_base(&self.templates, &base, agent, facts, &self.bastion)?;
        if let Some(c) = &self.source {
            // "<commit>-<content hash>": the content hash still tells two renders of one
            // commit apart (an agent's facts changed).
            r.push.revision = format!("{c}-{}", r.push.revision);
        }
        Ok(r)
    }
}

fn render_base(
    templates: &Templates,
    base: &Base,
    agent: &AgentInfo,
    facts: &serde_json::Value,
    bastion: &JValue,
) -> Result<Rendered, Vec<String>> {
    let merged = &base.merged;
    let mut errors = base.errors.clone();
    let mut ctx = base.vars.clone();
    ctx.insert("agent".into(), JValue::from(Serde(facts)));
    ctx.insert("bastion".into(), bastion.clone());
    let ctx = JValue::from(ctx);

    let origin = |key: &str| -> String {
        merged
            .provenance
            .range(key.to_string()..)
            .find(|(k, _)| k.starts_with(key))
            .map(|(_, o)| o.file.clone())
            .unwrap_or_else(|| "?".into())
    };
    let mut files = Vec::new();
    let mut total = 0usize;
    match merged.doc.get("files").and_then(Value::as_table) {
        // Checked before rendering anything: each render may take up to FUEL.
        Some(decl) if decl.len() > MAX_FILES => {
            errors.push(format!(
                "{} files declared for {}, more than {MAX_FILES}",
                decl.len(),
                agent.name
            ));
        }
        Some(decl) => {
            for (id, spec) in decl {
                let key = super::tree::join("files", id);
                let at = format!("{} ({key})", origin(&key));
                match file(spec, &ctx, templates, &at) {
                    Ok(f) => {
                        total += f.content.len();
                        if files.iter().any(|o: &ManagedFile| o.path == f.path) {
                            errors.push(format!("{at}: path {} is declared twice", f.path));
                        }
                        files.push(f);
                    }
                    Err(e) => errors.push(e),
                }
                // Stop at once rather than hold every oversized file in memory.
                if total > MAX_TOTAL {
                    errors.push(format!(
                        "files for {} total more than {MAX_TOTAL} bytes (at {at})",
                        agent.name
                    ));
                    break;
                }
            }
        }
        None => {}
    }
    let settings = match merged.doc.get("agent") {
        Some(Value::Table(t)) => settings(t, &origin("agent")).unwrap_or_else(|e| {
            errors.extend(e);
            AgentSettings::default()
        }),
        _ => AgentSettings::default(),
    };
    if !errors.is_empty() {
        return Err(errors
            .into_iter()
            .map(|e| format!("agent {}: {e}", agent.name))
            .collect());
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut push = ConfigPush {
        revision: String::new(),
        files,
        settings: Some(settings),
    };
    push.revision = revision(&push);
    Ok(Rendered {
        push,
        merged: base.merged.clone(),
    })
}

/// A hash of the push's content (prost encodes our messages deterministically: no maps).
pub fn revision(push: &ConfigPush) -> String {
    let mut p = push.clone();
    p.revision.clear();
    let digest = Sha256::digest(p.encode_to_vec());
    hex::encode(&digest[..8])
}

fn string(t: &Table, key: &str, at: &str) -> Result<Option<String>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{at}: {key} must be a string")),
    }
}

fn file(
    spec: &Value,
    ctx: &JValue,
    templates: &Templates,
    at: &str,
) -> Result<ManagedFile, String> {
    let Value::Table(t) = spec else {
        return Err(format!("{at}: must be a table"));
    };
    for k in t.keys() {
        if !matches!(
            k.as_str(),
            "path" | "template" | "content" | "owner" | "group" | "mode" | "on_change"
        ) {
            return Err(format!(
                "{at}: unknown key {k:?} (path, template, content, owner, group, mode, on_change)"
            ));
        }
    }
    let path = string(t, "path", at)?.ok_or_else(|| format!("{at}: path is required"))?;
    if !normal_absolute(&path) {
        return Err(format!(
            "{at}: path {path:?} must be absolute, without . or .. components"
        ));
    }
    let content = match (string(t, "template", at)?, string(t, "content", at)?) {
        (Some(name), None) => {
            let tpl = templates
                .env
                .get_template(&name)
                .map_err(|_| format!("{at}: template {name:?} not found under templates/"))?;
            tpl.render(ctx)
                .map_err(|e| format!("{at}: templates/{name}: {}", describe(&e)))?
        }
        (None, Some(inline)) => match templates.inline.get(&inline) {
            Some(name) => templates.env.get_template(name).and_then(|t| t.render(ctx)),
            // Compiled with the tree; only a tree built by hand lacks it.
            None => templates.env.render_str(&inline, ctx),
        }
        .map_err(|e| format!("{at}: content: {}", describe(&e)))?,
        _ => {
            return Err(format!(
                "{at}: exactly one of template and content is required"
            ))
        }
    };
    let mode = match t.get("mode") {
        None => 0o644,
        Some(Value::Integer(i)) if (0..=0o7777).contains(i) => *i as u32,
        Some(Value::String(s)) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| format!("{at}: mode {s:?} is not an octal mode"))?,
        Some(_) => return Err(format!("{at}: mode must be an octal string like \"0644\"")),
    };
    let name_ok = |s: &str| {
        s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let owner = string(t, "owner", at)?.unwrap_or_default();
    let group = string(t, "group", at)?.unwrap_or_default();
    let on_change = string(t, "on_change", at)?.unwrap_or_default();
    for (k, v) in [
        ("owner", &owner),
        ("group", &group),
        ("on_change", &on_change),
    ] {
        if !name_ok(v) {
            return Err(format!("{at}: {k} {v:?} is not a valid name"));
        }
    }
    Ok(ManagedFile {
        path,
        content: content.into_bytes(),
        owner,
        group,
        mode,
        on_change,
    })
}

fn settings(t: &Table, at: &str) -> Result<AgentSettings, Vec<String>> {
    let mut errors = Vec::new();
    let mut s = AgentSettings::default();
    for (k, v) in t {
        match (k.as_str(), v) {
            ("metrics_interval", Value::String(d)) => match humantime::parse_duration(d) {
                Ok(d) if d.is_zero() || d >= Duration::from_secs(1) => {
                    s.metrics_interval_secs = Some(d.as_secs().min(u32::MAX as u64) as u32)
                }
                _ => errors.push(format!(
                    "{at}: agent.metrics_interval {d:?} must be a duration of at least 1s, or 0s (off)"
                )),
            },
            ("logs", Value::Table(logs)) => {
                for (k, v) in logs {
                    match (k.as_str(), v) {
                        ("sources", Value::Array(list)) => {
                            log_sources(list, at, &mut s.log_sources, &mut errors)
                        }
                        _ => errors.push(format!(
                            "{at}: agent.logs.{k}: cannot be pushed (only agent.logs.sources; the buffer and batching are the agent's own [logs] settings)"
                        )),
                    }
                }
            }
            _ => errors.push(format!(
                "{at}: agent.{k}: unknown or mistyped setting (metrics_interval = \"15s\", [[agent.logs.sources]]: the keys of the agent's own file)"
            )),
        }
    }
    if errors.is_empty() {
        Ok(s)
    } else {
        Err(errors)
    }
}

/// Keys of a pushed log source: a file source of the agent's own `[[logs.sources]]`, with
/// the keys the push carries.
const PUSHED_SOURCE_KEYS: &[&str] = &["path", "multiline_start"];

/// `[[agent.logs.sources]]`: the same shape as the agent's own `[[logs.sources]]`, file
/// sources only (journal sources are the agent's own choice).
fn log_sources(list: &[Value], at: &str, out: &mut Vec<LogSource>, errors: &mut Vec<String>) {
    if list.len() > MAX_LOG_SOURCES {
        errors.push(format!("{at}: more than {MAX_LOG_SOURCES} log sources"));
    }
    for (i, src) in list.iter().enumerate() {
        let key = format!("agent.logs.sources[{i}]");
        let Some(t) = src.as_table() else {
            errors.push(format!(
                "{at}: {key} must be a table {{ path = \"/abs/glob\", multiline_start = \"regex\" (optional) }}"
            ));
            continue;
        };
        let mut ok = true;
        for k in t
            .keys()
            .filter(|k| !PUSHED_SOURCE_KEYS.contains(&k.as_str()))
        {
            ok = false;
            errors.push(format!(
                "{at}: {key}.{k}: cannot be pushed (a pushed source has path and multiline_start; {k} is for the agent's own [[logs.sources]])"
            ));
        }
        let path = match t.get("path") {
            Some(Value::String(p)) if p.starts_with('/') => p.clone(),
            _ => {
                errors.push(format!(
                    "{at}: {key}.path: required, an absolute glob (\"/var/log/app/*.log\")"
                ));
                continue;
            }
        };
        let multiline_start = match t.get("multiline_start") {
            None => String::new(),
            Some(Value::String(m)) => m.clone(),
            Some(_) => {
                errors.push(format!(
                    "{at}: {key}.multiline_start: must be a string (a regex)"
                ));
                continue;
            }
        };
        if ok {
            out.push(LogSource {
                path,
                multiline_start,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_push::tree::{Level, LevelFile};

    fn agent(name: &str) -> AgentInfo {
        AgentInfo {
            name: name.into(),
            labels: BTreeMap::new(),
            revoked: false,
            online: true,
            hostname: name.into(),
            addresses: vec!["10.0.0.5".parse().unwrap()],
            os: "linux".into(),
            agent_version: "t".into(),
            ssh_host_keys: vec![],
            enrolled_at: 0,
            cert_serial: String::new(),
            cert_not_after: 0,
            ..Default::default()
        }
    }

    fn tree(global: &str, host: Option<&str>, templates: &[(&str, &str)]) -> Tree {
        let mut t = Tree {
            group_label: "group".into(),
            ..Tree::default()
        };
        t.common.push(LevelFile {
            level: Level::Global,
            file: "global.toml".into(),
            doc: toml::from_str(global).unwrap(),
            fingerprint: 1,
        });
        if let Some(h) = host {
            t.hosts.insert(
                "web1".into(),
                LevelFile {
                    level: Level::Host,
                    file: "hosts/web1.toml".into(),
                    doc: toml::from_str(h).unwrap(),
                    fingerprint: 2,
                },
            );
        }
        for (n, s) in templates {
            t.templates.insert(n.to_string(), s.to_string());
        }
        t
    }

    const GLOBAL: &str = r#"
[vars]
ntp = "pool"
[files.chrony]
path = "/etc/chrony.conf"
template = "chrony.j2"
mode = "0640"
on_change = "chrony"
[agent]
metrics_interval = "5s"
[[agent.logs.sources]]
path = "/var/log/*.log"
"#;

    #[test]
    fn renders_with_vars_facts_and_bastion_and_hashes_the_result() {
        let t = tree(
            GLOBAL,
            Some("[vars]\nntp = \"local\"\n"),
            &[(
                "chrony.j2",
                "server {{ ntp }} # {{ agent.name }} via {{ bastion.address }}\n",
            )],
        );
        let b = serde_json::json!({"address": "10.0.0.1"});
        let p = Prepared::new(t, &b).unwrap();
        let a = agent("web1");
        let r = p.render(&a, &agent_facts(&a, None)).unwrap();
        assert_eq!(r.push.files.len(), 1);
        assert_eq!(r.push.files[0].mode, 0o640);
        assert_eq!(
            String::from_utf8_lossy(&r.push.files[0].content),
            "server local # web1 via 10.0.0.1\n"
        );
        let s = r.push.settings.clone().unwrap();
        assert_eq!(s.metrics_interval_secs, Some(5));
        assert_eq!(s.log_sources.len(), 1);
        let a2 = agent("web2");
        let r2 = p.render(&a2, &agent_facts(&a2, None)).unwrap();
        assert_ne!(r.push.revision, r2.push.revision);
        let again = p.render(&a, &agent_facts(&a, None)).unwrap();
        assert_eq!(r.push.revision, again.push.revision);
        assert_eq!(r.push.revision.len(), 16);
    }

    /// Templates (and hostile variables) cannot make a render run unbounded: nested loops,
    /// huge strings and deep recursion end in a clear error, fast (found while writing the
    /// `config_tree` fuzz target: minijinja ran `range(100000)` nested loops for hours and
    /// built 100 MB strings before the fuel limit was set).
    #[test]
    fn hostile_templates_are_bounded() {
        // Debug builds use far more stack per frame than the release daemon (whose 2 MiB
        // blocking-pool stack the `config_tree` fuzz target checks): give recursion room.
        std::thread::Builder::new()
            .stack_size(32 * 1024 * 1024)
            .spawn(hostile_templates)
            .unwrap()
            .join()
            .unwrap();
    }

    fn hostile_templates() {
        let a = agent("web1");
        let b = serde_json::json!({});
        for (name, src) in [
            ("loops.j2", "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"),
            ("big.j2", "{{ 'x' * 100000000 }}{{ 'y' * 100000000 }}"),
            ("macro.j2", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
            ("self.j2", "{% include 'self.j2' %}"),
            ("var.j2", "{{ huge * 100000000 }}"),
            // fuzz/seeds/config_tree/slow-big-string: fitted the first fuel budget.
            ("big2.j2", "{{ 'x' * 060000000 }}{{ 'y' * 100000000 }}"),
            ("nested.j2", "{% for i in range(1000) %}{% for j in range(1000) %}{{ i * j }}{% endfor %}{% endfor %}"),
        ] {
            let global = format!(
                "[vars]\nhuge = \"0123456789\"\n[files.x]\npath = \"/etc/x\"\ntemplate = \"{name}\"\n"
            );
            let t = tree(&global, None, &[(name, src)]);
            let p = Prepared::new(t, &b).unwrap();
            let start = std::time::Instant::now();
            let e = p.render(&a, &agent_facts(&a, None)).unwrap_err();
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{name}: {:?}",
                start.elapsed()
            );
            assert!(e[0].contains(name), "{e:?}");
        }
        // Many files, each within bounds but together too large: refused, and rendering
        // stops at the first file past the total.
        let many: String = (0..200)
            .map(|i| {
                format!("[files.f{i}]\npath = \"/etc/f{i}\"\ncontent = \"{{{{ 'z' * 20000 }}}}\"\n")
            })
            .collect();
        let t = tree(&many, None, &[]);
        let p = Prepared::new(t, &b).unwrap();
        let e = p.render(&a, &agent_facts(&a, None)).unwrap_err();
        assert!(e.iter().any(|e| e.contains("more than")), "{e:?}");
        let too_many: String = (0..=MAX_FILES)
            .map(|i| format!("[files.f{i}]\npath = \"/etc/f{i}\"\ncontent = \"\"\n"))
            .collect();
        let t = tree(&too_many, None, &[]);
        let e = Prepared::new(t, &b)
            .unwrap()
            .render(&a, &agent_facts(&a, None))
            .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let t = tree(GLOBAL, None, &[("chrony.j2", "{{ missing_var }}")]);
        let p = Prepared::new(t, &serde_json::json!({})).unwrap();
        let a = agent("web1");
        let e = p.render(&a, &agent_facts(&a, None)).unwrap_err();
        assert!(
            e[0].contains("global.toml") && e[0].contains("chrony.j2"),
            "{e:?}"
        );
        assert!(e[0].contains("undefined"), "{e:?}");

        let bad = tree(GLOBAL, None, &[("chrony.j2", "{% if %}")]);
        let e = Templates::compile(&bad).err().unwrap();
        assert!(e[0].contains("templates/chrony.j2"), "{e:?}");

        let t = tree(
            "[files.x]\npath = \"relative\"\ncontent = \"x\"\n[files.y]\npath = \"/a/b\"\ncontent = \"y\"\nmode = \"99\"\n[agent]\nbogus = 1\n",
            None,
            &[],
        );
        let p = Prepared::new(t, &serde_json::json!({})).unwrap();
        let e = p.render(&a, &agent_facts(&a, None)).unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
    }

    /// Pushed log sources have the agent's own `[[logs.sources]]` name and shape, file
    /// sources only; every key the push cannot carry is named.
    #[test]
    fn pushed_log_sources_have_the_agents_own_name_and_shape() {
        let a = agent("web1");
        let render = |agent_table: &str| {
            let t = tree(&format!("[agent]\n{agent_table}"), None, &[]);
            let p = Prepared::new(t, &serde_json::json!({})).unwrap();
            p.render(&a, &agent_facts(&a, None))
        };
        let r = render(
            "[[agent.logs.sources]]\npath = \"/var/log/a.log\"\n[[agent.logs.sources]]\npath = \"/var/log/app/*.log\"\nmultiline_start = '^\\d'\n",
        )
        .unwrap();
        let s = r.push.settings.unwrap();
        assert_eq!(s.log_sources.len(), 2);
        assert_eq!(s.log_sources[1].multiline_start, "^\\d");

        let e = render("log_sources = [{ path = \"/var/log/a.log\" }]\n").unwrap_err();
        assert!(
            e[0].contains("agent.log_sources: unknown or mistyped setting")
                && e[0].contains("[[agent.logs.sources]]"),
            "{e:?}"
        );
        let e = render(
            "[agent.logs]\nbuffer_max_bytes = 1\n[[agent.logs.sources]]\njournal = true\n[[agent.logs.sources]]\npath = \"rel\"\n",
        )
        .unwrap_err();
        let all = e.join("\n");
        for want in [
            "agent.logs.buffer_max_bytes: cannot be pushed",
            "agent.logs.sources[0].journal: cannot be pushed",
            "agent.logs.sources[0].path: required",
            "agent.logs.sources[1].path: required, an absolute glob",
        ] {
            assert!(all.contains(want), "{want:?} not in {all}");
        }
    }

    #[test]
    fn shared_bases_render_like_a_full_merge_and_inputs_follow_each_agents_layers() {
        let mut t = tree(
            GLOBAL,
            Some("[vars]\nntp = \"host\"\n"),
            &[("chrony.j2", "server {{ ntp }} {{ agent.name }}\n")],
        );
        t.groups.insert(
            "db".into(),
            LevelFile {
                level: Level::Group,
                file: "groups/db.toml".into(),
                doc: toml::from_str(
                    "[vars]\nntp = \"group\"\n[files.motd]\npath = \"/etc/motd\"\ncontent = \"{{ ntp }} motd\"\n",
                )
                .unwrap(),
                fingerprint: 3,
            },
        );
        let b = serde_json::json!({});
        let p = Prepared::new(t.clone(), &b).unwrap();
        let mut db = agent("db1");
        db.labels.insert("group".into(), "db".into());
        let web1 = agent("web1");
        let web2 = agent("web2");
        for (a, ntp, files) in [(&db, "group", 2), (&web1, "host", 1), (&web2, "pool", 1)] {
            let r = p.render(a, &agent_facts(a, None)).unwrap();
            // The same as merging every layer of the agent from scratch.
            let full = merge(&t.layers(&a.name, &a.labels));
            assert_eq!(r.merged.doc, full.doc);
            assert_eq!(r.merged.provenance, full.provenance);
            assert_eq!(r.push.files.len(), files);
            let chrony = r.push.files.iter().find(|f| f.path == "/etc/chrony.conf");
            assert_eq!(
                String::from_utf8_lossy(&chrony.unwrap().content),
                format!("server {ntp} {}\n", a.name)
            );
        }
        // A changed host file changes the inputs of its agent only.
        let mut t2 = t.clone();
        t2.hosts.get_mut("web1").unwrap().fingerprint = 99;
        let p2 = Prepared::new(t2, &b).unwrap();
        assert_ne!(p.inputs(&web1), p2.inputs(&web1));
        assert_eq!(p.inputs(&web2), p2.inputs(&web2));
        assert_eq!(p.inputs(&db), p2.inputs(&db));
        // A changed template, everyone's.
        let mut t3 = t.clone();
        t3.templates.insert("chrony.j2".into(), "x".into());
        let p3 = Prepared::new(t3, &b).unwrap();
        assert_ne!(p.inputs(&web2), p3.inputs(&web2));
        assert_ne!(p.inputs(&db), p3.inputs(&db));
        // Inline content is compiled with the tree: its syntax errors name its file and key.
        let bad = tree(
            "[files.x]\npath = \"/a\"\ncontent = \"{{ oops\"\n",
            None,
            &[],
        );
        let e = Templates::compile(&bad).err().unwrap();
        assert!(
            e[0].contains("global.toml") && e[0].contains("files.x"),
            "{e:?}"
        );
    }
}
