//! The authoritative part: the project zone (an A/AAAA per enrolled, non-revoked agent, SOA,
//! NS, static records) and the reverse zones (a PTR per agent address), rebuilt as a whole
//! from each registry snapshot that changes what they publish. Lookups read an immutable
//! `ZoneData`, so a rebuild never blocks a query.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::Settings;
use crate::registry::Snapshot;

/// Most CNAMEs followed inside the zone for one answer.
const MAX_CHAIN: usize = 8;

/// What the zone publishes of the agents: (name, addresses), sorted by name.
pub(crate) type Projection = Vec<(String, Vec<IpAddr>)>;

/// The agents the zone publishes: non-revoked agents with their ACCEPTED addresses only
/// (the registry applies the address policy, `crate::addresses`; claims it refused, loopback,
/// link-local, the bastion's own addresses or an address two agents claim, never get a
/// record).
pub(crate) fn projection(_s: &Settings, snap: &Snapshot) -> Projection {
    snap.active()
        .map(|a| (a.name.clone(), a.addresses.clone()))
        .collect()
}

/// One zone we are authoritative for.
#[derive(Debug)]
struct Auth {
    origin: Name,
    soa: Record,
    nodes: HashMap<Name, Vec<Record>>,
}

impl Auth {
    fn new(origin: Name, s: &Settings, serial: u32) -> Self {
        let rname = Name::from_ascii("hostmaster")
            .and_then(|h| h.append_domain(s.zone.as_ref().unwrap_or(&origin)))
            .unwrap_or_else(|_| origin.clone());
        let soa = Record::from_rdata(
            origin.clone(),
            s.zone_ttl,
            RData::SOA(SOA::new(
                s.nameserver.clone(),
                rname,
                serial,
                3600,
                600,
                604_800,
                s.zone_ttl,
            )),
        );
        let ns = Record::from_rdata(
            origin.clone(),
            s.zone_ttl,
            RData::NS(NS(s.nameserver.clone())),
        );
        let mut a = Self {
            origin,
            soa: soa.clone(),
            nodes: HashMap::new(),
        };
        a.add(soa);
        a.add(ns);
        a
    }

    /// Adds a record and makes every name between it and the origin exist (empty
    /// non-terminals answer NODATA, not NXDOMAIN).
    fn add(&mut self, r: Record) {
        let mut n = r.name.base_name();
        self.nodes.entry(r.name.clone()).or_default().push(r);
        while self.origin.zone_of(&n) && n != self.origin {
            self.nodes.entry(n.clone()).or_default();
            n = n.base_name();
        }
    }

    /// The SOA of a negative answer: its TTL is the negative TTL (RFC 2308 section 3).
    fn negative_soa(&self) -> Record {
        let mut soa = self.soa.clone();
        if let RData::SOA(s) = &soa.data {
            soa.ttl = soa.ttl.min(s.minimum);
        }
        soa
    }
}

/// An authoritative answer.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
}

/// Every zone we answer for, immutable once built.
#[derive(Debug, Default)]
pub(crate) struct ZoneData {
    /// Most specific origin first.
    auths: Vec<Auth>,
    pub serial: u32,
}

fn addr_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, data)
}

/// Builds the zones from the settings and the agents.
pub(crate) fn build(s: &Settings, agents: &Projection, serial: u32) -> ZoneData {
    let Some(zone) = &s.zone else {
        return ZoneData::default();
    };
    let mut main = Auth::new(zone.clone(), s, serial);
    for r in &s.statics {
        main.add(r.clone());
    }
    let mut reverse: Vec<Auth> = s
        .reverse_zones
        .iter()
        .map(|z| Auth::new(z.clone(), s, serial))
        .collect();
    for (name, addrs) in agents {
        let Ok(fqdn) = Name::from_ascii(name).and_then(|n| n.append_domain(zone)) else {
            continue;
        };
        let fqdn = fqdn.to_lowercase();
        for ip in addrs {
            main.add(addr_record(fqdn.clone(), s.zone_ttl, *ip));
            let rev = Name::from(*ip);
            if let Some(auth) = reverse.iter_mut().find(|a| a.origin.zone_of(&rev)) {
                auth.add(Record::from_rdata(
                    rev,
                    s.zone_ttl,
                    RData::PTR(PTR(fqdn.clone())),
                ));
            }
        }
    }
    // The name server's own address, unless the zone already names it.
    let ns_has_addr = main.nodes.get(&s.nameserver).is_some_and(|v| !v.is_empty());
    if zone.zone_of(&s.nameserver) && !ns_has_addr {
        for l in &s.listen {
            if !l.ip().is_unspecified() {
                main.add(addr_record(s.nameserver.clone(), s.zone_ttl, l.ip()));
            }
        }
    }
    let mut auths = vec![main];
    auths.extend(reverse);
    auths.sort_by_key(|a| std::cmp::Reverse(a.origin.num_labels()));
    ZoneData { auths, serial }
}

