//! Logs: the syslog receiver with real peers (`logger`, `rsyslogd`), the store layout and its
//! safety (truncation, invalid UTF-8, hostile host names), `bastide logs`, forwarding to a
//! collector that comes back, and agent batches stored exactly once (duplicates, restart).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bastide_agent::tls::{connect, mtls_config};
use bastide_proto::v1::agent_client::AgentClient;
use bastide_proto::v1::{LogBatch, LogEvent};
use bastide_tests::{free_port, http_get, require, tcp_from, wait_for, Agent, Bastion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn rt() -> tokio::runtime::Runtime {
    bastide_agent::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct Syslog {
    b: Bastion,
    udp: u16,
    tcp: u16,
}

/// A bastion with `[logs]` and `[syslog]` (UDP and TCP on free ports) plus `extra` config.
fn bastion_with_syslog(extra: &str) -> Syslog {
    bastion_with("", extra)
}

/// The same, with `syslog_extra` lines in the `[syslog]` table.
fn bastion_with(syslog_extra: &str, extra: &str) -> Syslog {
    let mut b = Bastion::init("proj");
    let (udp, tcp) = (free_port(), free_port());
    b.edit_config(|c| {
        format!(
            "{c}\n[syslog]\nudp = [\"127.0.0.1:{udp}\"]\ntcp = [\"127.0.0.1:{tcp}\"]\nallow = [\"127.0.0.0/8\"]\nmax_message_bytes = 8192\n{syslog_extra}\n\n[logs]\nretention_days = 30\n{extra}"
        )
    });
    b.start();
    Syslog { b, udp, tcp }
}

fn store_dir(b: &Bastion) -> PathBuf {
    b.state_dir().join("logs")
}

/// Every stored line, with the host directory it is in.
fn stored(b: &Bastion) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(hosts) = std::fs::read_dir(store_dir(b)) else {
        return out;
    };
    for h in hosts.flatten() {
        let name = h.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        for f in std::fs::read_dir(h.path()).unwrap().flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            for line in String::from_utf8(bytes).expect("store is UTF-8").lines() {
                out.push((name.clone(), line.to_string()));
            }
        }
    }
    out
}

fn wait_line(b: &Bastion, needle: &str) -> (String, String) {
    wait_for(Duration::from_secs(20), || {
        stored(b).into_iter().find(|(_, l)| l.contains(needle))
    })
    .unwrap_or_else(|| panic!("{needle:?} never reached the store:\n{}", b.log_text()))
}

