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

/// Node "a" (started), and node "b" made from its identity (started).
fn two_nodes(pg: &Postgres, db: &str, store_extra: &str, extra: impl Fn(&Bastion)) -> (Node, Node) {
    let mut a = Bastion::init("proj");
    let dns_a = configure(&a, pg, db, "a", store_extra);
    extra(&a);
    let t = Instant::now();
    a.start();
    println!("node a started in {:?}", t.elapsed());
    let bundle = a.dir.path().join("identity.json");
    a.cli_ok(&["export-identity", "--out", &bundle.display().to_string()]);
    let mut b = Bastion::join(&bundle);
    let dns_b = configure(&b, pg, db, "b", store_extra);
    extra(&b);
    b.start();
    (Node { b: a, dns: dns_a }, Node { b, dns: dns_b })
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
    let (a, b) = two_nodes(&pg, &db, "", |_| {});
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
