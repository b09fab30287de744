//! Agent log shipping end to end: the real `bastide-agent` tails files (and the journal) and
//! ships them to the real `bastide`, whose log store must hold every line exactly once
//! through bastion crashes, bastion downtime, agent crashes, rotation and a full buffer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bastide_tests::{
    log_store_lines, require, stored_numbers, wait_for, write_numbered, Agent, Bastion,
};

/// A bastion with a log store and an enrolled agent following `<agent dir>/app/*.log`.
struct Rig {
    bastion: Bastion,
    agent: Agent,
    store: PathBuf,
    logs: PathBuf,
}

fn rig(name: &str, extra_logs_cfg: &str) -> Rig {
    let mut bastion = Bastion::init("logs");
    let store = bastion.enable_log_store(None, "");
    bastion.start();
    let agent = Agent::new(name);
    agent.enroll_ok(&bastion, &bastion.token(&[]));
    let logs = agent.dir.path().join("app");
    std::fs::create_dir_all(&logs).unwrap();
    agent.edit_config(|c| {
        format!(
            "{c}\n[logs]\nbatch_timeout = \"100ms\"\npoll_interval = \"50ms\"\n{extra_logs_cfg}\n[[logs.sources]]\npath = \"{}/*.log\"\n",
            logs.display()
        )
    });
    Rig {
        bastion,
        agent,
        store,
        logs,
    }
}

fn assert_exactly_once(store: &Path, host: &str, n: u64, timeout: Duration) {
    let ok = wait_for(timeout, || {
        (stored_numbers(store, host).len() as u64 >= n).then_some(())
    });
    let got = stored_numbers(store, host);
    let missing: Vec<u64> = (0..n).filter(|i| !got.contains_key(i)).take(10).collect();
    let repeated: Vec<(&u64, &u32)> = got.iter().filter(|(_, c)| **c > 1).take(10).collect();
    assert!(
        ok.is_some() && missing.is_empty() && repeated.is_empty() && got.len() as u64 == n,
        "store has {} distinct of {n}; first missing {missing:?}; repeated {repeated:?}",
        got.len()
    );
}

#[test]
fn loss_test_200k_lines_through_two_bastion_sigkills() {
    let mut r = rig("logs-loss", "");
    r.agent.start();
    assert!(r
        .bastion
        .wait_state("logs-loss", "online", Duration::from_secs(20)));
    let path = r.logs.join("app.log");
    let mut kills = 0;
    let bastion = &mut r.bastion;
    write_numbered(&path, 0, 200_000, 2_000, Duration::from_millis(40), |i| {
        if (i == 60_000 || i == 130_000) && kills < 2 {
            kills += 1;
            bastion.kill();
            std::thread::sleep(Duration::from_millis(1500));
            bastion.start();
        }
    });
    assert_eq!(kills, 2);
    assert_exactly_once(&r.store, "logs-loss", 200_000, Duration::from_secs(180));
}

#[test]
fn bastion_down_for_a_while_agent_buffers_then_delivers() {
    let mut r = rig("logs-down", "");
    r.agent.start();
    assert!(r
        .bastion
        .wait_state("logs-down", "online", Duration::from_secs(20)));
    r.bastion.stop();
    let path = r.logs.join("app.log");
    write_numbered(&path, 0, 20_000, 1_000, Duration::from_millis(50), |_| {});
    // The agent read it all into its buffer while the bastion was away.
    let buf = r.agent.state_dir().join("logs");
    assert!(
        wait_for(Duration::from_secs(20), || {
            let n: u64 = std::fs::read_dir(&buf)
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            (n > 20_000 * 100).then_some(())
        })
        .is_some(),
        "the agent did not buffer the lines on disk"
    );
    assert!(stored_numbers(&r.store, "logs-down").is_empty());
    std::thread::sleep(Duration::from_secs(3));
    r.bastion.start();
    assert_exactly_once(&r.store, "logs-down", 20_000, Duration::from_secs(60));
}

#[test]
fn agent_sigkill_mid_stream_resumes_from_checkpoint() {
    let mut r = rig("logs-akill", "");
    r.agent.start();
    assert!(r
        .bastion
        .wait_state("logs-akill", "online", Duration::from_secs(20)));
    let path = r.logs.join("app.log");
    let agent = &mut r.agent;
    write_numbered(&path, 0, 60_000, 2_000, Duration::from_millis(30), |i| {
        if i == 20_000 || i == 40_000 {
            // SIGKILL (Child::kill).
            agent.kill();
            std::thread::sleep(Duration::from_millis(500));
            agent.start();
        }
    });
    assert_exactly_once(&r.store, "logs-akill", 60_000, Duration::from_secs(90));
}

