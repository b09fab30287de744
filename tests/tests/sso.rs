//! Single sign-on end to end with real peers on loopback: a real OpenID Connect provider
//! (`oidc-provider`, OpenID Certified, run by tests/peers/oidc/provider.mjs with the device
//! flow), its own device-approval pages driven with HTTP requests (tests/peers/oidc/
//! approve.mjs: user code, login, consent), `bastide-login`, the real `bastide`, the Debian
//! `sshd` as the target trusting the bastion's user CA (TrustedUserCAKeys +
//! AuthorizedPrincipalsFile, as the templates of packaging/templates/ set it up) and the
//! real `ssh`/`scp` clients. The token checks that need a forged token (expired, wrong
//! audience, unknown signing key...) are unit tests in bastion/src/ssh/sso/mod.rs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bastide_tests::{bin, free_port, require, wait_for, workspace, Agent, Bastion, EnvTree};
use serde_json::Value;

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
}

fn out_str(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn new_key(path: &Path) {
    let o = Command::new(require("ssh-keygen", "openssh-client"))
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

/// A child killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn oidc_dir() -> PathBuf {
    workspace().join("tests/peers/oidc")
}

/// The provider on a free loopback port; installs its npm packages when missing.
fn provider(log: &Path) -> (Proc, String) {
    let node = require("node", "nodejs");
    let dir = oidc_dir();
    if !dir.join("node_modules/oidc-provider").is_dir() {
        let npm = require("npm", "npm");
        let o = Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "npm ci in {}: {}",
            dir.display(),
            out_str(&o)
        );
    }
    let port = free_port();
    let mut child = Command::new(node)
        .arg(dir.join("provider.mjs"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let issuer = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("listening ") => break l[10..].trim().to_string(),
            Some(Ok(_)) => continue,
            _ => panic!("the OpenID provider did not start"),
        }
    };
    // Keep its stdout drained: a write to a closed pipe would kill it.
    std::thread::spawn(move || lines.for_each(drop));
    (Proc(child), issuer)
}

/// The target sshd on `port` of the agent's address, trusting the bastion's user CA through
/// the files the configuration push wrote under `pushed` from packaging/templates/
/// (`bastide_user_ca.pub`, `principals_<user>`).
fn sshd(dir: &Path, ip: &str, port: u16, host_key: &Path, pushed: &Path) -> Proc {
    let sshd = require("sshd", "openssh-server");
    let _ = std::fs::create_dir_all("/run/sshd");
    let fragment = std::fs::read_to_string(pushed.join("sshd-bastide.conf")).unwrap();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress {ip}:{port}\nHostKey {}\nAuthorizedKeysFile none\nPidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n{fragment}",
            host_key.display(),
        ),
    )
    .unwrap();
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .unwrap();
    let up = wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect((ip, port)).ok()
    });
    assert!(up.is_some(), "sshd did not start");
    Proc(child)
}

/// An environment tree that pushes the VM-side templates of packaging/templates/ to files
/// under `out` (the agent's allowed directory), as a VM's /etc/ssh would get them.
fn push_tree(out: &Path) -> EnvTree {
    let tree = EnvTree::new("proj", out, "");
    let templates = workspace().join("packaging/templates");
    for t in [
        "sshd-bastide.conf.j2",
        "bastide-user-ca.pub.j2",
        "bastide-principals.j2",
    ] {
        let text = std::fs::read_to_string(templates.join(t)).unwrap();
        // The VM's /etc/ssh is the agent's allowed directory here.
        let text = text
            .replace(
                "/etc/ssh/bastide_principals/%u",
                &format!("{}/principals_%u", out.display()),
            )
            .replace("/etc/ssh/", &format!("{}/", out.display()));
        tree.write(&format!("templates/{t}"), &text);
    }
    let file = |name: &str, path: PathBuf, template: &str| {
        format!(
            "[files.{name}]\npath = {:?}\ntemplate = {template:?}\nmode = \"0644\"\n",
            path.display().to_string()
        )
    };
    tree.write_project(&format!(
        "[vars]\nntp = \"project.ntp\"\n{}{}{}",
        file(
            "sshd",
            out.join("sshd-bastide.conf"),
            "sshd-bastide.conf.j2"
        ),
        file(
            "user_ca",
            out.join("bastide_user_ca.pub"),
            "bastide-user-ca.pub.j2"
        ),
        file(
            "principals",
            out.join("principals_root"),
            "bastide-principals.j2"
        ),
    ));
    tree
}

struct Env {
    b: Bastion,
    dir: tempfile::TempDir,
    sso_port: u16,
    audit: PathBuf,
}

