//! Messages on an agent's session stream (`AgentMessage`: heartbeats, host metrics
//! batches) decoded from hostile protobuf bytes and handled as the session does: host
//! metrics with hostile names, labels, NaN and infinities go through `HostMetrics::ingest`,
//! and the rendered exposition must stay valid Prometheus text.
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
        }
        _ => {}
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
