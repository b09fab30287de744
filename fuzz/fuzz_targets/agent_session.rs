//! Messages on an agent's session stream (`AgentMessage`: heartbeats, host metrics
//! batches) decoded from hostile protobuf bytes and handled as the session does: host
//! metrics with hostile names, labels, NaN and infinities go through `HostMetrics::ingest`,
//! and the rendered exposition must stay valid Prometheus text; configuration results
//! (`ConfigResult`) go through `ConfigPushHandle::result` into the registry and its store.
#![no_main]

use bastide::hostmetrics::HostMetrics;
use bastide_proto::v1::{agent_message, AgentMessage};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = AgentMessage::decode(data) else {
        return;
    };
    let hosts = HostMetrics::new(std::time::Duration::from_secs(300));
    match m.kind {
        Some(agent_message::Kind::Metrics(batch)) => {
            let _ = hosts.ingest("web01", batch);
            let text = hosts.render_all();
            check_exposition(&text);
            if let Some(t) = hosts.render_agent("web01") {
                check_exposition(&t);
            }
        }
        Some(agent_message::Kind::Heartbeat(hb)) => {
            let _ = hb.seq.wrapping_add(1);
            bastide_fuzz::world()
                .registry
                .heartbeat(bastide_fuzz::AGENT);
        }
        // An agent's ACK/NACK of a pushed configuration: revision, file and error of any
        // size and content end up in the registry (and the store), and in a log line.
        Some(agent_message::Kind::ConfigResult(r)) => {
            let w = bastide_fuzz::world();
            bastide_fuzz::config_push().result(bastide_fuzz::AGENT, &r);
            let c = w
                .registry
                .config_state(bastide_fuzz::AGENT)
                .expect("state kept");
            for s in [&c.applied, &c.error] {
                assert!(
                    s.chars().count() <= 256,
                    "{} characters kept",
                    s.chars().count()
                );
                assert!(
                    !s.chars().any(char::is_control),
                    "control character kept: {s:?}"
                );
            }
            if r.ok {
                assert!(c.error.is_empty());
            }
            w.registry.flush_config().expect("config state stored");
        }
        None => {}
    }
});

/// Every line is a comment or `name{labels} value`, with a valid name and properly quoted
/// label values (no raw newline can end a line early).
fn check_exposition(text: &str) {
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c == ' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        assert!(
            bastide::hostmetrics::valid_metric_name(&line[..name_end]),
            "bad name in {line:?}"
        );
        let rest = &line[name_end..];
        let value = if let Some(r) = rest.strip_prefix('{') {
            // Walk the label set honouring escapes.
            let mut chars = r.char_indices();
            let mut in_q = false;
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' if in_q => {
                        chars.next();
                    }
                    '"' => in_q = !in_q,
                    '}' if !in_q => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated labels: {line:?}"));
            &r[end + 1..]
        } else {
            rest
        };
        let v = value.trim().split(' ').next().unwrap_or("");
        assert!(
            v.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&v),
            "bad value {v:?} in {line:?}"
        );
    }
}
