//! File sources: a glob followed like `tail -F`. Each poll re-expands the glob, follows
//! files by inode (a renamed file is drained to its end before it is closed, a new file at
//! the path is read from its start), detects truncation and copytruncate (size below the
//! read position, or a changed fingerprint of the first bytes) and reads what was appended.
//! Every event carries the checkpoint position just after its last line, so a source's
//! checkpoint never passes lines that are not yet in the buffer.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::bytes::Regex;
use tracing::{info, warn};

use super::allow::{self, AllowList};
use super::buffer::encode_event_parts;
use super::checkpoint::{Checkpoints, FilePos, Fingerprint, Update, FINGERPRINT_BYTES};
use super::config::{LogSourceConfig, StartAt};
use super::multiline::{Joined, Joiner};
use super::{now_ms, Item, Stats};

/// Bytes read from one file per poll before the others get their turn.
const READ_BUDGET: u64 = 4 << 20;
/// Most events handed on in one message.
const OUT_EVENTS: usize = 512;
/// Most encoded bytes handed on in one message.
const OUT_BYTES: usize = 128 << 10;
/// Polls without growth after which a rotated-away file is closed.
const ROTATED_GRACE_POLLS: u32 = 8;

struct Tailed {
    path: PathBuf,
    path_str: String,
    app: String,
    dev: u64,
    ino: u64,
    file: File,
    read_off: u64,
    partial: Vec<u8>,
    partial_truncated: bool,
    last_size: u64,
    fp: Fingerprint,
    joiner: Joiner,
    rotated: bool,
    idle_polls: u32,
}

pub struct FileTailer {
    source: String,
    pattern: String,
    app: Option<String>,
    start_at: StartAt,
    multiline: Option<Regex>,
    multiline_timeout: Duration,
    max_line: usize,
    files: Vec<Tailed>,
    first_scan: bool,
    seen_before: bool,
    restored: Vec<FilePos>,
    stats: Arc<Stats>,
    scratch: Vec<u8>,
    closed: bool,
    glob_warned: bool,
    /// Events of the file being read, encoded and handed on together (one channel message
    /// and one checkpoint update per chunk rather than per line).
    out: Vec<u8>,
    out_ends: Vec<(u32, u64)>,
    /// The time given to the events of the current read (one clock read per chunk).
    now_ms: i64,
    /// A source pushed by the bastion: the local allow-list every file it opens must pass
    /// (by the real path of the open descriptor).
    allow: Option<AllowList>,
    /// Files refused by `allow` (device, inode): not opened again, reported once.
    refused: HashSet<(u64, u64)>,
}

/// The part of an emit callback's answer that matters: false once the pipeline is gone.
pub type Emit<'a> = &'a mut dyn FnMut(Item) -> bool;

