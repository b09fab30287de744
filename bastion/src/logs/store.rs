//! The log store's writer: one thread appends every event to `<dir>/<host>/<YYYY-MM-DD>.log`
//! with group commit, and is the only place that decides whether an agent batch is new or a
//! duplicate.
//!
//! # Exactly once, across `kill -9` at any point
//!
//! Beside the plain files, `<dir>/.state/` holds a write-ahead log (`wal`) and a checkpoint
//! (`checkpoint.json`). The checkpoint records, for every file written recently, a length up
//! to which the file is known to be on disk, and for every agent buffer (agent, epoch) the
//! highest sequence number whose batch is stored (the high-water mark). The WAL holds every
//! group committed since, *with its lines*. One group commit is:
//!
//! 1. take every request waiting in the queue (agent batches from all agents, syslog chunks);
//!    drop agent batches at or below their high-water mark (duplicates);
//! 2. append one record to the WAL: for every file the group writes, its path, its length
//!    before the group and the group's bytes for it, then the new high-water marks; the
//!    record is framed by its length and a CRC-32;
//! 3. fsync the WAL. This single fsync makes the whole group durable, however many hosts it
//!    holds (fsyncing each host's file made a group's cost grow with its hosts: see
//!    `bench/README.md`, "Log store");
//! 4. write the lines into the files at their recorded offsets, *without* fsync;
//! 5. only now acknowledge the agent batches (duplicates too) and publish the group.
//!
//! A *checkpoint* brings the files up to date on disk and empties the WAL: every file written
//! since the last checkpoint is fsynced (from several threads), then every directory that
//! gained a host or a day file, then the checkpoint is written atomically (temporary file,
//! fsync, rename, fsync directory) and the WAL truncated. It runs when the WAL passes
//! [`COMPACT_AT`], when [`COMPACT_EVERY`] has passed since the last one with files written,
//! at start-up and at shutdown. Records carry a generation number, so a crash between the
//! checkpoint's rename and the WAL's truncation replays nothing twice.
//!
//! On start-up the checkpoint is read, then every whole WAL record newer than it is replayed
//! by writing its bytes again at their recorded offsets (idempotent: the same bytes land at
//! the same place whether or not they had reached the file), stopping at the first torn or
//! corrupt record, a group whose fsync never completed and which was therefore never
//! acknowledged. Files are written only after the WAL fsync, so such a group's lines never
//! reached any file; every file longer than its committed length is truncated anyway (a
//! file modified outside bastide, or a store left by an earlier version, see below). Each
//! acknowledged line is thus in its file exactly once, and the agent's resend of an
//! unacknowledged batch is stored once (or acknowledged as a duplicate if its group did
//! commit). Syslog lines of a torn group are lost (syslog has no acknowledgement; rsyslog's
//! omfile does not even fsync).
//!
//! A store written by an earlier bastide keeps a JSON `journal` of file lengths instead of
//! the WAL: it is replayed once at start-up (files truncated to their committed lengths),
//! checkpointed, and removed.
//!
//! # Memory
//!
//! Nothing is buffered per host: a group holds at most [`GROUP_BYTES`] (plus one request) of
//! lines, encoded once into its WAL record and dropped after the commit; the writer keeps
//! at most [`MAX_OPEN`] file handles (plus [`SYNC_BATCH`] while a checkpoint fsyncs), the
//! set of paths written since the last checkpoint and
//! the high-water marks of the agents (pruned at each checkpoint).
//!
//! # A full filesystem
//!
//! `ENOSPC`/`EDQUOT` while writing a group (its WAL record or its files) is not fatal: the
//! group is rolled back (its files truncated to their lengths before the group and fsynced,
//! then the WAL truncated to its last whole record and fsynced: a crash in between replays
//! the group, which then counts as stored and its resend as a duplicate), its agent batches
//! are refused with [`StoreError::Full`] (the agent keeps them and retries), its syslog
//! lines are counted as dropped, and the next group simply tries again, so the store
//! recovers by itself once space returns. An agent with a refused batch has every later
//! batch refused too until it opens a new stream (which resends from its oldest
//! unacknowledged batch): otherwise a smaller later batch could be stored first and the
//! refused one would then look like a duplicate. A checkpoint that finds no space is
//! retried a second later (the WAL keeps every group safe meanwhile). Any other write
//! error, and every fsync error (after a failed fsync the page cache cannot be trusted),
//! still stops the store until restart.
//!
//! Files are named by the day (UTC) the bastion *received* the events, as rsyslog's
//! `%$YEAR%-%$MONTH%-%$DAY%` templates do; each line carries the event's own time. Past days
//! are therefore never written again, which is what lets retention compress them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info, warn};

use super::format::day_name;
use super::metrics::{counters, Source};

/// Directory (inside the store) of the journal and checkpoint; sanitised host names never
/// start with a dot, so it cannot clash with a host.
pub const STATE_DIR: &str = ".state";
/// The write-ahead log (binary records, see `encode_record`).
const WAL: &str = "wal";
/// The JSON journal of file lengths of earlier versions (replayed once, then removed).
const LEGACY_JOURNAL: &str = "journal";
const CHECKPOINT: &str = "checkpoint.json";
/// WAL size that triggers a checkpoint.
pub const COMPACT_AT: u64 = 64 * 1024 * 1024;
/// Longest time files written stay out of a checkpoint (the WAL holds them meanwhile).
pub const COMPACT_EVERY: Duration = Duration::from_secs(30);
/// Wait before retrying a checkpoint that found the filesystem full.
const COMPACT_RETRY: Duration = Duration::from_secs(1);
/// Most bytes of lines in one group commit.
pub const GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Largest WAL record accepted on replay (a group plus one request, with generous room).
const MAX_RECORD: u64 = 256 * 1024 * 1024;
/// Requests waiting for the writer (each at most a few MiB).
const QUEUE: usize = 1024;
/// Epochs remembered per agent (a new epoch is a wiped or re-enrolled agent buffer).
const EPOCHS_PER_AGENT: usize = 8;
/// Open file handles kept between groups.
pub const MAX_OPEN: usize = 512;
/// Threads that fsync the files of a checkpoint together (see `sync_parallel`).
const SYNC_THREADS: usize = 16;
/// Files a checkpoint opens and fsyncs at a time (bounds its file descriptors).
const SYNC_BATCH: usize = 1024;

pub use super::format::Chunk;

/// The identity of an agent batch for deduplication.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mark {
    pub agent: String,
    pub epoch: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Written,
    Duplicate,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the log store failed ({0}); restart the bastion to recover")]
    Failed(String),
    #[error("the log store is shutting down")]
    Closed,
    /// The filesystem is full: nothing of the batch was stored; send it again later.
    #[error("the log store's filesystem is full ({0}); batch not stored, retry later")]
    Full(String),
}

