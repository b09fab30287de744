//! Configuration push from a git repository, with real git: a bare repository made by the
//! test (served over file:// and by `git daemon`), commits signed with `ssh-keygen` keys
//! through `git -c gpg.format=ssh`, the real bastion fetching it and a real agent applying
//! what it renders.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bastide_tests::{free_port, http_get, require, wait_for, Agent, Bastion, EnvTree as Tree};
use serde_json::Value;

const PROJECT: &str = "demo";

/// A working clone (the tree), the bare repository the bastion fetches, and signing keys.
struct Repo {
    tree: Tree,
    bare: PathBuf,
    keys: tempfile::TempDir,
}

impl Repo {
    fn new(out: &Path) -> Self {
        require("git", "git");
        require("ssh-keygen", "openssh-client");
        let tree = Tree::new(PROJECT, out, "");
        let keys = tempfile::Builder::new()
            .prefix("bastide-keys-")
            .tempdir()
            .unwrap();
        let bare = keys.path().join("srv/env.git");
        std::fs::create_dir_all(&bare).unwrap();
        let r = Repo { tree, bare, keys };
        r.git_in(&r.bare, &["init", "-q", "--bare", "-b", "main"]);
        r.git(&["init", "-q", "-b", "main"]);
        for who in ["alice", "mallory"] {
            let k = r.key(who);
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", who, "-f"])
                .arg(&k)
                .status()
                .unwrap();
            assert!(st.success());
        }
        // Only alice may sign.
        let pubkey = std::fs::read_to_string(r.key("alice").with_extension("pub")).unwrap();
        let mut parts = pubkey.split_whitespace();
        let line = format!(
            "alice@example.org {} {}\n",
            parts.next().unwrap(),
            parts.next().unwrap()
        );
        std::fs::write(r.signers(), line).unwrap();
        r
    }

    fn key(&self, who: &str) -> PathBuf {
        self.keys.path().join(format!("{who}_ed25519"))
    }

    fn signers(&self) -> PathBuf {
        self.keys.path().join("allowed_signers")
    }

    fn git_in(&self, dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HOME", self.keys.path())
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.org",
                "-c",
                "gpg.format=ssh",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn git(&self, args: &[&str]) -> String {
        self.git_in(self.tree.dir.path(), args)
    }

    /// Commits every change, signed by `signer`'s key if any; the commit id.
    fn commit(&self, msg: &str, signer: Option<&str>) -> String {
        self.git(&["add", "-A"]);
        match signer {
            Some(who) => {
                let key = format!("user.signingkey={}", self.key(who).display());
                self.git(&["-c", &key, "commit", "-q", "-S", "--allow-empty", "-m", msg]);
            }
            None => {
                self.git(&["commit", "-q", "--allow-empty", "-m", msg]);
            }
        }
        self.git(&["rev-parse", "HEAD"])
    }

    /// Pushes HEAD to the bare repository's main (forced: the tests rewind on purpose).
    fn push(&self) {
        let bare = self.bare.display().to_string();
        self.git(&["push", "-q", "--force", &bare, "HEAD:refs/heads/main"]);
    }

    fn set_ntp(&self, ntp: &str) {
        self.tree
            .write_project(&format!("[vars]\nntp = \"{ntp}\"\n"));
    }
}

struct Setup {
    bastion: Bastion,
    agent: Agent,
    repo: Repo,
    out: PathBuf,
}

impl Setup {
    fn ntp(&self) -> String {
        std::fs::read_to_string(self.out.join("ntp.conf")).unwrap_or_default()
    }

    fn wait_ntp(&self, needle: &str) {
        let ok = wait_for(Duration::from_secs(15), || {
            self.ntp().contains(needle).then_some(())
        });
        assert!(
            ok.is_some(),
            "ntp.conf never contained {needle:?} (has {:?})\nagent:\n{}\nbastion:\n{}",
            self.ntp(),
            self.agent.log_text(),
            self.bastion.log_text()
        );
    }

    fn source(&self) -> Value {
        let v: Value = serde_json::from_str(&self.bastion.cli_ok(&["status", "--json"])).unwrap();
        v["config_source"].clone()
    }

    fn wait_source(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(Duration::from_secs(15), || {
            Some(self.source()).filter(|s| pred(s))
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: status never matched: {}\nbastion:\n{}",
                self.source(),
                self.bastion.log_text()
            )
        })
    }

