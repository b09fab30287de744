//! SSH jump access with real OpenSSH on both sides: the Debian `sshd` as the target (its own
//! host key, which an enrolled agent reports), the real `bastide` as the jump host, and the
//! real `ssh`/`scp` clients, all over loopback.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bastide_tests::{free_port, require, wait_for, Agent, Bastion};
use serde_json::Value;

/// Progress with elapsed time, shown with --nocapture.
fn step(t0: Instant, what: &str) {
    eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
}

fn keygen() -> PathBuf {
    require("ssh-keygen", "openssh-client")
}

fn out_str(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh Ed25519 key pair at `path` (and `path.pub`).
fn new_key(path: &Path) {
    let o = Command::new(keygen())
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_str(&o));
}

fn public(path: &Path) -> String {
    std::fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// Signs `key.pub` with `ca`; `args` are extra ssh-keygen options (-n, -V, -O, -h).
fn sign(ca: &Path, key: &Path, id: &str, args: &[&str]) {
    let o = Command::new(keygen())
        .arg("-q")
        .arg("-s")
        .arg(ca)
        .args(["-I", id])
        .args(args)
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_str(&o));
}

/// The target: the Debian sshd on a free loopback port.
struct Sshd {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Sshd {
    /// Listens on `ip` (the agent's own address); `host_key` is the private host key;
    /// `authorized` the authorized_keys content for root.
    fn start(dir: &Path, ip: &str, host_key: &Path, authorized: &str) -> Self {
        let sshd = require("sshd", "openssh-server");
        // sshd run as root insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let ak = dir.join("authorized_keys");
        std::fs::write(&ak, authorized).unwrap();
        let cfg = dir.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "ListenAddress {ip}:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\nMaxStartups 1000\nMaxSessions 1000\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n",
                host_key.display(),
                ak.display()
            ),
        )
        .unwrap();
        // A host certificate next to the key (made by tests that use a host CA) is served.
        let cert = PathBuf::from(format!("{}-cert.pub", host_key.display()));
        if cert.exists() {
            let mut text = std::fs::read_to_string(&cfg).unwrap();
            text.push_str(&format!("HostCertificate {}\n", cert.display()));
            std::fs::write(&cfg, text).unwrap();
        }
        let log = dir.join("sshd.log");
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Self { child, port, log };
        let up = wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect((ip, port)).ok()
        });
        if up.is_none() {
            let _ = s.child.kill();
            panic!("sshd did not start: {}", s.log_text());
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bastion with `[ssh]`, an enrolled agent "web01" (labels env=test) whose host key is
/// the target sshd's, and that sshd.
struct Env {
    b: Bastion,
    _agent: Agent,
    /// The target's (and its agent's) own address.
    ip: String,
    sshd: Sshd,
    dir: tempfile::TempDir,
    ssh_port: u16,
    audit: PathBuf,
    /// Admin keys by name.
    alice: PathBuf,
    bob: PathBuf,
    /// User-certificate CA trusted for "carol".
    ca: PathBuf,
}

impl Env {
    /// `extra` is appended inside the [ssh] table (before the admins).
    fn new(extra: &str) -> Self {
        Self::with(extra, |c| c)
    }

    /// [`Env::new`], with `edit` applied to the bastion's configuration file first.
    fn with(extra: &str, edit: impl FnOnce(String) -> String) -> Self {
        require("ssh", "openssh-client");
        let dir = tempfile::Builder::new()
            .prefix("bastide-ssh-test-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let alice = d.join("alice");
        let bob = d.join("bob");
        let ca = d.join("user_ca");
        for k in [&alice, &bob, &ca] {
            new_key(k);
        }
        let mut agent = Agent::new("web01");
        let host_key = agent.dir.path().join("ssh/ssh_host_ed25519_key");
        new_key(&host_key);
        // The target admits the admins' keys and carol's certificates.
        let authorized = format!(
            "{}\n{}\ncert-authority,principals=\"carol\" {}\n",
            public(&alice),
            public(&bob),
            public(&ca)
        );
        // "@HOST_CA@" in `extra` stands for a host CA made here, which signs the target's
        // host key (for web01, its FQDN and 127.0.0.1).
        let extra = if extra.contains("@HOST_CA@") {
            let hca = d.join("host_ca");
            new_key(&hca);
            sign(
                &hca,
                &host_key,
                "web01-host",
                &["-h", "-n", &format!("web01,web01.proj.test,{}", agent.ip)],
            );
            extra.replace("@HOST_CA@", &public(&hca))
        } else {
            extra.to_string()
        };
        let sshd = Sshd::start(d, &agent.ip, &host_key, &authorized);

        let mut b = Bastion::init("proj");
        let ssh_port = free_port();
        let audit = d.join("audit.jsonl");
        let cfg = format!(
            r#"
[ssh]
listen = "127.0.0.1:{ssh_port}"
audit_log = "{audit}"
public_host = "127.0.0.1"
auth_rejection_delay = "50ms"
auth_timeout = "2s"
{extra}

[[ssh.admins]]
name = "alice"
keys = ["{alice_pub}"]
groups = ["ops"]

[[ssh.admins]]
name = "bob"
keys = ["{bob_pub}"]

[[ssh.admins]]
name = "carol"
keys = ["cert-authority {ca_pub}"]

[[ssh.rules]]
groups = ["ops"]
agents = ["web*"]
labels = {{ env = "test" }}
ports = [{tport}]

[[ssh.rules]]
admins = ["alice", "carol"]
cidrs = ["127.0.0.0/8"]
ports = [{tport}, 9]

[[ssh.rules]]
admins = ["bob"]
agents = ["db*"]
ports = [{tport}]
"#,
            audit = audit.display(),
            alice_pub = public(&alice),
            bob_pub = public(&bob),
            ca_pub = public(&ca),
            tport = sshd.port,
        );
        b.edit_config(|c| c + &cfg);
        b.edit_config(edit);
        let out = b.cli(&["check-config"]);
        assert!(out.status.success(), "{}", out_str(&out));
        b.start();
        let token = b.token(&["--labels", "env=test"]);
        agent.enroll_ok(&b, &token);
        agent.start();
        let registered = wait_for(Duration::from_secs(20), || {
            b.agent("web01").filter(|a| {
                a["state"] == "online" && a["addresses"].as_array().is_some_and(|v| !v.is_empty())
            })
        });
        assert!(
            registered.is_some(),
            "agent not online: {}",
            agent.log_text()
        );
        Env {
            b,
            ip: agent.ip.clone(),
            _agent: agent,
            sshd,
            dir,
            ssh_port,
            audit,
            alice,
            bob,
            ca,
        }
    }

    /// An ssh_config file (passed with -F, which `ssh -J` hands on to the jump connection).
    fn client_config(&self, name: &str, identity: &Path, extra: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.ssh_config"));
        std::fs::write(
            &p,
            format!(
                "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  LogLevel INFO\n  ConnectTimeout 10\n{extra}",
                identity.display()
            ),
        )
        .unwrap();
        p
    }

    fn jump(&self, user: &str) -> String {
        format!("{user}@127.0.0.1:{}", self.ssh_port)
    }

    /// `ssh -F cfg -J user@bastion -p <target port> root@target cmd`.
    fn ssh_j(&self, cfg: &Path, user: &str, target: &str, cmd: &str) -> Output {
        Command::new("ssh")
            .arg("-F")
            .arg(cfg)
            .args(["-J", &self.jump(user), "-p", &self.sshd.port.to_string()])
            .arg(format!("root@{target}"))
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn logs(&self) -> String {
        format!(
            "--- bastide ---\n{}\n--- sshd ---\n{}",
            self.b.log_text(),
            self.sshd.log_text()
        )
    }
}

fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn jump_commands_scp_names_denials_shell_and_known_hosts() {
    let t0 = Instant::now();
    let env = Env::new("");
    let alice = env.client_config("alice", &env.alice, "");

    step(
        t0,
        "ssh -J runs a remote command through the bastion and returns",
    );
    // ssh -J runs a remote command through the bastion and returns its output, fast.
    let t = Instant::now();
    let o = env.ssh_j(&alice, "alice", &env.ip, "echo hello-from-target");
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.logs());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "hello-from-target"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "ssh -J took {:?}",
        t.elapsed()
    );

    step(
        t0,
        "The target named by its enrolled agent name (short and FQDN)",
    );
    // The target named by its enrolled agent name (short and FQDN) resolves.
    for name in ["web01", "web01.proj.test"] {
        let o = env.ssh_j(
            &alice,
            "alice",
            name,
            "hostname >/dev/null && echo via-name",
        );
        assert!(
            o.status.success(),
            "{name}: {}\n{}",
            out_str(&o),
            env.logs()
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "via-name");
    }
    let lines = env.audit_lines();
    // An allowed jump: a start line when it opens, then the full record when it ends.
    let start = lines
        .iter()
        .position(|l| l["target"] == "web01" && l["event"] == "start")
        .expect("audit start line for web01");
    assert_eq!(lines[start]["decision"], "allowed");
    assert!(lines[start]["end"].is_null() && lines[start]["start"].is_string());
    let web = lines[start..]
        .iter()
        .find(|l| l["target"] == "web01" && l["decision"] == "allowed" && l["event"] == "end")
        .expect("audit line for web01");
    assert_eq!(web["start"], lines[start]["start"]);
    assert_eq!(web["agent"], "web01");
    assert_eq!(web["resolved"], env.ip.as_str());
    assert_eq!(web["admin"], "alice");
    assert!(web["key_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("SHA256:"));
    assert!(web["bytes_from_target"].as_u64().unwrap() > 0);
    assert!(web["bytes_to_target"].as_u64().unwrap() > 0);
    assert!(web["start"].is_string() && web["end"].is_string());

    step(t0, "scp -J copies a 50 MiB file intact.");
    // scp -J copies a 50 MiB file intact, rekeying on the way without a stall.
    let src = env.dir.path().join("blob");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..50 {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let dst = env.dir.path().join("blob.copy");
    // RekeyLimit makes the client rekey both hops several times during the copy.
    let rekey = env.client_config("alice-rekey", &env.alice, "  RekeyLimit 8M\n");
    let o = Command::new(require("scp", "openssh-client"))
        .arg("-F")
        .arg(&rekey)
        .args(["-J", &env.jump("alice"), "-P", &env.sshd.port.to_string()])
        .arg(&src)
        .arg(format!("root@web01:{}", dst.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.logs());
    assert_eq!(sha256(&src), sha256(&dst));

    step(
        t0,
        "An admin without a rule for the target is denied, and the au",
    );
    // An admin without a rule for the target is denied, and the audit line says why.
    let bob = env.client_config("bob", &env.bob, "");
    let o = env.ssh_j(&bob, "bob", "web01", "echo should-not-run");
    assert!(!o.status.success(), "{}", out_str(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no rule allows bob"), "{}", out_str(&o));
    let denied = wait_for(Duration::from_secs(5), || {
        env.audit_lines()
            .into_iter()
            .find(|l| l["admin"] == "bob" && l["decision"] == "denied")
    })
    .expect("audit line for bob");
    assert_eq!(denied["event"], "denied");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("no rule allows bob to reach web01"),
        "{denied}"
    );
    assert_eq!(denied["target"], "web01");
    assert_eq!(denied["agent"], "web01");

    step(t0, "An unknown key is refused.");
    // An unknown key is refused.
    let stranger = env.dir.path().join("stranger");
    new_key(&stranger);
    let cfg = env.client_config("stranger", &stranger, "");
    let o = env.ssh_j(&cfg, "alice", "web01", "echo nope");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        out_str(&o)
    );

    step(
        t0,
        "A shell on the bastion is refused with the message; so is a ",
    );
    // A shell on the bastion is refused with the message; so is a command.
    for cmd in [None, Some("id")] {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&alice)
            .args(["-p", &env.ssh_port.to_string(), "alice@127.0.0.1"]);
        if let Some(cmd) = cmd {
            c.arg(cmd);
        }
        let o = c.stdin(Stdio::null()).output().unwrap();
        assert!(!o.status.success(), "{}", out_str(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("this host is a jump host: use ssh -J"),
            "{}",
            out_str(&o)
        );
    }
    step(t0, "Remote forwarding is refused.");
    // A client that never authenticates is cut at auth_timeout (2 s here).
    {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", env.ssh_port)).unwrap();
        c.write_all(b"SSH-2.0-silent_test\r\n").unwrap();
        let t = Instant::now();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = [0u8; 4096];
        while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
        let waited = t.elapsed();
        assert!(
            waited > Duration::from_millis(1500) && waited < Duration::from_secs(5),
            "cut after {waited:?}"
        );
    }
    // Remote forwarding is refused.
    let o = Command::new("ssh")
        .arg("-F")
        .arg(&alice)
        .args([
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
            "-R",
            "0:127.0.0.1:22",
        ])
        .args(["-p", &env.ssh_port.to_string(), "alice@127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", out_str(&o));

    step(
        t0,
        "known_hosts from `bastide ssh known-hosts`: strict checking ",
    );
    // known_hosts from `bastide ssh known-hosts`: strict checking succeeds with no prompt,
    // through the ~/.ssh/config snippet from `bastide ssh config`.
    let kh = env.dir.path().join("known_hosts");
    std::fs::write(&kh, env.b.cli_ok(&["ssh", "known-hosts"])).unwrap();
    let fp = env.b.cli_ok(&["ssh", "fingerprint"]);
    assert!(fp.starts_with("SHA256:"), "{fp}");
    let snippet = env.b.cli_ok(&[
        "ssh",
        "config",
        "--user",
        "alice",
        "--known-hosts",
        &kh.display().to_string(),
    ]);
    assert!(snippet.contains("ProxyJump bastide-proj"), "{snippet}");
    let strict = env.dir.path().join("strict.ssh_config");
    std::fs::write(
        &strict,
        format!(
            "{snippet}\nHost *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n",
            env.alice.display()
        ),
    )
    .unwrap();
    let o = Command::new("ssh")
        .arg("-F")
        .arg(&strict)
        .args([
            "-p",
            &env.sshd.port.to_string(),
            "root@web01",
            "echo strict-ok",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\nknown_hosts:\n{}\nconfig:\n{snippet}",
        out_str(&o),
        std::fs::read_to_string(&kh).unwrap()
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "strict-ok");
    step(
        t0,
        "Without the file, strict checking refuses: the test above is",
    );
    // Without the file, strict checking refuses: the test above is not vacuous.
    let o = Command::new("ssh")
        .arg("-F")
        .arg(&strict)
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args([
            "-p",
            &env.sshd.port.to_string(),
            "root@web01",
            "echo strict-ok",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", out_str(&o));
}

/// A one-shot TCP server: reads until EOF, answers with the byte count, closes.
fn count_server() -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(format!("got {} bytes\n", buf.len()).as_bytes())
            .unwrap();
    });
    (port, h)
}

#[test]
fn half_close_target_close_rate_limit_and_reload() {
    let t0 = Instant::now();
    let env =
        Env::new("rate_limit_burst = 4\nrate_limit_refill = \"60s\"\nmax_sessions_per_admin = 1");
    let alice = env.client_config("alice", &env.alice, "");

    step(
        t0,
        "Half-close: the client's EOF reaches the target, whose answe",
    );
    // Half-close: the client's EOF reaches the target, whose answer still flows back.
    // (Uses `ssh -W` to a plain TCP service the rules allow: port 9 is only in the test's
    // rules; the server binds its own port, so allow it through a one-off config reload.)
    let (port, server) = count_server();
    env.b
        .edit_config(|c| c.replace(", 9]", &format!(", {port}]")));
    env.b.cli_ok(&["reload"]);
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&alice)
        .args(["-W", &format!("127.0.0.1:{port}")])
        .args(["-p", &env.ssh_port.to_string(), "alice@127.0.0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let payload = vec![7u8; 300_000];
    child.stdin.take().unwrap().write_all(&payload).unwrap(); // dropped: EOF
    let o = child.wait_with_output().unwrap();
    server.join().unwrap();
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.logs());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got 300000 bytes\n");

    step(
        t0,
        "The target closes while the client still holds its stdin ope",
    );
    // The target closes while the client still holds its stdin open: the client exits
    // within a second.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port2 = l.local_addr().unwrap().port();
    env.b
        .edit_config(|c| c.replace(&format!(", {port}]"), &format!(", {port2}]")));
    env.b.cli_ok(&["reload"]);
    let closer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"bye\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        Instant::now()
    });
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&alice)
        .args(["-W", &format!("127.0.0.1:{port2}")])
        .args(["-p", &env.ssh_port.to_string(), "alice@127.0.0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin_held = child.stdin.take();
    let closed_at = closer.join().unwrap();
    let exited = wait_for(Duration::from_secs(5), || child.try_wait().unwrap());
    assert!(
        exited.is_some(),
        "client still running after the target closed"
    );
    assert!(
        closed_at.elapsed() < Duration::from_millis(1500),
        "client took {:?} to exit after the target closed",
        closed_at.elapsed()
    );
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "bye\n");

    step(
        t0,
        "A long session keeps working while SIGHUP adds an admin.",
    );
    // A long session keeps working while SIGHUP adds an admin.
    let opened_before = env.b.log_text().matches("jump opened").count();
    let long = Command::new("ssh")
        .arg("-F")
        .arg(&alice)
        .args(["-J", &env.jump("alice"), "-p", &env.sshd.port.to_string()])
        .args(["root@web01", "echo started; sleep 6; echo still-alive"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // alice may hold one jump session at a time (max_sessions_per_admin = 1).
    let opened = wait_for(Duration::from_secs(10), || {
        (env.b.log_text().matches("jump opened").count() > opened_before).then_some(())
    });
    assert!(
        opened.is_some(),
        "long session never opened:\n{}",
        env.logs()
    );
    let o = env.ssh_j(&alice, "alice", "web01", "echo second");
    assert!(!o.status.success(), "{}", out_str(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("max_sessions_per_admin"),
        "{}",
        out_str(&o)
    );
    let dave = env.dir.path().join("dave");
    new_key(&dave);
    let dave_cfg = env.client_config("dave", &dave, "");
    let o = env.ssh_j(&dave_cfg, "dave", "web01", "echo dave-ok");
    assert!(!o.status.success(), "dave before reload: {}", out_str(&o));
    let dave_pub = public(&dave);
    env.b.edit_config(|c| {
        c + &format!(
            "\n[[ssh.admins]]\nname = \"dave\"\nkeys = [\"{dave_pub}\"]\ngroups = [\"ops\"]\n"
        )
    });
    step(t0, "The target must admit dave's key too.");
    // The target must admit dave's key too.
    let ak = env.dir.path().join("authorized_keys");
    let mut t = std::fs::read_to_string(&ak).unwrap();
    t.push_str(&format!("{dave_pub}\n"));
    std::fs::write(&ak, t).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let st = Command::new("kill")
        .args(["-HUP", &env.b.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let ok = wait_for(Duration::from_secs(5), || {
        let o = env.ssh_j(&dave_cfg, "dave", "web01", "echo dave-ok");
        o.status.success().then_some(o)
    });
    assert!(ok.is_some(), "dave refused after SIGHUP:\n{}", env.logs());
    let o = long.wait_with_output().unwrap();
    assert!(o.status.success(), "long session: {}", out_str(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "started\nstill-alive\n",
        "{}",
        out_str(&o)
    );

    step(
        t0,
        "A burst of failed logins from one address is rate limited (t",
    );
    // A burst of failed logins from one address is rate limited (the bucket holds 4);
    // a different source address is not affected.
    let stranger = env.dir.path().join("stranger");
    new_key(&stranger);
    let bad = env.client_config("bad", &stranger, "  BindAddress 127.0.0.2\n");
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let o = Command::new("ssh")
            .arg("-F")
            .arg(&bad)
            .args(["-p", &env.ssh_port.to_string(), "alice@127.0.0.1", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        outcomes.push(String::from_utf8_lossy(&o.stderr).to_string());
    }
    let denied = outcomes
        .iter()
        .filter(|e| e.contains("Permission denied"))
        .count();
    let limited = outcomes
        .iter()
        .filter(|e| !e.contains("Permission denied"))
        .count();
    assert_eq!(denied, 4, "{outcomes:#?}");
    assert_eq!(limited, 4, "{outcomes:#?}");
    assert!(env.b.log_text().contains("too many failed logins"));
    let o = env.ssh_j(&alice, "alice", "web01", "echo still-welcome");
    assert!(o.status.success(), "{}", out_str(&o));
}

#[test]
fn user_certificates() {
    let t0 = Instant::now();
    let env = Env::new("");
    let d = env.dir.path();
    let other_ca = d.join("other_ca");
    new_key(&other_ca);
    step(t0, "(name, signing CA, ssh-keygen options, accepted?)");
    // (name, signing CA, ssh-keygen options, accepted?)
    let cases: Vec<(&str, &Path, Vec<&str>, bool)> = vec![
        (
            "valid",
            &env.ca,
            vec![
                "-n",
                "carol",
                "-V",
                "-5m:+1h",
                "-O",
                "source-address=127.0.0.0/8",
            ],
            true,
        ),
        (
            "expired",
            &env.ca,
            vec!["-n", "carol", "-V", "20200101:20200102"],
            false,
        ),
        (
            "not-yet-valid",
            &env.ca,
            vec!["-n", "carol", "-V", "+1d:+2d"],
            false,
        ),
        (
            "other-principal",
            &env.ca,
            vec!["-n", "dave", "-V", "-5m:+1h"],
            false,
        ),
        ("no-principals", &env.ca, vec!["-V", "-5m:+1h"], false),
        (
            "host-cert",
            &env.ca,
            vec!["-h", "-n", "carol", "-V", "-5m:+1h"],
            false,
        ),
        (
            "unknown-ca",
            &other_ca,
            vec!["-n", "carol", "-V", "-5m:+1h"],
            false,
        ),
        (
            "source-address",
            &env.ca,
            vec![
                "-n",
                "carol",
                "-V",
                "-5m:+1h",
                "-O",
                "source-address=10.0.0.0/8",
            ],
            false,
        ),
    ];
    for (name, ca, opts, accepted) in cases {
        let key = d.join(format!("carol-{name}"));
        new_key(&key);
        sign(ca, &key, &format!("carol-{name}"), &opts);
        let cert = PathBuf::from(format!("{}-cert.pub", key.display()));
        assert!(cert.exists());
        let cfg = env.client_config(
            &format!("carol-{name}"),
            &key,
            &format!("  CertificateFile {}\n", cert.display()),
        );
        let o = env.ssh_j(&cfg, "carol", "web01", "echo cert-ok");
        if accepted {
            assert!(
                o.status.success(),
                "{name}: {}\n{}",
                out_str(&o),
                env.logs()
            );
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "cert-ok");
        } else {
            assert!(!o.status.success(), "{name} accepted: {}", out_str(&o));
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
                "{name}: {}",
                out_str(&o)
            );
        }
    }
    step(t0, "The audit names the certificate.");
    // The audit names the certificate.
    let line = env
        .audit_lines()
        .into_iter()
        .find(|l| l["admin"] == "carol" && l["event"] == "end" && l["decision"] == "allowed")
        .expect("carol's audit line");
    assert_eq!(line["cert_key_id"], "carol-valid");
    assert!(line["cert_ca"].as_str().unwrap().starts_with("SHA256:"));
    step(
        t0,
        "The refusals were for the right reasons (those russh does no",
    );
    // The refusals were for the right reasons (those russh does not pre-empt; the OpenSSH
    // client never offers a host certificate for user authentication, so that case is
    // refused before the bastion sees it; the bastion's own check is a unit test).
    let log = env.b.log_text();
    for why in [
        "is for [\"dave\"]",
        "has no principals",
        "not a CA trusted for carol",
        "excludes 127.0.0.1",
    ] {
        assert!(log.contains(why), "no refusal {why:?} in:\n{log}");
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    wait_for(timeout, || child.try_wait().unwrap())
}

fn signal(child: &Child, sig: &str) {
    let o = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .output()
        .unwrap();
    assert!(o.status.success());
}

#[test]
fn keepalive_idle_timeout_and_server_rekey() {
    let t0 = Instant::now();
    let env = Env::new("idle_timeout = \"4s\"\nkeepalive_interval = \"1s\"\nrekey_limit = 4194304");
    let cfg = env.client_config("alice", &env.alice, "");
    let bastion = |extra: &[&str]| {
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args(["-p", &env.ssh_port.to_string()])
            .args(extra)
            .args(["-N", "alice@127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    step(t0, "Keepalives both ways keep a quiet connection up.");
    // The bastion probes a silent client every keepalive_interval...
    let mut silent = bastion(&["-v"]);
    // ...and answers a client that probes it every second and gives up after two
    // unanswered probes.
    let mut probing = bastion(&["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2"]);
    std::thread::sleep(Duration::from_secs(5));
    for c in [&mut silent, &mut probing] {
        assert!(
            c.try_wait().unwrap().is_none(),
            "the connection dropped:\n{}",
            env.logs()
        );
        let _ = c.kill();
    }
    let _ = probing.wait();
    let out = silent.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.matches("rtype keepalive@openssh.com want_reply 1")
            .count()
            >= 2,
        "no server keepalive seen by the client:\n{err}"
    );

    step(
        t0,
        "A client that stops answering is dropped by the bastion's keepalive.",
    );
    let mut frozen = bastion(&[]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(frozen.try_wait().unwrap().is_none());
    signal(&frozen, "-STOP");
    // keepalive_max (3) unanswered probes a second apart, then the bastion disconnects;
    // the kernel still ACKs (TCP keepalive alone would not notice).
    std::thread::sleep(Duration::from_secs(7));
    signal(&frozen, "-CONT");
    let st = wait_exit(&mut frozen, Duration::from_secs(5));
    assert!(
        st.is_some_and(|s| !s.success()),
        "the frozen client's connection was not closed by the bastion"
    );

    step(t0, "A jump channel idle for idle_timeout is closed.");
    let t = Instant::now();
    let idle_jump = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-J", &env.jump("alice"), "-p", &env.sshd.port.to_string()])
        .args([&format!("root@{}", env.ip), "sleep 30; echo late"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    step(
        t0,
        "Meanwhile: TCP keepalive (keepalive_interval = 1s) is on the bastion's sockets.",
    );
    // Seen by the kernel: `ss -o` shows each socket's keepalive timer. The bastion's
    // sockets are the accepted ones on its port and its own connections to the target's
    // port (the client reaches the target through the jump, never directly). The system
    // default keepalive time is 2 h (and off unless asked), so a timer of at most ~1 s
    // is the configured one.
    let ss = require("ss", "iproute2");
    let sockets = |filter: &str| -> Vec<String> {
        let o = Command::new(&ss)
            .args(["-tnoiH", "state", "established", filter])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", out_str(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("127.0.0.1:"))
            .map(str::to_string)
            .collect()
    };
    let bastion_sockets = || {
        let mut v = sockets(&format!("( sport = :{} )", env.ssh_port));
        let outbound = sockets(&format!("( dport = :{} )", env.sshd.port));
        (!v.is_empty() && !outbound.is_empty()).then(|| {
            v.extend(outbound);
            v
        })
    };
    // A socket with unacknowledged data shows its retransmit timer instead, so look a
    // few times.
    let configured =
        |line: &String| keepalive_timer(line).is_some_and(|t| t <= Duration::from_millis(1500));
    let ok = wait_for(Duration::from_secs(3), || {
        bastion_sockets().filter(|v| v.iter().all(configured))
    });
    assert!(
        ok.is_some(),
        "bastion sockets without the configured keepalive timer:\n{:#?}",
        bastion_sockets()
    );
    step(t0, &format!("{:#?}", ok.unwrap()));
    let o = idle_jump.wait_with_output().unwrap();
    let took = t.elapsed();
    assert!(!o.status.success(), "{}", out_str(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("late"));
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let idle = wait_for(Duration::from_secs(5), || {
        env.audit_lines().into_iter().find(|l| {
            l["event"] == "end" && l["reason"].as_str().unwrap_or("").contains("idle timeout")
        })
    });
    assert!(idle.is_some(), "{:?}", env.audit_lines());

    step(t0, "The bastion rekeys on its own after rekey_limit bytes.");
    let src = env.dir.path().join("20m");
    pattern_file(&src, 20);
    let o = Command::new("ssh")
        .arg("-v")
        .arg("-F")
        .arg(&cfg)
        .args(["-J", &env.jump("alice"), "-p", &env.sshd.port.to_string()])
        .arg(format!("root@{}", env.ip))
        .arg("sha256sum")
        .stdin(std::fs::File::open(&src).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_str(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).split_whitespace().next(),
        Some(sha256(&src).as_str())
    );
    // Two initial key exchanges (client-bastion, client-target); the client's own
    // RekeyLimit default (about 1 GiB per key for these ciphers) and the target sshd's
    // (none) are far away, so every further KEXINIT comes from the bastion: 20 MiB at
    // 4 MiB per key is about five.
    let err = String::from_utf8_lossy(&o.stderr);
    let kex = err.matches("SSH2_MSG_KEXINIT received").count();
    assert!(kex >= 2 + 3, "{kex} key exchanges:\n{err}");

    step(
        t0,
        "Client-initiated rekeys (RekeyLimit=1M on the jump connection) during a copy.",
    );
    // The jump connection is made by a ProxyCommand with its own log (-E), so its key
    // exchanges are counted apart from the target connection's.
    let src = env.dir.path().join("12m");
    pattern_file(&src, 12);
    let jlog = env.dir.path().join("jump-rekey.log");
    let proxy = format!(
        "ssh -F {} -o RekeyLimit=1M -v -E {} -p {} -W %h:%p alice@127.0.0.1",
        cfg.display(),
        jlog.display(),
        env.ssh_port
    );
    let t = Instant::now();
    let o = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", &format!("ProxyCommand={proxy}")])
        .args([
            "-p",
            &env.sshd.port.to_string(),
            &format!("root@{}", env.ip),
            "sha256sum",
        ])
        .stdin(std::fs::File::open(&src).unwrap())
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.logs());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).split_whitespace().next(),
        Some(sha256(&src).as_str())
    );
    // No stall: a key exchange is a few round trips; 12 of them on loopback take well
    // under a second, and the copy alone a second or two even on a loaded machine.
    assert!(took < Duration::from_secs(30), "{took:?}");
    let log = std::fs::read_to_string(&jlog).unwrap();
    // 12 MiB up at 1 MiB per key: about 12 exchanges started by the client; the
    // bastion's own rekey_limit (4 MiB) would give 3 at most. The initial exchange plus
    // at least 8 rekeys:
    let kex = log.matches("SSH2_MSG_KEXINIT sent").count();
    assert!(
        kex >= 9,
        "{kex} key exchanges on the jump connection:\n{log}"
    );
    step(t0, &format!("{kex} key exchanges, copy took {took:?}"));
    step(t0, "done");
}

/// The keepalive timer of one `ss -o` line (`timer:(keepalive,842ms,0)`,
/// `timer:(keepalive,1.500sec,0)`, `timer:(keepalive,119min,0)`).
fn keepalive_timer(line: &str) -> Option<Duration> {
    let rest = &line[line.find("timer:(keepalive,")? + "timer:(keepalive,".len()..];
    let v = &rest[..rest.find(',')?];
    let num = |s: &str| s.parse::<f64>().ok();
    if let Some(ms) = v.strip_suffix("ms") {
        Some(Duration::from_secs_f64(num(ms)? / 1000.0))
    } else if let Some(s) = v.strip_suffix("sec") {
        Some(Duration::from_secs_f64(num(s)?))
    } else if let Some(m) = v.strip_suffix("min") {
        Some(Duration::from_secs_f64(num(m)? * 60.0))
    } else {
        None
    }
}

/// A file of `mib` MiB of a repeating pattern.
fn pattern_file(path: &Path, mib: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    let block: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    for _ in 0..mib {
        f.write_all(&block).unwrap();
    }
}

#[test]
fn a_target_that_never_reads_is_cut_after_the_stall_timeout() {
    let t0 = Instant::now();
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    let _held = std::thread::spawn(move || {
        let mut keep = Vec::new();
        for s in hole.incoming() {
            keep.push(s);
        }
    });
    let env = Env::new(&format!(
        "target_stall_timeout = \"2s\"\n\n[[ssh.rules]]\nadmins = [\"alice\"]\ncidrs = [\"127.0.0.1/32\"]\nports = [{hole_port}]\n"
    ));
    let cfg = env.client_config("alice", &env.alice, "");
    let mut flood = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-p", &env.ssh_port.to_string()])
        .args(["-W", &format!("127.0.0.1:{hole_port}"), "alice@127.0.0.1"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cut = wait_for(Duration::from_secs(20), || {
        env.audit_lines().into_iter().find(|l| {
            l["event"] == "end"
                && l["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("target not reading")
        })
    })
    .expect("the flooding channel is cut");
    assert_eq!(cut["port"], hole_port);
    assert!(cut["bytes_to_target"].as_u64().unwrap() > 0);
    assert!(wait_exit(&mut flood, Duration::from_secs(10)).is_some());
    step(t0, "done");
}

#[test]
fn host_certificates_through_cert_authority_known_hosts() {
    let env = Env::new("host_cert_authorities = [\"@HOST_CA@\"]");
    let all = env.b.cli_ok(&["ssh", "known-hosts"]);
    let ca_lines: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with("@cert-authority "))
        .collect();
    assert_eq!(ca_lines.len(), 1, "{all}");
    assert!(
        ca_lines[0].contains("web01") && ca_lines[0].contains("*.proj.test"),
        "{all}"
    );
    // Only the @cert-authority line: the target's own key is not listed, so strict checking
    // can only succeed through its host certificate.
    let kh = env.dir.path().join("ca_known_hosts");
    std::fs::write(&kh, format!("{}\n", ca_lines[0])).unwrap();
    let cfg = env.client_config("alice", &env.alice, "");
    let target = |host_key_algorithms: &str| {
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                &format!("HostKeyAlgorithms={host_key_algorithms}"),
                "-J",
                &env.jump("alice"),
                "-p",
                &env.sshd.port.to_string(),
                "root@web01",
                "echo ca-ok",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = target("ssh-ed25519-cert-v01@openssh.com");
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.logs());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ca-ok");
    // The plain key alone is not trusted by that file: the CA line is what made it work.
    let o = target("ssh-ed25519");
    assert!(!o.status.success(), "{}", out_str(&o));
}

/// A TCP service on the bastion's own loopback (a stand-in for what listens on 127.0.0.1
/// of a real bastion): greets every connection with a secret.
fn bastion_loopback_service() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"bastion-secret\n");
        }
    });
    port
}

impl Env {
    /// `ssh -W target user@bastion` with stdin closed: what came back and how it ended.
    fn ssh_w(&self, cfg: &Path, user: &str, target: &str) -> Output {
        Command::new("ssh")
            .arg("-F")
            .arg(cfg)
            .args(["-W", target])
            .args([
                "-p",
                &self.ssh_port.to_string(),
                &format!("{user}@127.0.0.1"),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn denied(&self, target: &str) -> Option<Value> {
        self.audit_lines()
            .into_iter()
            .find(|l| l["target"] == target && l["decision"] == "denied")
    }
}

/// The attacker is root on an enrolled VM ("db66", which bob's rule lets him reach) and
/// advertises the bastion's own 127.0.0.1 and the cloud metadata service's 169.254.169.254.
/// Neither becomes a jump target: not by the agent's name, and a typed-in 127.0.0.1 is not
/// credited to the agent (bob has no rule for plain addresses). Before the address policy,
/// `ssh -W db66:PORT` reached the bastion's loopback service.
#[test]
fn an_agent_claiming_the_bastions_address_or_the_metadata_service_is_no_jump_target() {
    let svc = bastion_loopback_service();
    let env = Env::new(&format!(
        "\n[[ssh.rules]]\nadmins = [\"bob\"]\nagents = [\"db*\"]\nports = [{svc}]\n"
    ));
    let bob = env.client_config("bob", &env.bob, "");
    let mut evil = Agent::new("db66");
    evil.set_addresses(&["127.0.0.1", "169.254.169.254"], Some(&evil.ip));
    evil.enroll_ok(&env.b, &env.b.token(&[]));
    evil.start();
    let info = wait_for(Duration::from_secs(20), || {
        env.b.agent("db66").filter(|a| {
            a["state"] == "online" && a["claimed"].as_array().is_some_and(|v| v.len() == 2)
        })
    })
    .unwrap_or_else(|| panic!("db66 not registered: {}", evil.log_text()));
    assert_eq!(info["addresses"], serde_json::json!([]), "{info}");
    let refused = info["refused"].to_string();
    assert!(
        refused.contains("127.0.0.1: an address of the bastion itself"),
        "{info}"
    );
    assert!(
        refused.contains("169.254.169.254: link-local address"),
        "{info}"
    );

    // By the agent's name.
    let o = env.ssh_w(&bob, "bob", &format!("db66:{svc}"));
    assert!(
        !o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("bastion-secret"),
        "jumped to the bastion's loopback through db66's claim: {}",
        out_str(&o)
    );
    let d = env.denied("db66").expect("denied audit line for db66");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("has no accepted address"),
        "{d}"
    );
    // By the claimed address typed in: a plain address, and bob has no cidr rule.
    let o = env.ssh_w(&bob, "bob", &format!("127.0.0.1:{svc}"));
    assert!(
        !o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("bastion-secret"),
        "127.0.0.1 credited to db66: {}",
        out_str(&o)
    );
    let d = env
        .denied("127.0.0.1")
        .expect("denied audit line for 127.0.0.1");
    assert!(d["agent"].is_null(), "credited to an agent: {d}");
    // The metadata service address is no target either.
    let o = env.ssh_w(&bob, "bob", "169.254.169.254:80");
    assert!(!o.status.success(), "{}", out_str(&o));
}

/// The attacker is root on an enrolled VM ("db66") and claims web01's address, with
/// `claimed_addresses = "networks"` (claims are not checked against the connection). The
/// address then belongs to neither while both are online: `ssh -J` to web01 by name is
/// refused, the typed-in address is not credited to db66 (whose rule would let bob in),
/// and both agents are flagged in `agents list`. When the attacker goes offline, web01 gets
/// its address back.
#[test]
fn an_address_claimed_by_two_agents_belongs_to_neither() {
    let env = Env::with("", |c| {
        c.replacen(
            "networks = [\"127.0.0.0/8\"]",
            "networks = [\"127.0.0.0/8\"]\nclaimed_addresses = \"networks\"",
            1,
        )
    });
    let alice = env.client_config("alice", &env.alice, "");
    let bob = env.client_config("bob", &env.bob, "");
    let o = env.ssh_j(&alice, "alice", "web01", "echo before");
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.logs());

    let mut evil = Agent::new("db66");
    evil.set_addresses(&[&env.ip], Some(&evil.ip));
    evil.enroll_ok(&env.b, &env.b.token(&[]));
    evil.start();
    let flagged = |name: &str| {
        env.b.agent(name).filter(|a| {
            a["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "address-conflict"))
        })
    };
    let web = wait_for(Duration::from_secs(20), || flagged("web01")).unwrap_or_else(|| {
        panic!(
            "web01 not flagged: {:?}\n{}",
            env.b.agents(),
            evil.log_text()
        )
    });
    let db = flagged("db66").expect("db66 flagged too");
    for a in [&web, &db] {
        assert_eq!(a["addresses"], serde_json::json!([]), "{a}");
        assert!(
            a["refused"]
                .to_string()
                .contains("claimed by several agents: db66, web01"),
            "{a}"
        );
    }
    let table = env.b.cli_ok(&["agents", "list"]);
    assert!(
        table.contains("address-conflict") && table.contains("claimed by several agents"),
        "{table}"
    );

    let o = env.ssh_j(&alice, "alice", "web01", "echo hijacked");
    assert!(!o.status.success(), "{}", out_str(&o));
    let o = env.ssh_j(&bob, "bob", &env.ip, "echo via-db66");
    assert!(
        !o.status.success(),
        "web01's address credited to db66: {}",
        out_str(&o)
    );

    // The conflict ends with the attacker's session: web01 has its address again.
    evil.stop();
    let back = wait_for(Duration::from_secs(15), || {
        env.b
            .agent("web01")
            .filter(|a| a["addresses"] == serde_json::json!([env.ip]))
    });
    assert!(back.is_some(), "{:?}", env.b.agent("web01"));
    let o = env.ssh_j(&alice, "alice", "web01", "echo after");
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.logs());
}
