//! DNS: the `[dns]` service of the real `bastide` binary queried with `dig` (and raw
//! sockets where dig cannot do it: thousands of simultaneous queries, garbage), forwarding to
//! a real unbound started on another loopback port with a fixture zone.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bastide_tests::{free_port, require, tcp_from, wait_for, Agent, Bastion};

fn dig_bin() -> PathBuf {
    require("dig", "dnsutils")
}

/// Runs dig against the bastion; its whole output.
fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new(dig_bin())
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=3"])
        .args(args)
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

fn flags(out: &str) -> Vec<String> {
    out.lines()
        .find(|l| l.starts_with(";; flags:"))
        .map(|l| {
            l.trim_start_matches(";; flags:")
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Records of a dig answer (`+noall +answer` output), as (name, ttl, type, data).
fn answers(port: u16, args: &[&str]) -> Vec<(String, u32, String, String)> {
    let mut a = vec!["+noall", "+answer"];
    a.extend_from_slice(args);
    dig(port, &a)
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5).then(|| {
                (
                    f[0].to_string(),
                    f[1].parse().unwrap_or(0),
                    f[3].to_string(),
                    f[4..].join(" "),
                )
            })
        })
        .collect()
}

/// A DNS query on the wire.
fn raw_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.trim_end_matches('.').split('.') {
        b.push(l.len() as u8);
        b.extend_from_slice(l.as_bytes());
    }
    b.push(0);
    b.extend_from_slice(&qtype.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b
}

/// (id, rcode, tc, answer count) of a response.
fn raw_parse(b: &[u8]) -> (u16, u8, bool, u16) {
    (
        u16::from_be_bytes([b[0], b[1]]),
        b[3] & 0x0f,
        b[2] & 0x02 != 0,
        u16::from_be_bytes([b[6], b[7]]),
    )
}

/// Sends every query from one UDP socket at once (a reader thread drains responses as they
/// come) and returns the responses received within `wait`.
fn blast(port: u16, queries: Vec<Vec<u8>>, wait: Duration) -> Vec<Vec<u8>> {
    blast_with_retries(port, queries, wait, 0)
}

/// Like [`blast`], then, like a stub resolver, sends again the queries still unanswered after
/// `wait`, up to `retries` times: the kernel's socket buffers (rmem_max) may drop part of a
/// burst of a thousand datagrams before any server reads them.
fn blast_with_retries(
    port: u16,
    queries: Vec<Vec<u8>>,
    wait: Duration,
    retries: usize,
) -> Vec<Vec<u8>> {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    sock.connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got: std::collections::BTreeMap<u16, Vec<u8>> = Default::default();
    let mut todo: Vec<&Vec<u8>> = queries.iter().collect();
    for _ in 0..=retries {
        let n = todo.len();
        let reader = {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let start = Instant::now();
                let mut buf = [0u8; 4096];
                while got.len() < n && start.elapsed() < wait {
                    if let Ok(k) = sock.recv(&mut buf) {
                        got.push(buf[..k].to_vec());
                    }
                }
                got
            })
        };
        for q in &todo {
            sock.send(q).unwrap();
        }
        for r in reader.join().unwrap() {
            got.insert(raw_parse(&r).0, r);
        }
        todo.retain(|q| !got.contains_key(&u16::from_be_bytes([q[0], q[1]])));
        if todo.is_empty() {
            break;
        }
    }
    got.into_values().collect()
}

const A: u16 = 1;