fn metric(b: &Bastion, series: &str) -> f64 {
    let (_, body) = http_get(&b.metrics_addr, "/metrics", None);
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

fn logger(args: &[&str], stdin: Option<&[u8]>) {
    let bin = require("logger", "bsdutils");
    let mut c = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(data) = stdin {
        c.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "logger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn logger_over_udp_and_tcp_is_stored_per_host() {
    let s = bastion_with_syslog("");
    let b = &s.b;
    let (udp, tcp) = (s.udp.to_string(), s.tcp.to_string());
    let base = ["--server", "127.0.0.1", "--port"];
    let with = |port: &str, extra: &[&str]| {
        let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        v.push(port.to_string());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run =
        |args: Vec<String>| logger(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    run(with(
        &udp,
        &[
            "-d",
            "--rfc5424",
            "-t",
            "app5424",
            "-p",
            "auth.warning",
            "udp-5424-token",
        ],
    ));
    run(with(
        &udp,
        &["-d", "--rfc3164", "-t", "app3164", "udp-3164-token"],
    ));
    run(with(
        &tcp,
        &["-T", "--rfc5424", "-t", "tcpapp", "tcp-5424-token"],
    ));
    run(with(
        &tcp,
        &[
            "-T",
            "--octet-count",
            "--rfc3164",
            "-t",
            "octet",
            "tcp-octet-3164-token",
        ],
    ));

    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_lowercase();
    // Filed under the sender's address (127.0.0.1 is no agent's), the HOSTNAME logger
    // claims kept at the head of the message.
    let own = "ip-127-0-0-1";
    let (host, line) = wait_line(b, "udp-5424-token");
    assert_eq!(host, own, "filed under the sender's address");
    let f: Vec<&str> = line.splitn(5, ' ').collect();
    assert!(
        f[0].ends_with('Z') && f[0].contains('T'),
        "RFC 3339 UTC: {line}"
    );
    assert_eq!(f[1], own);
    assert!(f[2].starts_with("app5424"), "{line}");
    assert_eq!(f[3], "auth.warning", "{line}");
    assert!(
        f[4].eq_ignore_ascii_case(&format!("claimed-host={hostname} udp-5424-token")),
        "{line}"
    );
    let (_, line) = wait_line(b, "udp-3164-token");
    assert!(line.contains(" app3164"), "{line}");
    let (_, line) = wait_line(b, "tcp-5424-token");
    assert!(line.contains(" tcpapp"), "{line}");
    let (_, line) = wait_line(b, "tcp-octet-3164-token");
    assert!(line.contains(" octet"), "{line}");
    let day = line[..10].to_string();
    assert!(store_dir(b).join(own).join(format!("{day}.log")).is_file());
    assert!(
        !store_dir(b).join(&hostname).exists(),
        "a claimed name got a directory"
    );

    // A 100 KiB line (TCP, newline framing) is cut at max_message_bytes and counted.
    let mut big = b"big-line-token ".to_vec();
    big.resize(100 * 1024, b'x');
    big.push(b'\n');
    logger(
        &[
            "--server",
            "127.0.0.1",
            "--port",
            &tcp,
            "-T",
            "-S",
            "200000",
            "-t",
            "big",
        ],
        Some(&big),
    );
    let (_, line) = wait_line(b, "big-line-token");
    assert!(line.len() < 8192 + 200, "stored {} bytes", line.len());
    assert!(line.len() > 7000, "stored {} bytes", line.len());
    assert!(metric(b, "bastide_logs_truncated_total{source=\"tcp\"}") >= 1.0);

    // Invalid UTF-8 and a hostile host name, over raw TCP (newline and octet framing).
    let mut t = TcpStream::connect(format!("127.0.0.1:{tcp}")).unwrap();
    t.write_all(b"<13>Nov 27 10:00:00 latin1host app: caf\xe9 invalid-utf8-token\n")
        .unwrap();
    let m = b"<13>1 2026-11-27T10:00:00.000Z ../../etc evil - - - escape-token";
    t.write_all(format!("{} ", m.len()).as_bytes()).unwrap();
    t.write_all(m).unwrap();
    t.write_all(b"not syslog at all unparsed-token\n").unwrap();
    drop(t);
    let (host, line) = wait_line(b, "invalid-utf8-token");
    assert_eq!(host, own);
    assert!(
        line.contains(" app user.notice claimed-host=latin1host caf\u{fffd} invalid-utf8-token"),
        "{line}"
    );
    assert_eq!(
        metric(b, "bastide_logs_invalid_utf8_total{source=\"tcp\"}"),
        1.0
    );
    let (host, line) = wait_line(b, "escape-token");
    assert_eq!(host, own);
    assert_eq!(
        line,
        "2026-11-27T10:00:00.000Z ip-127-0-0-1 evil user.notice claimed-host=../../etc escape-token"
    );
    assert!(!b.dir.path().join("etc").exists(), "escaped the store");
    for e in std::fs::read_dir(store_dir(b)).unwrap().flatten() {
        assert!(
            e.file_type().unwrap().is_dir(),
            "only host directories in the store"
        );
    }
    let (host, _) = wait_line(b, "unparsed-token");
    assert_eq!(host, own);
    assert!(metric(b, "bastide_logs_parse_failures_total{source=\"tcp\"}") >= 1.0);
    assert!(metric(b, "bastide_logs_events_total{source=\"udp\"}") >= 2.0);

    // bastide logs --host GLOB --grep RE finds it, --json gives the fields.
    let out = b.cli_ok(&["logs", "--host", "ip-127-*", "--grep", "invalid-utf8-t.ken"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(
        "ip-127-0-0-1 app user.notice claimed-host=latin1host caf\u{fffd} invalid-utf8-token"
    ));
    let out = b.cli_ok(&[
        "logs",
        "--host",
        "ip-127-0-0-1",
        "--grep",
        "escape-token",
        "--json",
        "--since",
        "3650d",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["app"], "evil");
    assert_eq!(v["message"], "claimed-host=../../etc escape-token");
    let out = b.cli_ok(&["logs", "--grep", "token", "--until", "2000-01-01T00:00:00Z"]);
    assert_eq!(out, "", "--until filters by event time");
    let bad = b.cli(&["logs", "--grep", "("]);
    assert!(!bad.status.success());

    // --follow streams what arrives later.
    let mut follow = Command::new(bastide_tests::bin("bastide"))
        .arg("--config")
        .arg(&b.config)
        .args(["logs", "--follow", "--grep", "live-token"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    logger(
        &[
            "--server",
            "127.0.0.1",
            "--port",
            &tcp,
            "-T",
            "live-token now",
        ],
        None,
    );
    let mut out = follow.stdout.take().unwrap();
    let mut buf = [0u8; 4096];
    let n = out.read(&mut buf).unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("live-token now"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let status = b.cli_ok(&["status"]);
    assert!(status.contains("log store"), "{status}");
}

/// A real rsyslogd with its own configuration, forwarding with omfwd (TCP, octet-counted).
struct Rsyslog {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rsyslog(config: &str) -> Rsyslog {
    let bin = require("rsyslogd", "rsyslog");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let conf = dir.path().join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!("global(workDirectory=\"{}\")\n{config}\n", work.display()),
    )
    .unwrap();
    let check = Command::new(&bin)
        .arg("-N1")
        .arg("-f")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "rsyslog config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new(&bin)
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.path().join("rsyslogd.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Rsyslog { child, _dir: dir }
}

#[test]
fn rsyslog_omfwd_reaches_the_store() {
    let s = bastion_with_syslog("");
    let input = free_port();
    let _r = rsyslog(&format!(
        "module(load=\"imudp\")\ninput(type=\"imudp\" address=\"127.0.0.1\" port=\"{input}\")\n\
         action(type=\"omfwd\" target=\"127.0.0.1\" port=\"{}\" protocol=\"tcp\" \
         TCP_Framing=\"octet-counted\" template=\"RSYSLOG_SyslogProtocol23Format\")",
        s.tcp
    ));
    // rsyslog needs a moment to open its input; resend until the first line arrives.
    let got = wait_for(Duration::from_secs(20), || {
        logger(
            &[
                "--server",
                "127.0.0.1",
                "--port",
                &input.to_string(),
                "-d",
                "-t",
                "via",
                "rsyslog-probe",
            ],
            None,
        );
        stored(&s.b)
            .into_iter()
            .any(|(_, l)| l.contains("rsyslog-probe"))
            .then_some(())
    });
    assert!(
        got.is_some(),
        "rsyslog never forwarded:\n{}",
        s.b.log_text()
    );
    for i in 0..50 {
        logger(
            &[
                "--server",
                "127.0.0.1",
                "--port",
                &input.to_string(),
                "-d",
                "-t",
                "via",
                &format!("rsyslog-line-{i}-end"),
            ],
            None,
        );
    }
    let all = wait_for(Duration::from_secs(20), || {
        let lines = stored(&s.b);
        (0..50)
            .all(|i| {
                lines
                    .iter()
                    .any(|(_, l)| l.contains(&format!("rsyslog-line-{i}-end")))
            })
            .then_some(lines)
    })
    .expect("all 50 lines through rsyslog");
    let (_, line) = all
        .iter()
        .find(|(_, l)| l.contains("rsyslog-line-7-end"))
        .unwrap();
    assert!(line.contains(" via "), "app kept through rsyslog: {line}");
    assert!(metric(&s.b, "bastide_logs_events_total{source=\"tcp\"}") >= 50.0);
}

/// RFC 5425: rsyslog's gtls driver verifies the bastion's server certificate against the
/// bastion's CA and sends octet-counted frames over TLS.
#[test]
fn rsyslog_over_tls_reaches_the_store() {
    let tls = free_port();
    let s = bastion_with(&format!("tls = [\"127.0.0.1:{tls}\"]"), "");
    let gtls = std::path::Path::new("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so");
    assert!(
        gtls.exists(),
        "rsyslog's TLS driver is required by this test: apt-get install -y rsyslog-gnutls"
    );
    let input = free_port();
    let ca = s.b.state_dir().join("pki").join("agent-ca.crt");
    let _r = rsyslog(&format!(
        "global(DefaultNetstreamDriverCAFile=\"{}\")\n\
         module(load=\"imudp\")\ninput(type=\"imudp\" address=\"127.0.0.1\" port=\"{input}\")\n\
         action(type=\"omfwd\" target=\"127.0.0.1\" port=\"{tls}\" protocol=\"tcp\" \
         StreamDriver=\"gtls\" StreamDriverMode=\"1\" StreamDriverAuthMode=\"x509/name\" \
         StreamDriverPermittedPeers=\"localhost\" template=\"RSYSLOG_SyslogProtocol23Format\")",
        ca.display()
    ));
    let got = wait_for(Duration::from_secs(20), || {
        logger(
            &[
                "--server",
                "127.0.0.1",
                "--port",
                &input.to_string(),
                "-d",
                "-t",
                "secure",
                "over-tls-token",
            ],
            None,
        );
        stored(&s.b)
            .into_iter()
            .find(|(_, l)| l.contains("over-tls-token"))
    });
    let (_, line) = got.unwrap_or_else(|| panic!("nothing over TLS:\n{}", s.b.log_text()));
    assert!(line.contains(" secure"), "{line}");
    assert!(metric(&s.b, "bastide_logs_events_total{source=\"tls\"}") >= 1.0);
    assert_eq!(
        metric(&s.b, "bastide_logs_events_total{source=\"tcp\"}"),
        0.0
    );
}

#[test]
fn forwarding_delivers_after_the_collector_comes_back() {
    let collector = free_port();
    let s = bastion_with_syslog(&format!(
        "\n[logs.forward]\ntarget = \"127.0.0.1:{collector}\"\nprotocol = \"tcp\"\nretry_initial = \"100ms\"\nretry_max = \"300ms\"\nmax_queue_bytes = 1048576\n"
    ));
    let mut t = TcpStream::connect(format!("127.0.0.1:{}", s.tcp)).unwrap();
    for i in 0..20 {
        writeln!(
            t,
            "<14>1 2026-11-27T10:00:00.000Z fwdhost app 42 - - forwarded-{i}-end"
        )
        .unwrap();
    }
    drop(t);
    wait_line(&s.b, "forwarded-19-end");
    // The collector is down: the events wait in the queue.
    std::thread::sleep(Duration::from_millis(800));
    assert!(metric(&s.b, "bastide_logs_forward_queue_bytes") > 0.0);
    assert_eq!(metric(&s.b, "bastide_logs_forward_connected"), 0.0);

    let l = TcpListener::bind(format!("127.0.0.1:{collector}")).unwrap();
    let (mut conn, _) = l.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let start = Instant::now();
    while !String::from_utf8_lossy(&got).contains("forwarded-19-end") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not delivered: {}",
            String::from_utf8_lossy(&got)
        );
        let mut buf = [0u8; 8192];
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "collector connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(got).unwrap();
    // RFC 5424 with octet-counting framing, PRI and fields kept; the host is the one the
    // line is filed under (the sender's address), the claimed one stays in the message.
    let m =
        "<14>1 2026-11-27T10:00:00.000Z ip-127-0-0-1 app 42 - - claimed-host=fwdhost forwarded-0-end";
    assert!(text.starts_with(&format!("{} {m}", m.len())), "{text}");
    for i in 0..20 {
        assert!(text.contains(&format!("forwarded-{i}-end")), "{text}");
    }
    assert!(wait_for(Duration::from_secs(5), || {
        (metric(&s.b, "bastide_logs_forward_sent_total") >= 20.0).then_some(())
    })
    .is_some());
    let status = s.b.cli_ok(&["status"]);
    assert!(status.contains("log forward"), "{status}");
}

/// An mTLS gRPC client with an enrolled agent's own key and certificate.
async fn client_of(b: &Bastion, agent: &Agent) -> AgentClient<tonic::transport::Channel> {
    let dir = agent.state_dir();
    let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
    let cert = CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let cfg = mtls_config(ca, vec![cert], key).unwrap();
    AgentClient::new(connect(&b.agents_addr, "127.0.0.1", cfg).await.unwrap())
}

fn batch(epoch: u64, seq: u64, n: usize) -> LogBatch {
    LogBatch {
        epoch,
        seq,
        events: (0..n)
            .map(|i| LogEvent {
                timestamp_ms: 1_790_000_000_000,
                source: "/var/log/app.log".into(),
                app: String::new(),
                severity: 6,
                facility: 1,
                message: format!("batch {seq} line {i} end\n").into_bytes(),
            })
            .collect(),
    }
}

/// Ships `batches` on one stream and returns the acknowledged seqs in order.
async fn ship(b: &Bastion, a: &Agent, batches: Vec<LogBatch>) -> Vec<u64> {
    let mut c = client_of(b, a).await;
    let n = batches.len();
    let (tx, rx) = tokio::sync::mpsc::channel(n.max(1));
    for x in batches {
        tx.send(x).await.unwrap();
    }
    let mut acks = c
        .ship_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    for _ in 0..n {
        let ack = tokio::time::timeout(Duration::from_secs(20), acks.message())
            .await
            .expect("ack in time")
            .unwrap()
            .unwrap();
        got.push(ack.seq);
    }
    drop(tx);
    got
}

fn count(b: &Bastion, host: &str, needle: &str) -> usize {
    stored(b)
        .iter()
        .filter(|(h, l)| h == host && l.ends_with(needle))
        .count()
}

#[test]
fn agent_batches_are_stored_exactly_once() {
    let mut s = bastion_with_syslog("");
    let token = s.b.token(&["--uses", "2"]);
    let shipper = Agent::new("shipper");
    shipper.enroll_ok(&s.b, &token);
    let rt = rt();
    let epoch = 0xfeed;
    let acks = rt.block_on(ship(
        &s.b,
        &shipper,
        vec![
            batch(epoch, 1, 100),
            batch(epoch, 2, 100),
            batch(epoch, 2, 100),
            batch(epoch, 3, 100),
        ],
    ));
    assert_eq!(acks, vec![1, 2, 2, 3]);
    for seq in 1..=3 {
        assert_eq!(
            count(&s.b, "shipper", &format!("batch {seq} line 99 end")),
            1
        );
    }
    let (_, line) = wait_line(&s.b, "batch 1 line 0 end");
    assert_eq!(
        line,
        "2026-09-21T14:13:20.000Z shipper app.log user.info batch 1 line 0 end"
    );
    assert_eq!(metric(&s.b, "bastide_logs_duplicate_batches_total"), 1.0);

    // A reconnecting agent resends from its oldest unacknowledged batch; a kill -9 of the
    // bastion in between does not make it forget what it stored.
    s.b.kill();
    s.b.start();
    let acks = rt.block_on(ship(
        &s.b,
        &shipper,
        vec![
            batch(epoch, 2, 100),
            batch(epoch, 3, 100),
            batch(epoch, 4, 100),
        ],
    ));
    assert_eq!(acks, vec![2, 3, 4]);
    for seq in 1..=4 {
        assert_eq!(
            count(&s.b, "shipper", &format!("batch {seq} line 42 end")),
            1,
            "seq {seq}"
        );
    }
    // A new epoch (wiped agent buffer) starts again at 1.
    let acks = rt.block_on(ship(&s.b, &shipper, vec![batch(epoch + 1, 1, 1)]));
    assert_eq!(acks, vec![1]);
    assert_eq!(count(&s.b, "shipper", "batch 1 line 0 end"), 2);
    let lines = s.b.cli_ok(&["logs", "--host", "shipper"]);
    assert_eq!(lines.lines().count(), 401);

    // Syslog from an enrolled agent's accepted address is filed under its name.
    let mut vm = Agent::new("vm1");
    vm.enroll_ok(&s.b, &token);
    vm.start();
    assert!(s.b.wait_state("vm1", "online", Duration::from_secs(20)));
    assert!(
        wait_for(Duration::from_secs(10), || s
            .b
            .agent("vm1")
            .filter(|a| a["addresses"][0] == vm.ip.as_str()))
        .is_some(),
        "{:?}",
        s.b.agent("vm1")
    );
    // Sent from the agent's own address, as the VM's syslog daemon would.
    let t = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{}:0", vm.ip).parse().unwrap()).unwrap();
        sock.connect(format!("127.0.0.1:{}", s.tcp).parse().unwrap())
            .await
            .unwrap()
            .into_std()
            .unwrap()
    });
    t.set_nonblocking(false).unwrap();
    let mut t = t;
    writeln!(
        t,
        "<13>1 2026-11-27T10:00:00.000Z claimed-name app - - - from-agent-address"
    )
    .unwrap();
    drop(t);
    let (host, _) = wait_line(&s.b, "from-agent-address");
    assert_eq!(host, "vm1");
}

/// A batch shipped without a `[logs]` table is refused clearly.
#[test]
fn shipping_without_a_log_store_is_refused() {
    let mut b = Bastion::init("proj");
    b.start();
    let token = b.token(&[]);
    let a = Agent::new("nolog");
    a.enroll_ok(&b, &token);
    let rt = rt();
    let err = rt.block_on(async {
        let mut c = client_of(&b, &a).await;
        let s = tokio_stream::iter(vec![batch(1, 1, 1)]);
        match c.ship_logs(s).await {
            Err(e) => e,
            Ok(mut r) => r.get_mut().message().await.unwrap_err(),
        }
    });
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
}

/// Issue 7's counter check: N lines sent by `logger` raise the events counter by exactly N
/// (not "at least"), once every line is in the store.
#[test]
fn logger_lines_raise_the_events_counter_by_exactly_n() {
    const N: usize = 40;
    let s = bastion_with_syslog("");
    let b = &s.b;
    let series = "bastide_logs_events_total{source=\"tcp\"}";
    let before = metric(b, series);
    let lines: String = (0..N).map(|i| format!("counted line {i}\n")).collect();
    logger(
        &[
            "--server",
            "127.0.0.1",
            "--port",
            &s.tcp.to_string(),
            "--tcp",
            "--octet-count",
            "-t",
            "counter",
        ],
        Some(lines.as_bytes()),
    );
    let stored_n = wait_for(Duration::from_secs(20), || {
        let n = stored(b)
            .iter()
            .filter(|(_, l)| l.contains("counted line "))
            .count();
        (n == N).then_some(n)
    });
    assert_eq!(stored_n, Some(N), "{}", b.log_text());
    let after = wait_for(Duration::from_secs(5), || {
        let v = metric(b, series);
        (v - before >= N as f64).then_some(v)
    })
    .unwrap_or_else(|| metric(b, series));
    assert_eq!(
        after - before,
        N as f64,
        "events counter moved by {}",
        after - before
    );
}

/// `[logs.forward]` over TLS (RFC 5425) to a real rsyslog acting as the central collector:
/// rsyslog's imtcp with the gtls driver serves a certificate from a CA of the test's own, the
/// bastion verifies it (`ca_file`, `server_name`) and the forwarded lines land in rsyslog's
/// omfile output.
#[test]
fn forwarding_over_tls_reaches_a_real_rsyslog() {
    let gtls = std::path::Path::new("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so");
    assert!(
        gtls.exists(),
        "rsyslog's TLS driver is required by this test: apt-get install -y rsyslog-gnutls"
    );
    let pki = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut cap = rcgen::CertificateParams::default();
    cap.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    cap.distinguished_name
        .push(rcgen::DnType::CommonName, "collector test CA");
    let ca_cert = cap.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(cap, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["collector.test".to_string()]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "collector.test");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        pki.path().join("ca.pem"),
        pki.path().join("cert.pem"),
        pki.path().join("key.pem"),
    );
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let out = pki.path().join("received.log");

    let collector = free_port();
    let _r = rsyslog(&format!(
        "global(DefaultNetstreamDriver=\"gtls\" DefaultNetstreamDriverCAFile=\"{}\" \
         DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\")\n\
         module(load=\"imtcp\" StreamDriver.Name=\"gtls\" StreamDriver.Mode=\"1\" \
         StreamDriver.AuthMode=\"anon\")\n\
         input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{collector}\")\n\
         action(type=\"omfile\" file=\"{}\" template=\"RSYSLOG_SyslogProtocol23Format\")",
        ca_pem.display(),
        cert_pem.display(),
        key_pem.display(),
        out.display()
    ));
    let s = bastion_with_syslog(&format!(
        "\n[logs.forward]\ntarget = \"127.0.0.1:{collector}\"\nprotocol = \"tls\"\n\
         ca_file = \"{}\"\nserver_name = \"collector.test\"\n\
         retry_initial = \"100ms\"\nretry_max = \"300ms\"\n",
        ca_pem.display()
    ));
    let mut t = TcpStream::connect(format!("127.0.0.1:{}", s.tcp)).unwrap();
    for i in 0..30 {
        writeln!(
            t,
            "<14>1 2026-11-27T10:00:00.000Z tlshost tlsapp 42 - - tls-forwarded-{i}-end"
        )
        .unwrap();
    }
    drop(t);
    wait_line(&s.b, "tls-forwarded-29-end");
    let text = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        text.contains("tls-forwarded-29-end").then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "rsyslog received nothing over TLS:\n{}\nreceived: {:?}",
            s.b.log_text(),
            std::fs::read_to_string(&out).unwrap_or_default()
        )
    });
    for i in 0..30 {
        let needle = format!("tls-forwarded-{i}-end");
        assert_eq!(
            text.lines().filter(|l| l.contains(&needle)).count(),
            1,
            "{needle} once: {text}"
        );
    }
    // rsyslog parsed what it got as RFC 5424: the host the line is filed under (the
    // sender's address), the app and the claimed host name in the message survive the hop.
    let line = text
        .lines()
        .find(|l| l.contains("tls-forwarded-3-end"))
        .unwrap();
    assert!(
        line.contains(" ip-127-0-0-1 tlsapp ") && line.contains("claimed-host=tlshost "),
        "{line}"
    );
    assert!(wait_for(Duration::from_secs(5), || {
        (metric(&s.b, "bastide_logs_forward_connected") == 1.0).then_some(())
    })
    .is_some());
}

/// One syslog line over TCP from local address `src` (a VM at that address).
fn syslog_from(src: &str, port: u16, line: &str) {
    let mut t = tcp_from(src, port);
    // The bastion may close a refused connection at once: a failed write is fine.
    let _ = writeln!(t, "{line}");
}

/// The attacker is root on an enrolled VM and claims a neighbour's address (127.0.0.9, a
/// machine without an agent, outside `syslog.allow`). That claim does not admit the
/// neighbour's syslog lines (nor file them under the agent): the allow-list uses accepted
/// addresses only. The agent's own, observed address is admitted and filed under its name.
#[test]
fn a_claimed_address_does_not_open_syslog() {
    let mut b = Bastion::init("proj");
    let tcp = free_port();
    b.edit_config(|c| {
        format!(
            "{c}\n[syslog]\ntcp = [\"127.0.0.1:{tcp}\"]\nallow = [\"127.0.0.1/32\"]\n\n[logs]\nretention_days = 30\n"
        )
    });
    b.start();
    let mut evil = Agent::new("evil");
    evil.set_addresses(&["127.0.0.9", &evil.ip], Some(&evil.ip));
    evil.enroll_ok(&b, &b.token(&[]));
    evil.start();
    let info = wait_for(Duration::from_secs(20), || {
        b.agent("evil")
            .filter(|a| a["addresses"] == serde_json::json!([evil.ip]))
    })
    .unwrap_or_else(|| {
        panic!(
            "evil not registered: {:?}\n{}",
            b.agent("evil"),
            evil.log_text()
        )
    });
    assert!(
        info["refused"]
            .to_string()
            .contains("127.0.0.9: not the observed address"),
        "{info}"
    );
    syslog_from(
        "127.0.0.9",
        tcp,
        "<13>1 2026-11-27T10:00:00.000Z neighbour app - - - from-the-claimed-address",
    );
    syslog_from(
        &evil.ip,
        tcp,
        "<13>1 2026-11-27T10:00:01.000Z evil app - - - from-the-agent-address",
    );
    syslog_from(
        "127.0.0.1",
        tcp,
        "<13>1 2026-11-27T10:00:02.000Z local app - - - from-an-allowed-network",
    );
    let (host, _) = wait_line(&b, "from-the-agent-address");
    assert_eq!(host, "evil");
    wait_line(&b, "from-an-allowed-network");
    let leaked: Vec<_> = stored(&b)
        .into_iter()
        .filter(|(_, l)| l.contains("from-the-claimed-address"))
        .collect();
    assert!(leaked.is_empty(), "admitted through a claim: {leaked:?}");
}

/// A UDP syslog sender bound to its own loopback source address (127.x.y.z): `logger` has
/// no option to choose its source.
fn udp_from(src: &str) -> std::net::UdpSocket {
    std::net::UdpSocket::bind(format!("{src}:0")).unwrap()
}

/// Issue 16, point 6: a sender that is not an agent cannot write under another host's name.
/// Senders on 127.77.0.7 and 127.77.0.8 (addresses no agent has) claim the HOSTNAME of an
/// enrolled agent and of another machine, over UDP (RFC 5424 and 3164) and TCP: every line is
/// filed under the sender's own address (`ip-127-77-0-7`), the claimed name is kept in the
/// message (`claimed-host=web01 ...`), and nothing lands under the claimed names.
#[test]
fn syslog_files_by_source_address_never_by_claimed_hostname() {
    let s = bastion_with_syslog("");
    let b = &s.b;
    let mut agent = Agent::new("web01");
    agent.enroll_ok(b, &b.token(&[]));
    agent.start();
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(20)),
        "{}",
        agent.log_text()
    );
    let u = udp_from("127.77.0.7");
    let to = format!("127.0.0.1:{}", s.udp);
    u.send_to(
        b"<38>1 2026-11-27T10:00:00.000Z web01 sshd 812 - - forged-5424-token",
        &to,
    )
    .unwrap();
    u.send_to(
        b"<13>Nov 27 10:00:01 victim-host cron[5]: forged-3164-token",
        &to,
    )
    .unwrap();
    let mut t = tcp_from("127.77.0.8", s.tcp);
    t.write_all(b"<13>1 2026-11-27T10:00:02.000Z web01 app - - - forged-tcp-token\n")
        .unwrap();
    drop(t);

    let (host, line) = wait_line(b, "forged-5424-token");
    assert_eq!(host, "ip-127-77-0-7", "{line}");
    assert_eq!(
        line,
        "2026-11-27T10:00:00.000Z ip-127-77-0-7 sshd[812] auth.info claimed-host=web01 forged-5424-token"
    );
    let (host, line) = wait_line(b, "forged-3164-token");
    assert_eq!(host, "ip-127-77-0-7");
    assert!(
        line.contains(
            " ip-127-77-0-7 cron[5] user.notice claimed-host=victim-host forged-3164-token"
        ),
        "{line}"
    );
    let (host, line) = wait_line(b, "forged-tcp-token");
    assert_eq!(host, "ip-127-77-0-8");
    assert!(
        line.contains(" claimed-host=web01 forged-tcp-token"),
        "{line}"
    );
    for (host, line) in stored(b) {
        assert!(
            host.starts_with("ip-127-77-0-") || !line.contains("forged-"),
            "a forged line under {host}: {line}"
        );
    }
    assert!(!store_dir(b).join("victim-host").exists());
    // `bastide logs --host web01` shows none of it.
    let out = b.cli_ok(&[
        "logs", "--host", "web01", "--grep", "forged", "--since", "3650d",
    ]);
    assert_eq!(out, "", "{out}");
}

/// Issue 16, point 6: senders that are not agents create at most `max_unknown_hosts` host
/// directories. With 2, senders on 127.77.1.1 and 127.77.1.2 are stored; a third one's lines
/// (UDP and TCP) are refused and counted one by one, the first two still get through, and
/// no third directory appears.
#[test]
fn syslog_caps_the_host_directories_of_senders_that_are_not_agents() {
    let s = bastion_with("max_unknown_hosts = 2", "");
    let b = &s.b;
    let to = format!("127.0.0.1:{}", s.udp);
    for (i, src) in ["127.77.1.1", "127.77.1.2"].iter().enumerate() {
        udp_from(src)
            .send_to(
                format!("<13>1 - h{i} app - - - admitted-{i}").as_bytes(),
                &to,
            )
            .unwrap();
        let (host, _) = wait_line(b, &format!("admitted-{i}"));
        assert_eq!(host, format!("ip-127-77-1-{}", i + 1));
    }
    let series = "bastide_syslog_unknown_host_refused_total";
    assert_eq!(metric(b, series), 0.0);
    let third = udp_from("127.77.1.3");
    for i in 0..5 {
        third
            .send_to(format!("<13>1 - h3 app - - - refused-{i}").as_bytes(), &to)
            .unwrap();
    }
    let mut t = tcp_from("127.77.1.3", s.tcp);
    t.write_all(b"<13>1 - h3 app - - - refused-tcp-0\n<13>1 - h3 app - - - refused-tcp-1\n<13>1 - h3 app - - - refused-tcp-2\n")
        .unwrap();
    drop(t);
    let got = wait_for(Duration::from_secs(10), || {
        (metric(b, series) == 8.0).then_some(())
    });
    assert!(
        got.is_some(),
        "{series} = {} (want 8: 5 datagrams, 3 TCP lines)\n{}",
        metric(b, series),
        b.log_text()
    );
    assert!(
        b.log_text()
            .contains("max_unknown_hosts host directories exist"),
        "{}",
        b.log_text()
    );
    // The admitted senders still get through.
    udp_from("127.77.1.1")
        .send_to(b"<13>1 - h0 app - - - still-admitted", &to)
        .unwrap();
    let (host, _) = wait_line(b, "still-admitted");
    assert_eq!(host, "ip-127-77-1-1");
    assert!(stored(b).iter().all(|(_, l)| !l.contains("refused-")));
    assert!(!store_dir(b).join("ip-127-77-1-3").exists());
    assert_eq!(metric(b, "bastide_syslog_unknown_hosts"), 2.0);
    assert_eq!(metric(b, series), 8.0);
}
