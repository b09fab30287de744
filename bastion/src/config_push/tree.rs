//! The environment tree: TOML documents by organisational level, merged deeply level by level
//! (a lower level wins), with the provenance of every key and an explicit deletion syntax.
//!
//! Layout under the tree's root (the bastion's own position picks one path through it):
//!
//! ```text
//! global.toml
//! clouds/<cloud>/cloud.toml
//! clouds/<cloud>/sites/<site>/site.toml
//! clouds/<cloud>/sites/<site>/instances/<instance>/instance.toml
//! clouds/<cloud>/sites/<site>/instances/<instance>/projects/<project>/project.toml
//!   .../projects/<project>/groups/<value of the agent's group label>.toml
//!   .../projects/<project>/hosts/<agent name>.toml
//! templates/**            (minijinja templates, named by their path under templates/)
//! ```
//!
//! Every level file may hold three tables: `vars` (template variables), `files` (managed
//! files by id) and `agent` (agent settings). Tables merge key by key; any other value,
//! arrays included, replaces the inherited one whole. `_delete = ["key", ...]` in a table
//! removes those inherited keys before the level's own keys are merged.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use toml::{Table, Value};

/// Largest level file or template read from the tree.
pub const MAX_FILE: u64 = 1024 * 1024;
/// Most templates under `templates/`.
pub const MAX_TEMPLATES: usize = 2000;
/// The reserved key that deletes inherited keys of its table.
pub const DELETE_KEY: &str = "_delete";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Global,
    Cloud,
    Site,
    Instance,
    Project,
    Group,
    Host,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Global => "global",
            Level::Cloud => "cloud",
            Level::Site => "site",
            Level::Instance => "instance",
            Level::Project => "project",
            Level::Group => "group",
            Level::Host => "host",
        })
    }
}

/// Where the bastion sits in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub cloud: String,
    pub site: String,
    pub instance: String,
    pub project: String,
}

/// One parsed level file.
#[derive(Debug, Clone)]
pub struct LevelFile {
    pub level: Level,
    /// Path relative to the tree's root, for messages and provenance.
    pub file: String,
    pub doc: Table,
    /// Hash of the file's text: an agent whose layers' fingerprints are unchanged renders
    /// the same (see `render::Prepared::inputs`).
    pub fingerprint: u64,
}

/// Which level and file set a key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub level: String,
    pub file: String,
}

/// The result of merging the layers of one agent.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    pub doc: Table,
    /// Dotted key path (e.g. `vars.ntp.servers`) of every leaf -> who set it.
    pub provenance: BTreeMap<String, Origin>,
}

/// The whole tree as read from disk, before any agent is considered.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub root: PathBuf,
    /// global .. project, only the files that exist.
    pub common: Vec<LevelFile>,
    pub groups: BTreeMap<String, LevelFile>,
    pub hosts: BTreeMap<String, LevelFile>,
    /// Template name (path under templates/) -> source.
    pub templates: BTreeMap<String, String>,
    pub group_label: String,
}

/// A path component from configuration: no separators, no `.`/`..`, not empty.
pub fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.contains('\0')
        && s.len() <= 255
}

/// Why a file of the tree was not read: absent (a level that is simply not there) or refused.
#[derive(Debug, PartialEq, Eq)]
enum ReadError {
    Missing,
    Refused(String),
}

/// The refusal of a symbolic link, in the words every refusal uses.
fn symlink_refused(rel: &str) -> String {
    format!(
        "{rel}: is a symbolic link (refused: the tree holds regular files and directories only)"
    )
}

