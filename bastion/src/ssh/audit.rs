//! The jump audit log: JSON lines, appended (the file is opened `O_APPEND` and never
//! truncated or rewritten by the daemon) and fsynced each: a denied attempt is one line
//! (`"event":"denied"`); an allowed jump writes a `"start"` line when it opens and an
//! `"end"` line (with the end time and bytes each way) when it closes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde::Serialize;
use tracing::error;

/// One jump attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// "allowed" or "denied".
    pub decision: &'static str,
    pub reason: String,
    /// Who: admin, key fingerprint and certificate facts (same JSON keys, flattened).
    #[serde(flatten)]
    pub who: super::auth::Identity,
    pub source: String,
    pub target: String,
    pub port: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// RFC 3339, UTC, milliseconds.
    pub start: String,
    /// Empty (and left out) in a start line.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub end: String,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    /// "denied", "start" or "end".
    pub event: &'static str,
}

/// The open audit file, shared by every session.
#[derive(Clone)]
pub struct Audit {
    file: Arc<Mutex<File>>,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Audit {
    /// Opens (creating with mode 0600) the log for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening audit log {}", path.display()))?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Appends one record and fsyncs it. A failure is logged loudly: losing the audit trail
    /// must be visible, but must not cut admins off.
    pub async fn write(&self, rec: &Record) {
        let mut line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "audit: cannot encode record");
                return;
            }
        };
        line.push(b'\n');
        let file = self.file.clone();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = file
                .lock()
                .map_err(|_| std::io::Error::other("audit lock poisoned"))?;
            f.write_all(&line)?;
            f.sync_data()
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "audit: write failed"),
            Err(e) => error!(error = %e, "audit: write task failed"),
        }
    }
}
