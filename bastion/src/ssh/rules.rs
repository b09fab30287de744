//! Target resolution and access rules. A requested host is an enrolled agent's name (short,
//! or FQDN in the project zone) resolved from the registry snapshot, or an address, or a
//! host name a rule names. Deny by default: a jump is allowed only by a rule that names the
//! admin (or one of their groups), the port, and matches every selector it gives.
//!
//! Addresses come from the registry's ACCEPTED addresses only (`crate::addresses`): an
//! agent's name jumps to its first accepted address, and a typed-in address is credited to
//! an agent (so that `agents`/`labels` rules apply) only when it is that agent's accepted
//! address, which is unique across agents. Anything else is a plain address that a
//! `cidrs` or `hosts` rule must allow, as with OpenSSH's `PermitOpen`: what a VM says
//! about itself never widens what an admin may reach.

use std::net::IpAddr;
use std::sync::Arc;

use crate::registry::{AgentInfo, Snapshot};

use super::config::{Admin, Policy, Rule};

/// Where a jump goes once allowed.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub addr: IpAddr,
    pub agent: Option<String>,
    pub rule: usize,
}

/// A refusal, with the address it resolved to when it got that far.
#[derive(Debug, Clone)]
pub struct Denied {
    pub reason: String,
    pub addr: Option<IpAddr>,
    pub agent: Option<String>,
}

fn deny(reason: String, addr: Option<IpAddr>, agent: Option<&Arc<AgentInfo>>) -> Denied {
    Denied {
        reason,
        addr,
        agent: agent.map(|a| a.name.clone()),
    }
}

/// The active agent a requested name designates: its name, or its name in the zone.
pub fn find_agent<'a>(
    snap: &'a Snapshot,
    zone: Option<&str>,
    host: &str,
) -> Option<&'a Arc<AgentInfo>> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let short = match zone {
        Some(z) => h
            .strip_suffix(z)
            .and_then(|s| s.strip_suffix('.'))
            .unwrap_or(&h),
        None => &h,
    };
    snap.agents.get(short).filter(|a| !a.revoked)
}

fn applies_to(rule: &Rule, admin: &Admin) -> bool {
    rule.admins.contains(&admin.name) || rule.groups.iter().any(|g| admin.groups.contains(g))
}

fn matches(rule: &Rule, host: &str, agent: Option<&AgentInfo>, addr: IpAddr, port: u16) -> bool {
    if !rule.ports.contains(&port) {
        return false;
    }
    if !rule.agents.is_empty() {
        match agent {
            Some(a) if rule.agents.iter().any(|g| g.is_match(&a.name)) => {}
            _ => return false,
        }
    }
    if !rule.labels.is_empty() {
        match agent {
            Some(a) if rule.labels.iter().all(|(k, v)| a.labels.get(k) == Some(v)) => {}
            _ => return false,
        }
    }
    if !rule.cidrs.is_empty() && !rule.cidrs.iter().any(|c| c.contains(addr)) {
        return false;
    }
    if !rule.hosts.is_empty() && !rule.hosts.iter().any(|g| g.is_match(host)) {
        return false;
    }
    true
}

/// Decides a jump by `admin` to `host:port`.
pub async fn decide(
    policy: &Policy,
    admin: &str,
    snap: &Snapshot,
    host: &str,
    port: u32,
) -> Result<Allowed, Denied> {
    let Some(admin) = policy.admins.get(admin) else {
        return Err(deny(
            format!("admin {admin:?} is no longer configured"),
            None,
            None,
        ));
    };
    decide_as(policy, admin, snap, host, port).await
}

/// Whether some rule names `admin` or one of its groups (a certificate that no rule would
/// use is refused at issue time).
pub fn any_rule_for(policy: &Policy, admin: &Admin) -> bool {
    policy.rules.iter().any(|r| applies_to(r, admin))
}

/// Who may log in to `agent`'s own sshd (port 22) with a certificate of the user CA, by
/// the same rules as the jumps: the admins the matching rules name and `group:<name>` for
/// their groups (what a VM's `AuthorizedPrincipalsFile` lists; see
/// packaging/templates/bastide-principals.j2).
pub fn principals_for(policy: &Policy, agent: &AgentInfo) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    if agent.revoked {
        return Vec::new();
    }
    let Some(addr) = agent.addresses.first().copied() else {
        return Vec::new();
    };
    for r in policy
        .rules
        .iter()
        .filter(|r| matches(r, &agent.name, Some(agent), addr, 22))
    {
        out.extend(r.admins.iter().cloned());
        out.extend(
            r.groups
                .iter()
                .map(|g| format!("{}{g}", crate::ssh::names::GROUP_PRINCIPAL)),
        );
    }
    out.into_iter().collect()
}