#[test]
fn rotation_by_rename_and_copytruncate_while_writing() {
    let mut r = rig("logs-rot", "");
    r.agent.start();
    assert!(r
        .bastion
        .wait_state("logs-rot", "online", Duration::from_secs(20)));
    let path = r.logs.join("app.log");
    let mut n = 0;
    for round in 0..6 {
        write_numbered(&path, n, n + 5_000, 500, Duration::from_millis(20), |_| {});
        n += 5_000;
        if round % 2 == 0 {
            // logrotate's default: rename, the writer reopens.
            std::fs::rename(&path, r.logs.join(format!("app.log.{round}"))).unwrap();
        } else {
            // copytruncate, after letting the agent catch up (the documented window of
            // loss of copytruncate is between copy and truncate): wait until everything
            // written so far is stored rather than a fixed time, which a loaded machine
            // overruns.
            assert!(
                wait_for(Duration::from_secs(30), || {
                    (stored_numbers(&r.store, "logs-rot").len() as u64 >= n).then_some(())
                })
                .is_some(),
                "the agent did not catch up before copytruncate"
            );
            std::fs::copy(&path, r.logs.join(format!("app.log.{round}"))).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
    }
    assert_exactly_once(&r.store, "logs-rot", n, Duration::from_secs(60));
}

#[test]
fn full_agent_buffer_applies_backpressure_and_loses_nothing() {
    // 40,000 lines of ~100 bytes (4 MB) against a 1 MiB buffer.
    let mut r = rig(
        "logs-full",
        "buffer_max_bytes = 1048576\nbatch_max_bytes = 65536\n",
    );
    r.agent.start();
    assert!(r
        .bastion
        .wait_state("logs-full", "online", Duration::from_secs(20)));
    r.bastion.stop();
    let path = r.logs.join("app.log");
    write_numbered(&path, 0, 40_000, 4_000, Duration::from_millis(10), |_| {});
    assert!(
        wait_for(Duration::from_secs(20), || r
            .agent
            .log_text()
            .contains("log buffer full")
            .then_some(()))
        .is_some(),
        "no backpressure:\n{}",
        r.agent.log_text()
    );
    r.bastion.start();
    assert_exactly_once(&r.store, "logs-full", 40_000, Duration::from_secs(90));
}

#[test]
fn java_stack_trace_is_one_event_and_the_last_is_flushed_after_timeout() {
    let mut r = rig("logs-ml", "");
    r.agent.edit_config(|c| {
        format!("{c}multiline_start = '^\\d{{4}}-'\nmultiline_timeout = \"500ms\"\n")
    });
    r.agent.start();
    assert!(r
        .bastion
        .wait_state("logs-ml", "online", Duration::from_secs(20)));
    std::fs::write(
        r.logs.join("java.log"),
        "2026-11-27 10:00:00 ERROR seq=1 boom\njava.lang.IllegalStateException: bad\n\tat a.B.c(B.java:1)\n\tat a.B.main(B.java:9)\n2026-11-27 10:00:01 INFO seq=2 last\n",
    )
    .unwrap();
    let got = wait_for(Duration::from_secs(20), || {
        let n = stored_numbers(&r.store, "logs-ml");
        (n.len() == 2).then_some(n)
    });
    assert!(
        got.is_some(),
        "both events (the last one by timeout) expected"
    );
    let text = log_store_lines(&r.store, "logs-ml").join("\n");
    assert!(text.contains("B.java:9"), "{text}");
}

/// A private `systemd-journald` started by the test in its own mount namespace (a tmpfs on
/// `/run/systemd` for its sockets, a temporary directory bind-mounted on `/run/log` for its
/// files), so the test needs no journald on the machine (containers and CI have no systemd
/// PID 1) and writes nothing into the host's journal.
struct PrivateJournald {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for PrivateJournald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrivateJournald {
    /// Err: why a mount namespace cannot be made here (not root, no CAP_SYS_ADMIN).
    fn start() -> Result<Self, String> {
        let unshare = require("unshare", "util-linux");
        require("nsenter", "util-linux");
        let journald = Path::new("/lib/systemd/systemd-journald");
        assert!(
            journald.exists(),
            "{} is required by this test: apt-get install -y systemd",
            journald.display()
        );
        let probe = Command::new(&unshare)
            .args(["-m", "--propagation", "private", "true"])
            .output()
            .unwrap();
        if !probe.status.success() {
            return Err(format!(
                "cannot create a mount namespace for a private journald (needs root): {}",
                String::from_utf8_lossy(&probe.stderr).trim()
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::create_dir(&log).unwrap();
        let script = format!(
            "mount -t tmpfs tmpfs /run/systemd && mount --bind '{}' /run/log && exec {}",
            log.display(),
            journald.display()
        );
        let child = Command::new(&unshare)
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut j = Self { child, dir };
        let ready = wait_for(Duration::from_secs(15), || {
            j.journal_dir()
                .filter(|d| d.join("system.journal").exists())
        });
        if ready.is_none() {
            let _ = j.child.kill();
            let out = j.child.stderr.take().map(|mut e| {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                s
            });
            panic!("the private journald did not start: {out:?}");
        }
        Ok(j)
    }

    /// `<tmp>/log/journal/<machine id>`, where journald keeps its files.
    fn journal_dir(&self) -> Option<PathBuf> {
        std::fs::read_dir(self.dir.path().join("log").join("journal"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir())
    }

    /// Runs `systemd-cat ARGS` inside journald's namespace with `input` on its stdin.
    fn systemd_cat(&self, args: &[&str], input: &[u8]) {
        let cat = require("systemd-cat", "systemd");
        let mut c = Command::new("nsenter")
            .args(["-t", &self.child.id().to_string(), "-m"])
            .arg(cat)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input).unwrap();
        assert!(c.wait().unwrap().success(), "systemd-cat failed");
    }
}

/// `systemd-cat` writes into a real journald (a private one, see [`PrivateJournald`]); the
/// agent's journal source (`journalctl --follow --output=json --directory`) ships the entries,
/// and the store holds each line once with its identifier and priority. A machine where no
/// mount namespace can be made (not root) fails the test with the reason.
#[test]
fn systemd_cat_lines_reach_the_store_through_the_journal() {
    // CI runs as root: a machine that cannot make a mount namespace fails this test, it
    // never passes without having shipped anything.
    let journald = PrivateJournald::start().unwrap_or_else(|reason| {
        panic!("systemd_cat_lines_reach_the_store_through_the_journal needs root (run the tests as root, as CI does): {reason}")
    });
    let jdir = journald.journal_dir().unwrap();
    let mut r = rig("logs-journal", "");
    r.agent.edit_config(|c| {
        format!(
            "{c}\n[[logs.sources]]\njournal = true\njournal_directory = {:?}\n",
            jdir.display().to_string()
        )
    });
    r.agent.start();
    assert!(r
        .bastion
        .wait_state("logs-journal", "online", Duration::from_secs(20)));
    let tag = format!("bastide-test-{}", std::process::id());
    let input: String = (0..20)
        .map(|i| format!("hello seq={i} from the journal\n"))
        .collect();
    journald.systemd_cat(&["-t", &tag, "-p", "warning"], input.as_bytes());
    let start = Instant::now();
    let all = wait_for(Duration::from_secs(30), || {
        let lines: Vec<String> = log_store_lines(&r.store, "logs-journal")
            .into_iter()
            .filter(|l| l.contains(&tag))
            .collect();
        (lines.len() >= 20).then_some(lines)
    });
    let lines = all.unwrap_or_else(|| {
        panic!(
            "journal lines not in the store after {:?}: {:?}\nagent log:\n{}",
            start.elapsed(),
            log_store_lines(&r.store, "logs-journal"),
            r.agent.log_text()
        )
    });
    let got = stored_numbers(&r.store, "logs-journal");
    for i in 0..20u64 {
        assert_eq!(got.get(&i), Some(&1), "seq={i} once: {lines:?}");
    }
    let l = lines.iter().find(|l| l.contains("hello seq=7 ")).unwrap();
    assert!(l.contains(&format!(" {tag} ")), "identifier as app: {l}");
    assert!(l.contains(".warning "), "priority kept: {l}");
    assert!(l.contains(" logs-journal "), "filed under the agent: {l}");
}

/// Runs whether or not the bastion stores logs: the agent reads and buffers a file and its
/// `bastide_agent_log_*` families reach the bastion's per-agent metrics, which promtool
/// accepts.
#[test]
fn agent_log_metrics_reach_the_bastion() {
    let promtool = require("promtool", "prometheus");
    let mut bastion = Bastion::init("logsm");
    bastion.start();
    let mut agent = Agent::new("logs-metrics");
    agent.enroll_ok(&bastion, &bastion.token(&[]));
    let logs = agent.dir.path().join("app");
    std::fs::create_dir_all(&logs).unwrap();
    let lines: String = (0..500).map(|i| format!("seq={i} hello\n")).collect();
    std::fs::write(logs.join("app.log"), lines).unwrap();
    agent.edit_config(|c| {
        format!(
            "{c}\n[logs]\nbatch_timeout = \"100ms\"\npoll_interval = \"50ms\"\n[[logs.sources]]\npath = \"{}/*.log\"\n",
            logs.display()
        )
    });
    agent.start();
    assert!(bastion.wait_state("logs-metrics", "online", Duration::from_secs(20)));
    let text = wait_for(Duration::from_secs(30), || {
        let (status, t) =
            bastide_tests::http_get(&bastion.metrics_addr, "/metrics/agents/logs-metrics", None);
        (status == 200
            && t.contains("bastide_agent_log_lines_read_total{source_kind=\"file\"} 500")
            && t.contains("bastide_agent_log_events_buffered_total 500"))
        .then_some(t)
    })
    .unwrap_or_else(|| panic!("log metrics not seen; agent log:\n{}", agent.log_text()));
    for fam in [
        "bastide_agent_log_buffer_bytes",
        "bastide_agent_log_buffer_age_seconds",
        "bastide_agent_log_events_shipped_total",
        "bastide_agent_log_lost_bytes_total",
        "bastide_agent_log_backpressure_total",
    ] {
        assert!(text.contains(fam), "{fam} missing:\n{text}");
    }
    let ours: String = text
        .lines()
        .filter(|l| l.contains("bastide_agent_log_"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut c = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(ours.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{ours}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Stopping cleanly keeps the agent's exit status 0 with the log pipeline running.
    assert!(
        agent.stop().is_some_and(|s| s.success()),
        "{}",
        agent.log_text()
    );
}
