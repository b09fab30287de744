//! DNS query handling: hickory-proto parses the wire format, everything after is ours (ACL,
//! opcode/class/type checks, the authoritative zone built from the registry and static
//! records, EDNS sizes and truncation, the cache fed with a hostile upstream reply).
//! Input: one byte of flags, then a query and an upstream reply separated by the first
//! "\xff\xfe\xfd" (or no reply). Oracles: a reply parses, carries the query's id, and a
//! UDP reply never exceeds 512 bytes without EDNS nor the advertised 1232 with it.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use bastide::dns::fuzzing::Harness;
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use libfuzzer_sys::fuzz_target;

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        Harness::new(
            r#"
listen = ["127.0.0.1:53"]
upstreams = ["127.0.0.1:9"]
allow = ["127.0.0.0/8", "10.0.0.0/8"]
rate_limit = 0
reverse_zones = ["10.in-addr.arpa."]
[[records]]
name = "www"
type = "CNAME"
value = "web01"
[[records]]
name = "@"
type = "MX"
value = "10 mail"
[[records]]
name = "txt"
type = "TXT"
value = "a long text record that will need to be split into several character strings because it is longer than two hundred and fifty five characters, which is the limit of one character string in a TXT record: so here it goes on and on and on and on and on and on and on and on and on and on and on and on"
"#,
            "fuzz.test.",
            vec![
                ("web01".into(), vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()]),
                ("db01".into(), vec!["10.0.0.6".parse().unwrap()]),
            ],
        )
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (query, upstream) = match rest.windows(3).position(|w| w == b"\xff\xfe\xfd") {
        Some(p) => (&rest[..p], &rest[p + 3..]),
        None => (rest, &[][..]),
    };
    let w = bastide_fuzz::world();
    let _rt = w.runtime.enter();
    let tcp = flags & 1 != 0;
    let src: IpAddr = if flags & 2 != 0 {
        "192.0.2.1"
    } else {
        "127.0.0.1"
    }
    .parse()
    .unwrap();
    let Some(reply) = harness().answer(query, src, tcp, upstream) else {
        return;
    };
    assert!(reply.len() >= 12, "short reply");
    assert_eq!(reply[..2], query[..2], "reply id differs from the query's");
    assert!(reply[2] & 0x80 != 0, "reply without QR");
    if !tcp {
        assert!(reply.len() <= 1232, "UDP reply of {} bytes", reply.len());
        let q_edns = Message::from_vec(query).ok().and_then(|m| m.edns).is_some();
        if !q_edns {
            assert!(
                reply.len() <= 512,
                "UDP reply of {} bytes without EDNS",
                reply.len()
            );
        }
    }
    if reply.len() > 12 {
        let m = Message::from_vec(&reply).expect("our reply parses");
        // Never a zone transfer.
        if m.queries
            .first()
            .is_some_and(|q| matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR))
        {
            assert!(
                m.answers.is_empty(),
                "records given to a zone transfer request"
            );
        }
    }
});
