//! The demo is the product: `scripts/demo --no-wait` starts a bastion with every service and
//! two agents, and every command it prints (also written to `DIR/try.sh`) is run here as
//! printed, each with an assertion on what it shows. A command added to the demo without an
//! assertion here fails the test, so the printed list cannot rot.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bastide_tests::{bin, require, transcript, wait_for, without_cargo_test_env, workspace};
use serde_json::Value;

/// A running `scripts/demo --no-wait`; `scripts/demo stop DIR` in Drop.
struct Demo {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// The `export ...` line of try.sh.
    export: String,
    /// (id, command) in try.sh order.
    commands: Vec<(String, String)>,
    stdout: String,
}

impl Demo {
    /// Runs the demo, acting as if the peers in `without` were missing.
    fn start(without: &str) -> Demo {
        // The same cargo selection as the harness, so the demo's own build is a no-op.
        let _ = bin("bastide");
        let tmp = tempfile::Builder::new()
            .prefix("bastide-demo-test-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("demo");
        let mut cmd = Command::new(workspace().join("scripts/demo"));
        without_cargo_test_env(&mut cmd);
        let out = cmd
            .arg("--no-wait")
            .arg("--dir")
            .arg(&dir)
            .env("BASTIDE_DEMO_BUILD", "--workspace --bins --tests")
            .env("BASTIDE_DEMO_WITHOUT", without)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let dir = dir.canonicalize().unwrap_or(dir);
        let mut demo = Demo {
            _tmp: tmp,
            dir,
            export: String::new(),
            commands: Vec::new(),
            stdout,
        };
        assert!(
            out.status.success(),
            "scripts/demo failed: {}\n{}",
            transcript(&out),
            demo.logs()
        );
        let try_sh = std::fs::read_to_string(demo.dir.join("try.sh")).unwrap();
        let mut id = None;
        for line in try_sh.lines() {
            if let Some(e) = line.strip_prefix("export ") {
                demo.export = format!("export {e}");
            } else if let Some(rest) = line.strip_prefix("# [") {
                id = rest.split(']').next().map(str::to_string);
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let id = id
                    .take()
                    .unwrap_or_else(|| panic!("no [id] before {line:?}"));
                demo.commands.push((id, line.to_string()));
            }
        }
        assert!(!demo.export.is_empty(), "no export line in try.sh");
        demo
    }

    /// `bash -c "EXPORT; cmd"`, so each command runs exactly as a user would paste it.
    fn shell(&self, cmd: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(format!("{}\n{cmd}", self.export))
            .stdin(Stdio::null());
        c
    }

    /// Runs a command of try.sh to completion (at most a minute).
    fn run(&self, cmd: &str) -> Output {
        Command::new("timeout")
            .args(["60", "bash", "-c"])
            .arg(format!("{}\n{cmd}", self.export))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pids"))
            .ok()?
            .lines()
            .find_map(|l| {
                let (n, p) = l.split_once(' ')?;
                (n == name).then(|| p.trim().parse().ok()).flatten()
            })
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for f in [
            "bastide.log",
            "web01.log",
            "db01.log",
            "sshd.log",
            "smtp-sink.log",
        ] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {f}\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.dir.join("pids").exists() {
            let _ = Command::new(workspace().join("scripts/demo"))
                .arg("stop")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Runs `cmd` until its output has a line matching `want` (or 30 s pass), then kills it:
/// for commands that run until Ctrl-C (`bastide logs --follow`).
fn until_line(demo: &Demo, cmd: &str, want: &str) -> Option<String> {
    let mut child = demo
        .shell(&format!("exec {cmd}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut found = None;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(want) => {
                found = Some(line);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

/// Every peer the printed commands use, and those the demo starts: missing is a failure.
fn require_peers() {
    for (program, package) in [
        ("ssh", "openssh-client"),
        ("sshd", "openssh-server"),
        ("dig", "dnsutils"),
        ("swaks", "swaks"),
        ("smtp-sink", "postfix"),
        ("logger", "bsdutils"),
        ("curl", "curl"),
    ] {
        require(program, package);
    }
}

#[test]
fn every_command_the_demo_prints_works() {
    require_peers();
    let demo = Demo::start("");
    assert!(demo.stdout.contains("Postfix smtp-sink"), "{}", demo.stdout);
    check_every_command(&demo, true);
}

/// A fresh Debian with Rust: no sshd, no swaks, no Postfix. The demo says what to install
/// for the SSH target, sends the mail with curl to a sink of its own, and every command it
/// prints still works.
#[test]
fn on_a_machine_without_sshd_swaks_or_postfix_every_printed_command_works() {
    require_peers();
    let demo = Demo::start("sshd swaks smtp-sink");
    assert!(
        demo.stdout.contains("apt-get install openssh-server")
            && demo.stdout.contains("demo-tools smtp-sink")
            && !demo.commands.iter().any(|(_, c)| c.contains("swaks")),
        "{}",
        demo.stdout
    );
    assert!(
        demo.commands
            .iter()
            .any(|(id, c)| id == "mail" && c.contains("curl")),
        "{:?}",
        demo.commands
    );
    check_every_command(&demo, false);
}

/// Runs every command of try.sh and asserts on each; `ssh`: whether an SSH target runs.
fn check_every_command(demo: &Demo, ssh: bool) {
    let ids: BTreeSet<&str> = demo.commands.iter().map(|(i, _)| i.as_str()).collect();
    let mut expected: BTreeSet<&str> = [
        "status",
        "agents",
        "dig",
        "dig-forward",
        "mail",
        "mail-sink",
        "logger",
        "logs",
        "metrics",
        "sd",
        "render",
        "pushed",
        "revoke",
    ]
    .into();
    if ssh {
        expected.insert("ssh");
    }
    assert_eq!(
        ids, expected,
        "try.sh's commands and this test's assertions differ: give each command an assertion"
    );
    // What try.sh holds is what the demo printed.
    for (_, cmd) in &demo.commands {
        assert!(
            demo.stdout.contains(cmd.as_str()),
            "printed list lacks {cmd}:\n{}",
            demo.stdout
        );
    }
    assert!(
        demo.stdout.contains(&demo.export),
        "{}\n{}",
        demo.export,
        demo.stdout
    );

    for (id, cmd) in &demo.commands {
        let ctx = |o: &Output| format!("[{id}] {cmd}\n{}\n{}", transcript(o), demo.logs());
        match id.as_str() {
            "status" => {
                let o = demo.run(cmd);
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                assert!(o.status.success(), "{}", ctx(&o));
                let services = text
                    .lines()
                    .find(|l| l.starts_with("services"))
                    .unwrap_or_default();
                for s in [
                    "admin",
                    "agents",
                    "dns",
                    "metrics",
                    "smtp",
                    "ssh",
                    "logs",
                    "syslog",
                    "config_push",
                ] {
                    assert!(services.contains(&format!("{s} on")), "{s}: {}", ctx(&o));
                }
            }
            "agents" => {
                let o = demo.run(cmd);
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                assert!(o.status.success(), "{}", ctx(&o));
                let line = |name: &str| {
                    text.lines()
                        .find(|l| l.starts_with(name))
                        .unwrap_or_default()
                        .to_string()
                };
                assert!(
                    line("web01").contains("online") && line("web01").contains("in-sync"),
                    "{}",
                    ctx(&o)
                );
                assert!(
                    line("db01").contains("online") && line("db01").contains("refused"),
                    "{}",
                    ctx(&o)
                );
            }
            "ssh" => {
                let o = demo.run(cmd);
                // The target saw the connection come from the bastion, to web01's address.
                assert!(
                    o.status.success()
                        && String::from_utf8_lossy(&o.stdout)
                            .contains("hello from the target, connection 127.0.0.1 "),
                    "{}",
                    ctx(&o)
                );
                assert!(
                    String::from_utf8_lossy(&o.stdout).contains(" 127.0.0.2 "),
                    "{}",
                    ctx(&o)
                );
            }
            "dig" => {
                let o = demo.run(cmd);
                assert!(
                    o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "127.0.0.2",
                    "{}",
                    ctx(&o)
                );
            }
            "dig-forward" => {
                // The upstream may be unreachable (no network in CI): the bastion answers
                // anyway, from the upstream or with its failure.
                let o = demo.run(cmd);
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                assert!(
                    o.status.success()
                        && text.contains("->>HEADER<<-")
                        && text.contains("SERVER: 127.0.0.1#"),
                    "{}",
                    ctx(&o)
                );
            }
            "mail" => {
                // swaks shows the dialogue; curl prints nothing and fails on a refusal.
                let o = demo.run(cmd);
                assert!(
                    o.status.success()
                        && (cmd.starts_with("printf") || transcript(&o).contains("<-  250 2.0.0")),
                    "{}",
                    ctx(&o)
                );
            }
            "mail-sink" => {
                // Relayed asynchronously: it reaches the sink shortly after the 250.
                let got = wait_for(Duration::from_secs(30), || {
                    let o = demo.run(cmd);
                    String::from_utf8_lossy(&o.stdout)
                        .contains("Subject: hello from the demo")
                        .then_some(())
                });
                let o = demo.run(cmd);
                assert!(got.is_some(), "{}", ctx(&o));
            }
            "logger" => {
                let o = demo.run(cmd);
                assert!(o.status.success(), "{}", ctx(&o));
            }
            "logs" => {
                let line = until_line(demo, cmd, "hello from logger");
                assert!(
                    line.as_deref()
                        .is_some_and(|l| l.contains("demo") && l.contains("hello from logger")),
                    "[logs] {cmd}: no line: {line:?}\n{}",
                    demo.logs()
                );
            }
            "metrics" => {
                let o = demo.run(cmd);
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                assert!(
                    text.lines().any(|l| l == "bastide_agent_connections 2"),
                    "{}",
                    ctx(&o)
                );
                let mut series = vec![
                    "bastide_dns_queries_total",
                    "bastide_smtp_relayed_total",
                    "bastide_logs_events_total",
                    "bastide_config_results_total",
                ];
                if ssh {
                    series.push("bastide_ssh_jumps_allowed_total");
                }
                for series in series {
                    assert!(
                        text.lines()
                            .any(|l| l.starts_with(series) && !l.ends_with(" 0")),
                        "{series}: {}",
                        ctx(&o)
                    );
                }
            }
            "sd" => {
                let o = demo.run(cmd);
                let sd: Value = serde_json::from_slice(&o.stdout)
                    .unwrap_or_else(|e| panic!("{e}: {}", ctx(&o)));
                let agents: BTreeSet<&str> = sd
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g["labels"]["agent"].as_str())
                    .collect();
                assert_eq!(agents, ["db01", "web01"].into(), "{}", ctx(&o));
            }
            "render" => {
                let o = demo.run(cmd);
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                assert!(
                    o.status.success()
                        && text.contains("# agent web01")
                        && text.contains("vars.ntp_servers")
                        && text.contains("host: clouds/ovh/sites/gra/instances/production/projects/demo/hosts/web01.toml"),
                    "{}",
                    ctx(&o)
                );
            }
            "pushed" => {
                let o = demo.run(cmd);
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                assert!(
                    o.status.success()
                        && text.contains("server 10.0.0.1 iburst")
                        && text.contains("web01.demo.internal"),
                    "{}",
                    ctx(&o)
                );
            }
            "revoke" => {
                let pid = demo.pid("db01").expect("db01's pid in the pids file");
                let o = demo.run(cmd);
                assert!(o.status.success(), "{}", ctx(&o));
                let list = demo.run("bastide agents list --json");
                let agents: Value = serde_json::from_slice(&list.stdout).unwrap();
                let state = |name: &str| {
                    agents
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["name"] == name)
                        .map(|a| a["state"].as_str().unwrap_or_default().to_string())
                };
                assert_eq!(state("db01").as_deref(), Some("revoked"), "{}", ctx(&o));
                assert_eq!(state("web01").as_deref(), Some("online"), "{}", ctx(&o));
                // Cut at once: the agent is refused on reconnection and exits.
                assert!(
                    wait_for(Duration::from_secs(30), || (!alive(pid)).then_some(())).is_some(),
                    "db01 still running after revoke: {}",
                    ctx(&o)
                );
            }
            other => panic!("no assertion for [{other}]"),
        }
    }

    // `scripts/demo stop` ends everything it started.
    let mut names = vec!["bastide", "web01", "smtp-sink"];
    if ssh {
        names.push("sshd");
    }
    let pids: Vec<u32> = names
        .iter()
        .map(|n| demo.pid(n).unwrap_or_else(|| panic!("{n} not in pids")))
        .collect();
    let o = Command::new(workspace().join("scripts/demo"))
        .arg("stop")
        .arg(&demo.dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", transcript(&o));
    for pid in pids {
        assert!(
            wait_for(Duration::from_secs(20), || (!alive(pid)).then_some(())).is_some(),
            "{pid} still running after scripts/demo stop"
        );
    }
}
