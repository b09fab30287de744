//! The address policy: the one place that decides which of the addresses an agent reports
//! may be used by any service (SSH targets, DNS records, SMTP and syslog allow-lists, syslog
//! attribution, known_hosts). An enrolled agent is authenticated, not trusted: what it says
//! about its addresses is a claim, checked here against the bastion's own configuration and
//! against the address its mTLS connection came from (the observed address).
//!
//! A claimed address is used only when it is
//! - not unspecified, multicast, broadcast or link-local (169.254.0.0/16, fe80::/10: the
//!   cloud metadata service lives there);
//! - not an address of the bastion itself (its interfaces' addresses and the addresses it
//!   listens on): an agent must not turn `ssh -J` or the relay into a path to the bastion;
//! - inside the agent networks (`[agents] networks`, default: the networks of the bastion's
//!   own interfaces, loopback excluded);
//! - loopback only when those networks name a loopback network explicitly (tests and
//!   single-machine demos give each agent its own 127.0.0.x; the bastion's addresses stay
//!   refused even then);
//! - with `claimed_addresses = "observed"` (the default), the address the agent's connection
//!   comes from.
//!
//! What is left is then unique across agents: an address several live agents hold belongs
//! to none of them (see [`resolve_conflicts`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Which claimed addresses are used, beyond the policy's fixed refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimedAddresses {
    /// Only the address the agent's mTLS connection comes from, when the agent also claims
    /// it (or claims nothing). A VM cannot name an address it does not send from. The safe
    /// default: a claim must be backed by evidence.
    #[default]
    Observed,
    /// Every claimed address inside the agent networks (VMs behind NAT, or multi-homed VMs
    /// whose bastion traffic leaves by another interface). Any VM can then claim any
    /// address of those networks; a claim shared with another live agent is still refused.
    Networks,
}

/// Why a claimed address is not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    Unspecified,
    Multicast,
    Broadcast,
    LinkLocal,
    Bastion,
    Loopback,
    OutsideNetworks,
    /// Mode `observed`: the connection came from another address (or none is known).
    NotObserved(Option<IpAddr>),
    /// Several agents hold it: their names (this one included).
    Conflict(Vec<String>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unspecified => write!(f, "unspecified address"),
            Self::Multicast => write!(f, "multicast address"),
            Self::Broadcast => write!(f, "broadcast address"),
            Self::LinkLocal => write!(f, "link-local address"),
            Self::Bastion => write!(f, "an address of the bastion itself"),
            Self::Loopback => write!(
                f,
                "loopback (allowed only when agents.networks names a loopback network)"
            ),
            Self::OutsideNetworks => write!(f, "outside agents.networks"),
            Self::NotObserved(Some(o)) => write!(
                f,
                "not the observed address {o} (agents.claimed_addresses = \"observed\")"
            ),
            Self::NotObserved(None) => write!(
                f,
                "no observed address yet (agents.claimed_addresses = \"observed\")"
            ),
            Self::Conflict(names) => write!(f, "claimed by several agents: {}", names.join(", ")),
        }
    }
}

/// The policy, built from the configuration (and the host's interfaces) at start and reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Agent networks: claims outside are refused.
    pub networks: Vec<IpNet>,
    /// The bastion's own addresses: always refused.
    pub bastion: BTreeSet<IpAddr>,
    pub claimed: ClaimedAddresses,
}

