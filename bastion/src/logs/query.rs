//! `bastide logs`: reads the store (plain and gzip-compressed day files) with host glob, time
//! range and regular expression filters, and follows the live stream of committed groups.
//! Within a day, the hosts' files are merged by event time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use globset::{Glob, GlobMatcher};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::format::{day_of, parse_day, parse_line, parse_ts};

/// The query of `bastide logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Glob on host names ("web*").
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub since_ms: Option<i64>,
    #[serde(default)]
    pub until_ms: Option<i64>,
    /// Regular expression matched against the whole line.
    #[serde(default)]
    pub grep: Option<String>,
    /// Keep streaming new events.
    #[serde(default)]
    pub follow: bool,
}

pub struct Filter {
    host: Option<GlobMatcher>,
    since: Option<i64>,
    until: Option<i64>,
    grep: Option<Regex>,
}

impl Filter {
    pub fn new(q: &LogsQuery) -> Result<Self> {
        let host = match &q.host {
            Some(h) => Some(
                Glob::new(h)
                    .with_context(|| format!("--host {h:?}"))?
                    .compile_matcher(),
            ),
            None => None,
        };
        let grep = match &q.grep {
            Some(g) => Some(
                regex::RegexBuilder::new(g)
                    .size_limit(1 << 20)
                    .build()
                    .with_context(|| format!("--grep {g:?}"))?,
            ),
            None => None,
        };
        Ok(Self {
            host,
            since: q.since_ms,
            until: q.until_ms,
            grep,
        })
    }

    pub fn host_ok(&self, host: &str) -> bool {
        self.host.as_ref().is_none_or(|g| g.is_match(host))
    }

    /// Whether a stored line (without newline) matches; its time.
    pub fn line_ok(&self, line: &str) -> Option<i64> {
        let p = parse_line(line)?;
        let ts = parse_ts(p.ts)?;
        if self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts > u) {
            return None;
        }
        if !self.host_ok(p.host) {
            return None;
        }
        if let Some(re) = &self.grep {
            if !re.is_match(line) {
                return None;
            }
        }
        Some(ts)
    }
}

/// The day files of the store: (day, host, path), `.log.gz` preferred when both exist (a
/// compression that finished but had not removed the plain file yet).
pub fn day_files(dir: &Path) -> Result<Vec<(i64, String, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for host in rd.flatten() {
        let hname = host.file_name().to_string_lossy().to_string();
        if hname.starts_with('.') || !host.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(files) = std::fs::read_dir(host.path()) else {
            continue;
        };
        let mut days: std::collections::BTreeMap<i64, PathBuf> = Default::default();
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if let Some(d) = name.strip_suffix(".log.gz").and_then(parse_day) {
                days.insert(d, f.path());
            } else if let Some(d) = name.strip_suffix(".log").and_then(parse_day) {
                days.entry(d).or_insert_with(|| f.path());
            }
        }
        out.extend(days.into_iter().map(|(d, p)| (d, hname.clone(), p)));
    }
    out.sort();
    Ok(out)
}

fn open_lines(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let r: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(256 * 1024, r)))
}

/// Calls `emit` with every matching stored line, oldest day first; returns how many.
/// Stops early when `emit` returns false.
pub fn scan(dir: &Path, f: &Filter, emit: &mut dyn FnMut(String) -> bool) -> Result<u64> {
    let files = day_files(dir)?;
    // Files are named by reception day: events of a day are in that day's file or later
    // (a day of slack for clocks), so only `since` can skip files.
    let first_day = f.since.map(|s| day_of(s) - 1);
    let mut n = 0;
    let mut i = 0;
    while i < files.len() {
        let day = files[i].0;
        let mut j = i;
        while j < files.len() && files[j].0 == day {
            j += 1;
        }
        if first_day.is_some_and(|d| day < d) {
            i = j;
            continue;
        }
        let mut readers = Vec::new();
        for (_, host, path) in &files[i..j] {
            if f.host_ok(host) {
                match open_lines(path) {
                    Ok(r) => readers.push(r),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "logs query: skipping a file")
                    }
                }
            }
        }
        // Merge the hosts of this day by event time.
        let mut heap = BinaryHeap::new();
        let next = |r: &mut Box<dyn BufRead + Send>| -> Option<(i64, String)> {
            let mut line = String::new();
            loop {
                line.clear();
                let mut raw = Vec::new();
                if r.read_until(b'\n', &mut raw).ok()? == 0 {
                    return None;
                }
                if raw.last() == Some(&b'\n') {
                    raw.pop();
                }
                line.push_str(&String::from_utf8_lossy(&raw));
                if let Some(ts) = f.line_ok(&line) {
                    return Some((ts, line));
                }
            }
        };
        for (k, r) in readers.iter_mut().enumerate() {
            if let Some((ts, line)) = next(r) {
                heap.push(Reverse((ts, k, line)));
            }
        }
        while let Some(Reverse((_, k, line))) = heap.pop() {
            n += 1;
            if !emit(line) {
                return Ok(n);
            }
            if let Some((ts, line)) = next(&mut readers[k]) {
                heap.push(Reverse((ts, k, line)));
            }
        }
        i = j;
    }
    Ok(n)
}
