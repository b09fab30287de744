//! Fault injection against the real processes: the spool's filesystem filling up (a tmpfs
//! mounted by the test), the smarthost and the DNS upstream disappearing and coming back, an
//! agent whose clock is two minutes off (libfaketime), and SIGKILL of the bastion at random
//! points under SMTP load, ten times in a row.
//!
//! Peers: `swaks` (client), Postfix's `smtp-sink` (smarthost), `unbound` (DNS upstream),
//! `dig`, `faketime`. Mounting needs root (CAP_SYS_ADMIN); without it the test fails and says
//! so.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bastide_tests::{
    free_port, log_store_lines, logger_to, numbers_problem, require, sink_files, sink_queue_ids,
    sink_subjects, swaks, transcript, wait_for, write_numbered, Agent, Bastion, Mount, Sink,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn queue(b: &Bastion) -> Value {
    serde_json::from_str(&b.cli_ok(&["mail", "queue", "--json"])).unwrap()
}

fn queue_len(b: &Bastion) -> usize {
    b.mail_queue_len()
}

/// A bastion relaying to 127.0.0.1:`sink_port` with fast retries; its SMTP port.
fn mail_bastion(sink_port: u16, smtp_extra: &str) -> (Bastion, u16) {
    let mut b = Bastion::init("faults");
    let port = b.enable_smtp_relay(sink_port, smtp_extra);
    b.start();
    (b, port)
}

/// The body of the stored message whose Subject is `subject` (LF line ends, as smtp-sink
/// stores lines).
fn body_of(dir: &Path, subject: &str) -> Option<String> {
    for f in sink_files(dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).to_string();
        let Some(at) = text.find(&format!("\nSubject: {subject}\n")) else {
            continue;
        };
        return text[at..].split_once("\n\n").map(|(_, b)| b.to_string());
    }
    None
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
        (sink_subjects(&sink_dir).len() >= n && queue_len(&b) == 0).then_some(())
    });
    assert!(
        got.is_some(),
        "delivered {:?} of {n}",
        sink_subjects(&sink_dir)
    );
    for (subject, data) in &accepted {
        let stored = body_of(&sink_dir, subject).expect("delivered");
        assert_eq!(sha(&stored), sha(data), "{subject} corrupted");
    }
    let counts = sink_subjects(&sink_dir);
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
    assert!(wait_for(Duration::from_secs(10), || sink_subjects(&dir)
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
        (sink_subjects(&dir).len() == 6 && queue_len(&b) == 0).then_some(())
    });
    assert!(
        ok.is_some(),
        "after the smarthost came back: {:?}",
        sink_subjects(&dir)
    );
    assert!(sink_subjects(&dir).values().all(|&c| c == 1));
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
        let got = sink_subjects(&sink_dir);
        (acked.iter().all(|s| got.contains_key(s)) && queue_len(&b) == 0).then_some(())
    });
    let got = sink_subjects(&sink_dir);
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
    let ids = sink_queue_ids(&sink_dir);
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

/// Every line in the log store, whatever host it was filed under.
fn all_store_lines(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|h| !h.starts_with('.'))
                .flat_map(|h| log_store_lines(store, &h))
                .collect()
        })
        .unwrap_or_default()
}

/// Fills the rest of the filesystem at `dir` to the last byte; the filler's path.
fn fill_to_the_brim(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let p = dir.join("brim");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![9u8; 4096];
    while f.write_all(&block).is_ok() {}
    while f.write_all(&[9u8]).is_ok() {}
    p
}

