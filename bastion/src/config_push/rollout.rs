//! Rollouts in waves (`[config_push.rollout]`): a new tree's pushes go to the agents of the
//! first wave only; once every one of them has ACKed and stayed online (no NACK) for the bake
//! time, the next wave gets its pushes, and so on. A NACK, or an agent of a reached wave going
//! offline before the bake ends, halts the rollout: agents not reached keep their revision,
//! `bastide config rollout status` says which wave and agent and why, `rollout resume` goes on
//! to the next wave and `rollout abort` gives the agents reached their previous push back
//! (and the previous tree becomes the one in force again). A new tree during a rollout
//! supersedes it, from the first wave. The pure parts (wave assignment, the state machine's
//! step) live here; the push service drives them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bastide_proto::v1::ConfigPush as PushMsg;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::registry::{AgentInfo, ConfigState};

/// `[config_push.rollout]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// In order; agents in no wave form a last one.
    pub waves: Vec<WaveConfig>,
    /// How long the agents of a wave must stay online without NACK after their ACKs.
    #[serde(default = "default_bake", with = "humantime_serde")]
    pub bake_time: Duration,
}

fn default_bake() -> Duration {
    Duration::from_secs(300)
}

/// One wave: agents with a label (`key` or `key=value`), or the first agents (in a stable
/// order, by a hash of their names) up to a percentage of the agents to update, counted
/// with the earlier waves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveConfig {
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub percent: Option<u8>,
}

impl RolloutConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.waves.is_empty() {
            out.push((
                "config_push.rollout.waves".into(),
                "at least one wave is needed".into(),
            ));
        }
        for (i, w) in self.waves.iter().enumerate() {
            let k = format!("config_push.rollout.waves[{i}]");
            match (&w.label, w.percent) {
                (Some(l), None) if !l.is_empty() => {}
                (None, Some(p)) if (1..=100).contains(&p) => {}
                (None, Some(_)) => out.push((k, "percent must be 1 to 100".into())),
                _ => out.push((k, "exactly one of label and percent".into())),
            }
        }
        out
    }
}

impl WaveConfig {
    fn name(&self) -> String {
        match (&self.label, self.percent) {
            (Some(l), _) => format!("label {l}"),
            (_, Some(p)) => format!("{p}%"),
            _ => "?".into(),
        }
    }

    fn matches(&self, a: &AgentInfo) -> bool {
        match &self.label {
            Some(l) => match l.split_once('=') {
                Some((k, v)) => a.labels.get(k).is_some_and(|x| x == v),
                None => a.labels.contains_key(l),
            },
            None => false,
        }
    }
}

/// Splits `agents` into waves (names), empty waves dropped, with their names.
pub fn assign(cfg: &RolloutConfig, agents: &[Arc<AgentInfo>]) -> Vec<(String, Vec<String>)> {
    let mut order: Vec<&Arc<AgentInfo>> = agents.iter().collect();
    order.sort_by_key(|a| Sha256::digest(a.name.as_bytes()));
    let total = order.len();
    let mut taken: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for w in &cfg.waves {
        let mut names = Vec::new();
        match w.percent {
            Some(p) => {
                let target = (total * p as usize).div_ceil(100);
                for a in &order {
                    if taken.len() >= target {
                        break;
                    }
                    if taken.insert(&a.name) {
                        names.push(a.name.clone());
                    }
                }
            }
            None => {
                for a in order.iter().filter(|a| w.matches(a)) {
                    if taken.insert(&a.name) {
                        names.push(a.name.clone());
                    }
                }
            }
        }
        if !names.is_empty() {
            out.push((w.name(), names));
        }
    }
    let rest: Vec<String> = order
        .iter()
        .filter(|a| !taken.contains(a.name.as_str()))
        .map(|a| a.name.clone())
        .collect();
    if !rest.is_empty() {
        out.push(("rest".into(), rest));
    }
    out
}

