//! Fault injection against the real processes: the spool's filesystem filling up (a tmpfs
//! mounted by the test), the smarthost and the DNS upstream disappearing and coming back, an
//! agent whose clock is two minutes off (libfaketime), and SIGKILL of the bastion at random
//! points under SMTP load, ten times in a row.
//!
//! Peers: `swaks` (client), Postfix's `smtp-sink` (smarthost), `unbound` (DNS upstream),
//! `dig`, `faketime`. Mounting needs root (CAP_SYS_ADMIN); without it the test fails and says
//! so.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bastide_tests::{free_port, require, wait_for, Agent, Bastion};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A Postfix smtp-sink dumping every message to its own file.
struct Sink {
    child: Child,
}

impl Sink {
    /// Starts on `port`, dumping into `dir` (kept across restarts of the sink).
    fn start(port: u16, dir: &Path) -> Sink {
        let prog = require("smtp-sink", "postfix");
        std::fs::create_dir_all(dir).unwrap();
        let mut c = Command::new(prog);
        if is_root() {
            c.args(["-u", "root"]);
        }
        let child = c
            .arg("-d")
            .arg(format!("{}/%Y%m%d%H%M%S.", dir.display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .ok())
            .is_some(),
            "smtp-sink did not start"
        );
        Sink { child }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dumped(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Subject of every message the sink stored, with how many times it was stored.
fn subjects(dir: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in dumped(dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).to_string();
        if let Some(s) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
            *m.entry(s.trim().to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// Bastide queue ids (from its Received: header) of every stored copy, by Subject.
fn queue_ids(dir: &Path) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut m: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for f in dumped(dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).to_string();
        let subject = text.lines().find_map(|l| l.strip_prefix("Subject: "));
        let id = text
            .split("(Bastide) with ")
            .nth(1)
            .and_then(|s| s.split(" id ").nth(1))
            .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit()).next());
        if let (Some(s), Some(id)) = (subject, id) {
            m.entry(s.trim().to_string())
                .or_default()
                .insert(id.to_string());
        }
    }
    m
}

/// The body of the stored message whose Subject is `subject` (LF line ends, as smtp-sink
/// stores lines).
fn body_of(dir: &Path, subject: &str) -> Option<String> {
    for f in dumped(dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).to_string();
        let Some(at) = text.find(&format!("\nSubject: {subject}\n")) else {
            continue;
        };
        return text[at..].split_once("\n\n").map(|(_, b)| b.to_string());
    }
    None
}

fn swaks(port: u16, args: &[&str]) -> Output {
    Command::new(require("swaks", "swaks"))
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--helo",
            "web01",
            "--timeout",
            "10",
            "--from",
            "load@example.com",
            "--to",
            "sink@example.org",
        ])
        .args(args)
        .output()
        .unwrap()
}

