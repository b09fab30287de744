//! The registry's side of several bastions sharing one PostgreSQL store: rows other nodes
//! changed are applied here (`crate::cluster` reads them when PostgreSQL notifies it), and
//! this node's standing in the cluster (its name, leadership, whether the store answers) is
//! kept here, where registration and the services read it. A single bastion never calls
//! any of this: its node name stays empty and nothing changes for it.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::*;

/// This node's standing in the cluster.
#[derive(Default)]
pub struct ClusterState {
    node: RwLock<String>,
    /// This node runs the cluster's run-once jobs (holds the leader advisory lock).
    pub leader: AtomicBool,
    /// The store's notification connection is up and resynced.
    pub connected: AtomicBool,
    /// Since when the store is unreachable (None: reachable).
    disconnected: Mutex<Option<Instant>>,
    /// Beyond this, no new agent session is accepted.
    max_disconnected: Mutex<Option<Duration>>,
    /// Every live node's services, as the template variable `bastion.services` of each.
    nodes: Mutex<BTreeMap<String, serde_json::Value>>,
}

impl ClusterState {
    /// This node's name; empty for a single bastion.
    pub fn node(&self) -> String {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn clustered(&self) -> bool {
        !self.node().is_empty()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Records whether the store answers; the first failure starts the clock.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        let mut d = lock(&self.disconnected);
        if up {
            *d = None;
        } else if d.is_none() {
            *d = Some(Instant::now());
        }
    }

    /// How long the store has been unreachable (None: it answers).
    pub fn disconnected_for(&self) -> Option<Duration> {
        lock(&self.disconnected).map(|t| t.elapsed())
    }

    /// Records the live nodes' services (from the store's `nodes` table).
    pub fn set_nodes(&self, nodes: BTreeMap<String, serde_json::Value>) {
        *lock(&self.nodes) = nodes;
    }

    /// The template variable `bastion` from this node's `base`: `bastion.services.<service>`
    /// is the list of every live node's endpoints for that service, this node's first (one
    /// entry for a single bastion), and, for several bastions, `bastion.nodes` gives each
    /// node's name and services.
    pub fn template_vars(&self, base: &serde_json::Value) -> serde_json::Value {
        let me = self.node();
        let mine = base["services"].clone();
        let mut others = if me.is_empty() {
            BTreeMap::new()
        } else {
            lock(&self.nodes).clone()
        };
        others.remove(&me);
        let mut lists = serde_json::Map::new();
        for services in std::iter::once(&mine).chain(others.values()) {
            if let Some(m) = services.as_object() {
                for (k, v) in m {
                    let e = lists
                        .entry(k.clone())
                        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                    if let Some(a) = e.as_array_mut() {
                        a.push(v.clone());
                    }
                }
            }
        }
        let mut v = base.clone();
        v["services"] = serde_json::Value::Object(lists);
        if !me.is_empty() {
            let nodes = std::iter::once((&me, &mine))
                .chain(others.iter())
                .map(|(n, s)| serde_json::json!({ "name": n, "services": s }))
                .collect();
            v["nodes"] = serde_json::Value::Array(nodes);
        }
        v
    }

    /// Why new agent sessions are refused, if they are: cut off from the store for longer
    /// than `[store] max_disconnected` (a revocation made on another node meanwhile would
    /// otherwise be dodged by connecting here).
    pub fn refuses_sessions(&self) -> Option<String> {
        let bound = (*lock(&self.max_disconnected))?;
        let out = self.disconnected_for()?;
        (out > bound).then(|| {
            format!(
                "this bastion has been cut off from the registry's database for {}s (over [store] max_disconnected = {}): it accepts no new agent session, try another bastion",
                out.as_secs(),
                humantime::format_duration(bound)
            )
        })
    }
}

/// Rows of the shared store, as read for some agents (`names`) or all of them (`None`: a
/// full resync, after the notification connection was down and notifications were lost).
#[derive(Debug, Default)]
pub struct RemoteUpdate {
    pub names: Option<Vec<String>>,
    pub agents: Vec<AgentRow>,
    pub certs: Vec<CertRow>,
    /// (agent, node holding its session, address its connection comes from there).
    pub sessions: Vec<(String, String, String)>,
}

impl Registry {
    /// Joins a cluster under `node` (before the services start).
    pub fn set_cluster_node(&self, node: &str, max_disconnected: Duration) {
        *self
            .inner
            .cluster
            .node
            .write()
            .unwrap_or_else(|e| e.into_inner()) = node.to_string();
        *lock(&self.inner.cluster.max_disconnected) = Some(max_disconnected);
    }

