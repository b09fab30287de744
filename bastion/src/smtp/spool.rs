//! The mail spool: one file per message holding its envelope and content, plus a small
//! state file per message once a delivery was attempted. A message is written under
//! `tmp/`, fsynced, renamed into `queue/` and the directory fsynced before the client gets
//! its 250; renames of concurrent sessions share one directory fsync (group commit).
//! `tmp/` is emptied at start, so a crash mid-write leaves nothing that gets delivered.
//!
//! Layout under the spool directory (format documented in the README):
//! - `queue/<id>.msg`: headers `Bastide-Spool: 1`, `Id`, `Arrived`, `Client`, `Helo`,
//!   `Sender`, one `Recipient` per recipient, `Size`, a blank line, then the message
//!   exactly as it is relayed (CRLF line ends, Received: header first).
//! - `queue/<id>.state`: JSON `{attempts, next_try_ms, last_error}`.
//! - `dead/<id>.msg` and `dead/<id>.state`: messages given up, with the reason.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{info, warn};

const MAGIC: &str = "Bastide-Spool: 1";
/// Most renames grouped under one directory fsync.
const MAX_BATCH: usize = 256;

/// Milliseconds since the Unix epoch: the queue's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The envelope of a spooled message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    /// Arrival, in ms since the epoch.
    pub arrived_ms: i64,
    pub client: String,
    pub helo: String,
    /// Envelope sender; empty for the null sender (bounces).
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: usize,
}

/// Delivery state, rewritten after each attempt.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveryState {
    pub attempts: u32,
    pub next_try_ms: i64,
    #[serde(default)]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    meta: Meta,
    state: DeliveryState,
    in_flight: bool,
}

/// One line of `bastide mail queue`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueItem {
    pub id: String,
    pub age_secs: i64,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: usize,
    pub attempts: u32,
    pub next_attempt_in_secs: i64,
    pub last_error: Option<String>,
    pub delivering: bool,
}

/// A fresh message id: arrival time in microseconds and random bits, in hex, so that
/// ids sort by arrival and are safe as file names.
pub fn new_id() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    format!("{micros:014x}{:08x}", rand::random::<u32>())
}

/// Ids are checked before they name a file (they come from the admin CLI too).
pub fn valid_id(id: &str) -> bool {
    (8..=40).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn clean_field(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// The bytes of a `.msg` file.
pub fn encode(meta: &Meta, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 256);
    let mut h = format!(
        "{MAGIC}\nId: {}\nArrived: {}\nClient: {}\nHelo: {}\nSender: {}\n",
        meta.id,
        meta.arrived_ms,
        clean_field(&meta.client),
        clean_field(&meta.helo),
        clean_field(&meta.sender)
    );
    for r in &meta.recipients {
        h.push_str(&format!("Recipient: {}\n", clean_field(r)));
    }
    h.push_str(&format!("Size: {}\n\n", content.len()));
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(content);
    out
}

/// Parses a `.msg` file; the content is checked against its recorded size, so that a
/// truncated file is never delivered.
pub fn decode(data: &[u8]) -> Result<(Meta, &[u8])> {
    let end = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .context("no end of spool header")?;
    let head = std::str::from_utf8(&data[..end]).context("spool header is not UTF-8")?;
    let content = &data[end + 2..];
    let mut lines = head.lines();
    if lines.next() != Some(MAGIC) {
        bail!("not a bastide spool file");
    }
    let mut meta = Meta {
        id: String::new(),
        arrived_ms: 0,
        client: String::new(),
        helo: String::new(),
        sender: String::new(),
        recipients: Vec::new(),
        size: usize::MAX,
    };
    for l in lines {
        let (k, v) = l.split_once(": ").unwrap_or((l.trim_end_matches(':'), ""));
        match k {
            "Id" => meta.id = v.to_string(),
            "Arrived" => meta.arrived_ms = v.parse().context("bad Arrived")?,
            "Client" => meta.client = v.to_string(),
            "Helo" => meta.helo = v.to_string(),
            "Sender" => meta.sender = v.to_string(),
            "Recipient" => meta.recipients.push(v.to_string()),
            "Size" => meta.size = v.parse().context("bad Size")?,
            _ => {}
        }
    }
    if meta.size != content.len() {
        bail!(
            "content is {} bytes, the header says {}",
            content.len(),
            meta.size
        );
    }
    if !valid_id(&meta.id) || meta.recipients.is_empty() {
        bail!("incomplete spool header");
    }
    Ok((meta, content))
}

struct Commit {
    tmp: PathBuf,
    dst: PathBuf,
    done: oneshot::Sender<Result<()>>,
}

/// The queue: the spool on disk and its index in memory.
pub struct Queue {
    root: PathBuf,
    tmp: PathBuf,
    queue: PathBuf,
    dead: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
    commits: mpsc::UnboundedSender<Commit>,
    /// Wakes the queue runner: new mail, flush, retry.
    pub wake: Notify,
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let written = f
        .write_all(data)
        .with_context(|| format!("writing {}", path.display()))
        .and_then(|()| {
            f.sync_all()
                .with_context(|| format!("fsync {}", path.display()))
        });
    if written.is_err() {
        // A partial file on a full disk would keep the space taken until a restart.
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Free space a message must leave on the spool's filesystem to be accepted, for delivery
/// state files and other sessions' messages (Postfix's `queue_minfree`).
pub const MIN_FREE: u64 = 1 << 20;

/// Whether an error is the filesystem being full (or over quota).
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == libc::ENOSPC || code == libc::EDQUOT)
    })
}

