//! `[logs.forward]`: every stored event also goes, as RFC 5424 with octet-counting framing
//! (RFC 6587 / RFC 5425), to a central collector (rsyslog, syslog-ng, Vector, Graylog) over
//! TCP or TLS.
//!
//! The store's writer appends each committed group to an on-disk queue of segment files
//! (`<queue_dir>/NNNNNNNNNNNNNNNNNNNN.seg`, fsynced with the group); a sender task reads them
//! from a persisted cursor (`cursor`) and writes to the collector, reconnecting with
//! exponential backoff. The queue is bounded (`max_queue_bytes`): when the collector stays
//! away too long the oldest segments are dropped and counted, the store itself is never
//! held up. Plain syslog has no acknowledgement, so after a broken connection the sender
//! rewinds to the cursor it last persisted (at most a second old): a collector that dies
//! gets some lines twice rather than losing what sat in the socket buffers.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::format::Chunk;
use super::format::{parse_line, pri_of};
use super::metrics::counters;

/// `[logs.forward]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Collector as `host:port`.
    pub target: String,
    /// `tcp` or `tls` (RFC 5425).
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// PEM file of the CA(s) that signed the collector's certificate (required for tls).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name expected in the collector's certificate (default: the host of `target`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Queue directory (default `<logs.dir>/.forward`).
    #[serde(default)]
    pub queue_dir: Option<PathBuf>,
    /// Most bytes queued on disk; the oldest are dropped beyond.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: u64,
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Tls,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}
fn default_max_queue_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}

impl ForwardConfig {
    pub fn queue_dir(&self, store: &Path) -> PathBuf {
        self.queue_dir
            .clone()
            .unwrap_or_else(|| store.join(".forward"))
    }

    fn host(&self) -> &str {
        self.target
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(&self.target)
    }

    pub fn validate(&self, _store: &Path) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut bad = |k: &str, r: String| p.push((format!("logs.forward.{k}"), r));
        match self.target.rsplit_once(':') {
            Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => bad("target", format!("{:?} is not host:port", self.target)),
        }
        if self.protocol == Protocol::Tls {
            match &self.ca_file {
                None => bad("ca_file", "required with protocol = \"tls\"".into()),
                Some(f) if !f.is_file() => bad("ca_file", format!("{} is not a file", f.display())),
                Some(_) => {}
            }
        }
        if self.max_queue_bytes < 1024 * 1024 {
            bad("max_queue_bytes", "must be at least 1048576".into());
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            bad(
                "retry_max",
                "retry_initial must be positive and retry_max at least retry_initial".into(),
            );
        }
        p
    }
}

struct Inner {
    dir: PathBuf,
    /// seq -> (bytes, frames)
    segments: BTreeMap<u64, (u64, u64)>,
    current: Option<(u64, File)>,
    total: u64,
    max: u64,
    seg_max: u64,
}

/// The on-disk queue; the writer pushes, the sender reads.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.seg"))
}

/// Appends RFC 5424 frames (octet-counted) of stored lines to `out`; the number of frames.
pub fn frames(chunk: &[u8], out: &mut Vec<u8>) -> u64 {
    let mut n = 0;
    for line in chunk.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let text = String::from_utf8_lossy(line);
        let Some(p) = parse_line(&text) else {
            continue;
        };
        let (app, procid) = match p.app.split_once('[') {
            Some((a, rest)) => (a, rest.trim_end_matches(']')),
            None => (p.app, "-"),
        };
        let app = if app.is_empty() { "-" } else { app };
        let procid = if procid.is_empty() { "-" } else { procid };
        let msg = format!(
            "<{}>1 {} {} {} {} - - {}",
            pri_of(p.facility, p.severity),
            p.ts,
            p.host,
            app,
            procid,
            p.message
        );
        out.extend_from_slice(format!("{} ", msg.len()).as_bytes());
        out.extend_from_slice(msg.as_bytes());
        n += 1;
    }
    n
}