struct Request {
    chunks: Vec<Chunk>,
    mark: Option<Mark>,
    done: Option<oneshot::Sender<Result<Stored, StoreError>>>,
    /// Syslog chunks nobody waits for: where they came from, to count them if dropped.
    source: Option<Source>,
    /// A new stream of this agent starts: forget its refused batches (see the module doc).
    restart: Option<String>,
    /// Lines in `chunks` (counted as dropped if a syslog request cannot be stored).
    lines: u64,
}

/// What the writer publishes after each commit, for `--follow` and forwarding.
pub type Committed = Arc<Vec<Chunk>>;

/// A handle on the writer thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Request>,
    dir: Arc<PathBuf>,
    live: broadcast::Sender<Committed>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    gen: u64,
    lengths: BTreeMap<String, u64>,
    /// (agent, epoch, seq, gen of last use)
    marks: Vec<(String, u64, u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Open {
        g: u64,
        files: Vec<(String, u64)>,
    },
    Commit {
        g: u64,
        files: Vec<(String, u64)>,
        marks: Vec<(String, u64, u64)>,
    },
}

/// The durable state: committed lengths and high-water marks.
#[derive(Default)]
struct State {
    gen: u64,
    lengths: HashMap<String, u64>,
    marks: HashMap<(String, u64), (u64, u64)>,
}

impl State {
    fn apply(&mut self, r: Record) {
        match r {
            Record::Open { g, files } => {
                self.gen = self.gen.max(g);
                for (f, len) in files {
                    self.lengths.entry(f).or_insert(len);
                }
            }
            Record::Commit { g, files, marks } => {
                self.gen = self.gen.max(g);
                for (f, len) in files {
                    self.lengths.insert(f, len);
                }
                self.apply_marks(g, marks);
            }
        }
    }

    /// Raises high-water marks, remembering `g` as their last use.
    fn apply_marks(&mut self, g: u64, marks: Vec<(String, u64, u64)>) {
        for (a, e, s) in marks {
            let m = self.marks.entry((a, e)).or_insert((0, g));
            *m = (m.0.max(s), g);
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            gen: self.gen,
            lengths: self.lengths.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            marks: self
                .marks
                .iter()
                .map(|((a, e), (s, g))| (a.clone(), *e, *s, *g))
                .collect(),
        }
    }

    /// Forgets what can no longer matter: files of past days (never written again) and the
    /// oldest epochs of each agent.
    fn prune(&mut self, today: i64) {
        let keep_from = day_name(today - 1);
        self.lengths.retain(|path, _| {
            path.rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".log"))
                .is_none_or(|d| d >= keep_from.as_str())
        });
        let mut per_agent: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for ((a, e), (_, g)) in &self.marks {
            per_agent.entry(a.as_str()).or_default().push((*g, *e));
        }
        let mut drop = Vec::new();
        for (a, mut v) in per_agent {
            if v.len() > EPOCHS_PER_AGENT {
                v.sort_unstable_by(|x, y| y.cmp(x));
                for (_, e) in &v[EPOCHS_PER_AGENT..] {
                    drop.push((a.to_string(), *e));
                }
            }
        }
        for k in drop {
            self.marks.remove(&k);
        }
    }
}