    fn applied(&self) -> String {
        self.bastion.agent(&self.agent.name).unwrap()["config_applied"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn wait_applied(&self, commit: &str) {
        let ok = wait_for(Duration::from_secs(15), || {
            self.applied()
                .starts_with(&format!("{commit}-"))
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "agent never applied {commit} (has {})\nbastion:\n{}",
            self.applied(),
            self.bastion.log_text()
        );
    }

    /// The refusal `bastide status` shows for `commit`.
    fn wait_refused(&self, commit: &str, reason: &str) -> Value {
        let s = self.wait_source(&format!("refusal of {commit}"), |s| {
            s["refused"]["commit"] == commit
        });
        assert_eq!(s["refused"]["reason"], reason, "{s}");
        s["refused"].clone()
    }
}

/// A bastion following `url` (`git_extra`: more keys of `[config_push.git]`) and one agent.
fn setup(name: &str, url: impl FnOnce(&Repo) -> String, git_extra: &str) -> Setup {
    let mut bastion = Bastion::init(PROJECT);
    let agent = Agent::new(name);
    let out = agent.dir.path().join("etc");
    std::fs::create_dir_all(&out).unwrap();
    let repo = Repo::new(&out);
    repo.commit("first", Some("alice"));
    repo.push();
    let url = url(&repo);
    bastion.edit_config(|c| {
        format!(
            "{c}\n[config_push]\ncloud = \"c1\"\nsite = \"s1\"\ninstance = \"prod\"\nbastion_address = \"127.0.0.1\"\n\n[config_push.git]\nurl = {url:?}\nbranch = \"main\"\nallowed_signers = {:?}\n{git_extra}\n",
            repo.signers().display().to_string()
        )
    });
    bastion.start();
    agent.append_config(&format!(
        "[config]\nallow_dirs = [{:?}]\n",
        out.display().to_string()
    ));
    let token = bastion.token(&[]);
    agent.enroll_ok(&bastion, &token);
    let mut s = Setup {
        bastion,
        agent,
        repo,
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

fn file_url(r: &Repo) -> String {
    format!("file://{}", r.bare.display())
}

#[test]
fn signed_commit_is_applied_unsigned_unknown_key_and_rewind_are_refused() {
    let s = setup(
        "gweb1",
        file_url,
        "poll_interval = \"1s\"\nverify = \"all\"\n",
    );
    let c1 = s.repo.git(&["rev-parse", "HEAD"]);
    s.wait_ntp("server project.ntp");
    s.wait_applied(&c1);

    // The commit is the revision: status, agents list, metrics.
    let src = s.wait_source("first commit", |v| v["commit"] == c1.as_str());
    assert_eq!(src["branch"], "main");
    let text = s.bastion.cli_ok(&["status"]);
    assert!(text.contains(&format!("commit {c1}")), "{text}");
    let list = s.bastion.cli_ok(&["agents", "list"]);
    assert!(list.contains(&c1[..8]), "{list}");
    let (code, body) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        body.contains(&format!(
            "bastide_config_source_info{{commit=\"{c1}\",branch=\"main\"}} 1"
        )),
        "{body}"
    );
    assert!(body.contains("# TYPE bastide_config_source_info gauge"));

    // An unsigned commit is refused; the previous revision stays.
    s.repo.set_ntp("unsigned.ntp");
    let c2 = s.repo.commit("unsigned", None);
    s.repo.push();
    let r = s.wait_refused(&c2, "unsigned");
    assert!(r["detail"].as_str().unwrap().contains("not signed"), "{r}");
    let text = s.bastion.cli_ok(&["status"]);
    assert!(
        text.contains(&format!("REFUSED commit {c2}: unsigned")),
        "{text}"
    );
    assert!(s
        .bastion
        .log_text()
        .contains("configuration commit refused: the last good one stays"));

    // Signed by a key not in allowed_signers: refused, the signer's key shown.
    s.repo.git(&["reset", "-q", "--hard", &c1]);
    s.repo.set_ntp("mallory.ntp");
    let c3 = s.repo.commit("mallory's", Some("mallory"));
    s.repo.push();
    let r = s.wait_refused(&c3, "unknown_signer");
    assert!(r["signer"].as_str().unwrap().starts_with("SHA256:"), "{r}");
    let text = s.bastion.cli_ok(&["status"]);
    assert!(text.contains("unknown_signer (signer SHA256:"), "{text}");

    // verify = "all": a signed head on top of an unsigned commit is refused too.
    s.repo.git(&["reset", "-q", "--hard", &c1]);
    s.repo.set_ntp("sneaky.ntp");
    let c4a = s.repo.commit("unsigned in the middle", None);
    s.repo.set_ntp("sneaky2.ntp");
    let c4 = s.repo.commit("signed on top", Some("alice"));
    s.repo.push();
    let r = s.wait_refused(&c4, "unsigned");
    assert!(r["detail"].as_str().unwrap().contains(&c4a), "{r}");

    // Nothing of the refused commits reached the agent.
    assert!(s.ntp().contains("server project.ntp"), "{}", s.ntp());
    assert!(s.applied().starts_with(&c1), "{}", s.applied());
    let (_, body) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    for reason in ["unsigned", "unknown_signer"] {
        assert!(
            body.contains(&format!(
                "bastide_config_source_refused_total{{reason=\"{reason}\"}}"
            )),
            "{body}"
        );
    }

    // A signed commit descending from the applied one is applied.
    s.repo.git(&["reset", "-q", "--hard", &c1]);
    s.repo.set_ntp("good.ntp");
    let c5 = s.repo.commit("good", Some("alice"));
    s.repo.push();
    s.wait_ntp("server good.ntp");
    s.wait_applied(&c5);
    let src = s.wait_source("good commit", |v| v["commit"] == c5.as_str());
    assert!(src["refused"].is_null(), "{src}");

    // Rewinding the branch (a signed commit that does not descend from c5): refused.
    s.repo.git(&["reset", "-q", "--hard", &c1]);
    s.repo.set_ntp("rewound.ntp");
    let c6 = s.repo.commit("rewound", Some("alice"));
    s.repo.push();
    let r = s.wait_refused(&c6, "force_push");
    assert!(r["detail"].as_str().unwrap().contains(&c5), "{r}");
    assert!(s.ntp().contains("server good.ntp"), "{}", s.ntp());
    assert!(s.applied().starts_with(&c5), "{}", s.applied());

    // The applied commit survives a restart: same revision, the agent is not pushed again.
    let before = s.applied();
    let mut s = s;
    s.bastion.stop();
    s.bastion.start();
    let src = s.wait_source("after restart", |v| v["commit"] == c5.as_str());
    assert_eq!(src["commit"], c5.as_str());
    assert_eq!(s.applied(), before);
}

/// A plain HTTP/1.0 POST: (status, body).
fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// `git daemon` serving the bare repository's parent on a free loopback port.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn git_daemon(r: &Repo) -> (Daemon, String) {
    let port = free_port();
    let base = r.bare.parent().unwrap().to_path_buf();
    // `git daemon` would run git-daemon as a child of `git`, which the drop's kill would
    // leave running: start git-daemon itself.
    let exec_path = Command::new("git")
        .arg("--exec-path")
        .output()
        .expect("git");
    let exec_path = String::from_utf8(exec_path.stdout).unwrap();
    let child = Command::new(std::path::Path::new(exec_path.trim()).join("git-daemon"))
        .arg("--export-all")
        .arg("--reuseaddr")
        .arg(format!("--base-path={}", base.display()))
        .arg(format!("--port={port}"))
        .arg("--listen=127.0.0.1")
        .arg(&base)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", r.keys.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon");
    let up = wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "git daemon did not listen on {port}");
    (Daemon(child), format!("git://127.0.0.1:{port}/env.git"))
}

/// HMAC-SHA256 as Gitea signs its webhook bodies, computed with openssl's reference
/// implementation rather than the bastion's own.
fn gitea_signature(secret: &str, body: &str) -> String {
    require("openssl", "openssl");
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn webhook_fetches_within_a_second_over_git_daemon_and_a_bad_secret_is_refused() {
    let hook_addr = format!("127.0.0.1:{}", free_port());
    let secret_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_dir.path().join("hook-secret");
    std::fs::write(&secret_file, "s3cret-token\n").unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut daemon = None;
    // Polling once an hour: only the webhook can bring a new commit in time.
    let extra = format!(
        "poll_interval = \"1h\"\nwebhook = {{ listen = {hook_addr:?}, secret_file = {:?}, max_connections_per_client = 4, timeout = \"2s\" }}\n",
        secret_file.display().to_string()
    );
    let s = setup(
        "gweb2",
        |r| {
            let (d, url) = git_daemon(r);
            daemon = Some(d);
            url
        },
        &extra,
    );
    let c1 = s.repo.git(&["rev-parse", "HEAD"]);
    s.wait_ntp("server project.ntp");
    s.wait_applied(&c1);
    let src = s.source();
    assert!(src["url"].as_str().unwrap().starts_with("git://"), "{src}");

    s.repo.set_ntp("hooked.ntp");
    let c2 = s.repo.commit("hooked", Some("alice"));
    s.repo.push();
    let body = r#"{"object_kind":"push","ref":"refs/heads/main"}"#;

    // A bad secret: 401, logged, nothing fetched.
    let (code, _) = http_post(
        &hook_addr,
        "/hooks/config",
        &[("X-Gitlab-Token", "wrong")],
        body,
    );
    assert_eq!(code, 401);
    let (code, _) = http_post(
        &hook_addr,
        "/hooks/config",
        &[("X-Gitea-Signature", &gitea_signature("wrong", body))],
        body,
    );
    assert_eq!(code, 401);
    let (code, _) = http_post(&hook_addr, "/hooks/config", &[], body);
    assert_eq!(code, 401);
    assert!(s
        .bastion
        .log_text()
        .contains("configuration webhook refused: bad or missing secret"));
    // A push to another branch is acknowledged and ignored.
    let (code, text) = http_post(
        &hook_addr,
        "/hooks/config",
        &[("X-Gitlab-Token", "s3cret-token")],
        r#"{"ref":"refs/heads/other"}"#,
    );
    assert_eq!((code, text.trim()), (202, "ignored: another branch"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.source()["fetched"], c1.as_str());

    // GitLab's token: fetched and applied within a second of the call.
    let t = Instant::now();
    let (code, _) = http_post(
        &hook_addr,
        "/hooks/config",
        &[("X-Gitlab-Token", "s3cret-token")],
        body,
    );
    assert_eq!(code, 202);
    s.wait_source("webhook fetch", |v| v["commit"] == c2.as_str());
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    s.wait_ntp("server hooked.ntp");
    s.wait_applied(&c2);

    // Gitea's signature of the body.
    s.repo.set_ntp("gitea.ntp");
    let c3 = s.repo.commit("gitea", Some("alice"));
    s.repo.push();
    let (code, _) = http_post(
        &hook_addr,
        "/hooks/config",
        &[("X-Gitea-Signature", &gitea_signature("s3cret-token", body))],
        body,
    );
    assert_eq!(code, 202);
    s.wait_source("gitea webhook", |v| v["commit"] == c3.as_str());
    s.wait_ntp("server gitea.ntp");
    let (_, metrics) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    assert!(
        metrics.contains("bastide_config_webhook_calls_total{result=\"unauthorized\"} 3"),
        "{metrics}"
    );

    // An attacker inside the allow-list holds idle connections: past 4 from its address they
    // are closed at once (logged, counted), the git server's call is still served at once,
    // and the idle ones are closed after the webhook's timeout (2 s).
    let port: u16 = hook_addr.rsplit(':').next().unwrap().parse().unwrap();
    let idle: Vec<std::net::TcpStream> = (0..12)
        .map(|_| bastide_tests::tcp_from("127.0.0.9", port))
        .collect();
    let logged = wait_for(Duration::from_secs(5), || {
        s.bastion
            .log_text()
            .contains("configuration webhook: too many connections: closing")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", s.bastion.log_text());
    s.repo.set_ntp("flooded.ntp");
    let c4 = s.repo.commit("while flooded", Some("alice"));
    s.repo.push();
    let t = Instant::now();
    let (code, _) = http_post(
        &hook_addr,
        "/hooks/config",
        &[("X-Gitlab-Token", "s3cret-token")],
        body,
    );
    assert_eq!(code, 202);
    s.wait_source("webhook fetch while flooded", |v| {
        v["commit"] == c4.as_str()
    });
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (_, metrics) = http_get(&s.bastion.metrics_addr, "/metrics", None);
    assert!(
        metrics.contains("bastide_config_webhook_calls_total{result=\"too_many_connections\"} 8"),
        "{metrics}"
    );
    // Every idle connection ends: the 8 refused at once, the 4 held after the timeout.
    let t = Instant::now();
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 64];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            r => panic!("an idle connection stayed open: {r:?}"),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    drop(daemon);
}

#[test]
fn check_config_wants_exactly_one_source_and_a_private_key_file() {
    let b = Bastion::init(PROJECT);
    let dir = tempfile::tempdir().unwrap();
    b.edit_config(|c| {
        format!(
            "{c}\n[config_push]\ndir = {:?}\ncloud = \"c1\"\nsite = \"s1\"\ninstance = \"prod\"\n[config_push.git]\nurl = \"file:///nowhere\"\n",
            dir.path().display().to_string()
        )
    });
    let out = b.cli(&["check-config"]);
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(err.contains("exactly one of dir"), "{err}");

    let key = dir.path().join("deploy_key");
    std::fs::write(&key, "not really a key").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    b.edit_config(|c| {
        let c = c.replacen(
            &format!("dir = {:?}\n", dir.path().display().to_string()),
            "",
            1,
        );
        format!(
            "{c}ssh_key = {:?}\nssh_known_hosts = {:?}\n",
            key.display().to_string(),
            key.display().to_string()
        )
    });
    let out = b.cli(&["check-config"]);
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        err.contains("config_push.git.ssh_key") && err.contains("0644"),
        "{err}"
    );
}

#[test]
fn plan_prints_the_diff_and_gates_with_exit_codes_without_pushing() {
    // Polling once an hour: the new head stays a candidate.
    let s = setup("gplan", file_url, "poll_interval = \"1h\"\n");
    let c1 = s.repo.git(&["rev-parse", "HEAD"]);
    s.wait_ntp("server project.ntp");
    s.wait_applied(&c1);
    let code = |o: &std::process::Output| o.status.code().unwrap_or(-1);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // The commit in force: nothing to change, exit 0.
    let o = s.bastion.cli(&["config", "plan", "--commit", &c1]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        text(&o).contains("1 agent(s): 0 changed, 0 error(s)"),
        "{}",
        text(&o)
    );

    // A new head (not fetched by the daemon yet): its diff and setting, exit 2.
    s.repo
        .tree
        .write_project("[vars]\nntp = \"plan.ntp\"\n\n[agent]\nmetrics_interval = \"7s\"\n");
    let c2 = s.repo.commit("plan me", Some("alice"));
    s.repo.push();
    let o = s.bastion.cli(&["config", "plan"]);
    let out = text(&o);
    assert_eq!(code(&o), 2, "{out}");
    assert!(out.contains(&format!("# plan of commit {c2}")), "{out}");
    assert!(out.contains("## agent gplan"), "{out}");
    let ntp = s.out.join("ntp.conf").display().to_string();
    assert!(out.contains(&format!("changed {ntp}\n--- a{ntp}\n+++ b{ntp}\n@@ -1,2 +1,2 @@\n-server project.ntp iburst\n+server plan.ntp iburst\n")), "{out}");
    assert!(
        out.contains("setting agent.metrics_interval: local -> 7s"),
        "{out}"
    );
    assert!(
        out.contains(
            "1 agent(s): 1 changed, 0 error(s); files: 0 added, 1 changed, 0 removed, 0 unchanged"
        ),
        "{out}"
    );
    // --json for pipelines, the same exit code.
    let o = s
        .bastion
        .cli(&["config", "plan", "--json", "--agent", "gplan"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["changed"], 1, "{v}");
    assert_eq!(v["summary"]["files_changed"], 1, "{v}");
    assert_eq!(v["agents"][0]["files"][0]["change"], "changed", "{v}");
    assert!(v["agents"][0]["candidate"]
        .as_str()
        .unwrap()
        .starts_with(&c2));
    assert!(v["agents"][0]["applied"].as_str().unwrap().starts_with(&c1));
    assert!(v["refusal"].is_null(), "{v}");
    // Nothing was pushed.
    assert!(s.ntp().contains("server project.ntp"), "{}", s.ntp());
    assert!(s.applied().starts_with(&c1));

    // An unsigned commit with a template error: errors, exit 1, and the refusal it would get.
    s.repo
        .tree
        .write("templates/ntp.conf.j2", "server {{ ntp }\n");
    let c3 = s.repo.commit("broken", None);
    s.repo.push();
    let o = s.bastion.cli(&["config", "plan", "--commit", &c3]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert!(out.contains("templates/ntp.conf.j2"), "{out}");
    assert!(
        out.contains("the bastion would refuse this commit: unsigned"),
        "{out}"
    );
    // A directory on the bastion's disk, and an unknown agent.
    let dir = s.repo.tree.dir.path().display().to_string();
    let o = s.bastion.cli(&["config", "plan", "--dir", &dir]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    s.repo.tree.write(
        "templates/ntp.conf.j2",
        "server {{ ntp }} iburst\n# {{ agent.name }} via {{ bastion.address }}\n",
    );
    let o = s.bastion.cli(&["config", "plan", "--dir", &dir]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    let o = s
        .bastion
        .cli(&["config", "plan", "--agent", "nope", "--commit", &c1]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        text(&o).contains("unknown or inactive agent"),
        "{}",
        text(&o)
    );

    // Offline, as a CI job on the git server would run it: a registry snapshot exported
    // from the bastion (mode 0600), then the plan of a checkout with no bastion, no
    // configuration file, no state directory and no admin socket.
    let snap_dir = tempfile::tempdir().unwrap();
    let snap = snap_dir.path().join("registry.json");
    let out = s
        .bastion
        .cli_ok(&["config", "snapshot", "--out", snap.to_str().unwrap()]);
    assert!(out.contains("registry snapshot of 1 agent(s)"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&snap).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let v: Value = serde_json::from_slice(&std::fs::read(&snap).unwrap()).unwrap();
    let a = &v["agents"][0];
    assert_eq!(a["name"], "gplan", "{v}");
    assert_eq!(a["facts"]["addresses"][0], s.agent.ip.as_str(), "{v}");
    assert_eq!(a["basis"], "applied", "{v}");
    assert!(a["applied"].as_str().unwrap().starts_with(&c1), "{v}");
    assert!(a["push"]["files"][0]["text"]
        .as_str()
        .unwrap()
        .contains("server project.ntp"));
    let nowhere = snap_dir.path().join("no-such-dir");
    let offline = |dir: &str, extra: &[&str]| {
        Command::new(bastide_tests::bin("bastide"))
            .current_dir(snap_dir.path())
            .env_remove("BASTIDE_SOCKET")
            .arg("--config")
            .arg(nowhere.join("bastide.toml"))
            .args(["config", "plan", "--offline", "--snapshot"])
            .arg(&snap)
            .args(["--dir", dir])
            .args(extra)
            .output()
            .unwrap()
    };
    // The changed tree: the same text as the bastion's own plan of that directory (whose
    // agent is in sync with c1), exit 2; the template reads the bastion's variables and
    // the agent's facts from the snapshot.
    let o = offline(&dir, &[]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    let online = s.bastion.cli(&["config", "plan", "--dir", &dir]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&online.stdout)
    );
    let out = text(&o);
    assert!(out.contains(&format!("changed {ntp}\n--- a{ntp}\n+++ b{ntp}\n@@ -1,2 +1,2 @@\n-server project.ntp iburst\n+server plan.ntp iburst\n # gplan via 127.0.0.1\n")), "{out}");
    assert!(
        out.contains("setting agent.metrics_interval: local -> 7s"),
        "{out}"
    );
    let o = offline(&dir, &["--json", "--agent", "gplan"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["files_changed"], 1, "{v}");
    // The commit the agent applied, checked out: nothing to change, exit 0.
    let same = snap_dir.path().join("c1");
    std::fs::create_dir_all(&same).unwrap();
    let tar = snap_dir.path().join("c1.tar");
    s.repo.git(&["archive", "-o", tar.to_str().unwrap(), &c1]);
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&same)
        .status()
        .unwrap();
    assert!(st.success());
    let o = offline(same.to_str().unwrap(), &[]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        text(&o).contains("1 agent(s): 0 changed, 0 error(s)"),
        "{}",
        text(&o)
    );
    // A broken template, and an agent not in the snapshot: exit 1.
    s.repo
        .tree
        .write("templates/ntp.conf.j2", "server {{ ntp }\n");
    let o = offline(&dir, &[]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("templates/ntp.conf.j2"), "{}", text(&o));
    let o = offline(same.to_str().unwrap(), &["--agent", "nope"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("not in the snapshot"), "{}", text(&o));
}

/// Each agent writes under its own directory: its host file points the tree's file there.
fn host_file(out: &Path, evil: Option<&Path>) -> String {
    let mut t = format!(
        "[files.ntp]\npath = {:?}\n",
        out.join("ntp.conf").display().to_string()
    );
    if let Some(e) = evil {
        t.push_str(&format!(
            "[files.evil]\npath = {:?}\ncontent = \"x\"\n",
            e.join("x").display().to_string()
        ));
    }
    t
}

/// 20 agents, two canaries (`roll00` NACKs when the tree writes outside its allow_dirs,
/// `roll01` goes offline during a bake): the rollout halts at the canary wave on a NACK and
/// on an agent going offline in the bake, abort and resume behave as stated, and a plan
/// compares with what each agent applied (not the revision in force) when they differ.
#[test]
fn rollout_halts_at_the_canary_wave_on_a_nack_and_abort_and_resume_behave() {
    const N: usize = 20;
    let t0 = Instant::now();
    let mut bastion = Bastion::init(PROJECT);
    let mut agents: Vec<Agent> = (0..N).map(|i| Agent::new(&format!("roll{i:02}"))).collect();
    let name = |i: usize| format!("roll{i:02}");
    let outs: Vec<PathBuf> = agents
        .iter()
        .map(|a| {
            let o = a.dir.path().join("etc");
            std::fs::create_dir_all(&o).unwrap();
            o
        })
        .collect();
    let repo = Repo::new(&outs[0]);
    let homes: Vec<(String, PathBuf)> = agents
        .iter()
        .map(|a| (a.name.clone(), a.dir.path().to_path_buf()))
        .collect();
    let write_hosts = |canary_evil: bool| {
        for (i, (name, home)) in homes.iter().enumerate() {
            let evil = (i == 0 && canary_evil).then(|| home.join("outside"));
            std::fs::write(
                repo.tree.host_file(name),
                host_file(&outs[i], evil.as_deref()),
            )
            .unwrap();
        }
    };
    write_hosts(false);
    let c1 = repo.commit("first", Some("alice"));
    repo.push();
    bastion.edit_config(|c| {
        format!(
            "{c}\n[config_push]\ncloud = \"c1\"\nsite = \"s1\"\ninstance = \"prod\"\nbastion_address = \"127.0.0.1\"\n\n[config_push.git]\nurl = {:?}\npoll_interval = \"1s\"\nallowed_signers = {:?}\n\n[config_push.rollout]\nwaves = [{{ label = \"canary=yes\" }}, {{ percent = 50 }}]\nbake_time = \"2s\"\n",
            file_url(&repo),
            repo.signers().display().to_string()
        )
    });
    bastion.start();
    // Enrolled all at once: two canaries, then the others.
    let canary = bastion.token(&["--labels", "canary=yes", "--uses", "2"]);
    let others = bastion.token(&["--uses", &(N - 2).to_string()]);
    let enrolls: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.append_config(&format!(
                "[config]\nallow_dirs = [{:?}]\n",
                outs[i].display().to_string()
            ));
            let token = if i < 2 { &canary } else { &others };
            a.enroll_cmd(&bastion, token, &[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, mut c) in enrolls.into_iter().enumerate() {
        assert!(c.wait().unwrap().success(), "enroll {}", name(i));
    }
    for a in agents.iter_mut() {
        a.start();
    }
    // (desired, applied, state) of every agent, from one `agents list`.
    let states = || -> std::collections::HashMap<String, (String, String, String)> {
        bastion
            .agents()
            .into_iter()
            .map(|a| {
                let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
                (
                    s("name"),
                    (s("config_desired"), s("config_applied"), s("config_state")),
                )
            })
            .collect()
    };
    let applied = |i: usize| states().remove(&name(i)).unwrap_or_default();
    let wait_all = |commit: &str, which: &[usize]| {
        let ok = wait_for(Duration::from_secs(30), || {
            let st = states();
            which
                .iter()
                .all(|i| st.get(&name(*i)).is_some_and(|s| s.1.starts_with(commit)))
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "not every agent applied {commit}: {:?}\n{}",
            states(),
            bastion.log_text()
        );
    };
    let everyone: Vec<usize> = (0..N).collect();
    wait_all(&c1, &everyone);
    eprintln!("20 agents enrolled and on c1 in {:?}", t0.elapsed());
    let rollout = || -> Value {
        let out = bastion.cli(&["config", "rollout", "status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let wait_rollout = |source: &str, state: &str| -> Value {
        wait_for(Duration::from_secs(30), || {
            Some(rollout()).filter(|r| r["source"] == source && r["state"] == state)
        })
        .unwrap_or_else(|| {
            panic!(
                "rollout of {source} never {state}: {}\n{}",
                rollout(),
                bastion.log_text()
            )
        })
    };
    // Agents other than the canaries keep `commit`, desired and applied.
    let others_keep = |commit: &str| {
        let st = states();
        for i in 2..N {
            let (d, a, _) = &st[&name(i)];
            assert!(
                d.starts_with(commit) && a.starts_with(commit),
                "{}: {d} {a}",
                name(i)
            );
        }
    };

    // c2: the canary NACKs (a file outside its allow_dirs): the rollout halts at wave 1 and
    // nobody else is sent c2.
    repo.set_ntp("c2.ntp");
    write_hosts(true);
    let c2 = repo.commit("bad for the canary", Some("alice"));
    repo.push();
    let r = wait_rollout(&c2, "halted");
    assert_eq!(r["wave"], 1, "{r}");
    assert_eq!(r["failure"]["agent"], "roll00", "{r}");
    assert_eq!(r["failure"]["reason"], "nack", "{r}");
    assert!(
        r["failure"]["error"]
            .as_str()
            .unwrap()
            .contains("allow_dirs"),
        "{r}"
    );
    assert_eq!(r["waves"][0]["name"], "label canary=yes", "{r}");
    assert_eq!(r["waves"][0]["agents"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["waves"][1]["agents"].as_array().unwrap().len(), 8, "{r}");
    assert_eq!(r["waves"][2]["name"], "rest", "{r}");
    assert_eq!(r["waves"][2]["agents"].as_array().unwrap().len(), 10, "{r}");
    assert_eq!(r["waves"][1]["reached"], false, "{r}");
    let text = bastion.cli_ok(&["config", "rollout", "status"]);
    assert!(
        text.contains("HALTED at wave 1: agent roll00 refused the revision (NACK)"),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(300));
    others_keep(&c1);

    // Abort: the canary's desired revision is c1 again, and c1 is the commit in force.
    let out = bastion.cli_ok(&["config", "rollout", "abort"]);
    assert!(out.contains("aborted"), "{out}");
    let (d, a, st) = applied(0);
    assert!(d.starts_with(&c1) && a.starts_with(&c1), "{d} {a}");
    assert_eq!(st, "in-sync");
    let v: Value = serde_json::from_str(&bastion.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(v["config_source"]["commit"], c1.as_str(), "{v}");
    assert_eq!(v["config_source"]["refused"]["reason"], "aborted", "{v}");

    // c3, good: the canaries take it; the second canary goes offline during the bake, which
    // halts the rollout before wave 2.
    repo.set_ntp("c3.ntp");
    write_hosts(false);
    let c3 = repo.commit("good", Some("alice"));
    repo.push();
    let baking = wait_for(Duration::from_secs(30), || {
        Some(rollout()).filter(|r| {
            r["source"] == c3.as_str() && (r["state"] == "baking" || r["waves"][0]["acked"] == 2)
        })
    })
    .unwrap_or_else(|| panic!("the canaries never took c3: {}", rollout()));
    assert_eq!(baking["wave"], 1, "{baking}");
    agents[1].stop();
    let r = wait_rollout(&c3, "halted");
    assert_eq!(r["wave"], 1, "{r}");
    assert_eq!(r["failure"]["agent"], "roll01", "{r}");
    assert_eq!(r["failure"]["reason"], "offline", "{r}");
    assert_eq!(r["waves"][1]["reached"], false, "{r}");
    others_keep(&c1);
    // Back online, resumed: wave by wave to everyone (the last wave after wave 2's bake).
    agents[1].start();
    assert!(bastion.wait_state("roll01", "online", Duration::from_secs(20)));
    bastion.cli_ok(&["config", "rollout", "resume"]);
    let r = wait_rollout(&c3, "done");
    wait_all(&c3, &everyone);
    assert!(r["waves"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["reached"] == true && w["acked"] == w["agents"].as_array().unwrap().len()));

    // c4 halts at the canary again; resume goes on to the other waves.
    repo.set_ntp("c4.ntp");
    write_hosts(true);
    let c4 = repo.commit("bad for the canary again", Some("alice"));
    repo.push();
    wait_rollout(&c4, "halted");
    bastion.cli_ok(&["config", "rollout", "resume"]);
    wait_rollout(&c4, "done");
    wait_all(&c4, &(1..N).collect::<Vec<_>>());
    let (d, a, st) = applied(0);
    assert!(d.starts_with(&c4) && a.starts_with(&c3), "{d} {a}");
    assert_eq!(st, "refused");
    let (_, metrics) = http_get(&bastion.metrics_addr, "/metrics", None);
    for result in ["halted", "done", "aborted"] {
        assert!(
            metrics.contains(&format!(
                "bastide_config_rollouts_total{{result=\"{result}\"}}"
            )),
            "{metrics}"
        );
    }

    // The canary is behind (it refused c4, which is in force for it): a plan of c4 compares
    // with the c3 it applied, not with c4; an agent in sync has nothing to change.
    let o = bastion.cli(&["config", "plan", "--json", "--commit", &c4]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let row = |n: &str| {
        v["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent"] == n)
            .cloned()
            .unwrap()
    };
    let canary0 = row("roll00");
    assert_eq!(canary0["basis"], "applied", "{canary0}");
    assert!(
        canary0["applied"].as_str().unwrap().starts_with(&c3),
        "{canary0}"
    );
    assert!(
        canary0["in_force"].as_str().unwrap().starts_with(&c4),
        "{canary0}"
    );
    assert_eq!(canary0["status"], "changed", "{canary0}");
    let diff = canary0["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or("").to_string();
            format!("{} {}\n{}", s("change"), s("path"), s("diff"))
        })
        .collect::<String>();
    assert!(
        diff.contains("-server c3.ntp iburst\n+server c4.ntp iburst\n"),
        "{diff}"
    );
    assert!(diff.contains("added "), "{diff}");
    assert_eq!(row("roll05")["status"], "unchanged");
    assert_eq!(v["summary"]["changed"], 1, "{v}");
    // The snapshot for offline plans carries the same basis: the files of c3.
    let snap = tempfile::tempdir().unwrap();
    let file = snap.path().join("registry.json");
    bastion.cli_ok(&["config", "snapshot", "--out", file.to_str().unwrap()]);
    let s: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let a0 = s["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "roll00")
        .unwrap();
    assert_eq!(a0["basis"], "applied", "{a0}");
    assert!(
        a0["push"]["revision"].as_str().unwrap().starts_with(&c3),
        "{a0}"
    );
    eprintln!("rollout test body took {:?}", t0.elapsed());
}
