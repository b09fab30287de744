//! Read positions of every source (file: inode + offset + fingerprint of the first bytes;
//! journal: cursor), saved atomically in `checkpoints.json` next to the buffer, and only
//! after the lines up to that position are durably in the buffer.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::write_atomic;

/// How many leading bytes identify a file's content (together with its inode).
pub const FINGERPRINT_BYTES: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Bytes covered (less than FINGERPRINT_BYTES while the file is that short).
    pub len: u32,
    pub sha256_hex: String,
}

impl Fingerprint {
    /// The fingerprint of `file` as it is now.
    pub fn of(file: &File) -> std::io::Result<Self> {
        let mut buf = [0u8; FINGERPRINT_BYTES];
        let mut n = 0;
        while n < buf.len() {
            let r = file.read_at(&mut buf[n..], n as u64)?;
            if r == 0 {
                break;
            }
            n += r;
        }
        Ok(Self::of_bytes(&buf[..n]))
    }

    pub fn of_bytes(b: &[u8]) -> Self {
        Self {
            len: b.len() as u32,
            sha256_hex: hex::encode(&Sha256::digest(b)[..8]),
        }
    }

    /// Whether `file` still starts with the bytes this fingerprint was taken of.
    pub fn matches(&self, file: &File) -> std::io::Result<bool> {
        if self.len == 0 {
            return Ok(true);
        }
        let mut buf = vec![0u8; self.len as usize];
        let mut n = 0;
        while n < buf.len() {
            let r = file.read_at(&mut buf[n..], n as u64)?;
            if r == 0 {
                return Ok(false);
            }
            n += r;
        }
        Ok(Self::of_bytes(&buf) == *self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePos {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    pub fingerprint: Fingerprint,
}

/// One change to the checkpoints, carried next to the events it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    File {
        source: String,
        pos: FilePos,
    },
    /// The file was fully read and closed (rotated away or deleted).
    FileDone {
        source: String,
        dev: u64,
        ino: u64,
    },
    Journal {
        source: String,
        cursor: String,
    },
    /// The source finished its first scan: `start_at` no longer applies to it.
    Seen {
        source: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoints {
    /// The last buffered batch whose updates are included.
    #[serde(default)]
    pub batch_seq: u64,
    /// "<source id>|<dev>:<ino>" -> position.
    #[serde(default)]
    pub files: BTreeMap<String, FilePos>,
    #[serde(default)]
    pub journal: BTreeMap<String, String>,
    #[serde(default)]
    pub seen: BTreeSet<String>,
}

pub fn file_key(source: &str, dev: u64, ino: u64) -> String {
    format!("{source}|{dev}:{ino}")
}

impl Checkpoints {
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("{}: corrupt", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &serde_json::to_vec(self)?, 0o600)
    }

    pub fn apply(&mut self, u: Update) {
        match u {
            Update::File { source, pos } => {
                self.files.insert(file_key(&source, pos.dev, pos.ino), pos);
            }
            Update::FileDone { source, dev, ino } => {
                self.files.remove(&file_key(&source, dev, ino));
            }
            Update::Journal { source, cursor } => {
                self.journal.insert(source, cursor);
            }
            Update::Seen { source } => {
                self.seen.insert(source);
            }
        }
    }

    /// File positions of one source.
    pub fn files_of(&self, source: &str) -> Vec<FilePos> {
        let prefix = format!("{source}|");
        self.files
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }
}