    pub fn cluster(&self) -> &ClusterState {
        &self.inner.cluster
    }

    /// Agents whose session this node holds, with the address each connects from.
    pub fn local_sessions(&self) -> Vec<(String, String)> {
        let st = self.read_state();
        st.sessions
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, _)| {
                let ip = st.observed.get(k).map(|i| i.to_string());
                (k.clone(), ip.unwrap_or_default())
            })
            .collect()
    }

    /// Where an agent's connection to this node comes from (empty: unknown).
    pub fn observed(&self, name: &str) -> String {
        self.read_state()
            .observed
            .get(name)
            .map(|i| i.to_string())
            .unwrap_or_default()
    }

    /// Writes the facts registered while the store was unreachable. Blocking.
    pub fn flush_pending_facts(&self) -> Result<usize, RegistryError> {
        let mut store = lock(&self.inner.store);
        let rows: Vec<AgentRow> = {
            let st = self.read_state();
            st.pending_facts
                .iter()
                .filter_map(|n| st.agents.get(n).cloned())
                .collect()
        };
        for r in &rows {
            store.update_facts(r)?;
            self.write_state().pending_facts.remove(&r.name);
        }
        Ok(rows.len())
    }

    /// Applies rows another node changed (or a full resync). An agent whose certificates
    /// were revoked meanwhile (revoked, or replaced by a new enrollment) has its connections
    /// to this node cut at once. Blocking (waits for the store's lock, so that a local
    /// write and its memory update are never interleaved with an older remote read).
    pub fn apply_remote(&self, u: RemoteUpdate) {
        let _store = lock(&self.inner.store);
        let mut cut = Vec::new();
        let mut enrolled = Vec::new();
        let mut revoked = Vec::new();
        {
            let mut st = self.write_state();
            let st = &mut *st;
            let scope: HashSet<String> = match &u.names {
                Some(n) => n.iter().cloned().collect(),
                None => st
                    .agents
                    .keys()
                    .chain(u.agents.iter().map(|a| &a.name))
                    .cloned()
                    .collect(),
            };
            let in_scope = |name: &str| scope.contains(name);
            // Unrevoked serials before, to see which ones were revoked or removed.
            let live_before: HashMap<String, String> = st
                .certs
                .iter()
                .filter(|(_, c)| !c.revoked && in_scope(&c.agent))
                .map(|(s, c)| (s.clone(), c.agent.clone()))
                .collect();
            let mut new_agents: BTreeMap<String, AgentRow> =
                u.agents.into_iter().map(|a| (a.name.clone(), a)).collect();
            for name in &scope {
                match (st.agents.get(name), new_agents.remove(name)) {
                    (None, Some(mut row)) => {
                        if !row.revoked {
                            enrolled.push(name.clone());
                        }
                        if st.pending_facts.contains(name) {
                            row = merge_pending(st.agents.get(name), row);
                        }
                        st.agents.insert(name.clone(), row);
                    }
                    (Some(old), Some(row)) => {
                        if !old.revoked && row.revoked {
                            revoked.push(name.clone());
                        }
                        let row = if st.pending_facts.contains(name) {
                            merge_pending(Some(old), row)
                        } else {
                            row
                        };
                        st.agents.insert(name.clone(), row);
                    }
                    (Some(_), None) => {
                        // Removed from the store.
                        st.agents.remove(name);
                        cut.push(name.clone());
                    }
                    (None, None) => {}
                }
            }
            st.certs.retain(|_, c| !in_scope(&c.agent));
            for c in u.certs {
                st.certs.insert(c.serial.clone(), c);
            }
            for (serial, agent) in live_before {
                // Revoked, or gone (superseded by a renewal elsewhere: then nothing is cut,
                // the agent's connection carries its newest certificate).
                if st.certs.get(&serial).is_some_and(|c| c.revoked) {
                    cut.push(agent);
                }
            }
            cut.extend(revoked.iter().cloned());
            st.holders.retain(|a, _| !in_scope(a));
            let me = self.inner.cluster.node();
            for (agent, node, observed) in u.sessions {
                if !in_scope(&agent) {
                    continue;
                }
                // The holder's evidence of where the agent connects from: what the address
                // policy needs here too (kept after the session ends, as for our own).
                if node != me && st.sessions.get(&agent).copied().unwrap_or(0) == 0 {
                    if let Ok(ip) = observed.parse::<IpAddr>() {
                        st.observed.insert(agent.clone(), ip);
                    }
                }
                st.holders.insert(agent, node);
            }
            for name in &revoked {
                st.sessions.remove(name);
                st.observed.remove(name);
            }
        }
        // The pushed-configuration state of agents this node had not seen.
        {
            let st = self.read_state();
            let mut g = lock(&self.inner.config);
            for name in &enrolled {
                if let Some(a) = st.agents.get(name) {
                    g.0.entry(name.clone()).or_insert_with(|| ConfigState {
                        desired: a.config_desired.clone(),
                        applied: a.config_applied.clone(),
                        error: a.config_error.clone(),
                        refused: String::new(),
                    });
                }
            }
        }
        cut.sort();
        cut.dedup();
        for name in &cut {
            let n = self.cut_connections(name);
            if n > 0 {
                info!(agent = %name, connections_cut = n, "agent's connections cut: revoked or replaced on another bastion");
            }
        }
        self.publish();
        for name in enrolled {
            self.emit(RegistryEvent::Enrolled(name));
        }
        for name in revoked {
            self.emit(RegistryEvent::Revoked(name));
        }
    }
}