impl Env {
    /// Runs `bastide-login` as `login` at the provider, approving the device code on the
    /// provider's pages; returns its output.
    fn login(&self, login: &str, key: &Path, extra: &[&str]) -> Output {
        let ssh_dir = self.dir.path().join("ssh");
        let mut child = Command::new(bin("bastide-login"))
            .args([
                "--bastion",
                &format!("https://127.0.0.1:{}", self.sso_port),
                "--pin",
                &self.b.pin,
                "--no-browser",
                "--poll-interval",
                "1",
                "--key",
            ])
            .arg(key)
            .arg("--ssh-dir")
            .arg(&ssh_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        // "To log in, open URI and enter the code CODE"
        let words: Vec<&str> = first.split_whitespace().collect();
        if let (Some(uri), Some(code)) = (words.get(4), words.last()) {
            let o = Command::new("node")
                .arg(oidc_dir().join("approve.mjs"))
                .args([uri, code, login])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "approval: {}\n--- provider ---\n{}",
                out_str(&o),
                std::fs::read_to_string(self.dir.path().join("provider.log")).unwrap_or_default()
            );
        }
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let mut o = child.wait_with_output().unwrap();
        o.stdout = format!("{first}{rest}").into_bytes();
        o
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn ssh(cfg: &Path, port: u16, args: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(cfg)
        .args(["-p", &port.to_string()])
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(args)
        .stdin(Stdio::null());
    c
}

#[test]
fn sso_login_jump_scp_refusals_and_revocation() {
    let t0 = Instant::now();
    require("ssh", "openssh-client");
    let dir = tempfile::Builder::new()
        .prefix("bastide-sso-test-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let provider_log = d.join("provider.log");
    let (_provider, issuer) = provider(&provider_log);
    step(t0, "provider up");
    let mut b = Bastion::init("proj");
    let user_ca = b.cli_ok(&["ssh", "user-ca"]).trim().to_string();
    assert!(user_ca.starts_with("ssh-ed25519 "), "{user_ca}");

    let mut agent = Agent::new("web01");
    let host_key = agent.dir.path().join("ssh/ssh_host_ed25519_key");
    new_key(&host_key);
    // The VM side comes from the configuration push: the templates of packaging/templates/
    // rendered for web01 and written by its agent.
    let pushed = agent.dir.path().join("etc");
    std::fs::create_dir_all(&pushed).unwrap();
    let tree = push_tree(&pushed);
    b.enable_config_push(tree.dir.path());
    agent.append_config(&format!(
        "[config]\nallow_dirs = [{:?}]\n",
        pushed.display().to_string()
    ));
    let tport = free_port();
    let bob = d.join("bob");
    new_key(&bob);
    let (ssh_port, sso_port) = (free_port(), free_port());
    let audit = d.join("audit.jsonl");
    b.edit_config(|c| {
        c + &format!(
            r#"
[ssh]
listen = "127.0.0.1:{ssh_port}"
audit_log = "{audit}"
public_host = "127.0.0.1"
auth_rejection_delay = "50ms"

[ssh.sso]
listen = "127.0.0.1:{sso_port}"
issuer = "{issuer}"
client_id = "bastide"

[[ssh.admins]]
name = "bob"
keys = ["{bob_pub}"]

[[ssh.rules]]
groups = ["ops"]
agents = ["web*"]
ports = [{tport}]

# Port 22 of web01 for ops: what the VM's principals file admits (agent.ssh_principals).
[[ssh.rules]]
groups = ["ops"]
agents = ["web*"]
"#,
            audit = audit.display(),
            bob_pub = public(&bob),
        )
    });
    let o = b.cli(&["check-config"]);
    assert!(o.status.success(), "{}", out_str(&o));
    b.start();
    let token = b.token(&[]);
    agent.enroll_ok(&b, &token);
    agent.start();
    let online = wait_for(Duration::from_secs(20), || {
        b.agent("web01").filter(|a| {
            a["state"] == "online" && a["addresses"].as_array().is_some_and(|v| !v.is_empty())
        })
    });
    assert!(online.is_some(), "agent not online: {}", agent.log_text());
    // The pushed files: the user CA and the principals of the rules opening web01's port 22.
    let principals = pushed.join("principals_root");
    let got = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&principals)
            .ok()
            .filter(|t| t.contains("group:ops"))
    });
    assert!(got.is_some(), "nothing pushed: {}", agent.log_text());
    let ca_file = std::fs::read_to_string(pushed.join("bastide_user_ca.pub")).unwrap();
    assert!(ca_file.contains(&user_ca), "{ca_file}");
    let _sshd = sshd(d, &agent.ip, tport, &host_key, &pushed);
    let env = Env {
        b,
        dir,
        sso_port,
        audit,
    };
    step(t0, "bastion, agent and target up");