/// What `bastide config rollout status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// `rolling` (waiting for ACKs), `baking`, `halted`, `done`, `aborted`.
    pub state: String,
    /// The commit (git source) or `tree`.
    pub source: String,
    pub started_at: i64,
    /// 1-based index of the wave in progress (or halted, or last).
    pub wave: usize,
    pub waves: Vec<WaveStatus>,
    /// Why it halted.
    #[serde(default)]
    pub failure: Option<Failure>,
    /// Seconds of bake left (baking only).
    #[serde(default)]
    pub bake_left_secs: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WaveStatus {
    pub name: String,
    pub agents: Vec<String>,
    /// Agents of the wave that ACKed the new revision.
    pub acked: usize,
    /// Whether its agents were sent the new revision.
    pub reached: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Failure {
    pub wave: usize,
    pub agent: String,
    /// `nack` or `offline`.
    pub reason: String,
    /// The NACK's text.
    pub error: String,
}

/// A rollout in progress (or halted, finished, aborted: kept for its status).
pub struct Rollout {
    pub status: RolloutStatus,
    /// Per agent: its new push, not yet sent while its wave is not reached.
    pub pending: HashMap<String, PendingPush>,
    /// Per agent reached: its new revision, and what it had before (for abort).
    pub reached: HashMap<String, String>,
    pub previous: HashMap<String, Previous>,
    /// The tree in force before (for abort).
    pub previous_tree: Option<PreviousTree>,
    pub bake_until: Option<std::time::Instant>,
    pub bake_time: Duration,
}

pub type PendingPush = (Arc<AgentInfo>, serde_json::Value, u64, PushMsg);
pub type Previous = (Option<(u64, serde_json::Value)>, Option<Arc<PushMsg>>);
pub type PreviousTree = (
    Option<Arc<super::render::Prepared>>,
    Option<(std::path::PathBuf, Option<String>)>,
);

/// What the service must do after a step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Send wave `n` (0-based) its pushes.
    Reach(usize),
}

impl Rollout {
    pub fn active(&self) -> bool {
        matches!(self.status.state.as_str(), "rolling" | "baking")
    }

    /// Advances with the agents' states: `online(name)` and their config states.
    pub fn step(
        &mut self,
        states: &HashMap<String, ConfigState>,
        online: impl Fn(&str) -> bool,
        now: std::time::Instant,
    ) -> Step {
        if !self.active() {
            return Step::Nothing;
        }
        let i = self.status.wave.saturating_sub(1);
        let Some(w) = self.status.waves.get(i).cloned() else {
            self.status.state = "done".into();
            return Step::Nothing;
        };
        let mut acked = 0;
        for name in &w.agents {
            let Some(rev) = self.reached.get(name) else {
                continue;
            };
            let st = states.get(name);
            if st.is_some_and(|c| !c.refused.is_empty() && &c.refused == rev) {
                self.halt(
                    i,
                    name,
                    "nack",
                    st.map(|c| c.error.clone()).unwrap_or_default(),
                );
                return Step::Nothing;
            }
            let ok = st.is_some_and(|c| &c.applied == rev);
            if ok {
                acked += 1;
            }
            // An agent that goes away before the bake ends halts it; one offline when its
            // wave was reached is not waited for (it takes the revision when it returns).
            if !online(name) && (ok || self.status.state == "baking") {
                self.halt(i, name, "offline", String::new());
                return Step::Nothing;
            }
        }
        let waiting_for = w
            .agents
            .iter()
            .filter(|n| {
                self.reached.contains_key(*n)
                    && online(n)
                    && states
                        .get(*n)
                        .is_none_or(|c| Some(&c.applied) != self.reached.get(*n))
            })
            .count();
        self.status.waves[i].acked = acked;
        match self.status.state.as_str() {
            "rolling" if waiting_for == 0 => {
                self.status.state = "baking".into();
                self.bake_until = Some(now + self.bake_time);
                Step::Nothing
            }
            "baking" => {
                let until = self.bake_until.unwrap_or(now);
                self.status.bake_left_secs = until.saturating_duration_since(now).as_secs();
                if now >= until {
                    self.next_wave()
                } else {
                    Step::Nothing
                }
            }
            _ => Step::Nothing,
        }
    }

    /// Moves to the next wave (or finishes).
    pub fn next_wave(&mut self) -> Step {
        let i = self.status.wave;
        if i >= self.status.waves.len() {
            self.status.state = "done".into();
            self.bake_until = None;
            self.status.bake_left_secs = 0;
            return Step::Nothing;
        }
        self.status.wave = i + 1;
        self.status.state = "rolling".into();
        self.status.failure = None;
        self.bake_until = None;
        self.status.bake_left_secs = 0;
        Step::Reach(i)
    }

    fn halt(&mut self, wave: usize, agent: &str, reason: &str, error: String) {
        self.status.state = "halted".into();
        self.bake_until = None;
        self.status.failure = Some(Failure {
            wave: wave + 1,
            agent: agent.to_string(),
            reason: reason.into(),
            error,
        });
    }
}