/// Reads `rel` (a relative path under `root`) without following a symbolic link anywhere
/// below `root`: every directory is opened with `O_NOFOLLOW | O_DIRECTORY` from the one
/// before it and the file with `O_NOFOLLOW`, so a link in place of a level file, a template
/// or a directory on the way (swapped in after a check, too) is refused, never read. A link
/// could otherwise make the tree read and push any file the bastion can read (its own keys).
/// Special files (FIFOs, devices) are refused as well, and nothing larger than [`MAX_FILE`].
fn read_in_tree(root: &Path, rel: &str) -> Result<String, ReadError> {
    use nix::errno::Errno;
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    use std::io::Read;

    let io = |what: &str, e: Errno| match e {
        Errno::ENOENT => ReadError::Missing,
        Errno::ELOOP => ReadError::Refused(symlink_refused(what)),
        // O_DIRECTORY on a link (or a file where a directory was expected).
        Errno::ENOTDIR => match std::fs::symlink_metadata(root.join(what)) {
            Ok(m) if m.file_type().is_symlink() => ReadError::Refused(symlink_refused(what)),
            _ => ReadError::Refused(format!("{what}: not a directory")),
        },
        e => ReadError::Refused(format!("{what}: {}", std::io::Error::from(e))),
    };
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir: std::os::fd::OwnedFd = std::fs::File::open(root)
        .map_err(|e| ReadError::Refused(format!("{}: {e}", root.display())))?
        .into();
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Err(ReadError::Refused(format!("{rel:?}: empty path")));
    };
    let mut walked = String::new();
    for d in dirs {
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(d);
        if !valid_component(d) {
            return Err(ReadError::Refused(format!(
                "{walked}: invalid path component"
            )));
        }
        dir = openat(&dir, *d, dir_flags, Mode::empty()).map_err(|e| io(&walked, e))?;
    }
    let fd = openat(
        &dir,
        *last,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| io(rel, e))?;
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| ReadError::Refused(format!("{rel}: {e}")))?;
    if !meta.is_file() {
        return Err(ReadError::Refused(format!("{rel}: not a regular file")));
    }
    if meta.len() > MAX_FILE {
        return Err(ReadError::Refused(format!(
            "{rel}: larger than {MAX_FILE} bytes"
        )));
    }
    let mut text = String::new();
    file.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| ReadError::Refused(format!("{rel}: {e}")))?;
    if text.len() as u64 > MAX_FILE {
        return Err(ReadError::Refused(format!(
            "{rel}: larger than {MAX_FILE} bytes"
        )));
    }
    Ok(text)
}

impl Tree {
    /// Reads the tree; every problem is reported, each naming its file.
    pub fn load(root: &Path, pos: &Position, group_label: &str) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut tree = Tree {
            root: root.to_path_buf(),
            group_label: group_label.to_string(),
            ..Tree::default()
        };
        if !root.is_dir() {
            return Err(vec![format!("{}: not a directory", root.display())]);
        }
        let cloud = format!("clouds/{}", pos.cloud);
        let site = format!("{cloud}/sites/{}", pos.site);
        let instance = format!("{site}/instances/{}", pos.instance);
        let project = format!("{instance}/projects/{}", pos.project);
        let levels = [
            (Level::Global, "global.toml".to_string()),
            (Level::Cloud, format!("{cloud}/cloud.toml")),
            (Level::Site, format!("{site}/site.toml")),
            (Level::Instance, format!("{instance}/instance.toml")),
            (Level::Project, format!("{project}/project.toml")),
        ];
        for (level, rel) in levels {
            // An absent level is normal; anything else that is not a regular file is refused.
            if let Some(f) = parse_level(root, &rel, level, &mut errors) {
                tree.common.push(f);
            }
        }
        for (level, sub) in [(Level::Group, "groups"), (Level::Host, "hosts")] {
            let dir = root.join(&project).join(sub);
            // A link in place of the directory (or of one above it) is refused, not listed.
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    errors.push(symlink_refused(&format!("{project}/{sub}")));
                    continue;
                }
                Ok(_) => {}
                Err(_) => continue,
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<_> = entries.filter_map(|e| e.ok()).collect();
            names.sort_by_key(|e| e.file_name());
            for e in names {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(stem) = name.strip_suffix(".toml") else {
                    continue;
                };
                if stem.starts_with('.') {
                    continue;
                }
                let rel = format!("{project}/{sub}/{name}");
                if let Some(f) = parse_level(root, &rel, level, &mut errors) {
                    let map = if level == Level::Group {
                        &mut tree.groups
                    } else {
                        &mut tree.hosts
                    };
                    map.insert(stem.to_string(), f);
                }
            }
        }
        let tdir = root.join("templates");
        match std::fs::symlink_metadata(&tdir) {
            Ok(m) if m.file_type().is_symlink() => errors.push(symlink_refused("templates")),
            Ok(m) if m.is_dir() => {
                load_templates(root, &tdir, &mut tree.templates, &mut errors);
            }
            _ => {}
        }
        if errors.is_empty() {
            Ok(tree)
        } else {
            Err(errors)
        }
    }

    /// The layers of one agent, highest level first.
    pub fn layers(&self, name: &str, labels: &BTreeMap<String, String>) -> Vec<&LevelFile> {
        let mut out: Vec<&LevelFile> = self.common.iter().collect();
        if let Some(g) = labels
            .get(&self.group_label)
            .and_then(|v| self.groups.get(v))
        {
            out.push(g);
        }
        if let Some(h) = self.hosts.get(name) {
            out.push(h);
        }
        out
    }
}