    // The settings anyone reaching the port may read name the provider, not the VMs.
    let o = Command::new(require("curl", "curl"))
        .args(["-sk", &format!("https://127.0.0.1:{sso_port}/v1/sso")])
        .output()
        .unwrap();
    let settings = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(settings.contains(&issuer), "{settings}");
    assert!(
        !settings.contains("web01") && !settings.contains("ssh-ed25519"),
        "{settings}"
    );

    // First login: a fresh key is created, the certificate and the config block installed.
    let key = env.dir.path().join("keys/id_ed25519");
    let o = env.login("alice", &key, &["--install-config"]);
    assert!(o.status.success(), "{}\n{}", out_str(&o), env.b.log_text());
    let cert = PathBuf::from(format!("{}-cert.pub", key.display()));
    let cert_text = std::fs::read_to_string(&cert).unwrap();
    assert!(cert_text.starts_with("ssh-ed25519-cert-v01@openssh.com "));
    let cfg = env.dir.path().join("ssh/config");
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    assert!(cfg_text.contains("ProxyJump bastide-proj"), "{cfg_text}");
    assert!(cfg_text.contains("CertificateFile"), "{cfg_text}");
    let kh = std::fs::read_to_string(env.dir.path().join("ssh/bastide-proj.known_hosts")).unwrap();
    assert!(kh.contains(&format!("[127.0.0.1]:{ssh_port}")), "{kh}");
    step(t0, "first login");

    // ssh through the bastion (its host key checked against the known_hosts from the
    // bastion), the target checks the same certificate against the user CA.
    let o = ssh(&cfg, tport, &["root@web01", "echo", "via-sso"])
        .output()
        .unwrap();
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("via-sso"),
        "{}\n{}",
        out_str(&o),
        env.b.log_text()
    );
    // A second connection (scp) needs no login.
    let src = env.dir.path().join("payload");
    std::fs::write(&src, "hello over sso\n").unwrap();
    let dst = env.dir.path().join("copied");
    let o = Command::new("scp")
        .arg("-F")
        .arg(&cfg)
        .args(["-P", &tport.to_string(), "-o", "BatchMode=yes"])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .arg(&src)
        .arg(format!("root@web01:{}", dst.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_str(&o));
    assert_eq!(std::fs::read_to_string(&dst).unwrap(), "hello over sso\n");
    step(t0, "ssh and scp with the certificate");

    // The issue and the jumps are audited with the certificate's facts.
    let lines = env.audit_lines();
    let issued = lines
        .iter()
        .find(|l| l["event"] == "sso-issued")
        .expect("an sso-issued audit line");
    assert_eq!(issued["admin"], "alice");
    assert_eq!(issued["sub"], "alice");
    assert!(issued["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(issued["valid_before"].as_i64().unwrap() > issued["valid_after"].as_i64().unwrap());
    assert_eq!(issued["groups"], serde_json::json!(["ops", "staff"]));
    let serial = issued["serial"].as_i64().unwrap();
    assert!(lines
        .iter()
        .any(|l| l["event"] == "start" && l["admin"] == "alice" && l["cert_serial"] == serial));
    let list = env.b.cli_ok(&["ssh", "certs", "list"]);
    assert!(
        list.contains(&serial.to_string()) && list.contains("alice"),
        "{list}"
    );

    // Refusals from the real provider's tokens, each with its reason and an audit line.
    let other = env.dir.path().join("keys/other");
    for (who, key, why) in [
        ("mallory", &other, "no [[ssh.rules]] names admin mallory"),
        ("bad name", &other, "is not a valid admin name"),
        ("alice", &bob, "already used by another admin"),
    ] {
        let o = env.login(who, key, &[]);
        assert!(!o.status.success(), "{who}: {}", out_str(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "{who}: wanted {why:?}: {}",
            out_str(&o)
        );
    }
    let refused = env
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "sso-refused")
        .count();
    assert_eq!(refused, 3);
    step(t0, "refusals");

    // Revocation cuts an open jump at once and refuses new ones.
    let mut open = ssh(&cfg, tport, &["root@web01", "echo started; sleep 60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(open.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "started");
    let out = env
        .b
        .cli_ok(&["ssh", "certs", "revoke", "--admin", "alice"]);
    assert!(
        out.contains(&serial.to_string()) && out.contains("1 connection(s) cut"),
        "{out}"
    );
    let ended = wait_for(Duration::from_secs(10), || open.try_wait().unwrap());
    assert!(ended.is_some(), "the open jump survived the revocation");
    let ended = wait_for(Duration::from_secs(5), || {
        env.audit_lines().into_iter().find(|l| {
            l["event"] == "end"
                && l["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("certificate revoked")
        })
    });
    assert!(ended.is_some(), "{:?}", env.audit_lines());
    let o = ssh(&cfg, tport, &["root@web01", "true"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        env.b.log_text().contains("is revoked"),
        "{}",
        env.b.log_text()
    );
    step(t0, "revocation");
}