/// A real upstream: unbound serving the fixture zone `fwd.test.` on a free loopback port,
/// logging every query it gets.
struct Upstream {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Upstream {
    fn start() -> Self {
        let unbound = require("unbound", "unbound");
        let dir = tempfile::Builder::new()
            .prefix("bastide-unbound-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let d = dir.path().display();
        let mut conf = format!(
            r#"server:
  interface: 127.0.0.1@{port}
  port: {port}
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "{d}"
  pidfile: ""
  use-syslog: no
  logfile: "{d}/unbound.log"
  log-queries: yes
  verbosity: 0
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  local-zone: "fwd.test." static
  local-data: "fwd.test. 300 IN SOA ns.fwd.test. hostmaster.fwd.test. 1 3600 600 86400 3"
  local-data: "www.fwd.test. 300 IN A 192.0.2.10"
  local-data: "one.fwd.test. 300 IN A 192.0.2.11"
"#
        );
        for i in 1..=100 {
            conf.push_str(&format!(
                "  local-data: \"big.fwd.test. 300 IN A 198.51.100.{i}\"\n"
            ));
        }
        for i in 0..200 {
            conf.push_str(&format!(
                "  local-data: \"m{i}.fwd.test. 300 IN A 203.0.113.{}\"\n",
                i % 250
            ));
        }
        conf.push_str("remote-control:\n  control-enable: no\n");
        let path = dir.path().join("unbound.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(unbound)
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let u = Self {
            dir,
            port,
            child: Some(child),
        };
        let up = wait_for(Duration::from_secs(10), || {
            let out = Command::new(dig_bin())
                .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+time=1"])
                .args(["fwd.test", "SOA"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("ns.fwd.test.")
                .then_some(())
        });
        assert!(up.is_some(), "unbound did not start: {}", u.log());
        u
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("unbound.log")).unwrap_or_default()
    }

    /// How many queries for `name` (absolute) and type A the upstream received.
    fn count(&self, name: &str, qtype: &str) -> usize {
        let pat = format!(" {name} {qtype} IN");
        self.log().lines().filter(|l| l.ends_with(&pat)).count()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A bastion with `[dns]` on a free port; `extra` goes into the table.
fn bastion_with_dns(extra: &str) -> (Bastion, u16) {
    require("dig", "dnsutils");
    let mut b = Bastion::init("proj");
    let port = free_port();
    b.edit_config(|c| {
        format!(
            "{c}\n[dns]\nlisten = [\"127.0.0.1:{port}\"]\nallow = [\"127.0.0.1/32\"]\n{extra}\n"
        )
    });
    b.start();
    let ready = wait_for(Duration::from_secs(10), || {
        (status(&dig(port, &["proj.test", "SOA"])) == "NOERROR").then_some(())
    });
    assert!(ready.is_some(), "dns not answering:\n{}", b.log_text());
    (b, port)
}

#[test]
fn zone_follows_the_registry_and_protocol_edges() {
    let big = "x".repeat(2000);
    let medium = "m".repeat(600);
    let (b, port) = bastion_with_dns(&format!(
        r#"reverse_zones = ["127.in-addr.arpa."]
rate_limit = 50
ttl = "30s"
[[dns.records]]
name = "www"
type = "CNAME"
value = "web01"
[[dns.records]]
name = "printer"
type = "A"
value = "10.0.0.9"
[[dns.records]]
name = "v6host"
type = "AAAA"
value = "fd00::9"
[[dns.records]]
name = "@"
type = "MX"
value = "10 mail"
[[dns.records]]
name = "_sip._tcp"
type = "SRV"
value = "10 5 5060 printer"
[[dns.records]]
name = "info"
type = "TXT"
value = "hello world"
[[dns.records]]
name = "big"
type = "TXT"
value = "{big}"
[[dns.records]]
name = "medium"
type = "TXT"
value = "{medium}"
"#
    ));

    // Before enrollment the name does not exist: NXDOMAIN with the zone's SOA, authoritative.
    let out = dig(port, &["web01.proj.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(flags(&out).contains(&"aa".to_string()), "{out}");
    assert!(
        out.contains("IN\tSOA\tbastion.proj.test. hostmaster.proj.test."),
        "{out}"
    );

    // Enroll and run an agent: its name answers within 1 s of its registration.
    let mut a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    a.start();
    let registered = wait_for(Duration::from_secs(15), || {
        b.agent("web01")
            .filter(|i| i["addresses"].as_array().is_some_and(|v| !v.is_empty()))
            .map(|_| Instant::now())
    })
    .unwrap_or_else(|| panic!("agent never registered: {}", a.log_text()));
    let answered = wait_for(Duration::from_secs(1), || {
        let r = answers(port, &["web01.proj.test", "A"]);
        (r.len() == 1 && r[0].3 == a.ip).then(Instant::now)
    });
    let answered = answered.expect("web01's A record did not appear within 1 s");
    assert!(answered.duration_since(registered) < Duration::from_secs(1));
    assert_eq!(
        answers(port, &["web01.proj.test", "A"])[0].1,
        30,
        "zone ttl"
    );

    // Case of the question preserved, PTR from the reverse zone.
    let out = dig(port, &["WeB01.PrOj.TeSt", "A"]);
    assert!(out.contains(";WeB01.PrOj.TeSt.\t"), "{out}");
    let ptr = answers(port, &["-x", &a.ip]);
    assert_eq!(ptr[0].3, "web01.proj.test.", "{ptr:?}");

    // Static records.
    let www = answers(port, &["www.proj.test", "A"]);
    assert_eq!(www.len(), 2, "{www:?}");
    assert_eq!(www[0].2, "CNAME");
    assert_eq!(www[1].3, a.ip);
    assert_eq!(answers(port, &["printer.proj.test", "A"])[0].3, "10.0.0.9");
    assert_eq!(answers(port, &["v6host.proj.test", "AAAA"])[0].3, "fd00::9");
    assert_eq!(
        answers(port, &["proj.test", "MX"])[0].3,
        "10 mail.proj.test."
    );
    assert_eq!(
        answers(port, &["_sip._tcp.proj.test", "SRV"])[0].3,
        "10 5 5060 printer.proj.test."
    );
    assert_eq!(
        answers(port, &["info.proj.test", "TXT"])[0].3,
        "\"hello world\""
    );
    assert_eq!(
        answers(port, &["proj.test", "NS"])[0].3,
        "bastion.proj.test."
    );
    assert_eq!(
        answers(port, &["bastion.proj.test", "A"])[0].3,
        "127.0.0.1",
        "the name server's own address"
    );
    // An empty non-terminal is NODATA; a missing name NXDOMAIN; never forwarded.
    assert_eq!(status(&dig(port, &["_tcp.proj.test", "A"])), "NOERROR");
    assert_eq!(status(&dig(port, &["nope.proj.test", "A"])), "NXDOMAIN");

    // TXT over 1232 bytes: TC over UDP even with +bufsize=4096, whole over TCP.
    let out = dig(port, &["+bufsize=4096", "+ignore", "big.proj.test", "TXT"]);
    assert!(flags(&out).contains(&"tc".to_string()), "{out}");
    let out = dig(port, &["+tcp", "big.proj.test", "TXT"]);
    assert!(!flags(&out).contains(&"tc".to_string()), "{out}");
    assert_eq!(out.matches('x').count(), 2000, "{out}");
    // 600 bytes: whole with EDNS, TC without (512).
    let out = dig(port, &["+ignore", "medium.proj.test", "TXT"]);
    assert!(!flags(&out).contains(&"tc".to_string()), "{out}");
    assert!(
        out.contains("udp: 1232"),
        "server payload advertised: {out}"
    );
    let out = dig(port, &["+noedns", "+ignore", "medium.proj.test", "TXT"]);
    assert!(flags(&out).contains(&"tc".to_string()), "{out}");

    // EDNS version 1 gets BADVERS; ANY a minimal answer.
    let out = dig(port, &["+edns=1", "+noednsneg", "web01.proj.test", "A"]);
    assert_eq!(status(&out), "BADVERS", "{out}");
    let any = answers(port, &["proj.test", "ANY"]);
    assert_eq!(any.len(), 1, "{any:?}");

    // Several queries on one TCP connection (+keepopen).
    let out = dig(
        port,
        &[
            "+tcp",
            "+keepopen",
            "web01.proj.test",
            "printer.proj.test",
            "info.proj.test",
            "TXT",
            "proj.test",
            "SOA",
        ],
    );
    assert_eq!(out.matches("status: NOERROR").count(), 4, "{out}");
    // Pipelined: 20 queries written at once, 20 answers on the same connection.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut batch = Vec::new();
    for i in 0..20u16 {
        let q = raw_query(i, "web01.proj.test", A);
        batch.extend_from_slice(&(q.len() as u16).to_be_bytes());
        batch.extend_from_slice(&q);
    }
    s.write_all(&batch).unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut m).unwrap();
        let (id, rcode, _, an) = raw_parse(&m);
        assert_eq!((rcode, an), (0, 1));
        ids.push(id);
    }
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());

    // A client outside the allowed networks is REFUSED.
    let out = dig(port, &["-b", "127.0.0.2", "web01.proj.test", "A"]);
    assert_eq!(status(&out), "REFUSED", "{out}");

    // Garbage does not stop service for others; a parseable header gets FORMERR.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.connect(("127.0.0.1", port)).unwrap();
    for i in 0..500u32 {
        let len = (i % 700) as usize;
        let pkt: Vec<u8> = (0..len)
            .map(|j| (i.wrapping_mul(2654435761).wrapping_add(j as u32 * 40503) >> 7) as u8)
            .map(|x| x & 0x7f) // QR clear: looks like a query
            .collect();
        junk.send(&pkt).unwrap();
    }
    junk.send(&[
        0xbe, 0xef, 0x01, 0x00, 0x00, 0x09, 0xff, 0xff, 0, 0, 0, 0, 1, 2,
    ])
    .unwrap();
    // The garbage came from our own address, so its FORMERRs drew on our response-rate
    // bucket: allow it to refill (50/s) rather than race it.
    let r = wait_for(Duration::from_secs(5), || {
        let r = answers(port, &["web01.proj.test", "A"]);
        (!r.is_empty()).then_some(r)
    })
    .expect("service answers after garbage");
    assert_eq!(r[0].3, a.ip);

    // Revocation: NXDOMAIN within 1 s.
    b.cli_ok(&["agents", "revoke", "web01"]);
    let gone = wait_for(Duration::from_secs(1), || {
        (status(&dig(port, &["web01.proj.test", "A"])) == "NXDOMAIN").then_some(())
    });
    assert!(gone.is_some(), "web01 still answers after revocation");
    assert!(answers(port, &["-x", &a.ip]).is_empty());

    // Rate limit (50/s, burst 100): a flood from one client gets far fewer answers.
    let qs = (0..600u16)
        .map(|i| raw_query(i, "printer.proj.test", A))
        .collect();
    let got = blast(port, qs, Duration::from_secs(2));
    let full = got.iter().filter(|r| !raw_parse(r).2).count();
    assert!(
        full > 0 && full <= 150,
        "{full} full answers to a 600-query flood"
    );
    assert!(b.log_text().contains("dns ready"));
}

#[test]
fn forwarding_cache_coalescing_and_upstream_failures() {
    let mut up = Upstream::start();
    // The first upstream is dead (nothing listens): every query fails over to unbound.
    let dead = free_port();
    let (b, port) = bastion_with_dns(&format!(
        "upstreams = [\"127.0.0.1:{dead}\", \"127.0.0.1:{}\"]\nrate_limit = 0\nserve_stale = \"0s\"\nupstream_timeout = \"1s\"",
        up.port
    ));

    // Forwarded and answered, RA set, not authoritative.
    let out = dig(port, &["www.fwd.test", "A"]);
    assert_eq!(status(&out), "NOERROR", "{out}\n{}", b.log_text());
    assert!(out.contains("192.0.2.10"), "{out}");
    let f = flags(&out);
    assert!(f.contains(&"ra".to_string()) && !f.contains(&"aa".to_string()));
    assert_eq!(up.count("www.fwd.test.", "A"), 1);

    // A large answer: the upstream's is truncated (our EDNS 1232), refetched over TCP; to our
    // client it is TC over UDP and whole over TCP.
    let out = dig(port, &["+bufsize=4096", "+ignore", "big.fwd.test", "A"]);
    assert!(flags(&out).contains(&"tc".to_string()), "{out}");
    assert_eq!(answers(port, &["+tcp", "big.fwd.test", "A"]).len(), 100);

    // 1,000 simultaneous queries for one uncached name: one upstream query.
    let qs = (0..1000u16)
        .map(|i| raw_query(i, "one.fwd.test", A))
        .collect();
    let got = blast_with_retries(port, qs, Duration::from_secs(2), 5);
    assert_eq!(got.len(), 1000);
    assert!(got.iter().all(|r| {
        let (_, rc, tc, an) = raw_parse(r);
        rc == 0 && !tc && an == 1
    }));
    let mut ids: Vec<u16> = got.iter().map(|r| raw_parse(r).0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000);
    assert_eq!(up.count("one.fwd.test.", "A"), 1, "{}", up.log());

    // 200 concurrent misses for different names: every one answered.
    let qs = (0..200u16)
        .map(|i| raw_query(i, &format!("m{i}.fwd.test"), A))
        .collect();
    let got = blast_with_retries(port, qs, Duration::from_secs(2), 5);
    assert_eq!(got.len(), 200);
    for r in &got {
        let (_, rc, _, an) = raw_parse(r);
        assert_eq!((rc, an), (0, 1));
    }

    // Other types are forwarded too, over TCP as well.
    let out = dig(port, &["+tcp", "fwd.test", "SOA"]);
    assert_eq!(status(&out), "NOERROR", "{out}");

    // NXDOMAIN from upstream, cached for its negative TTL (SOA minimum 3 s).
    let first = Instant::now();
    let out = dig(port, &["nx1.fwd.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(out.contains("IN\tSOA\tns.fwd.test."), "SOA kept: {out}");
    assert_eq!(status(&dig(port, &["nx1.fwd.test", "A"])), "NXDOMAIN");
    assert_eq!(up.count("nx1.fwd.test.", "A"), 1);

    // Upstream stopped: cached answers are still served until their TTL.
    up.stop();
    let out = dig(port, &["www.fwd.test", "A"]);
    assert!(out.contains("192.0.2.10"), "{out}");
    let ttl = answers(port, &["www.fwd.test", "A"])[0].1;
    assert!(ttl <= 300 && ttl > 250, "{ttl}");
    if first.elapsed() < Duration::from_millis(2500) {
        assert_eq!(status(&dig(port, &["nx1.fwd.test", "A"])), "NXDOMAIN");
    }
    // After the negative TTL the answer is gone: with no upstream left, SERVFAIL.
    std::thread::sleep(Duration::from_millis(3300).saturating_sub(first.elapsed()));
    let out = dig(port, &["nx1.fwd.test", "A"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    // And a SERVFAIL is cached briefly, not forwarded again for every query.
    assert_eq!(status(&dig(port, &["nx1.fwd.test", "A"])), "SERVFAIL");
}

/// The attacker is root on an enrolled VM and advertises the bastion's own 127.0.0.1, the
/// cloud metadata service's 169.254.169.254 and 10.99.0.5 (outside the agent networks): the
/// zone publishes none of them, forward or reverse, while an honest agent registered after
/// it has its record.
#[test]
fn claims_the_address_policy_refuses_get_no_record() {
    let (b, port) = bastion_with_dns(
        r#"reverse_zones = ["127.in-addr.arpa.", "254.169.in-addr.arpa.", "10.in-addr.arpa."]"#,
    );
    let mut evil = Agent::new("evil");
    evil.set_addresses(
        &["127.0.0.1", "169.254.169.254", "10.99.0.5"],
        Some(&evil.ip),
    );
    evil.enroll_ok(&b, &b.token(&[]));
    evil.start();
    let info = wait_for(Duration::from_secs(20), || {
        b.agent("evil").filter(|i| {
            i["state"] == "online" && i["claimed"].as_array().is_some_and(|v| v.len() == 3)
        })
    })
    .unwrap_or_else(|| panic!("evil not registered: {}", evil.log_text()));
    assert_eq!(info["addresses"], serde_json::json!([]), "{info}");
    let refused = info["refused"].to_string();
    for why in [
        "127.0.0.1: an address of the bastion itself",
        "169.254.169.254: link-local address",
        "10.99.0.5: outside agents.networks",
    ] {
        assert!(refused.contains(why), "{why}: {info}");
    }
    let mut honest = Agent::new("honest");
    honest.enroll_ok(&b, &b.token(&[]));
    honest.start();
    let ok = wait_for(Duration::from_secs(20), || {
        let r = answers(port, &["honest.proj.test", "A"]);
        (r.len() == 1 && r[0].3 == honest.ip).then_some(())
    });
    assert!(ok.is_some(), "{}", honest.log_text());
    assert!(answers(port, &["evil.proj.test", "A"]).is_empty());
    for ip in ["127.0.0.1", "169.254.169.254", "10.99.0.5"] {
        let ptr = answers(port, &["-x", ip]);
        assert!(ptr.is_empty(), "PTR for {ip}: {ptr:?}");
    }
}

/// Sends `drip` one byte a second (nothing when empty) until the server closes the
/// connection (end of stream or reset) or `within` passes; how long the server took.
fn closed_within(s: &mut TcpStream, drip: &[u8], within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut next = 0;
    let mut buf = [0u8; 512];
    while t0.elapsed() < within {
        if next < drip.len() {
            if s.write_all(&drip[next..next + 1]).is_err() {
                return Some(t0.elapsed());
            }
            next += 1;
        }
        let left = within.saturating_sub(t0.elapsed());
        let wait = left
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(wait)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

/// Issue 16, point 8: DNS over TCP checks the allow-list when it accepts, before reading
/// anything and before taking a connection slot, and closes a connection `tcp_idle_timeout`
/// after its last complete query whatever trickles in meanwhile: clients outside the list or
/// dripping a query one byte a second cannot hold the `max_tcp_connections` slots, and
/// `dig +tcp` gets through.
#[test]
fn tcp_strangers_and_slow_drip_clients_cannot_hold_slots() {
    let (b, port) = bastion_with_dns("max_tcp_connections = 2\ntcp_idle_timeout = \"2s\"\n");
    // allow = 127.0.0.1/32: five clients from 127.0.0.2, kept open by the test.
    let mut strangers: Vec<TcpStream> = (0..5).map(|_| tcp_from("127.0.0.2", port)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = dig(port, &["+tcp", "proj.test", "SOA"]);
    assert_eq!(
        status(&out),
        "NOERROR",
        "strangers took the slots: {out}\n{}",
        b.log_text()
    );
    for (i, s) in strangers.iter_mut().enumerate() {
        let t = closed_within(s, &[], Duration::from_secs(1));
        assert!(
            t.is_some(),
            "stranger {i} not closed at accept:\n{}",
            b.log_text()
        );
    }

    // Two allowed clients drip a query one byte a second (it would take 29 s to complete).
    let q = raw_query(7, "proj.test", 6);
    let mut frame = (q.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&q);
    let drips: Vec<_> = (0..2)
        .map(|_| {
            let mut s = tcp_from("127.0.0.1", port);
            let frame = frame.clone();
            std::thread::spawn(move || closed_within(&mut s, &frame, Duration::from_secs(8)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile the bound holds: a third connection is turned away.
    let mut third = tcp_from("127.0.0.1", port);
    assert!(
        closed_within(&mut third, &[], Duration::from_secs(1)).is_some(),
        "a third connection was served past max_tcp_connections = 2"
    );
    for d in drips {
        let t = d.join().unwrap();
        assert!(
            t.is_some_and(|t| t < Duration::from_millis(3500)),
            "a slow-drip client held its slot for {t:?} (tcp_idle_timeout = 2s)\n{}",
            b.log_text()
        );
    }
    let out = dig(port, &["+tcp", "proj.test", "SOA"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
}