fn parse_level(
    root: &Path,
    rel: &str,
    level: Level,
    errors: &mut Vec<String>,
) -> Option<LevelFile> {
    let text = match read_in_tree(root, rel) {
        Ok(t) => t,
        Err(ReadError::Missing) => return None,
        Err(ReadError::Refused(e)) => {
            errors.push(e);
            return None;
        }
    };
    let doc: Table = match toml::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            errors.push(format!("{rel}: {}", e.to_string().trim_end()));
            return None;
        }
    };
    let mut ok = true;
    for (k, v) in &doc {
        if !matches!(k.as_str(), "vars" | "files" | "agent" | DELETE_KEY) {
            errors.push(format!(
                "{rel}: unknown top-level key {k:?} (expected vars, files, agent)"
            ));
            ok = false;
        } else if k != DELETE_KEY && !v.is_table() {
            errors.push(format!("{rel}: {k} must be a table"));
            ok = false;
        }
    }
    check_deletes(&doc, "", rel, errors);
    ok.then(|| LevelFile {
        level,
        file: rel.to_string(),
        doc,
        fingerprint: fingerprint(&text),
    })
}

fn check_deletes(t: &Table, prefix: &str, rel: &str, errors: &mut Vec<String>) {
    for (k, v) in t {
        if k == DELETE_KEY {
            let good = v.as_array().is_some_and(|a| a.iter().all(|x| x.is_str()));
            if !good {
                errors.push(format!(
                    "{rel}: {}: must be an array of key names",
                    join(prefix, k)
                ));
            }
        } else if let Value::Table(sub) = v {
            check_deletes(sub, &join(prefix, k), rel, errors);
        }
    }
}

/// Loads every template under `dir` (inside `root`/templates). A symbolic link, to a file
/// or a directory, is refused with an error naming it, like a level file that is one.
fn load_templates(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, String>,
    errors: &mut Vec<String>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        errors.push(format!("{}: cannot read", dir.display()));
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        let rel = p
            .strip_prefix(root)
            .map(|r| r.to_string_lossy().to_string())
            .unwrap_or_default();
        if ft.is_symlink() {
            errors.push(symlink_refused(&rel));
        } else if ft.is_dir() {
            load_templates(root, &p, out, errors);
        } else if ft.is_file() {
            if out.len() >= MAX_TEMPLATES {
                errors.push(format!("templates: more than {MAX_TEMPLATES} templates"));
                return;
            }
            let name = rel.strip_prefix("templates/").unwrap_or(&rel).to_string();
            match read_in_tree(root, &rel) {
                Ok(src) => {
                    out.insert(name, src);
                }
                // Gone between the listing and the read: as if never there.
                Err(ReadError::Missing) => {}
                Err(ReadError::Refused(err)) => errors.push(err),
            }
        }
    }
}

/// Dotted path of a key; keys that are not bare TOML keys are quoted.
pub fn join(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let k = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        k
    } else {
        format!("{prefix}.{k}")
    }
}

fn forget(prov: &mut BTreeMap<String, Origin>, path: &str) {
    prov.remove(path);
    let sub = format!("{path}.");
    let doomed: Vec<String> = prov
        .range(sub.clone()..)
        .take_while(|(k, _)| k.starts_with(&sub))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        prov.remove(&k);
    }
}