impl FileTailer {
    pub fn new(
        cfg: &LogSourceConfig,
        max_line: usize,
        ckpts: &Checkpoints,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Self> {
        let source = cfg.id();
        let pattern = cfg
            .path
            .clone()
            .ok_or_else(|| anyhow::anyhow!("not a file source"))?;
        let multiline = match &cfg.multiline_start {
            Some(re) => Some(Regex::new(re)?),
            None => None,
        };
        Ok(Self {
            seen_before: ckpts.seen.contains(&source),
            restored: ckpts.files_of(&source),
            source,
            pattern,
            app: cfg.app.clone(),
            start_at: cfg.start_at,
            multiline,
            multiline_timeout: cfg.multiline_timeout,
            max_line,
            files: Vec::new(),
            first_scan: true,
            stats,
            scratch: vec![0; 64 << 10],
            closed: false,
            glob_warned: false,
            out: Vec::new(),
            out_ends: Vec::new(),
            now_ms: now_ms(),
            allow: cfg.pushed_allow.as_deref().map(AllowList::from_valid),
            refused: HashSet::new(),
        })
    }

    /// The pipeline went away (shutdown).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Number of files currently open.
    pub fn open_files(&self) -> usize {
        self.files.len()
    }

    fn matches(&mut self) -> Vec<(PathBuf, u64, u64)> {
        let paths = match glob::glob(&self.pattern) {
            Ok(p) => p,
            Err(e) => {
                if !self.glob_warned {
                    warn!(source = %self.source, error = %e, "invalid glob");
                    self.glob_warned = true;
                }
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for p in paths.flatten().take(10_000) {
            if let Ok(m) = std::fs::metadata(&p) {
                if m.is_file() {
                    out.push((p, m.dev(), m.ino()));
                }
            }
        }
        out
    }

    fn open(
        &mut self,
        path: &Path,
        dev: u64,
        ino: u64,
        offset: u64,
        rotated: bool,
    ) -> Option<Tailed> {
        if self.refused.contains(&(dev, ino)) {
            return None;
        }
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        if self.allow.is_some() {
            // A FIFO swapped in after the glob saw a regular file must not block the source.
            options.custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits());
        }
        let file = match options.open(path) {
            Ok(f) => f,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot open log file");
                return None;
            }
        };
        if let Some(allow) = &self.allow {
            if let Some(why) = allow::refuse_open(allow, path, &file) {
                warn!(source = %self.source, path = %path.display(), reason = %why, "pushed log source: file refused by the local allow-list, not read");
                self.refused.insert((dev, ino));
                return None;
            }
        }
        let fp = Fingerprint::of(&file).ok()?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let app = self.app.clone().unwrap_or_else(|| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            name.split('.').next().unwrap_or_default().to_string()
        });
        Some(Tailed {
            path_str: path.display().to_string(),
            path: path.to_path_buf(),
            app,
            dev,
            ino,
            file,
            read_off: offset,
            partial: Vec::new(),
            partial_truncated: false,
            last_size: size,
            fp,
            joiner: Joiner::new(
                self.multiline.clone(),
                self.multiline_timeout,
                self.max_line,
            ),
            rotated,
            idle_polls: 0,
        })
    }

    fn position(&self, t: &Tailed, offset: u64) -> Update {
        Update::File {
            source: self.source.clone(),
            pos: FilePos {
                path: t.path_str.clone(),
                dev: t.dev,
                ino: t.ino,
                offset,
                fingerprint: t.fp.clone(),
            },
        }
    }

    fn scan(&mut self, emit: Emit) {
        let matched = self.matches();
        for t in self.files.iter_mut().filter(|t| !t.rotated) {
            if !matched.iter().any(|(_, d, i)| *d == t.dev && *i == t.ino) {
                info!(path = %t.path.display(), "log file rotated or removed: reading it to its end");
                t.rotated = true;
                t.idle_polls = 0;
            }
        }
        for (path, dev, ino) in matched {
            if let Some(t) = self.files.iter_mut().find(|t| t.dev == dev && t.ino == ino) {
                if t.path != path && !t.rotated {
                    t.path_str = path.display().to_string();
                    t.path = path;
                }
                continue;
            }
            let mut offset = 0;
            let restored = self
                .restored
                .iter()
                .position(|c| c.dev == dev && c.ino == ino)
                .map(|i| self.restored.swap_remove(i));
            let Some(mut t) = self.open(&path, dev, ino, 0, false) else {
                continue;
            };
            if let Some(c) = restored {
                if c.fingerprint.matches(&t.file).unwrap_or(false) && c.offset <= t.last_size {
                    offset = c.offset;
                } else {
                    info!(path = %path.display(), "log file content changed since its checkpoint: reading it from the start");
                }
            } else if self.first_scan && !self.seen_before && self.start_at == StartAt::End {
                offset = t.last_size;
            }
            t.read_off = offset;
            let u = self.position(&t, offset);
            self.files.push(t);
            if !emit(Item::Update(u)) {
                self.closed = true;
                return;
            }
        }
        if self.first_scan {
            self.first_scan = false;
            // Checkpointed files no longer under the glob: rotated while we were stopped.
            for c in std::mem::take(&mut self.restored) {
                if let Some(t) = self.find_rotated(&c) {
                    info!(path = %t.path.display(), "draining a log file rotated while the agent was stopped");
                    self.files.push(t);
                } else {
                    warn!(source = %self.source, path = %c.path, "a checkpointed log file is gone (rotated and removed while the agent was stopped): its unread end, if any, is lost");
                    self.stats.lost("rotated_away", 0);
                    if !emit(Item::Update(Update::FileDone {
                        source: self.source.clone(),
                        dev: c.dev,
                        ino: c.ino,
                    })) {
                        self.closed = true;
                        return;
                    }
                }
            }
            if !emit(Item::Update(Update::Seen {
                source: self.source.clone(),
            })) {
                self.closed = true;
            }
        }
    }

