//! Two bastions of one project sharing their registry in one throwaway PostgreSQL cluster
//! (issue 17): changes spread between the nodes within a second (LISTEN/NOTIFY), a token is
//! single-use across nodes, agents fail over when their node is killed, and the nodes keep
//! serving through a database outage. The tests of this file share one PostgreSQL cluster
//! (one database each), except the outage test, which stops its own.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bastide_tests::{free_port, require, wait_for, Agent, Bastion, Postgres};

/// The cluster the tests running at the same time share (started by the first, stopped
/// when the last one is done with it).
fn shared_pg() -> Arc<Postgres> {
    static PG: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
    let mut g = PG.lock().unwrap();
    if let Some(pg) = g.upgrade() {
        return pg;
    }
    let pg = Arc::new(Postgres::start());
    *g = Arc::downgrade(&pg);
    pg
}

fn dig(port: u16, name: &str) -> String {
    let out = Command::new(require("dig", "dnsutils"))
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=2"])
        .args(["+short", name, "A"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A node of project "proj" on database `db`, named `node`, with DNS on a free port.
struct Node {
    b: Bastion,
    dns: u16,
}

fn configure(b: &Bastion, pg: &Postgres, db: &str, node: &str, store_extra: &str) -> u16 {
    let dns = free_port();
    b.edit_config(|c| {
        let c = c
            .replace(
                "heartbeat_interval = \"10s\"",
                "heartbeat_interval = \"1s\"",
            )
            .replace("heartbeat_timeout = \"35s\"", "heartbeat_timeout = \"5s\"");
        format!("{c}\n[dns]\nlisten = [\"127.0.0.1:{dns}\"]\nallow = [\"127.0.0.1/32\"]\n")
    });
    b.set_postgres_store(pg, db, "postgres");
    // [store] is the last table: its keys go at the end.
    b.edit_config(|c| format!("{c}node = {node:?}\n{store_extra}"));
    dns
}

/// Node "a" (started), and node "b" made from its identity (started); `extra` configures
/// each before its start.
fn two_nodes_with<T>(
    pg: &Postgres,
    db: &str,
    store_extra: &str,
    extra: impl Fn(&Bastion) -> T,
) -> ((Node, T), (Node, T)) {
    let mut a = Bastion::init("proj");
    let dns_a = configure(&a, pg, db, "a", store_extra);
    let xa = extra(&a);
    a.start();
    let bundle = a.dir.path().join("identity.json");
    a.cli_ok(&["export-identity", "--out", &bundle.display().to_string()]);
    let mut b = Bastion::join(&bundle);
    let dns_b = configure(&b, pg, db, "b", store_extra);
    let xb = extra(&b);
    b.start();
    (
        (Node { b: a, dns: dns_a }, xa),
        (Node { b, dns: dns_b }, xb),
    )
}

fn two_nodes(pg: &Postgres, db: &str, store_extra: &str) -> (Node, Node) {
    let ((a, ()), (b, ())) = two_nodes_with(pg, db, store_extra, |_| ());
    (a, b)
}

fn node_of(b: &Bastion, agent: &str) -> String {
    b.agent(agent)
        .map(|a| {
            format!(
                "{}@{}",
                a["state"].as_str().unwrap_or(""),
                a["node"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_default()
}

#[test]
fn changes_spread_between_two_bastions_within_a_second() {
    let started = Instant::now();
    let pg = shared_pg();
    println!("{:?}: postgres up", started.elapsed());
    let db = pg.create_db("ha_spread");
    let (a, b) = two_nodes(&pg, &db, "");
    println!("{:?}: two nodes up", started.elapsed());

    // Enrolled and registered on A: B answers for it in DNS.
    let mut web01 = Agent::new("web01");
    web01.enroll_ok(&a.b, &a.b.token(&[]));
    web01.start();
    assert!(
        a.b.wait_state("web01", "online", Duration::from_secs(10)),
        "{}",
        web01.log_text()
    );
    let t = Instant::now();
    let seen = wait_for(Duration::from_secs(5), || {
        (dig(b.dns, "web01.proj.test") == web01.ip).then(|| t.elapsed())
    });
    let seen = seen.unwrap_or_else(|| panic!("B never resolved web01:\n{}", b.b.log_text()));
    println!("enrolled on A, resolved on B after {seen:?}");
    assert!(seen < Duration::from_secs(1), "{seen:?}");
    assert_eq!(dig(a.dns, "web01.proj.test"), web01.ip);

    // `agents list` on either node says which node holds the session.
    assert!(
        wait_for(Duration::from_secs(2), || (node_of(&b.b, "web01")
            == "online@a")
            .then_some(()))
        .is_some(),
        "{:?}",
        b.b.agent("web01")
    );
    assert_eq!(node_of(&a.b, "web01"), "online@a");
    assert_eq!(
        pg.psql(&db, "SELECT node FROM sessions WHERE agent = 'web01'"),
        "a"
    );

    // Revoked on B: A cuts the agent's live session within a second.
    let t = Instant::now();
    b.b.cli_ok(&["agents", "revoke", "web01"]);
    let cut = wait_for(Duration::from_secs(5), || {
        a.b.log_text()
            .contains("agent's connections cut: revoked or replaced on another bastion")
            .then(|| t.elapsed())
    });
    let cut = cut.unwrap_or_else(|| panic!("A never cut web01:\n{}", a.b.log_text()));
    println!("revoked on B, cut on A after {cut:?} (revoke command included)");
    assert!(cut < Duration::from_secs(1), "{cut:?}");
    let st = web01.wait_exit(Duration::from_secs(15));
    assert_eq!(st.and_then(|s| s.code()), Some(3), "{}", web01.log_text());
    assert_eq!(a.b.agent("web01").unwrap()["state"], "revoked");
    assert!(
        wait_for(Duration::from_secs(2), || dig(a.dns, "web01.proj.test")
            .is_empty()
            .then_some(()))
        .is_some(),
        "a revoked agent leaves the zone of every node"
    );

    println!("{:?}: revocation done", started.elapsed());
    // One single-use token, twenty enrollments spread over both nodes: one certificate.
    let race = a.b.token(&[]);
    let agents: Vec<Agent> = (0..20).map(|i| Agent::new(&format!("p{i:02}"))).collect();
    let children: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, ag)| {
            let node = if i % 2 == 0 { &a.b } else { &b.b };
            ag.enroll_cmd(node, &race, &[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let wins = children
        .into_iter()
        .map(|mut c| c.wait().unwrap())
        .filter(|s| s.success())
        .count();
    assert_eq!(wins, 1);
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM agents WHERE name LIKE 'p%'"),
        "1"
    );
    // Both nodes know the winner.
    for n in [&a.b, &b.b] {
        assert!(wait_for(Duration::from_secs(2), || {
            (n.agents()
                .iter()
                .filter(|x| x["name"].as_str().unwrap_or("").starts_with('p'))
                .count()
                == 1)
                .then_some(())
        })
        .is_some());
    }

    println!("{:?}: token race done", started.elapsed());
    // One leader among the two.
    let leaders: usize = [&a.b, &b.b]
        .iter()
        .filter(|n| {
            let s: serde_json::Value =
                serde_json::from_str(&n.cli_ok(&["status", "--json"])).unwrap();
            s["cluster"]["leader"] == true
        })
        .count();
    assert_eq!(leaders, 1);
    println!("test wall time {:?}", started.elapsed());
}

/// A fresh Ed25519 key pair at `path` (and `path.pub`); the public key.
fn new_key(path: &std::path::Path) -> String {
    let o = Command::new(require("ssh-keygen", "openssh-client"))
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success());
    std::fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// The target's sshd on `ip` (its agent's own address) with `host_key`, admitting `key`.
fn sshd(
    dir: &std::path::Path,
    ip: &str,
    host_key: &std::path::Path,
    key: &str,
) -> (std::process::Child, u16) {
    let bin = require("sshd", "openssh-server");
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = free_port();
    let ak = dir.join("authorized_keys");
    std::fs::write(&ak, format!("{key}\n")).unwrap();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress {ip}:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n",
            host_key.display(),
            ak.display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || std::net::TcpStream::connect((
            ip, port
        ))
        .ok())
        .is_some(),
        "sshd did not start"
    );
    (child, port)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Numbers stored for `host` by either node's log store, with their counts.
fn stored_both(stores: &[&std::path::Path], host: &str) -> std::collections::BTreeMap<u64, u32> {
    let mut m = std::collections::BTreeMap::new();
    for s in stores {
        for (n, c) in bastide_tests::stored_numbers(s, host) {
            *m.entry(n).or_insert(0) += c;
        }
    }
    m
}

#[test]
fn agents_fail_over_when_their_bastion_is_killed() {
    const N: usize = 20;
    let started = Instant::now();
    require("ssh", "openssh-client");
    let pg = shared_pg();
    let db = pg.create_db("ha_failover");
    let keys = tempfile::Builder::new()
        .prefix("bastide-ha-")
        .tempdir()
        .unwrap();
    let alice = keys.path().join("alice");
    let alice_pub = new_key(&alice);
    // N agents, to enroll on A, knowing B too; f00 is an SSH target.
    let mut agents: Vec<Agent> = (0..N).map(|i| Agent::new(&format!("f{i:02}"))).collect();
    let mut apps = Vec::new();
    let host_key = agents[0].dir.path().join("ssh/ssh_host_ed25519_key");
    new_key(&host_key);
    let (sshd_child, sshd_port) = sshd(keys.path(), &agents[0].ip, &host_key, &alice_pub);
    let _sshd = KillOnDrop(sshd_child);
    let ((mut a, (ssh_a, logs_a)), (b, (ssh_b, logs_b))) = two_nodes_with(
        &pg,
        &db,
        "",
        |n: &Bastion| {
            let logs = n.enable_log_store(None, "");
            let ssh = free_port();
            n.edit_config(|c| {
                // [store] stays last (configure appends to it).
                let (head, store) = c.split_at(c.find("\n[store]\n").unwrap());
                format!(
                    "{head}\n[ssh]\nlisten = \"127.0.0.1:{ssh}\"\npublic_host = \"127.0.0.1\"\n\n[[ssh.admins]]\nname = \"alice\"\nkeys = [\"{alice_pub}\"]\n\n[[ssh.rules]]\nadmins = [\"alice\"]\nagents = [\"*\"]\nports = [{sshd_port}]\ncidrs = [\"127.0.0.0/8\"]\n{store}"
                )
            });
            (ssh, logs)
        },
    );
    println!("{:?}: two nodes up", started.elapsed());
    let token = a.b.token(&["--uses", &N.to_string()]);
    for ag in agents.iter_mut() {
        apps.push(ag.follow_logs(""));
        let out = ag
            .enroll_cmd(&a.b, &token, &["--bastion", &b.b.agents_addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ag.start();
    }
    let all_on = |n: &Bastion, node: &str| {
        n.agents()
            .iter()
            .filter(|x| x["state"] == "online" && x["node"] == node)
            .count()
            == N
    };
    assert!(
        wait_for(Duration::from_secs(30), || all_on(&a.b, "a").then_some(())).is_some(),
        "{:?}",
        a.b.agents()
    );
    println!("{:?}: {N} agents online on A", started.elapsed());

    // Lines before the kill: the first half stored and acknowledged, the second maybe in
    // flight when A dies.
    for app in &apps {
        bastide_tests::write_numbered(&app.join("app.log"), 0, 200, 200, Duration::ZERO, |_| {});
    }
    assert!(
        wait_for(Duration::from_secs(30), || agents
            .iter()
            .all(|ag| stored_both(&[&logs_a], &ag.name).len() == 200)
            .then_some(()))
        .is_some(),
        "logs before the kill not stored on A"
    );
    for app in &apps {
        bastide_tests::write_numbered(&app.join("app.log"), 200, 300, 100, Duration::ZERO, |_| {});
    }
    let t = Instant::now();
    a.b.kill();
    let moved = wait_for(Duration::from_secs(30), || {
        all_on(&b.b, "b").then(|| t.elapsed())
    });
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "not all agents moved to B: {:?}\n{}",
            b.b.agents(),
            agents[0].log_text()
        )
    });
    println!("kill -9 of A: {N} agents online on B after {moved:?}");
    for app in &apps {
        bastide_tests::write_numbered(&app.join("app.log"), 300, 400, 100, Duration::ZERO, |_| {});
    }

    // Every line stored, on one node or the other; duplicates (lines A stored but had not
    // acknowledged) counted.
    let complete = wait_for(Duration::from_secs(30), || {
        agents
            .iter()
            .all(|ag| stored_both(&[&logs_a, &logs_b], &ag.name).len() == 400)
            .then_some(())
    });
    let dups: u32 = agents
        .iter()
        .map(|ag| {
            stored_both(&[&logs_a, &logs_b], &ag.name)
                .values()
                .map(|c| c - 1)
                .sum::<u32>()
        })
        .sum();
    assert!(
        complete.is_some(),
        "lines lost: {:?}",
        agents
            .iter()
            .map(|ag| (
                ag.name.clone(),
                stored_both(&[&logs_a, &logs_b], &ag.name).len()
            ))
            .collect::<Vec<_>>()
    );
    println!(
        "log lines stored twice across the nodes: {dups} (of {})",
        N * 400
    );

    // ssh -J through B to f00.
    let cfg = keys.path().join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  ConnectTimeout 10\n",
            alice.display()
        ),
    )
    .unwrap();
    let _ = ssh_a;
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args([
            "-J",
            &format!("alice@127.0.0.1:{ssh_b}"),
            "-p",
            &sshd_port.to_string(),
        ])
        .arg("root@f00")
        .arg("echo through-b")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("through-b"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.b.log_text()
    );
    println!("test wall time {:?}", started.elapsed());
}

fn cluster_status(n: &Bastion) -> serde_json::Value {
    let s: serde_json::Value = serde_json::from_str(&n.cli_ok(&["status", "--json"])).unwrap();
    s["cluster"].clone()
}

#[test]
fn both_bastions_serve_through_a_database_outage_and_resync() {
    let started = Instant::now();
    // Its own cluster: this test stops it.
    let mut pg = Postgres::start();
    let db = pg.create_db("ha_outage");
    let (a, b) = two_nodes(&pg, &db, "max_disconnected = \"3s\"\n");
    let mut web01 = Agent::new("web01");
    web01.enroll_ok(&a.b, &a.b.token(&[]));
    web01.start();
    assert!(a.b.wait_state("web01", "online", Duration::from_secs(10)));
    assert!(
        wait_for(Duration::from_secs(5), || (dig(b.dns, "web01.proj.test")
            == web01.ip)
            .then_some(()))
        .is_some()
    );
    let token = a.b.token(&["--uses", "2"]);
    println!("{:?}: set up", started.elapsed());

    pg.stop();
    let down = Instant::now();
    // Enrollment, revocation: refused, saying why.
    let out = Agent::new("web02").enroll(&a.b, &token);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database is unreachable"), "{err}");
    let out = b.b.cli(&["agents", "revoke", "web01"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unavailable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Past max_disconnected, both nodes say they refuse new sessions (status, metric).
    for n in [&a.b, &b.b] {
        assert!(
            wait_for(Duration::from_secs(8), || (cluster_status(n)
                ["accepting_sessions"]
                == false)
                .then_some(()))
            .is_some(),
            "{}",
            cluster_status(n)
        );
        let human = n.cli_ok(&["status"]);
        assert!(human.contains("REFUSING NEW AGENT SESSIONS"), "{human}");
    }
    assert_eq!(a.b.metric("bastide_store_cut_off"), Some(1.0));
    assert_eq!(a.b.metric("bastide_store_connected"), Some(0.0));
    // DNS answers on both nodes, and the established session stays, for ten seconds.
    while down.elapsed() < Duration::from_secs(10) {
        assert_eq!(dig(a.dns, "web01.proj.test"), web01.ip);
        assert_eq!(dig(b.dns, "web01.proj.test"), web01.ip);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(a.b.agent("web01").unwrap()["state"], "online");
    println!("{:?}: ten seconds without the database", started.elapsed());

    // Back: both nodes resync, enrollment works again and spreads.
    pg.restart();
    for n in [&a.b, &b.b] {
        assert!(
            wait_for(Duration::from_secs(15), || {
                let c = cluster_status(n);
                (c["accepting_sessions"] == true && c["disconnected_secs"].is_null()).then_some(())
            })
            .is_some(),
            "{}",
            n.log_text()
        );
    }
    let mut web02 = Agent::new("web02");
    web02.enroll_ok(&b.b, &token);
    web02.start();
    assert!(
        wait_for(Duration::from_secs(10), || (dig(a.dns, "web02.proj.test")
            == web02.ip)
            .then_some(()))
        .is_some(),
        "{}",
        a.b.log_text()
    );
    b.b.cli_ok(&["agents", "revoke", "web01"]);
    assert_eq!(
        web01
            .wait_exit(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(3)
    );
    println!("test wall time {:?}", started.elapsed());
}
