//! The jump audit log: JSON lines, appended (the file is opened `O_APPEND` and never
//! truncated or rewritten by the daemon) and fsynced each: a denied attempt is one line
//! (`"event":"denied"`); an allowed jump writes a `"start"` line when it opens and an
//! `"end"` line (with the end time and bytes each way) when it closes.
//!
//! The log fails closed: the start line is on disk before the jump channel is accepted, and
//! when it cannot be written the jump is refused ([`Audit::write_start`]) unless
//! `[ssh] audit_fail_open = true`. Denied and end lines are written after the fact and can
//! only be logged when they fail.

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
    fail_open: bool,
}

/// A record that is not on disk.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot encode the audit record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot write the audit log: {0}")]
    Write(#[from] std::io::Error),
    #[error("audit write task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Audit {
    /// Opens (creating with mode 0600) the log for appending. `fail_open`: see
    /// [`Audit::write_start`].
    pub fn open(path: &Path, fail_open: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening audit log {}", path.display()))?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
            fail_open,
        })
    }

    /// Appends one line of another kind (single sign-on: an issued certificate, a refused
    /// login, a revocation); a failure is logged loudly.
    pub async fn write_event<T: Serialize>(&self, rec: &T) {
        if let Err(e) = self.append(rec).await {
            error!(error = %e, "audit: record lost");
        }
    }

    /// Appends one record and fsyncs it.
    async fn append<T: Serialize>(&self, rec: &T) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(rec)?;
        line.push(b'\n');
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = file
                .lock()
                .map_err(|_| std::io::Error::other("audit lock poisoned"))?;
            // A short write (disk full midway) would leave half a line that the next record
            // completes into garbage: cut the file back to where this record started.
            let at = f.metadata()?.len();
            let r = f.write_all(&line).and_then(|()| f.sync_data());
            if r.is_err() {
                let _ = f.set_len(at);
            }
            r
        })
        .await??;
        Ok(())
    }

    /// Appends a record written after the fact (a denial, the end of a jump): a failure is
    /// logged loudly, there is nothing left to refuse.
    pub async fn write(&self, rec: &Record) {
        if let Err(e) = self.append(rec).await {
            error!(error = %e, admin = %rec.who.admin, target = %rec.target, event = rec.event, "audit: record lost");
        }
    }

    /// Appends the start line of a jump, before the channel is accepted. `Err` (with the
    /// reason) means the jump must be refused: the line is not on disk and the log fails
    /// closed. With `audit_fail_open` the failure is only logged and `Ok` returned.
    pub async fn write_start(&self, rec: &Record) -> Result<(), AuditError> {
        match self.append(rec).await {
            Ok(()) => Ok(()),
            Err(e) if self.fail_open => {
                error!(error = %e, admin = %rec.who.admin, target = %rec.target, "audit: start line lost; jump let through (audit_fail_open = true)");
                Ok(())
            }
            Err(e) => {
                error!(error = %e, admin = %rec.who.admin, target = %rec.target, "audit: start line cannot be written; jump refused (audit_fail_open = false)");
                Err(e)
            }
        }
    }
}
