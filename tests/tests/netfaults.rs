//! Network faults between an agent and the bastion: the agent runs in a network namespace
//! of its own, linked to the bastion by a veth pair the test creates (`ip netns`, `ip link`,
//! removed in Drop). Latency and loss come from `tc netem` when the kernel has it; kernels
//! built without sch_netem (CONFIG_NET_SCH_NETEM off, as in some CI VMs) get loss from an
//! nftables `numgen random` drop rule and delay from a `tc tbf` rate limit instead, and the
//! test says which it used. A cut link is `ip link set down`.
//!
//! Asserted: the agent stays online through latency and loss, the bastion marks it offline
//! after the heartbeat timeout once the link is cut, and the agent comes back online by
//! itself (reconnecting with backoff) once the link returns. Needs root.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bastide_tests::{require, Agent, Bastion};

fn ip(args: &[&str]) -> std::process::Output {
    Command::new(require("ip", "iproute2"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "FAIL: `ip {}` (root and network namespaces needed): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog).args(args).output().unwrap()
}

/// A namespace `ns` with the veth end `inner` (address .2), linked to `outer` (.1) in the
/// root namespace.
struct Link {
    ns: String,
    outer: String,
    inner: String,
    host_ip: String,
    ns_ip: String,
}

impl Link {
    fn new() -> Link {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names are at most 15 bytes.
        let tag = format!("{:x}{n}", pid % 0xfffff);
        let subnet = 16 + (pid % 200) as u8;
        let l = Link {
            ns: format!("bastide-nf-{tag}"),
            outer: format!("bnf{tag}o"),
            inner: format!("bnf{tag}i"),
            host_ip: format!("10.{subnet}.{n}.1"),
            ns_ip: format!("10.{subnet}.{n}.2"),
        };
        ok(&["netns", "add", &l.ns]);
        ok(&[
            "link", "add", &l.outer, "type", "veth", "peer", "name", &l.inner,
        ]);
        ok(&["link", "set", &l.inner, "netns", &l.ns]);
        ok(&["addr", "add", &format!("{}/30", l.host_ip), "dev", &l.outer]);
        ok(&["link", "set", &l.outer, "up"]);
        ok(&[
            "-n",
            &l.ns,
            "addr",
            "add",
            &format!("{}/30", l.ns_ip),
            "dev",
            &l.inner,
        ]);
        ok(&["-n", &l.ns, "link", "set", &l.inner, "up"]);
        ok(&["-n", &l.ns, "link", "set", "lo", "up"]);
        l
    }

    fn exec(&self) -> Vec<String> {
        vec![
            require("ip", "iproute2").display().to_string(),
            "netns".into(),
            "exec".into(),
            self.ns.clone(),
        ]
    }

    fn set_up(&self, up: bool) {
        let s = if up { "up" } else { "down" };
        ok(&["link", "set", &self.outer, s]);
    }

    /// Delay and loss on both directions; returns how it was done.
    fn degrade(&self, delay_ms: u32, loss_pct: u32) -> &'static str {
        let tc = require("tc", "iproute2").display().to_string();
        let netem = |dev: &str, ns: Option<&str>| {
            let mut a: Vec<String> = Vec::new();
            if let Some(ns) = ns {
                a.extend(["-n".into(), ns.to_string()]);
            }
            a.extend(["qdisc", "add", "dev", dev, "root", "netem", "delay"].map(String::from));
            a.push(format!("{delay_ms}ms"));
            a.push("loss".into());
            a.push(format!("{loss_pct}%"));
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            run(&tc, &a)
        };
        let o = netem(&self.outer, None);
        if o.status.success() {
            let o2 = netem(&self.inner, Some(&self.ns));
            assert!(
                o2.status.success(),
                "{}",
                String::from_utf8_lossy(&o2.stderr)
            );
            return "netem";
        }
        eprintln!(
            "tc netem unavailable ({}): loss by nftables numgen, delay by a tbf rate limit",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        // Queueing delay: a slow link (64 kbit/s) with a 400 ms queue.
        let o = run(
            &tc,
            &[
                "qdisc",
                "add",
                "dev",
                &self.outer,
                "root",
                "tbf",
                "rate",
                "64kbit",
                "burst",
                "4kb",
                "latency",
                "400ms",
            ],
        );
        assert!(
            o.status.success(),
            "tc tbf: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Random loss, in the agent's namespace only (the rules go with it).
        let nft = require("nft", "nftables").display().to_string();
        let rules = format!(
            "table inet bastide_loss {{ chain inp {{ type filter hook input priority 0; numgen random mod 100 < {loss_pct} drop; }}; chain outp {{ type filter hook output priority 0; numgen random mod 100 < {loss_pct} drop; }}; }}"
        );
        let o = Command::new(require("ip", "iproute2"))
            .args(["netns", "exec", &self.ns, &nft, &rules])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        "tbf+nftables"
    }

    fn heal(&self) {
        let tc = require("tc", "iproute2").display().to_string();
        let _ = run(&tc, &["qdisc", "del", "dev", &self.outer, "root"]);
        let _ = run(
            &tc,
            &["-n", &self.ns, "qdisc", "del", "dev", &self.inner, "root"],
        );
        let _ = Command::new(require("ip", "iproute2"))
            .args([
                "netns",
                "exec",
                &self.ns,
                "nft",
                "delete",
                "table",
                "inet",
                "bastide_loss",
            ])
            .output();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.outer]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

fn state(b: &Bastion, name: &str) -> String {
    b.agent(name)
        .map(|a| a["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[test]
fn agent_in_a_namespace_survives_loss_goes_offline_on_a_cut_and_returns() {
    let link = Link::new();
    let mut b = Bastion::init_agents_on("netf", &link.host_ip);
    b.edit_config(|c| {
        c.replace(
            "heartbeat_interval = \"10s\"",
            "heartbeat_interval = \"1s\"",
        )
        .replace("heartbeat_timeout = \"35s\"", "heartbeat_timeout = \"5s\"")
        // The namespace's address is an agent network too.
        .replace(
            "networks = [\"127.0.0.0/8\"]",
            &format!("networks = [\"127.0.0.0/8\", \"{}/32\"]", link.ns_ip),
        )
    });
    b.start();
    let exec = link.exec();
    let prefix: Vec<&str> = exec.iter().map(String::as_str).collect();
    let mut a = Agent::new("ns01");
    // It claims, and connects from, its address in the namespace.
    a.set_addresses(&[&link.ns_ip], Some(&link.ns_ip));
    // The server certificate names loopback and "bastide", not the veth address.
    a.enroll_via(&prefix, &b, &b.token(&[]), &["--server-name", "bastide"]);
    a.start_via(&prefix, &[]);
    assert!(
        b.wait_state("ns01", "online", Duration::from_secs(15)),
        "agent in the namespace not online:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    let addrs = b.agent("ns01").unwrap()["addresses"].clone();
    assert!(
        addrs.to_string().contains(&link.ns_ip),
        "registered with its advertised address: {addrs}"
    );

    // Latency and loss: heartbeats still get through, the agent stays online.
    let how = link.degrade(100, 5);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            state(&b, "ns01"),
            "online",
            "went offline under 100 ms / 5 % loss ({how}) after {:?}:\n{}",
            t.elapsed(),
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    link.heal();

    // Cut: offline after the heartbeat timeout (5 s), not before it.
    link.set_up(false);
    let cut = Instant::now();
    assert!(
        b.wait_state("ns01", "offline", Duration::from_secs(15)),
        "still online 15 s after the cut:\n{}",
        b.log_text()
    );
    let took = cut.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "marked offline after {took:?}, before the heartbeat timeout"
    );
    // Down a while longer: the agent keeps retrying with backoff meanwhile.
    std::thread::sleep(Duration::from_secs(4));

    // Back: the agent reconnects by itself.
    link.set_up(true);
    let back = Instant::now();
    assert!(
        b.wait_state("ns01", "online", Duration::from_secs(30)),
        "not back online 30 s after the link returned:\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    eprintln!(
        "loss via {how}; offline {took:?} after the cut; online {:?} after the link returned",
        back.elapsed()
    );
    let log = a.log_text();
    assert!(
        log.matches("connected to the bastion").count() >= 2
            && log.contains("bastion session lost"),
        "no loss and reconnection in the agent log:\n{log}"
    );
}
