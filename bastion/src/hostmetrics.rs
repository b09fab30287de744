//! Host metrics shipped by agents over their sessions, held in memory until scraped. Each batch
//! is checked and bounded when it arrives, then pre-rendered to Prometheus text sample lines so
//! that a scrape of thousands of agents is string concatenation. Series of agents that stopped
//! sending vanish after `stale_after`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bastide_proto::v1::{MetricType, MetricsBatch};

/// Bounds on what one agent may send per batch.
pub const MAX_FAMILIES: usize = 512;
pub const MAX_SAMPLES: usize = 8192;
const MAX_LABELS: usize = 16;
const MAX_LABEL_VALUE: usize = 256;
const MAX_HELP: usize = 512;
/// Labels the bastion sets itself: an agent may not send them.
const RESERVED: &[&str] = &["agent", "instance", "job", "project"];

#[derive(Debug)]
struct Family {
    help: String,
    kind: &'static str,
    /// (labels inside braces without the agent label, "value timestamp").
    samples: Vec<(String, String)>,
}

#[derive(Debug)]
struct AgentSeries {
    received: Instant,
    families: BTreeMap<String, Family>,
}

/// The in-memory store of every agent's latest batch.
#[derive(Debug, Clone)]
pub struct HostMetrics {
    inner: Arc<Mutex<HashMap<String, Arc<AgentSeries>>>>,
    stale_after: Duration,
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("too many metric families ({0} > {MAX_FAMILIES})")]
    TooManyFamilies(usize),
    #[error("too many samples ({0} > {MAX_SAMPLES})")]
    TooManySamples(usize),
}

pub fn valid_metric_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && n.len() <= 200
}

pub fn valid_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !n.starts_with("__")
        && n.len() <= 100
}