/// The committer: renames finished files into `queue/` in batches, one directory fsync
/// per batch, then answers every waiting session.
fn committer(dir: PathBuf, mut rx: mpsc::UnboundedReceiver<Commit>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<()>> = batch
            .iter()
            .map(|c| {
                std::fs::rename(&c.tmp, &c.dst)
                    .with_context(|| format!("renaming {} to {}", c.tmp.display(), c.dst.display()))
            })
            .collect();
        if let Err(e) = crate::fsutil::sync_dir(&dir) {
            let msg = format!("{e:#}");
            for r in results.iter_mut() {
                if r.is_ok() {
                    *r = Err(anyhow::anyhow!("{msg}"));
                }
            }
        }
        for (c, r) in batch.into_iter().zip(results) {
            if r.is_err() {
                // Never leave a file that was not acknowledged where the runner would
                // deliver it.
                let _ = std::fs::remove_file(&c.dst);
                let _ = std::fs::remove_file(&c.tmp);
            }
            let _ = c.done.send(r);
        }
    }
}

impl Queue {
    /// Opens (creating) the spool, removes half-written files and loads the queue.
    pub fn open(root: &Path) -> Result<Self> {
        crate::fsutil::ensure_dir(root, 0o700)?;
        let (tmp, queue, dead) = (root.join("tmp"), root.join("queue"), root.join("dead"));
        for d in [&tmp, &queue, &dead] {
            crate::fsutil::ensure_dir(d, 0o700)?;
        }
        crate::fsutil::sync_dir(root)?;
        // Anything in tmp/ was never acknowledged.
        for e in std::fs::read_dir(&tmp).with_context(|| format!("reading {}", tmp.display()))? {
            let e = e?;
            let _ = std::fs::remove_file(e.path());
        }
        let mut entries = BTreeMap::new();
        for e in
            std::fs::read_dir(&queue).with_context(|| format!("reading {}", queue.display()))?
        {
            let path = e?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(id) = name.strip_suffix(".state") {
                if !queue.join(format!("{id}.msg")).exists() {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let Some(id) = name.strip_suffix(".msg") else {
                continue;
            };
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable spool file left in place");
                    continue;
                }
            };
            let meta = match decode(&data) {
                Ok((m, _)) if m.id == id => m,
                Ok(_) | Err(_) => {
                    warn!(file = %path.display(), "corrupt spool file moved to dead/");
                    let _ = std::fs::rename(&path, dead.join(name));
                    continue;
                }
            };
            let state = std::fs::read(queue.join(format!("{id}.state")))
                .ok()
                .and_then(|s| serde_json::from_slice::<DeliveryState>(&s).ok())
                .unwrap_or_default();
            entries.insert(
                id.to_string(),
                Entry {
                    meta,
                    state,
                    in_flight: false,
                },
            );
        }
        if !entries.is_empty() {
            info!(messages = entries.len(), spool = %root.display(), "mail queue loaded");
        }
        let (commits, rx) = mpsc::unbounded_channel();
        let qdir = queue.clone();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer(qdir, rx))
            .context("starting the spool committer")?;
        Ok(Self {
            root: root.to_path_buf(),
            tmp,
            queue,
            dead,
            entries: Mutex::new(entries),
            commits,
            wake: Notify::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the spool's filesystem has room for `size` more bytes plus [`MIN_FREE`]
    /// (true when it cannot be told: the write itself then decides).
    pub fn has_room(&self, size: u64) -> bool {
        match nix::sys::statvfs::statvfs(&self.root) {
            Ok(s) => {
                let free = s.blocks_available().saturating_mul(s.fragment_size());
                free >= size.saturating_add(MIN_FREE)
            }
            Err(_) => true,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a message durably and queues it. Returns once it is on disk for good: only
    /// then may the client be told 250.
    pub async fn submit(&self, meta: Meta, content: &[u8]) -> Result<()> {
        let data = encode(&meta, content);
        let tmp = self.tmp.join(format!("{}.msg", meta.id));
        let dst = self.queue.join(format!("{}.msg", meta.id));
        {
            let tmp = tmp.clone();
            tokio::task::spawn_blocking(move || write_synced(&tmp, &data))
                .await
                .context("spool writer")??;
        }
        let (done, rx) = oneshot::channel();
        if self
            .commits
            .send(Commit {
                tmp: tmp.clone(),
                dst,
                done,
            })
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            bail!("the spool committer stopped");
        }
        rx.await.context("the spool committer stopped")??;
        self.lock().insert(
            meta.id.clone(),
            Entry {
                meta,
                state: DeliveryState::default(),
                in_flight: false,
            },
        );
        self.wake.notify_one();
        Ok(())
    }

    /// Messages due now (marked in flight), at most `max`.
    pub fn take_due(&self, now: i64, max: usize) -> Vec<Meta> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for e in g.values_mut() {
            if out.len() >= max {
                break;
            }
            if !e.in_flight && e.state.next_try_ms <= now {
                e.in_flight = true;
                out.push(e.meta.clone());
            }
        }
        out
    }

    /// When the runner must next look, if anything waits.
    pub fn next_due(&self) -> Option<i64> {
        self.lock()
            .values()
            .filter(|e| !e.in_flight)
            .map(|e| e.state.next_try_ms)
            .min()
    }

    pub fn state(&self, id: &str) -> Option<DeliveryState> {
        self.lock().get(id).map(|e| e.state.clone())
    }

    /// Reads a queued message's file.
    pub async fn read(&self, id: &str) -> Result<Vec<u8>> {
        let p = self.queue.join(format!("{id}.msg"));
        tokio::fs::read(&p)
            .await
            .with_context(|| format!("reading {}", p.display()))
    }

    /// Delivered: removed from disk and from the queue. The unlink is not fsynced (as in
    /// Postfix): it survives a crash of the process; after a power failure the message may
    /// be sent again, which at-least-once delivery allows, but it is never lost.
    pub async fn delivered(&self, id: &str) -> Result<()> {
        let (m, s) = (
            self.queue.join(format!("{id}.msg")),
            self.queue.join(format!("{id}.state")),
        );
        self.lock().remove(id);
        tokio::task::spawn_blocking(move || -> Result<()> {
            std::fs::remove_file(&m).with_context(|| format!("removing {}", m.display()))?;
            let _ = std::fs::remove_file(&s);
            Ok(())
        })
        .await
        .context("spool task")?
    }

    /// A failed attempt: the new state is written, then the message waits again.
    pub async fn deferred(&self, id: &str, state: DeliveryState) -> Result<()> {
        let path = self.queue.join(format!("{id}.state"));
        let data = serde_json::to_vec(&state)?;
        let r =
            tokio::task::spawn_blocking(move || crate::fsutil::write_atomic(&path, &data, 0o600))
                .await
                .context("spool task")?;
        let mut g = self.lock();
        if let Some(e) = g.get_mut(id) {
            e.state = state;
            e.in_flight = false;
        }
        r
    }

    /// Given up: moved to `dead/` with its state and reason, out of the queue.
    pub async fn dead_letter(&self, id: &str, state: DeliveryState) -> Result<()> {
        let (qm, qs) = (
            self.queue.join(format!("{id}.msg")),
            self.queue.join(format!("{id}.state")),
        );
        let (dm, ds) = (
            self.dead.join(format!("{id}.msg")),
            self.dead.join(format!("{id}.state")),
        );
        let (qdir, ddir) = (self.queue.clone(), self.dead.clone());
        let data = serde_json::to_vec(&state)?;
        self.lock().remove(id);
        tokio::task::spawn_blocking(move || -> Result<()> {
            crate::fsutil::write_atomic(&ds, &data, 0o600)?;
            std::fs::rename(&qm, &dm)
                .with_context(|| format!("moving {} to {}", qm.display(), dm.display()))?;
            crate::fsutil::sync_dir(&ddir)?;
            let _ = std::fs::remove_file(&qs);
            crate::fsutil::sync_dir(&qdir)
        })
        .await
        .context("spool task")?
    }

    /// Releases a message taken by [`Queue::take_due`] without changing it (shutdown).
    pub fn release(&self, id: &str) {
        if let Some(e) = self.lock().get_mut(id) {
            e.in_flight = false;
        }
    }

    /// Makes every message (or one) due now.
    pub fn flush(&self, id: Option<&str>) -> Result<usize> {
        let now = now_ms();
        let mut n = 0;
        {
            let mut g = self.lock();
            match id {
                Some(id) => {
                    let e = g
                        .get_mut(id)
                        .with_context(|| format!("no message {id} in the queue"))?;
                    e.state.next_try_ms = now;
                    n = 1;
                }
                None => {
                    for e in g.values_mut() {
                        e.state.next_try_ms = e.state.next_try_ms.min(now);
                        n += 1;
                    }
                }
            }
        }
        self.wake.notify_one();
        Ok(n)
    }

    /// Deletes a queued message for good (admin).
    pub fn delete(&self, id: &str) -> Result<()> {
        if !valid_id(id) {
            bail!("{id:?} is not a message id");
        }
        {
            let mut g = self.lock();
            match g.get(id) {
                None => bail!("no message {id} in the queue"),
                Some(e) if e.in_flight => {
                    bail!("message {id} is being delivered right now; try again")
                }
                Some(_) => {
                    g.remove(id);
                }
            }
        }
        let m = self.queue.join(format!("{id}.msg"));
        std::fs::remove_file(&m).with_context(|| format!("removing {}", m.display()))?;
        let _ = std::fs::remove_file(self.queue.join(format!("{id}.state")));
        crate::fsutil::sync_dir(&self.queue)
    }

    /// The queue for `bastide mail queue`, oldest first.
    pub fn list(&self) -> Vec<QueueItem> {
        let now = now_ms();
        self.lock()
            .values()
            .map(|e| QueueItem {
                id: e.meta.id.clone(),
                age_secs: (now - e.meta.arrived_ms).max(0) / 1000,
                sender: e.meta.sender.clone(),
                recipients: e.meta.recipients.clone(),
                size: e.meta.size,
                attempts: e.state.attempts,
                next_attempt_in_secs: ((e.state.next_try_ms - now).max(0) + 999) / 1000,
                last_error: e.state.last_error.clone(),
                delivering: e.in_flight,
            })
            .collect()
    }

    /// Number of dead letters.
    pub fn dead_count(&self) -> usize {
        std::fs::read_dir(&self.dead)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".msg"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// (queue length, age of the oldest message in seconds).
    pub fn gauges(&self) -> (u64, u64) {
        let g = self.lock();
        let oldest = g.values().map(|e| e.meta.arrived_ms).min();
        let age = oldest
            .map(|t| ((now_ms() - t).max(0) / 1000) as u64)
            .unwrap_or(0);
        (g.len() as u64, age)
    }
}

/// Shared handle type used by the server and the runner.
pub type SharedQueue = Arc<Queue>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_recognised_through_context() {
        let e = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context("writing /spool/tmp/x.msg");
        assert!(is_disk_full(&e));
        let e = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EIO)).context("x");
        assert!(!is_disk_full(&e));
    }