impl Queue {
    pub fn open(cfg: &ForwardConfig, store: &Path) -> Result<Self> {
        let dir = cfg.queue_dir(store);
        crate::fsutil::ensure_dir(&dir, 0o700)?;
        let mut segments = BTreeMap::new();
        let mut total = 0;
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                total += len;
                segments.insert(n, (len, 0));
            }
        }
        counters().forward_queue_bytes.store(total, Relaxed);
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dir,
                segments,
                current: None,
                total,
                max: cfg.max_queue_bytes,
                seg_max: (cfg.max_queue_bytes / 16).clamp(64 * 1024, 64 * 1024 * 1024),
            })),
            notify: Arc::new(Notify::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Called by the store's writer after each commit.
    pub fn push(&mut self, chunks: &[Chunk]) {
        let mut buf = Vec::new();
        let mut n = 0;
        for c in chunks {
            n += frames(&c.data, &mut buf);
        }
        if buf.is_empty() {
            return;
        }
        if let Err(e) = self.append(&buf, n) {
            warn!(error = %format!("{e:#}"), "logs.forward: cannot queue events: dropped from forwarding (they are in the store)");
            counters().forward_dropped.fetch_add(n, Relaxed);
        }
        self.notify.notify_one();
    }

    fn append(&self, buf: &[u8], n: u64) -> Result<()> {
        let mut q = self.lock();
        let rotate = match &q.current {
            Some((seq, _)) => q.segments.get(seq).is_none_or(|s| s.0 >= q.seg_max),
            None => true,
        };
        if rotate {
            let next = q.segments.keys().next_back().map_or(1, |k| k + 1);
            let path = seg_path(&q.dir, next);
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            crate::fsutil::sync_dir(&q.dir)?;
            q.segments.insert(next, (0, 0));
            q.current = Some((next, f));
        }
        let Some((seq, f)) = q.current.as_mut() else {
            anyhow::bail!("no current segment");
        };
        let seq = *seq;
        f.write_all(buf).context("writing the forward queue")?;
        f.sync_data().context("fsync the forward queue")?;
        if let Some(s) = q.segments.get_mut(&seq) {
            s.0 += buf.len() as u64;
            s.1 += n;
        }
        q.total += buf.len() as u64;
        // Bounded: drop the oldest segments (never the one being written).
        while q.total > q.max && q.segments.len() > 1 {
            let Some((&old, &(len, frames))) = q.segments.iter().next() else {
                break;
            };
            let _ = std::fs::remove_file(seg_path(&q.dir, old));
            q.segments.remove(&old);
            q.total = q.total.saturating_sub(len);
            counters().forward_dropped.fetch_add(frames, Relaxed);
            warn!(
                segment = old,
                bytes = len,
                "logs.forward: queue full: oldest segment dropped"
            );
        }
        counters().forward_queue_bytes.store(q.total, Relaxed);
        Ok(())
    }

    /// Where to read next from `(seg, off)`: the segment to read and how far it is
    /// written, moving on from finished segments (deleting them).
    fn next(&self, cursor: &mut (u64, u64)) -> Option<(PathBuf, u64)> {
        let mut q = self.lock();
        loop {
            let first = *q.segments.keys().next()?;
            if cursor.0 < first {
                *cursor = (first, 0);
            }
            let (len, _) = *q.segments.get(&cursor.0)?;
            if cursor.1 < len {
                return Some((seg_path(&q.dir, cursor.0), len));
            }
            let is_current = q.current.as_ref().is_some_and(|(s, _)| *s == cursor.0);
            let later = q.segments.range(cursor.0 + 1..).next().map(|(k, _)| *k);
            match later {
                Some(n) if !is_current || q.current.is_none() => {
                    let _ = std::fs::remove_file(seg_path(&q.dir, cursor.0));
                    q.segments.remove(&cursor.0);
                    q.total = q.total.saturating_sub(len);
                    counters().forward_queue_bytes.store(q.total, Relaxed);
                    *cursor = (n, 0);
                }
                Some(n) => {
                    // The writer moved on from the current segment.
                    *cursor = (n, 0);
                }
                None => return None,
            }
        }
    }
}

fn load_cursor(dir: &Path) -> (u64, u64) {
    std::fs::read_to_string(dir.join("cursor"))
        .ok()
        .and_then(|s| {
            let (a, b) = s.trim().split_once(' ')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((0, 0))
}

fn save_cursor(dir: &Path, c: (u64, u64)) {
    if let Err(e) = crate::fsutil::write_atomic(
        &dir.join("cursor"),
        format!("{} {}\n", c.0, c.1).as_bytes(),
        0o600,
    ) {
        warn!(error = %format!("{e:#}"), "logs.forward: cannot save the queue cursor");
    }
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

async fn connect(
    cfg: &ForwardConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Box<dyn Conn>> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&cfg.target))
        .await
        .context("connect timed out")??;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Box::new(tcp)),
        Some(c) => {
            let name = cfg
                .server_name
                .clone()
                .unwrap_or_else(|| cfg.host().to_string());
            let sn = rustls::pki_types::ServerName::try_from(name)
                .context("logs.forward.server_name")?;
            let s = tokio::time::timeout(Duration::from_secs(10), c.connect(sn, tcp))
                .await
                .context("TLS handshake timed out")??;
            Ok(Box::new(s))
        }
    }
}

