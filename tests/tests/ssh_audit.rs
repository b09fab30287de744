//! The SSH audit log fails closed (issue 16, point 8): with the audit log on a full
//! filesystem, the real `ssh` client's jump (`ssh -W`, what `ssh -J` does on the bastion) is
//! refused with a message naming the audit log, and a log line says why; with
//! `[ssh] audit_fail_open = true` the same jump goes through and is only logged.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bastide_tests::{free_port, require, wait_for, Bastion, Mount};

fn out_str(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A target that greets every connection and closes it; its port.
fn greeter() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"hello-from-target\n");
        }
    });
    port
}

struct Jump {
    b: Bastion,
    ssh_port: u16,
    target: u16,
    client: PathBuf,
    audit: PathBuf,
}

/// A bastion whose audit log is `audit`, one admin "alice" (key made here) allowed to
/// 127.0.0.0/8 on the greeter's port, and an ssh_config for her.
fn bastion(dir: &Path, audit: &Path, extra: &str) -> Jump {
    require("ssh", "openssh-client");
    let key = dir.join("alice");
    if !key.exists() {
        let o = Command::new(require("ssh-keygen", "openssh-client"))
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", out_str(&o));
    }
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let target = greeter();
    let ssh_port = free_port();
    let mut b = Bastion::init("proj");
    b.edit_config(|c| {
        format!(
            "{c}\n[ssh]\nlisten = \"127.0.0.1:{ssh_port}\"\naudit_log = \"{}\"\n\
             auth_rejection_delay = \"50ms\"\n{extra}\n\
             [[ssh.admins]]\nname = \"alice\"\nkeys = [\"{}\"]\n\
             [[ssh.rules]]\nadmins = [\"alice\"]\ncidrs = [\"127.0.0.0/8\"]\nports = [{target}]\n",
            audit.display(),
            public.trim()
        )
    });
    b.start();
    let client = dir.join(format!("alice-{ssh_port}.ssh_config"));
    std::fs::write(
        &client,
        format!(
            "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  LogLevel INFO\n  ConnectTimeout 10\n",
            key.display()
        ),
    )
    .unwrap();
    Jump {
        b,
        ssh_port,
        target,
        client,
        audit: audit.to_path_buf(),
    }
}

impl Jump {
    /// `ssh -W 127.0.0.1:<target> alice@bastion`: one jump channel, its output.
    fn jump(&self) -> Output {
        Command::new("ssh")
            .arg("-F")
            .arg(&self.client)
            .args(["-p", &self.ssh_port.to_string()])
            .args(["-W", &format!("127.0.0.1:{}", self.target)])
            .arg("alice@127.0.0.1")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn audit_events(&self) -> Vec<String> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("whole JSON lines");
                v["event"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }
}

fn greeted(o: &Output) -> bool {
    o.status.success() && String::from_utf8_lossy(&o.stdout).contains("hello-from-target")
}

#[test]
fn a_jump_is_refused_when_its_audit_line_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = Mount::tmpfs("256k");
    let j = bastion(dir.path(), &mnt.path().join("audit.jsonl"), "");
    // The audit log is empty (no page of its own): filling the filesystem makes its next
    // append fail with ENOSPC.
    let filler = mnt.fill_leaving(0);
    let o = j.jump();
    assert!(
        !greeted(&o),
        "a jump ran without its audit line: {}\n{}",
        out_str(&o),
        j.b.log_text()
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot write its audit log") && err.contains("no jump runs unaudited"),
        "the client is told why: {}",
        out_str(&o)
    );
    assert!(
        wait_for(Duration::from_secs(5), || j
            .b
            .log_text()
            .contains("start line cannot be written; jump refused")
            .then_some(()))
        .is_some(),
        "no log line:\n{}",
        j.b.log_text()
    );
    assert!(j.audit_events().is_empty(), "{:?}", j.audit_events());

    // Space again: the next jump is audited and goes through, without a restart.
    std::fs::remove_file(filler).unwrap();
    let o = j.jump();
    assert!(greeted(&o), "{}\n{}", out_str(&o), j.b.log_text());
    let events = wait_for(Duration::from_secs(5), || {
        let e = j.audit_events();
        (e.len() == 2).then_some(e)
    });
    assert_eq!(
        events,
        Some(vec!["start".to_string(), "end".to_string()]),
        "{:?}",
        j.audit_events()
    );
}

#[test]
fn audit_fail_open_lets_the_jump_through_and_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = Mount::tmpfs("256k");
    let j = bastion(
        dir.path(),
        &mnt.path().join("audit.jsonl"),
        "audit_fail_open = true",
    );
    let _filler = mnt.fill_leaving(0);
    let o = j.jump();
    assert!(greeted(&o), "{}\n{}", out_str(&o), j.b.log_text());
    assert!(
        j.b.log_text()
            .contains("start line lost; jump let through (audit_fail_open = true)"),
        "{}",
        j.b.log_text()
    );
    assert!(j.audit_events().is_empty());
}
