//! The log store's writer: one thread appends every event to `<dir>/<host>/<YYYY-MM-DD>.log`
//! with group commit, and is the only place that decides whether an agent batch is new or a
//! duplicate.
//!
//! # Exactly once, across `kill -9` at any point
//!
//! Beside the plain files, `<dir>/.state/` holds a write-ahead journal (`journal`) and a
//! checkpoint (`checkpoint.json`). Together they record, for every file written recently, its
//! *committed length*, and for every agent buffer (agent, epoch) the highest sequence number
//! whose batch is stored (the high-water mark). One group commit is:
//!
//! 1. take every request waiting in the queue (agent batches from all agents, syslog chunks);
//!    drop agent batches at or below their high-water mark (duplicates);
//! 2. for each file the journal does not know yet, append an *open* record with the file's
//!    length before this group, and fsync the journal (once per file per day: rare);
//! 3. append the lines to the files, fsync them;
//! 4. append one *commit* record: the new length of every file written and the new
//!    high-water marks; fsync the journal;
//! 5. only now acknowledge the agent batches (duplicates too).
//!
//! On start-up the checkpoint and the journal are replayed (a torn last record is ignored)
//! and every file longer than its committed length is truncated back to it: lines written
//! by a group whose commit record never reached the disk are removed, so that the agent's
//! resend of the unacknowledged batch is stored exactly once. A kill between steps 3 and 4
//! therefore costs nothing for agents; syslog lines of that last group are lost (syslog has
//! no acknowledgement; rsyslog's omfile does not even fsync).
//!
//! The journal is compacted into the checkpoint (written atomically: temporary file, fsync,
//! rename, fsync directory) once it passes a few MiB; records carry a generation number so a
//! crash between the checkpoint and the journal truncation replays nothing twice.
//!
//! # A full filesystem
//!
//! `ENOSPC`/`EDQUOT` while writing a group is not fatal: the group is rolled back (its files
//! truncated to their committed lengths, the journal to its last whole record), its agent
//! batches are refused with [`StoreError::Full`] (the agent keeps them and retries), its
//! syslog lines are counted as dropped, and the next group simply tries again, so the store
//! recovers by itself once space returns. An agent with a refused batch has every later
//! batch refused too until it opens a new stream (which resends from its oldest
//! unacknowledged batch): otherwise a smaller later batch could be stored first and the
//! refused one would then look like a duplicate. Any other write error, and every fsync
//! error (after a failed fsync the page cache cannot be trusted), still stops the store
//! until restart.
//!
//! Files are named by the day (UTC) the bastion *received* the events, as rsyslog's
//! `%$YEAR%-%$MONTH%-%$DAY%` templates do; each line carries the event's own time. Past days
//! are therefore never written again, which is what lets retention compress them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info, warn};

use super::format::day_name;
use super::metrics::{counters, Source};

/// Directory (inside the store) of the journal and checkpoint; sanitised host names never
/// start with a dot, so it cannot clash with a host.
pub const STATE_DIR: &str = ".state";
const JOURNAL: &str = "journal";
const CHECKPOINT: &str = "checkpoint.json";
/// Journal size that triggers a checkpoint.
const COMPACT_AT: u64 = 4 * 1024 * 1024;
/// Most bytes of lines in one group commit.
const GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Requests waiting for the writer (each at most a few MiB).
const QUEUE: usize = 1024;
/// Epochs remembered per agent (a new epoch is a wiped or re-enrolled agent buffer).
const EPOCHS_PER_AGENT: usize = 8;
/// Open file handles kept between groups.
const MAX_OPEN: usize = 512;
/// Threads that fsync the files of one group together (see `Writer::sync_files`).
const SYNC_THREADS: usize = 16;

/// Lines for one host and one day, already formatted (see `format.rs`).
#[derive(Debug, Clone)]
pub struct Chunk {
    pub host: Arc<str>,
    pub day: i64,
    pub data: Vec<u8>,
    pub lines: u32,
}

