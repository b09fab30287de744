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
    let smtp_extra = if smtp_extra.contains("allow_networks") {
        smtp_extra.to_string()
    } else {
        format!("allow_networks = [\"127.0.0.1/32\"]\n{smtp_extra}")
    };
    b.edit_config(|c| {
        format!(
            "{c}\n[smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"bastion.mailp.test\"\n{smtp_extra}\n\n[smtp.relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"{tls}\"\ntimeout = \"5s\"\nconcurrency = 4\n{relay_extra}\n"
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
        "allow_networks = [\"127.0.0.1/32\"]",
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

    // Only enrolled agents: loopback is refused until an agent advertising it registers.
    let r = relay(
        "none",
        "allow_networks = [\"192.0.2.0/24\"]\nallow_recipient_domains = [\"example.com\"]",
        "retry_initial = \"1h\"",
    );
    let o = swaks(
        r.port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    );
    assert!(transcript(&o).contains("554 5.7.1"), "{}", transcript(&o));
    let mut a = Agent::new("web01");
    a.enroll_ok(&r.b, &r.b.token(&[]));
    a.start();
    assert!(r.b.wait_state("web01", "online", Duration::from_secs(20)));
    assert_ok(&swaks(
        r.port,
        &["--from", "a@example.com", "--to", "b@example.com"],
    ));
    // The recipient-domain allow-list.
    let o = swaks(
        r.port,
        &["--from", "a@example.com", "--to", "b@example.net"],
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
    assert!(sink.files().is_empty());
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