impl Store {
    /// Opens (creating) the store, recovers it to its last commit, and starts the writer
    /// thread; `forward` receives every committed group.
    pub fn open(dir: &Path, forward: Option<super::forward::Queue>) -> Result<Self> {
        crate::fsutil::ensure_dir(dir, 0o750)?;
        let state_dir = dir.join(STATE_DIR);
        if !state_dir.exists() {
            crate::fsutil::ensure_dir(&state_dir, 0o700)?;
            crate::fsutil::sync_dir(dir)?;
        }
        let (state, dirty) = recover(dir)?;
        let wal_path = state_dir.join(WAL);
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&wal_path)
            .with_context(|| format!("opening {}", wal_path.display()))?;
        let journal_len = journal
            .metadata()
            .with_context(|| format!("{}", wal_path.display()))?
            .len();
        let (tx, rx) = mpsc::channel(QUEUE);
        let (live, _) = broadcast::channel(1024);
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            state,
            journal,
            open: HashMap::new(),
            live: live.clone(),
            failed: Arc::new(AtomicBool::new(false)),
            forward,
            journal_len,
            refused: HashSet::new(),
            full: None,
            dirty,
            bases: Vec::new(),
            last_compact: std::time::Instant::now(),
            compact_retry: None,
        };
        // Everything replayed reaches the disk and the WAL starts empty.
        writer.compact().map_err(|f| f.err)?;
        let legacy = state_dir.join(LEGACY_JOURNAL);
        if legacy.exists() {
            std::fs::remove_file(&legacy)
                .with_context(|| format!("removing {}", legacy.display()))?;
            crate::fsutil::sync_dir(&state_dir)?;
        }
        std::thread::Builder::new()
            .name("logs-writer".into())
            .spawn(move || writer.run(rx))
            .context("starting the log writer thread")?;
        Ok(Store {
            tx,
            dir: Arc::new(dir.to_path_buf()),
            live,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Live committed groups (for `bastide logs --follow`).
    pub fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.live.subscribe()
    }

    /// Queues chunks; the receiver answers once they are durable (or are a duplicate of
    /// a durable batch). Waits while the writer's queue is full (backpressure).
    pub async fn submit(
        &self,
        chunks: Vec<Chunk>,
        mark: Option<Mark>,
    ) -> Result<oneshot::Receiver<Result<Stored, StoreError>>, StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request {
                chunks,
                mark,
                done: Some(done),
                source: None,
                restart: None,
                lines: 0,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Queues chunks nobody waits for (syslog from `source`).
    pub async fn append(&self, source: Source, chunks: Vec<Chunk>) -> Result<(), StoreError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let lines = chunks.iter().map(|c| u64::from(c.lines)).sum();
        self.tx
            .send(Request {
                chunks,
                mark: None,
                done: None,
                source: Some(source),
                restart: None,
                lines,
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Tells the writer that a new `ShipLogs` stream of `agent` starts (after every batch
    /// of its previous stream was queued): batches refused while the disk was full are
    /// expected again from here on.
    pub async fn stream_started(&self, agent: &str) -> Result<(), StoreError> {
        self.tx
            .send(Request {
                chunks: Vec::new(),
                mark: None,
                done: None,
                source: None,
                restart: Some(agent.to_string()),
                lines: 0,
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Stores and waits for durability.
    pub async fn write(
        &self,
        chunks: Vec<Chunk>,
        mark: Option<Mark>,
    ) -> Result<Stored, StoreError> {
        self.submit(chunks, mark)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }
}

/// What a checkpoint must bring to the disk: files written and directories that gained an
/// entry since the last one.
#[derive(Default)]
struct Dirty {
    files: HashSet<String>,
    dirs: HashSet<PathBuf>,
}

/// One WAL record: `len: u32 LE`, `crc32(payload): u32 LE`, then the payload: `g: u64`,
/// `files: u32`, per file (`path`, `base: u64`, `bytes`), `marks: u32`, per mark (`agent`,
/// `epoch: u64`, `seq: u64`); strings and bytes are `u32 LE` length-prefixed.
fn encode_record(g: u64, files: &[(&str, u64, &[u8])], marks: &[(String, u64, u64)]) -> Vec<u8> {
    let size = 8
        + 16
        + files
            .iter()
            .map(|(r, _, d)| 16 + r.len() + d.len())
            .sum::<usize>()
        + marks.iter().map(|(a, _, _)| 20 + a.len()).sum::<usize>();
    let mut b = Vec::with_capacity(size);
    b.extend_from_slice(&[0; 8]);
    let put_bytes = |b: &mut Vec<u8>, x: &[u8]| {
        b.extend_from_slice(&(x.len() as u32).to_le_bytes());
        b.extend_from_slice(x);
    };
    b.extend_from_slice(&g.to_le_bytes());
    b.extend_from_slice(&(files.len() as u32).to_le_bytes());
    for (rel, base, data) in files {
        put_bytes(&mut b, rel.as_bytes());
        b.extend_from_slice(&base.to_le_bytes());
        put_bytes(&mut b, data);
    }
    b.extend_from_slice(&(marks.len() as u32).to_le_bytes());
    for (a, e, s) in marks {
        put_bytes(&mut b, a.as_bytes());
        b.extend_from_slice(&e.to_le_bytes());
        b.extend_from_slice(&s.to_le_bytes());
    }
    let len = (b.len() - 8) as u32;
    let crc = crc32fast::hash(&b[8..]);
    b[0..4].copy_from_slice(&len.to_le_bytes());
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A decoded WAL record; file bytes are ranges of the payload.
struct WalRecord {
    g: u64,
    files: Vec<(String, u64, std::ops::Range<usize>)>,
    marks: Vec<(String, u64, u64)>,
}

fn decode_record(p: &[u8]) -> Option<WalRecord> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<std::ops::Range<usize>> {
        let r = at..at.checked_add(n).filter(|&e| e <= p.len())?;
        at = r.end;
        Some(r)
    };
    let u32_at = |r: std::ops::Range<usize>| u32::from_le_bytes(p[r].try_into().unwrap_or([0; 4]));
    let u64_at = |r: std::ops::Range<usize>| u64::from_le_bytes(p[r].try_into().unwrap_or([0; 8]));
    let g = u64_at(take(8)?);
    let nfiles = u32_at(take(4)?) as usize;
    let mut files = Vec::with_capacity(nfiles.min(4096));
    for _ in 0..nfiles {
        let n = u32_at(take(4)?) as usize;
        let rel = String::from_utf8(p[take(n)?].to_vec()).ok()?;
        let base = u64_at(take(8)?);
        let n = u32_at(take(4)?) as usize;
        files.push((rel, base, take(n)?));
    }
    let nmarks = u32_at(take(4)?) as usize;
    let mut marks = Vec::with_capacity(nmarks.min(4096));
    for _ in 0..nmarks {
        let n = u32_at(take(4)?) as usize;
        let agent = String::from_utf8(p[take(n)?].to_vec()).ok()?;
        let e = u64_at(take(8)?);
        let s = u64_at(take(8)?);
        marks.push((agent, e, s));
    }
    (at == p.len()).then_some(WalRecord { g, files, marks })
}

/// Reads the next whole, intact record; `None` at the end or at a torn or corrupt record.
fn read_record(r: &mut impl Read, left: u64) -> Option<(Vec<u8>, u64)> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head).ok()?;
    let len = u64::from(u32::from_le_bytes(head[0..4].try_into().ok()?));
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    if len > MAX_RECORD || len + 8 > left {
        return None;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).ok()?;
    (crc32fast::hash(&payload) == crc).then_some((payload, len + 8))
}

/// A store path from a WAL record: `host/day.log`, nothing that leaves the store.
fn safe_rel(rel: &str) -> bool {
    let p = Path::new(rel);
    p.components().count() == 2 && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Opens (creating, with its host directory) a store file for writing at given offsets;
/// directories that gain an entry are added to `dirty`.
fn open_store_file(dir: &Path, rel: &str, dirty: &mut Dirty) -> Result<File> {
    let path = dir.join(rel);
    let host_dir = path.parent().unwrap_or(dir).to_path_buf();
    if !host_dir.exists() {
        std::fs::create_dir(&host_dir)
            .with_context(|| format!("creating {}", host_dir.display()))?;
        dirty.dirs.insert(dir.to_path_buf());
    }
    let existed = path.exists();
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if !existed {
        dirty.dirs.insert(host_dir);
    }
    Ok(f)
}

/// Replays checkpoint, legacy journal and WAL, truncates files to their committed lengths,
/// returns the state and what the replay wrote (for the first checkpoint to fsync).
fn recover(dir: &Path) -> Result<(State, Dirty)> {
    let sdir = dir.join(STATE_DIR);
    let mut state = State::default();
    let ck_path = sdir.join(CHECKPOINT);
    if ck_path.exists() {
        let text = std::fs::read_to_string(&ck_path)
            .with_context(|| format!("reading {}", ck_path.display()))?;
        let ck: Checkpoint = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt", ck_path.display()))?;
        state.gen = ck.gen;
        state.lengths = ck.lengths.into_iter().collect();
        state.marks = ck
            .marks
            .into_iter()
            .map(|(a, e, s, g)| ((a, e), (s, g)))
            .collect();
    }
    let base_gen = state.gen;
    replay_legacy(&sdir.join(LEGACY_JOURNAL), base_gen, &mut state)?;
    let mut dirty = Dirty::default();
    let wpath = sdir.join(WAL);
    let mut replayed = (0u64, 0u64);
    if let Ok(f) = File::open(&wpath) {
        let total = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::with_capacity(1 << 20, f);
        let mut good = 0u64;
        let mut files: HashMap<String, File> = HashMap::new();
        while let Some((payload, n)) = read_record(&mut reader, total - good) {
            let Some(rec) = decode_record(&payload) else {
                break;
            };
            if rec.files.iter().any(|(rel, _, _)| !safe_rel(rel)) {
                break;
            }
            good += n;
            if rec.g <= base_gen {
                continue;
            }
            state.gen = state.gen.max(rec.g);
            for (rel, base, range) in rec.files {
                if !files.contains_key(&rel) {
                    if files.len() >= MAX_OPEN {
                        files.clear();
                    }
                    let f = open_store_file(dir, &rel, &mut dirty)?;
                    let len = f.metadata().with_context(|| format!("stat {rel}"))?.len();
                    if len < base {
                        error!(file = %dir.join(&rel).display(), expected = base, found = len,
                            "log store: file shorter than its committed length (modified outside bastide, or the disk lost data)");
                    }
                    files.insert(rel.clone(), f);
                }
                let f = files.get(&rel).context("replay file handle vanished")?;
                f.write_all_at(&payload[range.clone()], base)
                    .with_context(|| {
                        format!(
                            "replaying the WAL into {rel} (no space left? free some and restart)"
                        )
                    })?;
                state.lengths.insert(rel.clone(), base + range.len() as u64);
                dirty.files.insert(rel);
                replayed.1 += range.len() as u64;
            }
            state.apply_marks(rec.g, rec.marks);
            replayed.0 += 1;
        }
        if total > good {
            warn!(
                wal = %wpath.display(),
                dropped_bytes = total - good,
                "log store: ignoring the torn end of the WAL (a group that never committed)"
            );
        }
    }
    let mut truncated = 0u64;
    for (rel, &len) in &state.lengths {
        let path = dir.join(rel);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.len() > len {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            f.set_len(len)
                .with_context(|| format!("truncating {}", path.display()))?;
            f.sync_all()
                .with_context(|| format!("fsync {}", path.display()))?;
            truncated += meta.len() - len;
            warn!(file = %path.display(), bytes = meta.len() - len,
                "log store: removed lines of a group that never committed (agents resend them)");
        } else if meta.len() < len && !dirty.files.contains(rel) {
            error!(file = %path.display(), expected = len, found = meta.len(),
                "log store: file shorter than its committed length (modified outside bastide, or the disk lost data)");
        }
    }
    info!(
        dir = %dir.display(),
        files = state.lengths.len(),
        agent_epochs = state.marks.len(),
        wal_groups_replayed = replayed.0,
        wal_bytes_replayed = replayed.1,
        truncated_bytes = truncated,
        "log store recovered"
    );
    Ok((state, dirty))
}

/// Replays the JSON journal of lengths an earlier version left (see the module doc).
fn replay_legacy(jpath: &Path, base_gen: u64, state: &mut State) -> Result<()> {
    let Ok(f) = File::open(jpath) else {
        return Ok(());
    };
    let mut reader = BufReader::new(f);
    let mut good = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", jpath.display()))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let Ok(rec) = serde_json::from_slice::<Record>(&line) else {
            break;
        };
        let g = match &rec {
            Record::Open { g, .. } | Record::Commit { g, .. } => *g,
        };
        if g > base_gen {
            state.apply(rec);
        }
        good += n as u64;
    }
    let total = std::fs::metadata(jpath).map(|m| m.len()).unwrap_or(0);
    if total > good {
        warn!(
            journal = %jpath.display(),
            dropped_bytes = total - good,
            "log store: ignoring the torn end of the journal (a group that never committed)"
        );
    }
    Ok(())
}

/// Fsyncs files from up to [`SYNC_THREADS`] threads: one after the other they cost one
/// filesystem journal commit each (about 10 ms on a cloud disk); together the filesystem
/// folds them into a few commits.
fn sync_parallel(files: &[(String, File)]) -> Result<()> {
    let sync = |part: &[(String, File)]| -> Result<()> {
        for (rel, f) in part {
            f.sync_data().with_context(|| format!("fsync {rel}"))?;
        }
        counters()
            .store_fsyncs
            .fetch_add(part.len() as u64, Ordering::Relaxed);
        Ok(())
    };
    if files.len() <= 1 {
        return sync(files);
    }
    let per = files.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(per)
            .map(|part| scope.spawn(move || sync(part)))
            .collect();
        let mut first = Ok(());
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("an fsync thread panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

struct Writer {
    dir: PathBuf,
    state: State,
    /// The WAL, opened for appending.
    journal: File,
    open: HashMap<String, File>,
    live: broadcast::Sender<Committed>,
    failed: Arc<AtomicBool>,
    forward: Option<super::forward::Queue>,
    /// Length of the WAL up to its last whole record.
    journal_len: u64,
    /// Agents with a batch refused for lack of space, until their next stream.
    refused: HashSet<String>,
    /// Set while the filesystem is full.
    full: Option<Full>,
    /// Written since the last checkpoint.
    dirty: Dirty,
    /// Files of the group being committed and their lengths before it (for a rollback).
    bases: Vec<(String, u64)>,
    last_compact: Instant,
    /// Set after a checkpoint found no space: when to try again.
    compact_retry: Option<Instant>,
}
struct Full {
    since: std::time::Instant,
    /// Syslog events dropped since, and how many of them were logged.
    dropped: u64,
    reported: u64,
    last_report: Option<std::time::Instant>,
}

/// Why a group did not commit: `full` when only space is missing (rolled back, retried).
struct Fail {
    full: bool,
    err: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail {
            full: false,
            err: e.into(),
        }
    }
}

fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// A write's error: `full` for ENOSPC/EDQUOT, fatal otherwise.
fn write_fail(e: std::io::Error, what: String) -> Fail {
    Fail {
        full: is_full(&e),
        err: anyhow::Error::new(e).context(what),
    }
}

/// How often a still-full store says so.
const FULL_REPORT: std::time::Duration = std::time::Duration::from_secs(10);

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            let mut bytes: usize = group[0].chunks.iter().map(|c| c.data.len()).sum();
            while bytes < GROUP_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.chunks.iter().map(|c| c.data.len()).sum::<usize>();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            if self.failed.load(Ordering::Relaxed) {
                for r in group {
                    if let Some(d) = r.done {
                        let _ = d.send(Err(StoreError::Failed("an earlier write failed".into())));
                    }
                }
                continue;
            }
            let started = std::time::Instant::now();
            match self.commit(&mut group) {
                Ok(committed) => {
                    let c = counters();
                    c.commits.fetch_add(1, Ordering::Relaxed);
                    c.commit_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if committed.wrote {
                        if let Some(full) = self.full.take() {
                            c.store_full.store(0, Ordering::Relaxed);
                            info!(
                                full_for_ms = full.since.elapsed().as_millis() as u64,
                                syslog_events_dropped = full.dropped,
                                "log store: space is available again, writing resumed"
                            );
                        }
                    }
                    for (r, outcome) in group.into_iter().zip(committed.outcomes) {
                        if let Some(d) = r.done {
                            let _ = d.send(outcome);
                        }
                    }
                    if let Some(chunks) = committed.chunks {
                        if let Some(f) = &mut self.forward {
                            f.push(&chunks);
                        }
                        let _ = self.live.send(chunks);
                    }
                    self.maybe_compact();
                }
                Err(fail) => {
                    let msg = format!("{:#}", fail.err);
                    if fail.full {
                        if let Err(e) = self.rollback() {
                            self.fatal(group, format!("{msg}; rolling back: {e:#}"));
                            continue;
                        }
                        self.refuse_full(group, msg);
                    } else {
                        self.fatal(group, msg);
                    }
                }
            }
        }
        // Channel closed: every sender is gone (shutdown). Leave the files on disk and the
        // WAL empty (recovery would do it otherwise).
        if !self.failed.load(Ordering::Relaxed) && !self.dirty.files.is_empty() {
            if let Err(f) = self.compact() {
                warn!(error = %format!("{:#}", f.err), "log store: checkpoint at shutdown failed (the WAL is replayed at the next start)");
            }
        }
    }

    /// Stops the store until restart, refusing the group.
    fn fatal(&mut self, group: Vec<Request>, msg: String) {
        error!(error = %msg, "log store: write failed: refusing every write until restart (nothing unacknowledged is lost: agents keep their batches)");
        counters().store_failed.store(1, Ordering::Relaxed);
        self.failed.store(true, Ordering::Relaxed);
        for r in group {
            if let Some(d) = r.done {
                let _ = d.send(Err(StoreError::Failed(msg.clone())));
            }
        }
    }

    /// Refuses a rolled-back group for lack of space: agents keep their batches (and
    /// every later one is refused until they reconnect), syslog lines are dropped and counted.
    fn refuse_full(&mut self, group: Vec<Request>, msg: String) {
        let c = counters();
        let mut dropped = 0u64;
        for r in group {
            if let (Some(src), None) = (r.source, &r.done) {
                c.dropped[src as usize].fetch_add(r.lines, Ordering::Relaxed);
                dropped += r.lines;
            }
            if let Some(m) = &r.mark {
                self.refused.insert(m.agent.clone());
                c.refused_batches.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(d) = r.done {
                let _ = d.send(Err(StoreError::Full(msg.clone())));
            }
        }
        c.store_full.store(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        let full = self.full.get_or_insert_with(|| {
            warn!(error = %msg,
                "log store: filesystem full: agent batches refused (agents keep them and retry), syslog lines dropped; every new write tries again");
            Full {
                since: now,
                dropped: 0,
                reported: 0,
                last_report: None,
            }
        });
        full.dropped += dropped;
        // Drops are reported as they start, then at most every FULL_REPORT.
        if full.dropped > full.reported
            && full.last_report.is_none_or(|t| t.elapsed() >= FULL_REPORT)
        {
            warn!(
                syslog_events_dropped = full.dropped - full.reported,
                syslog_events_dropped_total = full.dropped,
                full_for_ms = full.since.elapsed().as_millis() as u64,
                "log store full: syslog lines dropped (counted in bastide_logs_dropped_events_total)"
            );
            full.reported = full.dropped;
            full.last_report = Some(now);
        }
    }

    /// Undoes a group that failed for lack of space: its files back to their lengths before
    /// it (fsynced), then the WAL back to its last whole record (fsynced). A crash in
    /// between replays the group from the WAL: it is then stored, and its resend is a
    /// duplicate.
    fn rollback(&mut self) -> Result<()> {
        let bases = std::mem::take(&mut self.bases);
        for (rel, len) in &bases {
            let f = self.file(rel)?;
            let now = f.metadata().with_context(|| format!("stat {rel}"))?.len();
            if now > *len {
                f.set_len(*len)
                    .with_context(|| format!("truncating {rel}"))?;
                f.sync_all().with_context(|| format!("fsync {rel}"))?;
                counters().store_fsyncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        let jl = self.journal.metadata().context("stat the WAL")?.len();
        if jl > self.journal_len {
            self.journal
                .set_len(self.journal_len)
                .context("truncating the WAL")?;
            self.journal.sync_all().context("fsync the WAL")?;
            counters().store_fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn commit(&mut self, group: &mut [Request]) -> Result<Commit, Fail> {
        let mut outcomes: Vec<Result<Stored, StoreError>> = Vec::with_capacity(group.len());
        let mut marks: Vec<(String, u64, u64)> = Vec::new();
        let mut pending: HashMap<(String, u64), u64> = HashMap::new();
        let mut writes: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut all: Vec<Chunk> = Vec::new();
        let mut dup_batches = 0u64;
        for r in group.iter_mut() {
            if let Some(a) = r.restart.take() {
                self.refused.remove(&a);
            }
            if let Some(m) = &r.mark {
                if self.refused.contains(&m.agent) {
                    outcomes.push(Err(StoreError::Full(
                        "an earlier batch of this agent was refused; resend from it".into(),
                    )));
                    r.chunks.clear();
                    continue;
                }
                let key = (m.agent.clone(), m.epoch);
                let hwm = pending
                    .get(&key)
                    .copied()
                    .or_else(|| self.state.marks.get(&key).map(|x| x.0))
                    .unwrap_or(0);
                if m.seq <= hwm {
                    outcomes.push(Ok(Stored::Duplicate));
                    dup_batches += 1;
                    continue;
                }
                if hwm > 0 && m.seq > hwm + 1 {
                    warn!(agent = %m.agent, epoch = m.epoch, expected = hwm + 1, got = m.seq,
                        "log store: gap in an agent's batch sequence (its buffer lost batches?)");
                }
                pending.insert(key, m.seq);
                marks.push((m.agent.clone(), m.epoch, m.seq));
            }
            outcomes.push(Ok(Stored::Written));
            for c in r.chunks.drain(..) {
                writes
                    .entry(c.rel_path())
                    .or_default()
                    .extend_from_slice(&c.data);
                all.push(c);
            }
        }
        if dup_batches > 0 {
            counters()
                .duplicates
                .fetch_add(dup_batches, Ordering::Relaxed);
        }
        writes.retain(|_, data| !data.is_empty());
        if writes.is_empty() && marks.is_empty() {
            return Ok(Commit {
                outcomes,
                chunks: None,
                wrote: false,
            });
        }

        // Where each file's bytes go: its committed length (its current length if new).
        self.bases.clear();
        for rel in writes.keys() {
            let base = match self.state.lengths.get(rel) {
                Some(&len) => len,
                None => {
                    let f = self.file(rel)?;
                    f.metadata().with_context(|| format!("stat {rel}"))?.len()
                }
            };
            self.bases.push((rel.clone(), base));
        }
        self.state.gen += 1;
        let g = self.state.gen;

        // 2-3. One WAL record, one fsync: the group is durable.
        let files: Vec<(&str, u64, &[u8])> = writes
            .iter()
            .zip(&self.bases)
            .map(|((rel, data), (_, base))| (rel.as_str(), *base, data.as_slice()))
            .collect();
        let rec = encode_record(g, &files, &marks);
        drop(files);
        self.journal
            .write_all(&rec)
            .map_err(|e| write_fail(e, "writing the WAL".into()))?;
        self.journal.sync_data().context("fsync the WAL")?;
        counters().store_fsyncs.fetch_add(1, Ordering::Relaxed);

        // 4. The files, at their recorded offsets, left to the page cache until the next
        // checkpoint.
        let bases = std::mem::take(&mut self.bases);
        let written = (|| {
            for ((rel, data), (_, base)) in writes.iter().zip(&bases) {
                let f = self.file(rel)?;
                f.write_all_at(data, *base)
                    .map_err(|e| write_fail(e, format!("writing {rel}")))?;
            }
            Ok::<(), Fail>(())
        })();
        self.bases = bases;
        written?;
        self.journal_len += rec.len() as u64;
        for ((rel, data), (_, base)) in writes.iter().zip(&self.bases) {
            self.state
                .lengths
                .insert(rel.clone(), base + data.len() as u64);
            if !self.dirty.files.contains(rel) {
                self.dirty.files.insert(rel.clone());
            }
        }
        self.bases.clear();
        self.state.apply_marks(g, marks);
        if self.open.len() > MAX_OPEN {
            self.open.clear();
        }
        let wrote = !all.is_empty();
        let publish = wrote && (self.live.receiver_count() > 0 || self.forward.is_some());
        Ok(Commit {
            outcomes,
            chunks: publish.then(|| Arc::new(all)),
            wrote,
        })
    }

    /// The open handle of a store file (see `open_store_file`).
    fn file(&mut self, rel: &str) -> Result<&mut File> {
        if !self.open.contains_key(rel) {
            // Every caller uses the handle at once (positional writes), so the cache can be
            // dropped mid-group: a group from 5,000 hosts holds MAX_OPEN descriptors, not 5,000.
            if self.open.len() >= MAX_OPEN {
                self.open.clear();
            }
            let f = open_store_file(&self.dir, rel, &mut self.dirty)?;
            self.open.insert(rel.to_string(), f);
        }
        self.open.get_mut(rel).context("store file handle vanished")
    }

    /// Checkpoints when the WAL is big or files have waited long enough.
    fn maybe_compact(&mut self) {
        let now = Instant::now();
        let due = self.journal_len >= COMPACT_AT
            || (!self.dirty.files.is_empty()
                && now.duration_since(self.last_compact) >= COMPACT_EVERY);
        if !due || self.compact_retry.is_some_and(|t| now < t) {
            return;
        }
        match self.compact() {
            Ok(()) => self.compact_retry = None,
            Err(f) if f.full => {
                // Every group is safe in the WAL meanwhile.
                warn!(error = %format!("{:#}", f.err), wal_bytes = self.journal_len,
                    "log store: no space for a checkpoint; retried in a second");
                self.compact_retry = Some(now + COMPACT_RETRY);
            }
            Err(f) => {
                let msg = format!("{:#}", f.err);
                error!(error = %msg, "log store: checkpoint failed: refusing every write until restart (nothing acknowledged is lost: the WAL holds it)");
                counters().store_failed.store(1, Ordering::Relaxed);
                self.failed.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Fsyncs some store files (opening those not already open); a file removed since it was
    /// written (retention) is skipped.
    fn sync_batch(&self, rels: &[&String]) -> Result<(), Fail> {
        let mut handles = Vec::with_capacity(rels.len());
        for &rel in rels {
            let f = match self.open.get(rel) {
                Some(f) => f.try_clone().with_context(|| format!("dup {rel}"))?,
                None => match File::open(self.dir.join(rel)) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("opening {rel}"))
                            .into())
                    }
                },
            };
            handles.push((rel.clone(), f));
        }
        sync_parallel(&handles)?;
        Ok(())
    }

    /// Checkpoint: fsyncs every file written since the last one and the directories that
    /// gained entries, writes the checkpoint, empties the WAL.
    fn compact(&mut self) -> Result<(), Fail> {
        let started = Instant::now();
        // Opened and fsynced SYNC_BATCH files at a time: the file descriptors a checkpoint
        // holds stay bounded whatever the number of hosts (the 5,000-agent soak saw 5,000
        // extra at once before).
        let dirty: Vec<&String> = self.dirty.files.iter().collect();
        for part in dirty.chunks(SYNC_BATCH) {
            self.sync_batch(part)?;
        }
        for d in &self.dirty.dirs {
            match crate::fsutil::sync_dir(d) {
                Ok(()) => {
                    counters().store_fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if !d.exists() => {
                    warn!(dir = %d.display(), error = %format!("{e:#}"), "log store: directory vanished before its fsync");
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.state
            .prune(super::format::day_of(super::format::now_ms()));
        let ck = serde_json::to_vec(&self.state.checkpoint())?;
        crate::fsutil::write_atomic(&self.dir.join(STATE_DIR).join(CHECKPOINT), &ck, 0o600)
            .map_err(|e| Fail {
                full: e
                    .chain()
                    .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(is_full)),
                err: e,
            })?;
        self.journal.set_len(0).context("truncating the WAL")?;
        self.journal.sync_all().context("fsync the WAL")?;
        counters().store_fsyncs.fetch_add(3, Ordering::Relaxed);
        let took = started.elapsed();
        let slow = took > Duration::from_secs(1);
        if slow {
            warn!(
                files = self.dirty.files.len(),
                took_ms = took.as_millis() as u64,
                "log store: slow checkpoint (the disk is slow or overloaded)"
            );
        }
        tracing::debug!(
            files = self.dirty.files.len(),
            dirs = self.dirty.dirs.len(),
            wal_bytes = self.journal_len,
            took_ms = took.as_millis() as u64,
            "log store checkpoint"
        );
        self.journal_len = 0;
        self.dirty = Dirty::default();
        self.last_compact = Instant::now();
        // Handles of past days are never needed again.
        self.open.clear();
        Ok(())
    }
}

struct Commit {
    outcomes: Vec<Result<Stored, StoreError>>,
    chunks: Option<Committed>,
    /// Lines reached the disk (space is available).
    wrote: bool,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn chunk(host: &str, day: i64, text: &str) -> Chunk {
        Chunk {
            host: Arc::from(host),
            day,
            data: text.as_bytes().to_vec(),
            lines: text.lines().count() as u32,
        }
    }

    fn mark(seq: u64) -> Option<Mark> {
        Some(Mark {
            agent: "web1".into(),
            epoch: 7,
            seq,
        })
    }

    fn open(dir: &Path) -> Store {
        Store::open(dir, None).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicates_are_acknowledged_not_stored() {
        let dir = tempfile_dir();
        let s = open(&dir);
        assert_eq!(
            s.write(vec![chunk("web1", 20_000, "a\n")], mark(1))
                .await
                .unwrap(),
            Stored::Written
        );
        assert_eq!(
            s.write(vec![chunk("web1", 20_000, "a\n")], mark(1))
                .await
                .unwrap(),
            Stored::Duplicate
        );
        assert_eq!(
            s.write(vec![chunk("web1", 20_000, "b\n")], mark(2))
                .await
                .unwrap(),
            Stored::Written
        );
        let text = std::fs::read_to_string(dir.join("web1/2024-10-04.log")).unwrap();
        assert_eq!(text, "a\nb\n");
        drop(s);
        // The marks survive a restart (journal replay).
        std::thread::sleep(std::time::Duration::from_millis(100));
        let s = open(&dir);
        assert_eq!(
            s.write(vec![chunk("web1", 20_000, "b\n")], mark(2))
                .await
                .unwrap(),
            Stored::Duplicate
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("web1/2024-10-04.log")).unwrap(),
            "a\nb\n"
        );
    }

    /// A kill after the data reached the file but before the commit record: recovery
    /// removes the uncommitted lines, so the resent batch is stored once.
    #[test]
    fn uncommitted_tail_is_truncated() {
        let dir = tempfile_dir();
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        std::fs::create_dir_all(dir.join("web1")).unwrap();
        let file = dir.join("web1/2024-10-04.log");
        std::fs::write(&file, "a\nb\nPARTIAL").unwrap();
        let mut j = serde_json::to_string(&Record::Open {
            g: 1,
            files: vec![("web1/2024-10-04.log".into(), 0)],
        })
        .unwrap();
        j.push('\n');
        j.push_str(
            &serde_json::to_string(&Record::Commit {
                g: 2,
                files: vec![("web1/2024-10-04.log".into(), 4)],
                marks: vec![("web1".into(), 7, 1)],
            })
            .unwrap(),
        );
        // A torn record at the end (the crashed group's commit).
        j.push_str("\n{\"t\":\"commit\",\"g\":3,\"fil");
        std::fs::write(dir.join(STATE_DIR).join(LEGACY_JOURNAL), j).unwrap();
        let (state, _) = recover(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a\nb\n");
        assert_eq!(state.marks.get(&("web1".into(), 7)).map(|m| m.0), Some(1));

        // A file the group created before its open record was durable cannot exist (the
        // open record is fsynced first); one whose open record says 0 is emptied.
        std::fs::write(dir.join("web1/2024-10-05.log"), "orphan\n").unwrap();
        let mut j2 = std::fs::read_to_string(dir.join(STATE_DIR).join(LEGACY_JOURNAL)).unwrap();
        j2.truncate(j2.rfind('\n').unwrap() + 1);
        j2.push_str(
            &serde_json::to_string(&Record::Open {
                g: 3,
                files: vec![("web1/2024-10-05.log".into(), 0)],
            })
            .unwrap(),
        );
        j2.push('\n');
        std::fs::write(dir.join(STATE_DIR).join(LEGACY_JOURNAL), j2).unwrap();
        recover(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("web1/2024-10-05.log")).unwrap(),
            ""
        );
    }

    #[test]
    fn checkpoint_then_journal_replays_once() {
        let dir = tempfile_dir();
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        let ck = Checkpoint {
            gen: 5,
            lengths: [("h/2024-10-04.log".to_string(), 10)].into_iter().collect(),
            marks: vec![("h".into(), 1, 9, 5)],
        };
        std::fs::write(
            dir.join(STATE_DIR).join(CHECKPOINT),
            serde_json::to_vec(&ck).unwrap(),
        )
        .unwrap();
        // Records from before the checkpoint (not yet truncated) must not win.
        let old = serde_json::to_string(&Record::Commit {
            g: 4,
            files: vec![("h/2024-10-04.log".into(), 3)],
            marks: vec![("h".into(), 1, 8)],
        })
        .unwrap();
        std::fs::write(dir.join(STATE_DIR).join(LEGACY_JOURNAL), old + "\n").unwrap();
        let (state, _) = recover(&dir).unwrap();
        assert_eq!(state.lengths.get("h/2024-10-04.log"), Some(&10));
        assert_eq!(state.marks.get(&("h".into(), 1)).map(|m| m.0), Some(9));
    }

    fn wal_record(g: u64, files: &[(&str, u64, &str)], marks: &[(&str, u64, u64)]) -> Vec<u8> {
        let files: Vec<(&str, u64, &[u8])> = files
            .iter()
            .map(|(r, b, d)| (*r, *b, d.as_bytes()))
            .collect();
        let marks: Vec<(String, u64, u64)> = marks
            .iter()
            .map(|(a, e, s)| (a.to_string(), *e, *s))
            .collect();
        encode_record(g, &files, &marks)
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &t);
            } else {
                std::fs::copy(e.path(), &t).unwrap();
            }
        }
    }

    /// A kill after the WAL fsync but before the lines reached the files (or with only part
    /// of them there): the replay writes them, once.
    #[test]
    fn wal_replay_writes_committed_lines_once() {
        let dir = tempfile_dir();
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        std::fs::create_dir_all(dir.join("web1")).unwrap();
        let mut wal = wal_record(
            1,
            &[("web1/2024-10-04.log", 0, "a\nb\n")],
            &[("web1", 7, 1)],
        );
        wal.extend(wal_record(
            2,
            &[
                ("web1/2024-10-04.log", 4, "c\n"),
                ("db1/2024-10-04.log", 0, "x\n"),
            ],
            &[("web1", 7, 2), ("db1", 1, 5)],
        ));
        std::fs::write(dir.join(STATE_DIR).join(WAL), &wal).unwrap();
        // The first group reached the file, half of the second did not.
        std::fs::write(dir.join("web1/2024-10-04.log"), "a\nb\nc").unwrap();
        let (state, dirty) = recover(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("web1/2024-10-04.log")).unwrap(),
            "a\nb\nc\n"
        );
        // A host directory and file the kill left uncreated.
        assert_eq!(
            std::fs::read_to_string(dir.join("db1/2024-10-04.log")).unwrap(),
            "x\n"
        );
        assert_eq!(state.marks.get(&("web1".into(), 7)).map(|m| m.0), Some(2));
        assert_eq!(state.marks.get(&("db1".into(), 1)).map(|m| m.0), Some(5));
        assert_eq!(state.gen, 2);
        assert!(dirty.files.contains("db1/2024-10-04.log"));
        assert!(dirty.dirs.contains(&dir.join("db1")));
        // Replaying again (a kill during recovery) changes nothing.
        recover(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("web1/2024-10-04.log")).unwrap(),
            "a\nb\nc\n"
        );
    }

    /// A torn or corrupt last record is a group that never committed: ignored, and lines
    /// beyond the committed length (which only an outside writer or an earlier version can
    /// leave) are removed.
    #[test]
    fn torn_or_corrupt_wal_record_is_ignored() {
        for damage in ["torn", "crc", "length"] {
            let dir = tempfile_dir();
            std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
            let mut wal = wal_record(1, &[("h/2024-10-04.log", 0, "one\n")], &[("h", 1, 1)]);
            let second = wal_record(2, &[("h/2024-10-04.log", 4, "two\n")], &[("h", 1, 2)]);
            let mut damaged = second.clone();
            match damage {
                "torn" => damaged.truncate(second.len() - 3),
                "crc" => {
                    let n = damaged.len();
                    damaged[n - 20] ^= 0xff;
                }
                _ => damaged[0..4].copy_from_slice(&u32::MAX.to_le_bytes()),
            }
            wal.extend(damaged);
            std::fs::write(dir.join(STATE_DIR).join(WAL), &wal).unwrap();
            let (state, _) = recover(&dir).unwrap();
            assert_eq!(
                std::fs::read_to_string(dir.join("h/2024-10-04.log")).unwrap(),
                "one\n",
                "{damage}"
            );
            assert_eq!(
                state.marks.get(&("h".into(), 1)).map(|m| m.0),
                Some(1),
                "{damage}"
            );
            assert_eq!(state.lengths.get("h/2024-10-04.log"), Some(&4), "{damage}");
        }
    }

    /// Crash points of a checkpoint: before the checkpoint is renamed in (the WAL replays
    /// over files already on disk), and after it but before the WAL is truncated (records
    /// up to the checkpoint's generation are skipped).
    #[test]
    fn checkpoint_crash_points_replay_nothing_twice() {
        let dir = tempfile_dir();
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        std::fs::create_dir_all(dir.join("h")).unwrap();
        let mut wal = wal_record(1, &[("h/2024-10-04.log", 0, "a\n")], &[("h", 1, 1)]);
        wal.extend(wal_record(
            2,
            &[("h/2024-10-04.log", 2, "b\n")],
            &[("h", 1, 2)],
        ));
        std::fs::write(dir.join(STATE_DIR).join(WAL), &wal).unwrap();
        std::fs::write(dir.join("h/2024-10-04.log"), "a\nb\n").unwrap();
        // Before the rename: no checkpoint yet.
        recover(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("h/2024-10-04.log")).unwrap(),
            "a\nb\n"
        );
        // After the rename: the checkpoint covers both groups, a later line was written
        // by a group whose record follows.
        let ck = Checkpoint {
            gen: 2,
            lengths: [("h/2024-10-04.log".to_string(), 4)].into_iter().collect(),
            marks: vec![("h".into(), 1, 2, 2)],
        };
        std::fs::write(
            dir.join(STATE_DIR).join(CHECKPOINT),
            serde_json::to_vec(&ck).unwrap(),
        )
        .unwrap();
        wal.extend(wal_record(
            3,
            &[("h/2024-10-04.log", 4, "c\n")],
            &[("h", 1, 3)],
        ));
        std::fs::write(dir.join(STATE_DIR).join(WAL), &wal).unwrap();
        let (state, _) = recover(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("h/2024-10-04.log")).unwrap(),
            "a\nb\nc\n"
        );
        assert_eq!(state.marks.get(&("h".into(), 1)).map(|m| m.0), Some(3));
        assert_eq!(state.gen, 3);
    }

    /// Paths in a record never leave the store (a record is ours and checksummed, but
    /// recovery does not trust it with `..`).
    #[test]
    fn wal_paths_outside_the_store_stop_the_replay() {
        let dir = tempfile_dir();
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        let wal = wal_record(1, &[("../escape.log", 0, "x\n")], &[]);
        std::fs::write(dir.join(STATE_DIR).join(WAL), &wal).unwrap();
        let (state, _) = recover(&dir).unwrap();
        assert!(state.lengths.is_empty());
        assert!(!dir.parent().unwrap().join("escape.log").exists());
    }

    /// The store end to end: an image of its directory taken while it runs is what a
    /// `kill -9` leaves (the page cache survives a kill); the same image with the files cut
    /// back is what a power loss leaves (only the WAL was fsynced). Both recover every
    /// acknowledged line exactly once, and resends are duplicates.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_and_power_loss_images_recover_exactly_once() {
        let dir = tempfile_dir();
        let s = open(&dir);
        let mut expected = String::new();
        for seq in 1..=20u64 {
            let text = format!("line {seq}\n");
            expected.push_str(&text);
            let host = format!("h{}", seq % 3);
            let c = chunk(&host, 20_000, &text);
            let m = Some(Mark {
                agent: host.clone(),
                epoch: 1,
                seq,
            });
            assert_eq!(s.write(vec![c], m).await.unwrap(), Stored::Written);
        }
        for (i, cut) in [false, true].into_iter().enumerate() {
            let img = dir.with_extension(format!("img{i}"));
            copy_dir(&dir, &img);
            assert!(
                std::fs::metadata(img.join(STATE_DIR).join(WAL))
                    .unwrap()
                    .len()
                    > 0
            );
            if cut {
                for h in 0..3 {
                    let f = img.join(format!("h{h}/2024-10-04.log"));
                    let len = std::fs::metadata(&f).unwrap().len();
                    OpenOptions::new()
                        .write(true)
                        .open(&f)
                        .unwrap()
                        .set_len(len / 2)
                        .unwrap();
                }
                std::fs::remove_dir_all(img.join("h0")).unwrap();
            }
            let s2 = open(&img);
            let mut got = String::new();
            for h in 0..3 {
                got.push_str(
                    &std::fs::read_to_string(img.join(format!("h{h}/2024-10-04.log"))).unwrap(),
                );
            }
            let mut got: Vec<&str> = got.lines().collect();
            let mut want: Vec<&str> = expected.lines().collect();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "cut={cut}");
            // Every resend is a duplicate; the WAL was checkpointed at open.
            for seq in 1..=20u64 {
                let host = format!("h{}", seq % 3);
                let m = Some(Mark {
                    agent: host.clone(),
                    epoch: 1,
                    seq,
                });
                assert_eq!(
                    s2.write(vec![chunk(&host, 20_000, "again\n")], m)
                        .await
                        .unwrap(),
                    Stored::Duplicate
                );
            }
            assert_eq!(
                std::fs::metadata(img.join(STATE_DIR).join(WAL))
                    .unwrap()
                    .len(),
                0
            );
        }
    }

    pub(crate) fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("bastide-logs-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