/// Decides a jump by `admin`, configured or signed on (its groups from its certificate).
pub async fn decide_as(
    policy: &Policy,
    admin: &Admin,
    snap: &Snapshot,
    host: &str,
    port: u32,
) -> Result<Allowed, Denied> {
    let Ok(port) = u16::try_from(port) else {
        return Err(deny(format!("bad port {port}"), None, None));
    };
    if port == 0 {
        return Err(deny("bad port 0".into(), None, None));
    }
    let lhost = host.trim_end_matches('.').to_ascii_lowercase();
    let rules: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|r| applies_to(r, admin))
        .collect();
    if rules.is_empty() {
        return Err(deny(
            format!("no rule names admin {}", admin.name),
            None,
            None,
        ));
    }
    let (agent, addr) = if let Some(a) = find_agent(snap, policy.zone.as_deref(), &lhost) {
        match a.addresses.first() {
            Some(ip) => (Some(a), *ip),
            None => {
                let why = if a.refused.is_empty() {
                    String::new()
                } else {
                    let r: Vec<String> = a
                        .refused
                        .iter()
                        .map(|r| format!("{}: {}", r.address, r.reason))
                        .collect();
                    format!(" (refused claims: {})", r.join("; "))
                };
                return Err(deny(
                    format!("agent {} has no accepted address{why}", a.name),
                    None,
                    Some(a),
                ));
            }
        }
    } else if let Ok(ip) = lhost
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        // Credited only to the agent whose accepted address it is (never to a mere claim).
        let ip = ip.to_canonical();
        (snap.active().find(|a| a.addresses.contains(&ip)), ip)
    } else if rules
        .iter()
        .any(|r| r.hosts.iter().any(|g| g.is_match(&lhost)))
    {
        match tokio::net::lookup_host((lhost.as_str(), port)).await {
            Ok(mut it) => match it.next() {
                Some(sa) => (None, sa.ip()),
                None => return Err(deny(format!("{host} does not resolve"), None, None)),
            },
            Err(e) => return Err(deny(format!("{host} does not resolve: {e}"), None, None)),
        }
    } else {
        return Err(deny(
            format!("{host} is not an enrolled agent nor a host a rule allows"),
            None,
            None,
        ));
    };
    for r in rules {
        if matches(r, &lhost, agent.map(|a| a.as_ref()), addr, port) {
            return Ok(Allowed {
                addr,
                agent: agent.map(|a| a.name.clone()),
                rule: r.index,
            });
        }
    }
    Err(deny(
        format!("no rule allows {} to reach {host}:{port}", admin.name),
        Some(addr),
        agent,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::config::{AdminEntry, RuleEntry, SshConfig};
    use std::collections::BTreeMap;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D a@b";

    fn agent(name: &str, ip: &str, labels: &[(&str, &str)]) -> Arc<AgentInfo> {
        Arc::new(AgentInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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

    fn rule(admins: &[&str], f: impl FnOnce(&mut RuleEntry)) -> RuleEntry {
        let mut r = RuleEntry {
            admins: admins.iter().map(|s| s.to_string()).collect(),
            groups: vec![],
            agents: vec![],
            labels: BTreeMap::new(),
            cidrs: vec![],
            hosts: vec![],
            ports: vec![22],
        };
        f(&mut r);
        r
    }

    fn policy(rules: Vec<RuleEntry>) -> Policy {
        let text = "listen = \"127.0.0.1:1\"\naudit_log = \"/tmp/a\"\n";
        let mut cfg: SshConfig = toml::from_str(text).unwrap();
        for n in ["alice", "bob"] {
            cfg.admins.push(AdminEntry {
                name: n.into(),
                keys: vec![KEY.into()],
                groups: if n == "bob" {
                    vec!["ops".into()]
                } else {
                    vec![]
                },
            });
        }
        cfg.rules = rules;
        Policy::build(&cfg, Some("proj.test.")).unwrap()
    }

    #[test]
    fn vm_principals_follow_the_rules() {
        let p = policy(vec![
            rule(&["alice"], |r| r.agents = vec!["web*".into()]),
            rule(&[], |r| {
                r.groups = vec!["ops".into(), "dba".into()];
                r.labels = [("env".to_string(), "dev".to_string())].into();
            }),
            rule(&["bob"], |r| {
                r.agents = vec!["*".into()];
                r.ports = vec![2222];
            }),
            rule(&["bob"], |r| r.cidrs = vec!["10.0.0.6/32".into()]),
        ]);
        let web = agent("web01", "10.0.0.5", &[("env", "prod")]);
        assert_eq!(principals_for(&p, &web), ["alice"]);
        let db = agent("db01", "10.0.0.6", &[("env", "dev")]);
        assert_eq!(principals_for(&p, &db), ["bob", "group:dba", "group:ops"]);
        let mut gone = (*db).clone();
        gone.revoked = true;
        assert!(principals_for(&p, &gone).is_empty());
    }

    #[tokio::test]
    async fn resolution_and_rules() {
        let mut snap = Snapshot::default();
        snap.agents.insert(
            "web01".into(),
            agent("web01", "10.0.0.5", &[("env", "prod")]),
        );
        snap.agents
            .insert("db01".into(), agent("db01", "10.0.0.6", &[("env", "dev")]));
        let p = policy(vec![
            rule(&["alice"], |r| r.agents = vec!["web*".into()]),
            rule(&[], |r| {
                r.groups = vec!["ops".into()];
                r.labels = [("env".to_string(), "dev".to_string())].into();
                r.ports = vec![22, 2222];
            }),
            rule(&["alice"], |r| r.cidrs = vec!["192.168.0.0/16".into()]),
        ]);
        let ok = decide(&p, "alice", &snap, "web01", 22).await.unwrap();
        assert_eq!(ok.addr, "10.0.0.5".parse::<IpAddr>().unwrap());
        assert!(decide(&p, "alice", &snap, "WEB01.proj.test.", 22)
            .await
            .is_ok());
        assert!(decide(&p, "alice", &snap, "10.0.0.5", 22).await.is_ok());
        assert!(decide(&p, "alice", &snap, "web01", 23).await.is_err());
        let d = decide(&p, "alice", &snap, "db01", 22).await.unwrap_err();
        assert!(d.reason.contains("no rule allows alice"), "{}", d.reason);
        assert!(decide(&p, "bob", &snap, "db01", 2222).await.is_ok());
        assert!(decide(&p, "bob", &snap, "web01", 22).await.is_err());
        assert!(decide(&p, "alice", &snap, "192.168.3.4", 22).await.is_ok());
        assert!(decide(&p, "alice", &snap, "unknown.example", 22)
            .await
            .is_err());
        let mut revoked = (*agent("web01", "10.0.0.5", &[])).clone();
        revoked.revoked = true;
        snap.agents.insert("web01".into(), Arc::new(revoked));
        assert!(decide(&p, "alice", &snap, "web01", 22).await.is_err());
    }

    /// An address an agent only claims (refused by the address policy) is no target of its
    /// name and is not credited to it: `agents`/`labels` rules do not open it.
    #[tokio::test]
    async fn refused_claims_are_neither_targets_nor_credited() {
        let mut snap = Snapshot::default();
        let mut evil = (*agent("web66", "10.0.0.66", &[("env", "prod")])).clone();
        evil.addresses.clear();
        evil.claimed = vec!["127.0.0.1".parse().unwrap()];
        evil.refused = vec![crate::registry::RefusedAddress {
            address: "127.0.0.1".parse().unwrap(),
            reason: "an address of the bastion itself".into(),
        }];
        snap.agents.insert("web66".into(), Arc::new(evil));
        let p = policy(vec![rule(&["alice"], |r| r.agents = vec!["web*".into()])]);
        let d = decide(&p, "alice", &snap, "web66", 22).await.unwrap_err();
        assert!(d.reason.contains("no accepted address"), "{}", d.reason);
        assert!(d.reason.contains("bastion itself"), "{}", d.reason);
        let d = decide(&p, "alice", &snap, "127.0.0.1", 22)
            .await
            .unwrap_err();
        assert_eq!(d.agent, None, "credited to the claiming agent");
    }
}
