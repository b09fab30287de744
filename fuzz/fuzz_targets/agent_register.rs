//! The agents' Register call with a hostile decoded `RegisterRequest` (protobuf bytes as
//! they come off the wire after TLS): names, addresses, OS strings and SSH host keys of any
//! size and content go through the registry's checks and into the store.
#![no_main]

use bastide::registry::Facts;
use bastide_proto::v1::RegisterRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = RegisterRequest::decode(data) else {
        return;
    };
    let w = bastide_fuzz::world();
    let facts = Facts {
        claimed_name: r.claimed_name,
        hostname: r.hostname,
        addresses: r.addresses,
        os: r.os,
        agent_version: r.agent_version,
        ssh_host_keys: r.ssh_host_keys,
        config_revision: r.config_revision,
    };
    let peer = Some("192.0.2.7".parse().unwrap());
    let labels = w
        .registry
        .register(&w.identity, facts, peer)
        .expect("registration of an enrolled agent");
    assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
    let snap = w.registry.snapshot();
    let a = snap.agents.get(bastide_fuzz::AGENT).expect("agent kept");
    // What the registry keeps is bounded and clean, whatever was sent; the only address
    // it may accept is the observed one (claimed, or nothing claimed).
    assert!(a.claimed.len() <= 64);
    assert!(a.addresses.iter().all(|ip| Some(*ip) == peer), "{:?}", a.addresses);
    if a.claimed.is_empty() || a.claimed.contains(&peer.unwrap()) {
        assert_eq!(a.addresses, vec![peer.unwrap()]);
    }
    assert!(a.hostname.len() <= 1024 && !a.hostname.chars().any(char::is_control));
    assert!(a.os.len() <= 1024 && !a.os.chars().any(char::is_control));
    for k in &a.ssh_host_keys {
        assert!(!k.contains('\n'), "host key with a newline: {k:?}");
    }
});
