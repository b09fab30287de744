//! Configuration push with the real binaries over loopback: the bastion renders an environment
//! tree per agent and pushes it over the agent's session; the agent applies it within its
//! local allow-lists and ACKs or NACKs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bastide_tests::{http_get, log_store_lines, wait_for, Agent, Bastion, EnvTree as Tree};
use serde_json::Value;

const PROJECT: &str = "demo";

/// A running bastion with config push and one running agent allowed to write under `out`.
struct Setup {
    bastion: Bastion,
    agent: Agent,
    tree: Tree,
    out: PathBuf,
}

fn setup(name: &str, file_extra: &str, actions: &str) -> Setup {
    let mut bastion = Bastion::init(PROJECT);
    let agent = Agent::new(name);
    let out = agent.dir.path().join("etc");
    std::fs::create_dir_all(&out).unwrap();
    let tree = Tree::new(PROJECT, &out, file_extra);
    bastion.enable_config_push(tree.dir.path());
    bastion.start();
    agent.append_config(&format!(
        "[config]\nallow_dirs = [{:?}]\n[config.actions]\n{actions}\n",
        out.display().to_string()
    ));
    let token = bastion.token(&[]);
    agent.enroll_ok(&bastion, &token);
    let mut s = Setup {
        bastion,
        agent,
        tree,
        out,
    };
    s.agent.start();
    assert!(
        s.bastion
            .wait_state(name, "online", Duration::from_secs(20)),
        "agent did not come online:\n{}",
        s.agent.log_text()
    );
    s
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `path` holds `needle`; the time it took.
fn wait_content(s: &Setup, path: &Path, needle: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    let ok = wait_for_fast(timeout, || read(path).contains(needle));
    assert!(
        ok,
        "{} never contained {needle:?} (has {:?})\nagent:\n{}\nbastion:\n{}",
        path.display(),
        read(path),
        s.agent.log_text(),
        s.bastion.log_text()
    );
    t.elapsed()
}

fn wait_for_fast(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Waits until the registry shows `pred` for the agent; the agent's JSON.
fn wait_agent(s: &Setup, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(Duration::from_secs(10), || {
        s.bastion.agent(&s.agent.name).filter(|a| pred(a))
    })
    .unwrap_or_else(|| {
        panic!(
            "agent state never matched: {:?}\nagent:\n{}\nbastion:\n{}",
            s.bastion.agent(&s.agent.name),
            s.agent.log_text(),
            s.bastion.log_text()
        )
    })
}

fn in_sync(a: &Value) -> bool {
    a["config_desired"] != "" && a["config_desired"] == a["config_applied"]
}

#[test]
fn project_change_reaches_the_agent_within_1s_host_overrides_and_deleting_restores() {
    let s = setup("web1", "", "");
    let ntp = s.out.join("ntp.conf");
    wait_content(
        &s,
        &ntp,
        "server project.ntp iburst",
        Duration::from_secs(10),
    );
    assert!(read(&ntp).contains("# web1 via 127.0.0.1"));
    let meta = std::fs::metadata(&ntp).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    let first = wait_agent(&s, in_sync);
    assert_eq!(first["config_error"], "");

    // A project-level change reaches the running agent's file within 1 s.
    s.tree
        .write_project("[vars]\nntp = \"changed.ntp\"\n\n[agent]\nmetrics_interval = \"3s\"\n");
    let took = wait_content(&s, &ntp, "server changed.ntp", Duration::from_secs(5));
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let second = wait_agent(&s, |a| {
        in_sync(a) && a["config_applied"] != first["config_applied"]
    });
    // The pushed agent setting takes effect without a restart.
    assert!(
        wait_for(Duration::from_secs(5), || s
            .agent
            .log_text()
            .contains("host metrics interval changed by the bastion")
            .then_some(()))
        .is_some(),
        "{}",
        s.agent.log_text()
    );

    // A host-level value overrides the project's.
    std::fs::write(s.tree.host_file("web1"), "[vars]\nntp = \"host.ntp\"\n").unwrap();
    wait_content(&s, &ntp, "server host.ntp", Duration::from_secs(5));
    // Deleting the host override restores the project value, and the same revision.
    std::fs::remove_file(s.tree.host_file("web1")).unwrap();
    wait_content(&s, &ntp, "server changed.ntp", Duration::from_secs(5));
    wait_agent(&s, |a| {
        in_sync(a) && a["config_applied"] == second["config_applied"]
    });

    // The listing shows the revision; metrics count pushes and ACKs and show the agent in sync.
    let list = s.bastion.cli_ok(&["agents", "list"]);
    let rev = second["config_applied"].as_str().unwrap();
    assert!(list.contains(&rev[..8]), "{list}");
    let (code, body) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    assert_eq!(code, 200);
    assert!(body.contains("bastide_config_pushes_total"), "{body}");
    assert!(
        body.contains("bastide_config_results_total{result=\"ack\"}"),
        "{body}"
    );
    assert!(
        body.contains("bastide_agent_config_in_sync{agent=\"web1\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("bastide_agents_config_out_of_sync 0"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "bastide_agent_config_applied_info{{agent=\"web1\",revision=\"{rev}\"}} 1"
        )),
        "{body}"
    );
}

#[test]
fn explain_names_the_level_that_set_each_key() {
    let s = setup("web2", "", "");
    std::fs::write(s.tree.host_file("web2"), "[vars]\nsite_note = \"h\"\n").unwrap();
    let out = s.bastion.cli_ok(&["config", "render", "web2", "--explain"]);
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
            .to_string()
    };
    assert!(
        line("vars.ntp")
            .contains("# project: clouds/c1/sites/s1/instances/prod/projects/demo/project.toml"),
        "{out}"
    );
    assert!(line("vars.site_note").contains("# host: "), "{out}");
    assert!(
        line("files.ntp.mode").contains("# global: global.toml"),
        "{out}"
    );
    let plain = s.bastion.cli_ok(&["config", "render", "web2"]);
    assert!(plain.contains("ntp = \"project.ntp\""), "{plain}");
    assert!(plain.contains("server project.ntp iburst"), "{plain}");
    // Unknown agents are an error, not an empty render.
    assert!(!s
        .bastion
        .cli(&["config", "render", "nope"])
        .status
        .success());
}

#[test]
fn template_error_is_reported_by_check_and_nothing_is_pushed() {
    let s = setup("web3", "", "");
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    let before = wait_agent(&s, in_sync);
    assert!(s.bastion.cli_ok(&["config", "check"]).contains("OK"));

    // A syntax error in the template and an undefined variable in a new file: both reported.
    s.tree.write("templates/ntp.conf.j2", "server {{ ntp }\n");
    s.tree.write_project(&format!(
        "[vars]\nntp = \"broken.ntp\"\n[files.other]\npath = {:?}\ncontent = \"{{{{ no_such_var }}}}\"\n",
        s.out.join("other.conf").display().to_string()
    ));
    let out = s.bastion.cli(&["config", "check"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("templates/ntp.conf.j2"), "{err}");
    // The reload through the CLI is refused with the errors too.
    let out = s.bastion.cli(&["config", "reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("last good one stays"));
    // Nothing pushed: the file and the revisions stay.
    std::thread::sleep(Duration::from_millis(800));
    assert!(read(&ntp).contains("server project.ntp"));
    assert!(!s.out.join("other.conf").exists());
    let after = s.bastion.agent("web3").unwrap();
    assert_eq!(after["config_desired"], before["config_desired"]);
    assert_eq!(after["config_applied"], before["config_applied"]);

    // Fixing the template alone leaves the undefined variable: still refused, one error.
    s.tree.write("templates/ntp.conf.j2", "server {{ ntp }}\n");
    let out = s.bastion.cli(&["config", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no_such_var") || err.contains("undefined"),
        "{err}"
    );
    s.tree.write_project("[vars]\nntp = \"fixed.ntp\"\n");
    wait_content(&s, &ntp, "server fixed.ntp", Duration::from_secs(5));
}

#[test]
fn file_outside_the_allow_list_is_refused_and_the_fs_untouched() {
    let s = setup("web4", "", "");
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    let before = wait_agent(&s, in_sync);
    let outside = s.agent.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    s.tree.write_project(&format!(
        "[vars]\nntp = \"new.ntp\"\n[files.evil]\npath = {:?}\ncontent = \"owned\"\n",
        outside.join("passwd").display().to_string()
    ));
    let a = wait_agent(&s, |a| a["config_error"] != "");
    let err = a["config_error"].as_str().unwrap();
    assert!(
        err.contains("passwd") && err.contains("allow_dirs"),
        "{err}"
    );
    assert_eq!(a["config_applied"], before["config_applied"]);
    assert_ne!(a["config_desired"], a["config_applied"]);
    // Nothing of the revision was applied, not even the allowed file.
    assert!(!outside.join("passwd").exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(read(&ntp).contains("server project.ntp"));
    let (_, body) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    assert!(
        body.contains("bastide_config_results_total{result=\"nack\"}"),
        "{body}"
    );
    assert!(
        body.contains("bastide_agents_config_out_of_sync 1"),
        "{body}"
    );
    let list = s.bastion.cli_ok(&["agents", "list"]);
    assert!(list.contains("allow_dirs"), "{list}");
}

#[test]
fn on_change_action_not_in_the_local_allow_list_is_not_run() {
    // The tree names "reload"; the agent only knows "other".
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let s = setup(
        "web5",
        "on_change = \"reload\"",
        &format!(
            "other = [\"/bin/sh\", \"-c\", \"touch {}\"]",
            marker.display()
        ),
    );
    let a = wait_agent(&s, |a| a["config_error"] != "");
    let err = a["config_error"].as_str().unwrap();
    assert!(
        err.contains("\\\"reload\\\"") || err.contains("reload"),
        "{err}"
    );
    assert_eq!(a["config_applied"], "");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "an action ran");
    assert!(!s.out.join("ntp.conf").exists());
}

#[test]
fn allowed_action_runs_once_per_change() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("ran");
    let s = setup(
        "web6",
        "on_change = \"chrony\"",
        &format!(
            "chrony = [\"/bin/sh\", \"-c\", \"echo ran >> {}\"]",
            marker.display()
        ),
    );
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    let good = wait_agent(&s, in_sync);
    assert_eq!(read(&marker), "ran\n");
    // A change elsewhere in the tree that does not change this file runs nothing.
    s.tree
        .write_project("[vars]\nntp = \"project.ntp\"\nunused = 1\n");
    std::thread::sleep(Duration::from_millis(500));
    s.tree.write_project("[vars]\nntp = \"second.ntp\"\n");
    wait_content(&s, &ntp, "server second.ntp", Duration::from_secs(5));
    wait_agent(&s, |a| {
        in_sync(a) && a["config_applied"] != good["config_applied"]
    });
    assert_eq!(read(&marker), "ran\nran\n");
}

#[test]
fn failing_action_rolls_the_files_back_and_nacks() {
    let dir = tempfile::tempdir().unwrap();
    // The action refuses any configuration that mentions "bad" (as `chronyd -p` would).
    let check = dir.path().join("check.sh");
    std::fs::write(
        &check,
        "#!/bin/sh\nif grep -q bad \"$1\"; then echo 'bad server' >&2; exit 4; fi\n",
    )
    .unwrap();
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let s = setup_with_check("web7", &check);
    let ntp = s.out.join("ntp.conf");
    let other = s.out.join("other.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    let good = wait_agent(&s, in_sync);

    s.tree.write_project(&format!(
        "[vars]\nntp = \"bad.ntp\"\n[files.other]\npath = {:?}\ncontent = \"new file\"\n",
        other.display().to_string()
    ));
    let a = wait_agent(&s, |a| a["config_error"] != "");
    let err = a["config_error"].as_str().unwrap();
    assert!(
        err.contains("bad server") && err.contains("restored"),
        "{err}"
    );
    assert_eq!(a["config_applied"], good["config_applied"]);
    // Rolled back: previous content, and the file the revision created is gone.
    assert!(read(&ntp).contains("server project.ntp"), "{}", read(&ntp));
    assert!(!other.exists());
}

fn setup_with_check(name: &str, check: &Path) -> Setup {
    let mut bastion = Bastion::init(PROJECT);
    let agent = Agent::new(name);
    let out = agent.dir.path().join("etc");
    std::fs::create_dir_all(&out).unwrap();
    let tree = Tree::new(PROJECT, &out, "on_change = \"check\"");
    bastion.enable_config_push(tree.dir.path());
    bastion.start();
    agent.append_config(&format!(
        "[config]\nallow_dirs = [{:?}]\n[config.actions]\ncheck = [{:?}, {:?}]\n",
        out.display().to_string(),
        check.display().to_string(),
        out.join("ntp.conf").display().to_string()
    ));
    let token = bastion.token(&[]);
    agent.enroll_ok(&bastion, &token);
    let mut s = Setup {
        bastion,
        agent,
        tree,
        out,
    };
    s.agent.start();
    assert!(s
        .bastion
        .wait_state(name, "online", Duration::from_secs(20)));
    s
}

#[test]
fn offline_agent_gets_the_latest_revision_on_reconnect_and_no_needless_push() {
    let mut s = setup("web8", "", "");
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    wait_agent(&s, in_sync);
    s.agent.stop();
    assert!(s
        .bastion
        .wait_state("web8", "offline", Duration::from_secs(10)));
    s.tree.write_project("[vars]\nntp = \"while-offline-1\"\n");
    std::thread::sleep(Duration::from_millis(300));
    s.tree.write_project("[vars]\nntp = \"while-offline-2\"\n");
    // The revision the tree now gives web8, as `config render` computes it from disk.
    let view: Value =
        serde_json::from_str(&s.bastion.cli_ok(&["config", "render", "web8", "--json"])).unwrap();
    let desired = view["revision"].clone();
    let a = wait_agent(&s, |a| a["config_desired"] == desired);
    assert_ne!(a["config_applied"], desired);
    assert!(read(&ntp).contains("server project.ntp"));
    s.agent.start();
    wait_content(&s, &ntp, "server while-offline-2", Duration::from_secs(10));
    wait_agent(&s, |a| in_sync(a) && a["config_applied"] == desired);
    let applied = s.agent.log_text().matches("configuration applied").count();

    // A restarted agent reports its applied revision: the bastion does not push it again.
    s.agent.stop();
    s.agent.start();
    assert!(s
        .bastion
        .wait_state("web8", "online", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        s.agent.log_text().matches("configuration applied").count(),
        applied,
        "{}",
        s.agent.log_text()
    );
    wait_agent(&s, |a| in_sync(a) && a["config_applied"] == desired);

    // The revisions survive a bastion restart.
    s.bastion.stop();
    s.bastion.start();
    let a = s.bastion.agent("web8").unwrap();
    assert_eq!(a["config_applied"], desired);
}

#[test]
fn unchanged_content_is_never_rewritten() {
    let s = setup("web9", "", "");
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    let rev1 = wait_agent(&s, in_sync)["config_applied"].clone();
    let m1 = std::fs::metadata(&ntp).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // A second file changes; the first one's content does not.
    let second = s.out.join("motd");
    s.tree.write_project(&format!(
        "[vars]\nntp = \"project.ntp\"\n[files.motd]\npath = {:?}\ncontent = \"hello {{{{ agent.name }}}}\\n\"\n",
        second.display().to_string()
    ));
    wait_content(&s, &second, "hello web9", Duration::from_secs(5));
    wait_agent(&s, |a| in_sync(a) && a["config_applied"] != rev1);
    let m2 = std::fs::metadata(&ntp).unwrap();
    assert_eq!(m1.ino(), m2.ino(), "the file was replaced");
    assert_eq!(
        (m1.mtime(), m1.mtime_nsec()),
        (m2.mtime(), m2.mtime_nsec()),
        "the file was rewritten"
    );
}

#[test]
fn missing_parent_directories_are_created_0755_under_the_allow_list() {
    let s = setup("web10", "", "");
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    let deep = s.out.join("app/conf.d/site.conf");
    let outside = s.agent.dir.path().join("outside");
    s.tree.write_project(&format!(
        "[vars]\nntp = \"project.ntp\"\n[files.deep]\npath = {:?}\ncontent = \"for {{{{ agent.name }}}}\\n\"\n",
        deep.display().to_string()
    ));
    wait_content(&s, &deep, "for web10", Duration::from_secs(5));
    for d in [s.out.join("app"), s.out.join("app/conf.d")] {
        let m = std::fs::metadata(&d).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o755, "{}", d.display());
    }
    let rev =
        wait_agent(&s, |a| in_sync(a) && a["config_state"] == "in-sync")["config_applied"].clone();

    // A file dropped from the desired state stays in place (it is not managed any more).
    s.tree.write_project("[vars]\nntp = \"dropped.ntp\"\n");
    wait_content(&s, &ntp, "server dropped.ntp", Duration::from_secs(5));
    wait_agent(&s, |a| in_sync(a) && a["config_applied"] != rev);
    assert_eq!(read(&deep), "for web10\n");

    // Never outside the allow-list: no directory is created there, the revision is NACKed.
    let evil = outside.join("new/dir/x.conf");
    s.tree.write_project(&format!(
        "[vars]\nntp = \"project.ntp\"\n[files.evil]\npath = {:?}\ncontent = \"x\"\n",
        evil.display().to_string()
    ));
    let a = wait_agent(&s, |a| a["config_state"] == "refused");
    assert!(
        a["config_error"].as_str().unwrap().contains("allow_dirs"),
        "{a}"
    );
    assert!(!outside.exists());
}

#[test]
fn refused_revision_is_shown_and_config_reload_sends_it_again() {
    let dir = tempfile::tempdir().unwrap();
    // A transient failure: the action fails while the flag file exists.
    let flag = dir.path().join("busy");
    let check = dir.path().join("check.sh");
    std::fs::write(
        &check,
        format!(
            "#!/bin/sh\nif [ -e {:?} ]; then echo 'daemon busy' >&2; exit 3; fi\n",
            flag.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let s = setup_with_check("web11", &check);
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    wait_agent(&s, in_sync);

    std::fs::write(&flag, "").unwrap();
    s.tree.write_project("[vars]\nntp = \"retry.ntp\"\n");
    let a = wait_agent(&s, |a| a["config_state"] == "refused");
    assert!(
        a["config_error"].as_str().unwrap().contains("daemon busy"),
        "{a}"
    );
    let list = s.bastion.cli_ok(&["agents", "list"]);
    assert!(
        list.contains("refused") && list.contains("bastide config reload"),
        "{list}"
    );
    let (_, body) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    assert!(
        body.contains("bastide_agents_config_state{state=\"refused\"} 1"),
        "{body}"
    );
    // A refused revision is not sent again by itself.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        s.agent.log_text().matches("configuration refused").count(),
        1,
        "{}",
        s.agent.log_text()
    );
    assert!(read(&ntp).contains("server project.ntp"));

    // The cause is gone; the admin's reload sends it again, and it is applied.
    std::fs::remove_file(&flag).unwrap();
    let out = s.bastion.cli_ok(&["config", "reload"]);
    assert!(
        out.contains("1 out-of-sync agent(s) sent their revision again"),
        "{out}"
    );
    wait_content(&s, &ntp, "server retry.ntp", Duration::from_secs(5));
    let a = wait_agent(&s, |a| in_sync(a) && a["config_state"] == "in-sync");
    assert_eq!(a["config_error"], "");
    let (_, body) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    assert!(
        body.contains("bastide_agents_config_state{state=\"refused\"} 0"),
        "{body}"
    );
}

/// A compromised bastion pushes log sources to read the VM's secrets: a file outside the
/// agent's local `[config] allow_log_sources`, then a symbolic link planted inside an allowed
/// directory, then (after an allowed revision is applied) a link that appears later. Each
/// refused revision is NACKed naming the path and the local setting, nothing of it applies,
/// and no secret line ever reaches the bastion's log store.
#[test]
fn pushed_log_sources_outside_the_local_allow_list_are_refused_even_through_symlinks() {
    let mut bastion = Bastion::init(PROJECT);
    let store = bastion.enable_log_store(None, "");
    let mut agent = Agent::new("logread");
    let out = agent.dir.path().join("etc");
    let app = agent.dir.path().join("app");
    let secret_dir = agent.dir.path().join("secret");
    for d in [&out, &app, &secret_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let shadow = secret_dir.join("shadow");
    std::fs::write(&shadow, "root:SECRET-HASH:19000::::::\n").unwrap();
    let tree = Tree::new(PROJECT, &out, "");
    bastion.enable_config_push(tree.dir.path());
    bastion.start();
    agent.append_config(&format!(
        "[logs]\nbatch_timeout = \"100ms\"\npoll_interval = \"50ms\"\n[config]\nallow_dirs = [{:?}]\nallow_log_sources = [{:?}]\n",
        out.display().to_string(),
        format!("{}/*.log", app.display())
    ));
    agent.enroll_ok(&bastion, &bastion.token(&[]));
    agent.start();
    let s = Setup {
        bastion,
        agent,
        tree,
        out,
    };
    assert!(s
        .bastion
        .wait_state("logread", "online", Duration::from_secs(20)));
    let ntp = s.out.join("ntp.conf");
    wait_content(&s, &ntp, "server project.ntp", Duration::from_secs(10));
    let good = wait_agent(&s, in_sync);
    let push = |ntp: &str, path: &Path| {
        s.tree.write_project(&format!(
            "[vars]\nntp = \"{ntp}\"\n\n[[agent.logs.sources]]\npath = {:?}\n",
            path.display().to_string()
        ))
    };
    let refused = |needle: &str| {
        let a = wait_agent(&s, |a| {
            a["config_error"]
                .as_str()
                .is_some_and(|e| e.contains(needle))
        });
        let err = a["config_error"].as_str().unwrap().to_string();
        assert!(err.contains("allow_log_sources"), "{err}");
        assert_eq!(a["config_applied"], good["config_applied"]);
        // Nothing of the refused revision applied, not even its allowed file.
        assert!(read(&ntp).contains("server project.ntp"));
        err
    };

    // 1. The secret itself.
    push("evil1.ntp", &shadow);
    let err = refused("secret/shadow");
    assert!(err.contains(&shadow.display().to_string()), "{err}");

    // 2. A glob under the allowed directory, where a local link leads to the secret.
    std::os::unix::fs::symlink(&shadow, app.join("shadow.log")).unwrap();
    push("evil2.ntp", &app.join("*.log"));
    let err = refused("resolves to");
    assert!(err.contains("shadow"), "{err}");

    // 3. Without the link the same source is allowed and ships; a link planted afterwards
    // is never read.
    std::fs::remove_file(app.join("shadow.log")).unwrap();
    std::fs::write(app.join("web.log"), "allowed line one\n").unwrap();
    push("good.ntp", &app.join("*.log"));
    wait_content(&s, &ntp, "server good.ntp", Duration::from_secs(10));
    wait_agent(&s, |a| {
        in_sync(a) && a["config_applied"] != good["config_applied"]
    });
    let shipped = wait_for(Duration::from_secs(20), || {
        log_store_lines(&store, "logread")
            .iter()
            .any(|l| l.contains("allowed line one"))
            .then_some(())
    });
    assert!(shipped.is_some(), "{}", s.agent.log_text());
    std::os::unix::fs::symlink(&shadow, app.join("late.log")).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&shadow)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"SECRET-LATER\n"))
        .unwrap();
    std::fs::write(app.join("web2.log"), "allowed line two\n").unwrap();
    let shipped = wait_for(Duration::from_secs(20), || {
        log_store_lines(&store, "logread")
            .iter()
            .any(|l| l.contains("allowed line two"))
            .then_some(())
    });
    assert!(shipped.is_some(), "{}", s.agent.log_text());
    std::thread::sleep(Duration::from_millis(500));
    let lines = log_store_lines(&store, "logread");
    assert!(
        !lines.iter().any(|l| l.contains("SECRET")),
        "a secret reached the bastion: {lines:?}"
    );
    assert!(
        s.agent
            .log_text()
            .contains("refused by the local allow-list"),
        "{}",
        s.agent.log_text()
    );
}

/// A local unprivileged user (`nobody`) who owns a directory under the allowed one swaps
/// its subdirectory for a symbolic link to a directory outside, in a tight loop, while the
/// bastion pushes revision after revision into that subdirectory (one file in it, one in a
/// directory to create below it). Nothing is ever written outside the allowed directory.
#[test]
fn racing_a_directory_swap_for_a_symlink_never_redirects_a_write_outside() {
    use std::os::unix::fs::PermissionsExt;
    let setpriv = bastide_tests::require("setpriv", "util-linux");
    let perl = bastide_tests::require("perl", "perl-base");
    assert!(
        bastide_tests::is_root(),
        "this test plays a local user against the root agent: run it as root (CI does)"
    );
    let race = tempfile::tempdir().unwrap();
    std::fs::set_permissions(race.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = race.path().join("etc");
    let outside = race.path().join("outside");
    let shared = out.join("shared");
    std::fs::create_dir_all(shared.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    for d in [race.path(), out.as_path(), outside.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The local user owns `shared` (and what is in it): it may rename and link there.
    for d in [&shared, &shared.join("sub")] {
        std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
    }

    let mut bastion = Bastion::init(PROJECT);
    let mut agent = Agent::new("racer");
    let tree = Tree::new(PROJECT, &out, "");
    bastion.enable_config_push(tree.dir.path());
    bastion.start();
    agent.append_config(&format!(
        "[config]\nallow_dirs = [{:?}]\n",
        out.display().to_string()
    ));
    agent.enroll_ok(&bastion, &bastion.token(&[]));
    agent.start();
    let s = Setup {
        bastion,
        agent,
        tree,
        out,
    };
    assert!(s
        .bastion
        .wait_state("racer", "online", Duration::from_secs(20)));
    wait_content(
        &s,
        &s.out.join("ntp.conf"),
        "server project.ntp",
        Duration::from_secs(10),
    );
    let push = |i: usize| {
        s.tree.write_project(&format!(
            "[vars]\nntp = \"r{i}.ntp\"\n\n[files.race]\npath = {:?}\ncontent = \"race {i}\"\nmode = \"0644\"\n\n[files.deep]\npath = {:?}\ncontent = \"deep {i}\"\nmode = \"0644\"\n",
            shared.join("sub/race.conf").display().to_string(),
            shared.join("sub/new/deep.conf").display().to_string(),
        ))
    };

    // The attacker: rename the real directory away, put a link to `outside` in its place,
    // then put the directory back, as fast as it can.
    let script = format!(
        "chdir {:?} or die; while (1) {{ rename 'sub', 'sub.real'; symlink {:?}, 'sub'; unlink 'sub'; rename 'sub.real', 'sub'; }}",
        shared.display().to_string(),
        outside.display().to_string()
    );
    /// Killed however the test ends (a failed assertion included).
    struct Attacker(std::process::Child);
    impl Drop for Attacker {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let attacker = Attacker(
        std::process::Command::new(&setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&perl)
            .args(["-e", &script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rounds = 60;
    for i in 0..rounds {
        push(i);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "a write was redirected outside the allowed directory\nagent:\n{}",
            s.agent.log_text()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(attacker);
    let leaked: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        leaked.is_empty(),
        "written outside the allowed directory: {leaked:?}\nagent:\n{}",
        s.agent.log_text()
    );
    let log = s.agent.log_text();
    let applies =
        log.matches("configuration applied").count() + log.matches("configuration refused").count();
    assert!(applies >= rounds / 3, "only {applies} applies ran:\n{log}");

    // Once the race is over, the next revision lands where it belongs.
    if std::fs::symlink_metadata(shared.join("sub")).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(shared.join("sub")).unwrap();
    }
    if !shared.join("sub").exists() {
        std::fs::rename(shared.join("sub.real"), shared.join("sub")).unwrap();
    }
    push(rounds);
    wait_content(
        &s,
        &shared.join("sub/race.conf"),
        &format!("race {rounds}"),
        Duration::from_secs(10),
    );
    wait_content(
        &s,
        &shared.join("sub/new/deep.conf"),
        &format!("deep {rounds}"),
        Duration::from_secs(10),
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}
