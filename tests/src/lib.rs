//! Harness for the process-level tests: builds the real `bastide` and `bastide-agent`
//! binaries once, starts them with generated configurations on free loopback ports, and
//! kills them in `Drop`. Real peers (OpenSSH, dig, swaks, rsyslog, Prometheus) are found
//! with [`require`], which fails with the Debian package to install when one is missing.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The workspace root.
pub fn workspace() -> PathBuf {
    // Read at run time first: cargo sets it for test processes, and a compiled-in path goes
    // stale when a target directory is reused from another checkout.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a workspace binary, built once per test process with the same cargo.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // `cargo test` gives the test process the package's CARGO_MANIFEST_DIR, CARGO_PKG_*
        // and so on; ring's build script reruns when CARGO_MANIFEST_DIR changes, so passing
        // them on made this build rebuild ring and everything above it (minutes), and the
        // next plain `cargo build` rebuild it all again.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k == "OUT_DIR"
                || [
                    "CARGO_MANIFEST_",
                    "CARGO_PKG_",
                    "CARGO_CRATE_",
                    "CARGO_BIN_",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .iter()
                .any(|p| k.starts_with(p))
            {
                build.env_remove(&*k);
            }
        }
        let status = build
            .current_dir(workspace())
            // The same selection as `cargo test --workspace`, so that features unify the
            // same way and this is a no-op right after that command's own build.
            .args(["build", "--quiet", "--workspace", "--bins", "--tests"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the binaries failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace().join("target"));
        target.join("debug")
    });
    dir.join(name)
}

