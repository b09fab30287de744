//! The agents' `ShipLogs` stream as the bastion serves it (`logs::ingest::ship`): the request
//! body is decoded by tonic's own gRPC framing and prost (`Streaming<LogBatch>`, the
//! bastion's 16 MiB message limit), batches are formatted and stored in a real log store
//! (on tmpfs, a fresh one per input), acknowledgements come back in order.
//!
//! Hostile values: huge batches (a record can be repeated: protobuf concatenation appends
//! events), empty batches and events, non-UTF-8 messages, control characters, any epoch,
//! seq 0, repeated, decreasing or `u64::MAX` sequence numbers, compressed-flag frames.
//!
//! Input: byte 0 = `max_event_bytes` choice, byte 1 = size of the HTTP/2 data frames the
//! body arrives in, byte 2 bit 0 = raw body (the rest as is); otherwise records
//! `[flags][len u16 BE][payload]`, flags bit 0 = compressed flag, bits 1/2 = payload
//! repeated 64/4096 times.
//!
//! Oracles (framed mode): the acks are exactly the batches read before the first refused
//! one, in order; the store holds exactly one line per event of every batch whose seq was
//! above the epoch's high-water mark (duplicates stored once), each a valid line of web01.
#![no_main]

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bastide::logs::format::parse_line;
use bastide::logs::ingest::{ship, MAX_EVENTS};
use bastide::logs::{Logs, LogsConfig};
use bastide_proto::v1::{LogAck, LogBatch};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::codec::{BufferSettings, Streaming};
use tonic_prost::ProstDecoder;

const MAX_EVENT: [usize; 4] = [64, 1024, 65_536, 16 * 1024 * 1024];
/// The largest body built from one input (repetition included).
const MAX_BODY: usize = 24 * 1024 * 1024;

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn base() -> &'static PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| bastide_fuzz::scratch_dir("logs"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max_event = MAX_EVENT[usize::from(data[0] & 3)];
    let frame = usize::from(data[1]).max(1) * 64;
    let raw = data[2] & 1 == 1;
    let rest = &data[3..];

    // The body, and (framed mode) the batches tonic will hand over, in order.
    let mut body = Vec::new();
    let mut batches: Option<Vec<LogBatch>> = None;
    if raw {
        body.extend_from_slice(rest);
    } else {
        let mut expect = Vec::new();
        let mut valid = true;
        let mut r = rest;
        while r.len() >= 3 {
            let flags = r[0];
            let len = usize::from(u16::from_be_bytes([r[1], r[2]])).min(r.len() - 3);
            let payload = &r[3..3 + len];
            r = &r[3 + len..];
            let times = match flags & 6 {
                0 => 1,
                2 => 64,
                _ => 4096,
            };
            if body.len() + 5 + payload.len() * times > MAX_BODY {
                break;
            }
            let msg = payload.repeat(times);
            body.push(flags & 1);
            body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            body.extend_from_slice(&msg);
            if valid {
                // No compression was negotiated: a compressed frame ends the stream.
                let fits = msg.len() <= bastide::agents::MAX_MESSAGE;
                match (flags & 1, LogBatch::decode(msg.as_slice())) {
                    (0, Ok(b)) if fits => expect.push(b),
                    _ => valid = false,
                }
            }
        }
        batches = Some(expect);
    }

    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = base().join(n.to_string());
    let cfg: LogsConfig = toml::from_str(&format!("max_event_bytes = {max_event}")).unwrap();
    let logs = Logs::open(cfg, &dir).unwrap();

    let frames: Vec<Result<Frame<Bytes>, Infallible>> = body
        .chunks(frame)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(tokio_stream::iter(frames));
    let inbound = Streaming::new_request(
        ProstDecoder::<LogBatch>::new(BufferSettings::default()),
        body,
        None,
        Some(bastide::agents::MAX_MESSAGE),
    );
    let (acks, refused) = rt().block_on(async {
        let mut out = ship(
            logs,
            "web01".into(),
            inbound,
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        let mut acks: Vec<LogAck> = Vec::new();
        let mut refused = 0;
        while let Some(r) = out.next().await {
            match r {
                Ok(a) => acks.push(a),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
                    refused += 1;
                }
            }
        }
        (acks, refused)
    });
    assert!(refused <= 1);

    // What was stored.
    let mut stored = 0usize;
    if let Ok(days) = std::fs::read_dir(dir.join("logs").join("web01")) {
        for d in days {
            let text = std::fs::read(d.unwrap().path()).unwrap();
            let text = String::from_utf8(text).expect("stored lines are UTF-8");
            for line in text.lines() {
                let p = parse_line(line).unwrap_or_else(|| panic!("bad line {line:?}"));
                assert_eq!(p.host, "web01");
                stored += 1;
            }
            assert_eq!(text.matches('\n').count(), text.lines().count());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let Some(batches) = batches else {
        for a in &acks {
            assert!(a.seq >= 1);
        }
        return;
    };
    let accepted: Vec<&LogBatch> = batches
        .iter()
        .take_while(|b| b.seq != 0 && b.events.len() <= MAX_EVENTS)
        .collect();
    let want: Vec<(u64, u64)> = accepted.iter().map(|b| (b.epoch, b.seq)).collect();
    let got: Vec<(u64, u64)> = acks.iter().map(|a| (a.epoch, a.seq)).collect();
    assert_eq!(got, want, "acknowledgements");
    assert_eq!(refused, usize::from(accepted.len() < batches.len()));
    let mut hwm: HashMap<u64, u64> = HashMap::new();
    let mut lines = 0usize;
    for b in &accepted {
        let h = hwm.entry(b.epoch).or_insert(0);
        if b.seq > *h {
            *h = b.seq;
            lines += b.events.len();
        }
    }
    assert_eq!(stored, lines, "lines stored (exactly once)");
});
