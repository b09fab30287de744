//! Log shipping: sources (files followed like `tail -F`, the systemd journal) feed a batcher
//! that seals batches into a bounded on-disk buffer, then advances the sources' checkpoints;
//! a shipper per bastion session streams the buffer over `ShipLogs` and deletes what the
//! bastion acknowledges. A full buffer stops the sources (backpressure): nothing read is
//! dropped.
//!
//! Exactly-once across an agent crash: the checkpoint updates of a batch are stored inside
//! its buffer record, and `checkpoints.json` remembers the last batch it includes; at start
//! the updates of later batches are replayed, so a crash between the buffer write and the
//! checkpoint write neither loses nor repeats lines.

pub mod allow;
pub mod buffer;
pub mod checkpoint;
pub mod config;
pub mod journal;
pub mod multiline;
pub mod shipper;
pub mod tail;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bastide_proto::v1::{Label, LogEvent, MetricFamily, MetricType, Sample};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use buffer::{Buffer, Full};
use checkpoint::{file_key, Checkpoints, Update};
pub use config::{LogSourceConfig, LogsConfig};

/// Metric names (families added to the agent's host metrics batch).
pub mod names {
    pub const LINES_READ: &str = "bastide_agent_log_lines_read_total";
    pub const EVENTS_BUFFERED: &str = "bastide_agent_log_events_buffered_total";
    pub const EVENTS_SHIPPED: &str = "bastide_agent_log_events_shipped_total";
    pub const BATCHES_SHIPPED: &str = "bastide_agent_log_batches_shipped_total";
    pub const BATCHES_RESENT: &str = "bastide_agent_log_batches_resent_total";
    pub const TRUNCATED: &str = "bastide_agent_log_lines_truncated_total";
    pub const LOST: &str = "bastide_agent_log_lost_total";
    pub const LOST_BYTES: &str = "bastide_agent_log_lost_bytes_total";
    pub const BACKPRESSURE: &str = "bastide_agent_log_backpressure_total";
    pub const BUFFER_BYTES: &str = "bastide_agent_log_buffer_bytes";
    pub const BUFFER_MAX_BYTES: &str = "bastide_agent_log_buffer_max_bytes";
    pub const BUFFER_BATCHES: &str = "bastide_agent_log_buffer_batches";
    pub const BUFFER_EVENTS: &str = "bastide_agent_log_buffer_events";
    pub const BUFFER_AGE: &str = "bastide_agent_log_buffer_age_seconds";
}

/// What sources hand to the batcher.
#[derive(Debug)]
pub enum Item {
    Event {
        event: LogEvent,
        update: Option<Update>,
    },
    Update(Update),
    /// Consecutive events of one source, already encoded as `LogBatch.events` fields
    /// (`buffer::encode_event_parts`: no allocation per line), with the checkpoint position
    /// after the last.
    Events {
        data: Vec<u8>,
        /// Per event: where it ends in `data`, and the file offset after it (where a batch
        /// split puts the checkpoint).
        ends: Vec<(u32, u64)>,
        update: Option<Update>,
    },
}

/// Counters of the pipeline (exported as `bastide_agent_log_*`).
#[derive(Debug, Default)]
pub struct Stats {
    pub lines_read_file: AtomicU64,
    pub lines_read_journal: AtomicU64,
    pub events_buffered: AtomicU64,
    pub events_shipped: AtomicU64,
    pub batches_shipped: AtomicU64,
    /// Batches sent again after the stream carrying them ended unacknowledged (a lost
    /// session, a failover to another bastion): the bastion that had them may have stored
    /// them, so each may be stored twice. Bounded by the shipper's window per loss.
    pub batches_resent: AtomicU64,
    /// Highest sequence number sent so far (what tells a resend from a first send).
    pub highest_sent: AtomicU64,
    pub truncated: AtomicU64,
    pub backpressure: AtomicU64,
    pub lost_bytes: AtomicU64,
    lost: Mutex<BTreeMap<&'static str, u64>>,
}