impl ZoneData {
    /// The authoritative answer for `qname`/`qtype`, or None when it is not ours.
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Option<Answer> {
        let auth = self.auths.iter().find(|a| a.origin.zone_of(qname))?;
        let mut answers: Vec<Record> = Vec::new();
        let mut name = qname.clone();
        let owner = |r: &Record, n: &Name| {
            // The query's spelling of the name, so that case is preserved.
            let mut r = r.clone();
            if r.name == *n {
                r.name = n.clone();
            }
            r
        };
        let nodata = |answers, auth: &Auth| Answer {
            rcode: ResponseCode::NoError,
            answers,
            authority: vec![auth.negative_soa()],
        };
        for _ in 0..MAX_CHAIN {
            let Some(node) = auth.nodes.get(&name) else {
                return Some(Answer {
                    rcode: ResponseCode::NXDomain,
                    answers,
                    authority: vec![auth.negative_soa()],
                });
            };
            if qtype == RecordType::ANY {
                // RFC 8482: one RRset is a complete answer to ANY.
                let Some(t) = node.first().map(Record::record_type) else {
                    return Some(nodata(answers, auth));
                };
                answers.extend(
                    node.iter()
                        .filter(|r| r.record_type() == t)
                        .map(|r| owner(r, &name)),
                );
                return Some(Answer {
                    rcode: ResponseCode::NoError,
                    answers,
                    authority: Vec::new(),
                });
            }
            let before = answers.len();
            answers.extend(
                node.iter()
                    .filter(|r| r.record_type() == qtype)
                    .map(|r| owner(r, &name)),
            );
            if answers.len() > before {
                return Some(Answer {
                    rcode: ResponseCode::NoError,
                    answers,
                    authority: Vec::new(),
                });
            }
            match node.iter().find_map(|r| match &r.data {
                RData::CNAME(t) => Some((r, t.0.clone())),
                _ => None,
            }) {
                Some((r, target)) => {
                    answers.push(owner(r, &name));
                    if !auth.origin.zone_of(&target) {
                        return Some(Answer {
                            rcode: ResponseCode::NoError,
                            answers,
                            authority: Vec::new(),
                        });
                    }
                    name = target;
                }
                None => return Some(nodata(answers, auth)),
            }
        }
        Some(Answer {
            rcode: ResponseCode::NoError,
            answers,
            authority: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::DnsConfig;
    use super::*;

    fn settings() -> Settings {
        let c: DnsConfig = toml::from_str(
            r#"
            listen = ["127.0.0.1:5353"]
            reverse_zones = ["10.in-addr.arpa."]
            [[records]]
            name = "www"
            type = "CNAME"
            value = "web01"
            [[records]]
            name = "_sip._tcp"
            type = "SRV"
            value = "10 5 5060 web01"
        "#,
        )
        .unwrap();
        c.settings(Some("proj.test.")).unwrap()
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn agents_statics_and_negative_answers() {
        let s = settings();
        let agents = vec![(
            "web01".to_string(),
            vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        )];
        let z = build(&s, &agents, 7);
        let a = z.lookup(&n("WEB01.proj.test."), RecordType::A).unwrap();
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].name.to_string(), "WEB01.proj.test.");
        let aaaa = z.lookup(&n("web01.proj.test."), RecordType::AAAA).unwrap();
        assert_eq!(aaaa.answers.len(), 1);
        // CNAME chased inside the zone.
        let w = z.lookup(&n("www.proj.test."), RecordType::A).unwrap();
        assert_eq!(w.answers.len(), 2);
        // Missing name: NXDOMAIN with the SOA; empty non-terminal: NODATA.
        let nx = z.lookup(&n("nope.proj.test."), RecordType::A).unwrap();
        assert_eq!(nx.rcode, ResponseCode::NXDomain);
        assert!(matches!(nx.authority[0].data, RData::SOA(_)));
        let ent = z.lookup(&n("_tcp.proj.test."), RecordType::A).unwrap();
        assert_eq!(ent.rcode, ResponseCode::NoError);
        assert!(ent.answers.is_empty() && ent.authority.len() == 1);
        // PTR in the reverse zone.
        let p = z
            .lookup(&n("5.0.0.10.in-addr.arpa."), RecordType::PTR)
            .unwrap();
        assert_eq!(p.answers.len(), 1);
        assert!(z.lookup(&n("example.org."), RecordType::A).is_none());
        // NS and the name server's glue from `listen`.
        let ns = z.lookup(&n("proj.test."), RecordType::NS).unwrap();
        assert_eq!(ns.answers.len(), 1);
        let glue = z.lookup(&n("bastion.proj.test."), RecordType::A).unwrap();
        assert_eq!(glue.answers.len(), 1);
    }

    #[test]
    fn only_accepted_addresses_of_active_agents() {
        let s = settings();
        let mut snap = Snapshot::default();
        let info = crate::registry::AgentInfo {
            name: "db".into(),
            labels: Default::default(),
            revoked: false,
            online: true,
            hostname: String::new(),
            addresses: vec!["10.1.1.1".parse().unwrap()],
            claimed: vec![
                "169.254.169.254".parse().unwrap(),
                "10.1.1.1".parse().unwrap(),
            ],
            os: String::new(),
            agent_version: String::new(),
            ssh_host_keys: vec![],
            enrolled_at: 0,
            cert_serial: String::new(),
            cert_not_after: 0,
            ..Default::default()
        };
        snap.agents
            .insert("db".into(), std::sync::Arc::new(info.clone()));
        let mut revoked = info;
        revoked.name = "old".into();
        revoked.revoked = true;
        snap.agents
            .insert("old".into(), std::sync::Arc::new(revoked));
        let p = projection(&s, &snap);
        assert_eq!(
            p,
            vec![("db".to_string(), vec!["10.1.1.1".parse().unwrap()])]
        );
    }
}
