//! SIGKILL of the bastion at random points under mixed load, ten times in a row: real agents
//! shipping numbered lines from the files they tail, mail relayed through the bastion to
//! Postfix's `smtp-sink` (`swaks` as the client), and configuration pushes (the environment
//! tree changing under the bastion) all at once. After every restart the stores open cleanly
//! and hold no duplicate; at the end every line written is stored exactly once, every
//! acknowledged mail reached the sink (within SMTP's at-least-once window), and every agent
//! has acknowledged the latest revision.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bastide_tests::{
    free_port, numbers_problem, sink_queue_ids, sink_subjects, swaks, wait_for, write_numbered,
    Agent, Bastion, EnvTree, Sink,
};
use serde_json::Value;

const PROJECT: &str = "mixed";
const AGENTS: [&str; 2] = ["mix1", "mix2"];
const ROUNDS: usize = 10;

/// The revision `config render` computes for `name` from the tree on disk.
fn desired(b: &Bastion, name: &str) -> Value {
    let v: Value = serde_json::from_str(&b.cli_ok(&["config", "render", name, "--json"])).unwrap();
    v["revision"].clone()
}

#[test]
fn sigkill_under_mixed_load_ten_times_loses_and_duplicates_nothing() {
    let t0 = Instant::now();
    let mut b = Bastion::init(PROJECT);
    let sink_port = free_port();
    let smtp = b.enable_smtp_relay(sink_port, "");
    let store = b.enable_log_store(None, "");
    let sink_dir = b.dir.path().join("sink");
    let _sink = Sink::start(sink_port, &sink_dir);

    // Agents: each tails its own app.log and may write its own ntp.conf.
    let mut agents: Vec<Agent> = AGENTS.iter().map(|n| Agent::new(n)).collect();
    let outs: Vec<PathBuf> = agents.iter().map(|a| a.dir.path().join("etc")).collect();
    for o in &outs {
        std::fs::create_dir_all(o).unwrap();
    }
    let tree = EnvTree::new(PROJECT, &outs[0], "");
    for (a, o) in agents.iter().zip(&outs) {
        // The host level points the managed file into this agent's own directory.
        std::fs::write(
            tree.host_file(&a.name),
            format!(
                "[files.ntp]\npath = {:?}\n",
                o.join("ntp.conf").display().to_string()
            ),
        )
        .unwrap();
    }
    b.enable_config_push(tree.dir.path());
    b.start();
    let mut apps = Vec::new();
    for (a, o) in agents.iter_mut().zip(&outs) {
        a.append_config(&format!(
            "[config]\nallow_dirs = [{:?}]\n",
            o.display().to_string()
        ));
        apps.push(a.follow_logs("").join("app.log"));
        a.enroll_ok(&b, &b.token(&[]));
        a.start();
    }
    for a in &agents {
        assert!(
            b.wait_state(&a.name, "online", Duration::from_secs(30)),
            "{} not online:\n{}",
            a.name,
            a.log_text()
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    // Log writers: 100 numbered lines every 50 ms per agent; how many each wrote.
    let written: Vec<Arc<AtomicU64>> = AGENTS.iter().map(|_| Arc::default()).collect();
    let writers: Vec<_> = apps
        .iter()
        .cloned()
        .zip(written.iter().cloned())
        .map(|(path, n)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let from = n.load(Ordering::SeqCst);
                    write_numbered(
                        &path,
                        from,
                        from + 100,
                        100,
                        Duration::from_millis(50),
                        |i| n.store(i, Ordering::SeqCst),
                    );
                }
            })
        })
        .collect();
    // Mail: two clients; the subjects the bastion acknowledged (250 after DATA).
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..2)
        .map(|t| {
            let (stop, acked, sent) = (stop.clone(), acked.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let subject = format!("mixed-{t}-{i:04}");
                    i += 1;
                    sent.fetch_add(1, Ordering::SeqCst);
                    let o = swaks(smtp, &["--header", &format!("Subject: {subject}")]);
                    if o.status.success() {
                        acked.lock().unwrap().push(subject);
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        })
        .collect();
    // Config pushes: a new project value every 400 ms; the last one written.
    let last_rev = Arc::new(AtomicU64::new(0));
    let pusher = {
        let (stop, last_rev) = (stop.clone(), last_rev.clone());
        let project_file = tree.project_dir().join("project.toml");
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                let tmp = project_file.with_extension("tmp~");
                std::fs::write(&tmp, format!("[vars]\nntp = \"rev-{k}\"\n")).unwrap();
                std::fs::rename(&tmp, &project_file).unwrap();
                last_rev.store(k, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(400));
            }
        })
    };

    let mut seed = std::process::id() as u64 ^ 0x2545_f491_4f6c_dd1d;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut restarts = Vec::new();
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(300 + rnd(1500)));
        b.kill();
        let before = b.log_text().len();
        let t = Instant::now();
        b.start();
        restarts.push(t.elapsed());
        // The stores opened cleanly.
        let log = b.log_text()[before..].to_string();
        assert!(log.contains("log store recovered"), "round {round}: {log}");
        for bad in [
            "shorter than its committed length",
            "corrupt spool file",
            "is corrupt",
        ] {
            assert!(!log.contains(bad), "round {round}: {bad}:\n{log}");
        }
        let dead = std::fs::read_dir(b.state_dir().join("mail").join("dead"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(dead, 0, "round {round}: a spool file was judged corrupt");
        // What each agent has in the store is a run 0..k with nothing twice (the tail of
        // a group that never committed was cut back at start-up).
        for name in AGENTS {
            assert_eq!(
                numbers_problem(&store, name, 0, true),
                None,
                "round {round}"
            );
        }
        // No message was spooled twice.
        for (subject, ids) in sink_queue_ids(&sink_dir) {
            assert_eq!(
                ids.len(),
                1,
                "round {round}: {subject} spooled twice: {ids:?}"
            );
        }
    }
    // Load continues briefly on the last bastion, then stops.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for h in writers.into_iter().chain(clients).chain([pusher]) {
        h.join().unwrap();
    }
    let load_end = t0.elapsed();

    // Logs: every line written, exactly once.
    for (name, n) in AGENTS.iter().zip(&written) {
        let n = n.load(Ordering::SeqCst);
        assert!(n >= 1_000, "{name}: too little log load ({n} lines)");
        let ok = wait_for(Duration::from_secs(120), || {
            numbers_problem(&store, name, n, false)
                .is_none()
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "{:?}\nbastion:\n{}",
            numbers_problem(&store, name, n, false),
            b.log_text()
        );
    }
    // Mail: everything acknowledged is at the sink, spooled once; redeliveries only within
    // SMTP's at-least-once window (killed after the sink's 250, before the spool file was
    // removed; at most one per delivery in flight at each kill, concurrency 4).
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 10,
        "too little mail load: {} acked",
        acked.len()
    );
    let ok = wait_for(Duration::from_secs(60), || {
        let got = sink_subjects(&sink_dir);
        (acked.iter().all(|s| got.contains_key(s)) && b.mail_queue_len() == 0).then_some(())
    });
    let got = sink_subjects(&sink_dir);
    let missing: Vec<_> = acked.iter().filter(|s| !got.contains_key(*s)).collect();
    assert!(
        ok.is_some(),
        "acknowledged mail missing at the sink: {missing:?}"
    );
    for (subject, ids) in sink_queue_ids(&sink_dir) {
        assert_eq!(ids.len(), 1, "{subject} spooled twice: {ids:?}");
    }
    let dups: Vec<_> = got.iter().filter(|(_, &n)| n > 1).collect();
    let extra: usize = dups.iter().map(|(_, &n)| n - 1).sum();
    assert!(extra <= ROUNDS * 4, "{extra} redeliveries: {dups:?}");
    // Config: every agent acknowledged the revision of the latest tree.
    let k = last_rev.load(Ordering::SeqCst);
    for (a, o) in agents.iter().zip(&outs) {
        let want = desired(&b, &a.name);
        let ok = wait_for(Duration::from_secs(30), || {
            let ag = b.agent(&a.name)?;
            (ag["config_applied"] == want
                && ag["config_desired"] == want
                && std::fs::read_to_string(o.join("ntp.conf"))
                    .unwrap_or_default()
                    .contains(&format!("server rev-{k} iburst")))
            .then_some(())
        });
        assert!(
            ok.is_some(),
            "{} did not converge to rev-{k} ({want}): {:?}\nagent:\n{}",
            a.name,
            b.agent(&a.name),
            a.log_text()
        );
    }
    // A clean stop and start: the stores open cleanly and still hold everything once.
    assert!(b.stop().is_some_and(|s| s.success()), "{}", b.log_text());
    let before = b.log_text().len();
    b.start();
    let log = b.log_text()[before..].to_string();
    assert!(!log.contains("torn end of the journal"), "{log}");
    for (name, n) in AGENTS.iter().zip(&written) {
        assert_eq!(
            numbers_problem(&store, name, n.load(Ordering::SeqCst), false),
            None
        );
    }
    assert!(!b.log_text().contains("corrupt spool file"));
    eprintln!(
        "mixed kill test: {ROUNDS} kills, restarts took {restarts:?}; load for {load_end:?}; lines {:?}; mail {} sent, {} acknowledged, {extra} redelivered; {k} tree changes; {:?} in all",
        written.iter().map(|n| n.load(Ordering::SeqCst)).collect::<Vec<_>>(),
        sent.load(Ordering::SeqCst),
        acked.len(),
        t0.elapsed()
    );
}