impl Stats {
    /// Counts a loss (rotation while blocked or stopped...) of at least `bytes` bytes.
    pub fn lost(&self, reason: &'static str, bytes: u64) {
        self.lost_bytes.fetch_add(bytes, Relaxed);
        if let Ok(mut m) = self.lost.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn lost_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.lost.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// State shared by the pipeline and the shippers.
pub struct Shared {
    pub buffer: Mutex<Buffer>,
    /// Sequence number of the newest buffered batch.
    pub appended: watch::Sender<u64>,
    /// Highest acknowledged sequence number.
    pub acked: watch::Sender<u64>,
    pub stats: Arc<Stats>,
    pub epoch: u64,
    /// "No log store on the bastion" was reported (once per agent run, not per session).
    pub(crate) no_store_reported: std::sync::atomic::AtomicBool,
    /// "The bastion acknowledges log batches" was reported (once per agent run).
    pub(crate) acks_reported: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        // A panic while holding the lock cannot leave the buffer inconsistent on disk (every
        // change is append + fsync); keep going with the inner value.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acknowledges up to `seq` (blocking file I/O: call from a blocking context).
    pub fn ack(&self, seq: u64) -> Result<()> {
        let mut b = self.lock();
        let n = b.ack(seq)?;
        // Counted under the lock, so the counter never lags what the buffer shows.
        self.stats.events_shipped.fetch_add(n, Relaxed);
        let acked = b.acked();
        drop(b);
        self.acked.send_replace(acked);
        Ok(())
    }

    /// Reads batch `seq` (blocking).
    pub fn read(&self, seq: u64) -> Result<Option<bastide_proto::v1::LogBatch>> {
        self.lock().read(seq)
    }

    /// Reads batch `seq` still encoded, as it goes on the wire (blocking).
    pub fn read_raw(&self, seq: u64) -> Result<Option<buffer::RawBatch>> {
        self.lock().read_raw(seq)
    }

    /// The `bastide_agent_log_*` families for the metrics batch.
    pub fn metric_families(&self) -> Vec<MetricFamily> {
        let (disk, max, (batches, events), oldest) = {
            let b = self.lock();
            (b.disk_bytes(), b.max_bytes(), b.pending(), b.oldest_ms())
        };
        let s = &self.stats;
        let age = oldest
            .map(|t| (now_ms() - t).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        let fam = |name: &str,
                   help: &str,
                   ty: MetricType,
                   samples: Vec<(Vec<(&str, &str)>, f64)>| MetricFamily {
            name: name.to_string(),
            help: help.to_string(),
            r#type: ty as i32,
            samples: samples
                .into_iter()
                .map(|(labels, value)| Sample {
                    labels: labels
                        .into_iter()
                        .map(|(k, v)| Label {
                            name: k.to_string(),
                            value: v.to_string(),
                        })
                        .collect(),
                    value,
                })
                .collect(),
        };
        use MetricType::{Counter, Gauge};
        let c = |a: &AtomicU64| a.load(Relaxed) as f64;
        let mut lost: Vec<(Vec<(&str, &str)>, f64)> = Vec::new();
        let by_reason = s.lost_by_reason();
        for (reason, n) in &by_reason {
            lost.push((vec![("reason", reason)], *n as f64));
        }
        vec![
            fam(
                names::LINES_READ,
                "Lines read from log sources.",
                Counter,
                vec![
                    (vec![("source_kind", "file")], c(&s.lines_read_file)),
                    (vec![("source_kind", "journal")], c(&s.lines_read_journal)),
                ],
            ),
            fam(
                names::EVENTS_BUFFERED,
                "Log events written to the on-disk buffer.",
                Counter,
                vec![(vec![], c(&s.events_buffered))],
            ),
            fam(
                names::EVENTS_SHIPPED,
                "Log events acknowledged by the bastion.",
                Counter,
                vec![(vec![], c(&s.events_shipped))],
            ),
            fam(
                names::BATCHES_SHIPPED,
                "Log batches sent to the bastion (resends included).",
                Counter,
                vec![(vec![], c(&s.batches_shipped))],
            ),
            fam(
                names::BATCHES_RESENT,
                "Log batches sent again because the stream carrying them ended before their acknowledgement (possible duplicates on the bastion side, at most the in-flight window per loss).",
                Counter,
                vec![(vec![], c(&s.batches_resent))],
            ),
            fam(
                names::TRUNCATED,
                "Log lines or events cut at the configured maximum size.",
                Counter,
                vec![(vec![], c(&s.truncated))],
            ),
            fam(
                names::LOST,
                "Log data lost, by reason (a file truncated or rotated away before it was read).",
                Counter,
                lost,
            ),
            fam(
                names::LOST_BYTES,
                "Known lower bound of the bytes of log data lost.",
                Counter,
                vec![(vec![], c(&s.lost_bytes))],
            ),
            fam(
                names::BACKPRESSURE,
                "Times the log sources were paused because the buffer was full.",
                Counter,
                vec![(vec![], c(&s.backpressure))],
            ),
            fam(
                names::BUFFER_BYTES,
                "Bytes of the on-disk log buffer.",
                Gauge,
                vec![(vec![], disk as f64)],
            ),
            fam(
                names::BUFFER_MAX_BYTES,
                "Configured bound of the on-disk log buffer.",
                Gauge,
                vec![(vec![], max as f64)],
            ),
            fam(
                names::BUFFER_BATCHES,
                "Log batches buffered and not yet acknowledged.",
                Gauge,
                vec![(vec![], batches as f64)],
            ),
            fam(
                names::BUFFER_EVENTS,
                "Log events buffered and not yet acknowledged.",
                Gauge,
                vec![(vec![], events as f64)],
            ),
            fam(
                names::BUFFER_AGE,
                "Age of the oldest unacknowledged log batch.",
                Gauge,
                vec![(vec![], age)],
            ),
        ]
    }
}

/// Opens the buffer and checkpoints, starts the batcher and the sources (from `sources`,
/// which may change at run time) and returns the state the shippers use.
pub fn start(
    state_dir: &Path,
    cfg: &LogsConfig,
    sources: watch::Receiver<Vec<LogSourceConfig>>,
    shutdown: CancellationToken,
) -> Result<Arc<Shared>> {
    let dir = cfg
        .buffer_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("logs"));
    let mut buffer = Buffer::open(&dir, cfg.buffer_max_bytes)
        .with_context(|| format!("opening the log buffer in {}", dir.display()))?;
    let ck_path = dir.join("checkpoints.json");
    let mut ckpts = Checkpoints::load(&ck_path)?;
    // Replay the checkpoint updates of batches buffered after the last checkpoint write.
    let metas = buffer.metas_after(ckpts.batch_seq)?;
    if !metas.is_empty() {
        for (seq, meta) in metas {
            if let Ok(updates) = serde_json::from_slice::<Vec<Update>>(&meta) {
                for u in updates {
                    ckpts.apply(u);
                }
            }
            ckpts.batch_seq = seq;
        }
        ckpts.save(&ck_path)?;
    }
    buffer.set_floor(ckpts.batch_seq)?;
    let (pending, _) = buffer.pending();
    info!(dir = %dir.display(), epoch = buffer.epoch(), unacknowledged_batches = pending, "log buffer open");
    let shared = Arc::new(Shared {
        epoch: buffer.epoch(),
        appended: watch::Sender::new(buffer.last_seq()),
        acked: watch::Sender::new(buffer.acked()),
        buffer: Mutex::new(buffer),
        stats: Arc::new(Stats::default()),
        no_store_reported: std::sync::atomic::AtomicBool::new(false),
        acks_reported: std::sync::atomic::AtomicBool::new(false),
    });
    // Items carry up to 512 events (file sources): this bounds what is read ahead of the
    // batcher to about 8,000 events.
    let (tx, rx) = mpsc::channel::<Item>(16);
    let ckpts = Arc::new(Mutex::new(ckpts));
    tokio::spawn(batcher(
        cfg.clone(),
        shared.clone(),
        rx,
        ckpts.clone(),
        ck_path,
        shutdown.clone(),
    ));
    tokio::spawn(manage_sources(
        cfg.clone(),
        sources,
        tx,
        shared.stats.clone(),
        ckpts,
        shutdown,
    ));
    Ok(shared)
}

/// Starts and stops sources as the configured list changes.
async fn manage_sources(
    cfg: LogsConfig,
    mut sources: watch::Receiver<Vec<LogSourceConfig>>,
    tx: mpsc::Sender<Item>,
    stats: Arc<Stats>,
    ckpts: Arc<Mutex<Checkpoints>>,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<String, (LogSourceConfig, CancellationToken)> = HashMap::new();
    loop {
        let want: Vec<LogSourceConfig> = sources.borrow_and_update().clone();
        let mut wanted = HashMap::new();
        for (i, s) in want.into_iter().enumerate() {
            let problems = s.validate(&format!("logs.sources[{i}]"));
            if !problems.is_empty() {
                warn!(problems = %problems.join("; "), "log source refused");
                continue;
            }
            wanted.insert(s.id(), s);
        }
        running.retain(|id, (c, token)| {
            let keep = wanted.get(id) == Some(c);
            if !keep {
                info!(source = %id, "log source stopped");
                token.cancel();
            }
            keep
        });
        for (id, s) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            let token = shutdown.child_token();
            let snapshot = ckpts.lock().map(|c| c.clone()).unwrap_or_default();
            if s.journal {
                tokio::spawn(journal::run(
                    cfg.journalctl.clone(),
                    s.clone(),
                    snapshot,
                    cfg.max_line_bytes,
                    tx.clone(),
                    stats.clone(),
                    token.clone(),
                ));
            } else {
                match tail::FileTailer::new(&s, cfg.max_line_bytes, &snapshot, stats.clone())
                    .and_then(|t| {
                        Ok(tail::spawn(
                            t,
                            cfg.poll_interval,
                            tx.clone(),
                            token.clone(),
                        )?)
                    }) {
                    Ok(_) => {}
                    Err(e) => {
                        warn!(source = %id, error = %format!("{e:#}"), "cannot start log source");
                        continue;
                    }
                }
            }
            info!(source = %id, "log source started");
            running.insert(id, (s, token));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = sources.changed() => if r.is_err() {
                // Nobody can change the list any more: keep what runs.
                shutdown.cancelled().await;
                return;
            }
        }
    }
}

fn update_key(u: &Update) -> String {
    match u {
        Update::File { source, pos } => file_key(source, pos.dev, pos.ino),
        Update::FileDone { source, dev, ino } => file_key(source, *dev, *ino),
        Update::Journal { source, .. } => format!("journal|{source}"),
        Update::Seen { source } => format!("seen|{source}"),
    }
}

/// `u` (a file position) moved to `offset`.
fn at_offset(u: &Update, offset: u64) -> Option<Update> {
    match u {
        Update::File { source, pos } => Some(Update::File {
            source: source.clone(),
            pos: checkpoint::FilePos {
                offset,
                ..pos.clone()
            },
        }),
        _ => None,
    }
}

/// How long the checkpoints file may lag the buffer (each save is two fsyncs; what it
/// lags by is replayed from the buffer records after a crash).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

struct Pending {
    /// The batch's events, encoded (what the buffer record and the wire carry).
    data: Vec<u8>,
    count: usize,
    updates: BTreeMap<String, Update>,
    deadline: Option<tokio::time::Instant>,
    /// The checkpoints in memory are ahead of the file.
    ck_dirty: bool,
    ck_saved: tokio::time::Instant,
}

/// Seals batches into the buffer, then moves the checkpoints; stops taking items while the
/// buffer is full.
async fn batcher(
    cfg: LogsConfig,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Item>,
    ckpts: Arc<Mutex<Checkpoints>>,
    ck_path: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    let mut p = Pending {
        data: Vec::new(),
        count: 0,
        updates: BTreeMap::new(),
        deadline: None,
        ck_dirty: false,
        ck_saved: tokio::time::Instant::now(),
    };
    loop {
        let deadline = p.deadline;
        let ck_due = p.ck_saved + CHECKPOINT_EVERY;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            item = rx.recv() => {
                let Some(item) = item else { break };
                let update = match item {
                    Item::Event { event, update } => {
                        buffer::encode_event(&event, &mut p.data);
                        p.count += 1;
                        update
                    }
                    Item::Update(u) => Some(u),
                    Item::Events { data, ends, update } => {
                        // Split across batches where a batch fills; each part carries the
                        // position after its own last event, so no crash repeats a line.
                        let n = ends.len();
                        let mut from = 0usize;
                        let mut stop = false;
                        for (i, &(cut, end)) in ends.iter().enumerate() {
                            let cut = (cut as usize).clamp(from, data.len());
                            p.count += 1;
                            if i + 1 < n
                                && (p.count >= cfg.batch_max_events
                                    || p.data.len() + (cut - from) >= cfg.batch_max_bytes)
                            {
                                p.data.extend_from_slice(data.get(from..cut).unwrap_or_default());
                                from = cut;
                                if let Some(u) = update.as_ref().and_then(|u| at_offset(u, end)) {
                                    p.updates.insert(update_key(&u), u);
                                }
                                if !flush(&mut p, &shared, &ckpts, &ck_path, &shutdown).await {
                                    stop = true;
                                    break;
                                }
                            }
                        }
                        if stop {
                            break;
                        }
                        p.data.extend_from_slice(data.get(from..).unwrap_or_default());
                        update
                    }
                };
                if let Some(u) = update {
                    p.updates.insert(update_key(&u), u);
                }
                if p.deadline.is_none() {
                    p.deadline = Some(tokio::time::Instant::now() + cfg.batch_timeout);
                }
                if (p.count >= cfg.batch_max_events || p.data.len() >= cfg.batch_max_bytes)
                    && !flush(&mut p, &shared, &ckpts, &ck_path, &shutdown).await
                {
                    break;
                }
            }
            _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => {
                if !flush(&mut p, &shared, &ckpts, &ck_path, &shutdown).await {
                    break;
                }
            }
            _ = tokio::time::sleep_until(ck_due), if p.ck_dirty => {
                save_checkpoints(&mut p, &shared, &ckpts, &ck_path).await;
            }
        }
    }
    // Shutdown: store what was read (the checkpoints follow), if there is room.
    if p.count > 0 || !p.updates.is_empty() {
        let never = CancellationToken::new();
        never.cancel();
        flush(&mut p, &shared, &ckpts, &ck_path, &never).await;
    }
    if p.ck_dirty {
        save_checkpoints(&mut p, &shared, &ckpts, &ck_path).await;
    }
    let s = shared.clone();
    let _ = tokio::task::spawn_blocking(move || s.lock().persist()).await;
}

