//! Reconnection storms (issue 18): a fleet of 500 simulated agents (`bastide-load --attach`,
//! real mTLS gRPC, the agent's backoff) and one real `bastide-agent` shipping logs, through
//! a graceful restart and a `kill -9` of the bastion. Every agent comes back, no
//! acknowledged log line is lost, and registrations that shared one commit (group commit)
//! are all on disk after a `kill -9` right after their acknowledgement. One heavy setup for
//! the whole file.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bastide_tests::{bin, stored_numbers, wait_for, write_numbered, Agent, Bastion};

const FLEET: usize = 500;

/// `bastide-load --attach`: the simulated fleet, killed on drop.
struct Fleet {
    child: Child,
    stdin: Option<ChildStdin>,
    online: mpsc::Receiver<usize>,
}

impl Fleet {
    fn start(b: &Bastion, n: usize) -> Fleet {
        let token = b.token(&["--uses", &n.to_string()]);
        let mut child = Command::new(bin("bastide-load"))
            .args([
                "--attach",
                &b.agents_addr,
                "--pin",
                &b.pin,
                "--token",
                &token,
            ])
            .args([
                "--agents",
                &n.to_string(),
                "--prefix",
                "fleet",
                "--heartbeat",
                "5s",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn bastide-load");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, online) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(k) = line.strip_prefix("fleet online ") {
                    if tx.send(k.trim().parse().unwrap_or(0)).is_err() {
                        return;
                    }
                }
            }
        });
        Fleet {
            stdin: child.stdin.take(),
            child,
            online,
        }
    }

    /// Waits until the fleet has `n` sessions open (each registration acknowledged).
    fn wait_online(&self, n: usize, timeout: Duration) {
        let start = Instant::now();
        let mut last = 0;
        while last < n {
            let left = timeout.saturating_sub(start.elapsed());
            match self.online.recv_timeout(left) {
                Ok(k) => last = k,
                Err(_) => panic!("fleet: only {last} of {n} sessions open after {timeout:?}"),
            }
        }
    }

    /// Waits until the fleet saw its sessions cut (at most `n` left open).
    fn wait_below(&self, n: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match self.online.recv_timeout(left) {
                Ok(k) if k <= n => return,
                Ok(_) => {}
                Err(_) => panic!("fleet: sessions not cut within {timeout:?}"),
            }
        }
    }

    fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        writeln!(s, "{line}").expect("write to bastide-load");
        s.flush().expect("flush");
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn online_count(b: &Bastion) -> usize {
    b.agents().iter().filter(|a| a["state"] == "online").count()
}

fn wait_all_online(b: &Bastion, n: usize, timeout: Duration) {
    let ok = wait_for(timeout, || (online_count(b) >= n).then_some(()));
    assert!(
        ok.is_some(),
        "only {} of {n} agents online:\n{}",
        online_count(b),
        b.log_text()
    );
}

