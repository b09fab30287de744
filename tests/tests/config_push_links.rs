//! Symbolic links in the environment tree are refused (issue 16, point 8): a level file, a
//! host file or a template that is a link (to a secret outside the tree) makes the real
//! bastion's `bastide config check` fail with an error naming it, and its target's content
//! is never rendered or shown.

use std::os::unix::fs::symlink;

use bastide_tests::{Bastion, EnvTree};

#[test]
fn tree_files_that_are_symbolic_links_are_refused_by_config_check() {
    let mut b = Bastion::init("demo");
    let outside = tempfile::tempdir().unwrap();
    let tree = EnvTree::new("demo", outside.path(), "");
    b.enable_config_push(tree.dir.path());
    b.start();
    let ok = b.cli(&["config", "check"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let secret = outside.path().join("secret.toml");
    std::fs::write(&secret, "[vars]\nntp = \"s3cret-from-outside\"\n").unwrap();
    let project = tree.project_dir().join("project.toml");
    let template = tree.dir.path().join("templates/ntp.conf.j2");
    let cases = [
        (
            project.clone(),
            "projects/demo/project.toml: is a symbolic link",
        ),
        (
            tree.host_file("web1"),
            "hosts/web1.toml: is a symbolic link",
        ),
        (
            template.clone(),
            "templates/ntp.conf.j2: is a symbolic link",
        ),
    ];
    for (path, want) in &cases {
        let saved = std::fs::read(path).ok();
        let _ = std::fs::remove_file(path);
        symlink(&secret, path).unwrap();
        let out = b.cli(&["config", "check"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a link was accepted: {err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(!err.contains("s3cret"), "{err}");
        let render = b.cli(&["config", "render", "web1"]);
        assert!(
            !String::from_utf8_lossy(&render.stdout).contains("s3cret"),
            "the link's target was rendered"
        );
        std::fs::remove_file(path).unwrap();
        if let Some(text) = saved {
            std::fs::write(path, text).unwrap();
        }
    }
    let ok = b.cli(&["config", "check"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
