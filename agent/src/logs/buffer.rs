//! The bounded on-disk buffer of log batches not yet acknowledged by the bastion.
//!
//! Segment files `seg-<first seq>.buf` hold records `[len u32][crc32 u32][seq u64]
//! [created_ms i64][events u32][LogBatch protobuf]`, appended and fdatasynced before a batch
//! counts as buffered (and before any source checkpoint moves past its lines). A torn record
//! at the tail after a crash fails its CRC and is cut off. `state.json` holds the epoch
//! (random, chosen at creation) and the highest acknowledged sequence number; it is written
//! atomically before any segment is deleted, so sequence numbers never restart within an
//! epoch (the bastion would take new batches for duplicates).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bastide_proto::v1::{LogBatch, LogEvent};
use prost::Message;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::fsutil::{sync_dir, write_atomic};

const HEADER: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    epoch: u64,
    acked: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    seg: u64,
    offset: u64,
    len: u32,
    created_ms: i64,
    events: u32,
    meta_len: u32,
}

#[derive(Debug)]
struct Segment {
    first: u64,
    last: u64,
    len: u64,
}

/// Appends `e` as one `LogBatch.events` field (tag 3), the way prost encodes it.
pub fn encode_event(e: &LogEvent, out: &mut Vec<u8>) {
    prost::encoding::message::encode(3, e, out);
}

/// Appends one `LogBatch.events` field (tag 3) from borrowed parts: what a file source
/// produces per line without building a `LogEvent` (same bytes as `encode_event`).
pub fn encode_event_parts(
    out: &mut Vec<u8>,
    timestamp_ms: i64,
    source: &str,
    app: &str,
    severity: u32,
    facility: u32,
    message: &[u8],
) {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let delimited = |tag: u32, len: usize| {
        if len == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(len as u64) + len
        }
    };
    let varint = |tag: u32, v: u64| {
        if v == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(v)
        }
    };
    let len = varint(1, timestamp_ms as u64)
        + delimited(2, source.len())
        + delimited(3, app.len())
        + varint(4, u64::from(severity))
        + varint(5, u64::from(facility))
        + delimited(6, message.len());
    out.reserve(len + 6);
    encode_key(3, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
    if timestamp_ms != 0 {
        encode_key(1, WireType::Varint, out);
        encode_varint(timestamp_ms as u64, out);
    }
    for (tag, b) in [(2, source.as_bytes()), (3, app.as_bytes())] {
        if !b.is_empty() {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(b.len() as u64, out);
            out.extend_from_slice(b);
        }
    }
    for (tag, v) in [(4, severity), (5, facility)] {
        if v != 0 {
            encode_key(tag, WireType::Varint, out);
            encode_varint(u64::from(v), out);
        }
    }
    if !message.is_empty() {
        encode_key(6, WireType::LengthDelimited, out);
        encode_varint(message.len() as u64, out);
        out.extend_from_slice(message);
    }
}

/// The `seq` field of an encoded `LogBatch` (its head precedes its events, as
/// `append_encoded` writes it), without decoding the events.
fn batch_seq(mut buf: &[u8]) -> Result<u64> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut seq = 0;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf)?;
        match (tag, wire) {
            (2, WireType::Varint) => seq = decode_varint(&mut buf)?,
            // The events: the head is complete.
            (3, _) => break,
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok(seq)
}

/// A buffered record whose tail is its batch encoded as a `LogBatch` message.
#[derive(Debug)]
pub struct RawBatch {
    rec: Vec<u8>,
    start: usize,
}

impl RawBatch {
    /// The `LogBatch` protobuf encoding.
    pub fn encoded(&self) -> &[u8] {
        self.rec.get(self.start..).unwrap_or(&[])
    }
}

/// The buffer is full: the caller waits for acknowledgements (backpressure).
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