    #[test]
    fn a_failed_create_never_removes_an_existing_file() {
        let d = std::env::temp_dir().join(format!("bastide-spool-w-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("exists.msg");
        std::fs::write(&p, b"x").unwrap();
        // create_new fails on an existing file: that file is not ours and must stay.
        assert!(write_synced(&p, b"y").is_err());
        assert!(p.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn encode_decode_round_trip_and_truncation() {
        let meta = Meta {
            id: new_id(),
            arrived_ms: 5,
            client: "127.0.0.1".into(),
            helo: "web01".into(),
            sender: "".into(),
            recipients: vec!["a@b.c".into(), "d@e.f".into()],
            size: 0,
        };
        let content = b"Subject: x\r\n\r\nhello\r\n\n\nmore\r\n";
        let data = encode(&meta, content);
        let (m, c) = decode(&data).unwrap();
        assert_eq!(c, content);
        assert_eq!(m.recipients, meta.recipients);
        assert_eq!(m.sender, "");
        assert!(decode(&data[..data.len() - 1]).is_err());
    }

    #[tokio::test]
    async fn submit_defer_dead_and_reload() {
        let dir = std::env::temp_dir().join(format!("bastide-spool-{}", rand::random::<u64>()));
        let q = Queue::open(&dir).unwrap();
        let meta = Meta {
            id: new_id(),
            arrived_ms: now_ms(),
            client: "c".into(),
            helo: "h".into(),
            sender: "s@x.y".into(),
            recipients: vec!["r@x.y".into()],
            size: 0,
        };
        q.submit(meta.clone(), b"body\r\n").await.unwrap();
        std::fs::write(dir.join("tmp/junk.msg"), b"half").unwrap();
        let due = q.take_due(now_ms(), 10);
        assert_eq!(due.len(), 1);
        q.deferred(
            &meta.id,
            DeliveryState {
                attempts: 1,
                next_try_ms: now_ms() + 60_000,
                last_error: Some("421 later".into()),
            },
        )
        .await
        .unwrap();
        assert!(q.take_due(now_ms(), 10).is_empty());
        drop(q);
        let q = Queue::open(&dir).unwrap();
        assert!(!dir.join("tmp/junk.msg").exists());
        assert_eq!(q.list()[0].attempts, 1);
        q.flush(Some(&meta.id)).unwrap();
        assert_eq!(q.take_due(now_ms(), 10).len(), 1);
        q.dead_letter(&meta.id, DeliveryState::default())
            .await
            .unwrap();
        assert!(q.list().is_empty());
        assert_eq!(q.dead_count(), 1);
    }
}