fn metric_sum(b: &Bastion, prefix: &str) -> f64 {
    let (_, body) = bastide_tests::http_get(&b.metrics_addr, "/metrics", None);
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn restarts_with_500_agents_bring_all_back_and_lose_nothing_acknowledged() {
    let mut b = Bastion::init("storm");
    // The whole simulated fleet dials from 127.0.0.1 without a certificate to enroll.
    b.edit_config(|c| {
        c.replace(
            "max_unauthenticated_per_address = 32",
            "max_unauthenticated_per_address = 100000",
        )
        .replace(
            "max_unauthenticated_connections = 256",
            "max_unauthenticated_connections = 100000",
        )
    });
    let store = b.enable_log_store(None, "");
    b.start();

    // One real agent shipping numbered lines through both restarts.
    let mut agent = Agent::new("storm-real");
    agent.enroll_ok(&b, &b.token(&[]));
    let logs = agent.dir.path().join("app");
    std::fs::create_dir_all(&logs).unwrap();
    // (The harness's agents already reconnect within 2 s at most.)
    agent.edit_config(|c| {
        format!(
            "{c}\n[logs]\nbatch_timeout = \"100ms\"\npoll_interval = \"50ms\"\n[[logs.sources]]\npath = \"{}/*.log\"\n",
            logs.display()
        )
    });
    agent.start();

    let t = Instant::now();
    let mut fleet = Fleet::start(&b, FLEET);
    fleet.wait_online(FLEET, Duration::from_secs(180));
    eprintln!("fleet enrolled and online in {:?}", t.elapsed());
    let ok = wait_for(Duration::from_secs(30), || {
        b.wait_state("storm-real", "online", Duration::from_millis(100))
            .then_some(())
    });
    assert!(ok.is_some(), "real agent offline:\n{}", agent.log_text());
    wait_all_online(&b, FLEET + 1, Duration::from_secs(60));

    // Lines written while the bastion restarts gracefully, then is killed.
    let path = logs.join("app.log");
    let total = 6_000;
    let mut step = 0;
    write_numbered(&path, 0, total, 500, Duration::from_millis(20), |i| {
        if i == 1_500 && step == 0 {
            step = 1;
            let t = Instant::now();
            b.stop();
            b.start();
            fleet.wait_online(FLEET, Duration::from_secs(120));
            eprintln!("graceful restart: fleet back in {:?}", t.elapsed());
        }
        if i == 3_500 && step == 1 {
            step = 2;
            let t = Instant::now();
            b.kill();
            b.start();
            fleet.wait_online(FLEET, Duration::from_secs(120));
            eprintln!("kill -9: fleet back in {:?}", t.elapsed());
        }
    });
    assert_eq!(step, 2);
    wait_all_online(&b, FLEET + 1, Duration::from_secs(60));
    let ok = wait_for(Duration::from_secs(60), || {
        (stored_numbers(&store, "storm-real").len() as u64 >= total).then_some(())
    });
    let got = stored_numbers(&store, "storm-real");
    let missing: Vec<u64> = (0..total)
        .filter(|i| !got.contains_key(i))
        .take(10)
        .collect();
    let repeated: Vec<_> = got.iter().filter(|(_, c)| **c > 1).take(10).collect();
    assert!(
        ok.is_some() && missing.is_empty() && repeated.is_empty(),
        "{} distinct of {total} lines; first missing {missing:?}; repeated {repeated:?}",
        got.len()
    );

    // Group commit: the fleet re-registers with new facts after a kill -9; right after the
    // last acknowledgement the bastion is killed again, before anything else is written.
    fleet.send("hostname .b");
    b.kill();
    fleet.wait_below(0, Duration::from_secs(20));
    b.start();
    fleet.wait_online(FLEET, Duration::from_secs(120));
    let registrations = metric_sum(&b, "bastide_agent_registrations_total{result=\"ok\"}");
    let commits = metric_sum(&b, "bastide_agent_registration_commits_total");
    b.kill();
    drop(fleet);
    b.start();
    let agents = b.agents();
    let fleet_rows: Vec<_> = agents
        .iter()
        .filter(|a| a["name"].as_str().is_some_and(|n| n.starts_with("fleet")))
        .collect();
    assert_eq!(fleet_rows.len(), FLEET);
    let stale: Vec<_> = fleet_rows
        .iter()
        .filter(|a| !a["hostname"].as_str().is_some_and(|h| h.ends_with(".b")))
        .map(|a| a["name"].clone())
        .take(10)
        .collect();
    assert!(
        stale.is_empty(),
        "acknowledged registrations lost by the kill -9: {stale:?}"
    );
    assert!(
        registrations >= FLEET as f64 && commits >= 1.0 && commits < registrations,
        "registrations were not grouped: {registrations} registrations in {commits} commits"
    );
    eprintln!("{registrations} registrations in {commits} commits");
}
