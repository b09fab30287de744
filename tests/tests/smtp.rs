//! SMTP relay: the real `bastide` with `swaks` as the client and Postfix's `smtp-sink` as
//! the smarthost, over loopback on free ports.
//!
//! smtp-sink stores each message with LF line ends (it reads lines), so contents are
//! compared after the same CRLF → LF step on the expected side.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bastide_tests::{free_port, require, wait_for, Agent, Bastion};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A Postfix smtp-sink dumping every message to its own file.
struct Sink {
    child: Child,
    dir: tempfile::TempDir,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Sink {
    fn start(port: u16, extra: &[&str]) -> Sink {
        let prog = require("smtp-sink", "postfix");
        let dir = tempfile::Builder::new()
            .prefix("smtp-sink-")
            .tempdir()
            .unwrap();
        let mut c = Command::new(prog);
        if is_root() {
            c.args(["-u", "root"]);
        }
        c.arg("-d")
            .arg(format!("{}/%Y%m%d%H%M%S.", dir.path().display()))
            .args(extra)
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.spawn().unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .ok())
            .is_some(),
            "smtp-sink did not start"
        );
        Sink { child, dir }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        v
    }

    /// Waits until `n` messages were dumped (and a moment more, for files still open).
    fn wait(&self, n: usize, timeout: Duration) -> Vec<Dumped> {
        let ok = wait_for(timeout, || (self.files().len() >= n).then_some(()));
        std::thread::sleep(Duration::from_millis(300));
        let got: Vec<Dumped> = self.files().iter().map(|p| Dumped::read(p)).collect();
        assert!(
            ok.is_some(),
            "expected {n} messages at the sink, got {}",
            got.len()
        );
        got
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as smtp-sink stored it.
#[derive(Debug)]
struct Dumped {
    mail_from: String,
    rcpts: Vec<String>,
    /// The message as relayed by bastide (LF line ends), sink headers removed.
    content: String,
}

impl Dumped {
    fn read(p: &Path) -> Dumped {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).to_string();
        let lines: Vec<&str> = text.split('\n').collect();
        let mut mail_from = String::new();
        let mut rcpts = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i];
            if let Some(v) = l.strip_prefix("X-Mail-Args: ") {
                mail_from = v.to_string();
            } else if let Some(v) = l.strip_prefix("X-Rcpt-Args: ") {
                rcpts.push(v.to_string());
            } else if l.starts_with("Received: ") {
                i += 3;
                break;
            }
            i += 1;
        }
        let mut content = lines[i..].join("\n");
        // The dump ends with an empty line of its own.
        if content.ends_with("\n\n") {
            content.pop();
        }
        Dumped {
            mail_from,
            rcpts,
            content,
        }
    }

    /// The content without bastide's Received: header (first field, folded lines).
    fn without_received(&self) -> String {
        let mut lines = self.content.split_inclusive('\n').peekable();
        let first = lines.next().unwrap_or_default();
        assert!(first.starts_with("Received: from "), "{}", self.content);
        while lines.peek().is_some_and(|l| l.starts_with('\t')) {
            lines.next();
        }
        lines.collect()
    }
}

fn lf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

struct Relay {
    b: Bastion,
    port: u16,
    sink_port: u16,
}

/// A started bastion with `[smtp]` relaying to 127.0.0.1:`sink_port` (plaintext unless
/// `tls` says otherwise) and fast retries.
fn relay(tls: &str, smtp_extra: &str, relay_extra: &str) -> Relay {
    let sink_port = free_port();
    relay_to(sink_port, tls, smtp_extra, relay_extra)
}

fn relay_to(sink_port: u16, tls: &str, smtp_extra: &str, relay_extra: &str) -> Relay {
    let mut b = Bastion::init("mailp");
    let port = free_port();
    let smtp_extra = if smtp_extra.lines().any(|l| l.starts_with("allow =")) {
        smtp_extra.to_string()
    } else {
        format!("allow = [\"127.0.0.1/32\"]\n{smtp_extra}")
    };
    b.edit_config(|c| {
        format!(
            "{c}\n[smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"bastion.mailp.test\"\n{smtp_extra}\n\n[smtp.relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"{tls}\"\ntimeout = \"5s\"\ndestination_concurrency_limit = 4\n{relay_extra}\n"
        )
    });
    b.start();
    Relay { b, port, sink_port }
}

const FAST: &str = "retry_initial = \"300ms\"\nretry_max = \"2s\"";

