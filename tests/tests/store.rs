//! The registry on PostgreSQL (`[store] backend = "postgres"`): the foundation's flows
//! against a bastion whose store is a real, throwaway PostgreSQL cluster, and the one-shot
//! copy of a populated SQLite registry into PostgreSQL (`bastide store migrate`). The tests
//! fail when PostgreSQL's programs are missing (apt-get install postgresql).

use std::time::Duration;

use bastide_tests::{parallel_enrollments, wait_for, Agent, Bastion, Postgres};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn foundation_flows_on_postgres() {
    let pg = Postgres::start();
    pg.create_db("bastide");
    let mut b = Bastion::init("proj");
    b.edit_config(|c| {
        c.replace("cert_lifetime = \"24h\"", "cert_lifetime = \"6s\"")
            .replace(
                "heartbeat_interval = \"10s\"",
                "heartbeat_interval = \"1s\"",
            )
            .replace("heartbeat_timeout = \"35s\"", "heartbeat_timeout = \"5s\"")
    });
    b.set_postgres_store(&pg, "bastide", "postgres");
    b.cli_ok(&["check-config"]);
    b.start();
    assert!(
        b.log_text().contains("registry store open")
            && b.log_text().contains("PostgreSQL bastide@127.0.0.1"),
        "{}",
        b.log_text()
    );
    assert_eq!(
        pg.psql("bastide", "SELECT max(version) FROM schema_migrations"),
        "4"
    );
    let status = b.cli_ok(&["status"]);
    assert!(
        status.contains("store         PostgreSQL bastide@127.0.0.1"),
        "{status}"
    );

    // Enrollment and registration, written to PostgreSQL.
    let token = b.token(&["--labels", "role=web"]);
    let mut web01 = Agent::new("web01");
    web01.enroll_ok(&b, &token);
    web01.start();
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(10)),
        "{}",
        web01.log_text()
    );
    assert_eq!(b.agent("web01").unwrap()["labels"]["role"], "web");
    let row = wait_for(Duration::from_secs(5), || {
        let r = pg.psql(
            "bastide",
            "SELECT labels, revoked, addresses FROM agents WHERE name = 'web01'",
        );
        r.contains(&web01.ip).then_some(r)
    });
    assert_eq!(
        row.unwrap(),
        format!("{{\"role\":\"web\"}}|f|[\"{}\"]", web01.ip)
    );

    // The token is single-use, by the store's count.
    let out = Agent::new("web02").enroll(&b, &token);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    assert_eq!(pg.psql("bastide", "SELECT uses_left FROM tokens"), "0");

    // Twenty parallel enrollments on one single-use token: one certificate.
    let race = b.token(&[]);
    let (wins, _racers) = parallel_enrollments(&b, &race, 20);
    assert_eq!(wins, 1);
    assert_eq!(
        pg.psql(
            "bastide",
            "SELECT count(*) FROM agents WHERE name LIKE 'p%'"
        ),
        "1"
    );

    // Renewal (6 s certificates, renewed at two thirds): the new serial is in PostgreSQL.
    let first = pg.psql(
        "bastide",
        "SELECT cert_serial FROM agents WHERE name = 'web01'",
    );
    let renewed = wait_for(Duration::from_secs(12), || {
        let s = pg.psql(
            "bastide",
            "SELECT cert_serial FROM agents WHERE name = 'web01'",
        );
        (s != first).then_some(s)
    });
    let renewed = renewed.expect("no renewal recorded in PostgreSQL");
    assert_eq!(b.agent("web01").unwrap()["cert_serial"], renewed.as_str());
    // The agent logs it once it has written the new certificate, just after the commit.
    assert!(
        wait_for(Duration::from_secs(5), || web01
            .log_text()
            .contains("certificate renewed")
            .then_some(()))
        .is_some(),
        "{}",
        web01.log_text()
    );

    // Revocation: the session is cut, the agent stops, PostgreSQL has it revoked.
    let mut web03 = Agent::new("web03");
    web03.enroll_ok(&b, &b.token(&[]));
    web03.start();
    assert!(b.wait_state("web03", "online", Duration::from_secs(10)));
    b.cli_ok(&["agents", "revoke", "web03"]);
    let st = web03.wait_exit(Duration::from_secs(15));
    assert_eq!(st.and_then(|s| s.code()), Some(3), "{}", web03.log_text());
    assert_eq!(
        pg.psql(
            "bastide",
            "SELECT revoked, (SELECT bool_and(revoked) FROM certs WHERE agent = 'web03') FROM agents WHERE name = 'web03'"
        ),
        "t|t"
    );

    // A restart reads everything back from PostgreSQL.
    let st = b.stop().unwrap();
    assert_eq!(st.code(), Some(0), "{}", b.log_text());
    b.start();
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(15)),
        "{}",
        web01.log_text()
    );
    assert_eq!(b.agent("web03").unwrap()["state"], "revoked");
    assert_eq!(b.agents().len(), 3, "{:?}", b.agents());

    // PostgreSQL down: check-config and a start fail at once, saying so.
    b.stop();
    let mut pg = pg;
    pg.stop();
    let out = b.cli(&["check-config"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("PostgreSQL") && stderr(&out).contains("unavailable"),
        "{}",
        stderr(&out)
    );
    let out = b.cli(&["serve"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("registry store PostgreSQL bastide@127.0.0.1")
            && stderr(&out).contains("connect"),
        "{}",
        stderr(&out)
    );
}

/// Rows of a SQLite table as psql prints them (`|` between columns, booleans as t/f).
fn sqlite_rows(path: &std::path::Path, sql: &str, bools: &[usize]) -> Vec<String> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut stmt = c.prepare(sql).unwrap();
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            let mut cols = Vec::new();
            for i in 0..n {
                let v: rusqlite::types::Value = r.get(i)?;
                cols.push(match v {
                    rusqlite::types::Value::Null => String::new(),
                    rusqlite::types::Value::Integer(x) if bools.contains(&i) => {
                        if x != 0 { "t" } else { "f" }.to_string()
                    }
                    rusqlite::types::Value::Integer(x) => x.to_string(),
                    rusqlite::types::Value::Text(s) => s,
                    rusqlite::types::Value::Blob(b) => {
                        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                    }
                    rusqlite::types::Value::Real(f) => f.to_string(),
                });
            }
            Ok(cols.join("|"))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

fn pg_rows(pg: &Postgres, sql: &str) -> Vec<String> {
    let out = pg.psql("bastide", sql);
    out.lines().map(str::to_string).collect()
}

#[test]
fn sqlite_store_migrates_to_postgres_and_the_bastion_starts_on_it() {
    let pg = Postgres::start();
    pg.create_db("bastide");
    let mut b = Bastion::init("proj");
    b.start();

    // A populated registry: four agents from one token of five uses (three running, so
    // their facts are registered; one revoked), a used token, a valid one, a revoked one.
    let multi = b.token(&["--uses", "5", "--labels", "role=web,tier=front"]);
    let mut running = Vec::new();
    for name in ["web01", "web02", "web03", "web04"] {
        let mut a = Agent::new(name);
        a.enroll_ok(&b, &multi);
        if name != "web04" {
            a.start();
            assert!(b.wait_state(name, "online", Duration::from_secs(10)));
        }
        running.push(a);
    }
    b.cli_ok(&["agents", "revoke", "web04"]);
    let used = b.token(&[]);
    Agent::new("db01").enroll_ok(&b, &used);
    let valid = b.token(&[]);
    let revoked = b.token(&[]);
    b.cli_ok(&["token", "revoke", revoked.split('.').next().unwrap()]);

    b.set_postgres_store(&pg, "bastide", "sqlite");
    // Not while the bastion runs: the copy must see the store at rest.
    let out = b.cli(&["store", "migrate", "--to", "postgres"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));
    let st = b.stop().unwrap();
    assert_eq!(st.code(), Some(0));

    let sqlite = b.state_dir().join("registry.sqlite");
    // Two SSH user certificates issued after single sign-on, one revoked (written as the
    // SSO service records them; the serials use the whole signed 64-bit range).
    rusqlite::Connection::open(&sqlite)
        .unwrap()
        .execute_batch(
            "INSERT INTO ssh_certs(serial, admin, sub, groups, key_fingerprint, valid_after,
                valid_before, issued_at, source, revoked) VALUES
             (9223372036854775806, 'alice', 'sub-a', '[\"ops\"]', 'SHA256:a', 100, 4000000000,
                100, '127.0.0.1', 0),
             (2, 'bob', 'sub-b', '[]', 'SHA256:b', 100, 4000000000, 100, '127.0.0.2', 1);",
        )
        .unwrap();
    let out = b.cli(&["store", "migrate", "--to", "postgres"]);
    assert!(out.status.success(), "{}{}", stderr(&out), stdout(&out));
    let certs: usize = sqlite_rows(&sqlite, "SELECT count(*) FROM certs", &[])[0]
        .parse()
        .unwrap();
    assert!(
        stdout(&out).contains(&format!(
            "copied 4 tokens, 5 agents, {certs} certificates, 2 SSH user certificates"
        )),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("next: set backend = \"postgres\""));

    // Counts, and every row of each table compared column by column.
    for table in ["tokens", "agents", "certs", "ssh_certs"] {
        assert_eq!(
            pg_rows(&pg, &format!("SELECT count(*) FROM {table}")),
            sqlite_rows(&sqlite, &format!("SELECT count(*) FROM {table}"), &[]),
            "{table}"
        );
    }
    let agent_cols = "name, labels, revoked, enrolled_at, hostname, addresses, os, agent_version, \
        ssh_host_keys, last_seen, cert_serial, cert_not_after, token_id, config_desired, \
        config_applied, config_error";
    let want = sqlite_rows(
        &sqlite,
        &format!("SELECT {agent_cols} FROM agents ORDER BY name"),
        &[2],
    );
    assert_eq!(
        pg_rows(
            &pg,
            &format!("SELECT {agent_cols} FROM agents ORDER BY name")
        ),
        want
    );
    assert!(want
        .iter()
        .any(|r| r.starts_with("web04|") && r.contains("|t|")));
    let token_cols = "id, encode(hash, 'hex'), created, expires, uses_left, uses_total, \
        name_pattern, labels, replace, revoked";
    assert_eq!(
        pg_rows(&pg, &format!("SELECT {token_cols} FROM tokens ORDER BY id")),
        sqlite_rows(
            &sqlite,
            &format!(
                "SELECT {} FROM tokens ORDER BY id",
                token_cols.replace("encode(hash, 'hex')", "hash")
            ),
            &[8, 9]
        )
    );
    let cert_cols = "serial, agent, issued_at, not_after, revoked";
    assert_eq!(
        pg_rows(
            &pg,
            &format!("SELECT {cert_cols} FROM certs ORDER BY serial")
        ),
        sqlite_rows(
            &sqlite,
            &format!("SELECT {cert_cols} FROM certs ORDER BY serial"),
            &[4]
        )
    );

    let ssh_cert_cols = "serial, admin, sub, groups, key_fingerprint, valid_after, \
        valid_before, issued_at, source, revoked";
    assert_eq!(
        pg_rows(
            &pg,
            &format!("SELECT {ssh_cert_cols} FROM ssh_certs ORDER BY serial")
        ),
        sqlite_rows(
            &sqlite,
            &format!("SELECT {ssh_cert_cols} FROM ssh_certs ORDER BY serial"),
            &[9]
        )
    );

    // A second copy into the now non-empty database is refused.
    let out = b.cli(&["store", "migrate", "--to", "postgres"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already holds a registry"),
        "{}",
        stderr(&out)
    );

    // The bastion starts on PostgreSQL with its agents still enrolled.
    b.set_postgres_store(&pg, "bastide", "postgres");
    b.start();
    assert!(b.log_text().contains("PostgreSQL bastide@127.0.0.1"));
    for name in ["web01", "web02", "web03"] {
        assert!(
            b.wait_state(name, "online", Duration::from_secs(20)),
            "{name} did not come back:\n{}",
            b.log_text()
        );
    }
    assert_eq!(b.agent("web04").unwrap()["state"], "revoked");
    assert_eq!(b.agent("web01").unwrap()["labels"]["tier"], "front");
    assert_eq!(b.agents().len(), 5);
    // Tokens keep their state: one use left on the multi-use token, the used and revoked
    // ones refuse, the valid one enrolls.
    Agent::new("web05").enroll_ok(&b, &multi);
    let out = Agent::new("web06").enroll(&b, &multi);
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    let out = Agent::new("db02").enroll(&b, &used);
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    let out = Agent::new("db03").enroll(&b, &revoked);
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    Agent::new("db04").enroll_ok(&b, &valid);
    assert_eq!(pg.psql("bastide", "SELECT count(*) FROM agents"), "7");
}

#[test]
fn a_second_node_joins_with_the_first_nodes_identity() {
    use std::os::unix::fs::PermissionsExt;
    let pg = Postgres::start();
    pg.create_db("bastide");
    let mut a = Bastion::init("proj");
    a.set_postgres_store(&pg, "bastide", "postgres");
    a.start();
    assert_eq!(
        pg.psql(
            "bastide",
            "SELECT value FROM meta WHERE key = 'agent_ca_pin'"
        ),
        a.pin,
        "the first node binds the store to its CA"
    );

    let bundle = a.dir.path().join("identity.json");
    let bundle_s = bundle.display().to_string();
    let out = a.cli_ok(&["export-identity", "--out", &bundle_s]);
    assert!(out.contains("mode 0600"), "{out}");
    let mode = std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = a.cli(&["export-identity", "--out", &bundle_s]);
    assert!(!again.status.success(), "never overwritten");

    // A node made with a plain `init` has a CA of its own: refused by check-config and at
    // start, naming the way to do it.
    let stray = Bastion::init("proj");
    stray.set_postgres_store(&pg, "bastide", "postgres");
    let out = stray.cli(&["check-config"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not the one of the registry") && stderr(&out).contains("--join"),
        "{}",
        stderr(&out)
    );
    let st = std::process::Command::new(bastide_tests::bin("bastide"))
        .arg("--config")
        .arg(&stray.config)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(
        stderr(&st).contains("is not the one of the registry"),
        "{}",
        stderr(&st)
    );

    // A bundle readable by others is refused.
    let open = a.dir.path().join("open.json");
    std::fs::copy(&bundle, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(bastide_tests::bin("bastide"))
        .args(["init", "--join", &open.display().to_string(), "--dir"])
        .arg(a.dir.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("group or others"), "{}", stderr(&out));

    // A node made with --join: same CA pin, same SSH host key, same server certificate.
    let mut b = Bastion::join(&bundle);
    b.set_postgres_store(&pg, "bastide", "postgres");
    b.cli_ok(&["check-config"]);
    assert_eq!(a.pin, b.pin);
    for f in [
        "ssh_host_ed25519_key.pub",
        "pki/server.crt",
        "pki/agent-ca.crt",
        // The single sign-on user CA: certificates of one node are good on the other.
        "pki/ssh-user-ca.pub",
    ] {
        assert_eq!(
            std::fs::read(a.state_dir().join(f)).unwrap(),
            std::fs::read(b.state_dir().join(f)).unwrap(),
            "{f}"
        );
    }
    for f in [
        "ssh_host_ed25519_key",
        "pki/agent-ca.key",
        "pki/server.key",
        "pki/ssh-user-ca.key",
    ] {
        let m = std::fs::metadata(b.state_dir().join(f)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    // A token created on node A enrolls an agent on node B (same pin), which then runs there.
    let token = a.token(&[]);
    b.start();
    let mut web01 = Agent::new("web01");
    web01.enroll_ok(&b, &token);
    web01.start();
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(10)),
        "{}",
        web01.log_text()
    );
    assert_eq!(pg.psql("bastide", "SELECT uses_left FROM tokens"), "0");
    assert_eq!(
        pg.psql("bastide", "SELECT name FROM agents"),
        "web01",
        "one registry"
    );
}