fn tls_connector(cfg: &ForwardConfig) -> Result<Option<tokio_rustls::TlsConnector>> {
    use rustls::pki_types::pem::PemObject;
    if cfg.protocol != Protocol::Tls {
        return Ok(None);
    }
    let Some(ca) = &cfg.ca_file else {
        anyhow::bail!("logs.forward.ca_file is required for tls");
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading {}", ca.display()))?
    {
        roots
            .add(c.with_context(|| format!("parsing {}", ca.display()))?)
            .context("adding a collector CA")?;
    }
    let c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(c))))
}

/// Sends the queue to the collector until `shutdown`.
pub async fn run(cfg: ForwardConfig, queue: Queue, shutdown: CancellationToken) {
    let dir = queue.lock().dir.clone();
    let tls = match tls_connector(&cfg) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "logs.forward: TLS setup failed: forwarding is off");
            return;
        }
    };
    let mut saved = load_cursor(&dir);
    let mut backoff = cfg.retry_initial;
    let c = counters();
    'outer: loop {
        let mut conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = connect(&cfg, tls.as_ref()) => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(target = %cfg.target, error = %format!("{e:#}"), retry_in = ?backoff, "logs.forward: cannot reach the collector");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(cfg.retry_max);
                    continue;
                }
            },
        };
        info!(target = %cfg.target, "logs.forward: connected to the collector");
        c.forward_connected.store(1, Relaxed);
        backoff = cfg.retry_initial;
        let mut cursor = saved;
        let mut last_save = tokio::time::Instant::now();
        let mut probe = [0u8; 512];
        loop {
            if last_save.elapsed() >= Duration::from_secs(1) && cursor != saved {
                let d = dir.clone();
                let cur = cursor;
                let _ = tokio::task::spawn_blocking(move || save_cursor(&d, cur)).await;
                saved = cursor;
                last_save = tokio::time::Instant::now();
            }
            let Some((path, end)) = queue.next(&mut cursor) else {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = queue.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    // The collector closing on us (or sending anything) ends the connection.
                    r = conn.read(&mut probe) => {
                        if matches!(r, Ok(0) | Err(_)) {
                            warn!("logs.forward: the collector closed the connection");
                            break;
                        }
                    }
                }
                continue;
            };
            let off = cursor.1;
            let want = (end - off).min(256 * 1024) as usize;
            let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let mut f = File::open(&path)?;
                f.seek(SeekFrom::Start(off))?;
                let mut buf = vec![0u8; want];
                f.read_exact(&mut buf)?;
                Ok(buf)
            })
            .await;
            let buf = match read {
                Ok(Ok(b)) => b,
                _ => {
                    // The segment was dropped under us (queue full): go on with the next.
                    cursor = (cursor.0 + 1, 0);
                    continue;
                }
            };
            // Whole frames only.
            let (mut pos, mut n) = (0usize, 0u64);
            while let Some(sp) = buf[pos..].iter().position(|&b| b == b' ') {
                let Some(len) = std::str::from_utf8(&buf[pos..pos + sp])
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                else {
                    break;
                };
                if pos + sp + 1 + len > buf.len() {
                    break;
                }
                pos += sp + 1 + len;
                n += 1;
            }
            if pos == 0 {
                // A frame longer than one read, or garbage: skip the rest of the segment.
                warn!(
                    segment = cursor.0,
                    "logs.forward: unreadable queue data skipped"
                );
                cursor.1 = end;
                continue;
            }
            let w =
                tokio::time::timeout(Duration::from_secs(30), conn.write_all(&buf[..pos])).await;
            match w {
                Ok(Ok(())) => {
                    cursor.1 += pos as u64;
                    c.forward_sent.fetch_add(n, Relaxed);
                }
                _ => {
                    warn!("logs.forward: sending to the collector failed: reconnecting");
                    break;
                }
            }
        }
        c.forward_connected.store(0, Relaxed);
        // `saved` is where the next connection starts: at most a second of resends.
    }
    c.forward_connected.store(0, Relaxed);
}
