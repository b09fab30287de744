//! The syslog receiver's framing and parsing (`syslog::fuzzing`): RFC 6587 octet counting
//! and LF framing detected per message, over a TCP stream cut into reads of any size, or one
//! UDP datagram; each frame parsed as RFC 5424 / RFC 3164 (`syslog_loose`) and stored as one
//! line. Byte 0 picks `max_message_bytes`, byte 1 the read size, byte 2 the mode.
#![no_main]

use bastide::logs::format::{parse_line, parse_ts, FACILITIES, SEVERITIES};
use bastide::logs::Chunk;
use bastide::syslog::fuzzing;
use libfuzzer_sys::fuzz_target;

const MAX: [usize; 8] = [1, 8, 64, 200, 480, 2048, 8192, 65_536];

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max = MAX[usize::from(data[0] & 7)];
    let step = usize::from(data[1]).max(1);
    let mode = data[2];
    let input = &data[3..];
    let agent = (mode & 1 == 1).then_some("web01");
    let peer = if mode & 4 == 0 {
        "192.0.2.7".parse().unwrap()
    } else {
        "::ffff:192.0.2.7".parse().unwrap()
    };
    if mode & 2 == 2 {
        let chunks = fuzzing::datagram(input, max, peer, agent);
        let lines = check_chunks(&chunks, agent);
        assert!(lines <= 1, "one datagram, {lines} lines");
        return;
    }
    let reads: Vec<&[u8]> = if input.is_empty() {
        vec![input]
    } else {
        input.chunks(step).collect()
    };
    let (frames, chunks) = fuzzing::stream(&reads, max, peer, agent);
    // Framing must not depend on how TCP cut the stream.
    let (whole, _) = fuzzing::stream(&[input], max, peer, agent);
    assert_eq!(frames, whole, "frames differ with reads of {step} bytes");
    let mut framed = 0usize;
    let mut nonempty = 0usize;
    for (f, truncated) in &frames {
        assert!(f.len() <= max, "frame of {} bytes > max {max}", f.len());
        if *truncated {
            assert_eq!(f.len(), max, "a truncated frame is cut at max");
        }
        framed += f.len();
        let trimmed = f
            .iter()
            .rposition(|b| !matches!(b, b'\n' | b'\r' | 0))
            .map_or(0, |i| i + 1);
        if trimmed > 0 {
            nonempty += 1;
        }
    }
    assert!(
        framed <= input.len(),
        "frames hold more bytes than were sent"
    );
    let lines = check_chunks(&chunks, agent);
    assert_eq!(
        lines, nonempty,
        "every non-empty frame is stored as one line"
    );
});

/// Every stored line is one line of the store's format, filed under a safe host name.
fn check_chunks(chunks: &[Chunk], agent: Option<&str>) -> usize {
    let mut total = 0usize;
    for c in chunks {
        let host: &str = &c.host;
        assert!(
            !host.is_empty() && !host.contains('/') && !host.starts_with('.') && host.len() <= 253,
            "unsafe host {host:?}"
        );
        if let Some(a) = agent {
            assert_eq!(host, a);
        }
        let text = std::str::from_utf8(&c.data).expect("stored lines are UTF-8");
        assert!(text.is_empty() || text.ends_with('\n'));
        let n = text.lines().count();
        assert_eq!(n, c.lines as usize, "line count of {host}");
        assert_eq!(text.matches('\n').count(), n);
        for line in text.lines() {
            let p = parse_line(line).unwrap_or_else(|| panic!("unparseable line {line:?}"));
            assert_eq!(p.host, host);
            assert!(
                parse_ts(p.ts).is_some() && p.ts.len() == 24,
                "bad ts in {line:?}"
            );
            assert!(!p.app.is_empty() && !p.app.contains(' '));
            assert!(FACILITIES.contains(&p.facility), "{line:?}");
            assert!(SEVERITIES.contains(&p.severity), "{line:?}");
            assert!(!p.message.contains('\r') && !p.message.contains('\0'));
        }
        total += n;
    }
    total
}