    fn find_rotated(&mut self, c: &FilePos) -> Option<Tailed> {
        let dir = Path::new(&c.path).parent()?;
        for de in std::fs::read_dir(dir).ok()?.flatten().take(10_000) {
            let Ok(m) = de.metadata() else { continue };
            if m.is_file() && m.dev() == c.dev && m.ino() == c.ino {
                let t = self.open(&de.path(), c.dev, c.ino, c.offset, true)?;
                if c.fingerprint.matches(&t.file).unwrap_or(false) && c.offset <= t.last_size {
                    return Some(t);
                }
                return None;
            }
        }
        None
    }

    /// One round: rescan the glob, read what is new in every file, flush timed-out
    /// multiline events, close drained rotated files. True when data is left to read.
    pub fn poll(&mut self, now: Instant, emit: Emit) -> bool {
        self.now_ms = now_ms();
        if self.closed {
            return false;
        }
        self.scan(emit);
        let mut more = false;
        let mut i = 0;
        while i < self.files.len() && !self.closed {
            let mut t = self.files.swap_remove(i);
            let (left, done) = self.poll_file(&mut t, now, emit);
            more |= left;
            if done {
                if !emit(Item::Update(Update::FileDone {
                    source: self.source.clone(),
                    dev: t.dev,
                    ino: t.ino,
                })) {
                    self.closed = true;
                }
                info!(path = %t.path.display(), "finished reading rotated log file");
                continue;
            }
            // swap_remove moved the last file to i: put this one back where it was.
            self.files.push(t);
            let last = self.files.len() - 1;
            self.files.swap(i, last);
            i += 1;
        }
        more && !self.closed
    }

    /// (data left, file finished and closed); the events read are handed on before return.
    fn poll_file(&mut self, t: &mut Tailed, now: Instant, emit: Emit) -> (bool, bool) {
        let r = self.read_file(t, now, emit);
        if !self.flush_out(t, emit) {
            return (false, false);
        }
        r
    }