impl Chunk {
    pub fn rel_path(&self) -> String {
        format!("{}/{}.log", self.host, day_name(self.day))
    }
}

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
                for (a, e, s) in marks {
                    let m = self.marks.entry((a, e)).or_insert((0, g));
                    *m = (m.0.max(s), g);
                }
            }
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
        let state = recover(dir)?;
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.join(JOURNAL))
            .with_context(|| format!("opening {}/{STATE_DIR}/{JOURNAL}", dir.display()))?;
        let journal_len = journal
            .metadata()
            .with_context(|| format!("{}/{STATE_DIR}/{JOURNAL}", dir.display()))?
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
        };
        writer.compact()?;
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

/// Replays checkpoint and journal, truncates files to their committed lengths, returns
/// the state.
fn recover(dir: &Path) -> Result<State> {
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
    let jpath = sdir.join(JOURNAL);
    if let Ok(f) = File::open(&jpath) {
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
        let total = std::fs::metadata(&jpath).map(|m| m.len()).unwrap_or(0);
        if total > good {
            warn!(
                journal = %jpath.display(),
                dropped_bytes = total - good,
                "log store: ignoring the torn end of the journal (a group that never committed)"
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
        } else if meta.len() < len {
            error!(file = %path.display(), expected = len, found = meta.len(),
                "log store: file shorter than its committed length (modified outside bastide, or the disk lost data)");
        }
    }
    info!(
        dir = %dir.display(),
        files = state.lengths.len(),
        agent_epochs = state.marks.len(),
        truncated_bytes = truncated,
        "log store recovered"
    );
    Ok(state)
}

struct Writer {
    dir: PathBuf,
    state: State,
    journal: File,
    open: HashMap<String, File>,
    live: broadcast::Sender<Committed>,
    failed: Arc<AtomicBool>,
    forward: Option<super::forward::Queue>,
    /// Length of the journal up to its last whole record.
    journal_len: u64,
    /// Agents with a batch refused for lack of space, until their next stream.
    refused: HashSet<String>,
    /// Set while the filesystem is full.
    full: Option<Full>,
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
        // Channel closed: every sender is gone (shutdown).
        let _ = self.journal.sync_all();
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

    /// Undoes a group that failed for lack of space: files back to their committed
    /// lengths, the journal back to its last whole record.
    fn rollback(&mut self) -> Result<()> {
        let rels: Vec<String> = self.open.keys().cloned().collect();
        for rel in rels {
            let Some(&len) = self.state.lengths.get(&rel) else {
                continue;
            };
            let f = self.file(&rel)?;
            let now = f.metadata().with_context(|| format!("stat {rel}"))?.len();
            if now > len {
                f.set_len(len)
                    .with_context(|| format!("truncating {rel}"))?;
                f.sync_all().with_context(|| format!("fsync {rel}"))?;
            }
        }
        let jl = self.journal.metadata().context("stat the journal")?.len();
        if jl > self.journal_len {
            self.journal
                .set_len(self.journal_len)
                .context("truncating the journal")?;
            self.journal.sync_all().context("fsync the journal")?;
        }
        Ok(())
    }

    fn record(&mut self, r: &Record) -> Result<(), Fail> {
        let mut line = serde_json::to_vec(r)?;
        line.push(b'\n');
        self.journal
            .write_all(&line)
            .map_err(|e| write_fail(e, "writing the journal".into()))?;
        self.journal.sync_data().context("fsync the journal")?;
        self.journal_len += line.len() as u64;
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
        self.state.gen += 1;
        let g = self.state.gen;

        // 2. Files the journal does not know: their length before this group.
        let mut new_files = Vec::new();
        for rel in writes.keys() {
            if !self.state.lengths.contains_key(rel) {
                let f = self.file(rel)?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                new_files.push((rel.clone(), len));
            }
        }
        if !new_files.is_empty() {
            let r = Record::Open {
                g,
                files: new_files,
            };
            self.record(&r)?;
            self.state.apply(r);
        }

        // 3. Data, then fsync (every file of the group at once: see `sync_files`).
        let mut lengths = Vec::with_capacity(writes.len());
        for (rel, data) in &writes {
            let f = self.file(rel)?;
            f.write_all(data)
                .map_err(|e| write_fail(e, format!("writing {rel}")))?;
            let len = f
                .seek(SeekFrom::End(0))
                .with_context(|| format!("seek {rel}"))?;
            lengths.push((rel.clone(), len));
        }
        self.sync_files(lengths.iter().map(|(rel, _)| rel.as_str()))?;

        // 4. Commit record.
        if !lengths.is_empty() || !marks.is_empty() {
            let r = Record::Commit {
                g,
                files: lengths,
                marks,
            };
            self.record(&r)?;
            self.state.apply(r);
        }
        if self.journal_len > COMPACT_AT {
            // The group is durable whatever happens here: a failed compaction (no space
            // for the checkpoint) is retried after a later group.
            if let Err(e) = self.compact() {
                warn!(error = %format!("{e:#}"), "log store: journal compaction failed; retried later");
            }
        }
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

    /// Fsyncs the given open store files. A group from many agents touches one file per host:
    /// fsynced one after the other they cost one journal commit of the filesystem each (about
    /// 10 ms on a cloud disk, so a few hundred hosts per second at most); fsynced from several
    /// threads at once, the filesystem folds them into a few commits.
    fn sync_files<'a>(&self, rels: impl Iterator<Item = &'a str>) -> Result<()> {
        let files: Vec<(&str, &File)> = rels
            .map(|rel| {
                self.open
                    .get(rel)
                    .map(|f| (rel, f))
                    .with_context(|| format!("{rel} is not open"))
            })
            .collect::<Result<_>>()?;
        let sync = |part: &[(&str, &File)]| -> Result<()> {
            for (rel, f) in part {
                f.sync_data().with_context(|| format!("fsync {rel}"))?;
            }
            Ok(())
        };
        if files.len() <= 1 {
            return sync(&files);
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

    /// The open handle of a store file, creating its host directory and the file durably.
    fn file(&mut self, rel: &str) -> Result<&mut File> {
        if !self.open.contains_key(rel) {
            let path = self.dir.join(rel);
            let host_dir = path.parent().unwrap_or(&self.dir).to_path_buf();
            if !host_dir.exists() {
                std::fs::create_dir(&host_dir)
                    .with_context(|| format!("creating {}", host_dir.display()))?;
                crate::fsutil::sync_dir(&self.dir)?;
            }
            let existed = path.exists();
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            if !existed {
                crate::fsutil::sync_dir(&host_dir)?;
            }
            self.open.insert(rel.to_string(), f);
        }
        self.open.get_mut(rel).context("store file handle vanished")
    }

    /// Writes the checkpoint and empties the journal.
    fn compact(&mut self) -> Result<()> {
        self.state
            .prune(super::format::day_of(super::format::now_ms()));
        let ck = serde_json::to_vec(&self.state.checkpoint())?;
        crate::fsutil::write_atomic(&self.dir.join(STATE_DIR).join(CHECKPOINT), &ck, 0o600)?;
        self.journal.set_len(0).context("truncating the journal")?;
        self.journal.sync_all().context("fsync the journal")?;
        self.journal_len = 0;
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
        std::fs::write(dir.join(STATE_DIR).join(JOURNAL), j).unwrap();
        let state = recover(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a\nb\n");
        assert_eq!(state.marks.get(&("web1".into(), 7)).map(|m| m.0), Some(1));

        // A file the group created before its open record was durable cannot exist (the
        // open record is fsynced first); one whose open record says 0 is emptied.
        std::fs::write(dir.join("web1/2024-10-05.log"), "orphan\n").unwrap();
        let mut j2 = std::fs::read_to_string(dir.join(STATE_DIR).join(JOURNAL)).unwrap();
        j2.truncate(j2.rfind('\n').unwrap() + 1);
        j2.push_str(
            &serde_json::to_string(&Record::Open {
                g: 3,
                files: vec![("web1/2024-10-05.log".into(), 0)],
            })
            .unwrap(),
        );
        j2.push('\n');
        std::fs::write(dir.join(STATE_DIR).join(JOURNAL), j2).unwrap();
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
        std::fs::write(dir.join(STATE_DIR).join(JOURNAL), old + "\n").unwrap();
        let state = recover(&dir).unwrap();
        assert_eq!(state.lengths.get("h/2024-10-04.log"), Some(&10));
        assert_eq!(state.marks.get(&("h".into(), 1)).map(|m| m.0), Some(9));
    }

    pub(crate) fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("bastide-logs-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
