//! The jump decision: the destination an (authenticated) admin's client asks for
//! (`ssh -J bastion host`, a free string and a port) resolved against the registry and
//! matched against rules with agent globs, labels, CIDRs and ports. Never panics; an
//! allowed jump always goes to an address of an active agent or a rule's CIDR.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bastide::registry::{AgentInfo, Snapshot};
use bastide::ssh::config::{AdminEntry, Policy, RuleEntry, SshConfig};
use libfuzzer_sys::fuzz_target;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D a@b";

fn agent(name: &str, ip: &str, env: &str) -> Arc<AgentInfo> {
    Arc::new(AgentInfo {
        name: name.into(),
        labels: [("env".to_string(), env.to_string())].into(),
        revoked: false,
        online: true,
        hostname: name.into(),
        addresses: vec![ip.parse().unwrap()],
        os: String::new(),
        agent_version: String::new(),
        ssh_host_keys: vec![],
        enrolled_at: 0,
        cert_serial: String::new(),
        cert_not_after: 0,
        ..Default::default()
    })
}

fn setup() -> &'static (Policy, Snapshot) {
    static S: OnceLock<(Policy, Snapshot)> = OnceLock::new();
    S.get_or_init(|| {
        let mut cfg: SshConfig =
            toml::from_str("listen = \"127.0.0.1:1\"\naudit_log = \"/tmp/a\"\n").unwrap();
        cfg.admins.push(AdminEntry {
            name: "alice".into(),
            keys: vec![KEY.into()],
            groups: vec!["ops".into()],
        });
        let rule = |agents: Vec<&str>,
                    labels: Vec<(&str, &str)>,
                    cidrs: Vec<&str>,
                    ports: Vec<u16>| RuleEntry {
            admins: vec!["alice".into()],
            groups: vec![],
            agents: agents.into_iter().map(String::from).collect(),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            cidrs: cidrs.into_iter().map(String::from).collect(),
            hosts: vec![],
            ports,
        };
        cfg.rules = vec![
            rule(vec!["web*"], vec![], vec![], vec![22]),
            rule(vec![], vec![("env", "dev")], vec![], vec![22, 2222]),
            rule(vec![], vec![], vec!["192.168.0.0/16", "fd00::/8"], vec![22]),
        ];
        let policy = Policy::build(&cfg, Some("proj.test.")).unwrap();
        let mut snap = Snapshot::default();
        snap.agents
            .insert("web01".into(), agent("web01", "10.0.0.5", "prod"));
        snap.agents
            .insert("db01".into(), agent("db01", "10.0.0.6", "dev"));
        (policy, snap)
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let port = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let Ok(host) = std::str::from_utf8(&data[4..]) else {
        return;
    };
    let (policy, snap) = setup();
    let w = bastide_fuzz::world();
    let r = w.runtime.block_on(bastide::ssh::rules::decide(
        policy, "alice", snap, host, port,
    ));
    if let Ok(ok) = r {
        let ip = ok.addr.to_canonical();
        let agent_ip = snap.active().any(|a| a.addresses.contains(&ip));
        let in_cidr = match ip {
            std::net::IpAddr::V4(v4) => v4.octets()[..2] == [192, 168],
            std::net::IpAddr::V6(v6) => v6.octets()[0] == 0xfd,
        };
        assert!(agent_ip || in_cidr, "jump allowed to {ip} for {host:?}");
        assert!(port == 22 || port == 2222);
    }
});