    fn read_file(&mut self, t: &mut Tailed, now: Instant, emit: Emit) -> (bool, bool) {
        let size = match t.file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return (false, false),
        };
        let rewritten = size != t.last_size
            && t.fp.len > 0
            && size >= u64::from(t.fp.len)
            && !t.fp.matches(&t.file).unwrap_or(true);
        if size < t.read_off || rewritten {
            let lost = t.last_size.saturating_sub(t.read_off);
            if lost > 0 {
                warn!(path = %t.path.display(), lost_bytes = lost, "log file truncated (copytruncate?) before it was fully read: its unread end is lost");
                self.stats.lost("truncated_unread", lost);
            } else {
                info!(path = %t.path.display(), "log file truncated: reading it from the start");
            }
            let end = t.read_off;
            if !self.flush_all(t, end, emit) || !self.flush_out(t, emit) {
                return (false, false);
            }
            t.read_off = 0;
            t.fp = Fingerprint::default();
            if !emit(Item::Update(self.position(t, 0))) {
                self.closed = true;
                return (false, false);
            }
        }
        t.last_size = size;
        if t.fp.len < FINGERPRINT_BYTES as u32 && size > u64::from(t.fp.len) {
            if let Ok(fp) = Fingerprint::of(&t.file) {
                t.fp = fp;
            }
        }
        let mut read = 0u64;
        while read < READ_BUDGET {
            if self.scratch.is_empty() {
                self.scratch = vec![0; 64 << 10];
            }
            let n = match t.file.read_at(&mut self.scratch, t.read_off) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    warn!(path = %t.path.display(), error = %e, "reading log file");
                    break;
                }
            };
            let chunk_start = t.read_off;
            self.now_ms = now_ms();
            t.read_off += n as u64;
            read += n as u64;
            let chunk = std::mem::take(&mut self.scratch);
            let mut start = 0;
            for nl in memchr::memchr_iter(b'\n', &chunk[..n]) {
                let piece = &chunk[start..nl];
                self.append_partial(t, piece);
                start = nl + 1;
                let end = chunk_start + start as u64;
                let line = std::mem::take(&mut t.partial);
                let truncated = std::mem::replace(&mut t.partial_truncated, false);
                if !self.line(t, &line, truncated, end, now, emit) {
                    return (false, false);
                }
                t.partial = line;
                t.partial.clear();
            }
            self.append_partial(t, &chunk[start..n]);
            self.scratch = chunk;
        }
        if read == 0 {
            t.idle_polls = t.idle_polls.saturating_add(1);
        } else {
            t.idle_polls = 0;
        }
        if let Some(j) = t.joiner.flush_due(now) {
            if !self.event(t, j, emit) {
                return (false, false);
            }
        }
        if t.rotated && read == 0 && t.idle_polls >= ROTATED_GRACE_POLLS {
            // The writer moved on: a last line without newline is complete.
            let end = t.read_off;
            if !self.flush_all(t, end, emit) {
                return (false, false);
            }
            return (false, true);
        }
        (read >= READ_BUDGET, false)
    }

    fn append_partial(&mut self, t: &mut Tailed, piece: &[u8]) {
        let room = self.max_line.saturating_sub(t.partial.len());
        if piece.len() > room {
            t.partial.extend_from_slice(&piece[..room]);
            t.partial_truncated = true;
        } else {
            t.partial.extend_from_slice(piece);
        }
    }

    /// Emits the partial line and the pending multiline event, ending at `end`.
    fn flush_all(&mut self, t: &mut Tailed, end: u64, emit: Emit) -> bool {
        if !t.partial.is_empty() {
            let line = std::mem::take(&mut t.partial);
            let truncated = std::mem::replace(&mut t.partial_truncated, false);
            if !self.line(t, &line, truncated, end, Instant::now(), emit) {
                return false;
            }
        }
        if let Some(j) = t.joiner.flush() {
            let j = Joined {
                end_offset: end,
                ..j
            };
            return self.event(t, j, emit);
        }
        true
    }

    fn line(
        &mut self,
        t: &mut Tailed,
        line: &[u8],
        truncated: bool,
        end: u64,
        now: Instant,
        emit: Emit,
    ) -> bool {
        self.stats
            .lines_read_file
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.multiline.is_none() {
            // One line, one event: encoded straight from the read buffer.
            return self.encode(t, line, truncated, end, emit);
        }
        match t.joiner.push(line, truncated, end, now) {
            Some(j) => self.event(t, j, emit),
            None => true,
        }
    }

    fn event(&mut self, t: &Tailed, j: Joined, emit: Emit) -> bool {
        self.encode(t, &j.message, j.truncated, j.end_offset, emit)
    }

    fn encode(
        &mut self,
        t: &Tailed,
        message: &[u8],
        truncated: bool,
        end: u64,
        emit: Emit,
    ) -> bool {
        if truncated {
            self.stats
                .truncated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        encode_event_parts(
            &mut self.out,
            self.now_ms,
            &t.path_str,
            &t.app,
            6,
            1,
            message,
        );
        self.out_ends.push((self.out.len() as u32, end));
        if self.out_ends.len() >= OUT_EVENTS || self.out.len() >= OUT_BYTES {
            return self.flush_out(t, emit);
        }
        true
    }

    /// Hands on the events read from `t` with the checkpoint position after the last one.
    fn flush_out(&mut self, t: &Tailed, emit: Emit) -> bool {
        if self.closed {
            return false;
        }
        if self.out_ends.is_empty() {
            return true;
        }
        let data = std::mem::take(&mut self.out);
        let ends = std::mem::take(&mut self.out_ends);
        let end = ends.last().map(|&(_, e)| e).unwrap_or(t.read_off);
        let update = self.position(t, end);
        if !emit(Item::Events {
            data,
            ends,
            update: Some(update),
        }) {
            self.closed = true;
            return false;
        }
        true
    }
}