/// Fails (never skips) when a peer program is missing, naming the package to install.
pub fn require(program: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/sbin",
        "/sbin",
        "/usr/lib/postfix/sbin",
    ]) {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("{program} is required by this test: apt-get install -y {package}");
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY-free: kill(1) does it for us, no unsafe needed.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// A plain HTTP/1.0 GET on loopback: (status, body). Enough for the bastion's endpoints and
/// Prometheus's API without pulling an HTTP client into the tests.
pub fn http_get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A `bastide` state directory and, once started, its daemon.
pub struct Bastion {
    pub dir: TempDir,
    pub config: PathBuf,
    pub agents_addr: String,
    /// Address of the `[metrics]` endpoint.
    pub metrics_addr: String,
    pub pin: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Bastion {
    /// `bastide init` in a fresh directory, with the agents endpoint on a free port.
    pub fn init(project: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bastide-test-")
            .tempdir()
            .expect("tempdir");
        let state = dir.path().join("state");
        let out = Command::new(bin("bastide"))
            .args([
                "init",
                "--project",
                project,
                "--zone",
                &format!("{project}.test."),
                "--dir",
            ])
            .arg(&state)
            .output()
            .expect("bastide init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = state.join("bastide.toml");
        let port = free_port();
        let agents_addr = format!("127.0.0.1:{port}");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut b = Self {
            metrics_addr: metrics_addr.clone(),
            log: dir.path().join("bastide.log"),
            pin: String::new(),
            dir,
            config,
            agents_addr: agents_addr.clone(),
            child: None,
        };
        b.edit_config(|c| {
            c.replace("0.0.0.0:4443", &agents_addr)
                .replace("127.0.0.1:9469", &metrics_addr)
        });
        let pin = b.cli_ok(&["ca-pin", "--dir", &state.display().to_string()]);
        b.pin = pin.trim().to_string();
        b
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        std::fs::write(&self.config, f(text)).expect("write config");
    }

    /// Starts `bastide serve` and waits until its admin socket answers.
    pub fn start(&mut self) -> &mut Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin("bastide"))
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn bastide serve");
        self.child = Some(child);
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("bastide exited early ({st}):\n{}", self.log_text());
                }
            }
            self.cli(&["agents", "list", "--json"])
                .status
                .success()
                .then_some(())
        });
        assert!(
            ready.is_some(),
            "bastide did not become ready:\n{}",
            self.log_text()
        );
        self
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(&child, 15);
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("bastide"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run bastide")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "bastide {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A fresh enrollment token.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.cli_ok(&args).trim().to_string()
    }

    pub fn agents(&self) -> Vec<Value> {
        let out = self.cli_ok(&["agents", "list", "--json"]);
        serde_json::from_str::<Value>(&out)
            .expect("agents json")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn agent(&self, name: &str) -> Option<Value> {
        self.agents().into_iter().find(|a| a["name"] == name)
    }

    /// Waits until agent `name` is in `state` (online, offline, revoked).
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> bool {
        wait_for(timeout, || {
            self.agent(name).filter(|a| a["state"] == state).map(|_| ())
        })
        .is_some()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bastion {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `bastide-agent` state directory and, once started, its process.
pub struct Agent {
    pub dir: TempDir,
    pub name: String,
    pub log: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Agent {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bastide-agent-test-")
            .tempdir()
            .expect("tempdir");
        let config = dir.path().join("agent.conf.toml");
        let ssh = dir.path().join("ssh");
        std::fs::create_dir_all(&ssh).expect("ssh dir");
        let mut f = std::fs::File::create(&config).expect("agent config");
        writeln!(
            f,
            "ssh_host_keys_dir = {:?}\nadvertise_addresses = [\"127.0.0.1\"]\nreconnect_initial = \"200ms\"\nreconnect_max = \"2s\"\nmetrics_interval = \"1s\"",
            ssh.display().to_string()
        )
        .expect("write agent config");
        Self {
            log: dir.path().join("agent.log"),
            name: name.to_string(),
            config,
            dir,
            child: None,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn enroll_cmd(&self, b: &Bastion, token: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(bin("bastide-agent"));
        c.args([
            "enroll",
            "--bastion",
            &b.agents_addr,
            "--token",
            token,
            "--ca-pin",
            &b.pin,
        ])
        .args(["--name", &self.name, "--state-dir"])
        .arg(self.state_dir())
        .args(extra);
        c
    }

    pub fn enroll(&self, b: &Bastion, token: &str) -> Output {
        self.enroll_cmd(b, token, &[]).output().expect("run enroll")
    }

    pub fn enroll_ok(&self, b: &Bastion, token: &str) {
        let out = self.enroll(b, token);
        assert!(
            out.status.success(),
            "enroll {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start(&mut self) -> &mut Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(bin("bastide-agent"))
            .args(["run", "--state-dir"])
            .arg(self.state_dir())
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
        self
    }

    /// Waits for the agent process to exit; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let st = wait_for(timeout, || child.try_wait().ok().flatten());
        if st.is_some() {
            self.child = None;
        }
        st
    }

    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(&child, 15);
        let st = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
        if st.is_none() {
            let _ = child.kill();
        }
        st
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- Hardening (fault and network-fault tests) ----

impl Bastion {
    /// Like [`Bastion::init`], with the agents endpoint on `ip` (a veth address of a test
    /// network) instead of loopback.
    pub fn init_agents_on(project: &str, ip: &str) -> Self {
        let mut b = Self::init(project);
        let new = format!("{ip}:{}", free_port());
        let old = b.agents_addr.clone();
        b.edit_config(|c| {
            c.replace(
                &format!("listen = \"{old}\""),
                &format!("listen = \"{new}\""),
            )
        });
        b.agents_addr = new;
        b
    }
}

/// `cmd` run through `prefix` (`ip netns exec NS`, `faketime -f -120s`...).
pub fn wrapped(prefix: &[&str], cmd: &Command) -> Command {
    let Some((first, rest)) = prefix.split_first() else {
        let mut c = Command::new(cmd.get_program());
        c.args(cmd.get_args());
        return c;
    };
    let mut c = Command::new(first);
    c.args(rest).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c
}

impl Agent {
    /// Enrolls through `prefix` (e.g. inside a network namespace), with `extra` arguments.
    pub fn enroll_via(&self, prefix: &[&str], b: &Bastion, token: &str, extra: &[&str]) {
        let out = wrapped(prefix, &self.enroll_cmd(b, token, extra))
            .output()
            .expect("run enroll");
        assert!(
            out.status.success(),
            "enroll {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `bastide-agent run` through `prefix`, with extra environment variables.
    pub fn start_via(&mut self, prefix: &[&str], env: &[(&str, &str)]) -> &mut Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut inner = Command::new(bin("bastide-agent"));
        inner
            .args(["run", "--state-dir"])
            .arg(self.state_dir())
            .arg("--config")
            .arg(&self.config);
        let mut c = wrapped(prefix, &inner);
        c.env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(c.spawn().expect("spawn agent"));
        self
    }
}
impl Agent {
    /// Rewrites the agent's configuration file (takes effect at the next start).
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).expect("read agent config");
        std::fs::write(&self.config, f(text)).expect("write agent config");
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Every line of a host's files in the bastion's log store (`<dir>/<host>/*.log`).
pub fn log_store_lines(store_dir: &Path, host: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(store_dir.join(host)) else {
        return out;
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    for f in files {
        if let Ok(b) = std::fs::read(&f) {
            out.extend(String::from_utf8_lossy(&b).lines().map(str::to_string));
        }
    }
    out
}
// ---- configuration push ----

impl Bastion {
    /// Turns on `[config_push]` over the tree at `dir`, position cloud c1 / site s1 /
    /// instance prod (the project is the bastion's).
    pub fn enable_config_push(&self, dir: &Path) {
        self.edit_config(|c| {
            format!(
                "{c}\n[config_push]\ndir = {:?}\ncloud = \"c1\"\nsite = \"s1\"\ninstance = \"prod\"\nbastion_address = \"127.0.0.1\"\ndebounce = \"50ms\"\n",
                dir.display().to_string()
            )
        });
    }
}

impl Agent {
    /// Appends TOML (tables) to the agent's local configuration.
    pub fn append_config(&self, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .expect("agent config");
        writeln!(f, "{text}").expect("append agent config");
    }
}