/// Escapes a label value for the text format.
pub fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(v: &str) -> String {
    v.chars()
        .take(MAX_HELP)
        .flat_map(|c| match c {
            '\\' => vec!['\\', '\\'],
            '\n' => vec!['\\', 'n'],
            c => vec![c],
        })
        .collect()
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

impl HostMetrics {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(HashMap::new())),
            stale_after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AgentSeries>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks and stores an agent's batch, replacing its previous one. Invalid names and
    /// reserved labels are dropped (and counted in the return value); oversized batches are
    /// refused whole.
    pub fn ingest(&self, agent: &str, batch: MetricsBatch) -> Result<usize, BatchError> {
        if batch.families.len() > MAX_FAMILIES {
            return Err(BatchError::TooManyFamilies(batch.families.len()));
        }
        let total: usize = batch.families.iter().map(|f| f.samples.len()).sum();
        if total > MAX_SAMPLES {
            return Err(BatchError::TooManySamples(total));
        }
        let ts = batch.timestamp_ms;
        let mut dropped = 0;
        let mut families = BTreeMap::new();
        for f in batch.families {
            if !valid_metric_name(&f.name) {
                dropped += f.samples.len();
                continue;
            }
            let kind = match MetricType::try_from(f.r#type) {
                Ok(MetricType::Counter) => "counter",
                Ok(MetricType::Gauge) => "gauge",
                _ => "untyped",
            };
            let fam: &mut Family = families.entry(f.name).or_insert_with(|| Family {
                help: escape_help(&f.help),
                kind,
                samples: Vec::new(),
            });
            for s in f.samples {
                if s.labels.len() > MAX_LABELS
                    || s.labels.iter().any(|l| {
                        !valid_label_name(&l.name)
                            || RESERVED.contains(&l.name.as_str())
                            || l.value.len() > MAX_LABEL_VALUE
                    })
                {
                    dropped += 1;
                    continue;
                }
                let mut labels = String::new();
                for (i, l) in s.labels.iter().enumerate() {
                    if i > 0 {
                        labels.push(',');
                    }
                    labels.push_str(&l.name);
                    labels.push_str("=\"");
                    escape_label(&l.value, &mut labels);
                    labels.push('"');
                }
                let value = if ts > 0 {
                    format!("{} {ts}", format_value(s.value))
                } else {
                    format_value(s.value)
                };
                fam.samples.push((labels, value));
            }
        }
        self.lock().insert(
            agent.to_string(),
            Arc::new(AgentSeries {
                received: Instant::now(),
                families,
            }),
        );
        Ok(dropped)
    }

    /// Forgets an agent's series (revoked).
    pub fn remove(&self, agent: &str) {
        self.lock().remove(agent);
    }

    /// Drops series older than `stale_after`; returns how many agents were dropped.
    pub fn expire(&self) -> usize {
        let mut m = self.lock();
        let before = m.len();
        let limit = self.stale_after;
        m.retain(|_, s| s.received.elapsed() < limit);
        before - m.len()
    }

    /// Number of agents with fresh series.
    pub fn agents(&self) -> usize {
        self.lock().len()
    }

    fn fresh(&self) -> Vec<(String, Arc<AgentSeries>)> {
        let limit = self.stale_after;
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.received.elapsed() < limit)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Text exposition of one agent's series, without an agent label (the scrape target
    /// carries it), or None if it has none fresh.
    pub fn render_agent(&self, agent: &str) -> Option<String> {
        let s = self.lock().get(agent).cloned()?;
        if s.received.elapsed() >= self.stale_after {
            return None;
        }
        let mut out = String::with_capacity(4096);
        for (name, f) in &s.families {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", f.help, f.kind);
            for (labels, value) in &f.samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        }
        Some(out)
    }

    /// Text exposition of every agent's series, each labelled agent="<name>", grouped by
    /// family as the format requires.
    pub fn render_all(&self) -> String {
        let all = self.fresh();
        let mut names: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for (_, s) in &all {
            for (name, f) in &s.families {
                names
                    .entry(name.as_str())
                    .or_insert((f.help.as_str(), f.kind));
            }
        }
        let mut out = String::with_capacity(all.len() * 8192);
        for (name, (help, kind)) in names {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (agent, s) in &all {
                let Some(f) = s.families.get(name) else {
                    continue;
                };
                // Agents that disagree on a family's type are skipped rather than break the
                // exposition for everyone.
                if f.kind != kind {
                    continue;
                }
                for (labels, value) in &f.samples {
                    out.push_str(name);
                    out.push_str("{agent=\"");
                    escape_label(agent, &mut out);
                    out.push('"');
                    if !labels.is_empty() {
                        out.push(',');
                        out.push_str(labels);
                    }
                    out.push_str("} ");
                    out.push_str(value);
                    out.push('\n');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bastide_proto::v1::{Label, MetricFamily, Sample};

    fn fam(name: &str, labels: &[(&str, &str)], v: f64) -> MetricFamily {
        MetricFamily {
            name: name.into(),
            help: "help \\ with\nnewline".into(),
            r#type: MetricType::Gauge as i32,
            samples: vec![Sample {
                labels: labels
                    .iter()
                    .map(|(k, v)| Label {
                        name: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                value: v,
            }],
        }
    }

    #[test]
    fn renders_grouped_and_escaped() {
        let m = HostMetrics::new(Duration::from_secs(60));
        for a in ["b", "a"] {
            m.ingest(
                a,
                MetricsBatch {
                    timestamp_ms: 1000,
                    families: vec![
                        fam("node_load1", &[], 1.5),
                        fam("node_x", &[("device", "e\"th\n0")], 2.0),
                    ],
                },
            )
            .unwrap();
        }
        let all = m.render_all();
        assert_eq!(all.matches("# TYPE node_load1 gauge").count(), 1);
        assert!(all.contains("node_load1{agent=\"a\"} 1.5 1000\nnode_load1{agent=\"b\"} 1.5 1000"));
        assert!(all.contains("device=\"e\\\"th\\n0\""));
        assert!(all.contains("# HELP node_load1 help \\\\ with\\nnewline"));
        let one = m.render_agent("a").unwrap();
        assert!(one.contains("node_load1 1.5 1000") && !one.contains("agent="));
    }

    #[test]
    fn hostile_batches_are_bounded() {
        let m = HostMetrics::new(Duration::from_secs(60));
        let dropped = m
            .ingest(
                "a",
                MetricsBatch {
                    timestamp_ms: 0,
                    families: vec![
                        fam("bad name", &[], 1.0),
                        fam("ok", &[("instance", "x")], 1.0),
                        fam("ok2", &[("__meta", "x")], 1.0),
                        fam("ok3", &[("l", &"v".repeat(1000))], 1.0),
                        fam("ok4", &[], f64::NAN),
                    ],
                },
            )
            .unwrap();
        assert_eq!(dropped, 4);
        assert!(m.render_agent("a").unwrap().contains("ok4 NaN"));
        let many = MetricsBatch {
            timestamp_ms: 0,
            families: (0..MAX_FAMILIES + 1)
                .map(|i| fam(&format!("f{i}"), &[], 0.0))
                .collect(),
        };
        assert!(m.ingest("a", many).is_err());
    }

    #[test]
    fn stale_series_disappear() {
        let m = HostMetrics::new(Duration::from_millis(10));
        m.ingest(
            "a",
            MetricsBatch {
                timestamp_ms: 0,
                families: vec![fam("x", &[], 1.0)],
            },
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(m.render_agent("a").is_none());
        assert_eq!(m.render_all(), "");
        assert_eq!(m.expire(), 1);
    }
}