/// Runs a tailer on its own thread until `cancel` or until the pipeline closes.
pub fn spawn(
    mut tailer: FileTailer,
    poll: Duration,
    tx: tokio::sync::mpsc::Sender<Item>,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bastide-logs-file".into())
        .stack_size(256 << 10)
        .spawn(move || {
            while !cancel.is_cancelled() {
                let more = tailer.poll(Instant::now(), &mut |item| {
                    !cancel.is_cancelled() && tx.blocking_send(item).is_ok()
                });
                if tailer.closed() {
                    break;
                }
                if !more {
                    std::thread::sleep(poll);
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_events(data: &[u8]) -> Vec<bastide_proto::v1::LogEvent> {
        use prost::Message;
        bastide_proto::v1::LogBatch::decode(data).unwrap().events
    }
    use std::io::Write;

    struct T {
        dir: tempfile::TempDir,
        tailer: FileTailer,
        ck: Checkpoints,
        events: Vec<String>,
        stats: Arc<Stats>,
    }

    fn cfg(dir: &Path) -> LogSourceConfig {
        LogSourceConfig::file(&format!("{}/*.log", dir.display()))
    }

    impl T {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let stats = Arc::new(Stats::default());
            let ck = Checkpoints::default();
            let tailer = FileTailer::new(&cfg(dir.path()), 1024, &ck, stats.clone()).unwrap();
            Self {
                dir,
                tailer,
                ck,
                events: Vec::new(),
                stats,
            }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn write(&self, name: &str, s: &str) {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(name))
                .unwrap();
            f.write_all(s.as_bytes()).unwrap();
        }
        /// Polls until nothing more comes (rotated files need a few idle polls to close);
        /// applies checkpoint updates as the pipeline would once events are buffered.
        fn poll(&mut self, rounds: usize) {
            for _ in 0..rounds {
                let (ck, events) = (&mut self.ck, &mut self.events);
                self.tailer.poll(Instant::now(), &mut |item| {
                    match item {
                        Item::Event { event, update } => {
                            events.push(String::from_utf8(event.message).unwrap());
                            if let Some(u) = update {
                                ck.apply(u);
                            }
                        }
                        Item::Update(u) => ck.apply(u),
                        Item::Events { data, update, .. } => {
                            for e in decode_events(&data) {
                                events.push(String::from_utf8(e.message).unwrap());
                            }
                            if let Some(u) = update {
                                ck.apply(u);
                            }
                        }
                    }
                    true
                });
            }
        }
        fn restart(&mut self) {
            self.tailer =
                FileTailer::new(&cfg(self.dir.path()), 1024, &self.ck, self.stats.clone()).unwrap();
        }
        fn take(&mut self) -> Vec<String> {
            std::mem::take(&mut self.events)
        }
    }

    fn lines(r: std::ops::Range<usize>) -> Vec<String> {
        r.map(|i| format!("line {i}")).collect()
    }
    fn text(r: std::ops::Range<usize>) -> String {
        lines(r).iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn rename_rotation_loses_nothing() {
        let mut t = T::new();
        t.write("app.log", &text(0..10));
        t.poll(1);
        // Written after our last read, then rotated by rename, then the writer goes on in
        // the new file: the renamed file is drained first.
        t.write("app.log", &text(10..20));
        std::fs::rename(t.path("app.log"), t.path("app.log.1")).unwrap();
        t.write("app.log", &text(20..30));
        t.poll(ROTATED_GRACE_POLLS as usize + 2);
        let mut got = t.take();
        got.sort_by_key(|l| l[5..].parse::<usize>().unwrap());
        assert_eq!(got, lines(0..30));
        assert_eq!(
            t.tailer.open_files(),
            1,
            "the rotated file is closed once drained"
        );
        assert_eq!(t.ck.files.len(), 1);
    }

    #[test]
    fn copytruncate_and_truncation_restart_at_zero() {
        let mut t = T::new();
        t.write("app.log", &text(0..10));
        t.poll(1);
        // copytruncate: copy (not matched by the glob), truncate in place, writer continues.
        std::fs::copy(t.path("app.log"), t.path("app.log.1")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(t.path("app.log"))
            .unwrap()
            .set_len(0)
            .unwrap();
        t.write("app.log", &text(10..12));
        t.poll(1);
        assert_eq!(t.take(), lines(0..12));
        assert_eq!(
            t.stats
                .lost_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        // Truncated and rewritten past the old offset between two polls: the fingerprint
        // of the first bytes tells.
        std::fs::write(t.path("app.log"), text(100..120)).unwrap();
        t.poll(1);
        assert_eq!(t.take(), lines(100..120));
        // Truncation of data never read: counted as lost.
        t.write("app.log", &text(0..5));
        t.tailer.files[0].last_size += 30; // as if seen by a poll that could not read it
        std::fs::OpenOptions::new()
            .write(true)
            .open(t.path("app.log"))
            .unwrap()
            .set_len(0)
            .unwrap();
        t.poll(1);
        assert!(
            t.stats
                .lost_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    }

    #[test]
    fn late_file_and_partial_line() {
        let mut t = T::new();
        t.poll(1);
        assert!(t.take().is_empty());
        t.write("late.log", "first\nhalf");
        t.poll(1);
        assert_eq!(t.take(), vec!["first"]);
        t.write("late.log", " done\n");
        t.poll(1);
        assert_eq!(t.take(), vec!["half done"]);
        // Not matched by the glob: ignored.
        t.write("other.txt", "x\n");
        t.poll(1);
        assert!(t.take().is_empty());
    }

    #[test]
    fn restart_from_checkpoint_and_fingerprint_change() {
        let mut t = T::new();
        t.write("app.log", &text(0..10));
        t.write("app.log", "partial");
        t.poll(1);
        assert_eq!(t.take(), lines(0..10));
        t.restart();
        t.write("app.log", "\n");
        t.write("app.log", &text(10..15));
        t.poll(1);
        let mut want = vec!["partial".to_string()];
        want.extend(lines(10..15));
        assert_eq!(t.take(), want);
        // Same inode, different first bytes while we were stopped: read from the start.
        t.restart();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(t.path("app.log"))
            .unwrap();
        f.write_at(b"LINE", 0).unwrap();
        t.poll(1);
        assert_eq!(t.take().len(), 16);
        // Rotated by rename while stopped: the rest of the old file is found by inode.
        t.write("app.log", &text(20..25));
        t.restart();
        std::fs::rename(t.path("app.log"), t.path("app.log.1")).unwrap();
        t.write("app.log", &text(25..27));
        t.poll(ROTATED_GRACE_POLLS as usize + 2);
        let mut got = t.take();
        got.sort_by_key(|l| l[5..].parse::<usize>().unwrap());
        assert_eq!(got, lines(20..27));
    }

    #[test]
    fn overlong_lines_are_truncated_and_counted() {
        let mut t = T::new();
        t.write("app.log", &format!("{}\nshort\n", "x".repeat(5000)));
        t.poll(1);
        let got = t.take();
        assert_eq!(got[0].len(), 1024);
        assert_eq!(got[1], "short");
        assert_eq!(
            t.stats.truncated.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn start_at_end_skips_existing_content_on_first_run_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), "old\n").unwrap();
        let mut c = cfg(dir.path());
        c.start_at = StartAt::End;
        let stats = Arc::new(Stats::default());
        let mut ck = Checkpoints::default();
        let mut tl = FileTailer::new(&c, 1024, &ck, stats).unwrap();
        let mut got = Vec::new();
        let run = |tl: &mut FileTailer, ck: &mut Checkpoints, got: &mut Vec<Vec<u8>>| {
            tl.poll(Instant::now(), &mut |item| {
                match item {
                    Item::Event { event, update } => {
                        got.push(event.message);
                        ck.apply(update.unwrap());
                    }
                    Item::Update(u) => ck.apply(u),
                    Item::Events { data, update, .. } => {
                        got.extend(decode_events(&data).into_iter().map(|e| e.message));
                        ck.apply(update.unwrap());
                    }
                }
                true
            });
        };
        run(&mut tl, &mut ck, &mut got);
        assert!(got.is_empty());
        std::fs::write(dir.path().join("b.log"), "new file\n").unwrap();
        run(&mut tl, &mut ck, &mut got);
        assert_eq!(got, vec![b"new file".to_vec()]);
    }
}