/// Prints a rollout's status for the CLI.
pub fn print(s: &RolloutStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout of {}: {} (wave {} of {}{})",
        s.source,
        s.state,
        s.wave,
        s.waves.len(),
        if s.state == "baking" {
            format!(", {}s of bake left", s.bake_left_secs)
        } else {
            String::new()
        }
    );
    for (i, w) in s.waves.iter().enumerate() {
        let _ = writeln!(
            out,
            "  wave {} {:<12} {:>4} agent(s), {} acked{}",
            i + 1,
            w.name,
            w.agents.len(),
            w.acked,
            if w.reached { "" } else { "  (not reached)" }
        );
    }
    if let Some(f) = &s.failure {
        let _ = writeln!(
            out,
            "HALTED at wave {}: agent {} {}{}",
            f.wave,
            f.agent,
            if f.reason == "nack" {
                "refused the revision (NACK)"
            } else {
                "went offline before the bake ended"
            },
            if f.error.is_empty() {
                String::new()
            } else {
                format!(": {}", f.error)
            }
        );
        let _ = writeln!(
            out,
            "  `bastide config rollout resume` goes on to the next wave; `bastide config rollout abort` gives the agents reached their previous revision back"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, labels: &[(&str, &str)]) -> Arc<AgentInfo> {
        Arc::new(AgentInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn waves_by_label_then_percent_then_the_rest() {
        let cfg = RolloutConfig {
            waves: vec![
                WaveConfig {
                    label: Some("canary".into()),
                    percent: None,
                },
                WaveConfig {
                    label: None,
                    percent: Some(50),
                },
            ],
            bake_time: Duration::from_secs(1),
        };
        let mut agents = vec![agent("c1", &[("canary", "yes")])];
        for i in 0..9 {
            agents.push(agent(&format!("a{i}"), &[]));
        }
        let w = assign(&cfg, &agents);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], ("label canary".to_string(), vec!["c1".to_string()]));
        // 50 % of 10, the canary counted.
        assert_eq!(w[1].1.len(), 4);
        assert_eq!(w[2].0, "rest");
        assert_eq!(w[2].1.len(), 5);
        // Stable: the same split again.
        assert_eq!(assign(&cfg, &agents), w);
    }

    #[test]
    fn a_nack_halts_and_acks_then_bake_move_on() {
        let mut r = Rollout {
            status: RolloutStatus {
                state: "rolling".into(),
                wave: 1,
                waves: vec![
                    WaveStatus {
                        name: "a".into(),
                        agents: vec!["x".into()],
                        ..Default::default()
                    },
                    WaveStatus {
                        name: "b".into(),
                        agents: vec!["y".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            pending: HashMap::new(),
            reached: [("x".to_string(), "r2".to_string())].into(),
            previous: HashMap::new(),
            previous_tree: None,
            bake_until: None,
            bake_time: Duration::from_secs(5),
        };
        let now = std::time::Instant::now();
        let st = |applied: &str, refused: &str| -> HashMap<String, ConfigState> {
            [(
                "x".to_string(),
                ConfigState {
                    desired: "r2".into(),
                    applied: applied.into(),
                    error: "e".into(),
                    refused: refused.into(),
                },
            )]
            .into()
        };
        assert_eq!(r.step(&st("r1", ""), |_| true, now), Step::Nothing);
        assert_eq!(r.status.state, "rolling");
        assert_eq!(r.step(&st("r2", ""), |_| true, now), Step::Nothing);
        assert_eq!(r.status.state, "baking");
        assert_eq!(
            r.step(&st("r2", ""), |_| true, now + Duration::from_secs(2)),
            Step::Nothing
        );
        assert_eq!(
            r.step(&st("r2", ""), |_| true, now + Duration::from_secs(6)),
            Step::Reach(1)
        );
        // Offline during the bake halts.
        r.status.state = "baking".into();
        r.status.wave = 1;
        r.bake_until = Some(now + Duration::from_secs(5));
        r.step(&st("r2", ""), |_| false, now);
        assert_eq!(r.status.state, "halted");
        assert_eq!(r.status.failure.as_ref().unwrap().reason, "offline");
        // A NACK halts.
        r.status.state = "rolling".into();
        r.step(&st("r1", "r2"), |_| true, now);
        assert_eq!(r.status.state, "halted");
        let f = r.status.failure.as_ref().unwrap();
        assert_eq!(
            (f.wave, f.agent.as_str(), f.reason.as_str()),
            (1, "x", "nack")
        );
    }
}
