//! `[logs]` in the agent's configuration: the buffer, batching, and the log sources (files
//! by glob, or the systemd journal). The source list can also be replaced at run time (see
//! [`crate::logs::start`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// Where the on-disk buffer and the read checkpoints live (default `<state dir>/logs`).
    #[serde(default)]
    pub buffer_dir: Option<PathBuf>,
    /// Bound of the on-disk buffer; when full, sources stop being read (backpressure).
    #[serde(default = "default_buffer_max_bytes")]
    pub buffer_max_bytes: u64,
    /// A batch is sealed at this many events...
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// ...or this many message bytes...
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// ...or this long after its first event.
    #[serde(default = "default_batch_timeout", with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// Longer lines (and multiline events) are truncated to this size and counted.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// How often files are checked for new data, rotation and new matches.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default)]
    pub sources: Vec<LogSourceConfig>,
    /// The journalctl program of journal sources.
    #[serde(default = "default_journalctl")]
    pub journalctl: PathBuf,
}

/// Where a source starts when the agent has no checkpoint for it yet (its first run).
/// Files that appear later are always read from their beginning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    #[default]
    Beginning,
    End,
}

/// One source: `path = "/var/log/*.log"` (a glob) or `journal = true`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSourceConfig {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub journal: bool,
    /// Journal only: restrict to these systemd units.
    #[serde(default)]
    pub units: Vec<String>,
    /// Program name given to the file's events (default: the file name without extension).
    #[serde(default)]
    pub app: Option<String>,
    /// A line matching this regex starts a new event; other lines continue the previous
    /// one (stack traces).
    #[serde(default)]
    pub multiline_start: Option<String>,
    /// A pending multiline event is sent after this long without a continuation line.
    #[serde(default = "default_multiline_timeout", with = "humantime_serde")]
    pub multiline_timeout: Duration,
    #[serde(default)]
    pub start_at: StartAt,
    /// Journal only: read the journal files of this directory (`journalctl --directory`)
    /// instead of the local system journal, e.g. a container's or another namespace's.
    #[serde(default)]
    pub journal_directory: Option<PathBuf>,
    /// Set for a source pushed by the bastion (never from the file): the local `[config]
    /// allow_log_sources` globs that every file it opens must match by its real path.
    #[serde(skip)]
    pub pushed_allow: Option<Vec<String>>,
}

impl LogSourceConfig {
    /// A file source for `glob` with default settings.
    pub fn file(glob: &str) -> Self {
        Self {
            path: Some(glob.to_string()),
            journal: false,
            units: Vec::new(),
            app: None,
            multiline_start: None,
            multiline_timeout: default_multiline_timeout(),
            start_at: StartAt::Beginning,
            journal_directory: None,
            pushed_allow: None,
        }
    }

    /// Stable identity of the source, used as the checkpoint key.
    pub fn id(&self) -> String {
        match &self.path {
            Some(p) => format!("file:{p}"),
            None => {
                let mut id = if self.units.is_empty() {
                    "journal".to_string()
                } else {
                    format!("journal:{}", self.units.join(","))
                };
                if let Some(d) = &self.journal_directory {
                    id.push_str(&format!("@{}", d.display()));
                }
                id
            }
        }
    }

    /// Every problem with this source, each naming its key.
    pub fn validate(&self, at: &str) -> Vec<String> {
        let mut p = Vec::new();
        match (&self.path, self.journal) {
            (Some(_), true) | (None, false) => p.push(format!(
                "{at}: set exactly one of path = \"GLOB\" or journal = true"
            )),
            (Some(path), false) => {
                if !path.starts_with('/') {
                    p.push(format!("{at}.path: {path:?} must be absolute"));
                }
                if let Err(e) = glob::Pattern::new(path) {
                    p.push(format!("{at}.path: invalid glob {path:?}: {e}"));
                }
                if !self.units.is_empty() {
                    p.push(format!("{at}.units: only for journal sources"));
                }
                if self.journal_directory.is_some() {
                    p.push(format!("{at}.journal_directory: only for journal sources"));
                }
            }
            (None, true) => {
                if self.multiline_start.is_some() {
                    p.push(format!("{at}.multiline_start: only for file sources"));
                }
            }
        }
        if let Some(re) = &self.multiline_start {
            if let Err(e) = regex::bytes::Regex::new(re) {
                p.push(format!("{at}.multiline_start: invalid regex: {e}"));
            }
        }
        if self.multiline_timeout.is_zero() {
            p.push(format!("{at}.multiline_timeout: must be positive"));
        }
        if let Some(d) = &self.journal_directory {
            if !d.is_absolute() {
                p.push(format!(
                    "{at}.journal_directory: {} must be absolute",
                    d.display()
                ));
            }
        }
        p
    }
}

pub(crate) fn default_buffer_max_bytes() -> u64 {
    256 << 20
}
fn default_batch_max_events() -> usize {
    10_000
}
fn default_batch_max_bytes() -> usize {
    1 << 20
}
fn default_batch_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_max_line_bytes() -> usize {
    64 << 10
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_journalctl() -> PathBuf {
    PathBuf::from("journalctl")
}
fn default_multiline_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Well under the bastion's gRPC message limit (16 MiB), and what one batch costs in memory.
const MAX_BATCH_BYTES: usize = 3 << 20;

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            buffer_dir: None,
            buffer_max_bytes: default_buffer_max_bytes(),
            batch_max_events: default_batch_max_events(),
            batch_max_bytes: default_batch_max_bytes(),
            batch_timeout: default_batch_timeout(),
            max_line_bytes: default_max_line_bytes(),
            poll_interval: default_poll_interval(),
            sources: Vec::new(),
            journalctl: default_journalctl(),
        }
    }
}

impl LogsConfig {
    /// Every problem at once, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.batch_max_events == 0 || self.batch_max_events > 100_000 {
            p.push("logs.batch_max_events: must be 1..=100000".to_string());
        }
        if self.batch_max_bytes < 1024 || self.batch_max_bytes > MAX_BATCH_BYTES {
            p.push(format!(
                "logs.batch_max_bytes: must be 1024..={MAX_BATCH_BYTES} (gRPC message limit)"
            ));
        }
        if self.max_line_bytes < 64 || self.max_line_bytes > self.batch_max_bytes {
            p.push("logs.max_line_bytes: must be 64..=batch_max_bytes".to_string());
        }
        if self.buffer_max_bytes < 4 * self.batch_max_bytes as u64 + 4096 {
            p.push("logs.buffer_max_bytes: must hold at least four full batches".to_string());
        }
        if self.batch_timeout.is_zero() {
            p.push("logs.batch_timeout: must be positive".to_string());
        }
        if self.poll_interval < Duration::from_millis(10) {
            p.push("logs.poll_interval: must be at least 10ms".to_string());
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let at = format!("logs.sources[{i}]");
            p.extend(s.validate(&at));
            if !ids.insert(s.id()) {
                p.push(format!("{at}: duplicate source {}", s.id()));
            }
        }
        p
    }
}