fn transcript(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn queue(b: &Bastion) -> Value {
    serde_json::from_str(&b.cli_ok(&["mail", "queue", "--json"])).unwrap()
}

fn queue_len(b: &Bastion) -> usize {
    queue(b)["messages"].as_array().map(Vec::len).unwrap_or(0)
}

/// A bastion relaying to 127.0.0.1:`sink_port` with fast retries; its SMTP port.
fn mail_bastion(sink_port: u16, smtp_extra: &str) -> (Bastion, u16) {
    let mut b = Bastion::init("faults");
    let port = free_port();
    b.edit_config(|c| {
        format!(
            "{c}\n[smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"bastion.faults.test\"\nallow_networks = [\"127.0.0.1/32\"]\n{smtp_extra}\n\n[smtp.relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"none\"\ntimeout = \"3s\"\nconcurrency = 4\nretry_initial = \"300ms\"\nretry_max = \"1s\"\n"
        )
    });
    b.start();
    (b, port)
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted in Drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn tmpfs(size: &str) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("bastide-spoolfs-")
            .tempdir()
            .unwrap();
        let out = Command::new(require("mount", "mount"))
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "FAIL: cannot mount a {size} tmpfs for the full-disk test (root/CAP_SYS_ADMIN needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A message body of about `kib` KiB, distinct per `tag`.
fn body(tag: &str, kib: usize) -> String {
    let line = format!("{tag} {}\r\n", "x".repeat(70));
    line.repeat(kib * 1024 / line.len() + 1)
}

fn sha(s: &str) -> String {
    Sha256::digest(s.replace("\r\n", "\n").trim_end().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn spool_disk_full_answers_452_and_recovers() {
    let t0 = Instant::now();
    let mnt = Mount::tmpfs("4m");
    let sink_port = free_port();
    let spool = mnt.path().join("mail");
    let (b, port) = mail_bastion(
        sink_port,
        &format!(
            "spool_dir = \"{}\"\nmax_message_size = 2000000",
            spool.display()
        ),
    );
    // The smarthost is down: accepted mail stays in the spool while it fills.
    let filler = mnt.path().join("filler");
    let leave = 1_600_000u64;
    let fill = mnt.free().saturating_sub(leave);
    std::fs::write(&filler, vec![7u8; fill as usize]).unwrap();

    let mut accepted: Vec<(String, String)> = Vec::new();
    let mut refused = None;
    for i in 0..12 {
        let subject = format!("full-{i:02}");
        let data = body(&subject, 150);
        let f = b.dir.path().join(format!("body-{i}"));
        std::fs::write(&f, &data).unwrap();
        let o = swaks(
            port,
            &[
                "--header",
                &format!("Subject: {subject}"),
                "--body",
                &format!("@{}", f.display()),
            ],
        );
        let t = transcript(&o);
        if o.status.success() {
            accepted.push((subject, data));
        } else {
            refused = Some(t);
            break;
        }
    }
    let refused = refused.expect("the spool never filled up");
    assert!(
        refused.contains("452 4.3.1"),
        "a full spool must answer 452 (insufficient storage):\n{refused}"
    );
    assert!(
        !accepted.is_empty(),
        "no message fitted before the disk was full"
    );
    assert!(
        b.log_text().contains("spool filesystem full") || b.log_text().contains("cannot spool"),
        "the refusal is logged"
    );
    // No half-written file is left taking space.
    let tmp: Vec<_> = std::fs::read_dir(spool.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "tmp/ keeps {} partial files", tmp.len());
    // Still refused while full, still alive.
    let o = swaks(port, &["--header", "Subject: still-full"]);
    assert!(!o.status.success());

    // Space returns: accepted again without any restart.
    std::fs::remove_file(&filler).unwrap();
    let data = body("after", 100);
    let f = b.dir.path().join("body-after");
    std::fs::write(&f, &data).unwrap();
    let o = swaks(
        port,
        &[
            "--header",
            "Subject: after-space-returned",
            "--body",
            &format!("@{}", f.display()),
        ],
    );
    assert!(o.status.success(), "not recovered:\n{}", transcript(&o));
    accepted.push(("after-space-returned".into(), data));

    // Every acknowledged message reaches the smarthost intact once it is up.
    let sink_dir = b.dir.path().join("sink");
    let _sink = Sink::start(sink_port, &sink_dir);
    let n = accepted.len();
    let got = wait_for(Duration::from_secs(30), || {
        (subjects(&sink_dir).len() >= n && queue_len(&b) == 0).then_some(())
    });
    assert!(got.is_some(), "delivered {:?} of {n}", subjects(&sink_dir));
    for (subject, data) in &accepted {
        let stored = body_of(&sink_dir, subject).expect("delivered");
        assert_eq!(sha(&stored), sha(data), "{subject} corrupted");
    }
    let counts = subjects(&sink_dir);
    assert!(counts.values().all(|&c| c == 1), "duplicates: {counts:?}");
    assert!(!b.log_text().contains("corrupt spool file"));
    eprintln!("disk-full test: {:?}", t0.elapsed());
}

#[test]
fn smarthost_disappears_and_comes_back() {
    let sink_port = free_port();
    let (b, port) = mail_bastion(sink_port, "");
    let dir = b.dir.path().join("sink");
    let sink = Sink::start(sink_port, &dir);
    let o = swaks(port, &["--header", "Subject: before"]);
    assert!(o.status.success(), "{}", transcript(&o));
    assert!(wait_for(Duration::from_secs(10), || subjects(&dir)
        .contains_key("before")
        .then_some(()))
    .is_some());
    // The smarthost goes away while mail keeps coming.
    drop(sink);
    for i in 0..5 {
        let o = swaks(port, &["--header", &format!("Subject: during-{i}")]);
        assert!(o.status.success(), "{}", transcript(&o));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(queue_len(&b), 5, "queued while the smarthost is down");
    let q = queue(&b);
    assert!(
        q["messages"][0]["attempts"].as_u64().unwrap_or(0) >= 1,
        "delivery was attempted and deferred: {q}"
    );
    // It comes back on the same address: everything is delivered, once.
    let _sink = Sink::start(sink_port, &dir);
    let ok = wait_for(Duration::from_secs(20), || {
        (subjects(&dir).len() == 6 && queue_len(&b) == 0).then_some(())
    });
    assert!(
        ok.is_some(),
        "after the smarthost came back: {:?}",
        subjects(&dir)
    );
    assert!(subjects(&dir).values().all(|&c| c == 1));
}

/// unbound serving `fwd.test.` on a fixed loopback port (so that it can come back there).
struct Unbound {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Unbound {
    fn new() -> Unbound {
        let dir = tempfile::Builder::new()
            .prefix("bastide-unbound-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  verbosity: 0\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"fwd.test.\" static\n  local-data: \"fwd.test. 300 IN SOA ns.fwd.test. hostmaster.fwd.test. 1 3600 600 86400 3\"\n  local-data: \"a.fwd.test. 1 IN A 192.0.2.1\"\n  local-data: \"b.fwd.test. 1 IN A 192.0.2.2\"\n  local-data: \"c.fwd.test. 1 IN A 192.0.2.3\"\nremote-control:\n  control-enable: no\n"
        );
        std::fs::write(dir.path().join("unbound.conf"), conf).unwrap();
        Unbound {
            dir,
            port,
            child: None,
        }
    }

    fn start(&mut self) {
        let child = Command::new(require("unbound", "unbound"))
            .arg("-d")
            .arg("-c")
            .arg(self.dir.path().join("unbound.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_for(Duration::from_secs(10), || dig(port, "a.fwd.test")
                .contains("192.0.2.1")
                .then_some(()))
            .is_some(),
            "unbound did not start"
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `dig +short`-like: the whole output of one try with a 2 s timeout.
fn dig(port: u16, name: &str) -> String {
    let out = Command::new(require("dig", "dnsutils"))
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=2"])
        .args([name, "A"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn status(out: &str) -> String {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NONE")
        .to_string()
}

#[test]
fn dns_upstream_disappears_and_comes_back() {
    let mut up = Unbound::new();
    up.start();
    let mut b = Bastion::init("proj");
    let port = free_port();
    let upstream = up.port;
    b.edit_config(|c| {
        format!(
            "{c}\n[dns]\nlisten = [\"127.0.0.1:{port}\"]\nallow = [\"127.0.0.1/32\"]\nupstreams = [\"127.0.0.1:{upstream}\"]\nupstream_timeout = \"500ms\"\nservfail_ttl = \"1s\"\ncache_min_ttl = \"1s\"\ncache_max_ttl = \"1s\"\nserve_stale = \"1h\"\nrate_limit = 0\n"
        )
    });
    b.start();
    let ok = wait_for(Duration::from_secs(10), || {
        dig(port, "a.fwd.test").contains("192.0.2.1").then_some(())
    });
    assert!(ok.is_some(), "forwarding works:\n{}", b.log_text());

    up.stop();
    // The zone itself never depends on the upstream.
    assert_eq!(status(&dig(port, "proj.test")), "NOERROR");
    // A name never seen: SERVFAIL, quickly (not a hang).
    let t = Instant::now();
    let out = dig(port, "b.fwd.test");
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // A name seen before: served stale after its TTL.
    std::thread::sleep(Duration::from_millis(1200));
    let out = dig(port, "a.fwd.test");
    assert!(
        out.contains("192.0.2.1"),
        "stale answer while upstream is down: {out}"
    );

    // The upstream comes back on the same address: answers again once the SERVFAIL
    // expires, without a restart.
    up.start();
    let ok = wait_for(Duration::from_secs(10), || {
        dig(port, "b.fwd.test").contains("192.0.2.2").then_some(())
    });
    assert!(
        ok.is_some(),
        "upstream back, still failing:\n{}",
        b.log_text()
    );
    assert!(dig(port, "c.fwd.test").contains("192.0.2.3"));
}

#[test]
fn agent_clock_two_minutes_off_still_online_and_skew_reported() {
    let faketime = require("faketime", "faketime");
    let mut b = Bastion::init("skew");
    b.edit_config(|c| {
        c.replace(
            "heartbeat_interval = \"10s\"",
            "heartbeat_interval = \"1s\"",
        )
        .replace("heartbeat_timeout = \"35s\"", "heartbeat_timeout = \"4s\"")
    });
    b.start();
    let mut a = Agent::new("late01");
    a.enroll_ok(&b, &b.token(&[]));
    let ft = faketime.display().to_string();
    // The agent's wall clock is 2 minutes behind; its monotonic clock is left alone.
    a.start_via(
        &[&ft, "-f", "-120s"],
        &[("FAKETIME_DONT_FAKE_MONOTONIC", "1")],
    );
    assert!(
        b.wait_state("late01", "online", Duration::from_secs(15)),
        "agent with a skewed clock not online:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    // Heartbeats keep being accepted for several timeouts.
    let first = b.agent("late01").unwrap()["last_seen"].as_i64().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let agent = b.agent("late01").unwrap();
    assert_eq!(agent["state"], "online");
    assert!(
        agent["last_seen"].as_i64().unwrap() > first,
        "heartbeats stopped"
    );
    // The skew is reported, with its size.
    let log = strip_ansi(&a.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("clock differs from the bastion"))
        .unwrap_or_else(|| panic!("skew not reported:\n{log}"));
    let skew: i64 = line
        .split("skew_secs=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no skew_secs in {line}"));
    assert!((115..=125).contains(&skew), "skew {skew} in {line}");
}

#[test]
fn sigkill_under_smtp_load_ten_times_loses_and_duplicates_nothing() {
    let sink_port = free_port();
    let (mut b, port) = mail_bastion(sink_port, "");
    let sink_dir = b.dir.path().join("sink");
    let _sink = Sink::start(sink_port, &sink_dir);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..3)
        .map(|t| {
            let (stop, acked, sent) = (stop.clone(), acked.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let subject = format!("kill-{t}-{i:04}");
                    i += 1;
                    sent.fetch_add(1, Ordering::SeqCst);
                    let o = swaks(port, &["--header", &format!("Subject: {subject}")]);
                    if o.status.success() {
                        acked.lock().unwrap().push(subject);
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        })
        .collect();
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(300 + rnd(1200)));
        b.kill();
        // The spool opens cleanly after every kill.
        let spool = b.state_dir().join("mail");
        let dead = std::fs::read_dir(spool.join("dead"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(dead, 0, "round {round}: a spool file was judged corrupt");
        b.start();
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20, "too little load: {} acked", acked.len());
    let ok = wait_for(Duration::from_secs(60), || {
        let got = subjects(&sink_dir);
        (acked.iter().all(|s| got.contains_key(s)) && queue_len(&b) == 0).then_some(())
    });
    let got = subjects(&sink_dir);
    let missing: Vec<_> = acked.iter().filter(|s| !got.contains_key(*s)).collect();
    assert!(
        ok.is_some(),
        "acknowledged mail missing at the sink: {missing:?}"
    );
    // Never spooled twice: every copy of a message carries the same queue id. A copy
    // stored twice can only be a redelivery: the bastion killed after the smarthost took
    // the message but before its 250 was read and the spool file removed (SMTP's
    // at-least-once window, RFC 5321 section 6.1; Postfix has the same). At most one per
    // delivery in flight at each kill (concurrency 4).
    let ids = queue_ids(&sink_dir);
    for (subject, set) in &ids {
        assert_eq!(
            set.len(),
            1,
            "{subject} was spooled more than once: {set:?}"
        );
    }
    let dups: Vec<_> = got.iter().filter(|(_, &n)| n > 1).collect();
    let extra: usize = dups.iter().map(|(_, &n)| n - 1).sum();
    assert!(
        extra <= 10 * 4,
        "{extra} redeliveries for 10 kills: {dups:?}"
    );
    let log = b.log_text();
    assert!(!log.contains("corrupt spool file"), "{log}");
    eprintln!(
        "kill test: {} sent, {} acknowledged, {} distinct stored at the sink, {extra} redelivered after a kill: {dups:?}",
        sent.load(Ordering::SeqCst),
        acked.len(),
        got.len()
    );
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