pub struct Buffer {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    epoch: u64,
    acked: u64,
    next_seq: u64,
    segments: VecDeque<Segment>,
    /// Open for appending: the last segment.
    active: Option<File>,
    index: VecDeque<Entry>,
    disk_bytes: u64,
    /// Newest batch whose checkpoint updates are in the checkpoints file (see `set_floor`).
    floor: u64,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.buf"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`, repairing a torn tail.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        crate::fsutil_ensure_dir(dir)
            .with_context(|| format!("creating log buffer directory {}", dir.display()))?;
        let state_path = dir.join("state.json");
        let state = match fs::read(&state_path) {
            Ok(b) => serde_json::from_slice::<StateFile>(&b)
                .with_context(|| format!("{}: corrupt", state_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = StateFile {
                    epoch: rand::random::<u64>() | 1,
                    acked: 0,
                };
                write_atomic(&state_path, &serde_json::to_vec(&s)?, 0o600)?;
                s
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_path.display())),
        };
        let mut firsts: Vec<u64> = Vec::new();
        for de in fs::read_dir(dir)? {
            let name = de?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_prefix("seg-")
                .and_then(|r| r.strip_suffix(".buf"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(n);
            }
        }
        firsts.sort_unstable();
        let mut b = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(64 << 10, 64 << 20),
            epoch: state.epoch,
            acked: state.acked,
            next_seq: state.acked + 1,
            segments: VecDeque::new(),
            active: None,
            index: VecDeque::new(),
            disk_bytes: 0,
            floor: u64::MAX,
        };
        for first in firsts {
            b.load_segment(first)?;
        }
        if let Some(e) = b.index.back() {
            b.next_seq = b.next_seq.max(e.seq + 1);
        }
        while b.index.front().is_some_and(|e| e.seq <= b.acked) {
            b.index.pop_front();
        }
        if let Some(last) = b.segments.back() {
            if last.len < b.segment_bytes {
                let f = OpenOptions::new()
                    .append(true)
                    .open(seg_path(dir, last.first))?;
                b.active = Some(f);
            }
        }
        b.delete_acked_segments()?;
        Ok(b)
    }

    fn load_segment(&mut self, first: u64) -> Result<()> {
        let path = seg_path(&self.dir, first);
        let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut off = 0usize;
        let mut last = 0;
        let mut entries = Vec::new();
        while off + HEADER <= data.len() {
            let h = &data[off..off + HEADER];
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            if len < HEADER
                || off + len > data.len()
                || crc32fast::hash(&data[off + 8..off + len]) != crc
            {
                break;
            }
            let seq = u64::from_le_bytes(h[8..16].try_into()?);
            let created_ms = i64::from_le_bytes(h[16..24].try_into()?);
            let events = u32::from_le_bytes(h[24..28].try_into()?);
            let meta_len = u32::from_le_bytes(h[28..32].try_into()?);
            if HEADER + meta_len as usize > len {
                break;
            }
            let expected = entries.last().map(|e: &Entry| e.seq + 1).unwrap_or(seq);
            if seq != expected || self.index.back().is_some_and(|e| seq <= e.seq) {
                break;
            }
            entries.push(Entry {
                seq,
                seg: first,
                offset: off as u64,
                len: len as u32,
                created_ms,
                events,
                meta_len,
            });
            last = seq;
            off += len;
        }
        if off < data.len() {
            warn!(segment = %path.display(), kept = off, dropped = data.len() - off, "log buffer: cutting a torn or corrupt tail");
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(off as u64)?;
            f.sync_all()?;
        }
        if entries.is_empty() {
            fs::remove_file(&path)?;
            return Ok(());
        }
        self.index.extend(entries);
        self.segments.push_back(Segment {
            first,
            last,
            len: off as u64,
        });
        self.disk_bytes += off as u64;
        Ok(())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Sequence number of the newest batch (acked or not); 0 when none yet.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Bytes on disk in segments.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Unacknowledged batches and their events.
    pub fn pending(&self) -> (usize, u64) {
        (
            self.index.len(),
            self.index.iter().map(|e| u64::from(e.events)).sum(),
        )
    }

    /// Creation time of the oldest unacknowledged batch (ms since the epoch).
    pub fn oldest_ms(&self) -> Option<i64> {
        self.index.front().map(|e| e.created_ms)
    }

    /// Appends a batch durably, with `meta` (the checkpoint updates its events carry) kept
    /// beside it; its sequence number, or `Full`.
    pub fn append(
        &mut self,
        events: &[LogEvent],
        meta: &[u8],
    ) -> Result<std::result::Result<u64, Full>> {
        let mut data = Vec::new();
        for e in events {
            encode_event(e, &mut data);
        }
        self.append_encoded(&data, events.len() as u32, meta)
    }

    /// `append` of `n` events already encoded as `LogBatch.events` fields (see
    /// `encode_event`), written as they are: no per-event work and no copy of the batch.
    pub fn append_encoded(
        &mut self,
        data: &[u8],
        n: u32,
        meta: &[u8],
    ) -> Result<std::result::Result<u64, Full>> {
        let seq = self.next_seq;
        // The LogBatch's own fields; its events follow as they are.
        let head = LogBatch {
            epoch: self.epoch,
            seq,
            events: Vec::new(),
        };
        let len = HEADER + meta.len() + head.encoded_len() + data.len();
        if len > u32::MAX as usize / 2 {
            bail!("log batch too large");
        }
        if self.disk_bytes + len as u64 > self.max_bytes && !self.segments.is_empty() {
            return Ok(Err(Full));
        }
        let created_ms = now_ms();
        let mut rec = Vec::with_capacity(len - data.len());
        rec.extend_from_slice(&(len as u32).to_le_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&seq.to_le_bytes());
        rec.extend_from_slice(&created_ms.to_le_bytes());
        rec.extend_from_slice(&n.to_le_bytes());
        rec.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        rec.extend_from_slice(meta);
        head.encode(&mut rec)?;
        debug_assert_eq!(rec.len() + data.len(), len);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&rec[8..]);
        crc.update(data);
        rec[4..8].copy_from_slice(&crc.finalize().to_le_bytes());

        let roll = match self.segments.back() {
            Some(s) => self.active.is_none() || s.len >= self.segment_bytes,
            None => true,
        };
        if roll {
            let path = seg_path(&self.dir, seq);
            let f = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            sync_dir(&self.dir)?;
            self.active = Some(f);
            self.segments.push_back(Segment {
                first: seq,
                last: seq,
                len: 0,
            });
        }
        let (Some(f), Some(seg)) = (self.active.as_mut(), self.segments.back_mut()) else {
            bail!("log buffer: no active segment");
        };
        if let Err(e) = f
            .write_all(&rec)
            .and_then(|()| f.write_all(data))
            .and_then(|()| f.sync_data())
        {
            // Do not leave a half record: the next append would follow garbage.
            let _ = f.set_len(seg.len);
            return Err(e).context("writing the log buffer");
        }
        self.index.push_back(Entry {
            seq,
            seg: seg.first,
            offset: seg.len,
            len: len as u32,
            created_ms,
            events: n,
            meta_len: meta.len() as u32,
        });
        seg.len += len as u64;
        seg.last = seq;
        self.disk_bytes += len as u64;
        self.next_seq += 1;
        Ok(Ok(seq))
    }

    /// The record of `e`, checksum verified, and checked to be the batch `e` names: a
    /// corrupted or misplaced index entry is an error, never another batch.
    fn record(&self, e: &Entry) -> Result<Vec<u8>> {
        let path = seg_path(&self.dir, e.seg);
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        if (e.len as usize) < HEADER {
            bail!(
                "{}: index entry of batch {} is shorter than a record header",
                path.display(),
                e.seq
            );
        }
        let mut rec = vec![0u8; e.len as usize];
        f.read_exact_at(&mut rec, e.offset)?;
        let crc = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
        if crc32fast::hash(&rec[8..]) != crc {
            bail!("{}: record {} fails its checksum", path.display(), e.seq);
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&rec[8..16]);
        let found = u64::from_le_bytes(seq);
        if found != e.seq {
            bail!(
                "{}: the index points batch {} at the record of batch {found}",
                path.display(),
                e.seq
            );
        }
        Ok(rec)
    }

    /// The batch `seq` still encoded (checksum verified), if still unacknowledged. The
    /// record found must carry `seq` (in its header and in its `LogBatch`): a corrupted or
    /// misplaced index is an error, not a wrong batch.
    pub fn read_raw(&self, seq: u64) -> Result<Option<RawBatch>> {
        let Some(front) = self.index.front() else {
            return Ok(None);
        };
        if seq < front.seq {
            return Ok(None);
        }
        let Some(e) = self.index.get((seq - front.seq) as usize).copied() else {
            return Ok(None);
        };
        if e.seq != seq {
            bail!(
                "log buffer index out of order: batch {seq} asked, entry of batch {} found",
                e.seq
            );
        }
        let rec = self.record(&e)?;
        let start = HEADER + e.meta_len as usize;
        let Some(encoded) = rec.get(start..) else {
            bail!("log buffer record {seq}: metadata longer than the record");
        };
        let found = batch_seq(encoded)
            .with_context(|| format!("log buffer record {seq}: undecodable batch"))?;
        if found != seq {
            bail!("log buffer record {seq} holds batch {found}: not sent");
        }
        Ok(Some(RawBatch { rec, start }))
    }

    /// The batch `seq`, if still unacknowledged.
    pub fn read(&self, seq: u64) -> Result<Option<LogBatch>> {
        match self.read_raw(seq)? {
            Some(raw) => Ok(Some(LogBatch::decode(raw.encoded())?)),
            None => Ok(None),
        }
    }

    /// The metadata of the unacknowledged batches after `seq`, oldest first (to replay the
    /// checkpoint updates a crash kept from reaching the checkpoint file).
    pub fn metas_after(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for e in self.index.iter().filter(|e| e.seq > seq) {
            let rec = self.record(e)?;
            let meta = rec
                .get(HEADER..HEADER + e.meta_len as usize)
                .with_context(|| {
                    format!(
                        "log buffer record {}: metadata longer than the record",
                        e.seq
                    )
                })?;
            out.push((e.seq, meta.to_vec()));
        }
        Ok(out)
    }

    /// Everything up to `seq` is stored by the bastion. Returns the events newly acknowledged.
    pub fn ack(&mut self, seq: u64) -> Result<u64> {
        if seq <= self.acked {
            return Ok(0);
        }
        let seq = seq.min(self.last_seq());
        self.acked = seq;
        let mut n = 0;
        while self.index.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = self.index.pop_front() {
                n += u64::from(e.events);
            }
        }
        if self.index.is_empty() {
            // Everything is stored: the active segment can go too.
            self.active = None;
        }
        self.delete_acked_segments()?;
        Ok(n)
    }

    /// The checkpoints file now covers every batch up to `seq`. Until it does, a batch's
    /// record (which carries its checkpoint updates, replayed at start) must stay on disk even
    /// when acknowledged, and `state.json` must not claim it acknowledged: a restart resends
    /// it (the bastion drops the duplicate) rather than losing its checkpoint updates.
    pub fn set_floor(&mut self, seq: u64) -> Result<()> {
        self.floor = seq;
        self.delete_acked_segments()
    }

    /// What may be recorded as acknowledged on disk.
    fn durable_acked(&self) -> u64 {
        self.acked.min(self.floor)
    }

    fn delete_acked_segments(&mut self) -> Result<()> {
        let upto = self.durable_acked();
        let deletable = self.segments.iter().take_while(|s| s.last <= upto).count();
        let keep_active = usize::from(self.active.is_some());
        let n = deletable.min(self.segments.len().saturating_sub(keep_active));
        if n == 0 {
            return Ok(());
        }
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec(&StateFile {
                epoch: self.epoch,
                acked: upto,
            })?,
            0o600,
        )?;
        for _ in 0..n {
            if let Some(s) = self.segments.pop_front() {
                fs::remove_file(seg_path(&self.dir, s.first))?;
                self.disk_bytes -= s.len;
            }
        }
        Ok(())
    }

    /// Records the acknowledged position (clean shutdown), so fewer batches are resent.
    pub fn persist(&self) -> Result<()> {
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec(&StateFile {
                epoch: self.epoch,
                acked: self.durable_acked(),
            })?,
            0o600,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_parts_encode_like_prost() {
        for (ts, src, app, sev, fac, msg) in [
            (0i64, "", "", 0u32, 0u32, &b""[..]),
            (
                1_764_000_000_123,
                "/var/log/app.log",
                "app",
                6,
                1,
                &b"hello \xff world"[..],
            ),
            (-1, "journal", "", 7, 23, &[b'x'; 300][..]),
        ] {
            let e = LogEvent {
                timestamp_ms: ts,
                source: src.into(),
                app: app.into(),
                severity: sev,
                facility: fac,
                message: msg.to_vec(),
            };
            let mut a = Vec::new();
            encode_event(&e, &mut a);
            let mut b = Vec::new();
            encode_event_parts(&mut b, ts, src, app, sev, fac, msg);
            assert_eq!(a, b);
        }
    }

    fn ev(i: usize, size: usize) -> LogEvent {
        let mut m = format!("line {i} ").into_bytes();
        m.resize(size.max(m.len()), b'x');
        LogEvent {
            timestamp_ms: 1,
            source: "/x".into(),
            app: "t".into(),
            severity: 6,
            facility: 1,
            message: m,
        }
    }

    #[test]
    fn append_read_ack_and_resend_order() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        let epoch = b.epoch();
        for i in 1..=5u64 {
            assert_eq!(b.append(&[ev(i as usize, 10)], b"m").unwrap(), Ok(i));
        }
        assert_eq!(b.ack(2).unwrap(), 2);
        drop(b);
        // Reopened: same epoch, resend starts at the oldest unacknowledged batch, in order.
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(b.epoch(), epoch);
        let first = b.acked() + 1;
        assert!(first <= 3);
        let seqs: Vec<u64> = (first..=b.last_seq())
            .filter_map(|s| b.read(s).unwrap())
            .map(|x| x.seq)
            .collect();
        assert_eq!(seqs.last(), Some(&5));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(
            b.read(3).unwrap().unwrap().events[0].message[..6],
            *b"line 3"
        );
        let metas = b.metas_after(3).unwrap();
        assert_eq!(metas, vec![(4, b"m".to_vec()), (5, b"m".to_vec())]);
        assert_eq!(b.append(&[ev(6, 10)], b"").unwrap(), Ok(6));
        // Acknowledging everything deletes every segment, yet numbering goes on.
        b.ack(6).unwrap();
        assert_eq!(b.disk_bytes(), 0);
        drop(b);
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(b.append(&[ev(7, 10)], b"").unwrap(), Ok(7));
    }

    #[test]
    fn a_misplaced_or_corrupted_index_is_an_error_not_another_batch() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        for i in 1..=3 {
            b.append(&[ev(i, 100)], b"m").unwrap().unwrap();
        }
        assert_eq!(b.read(1).unwrap().unwrap().seq, 1);
        // The entry of batch 1 points at the record of batch 2.
        let (second_offset, second_len) = (b.index[1].offset, b.index[1].len);
        let saved = b.index[0];
        b.index[0].offset = second_offset;
        b.index[0].len = second_len;
        let e = b.read(1).unwrap_err();
        assert!(format!("{e:#}").contains("batch 2"), "{e:#}");
        assert!(b.read_raw(1).is_err());
        b.index[0] = saved;
        // An entry out of place in the index.
        b.index[1].seq = 7;
        assert!(b.read(2).is_err());
        b.index[1].seq = 2;
        assert_eq!(b.read(2).unwrap().unwrap().seq, 2);
        drop(b);

        // A record whose header says 1 but whose batch says 3 (checksum made valid).
        let seg = seg_path(d.path(), 1);
        let mut data = fs::read(&seg).unwrap();
        let len = u32::from_le_bytes(data[0..4].try_into().unwrap()) as usize;
        let meta_len = u32::from_le_bytes(data[28..32].try_into().unwrap()) as usize;
        let mut head = &data[HEADER + meta_len..len];
        let (tag, _) = prost::encoding::decode_key(&mut head).unwrap();
        assert_eq!(tag, 1);
        prost::encoding::decode_varint(&mut head).unwrap();
        let seq_at = len - head.len();
        assert_eq!(&data[seq_at..seq_at + 2], &[0x10, 1]);
        data[seq_at + 1] = 3;
        let crc = crc32fast::hash(&data[8..len]);
        data[4..8].copy_from_slice(&crc.to_le_bytes());
        fs::write(&seg, &data).unwrap();
        let b = Buffer::open(d.path(), 1 << 20).unwrap();
        let e = b.read_raw(1).unwrap_err();
        assert!(format!("{e:#}").contains("holds batch 3"), "{e:#}");
        assert_eq!(b.read(2).unwrap().unwrap().seq, 2);
    }

    #[test]
    fn full_buffer_refuses_until_acknowledged() {
        let d = tempfile::tempdir().unwrap();
        let max = 256 << 10;
        let mut b = Buffer::open(d.path(), max).unwrap();
        let mut seqs = Vec::new();
        while let Ok(s) = b.append(&[ev(0, 10_000)], b"").unwrap() {
            seqs.push(s);
            assert!(seqs.len() < 1000);
        }
        assert!(b.disk_bytes() <= max);
        assert!(b.disk_bytes() > max - 20_000);
        let on_disk: u64 = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, b.disk_bytes());
        b.ack(seqs[seqs.len() / 2]).unwrap();
        assert!(b.append(&[ev(0, 10_000)], b"").unwrap().is_ok());
    }

    #[test]
    fn torn_tail_is_cut_and_numbering_continues() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        for i in 0..3 {
            b.append(&[ev(i, 100)], b"").unwrap().unwrap();
        }
        drop(b);
        // A crash in the middle of writing record 4: half a header and garbage.
        let seg = seg_path(d.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let mut b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(b.last_seq(), 3);
        assert_eq!(b.pending().0, 3);
        assert_eq!(b.append(&[ev(9, 10)], b"").unwrap(), Ok(4));
        drop(b);
        let b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(
            b.read(4).unwrap().unwrap().events[0].message[..6],
            *b"line 9"
        );
        // A flipped byte inside a record is caught by its checksum.
        drop(b);
        let mut data = fs::read(&seg).unwrap();
        let n = data.len();
        data[n - 3] ^= 0xff;
        fs::write(&seg, data).unwrap();
        let b = Buffer::open(d.path(), 1 << 20).unwrap();
        assert_eq!(b.last_seq(), 3);
    }
}