/// The store's row, with the facts this node registered while the store was unreachable
/// (written at the resync, right after).
fn merge_pending(local: Option<&AgentRow>, mut row: AgentRow) -> AgentRow {
    if let Some(l) = local {
        if l.cert_serial == row.cert_serial {
            row.hostname = l.hostname.clone();
            row.addresses = l.addresses.clone();
            row.os = l.os.clone();
            row.agent_version = l.agent_version.clone();
            row.ssh_host_keys = l.ssh_host_keys.clone();
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_vars_list_every_node_this_one_first() {
        let c = ClusterState::default();
        let base = serde_json::json!({
            "project": "p",
            "services": { "dns": { "host": "10.0.0.2", "port": 53 } },
        });
        // A single bastion: a list of one.
        let v = c.template_vars(&base);
        assert_eq!(v["services"]["dns"][0], base["services"]["dns"]);
        assert_eq!(v["services"]["dns"].as_array().unwrap().len(), 1);
        assert!(v.get("nodes").is_none());
        *c.node.write().unwrap() = "b".into();
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "a".to_string(),
            serde_json::json!({ "dns": { "host": "10.0.0.1", "port": 53 } }),
        );
        c.set_nodes(nodes);
        let v = c.template_vars(&base);
        assert_eq!(v["services"]["dns"][0]["host"], "10.0.0.2");
        assert_eq!(v["services"]["dns"][1]["host"], "10.0.0.1");
        assert!(v.get("all").is_none());
        assert_eq!(v["nodes"][0]["name"], "b");
        assert_eq!(v["nodes"][1]["name"], "a");
    }
}