fn swaks(port: u16, args: &[&str]) -> Output {
    let prog = require("swaks", "swaks");
    Command::new(prog)
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--helo",
            "web01",
            "--timeout",
            "10",
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

/// Sends a message whose DATA is `wire` exactly (swaks adds only the final CRLF).
fn send_raw(r: &Relay, from: &str, to: &str, wire: &str) -> Output {
    let f = r.b.dir.path().join(format!("data-{}", rand_suffix()));
    std::fs::write(&f, wire.strip_suffix("\r\n").unwrap_or(wire)).unwrap();
    swaks(
        r.port,
        &[
            "--from",
            from,
            "--to",
            to,
            "--no-data-fixup",
            "--data",
            &format!("@{}", f.display()),
        ],
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn queue(b: &Bastion) -> Value {
    serde_json::from_str(&b.cli_ok(&["mail", "queue", "--json"])).unwrap()
}

fn metric(b: &Bastion, name: &str) -> u64 {
    queue(b)["metrics"][name].as_u64().unwrap()
}

fn spool_files(b: &Bastion, sub: &str) -> Vec<String> {
    std::fs::read_dir(b.state_dir().join("mail").join(sub))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "swaks failed:\n{}", transcript(o));
}

#[test]
fn relayed_byte_for_byte_with_masquerading() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let r = relay_to(
        sink_port,
        "none",
        "sender_address = \"vm-mail@example.org\"\nadmin_address = \"admins@example.org\"",
        FAST,
    );
    let original = "From: root@web01 (Cron Daemon)\r\n\
        To: root\r\n\
        Subject: Cron <root@web01> /usr/local/bin/backup\r\n\
        X-Folded: one\r\n\
        \ttwo\r\n\
        Content-Type: text/plain; charset=UTF-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n\
        \r\n\
        backup done: 3 files, d\u{e9}j\u{e0} vu \u{2713}\r\n\
        \ttabbed line with trailing spaces   \r\n\
        \r\n\
        \r\n\
        last line\r\n";
    let wire = format!("{original}.\r\n");
    assert_ok(&send_raw(&r, "root@web01", "root", &wire));
    let got = sink.wait(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    let m = &got[0];
    // 8-bit content goes with BODY=8BITMIME.
    assert_eq!(m.mail_from, "<vm-mail@example.org> BODY=8BITMIME");
    assert_eq!(m.rcpts, vec!["<admins@example.org>"]);
    // Only the Received: header and the masqueraded From: differ.
    let expected = lf(&original.replacen(
        "From: root@web01 (Cron Daemon)",
        "From: \"Cron Daemon\" <vm-mail@example.org>",
        1,
    ));
    assert_eq!(m.without_received(), expected);
    assert!(m.content.starts_with(
        "Received: from web01 ([127.0.0.1])\n\tby bastion.mailp.test (Bastide) with ESMTP id "
    ));
    assert!(m.content.contains("for <admins@example.org>;"));

    // A sender outside the project is left alone, and so is its From:.
    let plain = "From: Ops <ops@example.com>\r\nSubject: as is\r\n\r\nbody\r\n";
    assert_ok(&send_raw(
        &r,
        "ops@example.com",
        "someone@example.net",
        &format!("{plain}.\r\n"),
    ));
    let got = sink.wait(2, Duration::from_secs(10));
    let m = got.iter().find(|m| m.content.contains("as is")).unwrap();
    assert_eq!(m.mail_from, "<ops@example.com>");
    assert_eq!(m.rcpts, vec!["<someone@example.net>"]);
    assert_eq!(m.without_received(), lf(plain));

    wait_for(Duration::from_secs(5), || {
        (metric(&r.b, "bastide_smtp_relayed_total") == 2).then_some(())
    })
    .expect("relayed counter");
    let q = queue(&r.b);
    assert_eq!(q["messages"].as_array().unwrap().len(), 0);
    assert_eq!(q["metrics"]["bastide_smtp_accepted_total"], 2);
    assert!(spool_files(&r.b, "queue").is_empty());
}

#[test]
fn dot_stuffed_body_keeps_its_sha256() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let r = relay_to(sink_port, "none", "", FAST);
    let body = ".\r\n..\r\n.leading dot\r\n..two dots\r\n .space dot\r\nend.\r\n.\r\n.\r\nx\r\n";
    let headers = "Subject: dots\r\n\r\n";
    // Dot-stuffing as a client must do it (RFC 5321 4.5.2).
    let stuffed: String = body
        .split_inclusive("\r\n")
        .map(|l| {
            if l.starts_with('.') {
                format!(".{l}")
            } else {
                l.to_string()
            }
        })
        .collect();
    let wire = format!("{headers}{stuffed}.\r\n");
    assert_ok(&send_raw(&r, "a@example.com", "b@example.com", &wire));
    let got = sink.wait(1, Duration::from_secs(10));
    let content = got[0].without_received();
    let received_body = content.split_once("\n\n").unwrap().1;
    let want = hex(&Sha256::digest(lf(body).as_bytes()));
    let have = hex(&Sha256::digest(received_body.as_bytes()));
    assert_eq!(have, want, "body differs:\n{received_body:?}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn pipelined_multi_recipient_message() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let r = relay_to(sink_port, "none", "", FAST);
    let out = swaks(
        r.port,
        &[
            "--pipeline",
            "--from",
            "ops@example.com",
            "--to",
            "a@example.org,b@example.net,c@example.com,a@example.org",
            "--header",
            "Subject: pipelined",
        ],
    );
    assert_ok(&out);
    let t = transcript(&out);
    // swaks sends MAIL, every RCPT and DATA before reading a reply.
    let mail = t.find(" -> MAIL FROM").unwrap();
    let first_reply = t[mail..].find("<-  250 2.1.0").unwrap() + mail;
    assert!(
        t[mail..first_reply].contains(" -> DATA"),
        "not pipelined:\n{t}"
    );
    let got = sink.wait(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].rcpts,
        vec!["<a@example.org>", "<b@example.net>", "<c@example.com>"]
    );
    assert!(got[0].content.contains("Subject: pipelined"));
}

#[test]
fn upstream_down_then_up_delivers_on_retry() {
    let r = relay("none", "", FAST);
    assert_ok(&swaks(
        r.port,
        &[
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
            "--header",
            "Subject: patience",
        ],
    ));
    let q = wait_for(Duration::from_secs(10), || {
        let q = queue(&r.b);
        let m = q["messages"][0].clone();
        (m["attempts"].as_u64().unwrap_or(0) >= 1 && m["last_error"].is_string()).then_some(m)
    })
    .expect("a failed attempt");
    assert!(
        q["last_error"].as_str().unwrap().contains("127.0.0.1"),
        "{q}"
    );
    assert_eq!(
        spool_files(&r.b, "queue").len(),
        2,
        "message and its state file"
    );
    let sink = Sink::start(r.sink_port, &[]);
    let got = sink.wait(1, Duration::from_secs(10));
    assert!(got[0].content.contains("Subject: patience"));
    wait_for(Duration::from_secs(5), || {
        queue(&r.b)["messages"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .expect("queue empty after delivery");
    assert!(spool_files(&r.b, "queue").is_empty());
    assert!(metric(&r.b, "bastide_smtp_deferred_total") >= 1);
}

#[test]
fn upstream_5xx_bounces_and_dead_letters() {
    let sink_port = free_port();
    // Every RCPT gets "500 5.3.0": the message and its bounce both fail for good.
    let _sink = Sink::start(sink_port, &["-f", "RCPT"]);
    let r = relay_to(
        sink_port,
        "none",
        "postmaster = \"postmaster@example.org\"",
        FAST,
    );
    assert_ok(&swaks(
        r.port,
        &[
            "--from",
            "sender@example.com",
            "--to",
            "x@example.net",
            "--header",
            "Subject: doomed",
        ],
    ));
    wait_for(Duration::from_secs(15), || {
        (spool_files(&r.b, "dead")
            .iter()
            .filter(|f| f.ends_with(".msg"))
            .count()
            == 2)
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "expected the message and its bounce in dead/: {:?}\n{}",
            spool_files(&r.b, "dead"),
            r.b.log_text()
        )
    });
    let dead = r.b.state_dir().join("mail/dead");
    let mut bounce = None;
    let mut original = None;
    for f in spool_files(&r.b, "dead")
        .iter()
        .filter(|f| f.ends_with(".msg"))
    {
        let text = std::fs::read_to_string(dead.join(f)).unwrap();
        if text.contains("\nSender: \n") {
            bounce = Some(text);
        } else {
            original = Some((f.clone(), text));
        }
    }
    let bounce = bounce.expect("a bounce with the null sender");
    assert!(
        bounce.contains("Recipient: sender@example.com\n"),
        "{bounce}"
    );
    assert!(
        bounce.contains("Recipient: postmaster@example.org\n"),
        "{bounce}"
    );
    assert!(bounce.contains("Content-Type: message/delivery-status"));
    assert!(bounce.contains("Final-Recipient: rfc822; x@example.net"));
    assert!(bounce.contains("Action: failed"));
    assert!(
        bounce.contains("Subject: doomed"),
        "original headers attached"
    );
    let (name, original) = original.expect("the original in dead/");
    assert!(original.contains("Subject: doomed"));
    let state = std::fs::read_to_string(dead.join(name.replace(".msg", ".state"))).unwrap();
    assert!(state.contains("500"), "{state}");
    assert_eq!(
        metric(&r.b, "bastide_smtp_bounced_total"),
        1,
        "no bounce of a bounce"
    );

    // The null sender never gets a bounce.
    assert_ok(&swaks(r.port, &["--from", "<>", "--to", "y@example.net"]));
    wait_for(Duration::from_secs(15), || {
        (spool_files(&r.b, "dead")
            .iter()
            .filter(|f| f.ends_with(".msg"))
            .count()
            == 3)
            .then_some(())
    })
    .expect("null-sender message dead-lettered");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(metric(&r.b, "bastide_smtp_bounced_total"), 1);
    assert!(queue(&r.b)["messages"].as_array().unwrap().is_empty());
}

#[test]
fn kill_9_after_250_loses_nothing_and_duplicates_nothing() {
    // Upstream down while mail arrives, so every acknowledged message sits in the spool
    // when the bastion is killed.
    let mut r = relay("none", "", FAST);
    let port = r.port;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..50 {
                    let n = t * 50 + i;
                    let o = swaks(
                        port,
                        &[
                            "--from",
                            "load@example.com",
                            "--to",
                            "sink@example.org",
                            "--header",
                            &format!("Subject: load {n:03}"),
                        ],
                    );
                    assert!(o.status.success(), "message {n}: {}", transcript(&o));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    r.b.kill();
    let msgs = spool_files(&r.b, "queue")
        .iter()
        .filter(|f| f.ends_with(".msg"))
        .count();
    assert_eq!(msgs, 200, "every acknowledged message is in the spool");
    let sink = Sink::start(r.sink_port, &[]);
    r.b.start();
    let got = sink.wait(200, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let got_after = sink.files().len();
    assert_eq!(got_after, 200, "none twice");
    let mut subjects: Vec<String> = got
        .iter()
        .map(|m| {
            m.content
                .lines()
                .find(|l| l.starts_with("Subject: "))
                .unwrap()
                .to_string()
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 200);
    wait_for(Duration::from_secs(5), || {
        queue(&r.b)["messages"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .expect("queue empty");
}

#[test]
fn oversize_and_long_lines_are_refused_and_not_spooled() {
    let r = relay(
        "none",
        "max_message_size = 2000\nmax_line_length = 998",
        "retry_initial = \"1h\"",
    );
    let big = format!(
        "Subject: big\r\n\r\n{}\r\n.\r\n",
        "0123456789abcdef\r\n".repeat(300)
    );
    let o = send_raw(&r, "a@example.com", "b@example.com", &big);
    assert!(!o.status.success());
    assert!(transcript(&o).contains("552 5.3.4"), "{}", transcript(&o));
    let long = format!("Subject: long\r\n\r\n{}\r\n.\r\n", "x".repeat(999));
    let o = send_raw(&r, "a@example.com", "b@example.com", &long);
    assert!(!o.status.success());
    assert!(transcript(&o).contains("500 5.5.6"), "{}", transcript(&o));
    let fine = format!("Subject: fine\r\n\r\n{}\r\n.\r\n", "x".repeat(998));
    assert_ok(&send_raw(&r, "a@example.com", "b@example.com", &fine));
    let q = queue(&r.b);
    assert_eq!(q["messages"].as_array().unwrap().len(), 1, "{q}");
    assert!(spool_files(&r.b, "tmp").is_empty());
    assert_eq!(
        q["metrics"]["bastide_smtp_refused_total{reason=\"size\"}"],
        1
    );
    assert_eq!(
        q["metrics"]["bastide_smtp_refused_total{reason=\"line_length\"}"],
        1
    );
}

#[test]
fn clients_outside_allowed_networks_are_refused_agents_allowed() {
    let r = relay(
        "none",
        "allow = [\"127.0.0.1/32\"]",
        "retry_initial = \"1h\"",
    );
    let o = swaks(
        r.port,
        &[
            "--local-interface",
            "127.0.0.2",
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
        ],
    );
    assert!(!o.status.success());
    assert!(transcript(&o).contains("554 5.7.1"), "{}", transcript(&o));
    assert_eq!(
        metric(&r.b, "bastide_smtp_refused_total{reason=\"client\"}"),
        1
    );
    assert_ok(&swaks(
        r.port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    ));
    assert!(queue(&r.b)["messages"].as_array().unwrap().len() == 1);

    // Only enrolled agents: the agent's address is refused until the agent registers from it.
    let r = relay(
        "none",
        "allow = [\"192.0.2.0/24\"]\nallow_recipient_domains = [\"example.com\"]",
        "retry_initial = \"1h\"",
    );
    let mut a = Agent::new("web01");
    let o = swaks(
        r.port,
        &[
            "-li",
            &a.ip,
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
        ],
    );
    assert!(transcript(&o).contains("554 5.7.1"), "{}", transcript(&o));
    a.enroll_ok(&r.b, &r.b.token(&[]));
    a.start();
    assert!(r.b.wait_state("web01", "online", Duration::from_secs(20)));
    assert!(
        wait_for(Duration::from_secs(10), || r
            .b
            .agent("web01")
            .filter(|i| i["addresses"][0] == a.ip.as_str()))
        .is_some(),
        "{:?}",
        r.b.agent("web01")
    );
    assert_ok(&swaks(
        r.port,
        &[
            "-li",
            &a.ip,
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
        ],
    ));
    // The recipient-domain allow-list.
    let o = swaks(
        r.port,
        &[
            "-li",
            &a.ip,
            "--from",
            "a@example.com",
            "--to",
            "b@example.net",
        ],
    );
    assert!(transcript(&o).contains("550 5.7.1"), "{}", transcript(&o));
    assert_eq!(queue(&r.b)["messages"].as_array().unwrap().len(), 1);
}

#[test]
fn upstream_4xx_keeps_it_queued_with_growing_delays() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &["-r", "RCPT"]);
    let r = relay_to(
        sink_port,
        "none",
        "",
        "retry_initial = \"200ms\"\nretry_max = \"10s\"",
    );
    assert_ok(&swaks(
        r.port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    ));
    let m = wait_for(Duration::from_secs(15), || {
        let m = queue(&r.b)["messages"][0].clone();
        (m["attempts"].as_u64().unwrap_or(0) >= 4).then_some(m)
    })
    .expect("four attempts");
    assert!(m["last_error"].as_str().unwrap().contains("450"), "{m}");
    let delays: Vec<u64> = strip_ansi(&r.b.log_text())
        .lines()
        .filter(|l| l.contains("mail deferred"))
        .filter_map(|l| l.split("delay_ms").nth(1))
        .map(|s| {
            s.trim_start_matches(|c: char| !c.is_ascii_digit())
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(delays.len() >= 4, "{delays:?}");
    assert_eq!(&delays[..4], &[200, 400, 800, 1600]);
    let files: Vec<String> = sink
        .files()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    // smtp-sink creates its dump file at MAIL and removes it at the next RSET or QUIT: the
    // last refused transaction's file stays, empty, while its connection waits in the
    // pool. No content was received.
    assert!(files.iter().all(|f| f.is_empty()), "{files:?}");
}

#[test]
fn starttls_required_never_falls_back_to_plaintext() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let r = relay_to(sink_port, "required", "", FAST);
    assert_ok(&swaks(
        r.port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    ));
    let m = wait_for(Duration::from_secs(10), || {
        let m = queue(&r.b)["messages"][0].clone();
        (m["attempts"].as_u64().unwrap_or(0) >= 2).then_some(m)
    })
    .expect("deferred twice");
    assert!(
        m["last_error"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("tls"),
        "{m}"
    );
    assert!(
        sink.files().is_empty(),
        "nothing may reach a plaintext upstream"
    );
}

/// The log without terminal colour sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (false, c) => out.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    out
}

fn read_reply(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    // Multi-line replies: read until a line whose 4th byte is a space.
    loop {
        let mut line = Vec::new();
        while s.read(&mut b).unwrap() == 1 {
            line.push(b[0]);
            if b[0] == b'\n' {
                break;
            }
        }
        if line.is_empty() {
            break;
        }
        out.extend_from_slice(&line);
        if line.get(3) != Some(&b'-') {
            break;
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn malformed_commands_and_disconnect_mid_data_leave_no_trace() {
    let r = relay("none", "", "retry_initial = \"1h\"");
    let mut s = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(read_reply(&mut s).starts_with("220 "));
    for (cmd, code) in [
        ("MAIL FROM:<a@example.com>\r\n", "503"),
        ("EHLO web01\r\n", "250"),
        ("FOO bar\r\n", "500"),
        ("MAIL FROM:a@example.com\r\n", "501"),
        ("RCPT TO:<b@example.com>\r\n", "503"),
        ("DATA\r\n", "503"),
        ("VRFY root\r\n", "502"),
        ("EXPN staff\r\n", "502"),
        ("MAIL FROM:<a@example.com> SIZE=999999999999\r\n", "552"),
        ("MAIL FROM:<a@example.com> FOO=BAR\r\n", "555"),
        ("MAIL FROM:<a@example.com>\r\n", "250"),
        ("RCPT TO:<b@@example.com>\r\n", "501"),
        ("DATA\r\n", "554"),
        ("RSET\r\n", "250"),
    ] {
        s.write_all(cmd.as_bytes()).unwrap();
        let reply = read_reply(&mut s);
        assert!(
            reply.starts_with(code),
            "{cmd:?} -> {reply:?}, wanted {code}"
        );
    }
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(5000));
    s.write_all(long.as_bytes()).unwrap();
    assert!(read_reply(&mut s).starts_with("500 5.5.2"));
    assert!(
        read_reply(&mut s).starts_with("250"),
        "the session goes on after a long line"
    );
    // A client that disconnects in the middle of DATA.
    s.write_all(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .unwrap();
    assert!(read_reply(&mut s).starts_with("250"));
    assert!(read_reply(&mut s).starts_with("250"));
    assert!(read_reply(&mut s).starts_with("354"));
    s.write_all(b"Subject: half\r\n\r\nsome of the body\r\n.")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    let q = queue(&r.b);
    assert!(q["messages"].as_array().unwrap().is_empty(), "{q}");
    assert_eq!(q["metrics"]["bastide_smtp_accepted_total"], 0);
    assert!(spool_files(&r.b, "queue").is_empty());
    assert!(spool_files(&r.b, "tmp").is_empty());
    assert!(r.b.log_text().contains("disconnected during DATA"));
}

#[test]
fn bare_lf_dot_lf_never_ends_data() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let r = relay_to(sink_port, "none", "", FAST);
    // An SMTP smuggling attempt: a second transaction hidden behind LF.LF and CR-less ends.
    let wire = "Subject: smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.net>\nDATA\nSubject: smuggled\n\nevil\r\n.\nmore\n.\r\nstill the first message\r\n.\r\n";
    let o = send_raw(&r, "a@example.com", "b@example.com", wire);
    assert_ok(&o);
    assert_eq!(transcript(&o).matches("queued as").count(), 1);
    let got = sink.wait(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.files().len(), 1, "exactly one message");
    assert_eq!(got[0].rcpts, vec!["<b@example.com>"]);
    assert!(got[0].content.contains("still the first message"));
    assert!(got[0].content.contains("RCPT TO:<victim@example.net>"));
}

/// Found by `fuzz/smtp_session`: smtp-proto's DATA receiver also ends a message on a line
/// "." followed by several CRs (CRLF "." CR CR LF), which Postfix and smarthosts read as
/// content: a smuggling shape. The bastion refuses it with 521 and closes the session, so the
/// "transaction" hidden behind it is never read as commands.
#[test]
fn malformed_ends_of_data_are_refused_and_the_session_closed() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let r = relay_to(sink_port, "none", "", FAST);
    let wire = "Subject: smuggle\r\n\r\nfirst\r\n.\r\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n";
    let o = send_raw(&r, "a@example.com", "b@example.com", wire);
    let t = transcript(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("521 5.5.2"), "{t}");
    assert!(!t.contains("queued as"), "{t}");
    std::thread::sleep(Duration::from_millis(800));
    assert!(sink.files().is_empty(), "nothing relayed");
    assert!(queue(&r.b)["messages"].as_array().unwrap().is_empty());
    assert_eq!(
        metric(&r.b, "bastide_smtp_refused_total{reason=\"syntax\"}"),
        1
    );
    // Also found by the fuzzer: a DATA command ended by a bare LF, then ".\r\n": that "."
    // follows no CRLF, so it is no end of data either.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", r.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(
            b"EHLO a\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\n.\r\n",
        )
        .unwrap();
        let mut got = String::new();
        let _ = c.read_to_string(&mut got);
        assert!(got.contains("354 "), "{got}");
        assert!(got.contains("521 5.5.2"), "{got}");
        assert!(!got.contains("queued as"), "{got}");
    }
    assert_eq!(
        metric(&r.b, "bastide_smtp_refused_total{reason=\"syntax\"}"),
        2
    );
    assert!(queue(&r.b)["messages"].as_array().unwrap().is_empty());
    // The relay goes on serving.
    assert_ok(&swaks(
        r.port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    ));
    assert_eq!(sink.wait(1, Duration::from_secs(10)).len(), 1);
}

#[test]
fn mail_cli_queue_retry_delete_flush() {
    let r = relay("none", "", "retry_initial = \"1h\"\nretry_max = \"2h\"");
    for s in ["one", "two"] {
        assert_ok(&swaks(
            r.port,
            &[
                "--from",
                "a@example.com",
                "--to",
                "b@example.com",
                "--header",
                &format!("Subject: {s}"),
            ],
        ));
    }
    let items = wait_for(Duration::from_secs(10), || {
        let q = queue(&r.b);
        let v = q["messages"].as_array().unwrap().clone();
        (v.len() == 2 && v.iter().all(|m| m["attempts"] == 1)).then_some(v)
    })
    .expect("two deferred messages");
    assert!(items[0]["next_attempt_in_secs"].as_i64().unwrap() > 3000);
    let human = r.b.cli_ok(&["mail", "queue"]);
    assert!(human.contains(items[0]["id"].as_str().unwrap()), "{human}");
    assert!(human.contains("2 message(s) queued"), "{human}");
    let sink = Sink::start(r.sink_port, &[]);
    let (id1, id2) = (
        items[0]["id"].as_str().unwrap(),
        items[1]["id"].as_str().unwrap(),
    );
    r.b.cli_ok(&["mail", "retry", id1]);
    let got = sink.wait(1, Duration::from_secs(10));
    assert!(got[0].content.contains("Subject: one"));
    r.b.cli_ok(&["mail", "delete", id2]);
    assert!(queue(&r.b)["messages"].as_array().unwrap().is_empty());
    assert!(!r.b.cli(&["mail", "delete", id2]).status.success());
    assert!(!r.b.cli(&["mail", "retry", "../../etc"]).status.success());
    // flush: a message deferred by a failure goes at once.
    drop(sink);
    assert_ok(&swaks(
        r.port,
        &[
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
            "--header",
            "Subject: three",
        ],
    ));
    wait_for(Duration::from_secs(10), || {
        (queue(&r.b)["messages"][0]["attempts"] == 1).then_some(())
    })
    .expect("deferred");
    let sink = Sink::start(r.sink_port, &[]);
    r.b.cli_ok(&["mail", "flush"]);
    let got = sink.wait(1, Duration::from_secs(10));
    assert!(got[0].content.contains("Subject: three"));
    assert!(sink.files().len() == 1, "the deleted message never left");
}

/// The aiosmtpd smarthost of `tests/peers/smarthost.py` (see there): a real SMTP server that
/// speaks STARTTLS, implicit TLS and AUTH, which Postfix's smtp-sink cannot, and records
/// what it saw (connections, AUTH and whether TLS was up, each message).
struct Smarthost {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Smarthost {
    /// `tls`: "none", "starttls" or "implicit", with the certificate of `b` (its server
    /// certificate, issued by its CA: the relay trusts it with `ca_file`).
    fn start(b: &Bastion, tls: &str, extra: &[&str]) -> Smarthost {
        Self::start_on(b, free_port(), tls, extra)
    }

    /// On a given port (a bastion can be configured with it before the smarthost runs).
    fn start_on(b: &Bastion, port: u16, tls: &str, extra: &[&str]) -> Smarthost {
        let python = require("/usr/bin/python3", "python3");
        let probe = Command::new(&python)
            .args(["-c", "import aiosmtpd"])
            .output()
            .unwrap();
        assert!(
            probe.status.success(),
            "aiosmtpd is missing: apt-get install python3-aiosmtpd"
        );
        let dir = tempfile::Builder::new()
            .prefix("smarthost-")
            .tempdir()
            .unwrap();
        let pki = b.state_dir().join("pki");
        let child = Command::new(python)
            .arg(bastide_tests::workspace().join("tests/peers/smarthost.py"))
            .args(["--port", &port.to_string(), "--tls", tls])
            .arg("--dir")
            .arg(dir.path())
            .arg("--cert")
            .arg(pki.join("server.crt"))
            .arg("--key")
            .arg(pki.join("server.key"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let h = Smarthost { child, dir, port };
        wait_for(Duration::from_secs(10), || {
            h.events()
                .iter()
                .any(|e| e["event"] == "listening")
                .then_some(())
        })
        .expect("smarthost did not start");
        h
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }

    /// (envelope JSON, content) of each message received, in order.
    fn messages(&self) -> Vec<(Value, String)> {
        (0..)
            .map_while(|n| {
                let j =
                    std::fs::read_to_string(self.dir.path().join(format!("msg-{n}.json"))).ok()?;
                let c = std::fs::read(self.dir.path().join(format!("msg-{n}.eml"))).ok()?;
                Some((
                    serde_json::from_str(&j).unwrap(),
                    String::from_utf8_lossy(&c).to_string(),
                ))
            })
            .collect()
    }

    fn wait(&self, n: usize) -> Vec<(Value, String)> {
        wait_for(Duration::from_secs(20), || {
            let m = self.messages();
            (m.len() >= n).then_some(m)
        })
        .unwrap_or_else(|| {
            panic!(
                "expected {n} messages at the smarthost: {:?}",
                self.events()
            )
        })
    }
}

impl Drop for Smarthost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bastion that is not started yet, to point at a smarthost that needs its certificate.
fn relay_config(b: &Bastion, port: u16, smtp_extra: &str, relay: &str) {
    let limit = if relay.contains("destination_concurrency_limit") {
        ""
    } else {
        "destination_concurrency_limit = 4\n"
    };
    b.edit_config(|c| {
        format!(
            "{c}\n[smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"bastion.mailp.test\"\nallow = [\"127.0.0.1/32\"]\n{smtp_extra}\n\n[smtp.relay]\nhost = \"127.0.0.1\"\ntimeout = \"5s\"\n{limit}{FAST}\n{relay}\n"
        )
    });
}

fn password_file(b: &Bastion, secret: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = b.dir.path().join("smarthost.pass");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn inbound_starttls_with_swaks_verifying_the_bastion_certificate() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let r = relay_to(sink_port, "none", "starttls = true", FAST);
    let ca = r.b.state_dir().join("pki/agent-ca.crt");
    let o = swaks(
        r.port,
        &[
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            &ca.display().to_string(),
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
            "--header",
            "Subject: over TLS",
        ],
    );
    assert_ok(&o);
    let t = transcript(&o);
    assert!(t.contains("-> STARTTLS"), "{t}");
    assert!(t.contains("<-  220 2.0.0 Ready to start TLS"), "{t}");
    assert!(t.contains("=== TLS started"), "{t}");
    // After the handshake the EHLO reply no longer offers STARTTLS.
    let after = &t[t.find("=== TLS started").unwrap()..];
    assert!(
        !after.contains("250-STARTTLS") && !after.contains("250 STARTTLS"),
        "{t}"
    );
    let got = sink.wait(1, Duration::from_secs(10));
    assert!(got[0].content.contains("Subject: over TLS"));
    assert!(
        got[0].content.contains("(Bastide) with ESMTPS id"),
        "{}",
        got[0].content
    );
    // A certificate from another CA is refused by a verifying client: swaks's check is real.
    let other = Bastion::init("other");
    let o = swaks(
        r.port,
        &[
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            &other
                .state_dir()
                .join("pki/agent-ca.crt")
                .display()
                .to_string(),
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
        ],
    );
    assert!(!o.status.success(), "{}", transcript(&o));
}

#[test]
fn smarthost_starttls_with_auth_ca_file_and_connection_reuse() {
    let mut b = Bastion::init("mailp");
    let port = free_port();
    let pw = password_file(&b, "s3cret pass", 0o644);
    let ca = b.state_dir().join("pki/agent-ca.crt");
    let host = Smarthost::start(&b, "starttls", &["--auth", "bastion:s3cret pass"]);
    relay_config(
        &b,
        port,
        "",
        &format!(
            "port = {}\ntls = \"required\"\nca_file = \"{}\"\nusername = \"bastion\"\npassword_file = \"{}\"",
            host.port,
            ca.display(),
            pw.display()
        ),
    );
    // A password file readable by others is refused before anything starts.
    let o = b.cli(&["check-config"]);
    assert!(!o.status.success());
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(err.contains("smtp.relay.password_file"), "{err}");
    password_file(&b, "s3cret pass", 0o600);
    b.start();
    let r = Relay {
        b,
        port,
        sink_port: host.port,
    };
    for i in 0..5 {
        assert_ok(&swaks(
            r.port,
            &[
                "--from",
                "a@example.com",
                "--to",
                "b@example.com",
                "--header",
                &format!("Subject: tls {i}"),
            ],
        ));
    }
    let got = host.wait(5);
    for (env, content) in &got {
        assert_eq!(env["tls"], true, "{env}");
        assert_eq!(env["auth"], "bastion", "{env}");
        assert!(content.contains("Subject: tls "));
    }
    let ev = host.events();
    assert!(
        ev.iter()
            .filter(|e| e["event"] == "auth-command")
            .all(|e| e["tls"] == true),
        "AUTH only after TLS: {ev:?}"
    );
    assert!(ev.iter().any(|e| e["event"] == "auth" && e["ok"] == true));
    // Pooled connections: five messages, fewer connections than messages.
    let conns = host.count("connect");
    assert!(conns < 5, "{conns} connections for 5 messages: {ev:?}");
}

#[test]
fn smarthost_implicit_tls_with_auth() {
    let mut b = Bastion::init("mailp");
    let port = free_port();
    let pw = password_file(&b, "hunter2", 0o600);
    let ca = b.state_dir().join("pki/agent-ca.crt");
    let host = Smarthost::start(&b, "implicit", &["--auth", "bastion:hunter2"]);
    relay_config(
        &b,
        port,
        "",
        &format!(
            "port = {}\ntls = \"implicit\"\nca_file = \"{}\"\nusername = \"bastion\"\npassword_file = \"{}\"",
            host.port,
            ca.display(),
            pw.display()
        ),
    );
    b.start();
    assert_ok(&swaks(
        port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    ));
    let got = host.wait(1);
    assert_eq!(got[0].0["tls"], true);
    assert_eq!(got[0].0["auth"], "bastion");
    assert_eq!(got[0].0["rcpt_tos"], serde_json::json!(["b@example.com"]));
}

/// Relays one message with `tls = "required"` through a smarthost offering `smarthost_tls`
/// and AUTH; waits until it is deferred twice with an error naming `error_word`.
fn deferred_with_tls_required(smarthost_tls: &str, error_word: &str) -> (Bastion, Smarthost) {
    let mut b = Bastion::init("mailp");
    let port = free_port();
    let pw = password_file(&b, "hunter2", 0o600);
    let host = Smarthost::start(&b, smarthost_tls, &["--auth", "bastion:hunter2"]);
    relay_config(
        &b,
        port,
        "",
        &format!(
            "port = {}\ntls = \"required\"\nusername = \"bastion\"\npassword_file = \"{}\"",
            host.port,
            pw.display()
        ),
    );
    b.start();
    assert_ok(&swaks(
        port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    ));
    let m = wait_for(Duration::from_secs(15), || {
        let m = queue(&b)["messages"][0].clone();
        (m["attempts"].as_u64().unwrap_or(0) >= 2).then_some(m)
    })
    .expect("deferred twice");
    assert!(
        m["last_error"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains(error_word),
        "{m}"
    );
    (b, host)
}

#[test]
fn tls_required_never_plaintext_never_auth_never_an_untrusted_certificate() {
    // A smarthost offering AUTH but no STARTTLS: with tls = "required" nothing is sent,
    // not even AUTH.
    let (b, host) = deferred_with_tls_required("none", "tls");
    assert!(host.count("connect") >= 2);
    assert_eq!(host.count("auth-command"), 0, "{:?}", host.events());
    assert_eq!(host.count("mail"), 0, "{:?}", host.events());
    drop(b);

    // A smarthost with STARTTLS whose certificate is not trusted (no ca_file: the system
    // roots do not know the bastion's test CA): deferred, nothing sent.
    let (_b, host) = deferred_with_tls_required("starttls", "certificate");
    assert_eq!(host.count("auth-command"), 0, "{:?}", host.events());
    assert_eq!(host.count("mail"), 0, "{:?}", host.events());
}

fn expect_reply(s: &mut TcpStream, cmd: &str, code: &str) -> String {
    if !cmd.is_empty() {
        s.write_all(cmd.as_bytes()).unwrap();
    }
    let reply = read_reply(s);
    assert!(
        reply.starts_with(code),
        "{cmd:?} -> {reply:?}, wanted {code}"
    );
    reply
}

#[test]
fn timeouts_and_limits() {
    let r = relay(
        "none",
        "command_timeout = \"2s\"\ndata_timeout = \"3s\"\nmax_connections_per_client = 2\nmax_recipients = 3",
        "retry_initial = \"1h\"",
    );
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };

    // Connections per client: the third at once is refused, a slot frees on close.
    let mut c1 = connect();
    expect_reply(&mut c1, "", "220 ");
    let mut c2 = connect();
    expect_reply(&mut c2, "", "220 ");
    let mut c3 = connect();
    expect_reply(&mut c3, "", "421 4.7.0");
    drop(c2);
    let mut c4 = wait_for(Duration::from_secs(2), || {
        let mut s = connect();
        read_reply(&mut s).starts_with("220 ").then_some(s)
    })
    .expect("a slot frees when a session ends");
    drop(c1);

    // Recipients per message: the fourth gets 452 4.5.3; the message goes to three.
    expect_reply(&mut c4, "EHLO web01\r\n", "250");
    expect_reply(&mut c4, "MAIL FROM:<a@example.com>\r\n", "250");
    for n in 1..=3 {
        expect_reply(&mut c4, &format!("RCPT TO:<r{n}@example.com>\r\n"), "250");
    }
    expect_reply(&mut c4, "RCPT TO:<r4@example.com>\r\n", "452 4.5.3");
    expect_reply(&mut c4, "DATA\r\n", "354");
    expect_reply(&mut c4, "Subject: three\r\n\r\nhi\r\n.\r\n", "250 2.0.0");
    expect_reply(&mut c4, "QUIT\r\n", "221");
    let q = queue(&r.b);
    assert_eq!(
        q["messages"][0]["recipients"],
        serde_json::json!(["r1@example.com", "r2@example.com", "r3@example.com"])
    );

    // Command timeout: a silent client is told 421 4.4.2 and cut after command_timeout.
    let mut s = connect();
    expect_reply(&mut s, "", "220 ");
    let t = std::time::Instant::now();
    expect_reply(&mut s, "", "421 4.4.2");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "closed after the timeout");

    // DATA timeout: the whole message must arrive within data_timeout, however steadily
    // the client trickles it (each line comes well within command_timeout).
    let mut s = connect();
    expect_reply(&mut s, "", "220 ");
    expect_reply(&mut s, "EHLO web01\r\n", "250");
    expect_reply(&mut s, "MAIL FROM:<a@example.com>\r\n", "250");
    expect_reply(&mut s, "RCPT TO:<b@example.com>\r\n", "250");
    expect_reply(&mut s, "DATA\r\n", "354");
    let t = std::time::Instant::now();
    let mut w = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for i in 0..25 {
            if w.write_all(format!("line {i}\r\n").as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    expect_reply(&mut s, "", "421 4.4.2");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    trickle.join().unwrap();
    let q = queue(&r.b);
    assert_eq!(
        q["messages"].as_array().unwrap().len(),
        1,
        "nothing more spooled"
    );
    assert!(spool_files(&r.b, "tmp").is_empty());
    assert_eq!(
        q["metrics"]["bastide_smtp_refused_total{reason=\"timeout\"}"],
        2
    );
    // One connection (or more, if the slot took a moment to free) and one recipient.
    assert!(
        q["metrics"]["bastide_smtp_refused_total{reason=\"limit\"}"]
            .as_u64()
            .unwrap()
            >= 2
    );
}

#[test]
fn partial_recipient_refusal_delivers_the_others_once_and_bounces_only_the_refused() {
    let mut b = Bastion::init("mailp");
    let port = free_port();
    let host = Smarthost::start(
        &b,
        "none",
        &[
            "--reject-rcpt",
            "bad@example.net",
            "--tempfail-rcpt",
            "later@example.net",
        ],
    );
    relay_config(
        &b,
        port,
        "postmaster = \"postmaster@example.org\"",
        &format!("port = {}\ntls = \"none\"", host.port),
    );
    b.start();
    assert_ok(&swaks(
        port,
        &[
            "--from",
            "sender@example.com",
            "--to",
            "good1@example.org,bad@example.net,later@example.net,good2@example.org",
            "--header",
            "Subject: partly",
        ],
    ));
    // good1 and good2 delivered in the one transaction (each RCPT has its own reply), then
    // the bounce for bad@ alone, at once, while later@ is still being retried.
    let got = host.wait(2);
    let to = |m: &(Value, String)| m.0["rcpt_tos"].clone();
    let originals: Vec<_> = got.iter().filter(|m| m.0["mail_from"] != "<>").collect();
    let mut rcpts: Vec<String> = originals
        .iter()
        .flat_map(|m| to(m).as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["good1@example.org", "good2@example.org"]);
    let bounce = got
        .iter()
        .find(|m| m.0["mail_from"] == "<>")
        .expect("a bounce with the null sender");
    assert_eq!(
        to(bounce),
        serde_json::json!(["sender@example.com", "postmaster@example.org"])
    );
    assert!(bounce
        .1
        .contains("Final-Recipient: rfc822; bad@example.net"));
    assert!(
        !bounce.1.contains("Final-Recipient: rfc822; good1"),
        "{}",
        bounce.1
    );
    assert!(
        !bounce.1.contains("Final-Recipient: rfc822; later"),
        "{}",
        bounce.1
    );
    // Retries go to later@ only: the delivered recipients never get it twice.
    let m = wait_for(Duration::from_secs(15), || {
        let m = queue(&b)["messages"][0].clone();
        (m["attempts"].as_u64().unwrap_or(0) >= 3).then_some(m)
    })
    .expect("retried");
    assert!(m["last_error"].as_str().unwrap().contains("450"), "{m}");
    let retried: Vec<Value> = host
        .events()
        .into_iter()
        .filter(|e| e["event"] == "rcpt")
        .collect();
    let count = |a: &str| retried.iter().filter(|e| e["address"] == a).count();
    assert!(count("later@example.net") >= 3, "{retried:?}");
    // good1@ was named once: one transaction, never split or repeated.
    assert_eq!(count("good1@example.org"), 1, "{retried:?}");
    assert_eq!(count("good2@example.org"), 1, "{retried:?}");
    let originals_now: Vec<_> = host
        .messages()
        .into_iter()
        .filter(|m| m.0["mail_from"] != "<>")
        .collect();
    assert_eq!(
        originals_now.len(),
        1,
        "no duplicate for the delivered recipients"
    );
    assert_eq!(
        to(&originals_now[0]),
        serde_json::json!(["good1@example.org", "good2@example.org"])
    );
    let state = std::fs::read_dir(b.state_dir().join("mail/queue"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".state"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap();
    assert!(
        state.contains("\"done\":[\"good1@example.org\",\"good2@example.org\"]"),
        "{state}"
    );
    assert!(state.contains("bad@example.net"), "{state}");
    assert_eq!(metric(&b, "bastide_smtp_bounced_total"), 1);
}

/// `tls = "opportunistic"`: STARTTLS (certificate checked against `ca_file`) when the
/// smarthost offers it, plaintext when it does not; and a plain HELO client (RFC 821 style,
/// `swaks --protocol SMTP`) is served like an EHLO one.
#[test]
fn opportunistic_tls_upgrades_when_offered_and_helo_clients_are_served() {
    for (mode, want_tls) in [("starttls", true), ("none", false)] {
        let b = Bastion::init("mailp");
        let port = free_port();
        let ca = b.state_dir().join("pki/agent-ca.crt");
        let host = Smarthost::start(&b, mode, &[]);
        relay_config(
            &b,
            port,
            "",
            &format!(
                "port = {}\ntls = \"opportunistic\"\nca_file = \"{}\"",
                host.port,
                ca.display()
            ),
        );
        let mut b = b;
        b.start();
        let o = swaks(
            port,
            &[
                "--protocol",
                "SMTP",
                "--from",
                "a@example.com",
                "--to",
                "b@example.com",
                "--header",
                &format!("Subject: opportunistic {mode}"),
            ],
        );
        assert_ok(&o);
        let t = transcript(&o);
        assert!(t.contains("-> HELO web01"), "HELO was not used:\n{t}");
        let got = host.wait(1);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0["tls"], want_tls, "smarthost {mode}: {}", got[0].0);
        assert!(got[0].1.contains(&format!("Subject: opportunistic {mode}")));
    }
}

/// The attacker is root on an enrolled VM and claims addresses that are not its own: the
/// bastion's 127.0.0.1 and a neighbour's 127.0.0.9 (a machine without an agent). Neither
/// opens the relay to clients at those addresses: the registry uses a claim only when the
/// agent's connection comes from it (agents.claimed_addresses = "observed"), never the
/// bastion's own address. Before the address policy, both were admitted.
#[test]
fn a_claimed_address_does_not_open_the_relay() {
    let r = relay(
        "none",
        "allow = [\"192.0.2.0/24\"]",
        "retry_initial = \"1h\"",
    );
    let mut a = Agent::new("evil");
    a.set_addresses(&["127.0.0.1", "127.0.0.9", &a.ip], Some(&a.ip));
    a.enroll_ok(&r.b, &r.b.token(&[]));
    a.start();
    let info = wait_for(Duration::from_secs(20), || {
        r.b.agent("evil")
            .filter(|i| i["addresses"][0] == a.ip.as_str())
    })
    .unwrap_or_else(|| {
        panic!(
            "agent not registered: {:?}\n{}",
            r.b.agent("evil"),
            a.log_text()
        )
    });
    let refused = info["refused"].to_string();
    assert!(
        refused.contains("127.0.0.1: an address of the bastion itself"),
        "{info}"
    );
    assert!(
        refused.contains("127.0.0.9: not the observed address"),
        "{info}"
    );
    for client in ["127.0.0.1", "127.0.0.9"] {
        let o = swaks(
            r.port,
            &[
                "-li",
                client,
                "--from",
                "a@example.com",
                "--to",
                "b@example.com",
            ],
        );
        assert!(
            transcript(&o).contains("554 5.7.1"),
            "a client at {client} was admitted because an agent claimed it:\n{}",
            transcript(&o)
        );
    }
    // The agent's own, observed address does relay.
    assert_ok(&swaks(
        r.port,
        &[
            "-li",
            &a.ip,
            "--from",
            "a@example.com",
            "--to",
            "b@example.com",
        ],
    ));
}

/// Many messages delivered at once, over pooled connections, to a smarthost that refuses
/// some recipients for good (550 5.1.1) and others for now (450), with PIPELINING offered
/// (`pipelined`) or not. The mail is queued while the smarthost is down, then flushed, so
/// that every delivery runs concurrently (destination_concurrency_limit = 6,
/// messages_per_connection = 5). Checked: every accepted recipient got its message exactly
/// once (one transaction per message, each RCPT named once); exactly one bounce per message
/// with a refused recipient, listing only it, with that message's headers and the
/// smarthost's enhanced status; the 4xx recipients alone stay queued, with the others
/// recorded as done; connections were reused (several transactions each, never more than
/// the limit) and counted the same by the smarthost and the bastion's metrics.
fn concurrent_delivery_case(pipelined: bool) {
    const N: usize = 36;
    let mut b = Bastion::init("mailp");
    let port = free_port();
    let host_port = free_port();
    relay_config(
        &b,
        port,
        "postmaster = \"postmaster@example.org\"",
        &format!(
            "port = {host_port}\ntls = \"none\"\ndestination_concurrency_limit = 6\nmessages_per_connection = 5"
        ),
    );
    b.start();
    let rcpts = |i: usize| -> Vec<String> {
        let mut v = vec![format!("a{i}@example.org"), format!("b{i}@example.org")];
        if i.is_multiple_of(3) {
            v.insert(1, "bad@example.net".into());
        }
        if i.is_multiple_of(4) {
            v.push("later@example.net".into());
        }
        v
    };
    // Eight clients at once, while the smarthost is down: everything is queued.
    std::thread::scope(|s| {
        for t in 0..8 {
            s.spawn(move || {
                for i in (t..N).step_by(8) {
                    assert_ok(&swaks(
                        port,
                        &[
                            "--from",
                            &format!("sender{i}@example.com"),
                            "--to",
                            &rcpts(i).join(","),
                            "--header",
                            &format!("Subject: message {i}"),
                        ],
                    ));
                }
            });
        }
    });
    assert_eq!(metric(&b, "bastide_smtp_accepted_total"), N as u64);
    let mut extra = vec![
        "--reject-rcpt",
        "bad@example.net",
        "--tempfail-rcpt",
        "later@example.net",
    ];
    if pipelined {
        extra.push("--pipelining");
    }
    let host = Smarthost::start_on(&b, host_port, "none", &extra);
    b.cli_ok(&["mail", "flush"]);
    let bad = (0..N).filter(|i| i.is_multiple_of(3)).count();
    let bounces_to = |m: &(Value, String)| m.0["mail_from"] == "<>";
    let got = wait_for(Duration::from_secs(60), || {
        let m = host.messages();
        (m.len() >= N + bad).then_some(m)
    })
    .unwrap_or_else(|| panic!("expected {} messages: {:?}", N + bad, host.messages().len()));
    // Each message once, to its accepted recipients only.
    let originals: Vec<&(Value, String)> = got.iter().filter(|m| !bounces_to(m)).collect();
    assert_eq!(originals.len(), N, "one delivery per message");
    for i in 0..N {
        let subject = format!("Subject: message {i}\r\n");
        let copies: Vec<_> = originals
            .iter()
            .filter(|m| m.1.contains(&subject))
            .collect();
        assert_eq!(copies.len(), 1, "message {i}: {copies:?}");
        assert_eq!(
            copies[0].0["rcpt_tos"],
            serde_json::json!([format!("a{i}@example.org"), format!("b{i}@example.org")]),
            "message {i}"
        );
        assert_eq!(
            copies[0].0["mail_from"],
            format!("sender{i}@example.com"),
            "message {i}"
        );
    }
    // One bounce per message with a refused recipient, naming only that recipient.
    let bounces: Vec<&(Value, String)> = got.iter().filter(|m| bounces_to(m)).collect();
    assert_eq!(bounces.len(), bad, "{bounces:?}");
    for i in (0..N).filter(|i| i.is_multiple_of(3)) {
        let subject = format!("Subject: message {i}\r\n");
        let mine: Vec<_> = bounces.iter().filter(|m| m.1.contains(&subject)).collect();
        assert_eq!(mine.len(), 1, "bounce of message {i}");
        let (env, dsn) = mine[0];
        assert_eq!(
            env["rcpt_tos"],
            serde_json::json!([format!("sender{i}@example.com"), "postmaster@example.org"])
        );
        assert!(
            dsn.contains("Final-Recipient: rfc822; bad@example.net"),
            "{dsn}"
        );
        assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
        assert_eq!(dsn.matches("Final-Recipient:").count(), 1, "{dsn}");
    }
    // Every recipient named in exactly one RCPT, except later@ (retried).
    let events = host.events();
    let rcpt_events: Vec<&Value> = events.iter().filter(|e| e["event"] == "rcpt").collect();
    for i in 0..N {
        for r in [format!("a{i}@example.org"), format!("b{i}@example.org")] {
            let n = rcpt_events.iter().filter(|e| e["address"] == r).count();
            assert_eq!(n, 1, "RCPT TO:<{r}> sent {n} times");
        }
    }
    // The 4xx recipients alone stay queued, the others of their message done.
    let later: Vec<usize> = (0..N).filter(|i| i.is_multiple_of(4)).collect();
    let q = wait_for(Duration::from_secs(10), || {
        let q = queue(&b)["messages"].as_array().unwrap().clone();
        (q.len() == later.len() && q.iter().all(|m| m["attempts"].as_u64() >= Some(2))).then_some(q)
    })
    .unwrap_or_else(|| panic!("queue: {}", queue(&b)));
    for m in &q {
        assert!(m["last_error"].as_str().unwrap().contains("450"), "{m}");
        let id = m["id"].as_str().unwrap();
        let state =
            std::fs::read_to_string(b.state_dir().join(format!("mail/queue/{id}.state"))).unwrap();
        let st: Value = serde_json::from_str(&state).unwrap();
        let done = st["done"].as_array().unwrap();
        assert_eq!(done.len(), 2, "{state}");
        assert!(done
            .iter()
            .all(|d| d.as_str().unwrap().ends_with("@example.org")));
        let failed = st["failed"].as_array().cloned().unwrap_or_default();
        assert!(
            failed.iter().all(|f| f["recipient"] == "bad@example.net"),
            "{state}"
        );
    }
    assert_eq!(metric(&b, "bastide_smtp_bounced_total"), bad as u64);
    // Pooled connections: several transactions each, at most five, at most six at once.
    let mut per_conn = std::collections::BTreeMap::<i64, usize>::new();
    for e in events.iter().filter(|e| e["event"] == "mail") {
        *per_conn.entry(e["conn"].as_i64().unwrap()).or_default() += 1;
    }
    let transactions: usize = per_conn.values().sum();
    let conns = host.count("connect");
    assert!(
        per_conn.values().all(|&n| n <= 5),
        "messages_per_connection exceeded: {per_conn:?}"
    );
    assert!(
        conns * 2 <= transactions,
        "{conns} connections for {transactions} transactions: {per_conn:?}"
    );
    assert_eq!(
        metric(&b, "bastide_smtp_relay_connections_total"),
        conns as u64
    );
    let (mut open, mut most) = (0i64, 0i64);
    for e in &events {
        if e["event"] == "connect" {
            open += 1;
            most = most.max(open);
        } else if e["event"] == "disconnect" {
            open -= 1;
        }
    }
    assert!(
        (2..=6).contains(&most),
        "{most} connections at once (limit 6, concurrent deliveries expected)"
    );
    assert!(metric(&b, "bastide_smtp_relay_transactions_total") >= transactions as u64);
    // PIPELINING used exactly when offered.
    let log = strip_ansi(&b.log_text());
    let opened: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("smarthost connection opened"))
        .collect();
    assert_eq!(opened.len(), conns, "{log}");
    let flag = format!("pipelining={pipelined}");
    assert!(opened.iter().all(|l| l.contains(&flag)), "{opened:?}");
    // No duplicate later: nothing more arrives.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(host.messages().len(), N + bad);
}

#[test]
fn concurrent_delivery_keeps_per_recipient_results_and_bounces_correct() {
    concurrent_delivery_case(false);
}

#[test]
fn concurrent_pipelined_delivery_keeps_per_recipient_results_and_bounces_correct() {
    concurrent_delivery_case(true);
}

/// A pooled connection that the smarthost closed meanwhile (here: smtp-sink restarted
/// between two messages, within the 5 s the pool keeps an idle connection) is found stale
/// at its RSET and the message goes out at once on a new connection: no failed attempt, no
/// deferral.
#[test]
fn a_stale_pooled_connection_is_replaced_without_a_deferral() {
    let r = relay("none", "", FAST);
    let send = |subject: &str| {
        assert_ok(&swaks(
            r.port,
            &[
                "--from",
                "a@example.com",
                "--to",
                "b@example.com",
                "--header",
                &format!("Subject: {subject}"),
            ],
        ))
    };
    let sink = Sink::start(r.sink_port, &[]);
    send("first");
    sink.wait(1, Duration::from_secs(10));
    drop(sink);
    let sink = Sink::start(r.sink_port, &[]);
    send("second");
    let got = sink.wait(1, Duration::from_secs(10));
    assert!(got[0].content.contains("Subject: second"));
    assert_eq!(metric(&r.b, "bastide_smtp_deferred_total"), 0);
    assert_eq!(metric(&r.b, "bastide_smtp_relay_connections_total"), 2);
    assert_eq!(metric(&r.b, "bastide_smtp_relay_transactions_total"), 3);
}