fn merge_table(
    dst: &mut Table,
    src: &Table,
    prefix: &str,
    origin: &Origin,
    prov: &mut BTreeMap<String, Origin>,
) {
    if let Some(Value::Array(keys)) = src.get(DELETE_KEY) {
        for k in keys.iter().filter_map(Value::as_str) {
            dst.remove(k);
            forget(prov, &join(prefix, k));
        }
    }
    for (k, v) in src {
        if k == DELETE_KEY {
            continue;
        }
        let path = join(prefix, k);
        match (dst.get_mut(k), v) {
            (Some(Value::Table(d)), Value::Table(s)) => {
                merge_table(d, s, &path, origin, prov);
                if d.is_empty() {
                    prov.insert(path, origin.clone());
                }
            }
            (_, Value::Table(s)) => {
                forget(prov, &path);
                let mut fresh = Table::new();
                merge_table(&mut fresh, s, &path, origin, prov);
                if fresh.is_empty() {
                    prov.insert(path, origin.clone());
                }
                dst.insert(k.clone(), Value::Table(fresh));
            }
            (_, other) => {
                forget(prov, &path);
                prov.insert(path, origin.clone());
                dst.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Merges layers, highest level first; a lower layer wins.
pub fn merge(layers: &[&LevelFile]) -> Merged {
    let mut m = Merged::default();
    for l in layers {
        merge_into(&mut m, l);
    }
    m
}

/// Merges one lower layer onto what the higher ones gave.
pub fn merge_into(m: &mut Merged, l: &LevelFile) {
    let origin = Origin {
        level: l.level.to_string(),
        file: l.file.clone(),
    };
    merge_table(&mut m.doc, &l.doc, "", &origin, &mut m.provenance);
}

/// A hash of some text, stable within this process.
pub fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Every leaf of a table as (dotted path, value), in order.
pub fn leaves(t: &Table, prefix: &str, out: &mut Vec<(String, Value)>) {
    for (k, v) in t {
        let path = join(prefix, k);
        match v {
            Value::Table(sub) if !sub.is_empty() => leaves(sub, &path, out),
            other => out.push((path, other.clone())),
        }
    }
}

/// A lexically normal absolute path (no `.`/`..`, no empty components).
pub fn normal_absolute(p: &str) -> bool {
    let path = Path::new(p);
    path.is_absolute()
        && !p.ends_with('/')
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && path.components().count() >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(level: Level, file: &str, text: &str) -> LevelFile {
        LevelFile {
            level,
            file: file.into(),
            doc: toml::from_str(text).unwrap(),
            fingerprint: fingerprint(text),
        }
    }

    #[test]
    fn lower_level_wins_and_tables_merge_deeply() {
        let g = layer(
            Level::Global,
            "global.toml",
            "[vars]\nntp = \"pool.ntp.org\"\n[vars.resolver]\nsearch = [\"a\"]\nndots = 1\n",
        );
        let p = layer(
            Level::Project,
            "p/project.toml",
            "[vars]\nntp = \"ntp.proj\"\n[vars.resolver]\nndots = 2\n",
        );
        let h = layer(
            Level::Host,
            "p/hosts/web1.toml",
            "[vars.resolver]\nsearch = [\"b\", \"c\"]\n",
        );
        let m = merge(&[&g, &p, &h]);
        let vars = m.doc["vars"].as_table().unwrap();
        assert_eq!(vars["ntp"].as_str(), Some("ntp.proj"));
        let r = vars["resolver"].as_table().unwrap();
        assert_eq!(r["ndots"].as_integer(), Some(2));
        // Arrays replace, they never concatenate.
        assert_eq!(r["search"].as_array().unwrap().len(), 2);
        assert_eq!(m.provenance["vars.ntp"].level, "project");
        assert_eq!(m.provenance["vars.resolver.ndots"].file, "p/project.toml");
        assert_eq!(m.provenance["vars.resolver.search"].level, "host");
    }

    #[test]
    fn delete_removes_inherited_keys_and_their_provenance() {
        let g = layer(
            Level::Global,
            "global.toml",
            "[vars]\nrelay = \"smtp\"\nkeep = 1\n[vars.syslog]\nhost = \"x\"\nport = 514\n",
        );
        let h = layer(
            Level::Host,
            "hosts/a.toml",
            "[vars]\n_delete = [\"relay\", \"syslog\"]\n",
        );
        let m = merge(&[&g, &h]);
        let vars = m.doc["vars"].as_table().unwrap();
        assert!(!vars.contains_key("relay"));
        assert!(!vars.contains_key("syslog"));
        assert_eq!(vars["keep"].as_integer(), Some(1));
        assert!(!m.provenance.keys().any(|k| k.starts_with("vars.syslog")));
        assert!(!m.provenance.contains_key("vars.relay"));
        // Deleting then setting in the same table: the level's own value stays.
        let h2 = layer(
            Level::Host,
            "hosts/a.toml",
            "[vars]\n_delete = [\"syslog\"]\n[vars.syslog]\nport = 6514\n",
        );
        let m = merge(&[&g, &h2]);
        let s = m.doc["vars"]["syslog"].as_table().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s["port"].as_integer(), Some(6514));
        assert_eq!(m.provenance["vars.syslog.port"].level, "host");
    }

    #[test]
    fn scalar_over_table_and_table_over_scalar_replace() {
        let g = layer(Level::Global, "g", "[vars.a]\nx = 1\ny = 2\n");
        let p = layer(Level::Project, "p", "[vars]\na = \"flat\"\n");
        let m = merge(&[&g, &p]);
        assert_eq!(m.doc["vars"]["a"].as_str(), Some("flat"));
        assert!(!m.provenance.contains_key("vars.a.x"));
        let h = layer(Level::Host, "h", "[vars.a]\nz = 3\n");
        let m = merge(&[&g, &p, &h]);
        let a = m.doc["vars"]["a"].as_table().unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(m.provenance["vars.a.z"].level, "host");
        // A fresh table never keeps a `_delete` key.
        let f = layer(Level::Host, "h", "[vars.b]\n_delete = [\"q\"]\nw = 1\n");
        let m = merge(&[&f]);
        assert!(!m.doc["vars"]["b"]
            .as_table()
            .unwrap()
            .contains_key(DELETE_KEY));
    }

    #[test]
    fn quoted_keys_and_paths() {
        assert_eq!(join("files", "/etc/x"), "files.\"/etc/x\"");
        assert_eq!(join("", "a_b-c"), "a_b-c");
        assert!(normal_absolute("/etc/chrony/chrony.conf"));
        assert!(!normal_absolute("/etc/../shadow"));
        assert!(!normal_absolute("etc/x"));
        assert!(!normal_absolute("/"));
        assert!(!normal_absolute("/etc/x/"));
        assert!(valid_component("prod"));
        assert!(!valid_component(".."));
        assert!(!valid_component("a/b"));
    }

    #[test]
    fn tree_loads_levels_groups_hosts_and_reports_every_error() {
        let dir = std::env::temp_dir().join(format!("bastide-tree-{}", rand::random::<u64>()));
        let proj = dir.join("clouds/c/sites/s/instances/i/projects/p");
        std::fs::create_dir_all(proj.join("hosts")).unwrap();
        std::fs::create_dir_all(proj.join("groups")).unwrap();
        std::fs::create_dir_all(dir.join("templates/sub")).unwrap();
        std::fs::write(dir.join("global.toml"), "[vars]\na = 1\n").unwrap();
        std::fs::write(proj.join("project.toml"), "[vars]\na = 2\n").unwrap();
        std::fs::write(proj.join("groups/web.toml"), "[vars]\na = 3\n").unwrap();
        std::fs::write(proj.join("hosts/h1.toml"), "[vars]\na = 4\n").unwrap();
        std::fs::write(dir.join("templates/sub/x.j2"), "{{ a }}").unwrap();
        let pos = Position {
            cloud: "c".into(),
            site: "s".into(),
            instance: "i".into(),
            project: "p".into(),
        };
        let t = Tree::load(&dir, &pos, "group").unwrap();
        assert_eq!(t.common.len(), 2);
        assert!(t.templates.contains_key("sub/x.j2"));
        let labels: BTreeMap<_, _> = [("group".to_string(), "web".to_string())].into();
        let m = merge(&t.layers("h1", &labels));
        assert_eq!(m.doc["vars"]["a"].as_integer(), Some(4));
        let m = merge(&t.layers("h2", &labels));
        assert_eq!(m.provenance["vars.a"].level, "group");
        let m = merge(&t.layers("h2", &BTreeMap::new()));
        assert_eq!(m.provenance["vars.a"].level, "project");

        std::fs::write(dir.join("global.toml"), "[vars\n").unwrap();
        std::fs::write(
            proj.join("hosts/h1.toml"),
            "bogus = 1\n[vars]\n_delete = 3\n",
        )
        .unwrap();
        let e = Tree::load(&dir, &pos, "group").unwrap_err();
        assert!(e.iter().any(|e| e.starts_with("global.toml")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("bogus")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("vars._delete")), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 16, point 8: a level file that is a symbolic link (to a secret outside the
    /// tree) is refused with an error naming it, never read, as templates that are links
    /// are; so is a link in place of a directory on the way or of the hosts directory.
    #[test]
    fn symbolic_links_in_the_tree_are_refused() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("bastide-tree-{}", rand::random::<u64>()));
        let outside = dir.join("outside");
        let root = dir.join("tree");
        let proj = root.join("clouds/c/sites/s/instances/i/projects/p");
        std::fs::create_dir_all(proj.join("hosts")).unwrap();
        std::fs::create_dir_all(root.join("templates")).unwrap();
        std::fs::create_dir_all(outside.join("sites/s")).unwrap();
        let secret = outside.join("secret.toml");
        std::fs::write(&secret, "[vars]\nsecret = \"s3cret\"\n").unwrap();
        std::fs::write(outside.join("sites/s/site.toml"), "[vars]\nsecret = 2\n").unwrap();
        std::fs::write(proj.join("project.toml"), "[vars]\na = 1\n").unwrap();
        let pos = Position {
            cloud: "c".into(),
            site: "s".into(),
            instance: "i".into(),
            project: "p".into(),
        };
        assert!(Tree::load(&root, &pos, "group").is_ok());

        // Each kind of link alone, then all of them reported at once.
        let cases: Vec<(PathBuf, &Path, &str)> = vec![
            (
                root.join("global.toml"),
                &secret,
                "global.toml: is a symbolic link",
            ),
            (
                proj.join("hosts/web1.toml"),
                &secret,
                "projects/p/hosts/web1.toml: is a symbolic link",
            ),
            (
                root.join("templates/x.j2"),
                &secret,
                "templates/x.j2: is a symbolic link",
            ),
        ];
        for (link, to, want) in &cases {
            symlink(to, link).unwrap();
            let e = Tree::load(&root, &pos, "group").unwrap_err();
            assert!(e.iter().any(|e| e.contains(want)), "{want}: {e:?}");
            assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
            std::fs::remove_file(link).unwrap();
        }
        // A dangling link is refused too, not taken for an absent level.
        symlink(dir.join("nowhere"), root.join("global.toml")).unwrap();
        let e = Tree::load(&root, &pos, "group").unwrap_err();
        assert!(
            e.iter()
                .any(|e| e.contains("global.toml: is a symbolic link")),
            "{e:?}"
        );
        std::fs::remove_file(root.join("global.toml")).unwrap();
        // A directory on the way: clouds/c/sites -> outside.
        let sites = root.join("clouds/c/sites");
        std::fs::rename(&sites, dir.join("sites.real")).unwrap();
        symlink(outside.join("sites"), &sites).unwrap();
        let e = Tree::load(&root, &pos, "group").unwrap_err();
        assert!(
            e.iter()
                .any(|e| e.contains("clouds/c/sites: is a symbolic link")),
            "{e:?}"
        );
        std::fs::remove_file(&sites).unwrap();
        std::fs::rename(dir.join("sites.real"), &sites).unwrap();
        // The hosts directory itself.
        std::fs::remove_dir(proj.join("hosts")).unwrap();
        symlink(&outside, proj.join("hosts")).unwrap();
        let e = Tree::load(&root, &pos, "group").unwrap_err();
        assert!(
            e.iter().any(|e| e.contains("p/hosts: is a symbolic link")),
            "{e:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
