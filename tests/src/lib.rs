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
/// Removes the variables cargo gives a test process about the crate under test from `cmd`,
/// a nested cargo command. Build scripts that watch them (ring's
/// `rerun-if-env-changed=CARGO_MANIFEST_DIR`, ...) would see them change and rebuild half the
/// tree, here and again at the next plain build.
pub fn without_cargo_test_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
}

pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        without_cargo_test_env(&mut build);
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

/// A free port on 127.0.0.1 (TCP and UDP bound, then released), never handed out twice by
/// this process. It is taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): a port the kernel chose for `bind(0)` can be given
/// again, between its release and the daemon's bind, as the source port of one of the many
/// client connections the tests open in parallel ("Address already in use", seen in CI).
/// A blocking TCP connection to `127.0.0.1:port` from a chosen loopback source address
/// (an agent's 127.0.1.x, an attacker's 127.0.0.x): std cannot bind a client socket before
/// connecting, tokio's `TcpSocket` can.
pub fn tcp_from(src: &str, port: u16) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        let s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::net::UdpSocket;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FIRST: u16 = 10_000;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    if low > FIRST + 1_000 {
        let span = u64::from(low - FIRST);
        // Spread the test binaries (run one after the other) over the range.
        let mut x = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let port = FIRST + ((x >> 33) % span) as u16;
            if given.contains(&port) {
                continue;
            }
            let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
                && UdpSocket::bind(("127.0.0.1", port)).is_ok();
            if free {
                given.insert(port);
                return port;
            }
        }
    }
    // No room below the ephemeral range: the kernel's choice.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        if given.insert(port) {
            return port;
        }
    }
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
    /// `bastide init` in a fresh directory, with the agents and metrics endpoints on free
    /// ports.
    pub fn init(project: &str) -> Self {
        let agents = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        Self::init_with(
            project,
            &["--agents-listen", &agents, "--metrics-listen", &metrics],
        )
    }

    /// `bastide init` in a fresh directory with `args` added (none: the listeners `init`
    /// picks itself); the addresses are read from what `init` prints.
    pub fn init_with(project: &str, args: &[&str]) -> Self {
        let zone = format!("{project}.test.");
        let mut all = vec!["--project", project, "--zone", &zone];
        all.extend_from_slice(args);
        Self::init_args(&all)
    }

    /// `bastide init --join BUNDLE`: another node of the project that exported `bundle`.
    pub fn join(bundle: &Path) -> Self {
        let agents = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        Self::init_args(&[
            "--join",
            &bundle.display().to_string(),
            "--agents-listen",
            &agents,
            "--metrics-listen",
            &metrics,
        ])
    }

    fn init_args(args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bastide-test-")
            .tempdir()
            .expect("tempdir");
        let state = dir.path().join("state");
        let out = Command::new(bin("bastide"))
            .arg("init")
            .args(args)
            .arg("--dir")
            .arg(&state)
            .output()
            .expect("bastide init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout).to_string();
        let first_addr = |key: &str| -> String {
            printed
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split([',', ' ']).find(|w| !w.is_empty()))
                .unwrap_or_else(|| panic!("init printed no {key} line:\n{printed}"))
                .to_string()
        };
        let agents_addr = first_addr("agents.listen:");
        let metrics_addr = first_addr("metrics.listen:");
        let config = state.join("bastide.toml");
        let mut b = Self {
            metrics_addr,
            log: dir.path().join("bastide.log"),
            pin: String::new(),
            dir,
            config,
            agents_addr,
            child: None,
        };
        // Every agent of the tests has its own loopback address (see `Agent::new`): the
        // agent networks name loopback explicitly, as the README says tests and
        // single-machine demos must. The bastion's own 127.0.0.1 stays refused.
        b.edit_config(|c| {
            c.replacen(
                "handshake_timeout = \"10s\"\n",
                "handshake_timeout = \"10s\"\nnetworks = [\"127.0.0.0/8\"]\n",
                1,
            )
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

    /// Appends a `[store]` table naming database `db` of `pg` (no TLS, the password in a
    /// 0600 file of the state directory), with `backend` "postgres" or "sqlite" (the
    /// PostgreSQL keys then only name the target of `bastide store migrate`).
    pub fn set_postgres_store(&self, pg: &Postgres, db: &str, backend: &str) {
        let pw = self.state_dir().join("postgres.password");
        pg.write_password_file(&pw);
        let text = format!(
            "\n[store]\nbackend = {backend:?}\nurl = {:?}\npassword_file = {:?}\nsslmode = \"disable\"\n",
            pg.url(db),
            pw.display().to_string()
        );
        self.edit_config(|c| match c.find("\n[store]\n") {
            // Replace a [store] table appended before (always the last one).
            Some(i) => format!("{}{text}", &c[..i]),
            None => format!("{c}{text}"),
        });
    }
}

impl Drop for Bastion {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback address of its own for each agent of this process (127.0.1.2, 127.0.1.3...,
/// never in 127.0.0.0/24, which the bastion (127.0.0.1) and the tests' ad-hoc clients and
/// attackers (127.0.0.2, 127.0.0.9...) use): the bastion observes it as the agent's source
/// address, so its address policy is exercised as on a real network.
pub fn next_agent_ip() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // 127.0.X.Y with X in 1..=255 and Y in 2..=253: never .0, .1, .254 or .255 of a /24.
    format!("127.0.{}.{}", 1 + (n / 252) % 255, n % 252 + 2)
}

/// Enrolls `n` fresh agents (`p00`, `p01`...) at once with one `token`: how many succeeded,
/// and the agents (a single-use token must give exactly one certificate).
pub fn parallel_enrollments(b: &Bastion, token: &str, n: usize) -> (usize, Vec<Agent>) {
    let agents: Vec<Agent> = (0..n).map(|i| Agent::new(&format!("p{i:02}"))).collect();
    let children: Vec<_> = agents
        .iter()
        .map(|a| {
            a.enroll_cmd(b, token, &[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let wins = children
        .into_iter()
        .map(|mut c| c.wait().unwrap())
        .filter(|s| s.success())
        .count();
    (wins, agents)
}

/// A `bastide-agent` state directory and, once started, its process.
pub struct Agent {
    pub dir: TempDir,
    pub name: String,
    /// The agent's own address: what it advertises and connects from.
    pub ip: String,
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
        let ip = next_agent_ip();
        let mut f = std::fs::File::create(&config).expect("agent config");
        writeln!(
            f,
            "ssh_host_keys_dir = {:?}\nadvertise_addresses = [\"{ip}\"]\nsource_address = \"{ip}\"\nreconnect_initial = \"200ms\"\nreconnect_max = \"2s\"\nmetrics_interval = \"1s\"",
            ssh.display().to_string()
        )
        .expect("write agent config");
        Self {
            log: dir.path().join("agent.log"),
            name: name.to_string(),
            ip,
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
        b.edit_config(|c| c.replace(&format!("\"{old}\""), &format!("\"{new}\"")));
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
    /// Sets what the agent claims (`advertise_addresses`) and the address it connects from
    /// (`source_address`, None: the kernel's choice); takes effect at the next start.
    pub fn set_addresses(&self, claims: &[&str], source: Option<&str>) {
        let claims = claims
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        self.edit_config(|c| {
            let mut out: Vec<String> = c
                .lines()
                .filter(|l| {
                    !l.starts_with("advertise_addresses =") && !l.starts_with("source_address =")
                })
                .map(str::to_string)
                .collect();
            let mut head = vec![format!("advertise_addresses = [{claims}]")];
            if let Some(s) = source {
                head.push(format!("source_address = {s:?}"));
            }
            // Top-level keys go before any table.
            out.splice(0..0, head);
            out.join("\n") + "\n"
        });
    }

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
            // Only whole lines: the bastion may be writing the last one right now.
            out.extend(
                String::from_utf8_lossy(&b)
                    .split_inclusive('\n')
                    .filter_map(|l| l.strip_suffix('\n'))
                    .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()),
            );
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

// ---- shared by the fault tests (faults, faults_mixed, agent_logs, config_push) ----

/// Whether the tests run as root (mounts, smtp-sink's `-u`).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A Postfix smtp-sink dumping every message to its own file, killed in Drop.
pub struct Sink {
    child: Child,
}

impl Sink {
    /// Starts on 127.0.0.1:`port`, dumping into `dir` (kept across restarts of the sink).
    pub fn start(port: u16, dir: &Path) -> Sink {
        let prog = require("smtp-sink", "postfix");
        std::fs::create_dir_all(dir).expect("sink dir");
        let mut c = Command::new(prog);
        if is_root() {
            c.args(["-u", "root"]);
        }
        let child = c
            .arg("-d")
            .arg(format!("{}/%Y%m%d%H%M%S.", dir.display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn smtp-sink");
        assert!(
            wait_for(Duration::from_secs(5), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .ok())
            .is_some(),
            "smtp-sink did not start"
        );
        Sink { child }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The files smtp-sink dumped into `dir`, sorted.
pub fn sink_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Subject of every message the sink stored, with how many times it was stored.
pub fn sink_subjects(dir: &Path) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for f in sink_files(dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).to_string();
        if let Some(s) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
            *m.entry(s.trim().to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// Bastide queue ids (from its Received: header) of every stored copy, by Subject.
pub fn sink_queue_ids(
    dir: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut m: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    for f in sink_files(dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).to_string();
        let subject = text.lines().find_map(|l| l.strip_prefix("Subject: "));
        let id = text
            .split("(Bastide) with ")
            .nth(1)
            .and_then(|s| s.split(" id ").nth(1))
            .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit()).next());
        if let (Some(s), Some(id)) = (subject, id) {
            m.entry(s.trim().to_string())
                .or_default()
                .insert(id.to_string());
        }
    }
    m
}

/// One message with swaks to 127.0.0.1:`port` (from load@example.com to sink@example.org).
pub fn swaks(port: u16, args: &[&str]) -> Output {
    Command::new(require("swaks", "swaks"))
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--helo",
            "web01",
            "--timeout",
            "10",
            "--from",
            "load@example.com",
            "--to",
            "sink@example.org",
        ])
        .args(args)
        .output()
        .expect("run swaks")
}

/// stdout then stderr of a peer program.
pub fn transcript(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A tmpfs of a given size mounted on a fresh directory, unmounted in Drop. Needs root
/// (CAP_SYS_ADMIN): without it the test fails and says so.
pub struct Mount {
    dir: TempDir,
}

impl Mount {
    pub fn tmpfs(size: &str) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("bastide-fullfs-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new(require("mount", "mount"))
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "FAIL: cannot mount a {size} tmpfs for a full-disk test (root/CAP_SYS_ADMIN needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes available.
    pub fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("run df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Writes a filler file leaving about `leave` bytes free; its path.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let fill = self.free().saturating_sub(leave);
        std::fs::write(&filler, vec![7u8; fill as usize]).expect("write filler");
        filler
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

impl Bastion {
    /// Adds `[smtp]` on a free port relaying to 127.0.0.1:`sink_port` with fast retries
    /// (`smtp_extra`: more keys of the `[smtp]` table); the SMTP port.
    pub fn enable_smtp_relay(&self, sink_port: u16, smtp_extra: &str) -> u16 {
        let port = free_port();
        self.edit_config(|c| {
            format!(
                "{c}\n[smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"bastion.faults.test\"\nallow = [\"127.0.0.1/32\"]\n{smtp_extra}\n\n[smtp.relay]\nhost = \"127.0.0.1\"\nport = {sink_port}\ntls = \"none\"\ntimeout = \"3s\"\ndestination_concurrency_limit = 4\nretry_initial = \"300ms\"\nretry_max = \"1s\"\n"
            )
        });
        port
    }

    /// Turns the log store on in `dir` (default `<state>/logstore`) with `extra` keys of the
    /// `[logs]` table; the store directory.
    pub fn enable_log_store(&self, dir: Option<&Path>, extra: &str) -> PathBuf {
        let dir = dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.state_dir().join("logstore"));
        self.edit_config(|c| {
            format!(
                "{c}\n[logs]\ndir = {:?}\n{extra}\n",
                dir.display().to_string()
            )
        });
        dir
    }

    /// Messages in the mail spool (`bastide mail queue`).
    pub fn mail_queue_len(&self) -> usize {
        serde_json::from_str::<Value>(&self.cli_ok(&["mail", "queue", "--json"]))
            .ok()
            .and_then(|q| q["messages"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// The value of one series (`name{labels}` exactly as exported) on `/metrics`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = http_get(&self.metrics_addr, "/metrics", None);
        body.lines().find_map(|l| {
            l.strip_prefix(series)
                .filter(|v| v.starts_with(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }
}

/// Numbers `seq=N` found in the store for `host`, with their counts.
pub fn stored_numbers(store: &Path, host: &str) -> std::collections::BTreeMap<u64, u32> {
    let mut m = std::collections::BTreeMap::new();
    for l in log_store_lines(store, host) {
        if let Some(rest) = l.split("seq=").nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse::<u64>() {
                *m.entry(n).or_insert(0) += 1;
            }
        }
    }
    m
}

/// What is wrong with `host`'s numbers in the store, if anything, for `0..n` (all of them)
/// or, with `prefix`, for whatever prefix `0..k` is there: the first missing and repeated.
pub fn numbers_problem(store: &Path, host: &str, n: u64, prefix: bool) -> Option<String> {
    let got = stored_numbers(store, host);
    let top = if prefix {
        got.keys().next_back().map_or(0, |k| k + 1)
    } else {
        n
    };
    let missing: Vec<u64> = (0..top).filter(|i| !got.contains_key(i)).take(10).collect();
    let repeated: Vec<(&u64, &u32)> = got.iter().filter(|(_, c)| **c > 1).take(10).collect();
    let beyond = got.keys().filter(|k| **k >= top).count();
    (!missing.is_empty() || !repeated.is_empty() || beyond > 0).then(|| {
        format!(
            "{host}: {} distinct of {top}; first missing {missing:?}; repeated {repeated:?}; {beyond} beyond",
            got.len()
        )
    })
}

/// Appends lines `seq=from..to` (seven digits, padded to ~100 bytes) to `path`, `chunk` at
/// a time with a pause, calling `between(i)` after each chunk.
pub fn write_numbered(
    path: &Path,
    from: u64,
    to: u64,
    chunk: u64,
    pause: Duration,
    mut between: impl FnMut(u64),
) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open numbered file");
    let mut i = from;
    while i < to {
        let end = (i + chunk).min(to);
        let mut buf = String::new();
        for n in i..end {
            buf.push_str(&format!(
                "seq={n:07} the quick brown fox jumps over the lazy dog {}\n",
                "x".repeat(40)
            ));
        }
        f.write_all(buf.as_bytes()).expect("append numbered lines");
        i = end;
        between(i);
        std::thread::sleep(pause);
    }
}

/// An environment tree for `[config_push]` (global and project levels, one managed file
/// `ntp.conf` under `out`), at position cloud c1 / site s1 / instance prod.
pub struct EnvTree {
    pub dir: TempDir,
    pub project: String,
}

impl EnvTree {
    pub fn new(project: &str, out: &Path, file_extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bastide-env-")
            .tempdir()
            .expect("tempdir");
        let t = EnvTree {
            dir,
            project: project.to_string(),
        };
        std::fs::create_dir_all(t.project_dir().join("hosts")).expect("tree dirs");
        std::fs::create_dir_all(t.dir.path().join("templates")).expect("tree dirs");
        t.write(
            "global.toml",
            &format!(
                "[vars]\nntp = \"global.ntp\"\nsite_note = \"g\"\n\n[files.ntp]\npath = {:?}\ntemplate = \"ntp.conf.j2\"\nmode = \"0640\"\n{file_extra}\n",
                out.join("ntp.conf").display().to_string()
            ),
        );
        t.write(
            "templates/ntp.conf.j2",
            "server {{ ntp }} iburst\n# {{ agent.name }} via {{ bastion.address }}\n",
        );
        t.write_project("[vars]\nntp = \"project.ntp\"\n");
        t
    }

    pub fn project_dir(&self) -> PathBuf {
        self.dir.path().join(format!(
            "clouds/c1/sites/s1/instances/prod/projects/{}",
            self.project
        ))
    }

    /// Writes a file of the tree atomically, as git checkout or an editor's save would.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("tree dir");
        let tmp = p.with_extension("tmp~");
        std::fs::write(&tmp, text).expect("write tree file");
        std::fs::rename(&tmp, &p).expect("rename tree file");
    }

    pub fn write_project(&self, text: &str) {
        let rel = format!(
            "clouds/c1/sites/s1/instances/prod/projects/{}/project.toml",
            self.project
        );
        self.write(&rel, text);
    }

    pub fn host_file(&self, name: &str) -> PathBuf {
        self.project_dir().join(format!("hosts/{name}.toml"))
    }
}

impl Agent {
    /// Makes the agent follow `<agent dir>/app/*.log` with short batch and poll intervals
    /// (`extra`: more keys of its `[logs]` table); that directory.
    pub fn follow_logs(&self, extra: &str) -> PathBuf {
        let logs = self.dir.path().join("app");
        std::fs::create_dir_all(&logs).expect("app log dir");
        self.edit_config(|c| {
            format!(
                "{c}\n[logs]\nbatch_timeout = \"100ms\"\npoll_interval = \"50ms\"\n{extra}\n[[logs.sources]]\npath = \"{}/*.log\"\n",
                logs.display()
            )
        });
        logs
    }

    /// Bytes in the agent's on-disk log buffer (`<state>/logs/seg-*`).
    pub fn buffer_bytes(&self) -> u64 {
        std::fs::read_dir(self.state_dir().join("logs"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// `logger` (util-linux) sending `msg` to 127.0.0.1:`port`, over TCP when `tcp`.
pub fn logger_to(port: u16, tcp: bool, msg: &str) -> Output {
    Command::new(require("logger", "bsdutils"))
        .args(["-n", "127.0.0.1", "-P", &port.to_string()])
        .arg(if tcp { "-T" } else { "-d" })
        .args(["-S", "16384", "-t", "faults", msg])
        .output()
        .expect("run logger")
}

// ---- PostgreSQL (the shared registry store) ----

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`, `postgres`): the one
/// `pg_config --bindir` names if it holds them, else the newest /usr/lib/postgresql/*/bin.
/// Fails (never skips) when there is none.
pub fn postgres_bindir() -> PathBuf {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if o.status.success() && has_server(&d) {
            return d;
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let d = e.path().join("bin");
            has_server(&d).then_some((v, d))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, d)) => d,
        None => panic!(
            "PostgreSQL's server programs (initdb, pg_ctl) are required by this test: apt-get install -y postgresql"
        ),
    }
}

/// A throwaway PostgreSQL cluster: `initdb` in a temporary directory as a non-root user
/// (`nobody` when the tests run as root: the server refuses to run as root), listening on
/// 127.0.0.1 at a free port with password (SCRAM) authentication, its Unix socket in the
/// temporary directory, fsync on. Stopped (`pg_ctl stop -m fast`) in Drop.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The superuser, "bastide", and its password.
    pub user: String,
    pub password: String,
    /// PEM of the CA that signed the server's certificate, when started with TLS.
    pub ca_pem: Option<String>,
    running: bool,
    /// Server options of `pg_ctl start` (for [`Postgres::restart`]).
    opts: String,
}

impl Postgres {
    /// A cluster without TLS.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A cluster that accepts TCP connections over TLS only (`hostssl` in pg_hba.conf), its
    /// certificate for 127.0.0.1 and "localhost" signed by a CA of its own ([`Self::ca_pem`]).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let bin = postgres_bindir();
        let dir = tempfile::Builder::new()
            .prefix("bastide-pg-")
            .tempdir()
            .expect("temp dir");
        // The server's user must reach its files through this directory.
        set_mode(dir.path(), 0o755);
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).expect("socket dir");
        let password = format!(
            "pw-{:x}",
            std::process::id() as u64 * 7919 + free_port() as u64
        );
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).expect("pwfile");
        let me = Self {
            bin,
            port: free_port(),
            user: "bastide".into(),
            password,
            ca_pem: None,
            running: false,
            opts: String::new(),
            dir,
        };
        std::fs::write(me.dir.path().join("server.log"), "").expect("server.log");
        std::fs::create_dir(&data).expect("data dir");
        set_mode(&data, 0o700);
        me.chown(&data);
        me.chown(&me.dir.path().join("server.log"));
        let reachable = me
            .as_server_user(Path::new("/usr/bin/test"))
            .arg("-w")
            .arg(&data)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            reachable,
            "PostgreSQL's user cannot reach {}: every parent directory must be searchable by others (set TMPDIR to such a directory)",
            data.display()
        );
        me.chown(&sock);
        me.chown(&pwfile);
        let out = me
            .as_server_user(&me.bin.join("initdb"))
            .args(["--no-sync", "-E", "UTF8", "--locale=C", "-U", "bastide"])
            .arg("--auth-host=scram-sha-256")
            .arg("--auth-local=trust")
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data)
            .output()
            .expect("running initdb");
        assert!(out.status.success(), "initdb failed: {}", transcript(&out));
        let mut me = me;
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=on -c max_connections=200",
            me.port,
            sock.display()
        );
        if tls {
            me.ca_pem = Some(me.make_server_cert(&data));
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
            // TCP over TLS only: a client that does not use TLS is refused.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
            )
            .expect("pg_hba.conf");
            me.chown(&data.join("pg_hba.conf"));
        }
        me.opts = opts;
        me.restart();
        me
    }

    /// Starts the server (again, after [`Postgres::stop`]) on the same port and data.
    pub fn restart(&mut self) {
        self.running = true;
        let out = self
            .as_server_user(&self.bin.join("pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &self.opts])
            .output()
            .expect("running pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            transcript(&out),
            self.log_text()
        );
    }

    fn make_server_cert(&self, data: &Path) -> String {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test PostgreSQL CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server params");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let cert = params.signed_by(&key, &issuer).expect("server cert");
        let crt = data.join("server.crt");
        let k = data.join("server.key");
        std::fs::write(&crt, cert.pem()).expect("server.crt");
        std::fs::write(&k, key.serialize_pem()).expect("server.key");
        set_mode(&k, 0o600);
        self.chown(&crt);
        self.chown(&k);
        ca_cert.pem()
    }

    /// `runuser -u nobody -- program` as root, the program itself otherwise.
    fn as_server_user(&self, program: &Path) -> Command {
        if is_root() {
            let mut c = Command::new(require("runuser", "util-linux"));
            c.args(["-u", "nobody", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn chown(&self, path: &Path) {
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "nobody:"])
                .arg(path)
                .status()
                .expect("chown");
            assert!(st.success(), "chown nobody {}", path.display());
        }
    }

    /// Directory of the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// A connection URL for `dbname`, without the password.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{}@127.0.0.1:{}/{dbname}",
            self.user, self.port
        )
    }

    /// Writes the password into `path`, mode 0600 (what `[store] password_file` wants).
    pub fn write_password_file(&self, path: &Path) {
        std::fs::write(path, format!("{}\n", self.password)).expect("password file");
        set_mode(path, 0o600);
    }

    /// Runs SQL with `psql` over the Unix socket; returns its output (unaligned, tuples only).
    pub fn psql(&self, dbname: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", &self.user, "-d", dbname])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("running psql");
        assert!(out.status.success(), "psql {sql:?}: {}", transcript(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates a database and returns its name.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        name.to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server (`pg_ctl stop -m fast`).
    pub fn stop(&mut self) {
        if !std::mem::take(&mut self.running) {
            return;
        }
        let _ = self
            .as_server_user(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