/// Stores the pending batch and checkpoints. False when shutting down with the buffer full
/// (the items are not stored; their checkpoints do not move, so they are read again).
async fn flush(
    p: &mut Pending,
    shared: &Arc<Shared>,
    ckpts: &Arc<Mutex<Checkpoints>>,
    ck_path: &Path,
    shutdown: &CancellationToken,
) -> bool {
    // Taken, not cleared: the batch's memory goes back to the system once it is stored
    // (idle RSS), and the next batch grows its own.
    let mut data = std::mem::take(&mut p.data);
    let n = std::mem::replace(&mut p.count, 0) as u64;
    let updates: Vec<Update> = std::mem::take(&mut p.updates).into_values().collect();
    p.deadline = None;
    let mut seq = None;
    if n > 0 {
        let meta = serde_json::to_vec(&updates).unwrap_or_default();
        let mut paused = false;
        let mut acked = shared.acked.subscribe();
        loop {
            let s = shared.clone();
            let m = meta.clone();
            let r = tokio::task::spawn_blocking(move || {
                let r = s.lock().append_encoded(&data, n as u32, &m);
                (r, data)
            })
            .await;
            let r = match r {
                Ok((r, back)) => {
                    data = back;
                    r
                }
                Err(e) => {
                    error!(error = %e, "log buffer task failed");
                    return false;
                }
            };
            match r {
                Ok(Ok(s)) => {
                    seq = Some(s);
                    break;
                }
                Ok(Err(Full)) => {
                    // Acknowledged batches stay on disk until the checkpoints file covers
                    // them: write it now rather than wait for acknowledgements that free
                    // nothing.
                    if p.ck_dirty {
                        save_checkpoints(p, shared, ckpts, ck_path).await;
                        if !p.ck_dirty {
                            continue;
                        }
                    }
                    if !paused {
                        paused = true;
                        shared.stats.backpressure.fetch_add(1, Relaxed);
                        warn!("log buffer full: sources paused until the bastion acknowledges");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        r = acked.changed() => if r.is_err() { return false },
                    }
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot write the log buffer: retrying in 1s");
                    if !retry_later(shutdown).await {
                        return false;
                    }
                }
            }
        }
        if paused {
            info!("log buffer has room again: sources resumed");
        }
        shared.stats.events_buffered.fetch_add(n, Relaxed);
    }
    {
        let Ok(mut c) = ckpts.lock() else {
            return false;
        };
        for u in updates {
            c.apply(u);
        }
        if let Some(s) = seq {
            c.batch_seq = s;
        }
    }
    p.ck_dirty = true;
    // The batch can go now: its record carries its checkpoint updates, and the buffer keeps
    // it on disk until the checkpoints file covers it (`Buffer::set_floor`).
    if let Some(s) = seq {
        shared.appended.send_replace(s);
    }
    // Updates without events (a file seen or finished) have no record to be replayed from.
    if seq.is_none() || p.ck_saved.elapsed() >= CHECKPOINT_EVERY {
        save_checkpoints(p, shared, ckpts, ck_path).await;
    }
    true
}

/// Writes the checkpoints file, then lets the buffer drop the acknowledged batches it covers.
async fn save_checkpoints(
    p: &mut Pending,
    shared: &Arc<Shared>,
    ckpts: &Arc<Mutex<Checkpoints>>,
    ck_path: &Path,
) {
    let Ok(snapshot) = ckpts.lock().map(|c| c.clone()) else {
        return;
    };
    p.ck_dirty = false;
    p.ck_saved = tokio::time::Instant::now();
    let path = ck_path.to_path_buf();
    let s = shared.clone();
    let r = tokio::task::spawn_blocking(move || {
        snapshot.save(&path)?;
        let mut b = s.lock();
        b.set_floor(snapshot.batch_seq)
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        // The updates are in the buffer records too: replayed at the next start.
        Ok(Err(e)) => {
            p.ck_dirty = true;
            warn!(error = %format!("{e:#}"), "cannot write the log checkpoints")
        }
        Err(e) => warn!(error = %e, "checkpoint task failed"),
    }
}

async fn retry_later(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
    }
}
