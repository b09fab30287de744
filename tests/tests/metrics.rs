//! Metrics and supervision with a real Prometheus and promtool over loopback: the bastion's
//! own metrics, agents' host metrics through the bastion, HTTP service discovery, bearer
//! tokens, the Grafana dashboard's queries and the documented scrape configuration.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bastide_tests::{free_port, http_get, require, urlencode, wait_for, Agent, Bastion};
use serde_json::Value;

const TOKEN: &str = "s3cret-scrape-token";

/// Runs `promtool check metrics` on an exposition; returns its complaints on failure.
///
/// The one lint tolerated is promtool's camelCase complaint about node_exporter's own
/// meminfo names (`node_memory_MemAvailable_bytes`...), which node_exporter itself fails the
/// same way and which dashboards depend on. Parse errors and every other lint fail.
fn promtool_check_metrics(text: &str) -> Result<(), String> {
    let promtool = require("promtool", "prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let other: Vec<&str> = complaints
        .lines()
        .filter(|l| {
            !(l.starts_with("node_memory_")
                && l.ends_with("metric names should be written in 'snake_case' not 'camelCase'"))
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    if out.status.success() || (other.is_empty() && !complaints.contains("error")) {
        Ok(())
    } else {
        Err(other.join("\n"))
    }
}

struct Prometheus {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(config: &str) -> Self {
        let bin = require("prometheus", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let check = Command::new(require("promtool", "prometheus"))
            .args(["check", "config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Self {
            child,
            addr,
            _dir: dir,
        };
        let ready = wait_for(Duration::from_secs(30), || {
            std::net::TcpStream::connect(&p.addr).ok()?;
            (http_get(&p.addr, "/-/ready", None).0 == 200).then_some(())
        });
        assert!(ready.is_some(), "prometheus did not start");
        p
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.addr, path, None);
        assert!(
            status == 200 || status == 400 || status == 422,
            "{status}: {body}"
        );
        serde_json::from_str(&body).unwrap()
    }

    fn query(&self, q: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", urlencode(q)))
    }

    /// The value of a single-series instant query, if any.
    fn value(&self, q: &str) -> Option<f64> {
        let v = self.query(q);
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

fn bastion_with_metrics() -> Bastion {
    let mut b = Bastion::init("proj");
    let token_file = b.state_dir().join("metrics.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    b.edit_config(|c| {
        c.replace(
            "# bearer_token_file = \"/etc/bastide/metrics.token\"",
            &format!("bearer_token_file = {:?}", token_file.display().to_string()),
        )
        .replace("stale_after = \"5m\"", "stale_after = \"30s\"")
    });
    b.start();
    b
}

#[test]
fn prometheus_scrapes_the_bastion_and_its_agents() {
    let b = bastion_with_metrics();
    let mut web = Agent::new("web01");
    web.enroll_ok(&b, &b.token(&["--labels", "role=web"]));
    let mut db = Agent::new("db01");
    db.enroll_ok(&b, &b.token(&["--labels", "role=db"]));
    web.start();
    db.start();
    assert!(b.wait_state("web01", "online", Duration::from_secs(10)));
    assert!(b.wait_state("db01", "online", Duration::from_secs(10)));

    // Access control: no token or a wrong one gets 401.
    assert_eq!(http_get(&b.metrics_addr, "/metrics", None).0, 401);
    assert_eq!(http_get(&b.metrics_addr, "/metrics", Some("wrong")).0, 401);
    assert_eq!(http_get(&b.metrics_addr, "/sd", Some("wrong")).0, 401);

    // The expositions pass promtool.
    let (status, own) = http_get(&b.metrics_addr, "/metrics", Some(TOKEN));
    assert_eq!(status, 200);
    promtool_check_metrics(&own).unwrap_or_else(|e| panic!("{e}\n{own}"));
    for want in [
        "bastide_build_info{version=",
        "bastide_agent_up{agent=\"web01\"} 1",
        "bastide_agent_last_seen_timestamp_seconds{agent=\"db01\"}",
        "bastide_agent_certificate_expiry_timestamp_seconds{agent=\"web01\"}",
        "bastide_agent_info{agent=\"web01\",version=",
        "bastide_agents{state=\"online\"} 2",
        "bastide_agent_enrollments_total{result=\"ok\"} 2",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
        "bastide_allocator_allocated_bytes ",
        "bastide_allocator_resident_bytes ",
        "# HELP bastide_agent_heartbeats_total",
    ] {
        assert!(own.contains(want), "missing {want} in\n{own}");
    }
    let all = wait_for(Duration::from_secs(10), || {
        let (_, t) = http_get(&b.metrics_addr, "/metrics/agents", Some(TOKEN));
        (t.contains("agent=\"web01\"") && t.contains("agent=\"db01\"")).then_some(t)
    })
    .expect("host metrics of both agents");
    promtool_check_metrics(&all).unwrap_or_else(|e| panic!("{e}"));
    assert!(all.contains("node_memory_MemAvailable_bytes{agent=\"web01\"}"));
    assert!(all.contains("node_cpu_seconds_total{agent=\"db01\",cpu=\"0\",mode=\"idle\"}"));
    let (status, one) = http_get(&b.metrics_addr, "/metrics/agents/web01", Some(TOKEN));
    assert_eq!(status, 200);
    promtool_check_metrics(&one).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !one.contains("agent="),
        "per-agent path leaves the agent label to the target"
    );
    assert_eq!(
        http_get(&b.metrics_addr, "/metrics/agents/nobody", Some(TOKEN)).0,
        404
    );

    // Service discovery: one target group per agent, pointing back at the bastion.
    let (_, sd) = http_get(&b.metrics_addr, "/sd", Some(TOKEN));
    let sd: Value = serde_json::from_str(&sd).unwrap();
    assert_eq!(sd.as_array().unwrap().len(), 2);
    let web_group = sd
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["labels"]["agent"] == "web01")
        .unwrap();
    assert_eq!(
        web_group["labels"]["__metrics_path__"],
        "/metrics/agents/web01"
    );
    assert_eq!(web_group["labels"]["instance"], "web01");
    assert_eq!(web_group["labels"]["role"], "web");
    assert_eq!(web_group["labels"]["project"], "proj");
    assert_eq!(web_group["targets"][0], b.metrics_addr.as_str());

    // A real Prometheus: the bastion itself, and the agents through /sd only.
    let token_file = b.state_dir().join("metrics.token");
    let tf = token_file.display();
    let m = &b.metrics_addr;
    let prom = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
         - job_name: bastide\n  authorization:\n    credentials_file: {tf}\n  static_configs:\n    - targets: ['{m}']\n\
         - job_name: bastide-agents\n  authorization:\n    credentials_file: {tf}\n  http_sd_configs:\n    - url: http://{m}/sd\n      refresh_interval: 1s\n      authorization:\n        credentials_file: {tf}\n"
    ));
    let up = wait_for(Duration::from_secs(30), || {
        prom.value("bastide_agent_up{job=\"bastide\",agent=\"web01\"}")
            .filter(|v| *v == 1.0)
    });
    assert!(up.is_some(), "bastide_agent_up never 1");
    let mem = wait_for(Duration::from_secs(30), || {
        prom.value("node_memory_MemAvailable_bytes{job=\"bastide-agents\",agent=\"db01\"}")
            .filter(|v| *v > 0.0)
    });
    assert!(
        mem.is_some(),
        "no host metrics through the bastion: {}",
        prom.api("/api/v1/targets")
    );

    // One healthy target per agent, named after it.
    let targets = wait_for(Duration::from_secs(20), || {
        let t = prom.api("/api/v1/targets?state=active");
        let agents: Vec<Value> = t["data"]["activeTargets"]
            .as_array()?
            .iter()
            .filter(|x| x["labels"]["job"] == "bastide-agents")
            .cloned()
            .collect();
        (agents.len() == 2 && agents.iter().all(|x| x["health"] == "up")).then_some(agents)
    })
    .expect("two healthy agent targets");
    let mut instances: Vec<String> = targets
        .iter()
        .map(|x| x["labels"]["instance"].as_str().unwrap().to_string())
        .collect();
    instances.sort();
    assert_eq!(instances, ["db01", "web01"]);

    // Stopping an agent: its liveness drops to 0 and its VM target goes down.
    web.stop();
    let down = wait_for(Duration::from_secs(10), || {
        prom.value("bastide_agent_up{job=\"bastide\",agent=\"web01\"}")
            .filter(|v| *v == 0.0)
    });
    assert!(down.is_some(), "bastide_agent_up did not drop to 0");
    let vm_down = wait_for(Duration::from_secs(10), || {
        prom.value("up{job=\"bastide-agents\",instance=\"web01\"}")
            .filter(|v| *v == 0.0)
    });
    assert!(vm_down.is_some(), "the VM's up did not drop to 0");

    // No label was renamed for clashing with target labels.
    let labels = prom.api("/api/v1/labels");
    let names: Vec<&str> = labels["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(
        !names.iter().any(|l| l.starts_with("exported_")),
        "{names:?}"
    );

    // Counters match the events: 3 more enrollments raise the counter by exactly 3.
    let before = prom
        .value("bastide_agent_enrollments_total{job=\"bastide\",result=\"ok\"}")
        .unwrap();
    for i in 0..3 {
        Agent::new(&format!("extra{i}")).enroll_ok(&b, &b.token(&[]));
    }
    let after = wait_for(Duration::from_secs(10), || {
        prom.value("bastide_agent_enrollments_total{job=\"bastide\",result=\"ok\"}")
            .filter(|v| *v == before + 3.0)
    });
    assert!(
        after.is_some(),
        "enrollment counter did not rise by exactly 3"
    );

    // Every query of the Grafana dashboard parses and runs.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(bastide_tests::workspace().join("packaging/grafana/bastide.json"))
            .unwrap(),
    )
    .unwrap();
    let mut n = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$agent", ".*");
            let r = prom.query(&expr);
            assert_eq!(r["status"], "success", "{}: {expr}: {r}", panel["title"]);
            n += 1;
        }
    }
    assert!(n >= 15);
}

#[test]
fn documented_scrape_config_is_valid() {
    let promtool = require("promtool", "prometheus");
    let cfg = bastide_tests::workspace().join("packaging/prometheus/bastide-scrape.yml");
    let dir = tempfile::tempdir().unwrap();
    // The example's token file must exist for promtool.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "/etc/prometheus/bastide.token",
        &dir.path().join("t").display().to_string(),
    );
    std::fs::write(dir.path().join("t"), "x").unwrap();
    let f = dir.path().join("p.yml");
    std::fs::write(&f, text).unwrap();
    let out = Command::new(promtool)
        .args(["check", "config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(Path::new(&cfg).exists());
}
