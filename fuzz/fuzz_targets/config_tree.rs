//! The configuration push's environment tree and template renderer, from disk as the bastion
//! reads them: hostile TOML at every level (global .. host), hostile templates and hostile
//! variables (tree `vars` and the agent's own facts: hostname, OS, labels, which a
//! compromised VM chooses) through `Tree::load`, `Prepared::new` (our minijinja
//! environment: strict undefined, no auto-escape, fuel) and `render`.
//!
//! The input is NUL-separated sections: global, cloud, site, instance, project, group
//! (`groups/web.toml`), host (`hosts/web1.toml`), templates `a.j2` and `sub/b.j2`, then the
//! agent's hostname, OS and one extra label `key=value`. An empty level section removes
//! that file. Everything runs on a thread with the 2 MiB stack of tokio's blocking pool,
//! where the bastion renders.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use bastide::config_push::render::{
    self, agent_facts, Prepared, MAX_FILES, MAX_LOG_SOURCES, MAX_TOTAL,
};
use bastide::config_push::tree::{normal_absolute, Position, Tree};
use bastide::registry::AgentInfo;
use libfuzzer_sys::fuzz_target;

const LEVELS: [&str; 9] = [
    "global.toml",
    "clouds/c/cloud.toml",
    "clouds/c/sites/s/site.toml",
    "clouds/c/sites/s/instances/i/instance.toml",
    "clouds/c/sites/s/instances/i/projects/p/project.toml",
    "clouds/c/sites/s/instances/i/projects/p/groups/web.toml",
    "clouds/c/sites/s/instances/i/projects/p/hosts/web1.toml",
    "templates/a.j2",
    "templates/sub/b.j2",
];

fn root() -> &'static PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let r = bastide_fuzz::scratch_dir("tree");
        for l in LEVELS {
            std::fs::create_dir_all(r.join(l).parent().unwrap()).unwrap();
        }
        r
    })
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || one(&data))
        .unwrap()
        .join()
        .unwrap();
});

fn one(data: &[u8]) {
    let root = root();
    let mut parts = data.split(|&b| b == 0);
    for l in LEVELS {
        let p = root.join(l);
        match parts.next() {
            Some(s) if !s.is_empty() => std::fs::write(&p, s).unwrap(),
            _ => {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).to_string();
    let hostname = text(parts.next());
    let os = text(parts.next());
    let extra = text(parts.next());
    let pos = Position {
        cloud: "c".into(),
        site: "s".into(),
        instance: "i".into(),
        project: "p".into(),
    };
    let tree = match Tree::load(root, &pos, "group") {
        Ok(t) => t,
        Err(errors) => {
            assert!(!errors.is_empty());
            return;
        }
    };
    let bastion = serde_json::json!({
        "project": "fuzz", "zone": "fuzz.test.", "address": "10.0.0.1",
        "services": {"dns": {"host": "10.0.0.1", "port": 53}, "syslog": {"host": "10.0.0.1", "port": 514}},
    });
    let prepared = match Prepared::new(tree, &bastion) {
        Ok(t) => t,
        Err(errors) => {
            // Templates are compiled here, both the files under templates/ and the inline
            // `content` of a level's [files.X]: each error names its file (and table).
            assert!(
                errors.iter().all(|e| e.starts_with("templates/")
                    || LEVELS.iter().any(|l| e.starts_with(&format!("{l}: files.")))),
                "{errors:?}"
            );
            return;
        }
    };
    let mut labels: BTreeMap<String, String> = [("group".to_string(), "web".to_string())].into();
    if let Some((k, v)) = extra.split_once('=') {
        labels.insert(k.to_string(), v.to_string());
    }
    let agent = AgentInfo {
        name: "web1".into(),
        labels,
        revoked: false,
        online: true,
        hostname,
        addresses: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        os,
        agent_version: "fuzz".into(),
        ssh_host_keys: vec![],
        enrolled_at: 0,
        cert_serial: String::new(),
        cert_not_after: 0,
        ..Default::default()
    };
    let facts = agent_facts(&agent, Some("fuzz.test."));
    let r = match prepared.render(&agent, &facts) {
        Ok(r) => r,
        Err(errors) => {
            assert!(!errors.is_empty());
            assert!(
                errors.iter().all(|e| e.starts_with("agent web1: ")),
                "{errors:?}"
            );
            return;
        }
    };
    let push = &r.push;
    assert!(push.files.len() <= MAX_FILES);
    let total: usize = push.files.iter().map(|f| f.content.len()).sum();
    assert!(total <= MAX_TOTAL, "{total} bytes rendered");
    let mut paths: Vec<&str> = push.files.iter().map(|f| f.path.as_str()).collect();
    for f in &push.files {
        assert!(normal_absolute(&f.path), "{:?}", f.path);
        assert!(f.mode <= 0o7777);
        for n in [&f.owner, &f.group, &f.on_change] {
            assert!(
                n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            );
        }
    }
    paths.dedup();
    assert_eq!(paths.len(), push.files.len(), "a path twice");
    let s = push.settings.clone().unwrap_or_default();
    assert!(s.log_sources.len() <= MAX_LOG_SOURCES);
    assert!(s.log_sources.iter().all(|l| l.path.starts_with('/')));
    assert_eq!(push.revision, render::revision(push));
    // Same tree, same agent: same revision.
    let again = prepared.render(&agent, &facts).expect("second render");
    assert_eq!(
        again.push.revision, push.revision,
        "rendering is not deterministic"
    );
}