/// What the policy made of one agent's addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Judged {
    pub accepted: Vec<IpAddr>,
    pub refused: Vec<(IpAddr, Refusal)>,
    /// The observed address differs from every claimed address.
    pub mismatch: bool,
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.5`, what a dual-stack listener reports) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

impl AddressPolicy {
    /// `networks`: the configured agent networks (None: the networks of the host's
    /// interfaces, loopback excluded); `listen`: every address the bastion listens on.
    pub fn new(
        networks: Option<Vec<IpNet>>,
        listen: impl IntoIterator<Item = IpAddr>,
        claimed: ClaimedAddresses,
    ) -> Self {
        let ifaces = interfaces();
        let mut bastion: BTreeSet<IpAddr> = ifaces.iter().map(|(ip, _)| *ip).collect();
        bastion.extend(
            listen
                .into_iter()
                .map(canonical)
                .filter(|ip| !ip.is_unspecified()),
        );
        let networks = networks.unwrap_or_else(|| {
            let mut v: Vec<IpNet> = Vec::new();
            for (ip, net) in ifaces {
                if !ip.is_loopback() && !link_local(ip) && !v.contains(&net) {
                    v.push(net);
                }
            }
            v
        });
        Self {
            networks,
            bastion,
            claimed,
        }
    }

    /// Whether `ip` may be an agent's address, before the observed-address rule and
    /// conflicts.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(ip);
        if ip.is_unspecified() {
            return Err(Refusal::Unspecified);
        }
        if ip.is_multicast() {
            return Err(Refusal::Multicast);
        }
        if broadcast(ip) {
            return Err(Refusal::Broadcast);
        }
        if link_local(ip) {
            return Err(Refusal::LinkLocal);
        }
        if self.bastion.contains(&ip) {
            return Err(Refusal::Bastion);
        }
        if ip.is_loopback() {
            // Every loopback address reaches the bastion host itself: only a network the
            // admin wrote as loopback admits one (never 0.0.0.0/0 by accident).
            let explicit = self
                .networks
                .iter()
                .any(|n| n.network().is_loopback() && n.contains(&ip));
            return if explicit {
                Ok(())
            } else {
                Err(Refusal::Loopback)
            };
        }
        if !self.networks.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::OutsideNetworks);
        }
        Ok(())
    }

    /// Judges an agent's claims (deduplicated, in order) against the policy and the
    /// address its connection came from. With no claim at all, the observed address is
    /// the claim.
    pub fn judge(&self, claimed: &[IpAddr], observed: Option<IpAddr>) -> Judged {
        let observed = observed.map(canonical);
        let mut out = Judged::default();
        let claims: Vec<IpAddr> = if claimed.is_empty() {
            observed.into_iter().collect()
        } else {
            claimed.iter().copied().map(canonical).collect()
        };
        out.mismatch = match observed {
            Some(o) => !claimed.is_empty() && !claims.contains(&o),
            None => false,
        };
        for ip in claims {
            if out.accepted.contains(&ip) || out.refused.iter().any(|(r, _)| *r == ip) {
                continue;
            }
            let verdict = self.check(ip).and_then(|()| match self.claimed {
                ClaimedAddresses::Networks => Ok(()),
                ClaimedAddresses::Observed if observed == Some(ip) => Ok(()),
                ClaimedAddresses::Observed => Err(Refusal::NotObserved(observed)),
            });
            match verdict {
                Ok(()) => out.accepted.push(ip),
                Err(r) => out.refused.push((ip, r)),
            }
        }
        out
    }
}

/// One agent's candidate addresses, for [`resolve_conflicts`].
pub struct Candidate<'a> {
    pub name: &'a str,
    pub online: bool,
    pub accepted: &'a [IpAddr],
}

/// Addresses held by several agents: address -> the agents that lose it (names sorted).
/// An address claimed by several agents goes to the only online one among them, else to
/// none: two live agents on one address is a conflict nobody wins until it ends, and with
/// none online there is no evidence to choose by.
pub fn resolve_conflicts(agents: &[Candidate<'_>]) -> BTreeMap<IpAddr, (Vec<String>, Vec<String>)> {
    let mut holders: BTreeMap<IpAddr, Vec<(&str, bool)>> = BTreeMap::new();
    for a in agents {
        for ip in a.accepted {
            holders.entry(*ip).or_default().push((a.name, a.online));
        }
    }
    let mut out = BTreeMap::new();
    for (ip, hs) in holders {
        if hs.len() < 2 {
            continue;
        }
        let mut all: Vec<String> = hs.iter().map(|(n, _)| n.to_string()).collect();
        all.sort();
        let online: Vec<&str> = hs.iter().filter(|(_, o)| *o).map(|(n, _)| *n).collect();
        let losers: Vec<String> = if online.len() == 1 {
            all.iter()
                .filter(|n| n.as_str() != online[0])
                .cloned()
                .collect()
        } else {
            all.clone()
        };
        out.insert(ip, (losers, all));
    }
    out
}

/// The host's interface addresses with their networks.
fn interfaces() -> Vec<(IpAddr, IpNet)> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs
            .into_iter()
            .filter_map(|i| {
                let ip = canonical(i.ip());
                let net = match i.addr {
                    if_addrs::IfAddr::V4(a) => {
                        ipnet::Ipv4Net::new(a.ip, a.prefixlen).map(IpNet::V4).ok()
                    }
                    if_addrs::IfAddr::V6(a) => {
                        ipnet::Ipv6Net::new(a.ip, a.prefixlen).map(IpNet::V6).ok()
                    }
                }?;
                Some((ip, net.trunc()))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the host's interfaces: the default agent networks are empty");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(nets: &[&str], claimed: ClaimedAddresses) -> AddressPolicy {
        AddressPolicy {
            networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
            bastion: [ip("127.0.0.1"), ip("10.0.0.1"), ip("::1")].into(),
            claimed,
        }
    }

    #[test]
    fn fixed_refusals() {
        let p = policy(
            &["10.0.0.0/8", "169.254.0.0/16", "0.0.0.0/0"],
            ClaimedAddresses::Networks,
        );
        assert_eq!(p.check(ip("10.0.0.5")), Ok(()));
        assert_eq!(p.check(ip("::ffff:10.0.0.5")), Ok(()));
        assert_eq!(p.check(ip("10.0.0.1")), Err(Refusal::Bastion));
        assert_eq!(p.check(ip("::ffff:10.0.0.1")), Err(Refusal::Bastion));
        assert_eq!(p.check(ip("169.254.169.254")), Err(Refusal::LinkLocal));
        assert_eq!(p.check(ip("fe80::1")), Err(Refusal::LinkLocal));
        assert_eq!(p.check(ip("224.0.0.1")), Err(Refusal::Multicast));
        assert_eq!(p.check(ip("0.0.0.0")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("255.255.255.255")), Err(Refusal::Broadcast));
        // 0.0.0.0/0 is not an explicit loopback network.
        assert_eq!(p.check(ip("127.0.0.2")), Err(Refusal::Loopback));
        assert_eq!(p.check(ip("::1")), Err(Refusal::Bastion));
        let p = policy(&["10.0.0.0/8"], ClaimedAddresses::Networks);
        assert_eq!(p.check(ip("192.168.1.1")), Err(Refusal::OutsideNetworks));
        assert_eq!(p.check(ip("fd00::1")), Err(Refusal::OutsideNetworks));
    }

    #[test]
    fn loopback_only_when_listed_and_never_the_bastion() {
        let p = policy(&["127.0.0.0/8"], ClaimedAddresses::Networks);
        assert_eq!(p.check(ip("127.0.0.2")), Ok(()));
        assert_eq!(p.check(ip("127.0.0.1")), Err(Refusal::Bastion));
        assert_eq!(p.check(ip("10.0.0.5")), Err(Refusal::OutsideNetworks));
        let mut p = p;
        p.bastion.insert(ip("127.0.0.9"));
        assert_eq!(p.check(ip("127.0.0.9")), Err(Refusal::Bastion));
    }

    #[test]
    fn observed_mode_uses_only_the_observed_claim() {
        let p = policy(&["10.0.0.0/8"], ClaimedAddresses::Observed);
        let j = p.judge(
            &[ip("10.0.0.5"), ip("10.0.0.6")],
            Some(ip("::ffff:10.0.0.6")),
        );
        assert_eq!(j.accepted, vec![ip("10.0.0.6")]);
        assert_eq!(
            j.refused,
            vec![(ip("10.0.0.5"), Refusal::NotObserved(Some(ip("10.0.0.6"))))]
        );
        assert!(!j.mismatch);
        let j = p.judge(&[ip("10.0.0.5")], Some(ip("10.0.0.7")));
        assert!(j.accepted.is_empty());
        assert!(j.mismatch);
        // Nothing claimed: the observed address stands for the claim.
        let j = p.judge(&[], Some(ip("10.0.0.7")));
        assert_eq!(j.accepted, vec![ip("10.0.0.7")]);
        assert!(!j.mismatch);
        // Nothing observed (not connected since the bastion started).
        let j = p.judge(&[ip("10.0.0.5")], None);
        assert!(j.accepted.is_empty() && !j.mismatch);
        // The observed address is checked too.
        let j = p.judge(&[ip("10.0.0.1")], Some(ip("10.0.0.1")));
        assert_eq!(j.refused, vec![(ip("10.0.0.1"), Refusal::Bastion)]);
    }

    #[test]
    fn networks_mode_uses_every_valid_claim_and_flags_a_mismatch() {
        let p = policy(&["10.0.0.0/8"], ClaimedAddresses::Networks);
        let j = p.judge(
            &[
                ip("10.0.0.5"),
                ip("127.0.0.1"),
                ip("10.0.0.5"),
                ip("10.9.9.9"),
            ],
            Some(ip("10.0.0.7")),
        );
        assert_eq!(j.accepted, vec![ip("10.0.0.5"), ip("10.9.9.9")]);
        assert_eq!(j.refused, vec![(ip("127.0.0.1"), Refusal::Bastion)]);
        assert!(j.mismatch);
    }

    #[test]
    fn conflicts_go_to_the_only_online_holder_or_to_none() {
        let (a, b) = ([ip("10.0.0.5"), ip("10.0.0.6")], [ip("10.0.0.5")]);
        let both_online = [
            Candidate {
                name: "web02",
                online: true,
                accepted: &b,
            },
            Candidate {
                name: "web01",
                online: true,
                accepted: &a,
            },
        ];
        let c = resolve_conflicts(&both_online);
        assert_eq!(c.len(), 1);
        let (losers, all) = &c[&ip("10.0.0.5")];
        assert_eq!(losers, &vec!["web01".to_string(), "web02".to_string()]);
        assert_eq!(all, losers);
        let one_online = [
            Candidate {
                name: "web01",
                online: true,
                accepted: &a,
            },
            Candidate {
                name: "web02",
                online: false,
                accepted: &b,
            },
        ];
        let c = resolve_conflicts(&one_online);
        assert_eq!(c[&ip("10.0.0.5")].0, vec!["web02".to_string()]);
        let none_online = [
            Candidate {
                name: "web01",
                online: false,
                accepted: &a,
            },
            Candidate {
                name: "web02",
                online: false,
                accepted: &b,
            },
        ];
        assert_eq!(resolve_conflicts(&none_online)[&ip("10.0.0.5")].0.len(), 2);
    }

    #[test]
    fn default_networks_exclude_loopback() {
        let p = AddressPolicy::new(None, [ip("192.0.2.1")], ClaimedAddresses::Observed);
        assert!(p.networks.iter().all(|n| !n.network().is_loopback()));
        assert!(p.bastion.contains(&ip("192.0.2.1")));
        assert!(p.bastion.contains(&ip("127.0.0.1")));
    }
}
