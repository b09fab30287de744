//! Retention of the log store: day files older than `retention_days` are deleted, the
//! oldest days go first when the store exceeds `max_total_bytes` (today's files never), and
//! days older than `compress_after_days` are gzip-compressed (`DAY.log.gz`, readable with
//! zcat). Compression is crash-safe: the `.gz` is written under a temporary name, fsynced,
//! renamed, the directory fsynced, and only then the plain file removed; a pass that finds
//! both keeps the `.gz`. Past days are never written again (files are named by reception
//! day), and a file touched in the last ten minutes is left alone anyway.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::format::day_of;
use super::metrics::counters;
use super::query::day_files;
use super::LogsConfig;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub bytes: u64,
    pub deleted: u64,
    pub compressed: u64,
}

const QUIET: Duration = Duration::from_secs(600);

fn gzip(path: &Path) -> Result<()> {
    let gz = path.with_extension("log.gz");
    let tmp = path.with_extension("log.gz.tmp");
    {
        let mut input =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let out =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        std::io::copy(&mut input, &mut enc).context("compressing")?;
        let mut out = enc.finish().context("compressing")?;
        out.flush()?;
        out.sync_all().context("fsync")?;
    }
    std::fs::rename(&tmp, &gz).context("renaming")?;
    if let Some(d) = path.parent() {
        crate::fsutil::sync_dir(d)?;
    }
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(())
}

/// One retention pass at time `now_ms`.
pub fn pass(dir: &Path, cfg: &LogsConfig, now_ms: i64) -> Result<Pass> {
    let today = day_of(now_ms);
    let c = counters();
    let mut out = Pass::default();
    let mut files = day_files(dir)?;
    // Leftovers of an interrupted compression, and plain files whose .gz is complete.
    for host in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if host.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for f in std::fs::read_dir(host.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = f.path();
            let name = f.file_name().to_string_lossy().to_string();
            let leftover = name.ends_with(".log.gz.tmp")
                || (name.ends_with(".log") && p.with_extension("log.gz").exists());
            if leftover {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    let mut keep = Vec::new();
    for (day, host, path) in files.drain(..) {
        if cfg.retention_days > 0 && day <= today - i64::from(cfg.retention_days) {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    out.deleted += 1;
                    info!(file = %path.display(), "log retention: day file deleted (age)");
                }
                Err(e) => warn!(file = %path.display(), error = %e, "log retention: cannot delete"),
            }
            continue;
        }
        let mut path = path;
        let quiet = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age >= QUIET);
        if cfg.compress_after_days > 0
            && day < today
            && day <= today - i64::from(cfg.compress_after_days)
            && path.extension().is_some_and(|e| e == "log")
            && quiet
        {
            match gzip(&path) {
                Ok(()) => {
                    out.compressed += 1;
                    path = path.with_extension("log.gz");
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %format!("{e:#}"), "log retention: compression failed")
                }
            }
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        keep.push((day, host, path, size));
    }
    let mut total: u64 = keep.iter().map(|k| k.3).sum();
    if cfg.max_total_bytes > 0 && total > cfg.max_total_bytes {
        // `keep` is sorted by day: oldest first.
        for (day, _, path, size) in &keep {
            if total <= cfg.max_total_bytes || *day >= today {
                break;
            }
            if std::fs::remove_file(path).is_ok() {
                total -= size;
                out.deleted += 1;
                info!(file = %path.display(), "log retention: day file deleted (total size)");
            }
        }
        if total > cfg.max_total_bytes {
            warn!(
                bytes = total,
                limit = cfg.max_total_bytes,
                "log retention: today's files alone exceed logs.max_total_bytes"
            );
        }
    }
    out.bytes = total;
    c.store_bytes.store(total, Relaxed);
    c.retention_deleted.fetch_add(out.deleted, Relaxed);
    c.compressed.fetch_add(out.compressed, Relaxed);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::format::day_name;

    fn cfg(days: u32, max: u64, compress: u32) -> LogsConfig {
        toml::from_str(&format!(
            "retention_days = {days}\nmax_total_bytes = {max}\ncompress_after_days = {compress}\n"
        ))
        .unwrap()
    }

    #[test]
    fn age_size_and_compression() {
        let dir = crate::logs::store::tests::tempfile_dir();
        let today = 20_000i64;
        let now = today * 86_400_000 + 1000;
        for host in ["a", "b"] {
            std::fs::create_dir_all(dir.join(host)).unwrap();
            for d in 0..5 {
                let p = dir.join(host).join(format!("{}.log", day_name(today - d)));
                let mut line = Vec::new();
                crate::logs::format::push_line(
                    &mut line,
                    (today - d) * 86_400_000,
                    host,
                    "app",
                    1,
                    6,
                    "x".repeat(1000).as_bytes(),
                );
                std::fs::write(&p, line).unwrap();
                let old = SystemTime::now() - Duration::from_secs(3600);
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        }
        // 4 days kept: today-4 goes.
        let r = pass(&dir, &cfg(4, 0, 2), now).unwrap();
        assert_eq!(r.deleted, 2);
        assert_eq!(r.compressed, 4); // today-2 and today-3, two hosts
        assert!(dir
            .join("a")
            .join(format!("{}.log.gz", day_name(today - 2)))
            .exists());
        assert!(!dir
            .join("a")
            .join(format!("{}.log", day_name(today - 2)))
            .exists());
        assert!(dir
            .join("a")
            .join(format!("{}.log", day_name(today - 1)))
            .exists());
        // The compressed file still reads back.
        let f = crate::logs::query::Filter::new(&Default::default()).unwrap();
        let mut n = 0;
        crate::logs::query::scan(&dir, &f, &mut |_| {
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 8);
        // Size: only today's files may stay.
        let today_bytes: u64 = ["a", "b"]
            .iter()
            .map(|h| {
                std::fs::metadata(dir.join(h).join(format!("{}.log", day_name(today))))
                    .unwrap()
                    .len()
            })
            .sum();
        let r = pass(&dir, &cfg(0, today_bytes + 100, 0), now).unwrap();
        assert_eq!(r.bytes, today_bytes);
        assert!(dir
            .join("a")
            .join(format!("{}.log", day_name(today)))
            .exists());
        assert!(!dir
            .join("a")
            .join(format!("{}.log", day_name(today - 1)))
            .exists());
    }
}