#[test]
fn log_store_disk_full_refuses_batches_agents_keep_them_and_all_arrive_once_space_returns() {
    let t0 = Instant::now();
    let mnt = Mount::tmpfs("8m");
    let mut b = Bastion::init("full");
    let store = b.enable_log_store(Some(&mnt.path().join("logstore")), "");
    let (udp, tcp) = (free_port(), free_port());
    b.edit_config(|c| {
        format!("{c}\n[syslog]\nudp = [\"127.0.0.1:{udp}\"]\ntcp = [\"127.0.0.1:{tcp}\"]\nallow = [\"127.0.0.0/8\"]\n")
    });
    b.start();
    let mut a = Agent::new("full1");
    a.enroll_ok(&b, &b.token(&[]));
    let logs = a.follow_logs("");
    a.start();
    assert!(b.wait_state("full1", "online", Duration::from_secs(20)));
    let app = logs.join("app.log");

    // Before: stored exactly once.
    write_numbered(&app, 0, 2_000, 500, Duration::from_millis(20), |_| {});
    let ok = wait_for(Duration::from_secs(30), || {
        numbers_problem(&store, "full1", 2_000, false)
            .is_none()
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "{:?}",
        numbers_problem(&store, "full1", 2_000, false)
    );

    eprintln!("stage: 2000 stored at {:?}", t0.elapsed());
    // The filesystem fills up to the last byte.
    let filler = mnt.fill_leaving(64 * 1024);
    let brim = fill_to_the_brim(mnt.path());
    let total = 12_000;
    write_numbered(&app, 2_000, total, 1_000, Duration::from_millis(20), |_| {});
    let refused = wait_for(Duration::from_secs(20), || {
        (b.log_text().contains("log store: filesystem full")
            && strip_ansi(&a.log_text()).contains("its log store is full"))
        .then_some(())
    });
    assert!(
        refused.is_some(),
        "no refusal:\nbastion:\n{}\nagent:\n{}",
        b.log_text(),
        a.log_text()
    );
    eprintln!("stage: refused at {:?}", t0.elapsed());
    // The gRPC status says what happened.
    let alog = strip_ansi(&a.log_text());
    assert!(alog.contains("ResourceExhausted"), "{alog}");
    assert!(alog.contains("filesystem is full"), "{alog}");
    assert_eq!(b.metric("bastide_logs_store_full"), Some(1.0));
    assert!(
        b.metric("bastide_logs_refused_batches_total")
            .unwrap_or(0.0)
            >= 1.0
    );

    eprintln!("stage: syslog at {:?}", t0.elapsed());
    // Syslog while full: dropped, counted, logged, no crash.
    // (6 KB each: a short line could still fit in the slack of the file's last block.)
    let pad = "y".repeat(6_000);
    for i in 0..10 {
        for (port, tcp, kind) in [(udp, false, "udp"), (tcp, true, "tcp")] {
            let o = logger_to(port, tcp, &format!("syslog-while-full {kind} {i} {pad}"));
            assert!(o.status.success(), "{}", transcript(&o));
        }
    }
    let dropped = wait_for(Duration::from_secs(10), || {
        let u = b.metric("bastide_logs_dropped_events_total{source=\"udp\"}")?;
        let t = b.metric("bastide_logs_dropped_events_total{source=\"tcp\"}")?;
        (u >= 10.0 && t >= 10.0).then_some((u, t))
    });
    assert!(
        dropped.is_some(),
        "syslog drops not counted: udp {:?} tcp {:?}; stored: {:?}; free {}\n{}",
        b.metric("bastide_logs_dropped_events_total{source=\"udp\"}"),
        b.metric("bastide_logs_dropped_events_total{source=\"tcp\"}"),
        all_store_lines(&store)
            .iter()
            .filter(|l| l.contains("syslog-while-full"))
            .collect::<Vec<_>>(),
        mnt.free(),
        b.log_text()
    );
    assert!(
        b.log_text().contains("syslog lines dropped"),
        "drops not logged:\n{}",
        b.log_text()
    );

    // A few seconds of being full: the agent backs off (no busy loop), keeps everything in
    // its buffer, and nothing stored is damaged.
    std::thread::sleep(Duration::from_secs(4));
    let refusals = strip_ansi(&a.log_text())
        .matches("its log store is full")
        .count();
    assert!(
        (2..=8).contains(&refusals),
        "{refusals} refusals in about 6 s: not backing off?\n{}",
        a.log_text()
    );
    assert!(
        a.buffer_bytes() > (total - 2_000) * 90,
        "the agent dropped its buffer: {} bytes",
        a.buffer_bytes()
    );
    assert_eq!(
        numbers_problem(&store, "full1", 2_000, false),
        None,
        "the store changed while full"
    );
    assert!(
        all_store_lines(&store)
            .iter()
            .all(|l| !l.contains("syslog-while-full")),
        "a syslog line counted as dropped was stored"
    );
    assert!(b.pid().is_some());
    assert_eq!(b.metric("bastide_logs_store_failed"), Some(0.0));

    // Space returns: everything buffered arrives exactly once, nothing restarted.
    let agent_pid = a.pid();
    std::fs::remove_file(&brim).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let back = Instant::now();
    let ok = wait_for(Duration::from_secs(60), || {
        numbers_problem(&store, "full1", total, false)
            .is_none()
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "{:?}\nbastion:\n{}\nagent:\n{}",
        numbers_problem(&store, "full1", total, false),
        b.log_text(),
        a.log_text()
    );
    let caught_up = back.elapsed();
    assert_eq!(a.pid(), agent_pid);
    assert!(b.log_text().contains("space is available again"));
    assert_eq!(b.metric("bastide_logs_store_full"), Some(0.0));
    assert!(logger_to(udp, false, "syslog-after-space").status.success());
    assert!(wait_for(Duration::from_secs(10), || all_store_lines(&store)
        .iter()
        .any(|l| l.contains("syslog-after-space"))
        .then_some(()))
    .is_some());

    // The store opens cleanly and still holds every line once.
    assert!(b.stop().is_some_and(|s| s.success()), "{}", b.log_text());
    let before = b.log_text().len();
    b.start();
    let log = b.log_text()[before..].to_string();
    assert!(log.contains("log store recovered"), "{log}");
    assert!(!log.contains("torn end of the journal"), "{log}");
    assert!(!log.contains("shorter than its committed length"), "{log}");
    assert_eq!(numbers_problem(&store, "full1", total, false), None);
    eprintln!(
        "log store disk-full test: {:?} in all, caught up {caught_up:?} after space returned, {refusals} refusals logged by the agent",
        t0.elapsed()
    );
}
