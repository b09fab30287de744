//! `ha-failover`: two real `bastide` nodes (release build) sharing a throwaway PostgreSQL
//! cluster, N simulated agents enrolled and connected to node A that know node B too (as
//! `bastide-agent` does: on a lost session, a jittered delay in [d/2, d], then the next
//! endpoint). Node A is killed with SIGKILL; the bench prints the time from the kill until each
//! agent has its session on B (p50, p99, max) and until B lists them all online. It also runs
//! the enrollment and registration phases against a SQLite bastion with the same fleet, for
//! the PostgreSQL/SQLite ratio.
//!
//! ```text
//! cargo build --release -p bastide -p bastide-bench --bin ha-failover
//! target/release/ha-failover --agents 1000
//! ```
//!
//! PostgreSQL's server programs must be installed (`apt-get install postgresql`); the cluster
//! runs as `nobody` when the bench runs as root, in a temporary directory, trust auth on
//! 127.0.0.1 only.

use bastide_agent::session::ACK_EVERY;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bastide_agent::enroll::new_key_and_csr;
use bastide_agent::tls::{connect, enroll_config, mtls_config, PinVerifier};
use bastide_bench::{
    bastide_cli, fetch_ca, free_port, parse_duration, rustls_pem, start_bastide, Cred,
};
use bastide_proto::v1::agent_client::AgentClient;
use bastide_proto::v1::enrollment_client::EnrollmentClient;
use bastide_proto::v1::{agent_message, AgentMessage, EnrollRequest, Heartbeat, RegisterRequest};
use clap::Parser;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(about = "Failover of N simulated agents between two bastide nodes on PostgreSQL")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Enrollments / first connections in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The agents' first reconnection delay (their default is 1s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    reconnect_initial: Duration,
    #[arg(long)]
    bastide: Option<PathBuf>,
    /// Skip the SQLite comparison.
    #[arg(long)]
    no_sqlite: bool,
}

struct Pg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Pg {
    fn as_user(&self, prog: &str) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(self.bin.join(prog));
            c
        } else {
            Command::new(self.bin.join(prog))
        }
    }

    fn start() -> Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's server programs: apt-get install postgresql")?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| d.join("initdb").is_file())
            .max()
            .context("no /usr/lib/postgresql/*/bin/initdb")?;
        let dir = tempfile::Builder::new().prefix("ha-bench-pg-").tempdir()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let pg = Self {
            dir,
            bin,
            port: free_port()?,
        };
        let data = pg.dir.path().join("data");
        let st = pg
            .as_user("initdb")
            .args([
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "-U",
                "bastide",
                "--auth=trust",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("initdb failed");
        }
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c max_connections=200",
            pg.port,
            pg.dir.path().display()
        );
        let st = pg
            .as_user("pg_ctl")
            .args(["start", "-w", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.path().join("log"))
            .args(["-o", &opts])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("pg_ctl start failed");
        }
        let st = pg
            .as_user("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "bastide",
                "bastide",
            ])
            .status()?;
        if !st.success() {
            bail!("createdb failed");
        }
        Ok(pg)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self
            .as_user("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .status();
    }
}

struct Node {
    _dir: Option<tempfile::TempDir>,
    cfg: PathBuf,
    addr: String,
    state: PathBuf,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn init_node(bastide: &Path, join: Option<&Path>, store: &str) -> Result<Node> {
    let dir = tempfile::Builder::new().prefix("ha-bench-").tempdir()?;
    let state = dir.path().join("state");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let mut c = Command::new(bastide);
    c.arg("init");
    match join {
        Some(b) => c.arg("--join").arg(b),
        None => c.args(["--project", "load"]),
    };
    let out = c
        .args(["--agents-listen", &addr, "--metrics-listen", &metrics])
        .arg("--dir")
        .arg(&state)
        .output()?;
    if !out.status.success() {
        bail!("init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cfg = state.join("bastide.toml");
    let text = std::fs::read_to_string(&cfg)?
        .replace(
            "max_unauthenticated_per_address = 32",
            "max_unauthenticated_per_address = 1000000",
        )
        .replace(
            "max_unauthenticated_connections = 256",
            "max_unauthenticated_connections = 1000000",
        );
    std::fs::write(&cfg, format!("{text}\n{store}"))?;
    let log = dir.path().join("bastide.log");
    let child = start_bastide(bastide, &cfg, &log, Duration::from_secs(30))?;
    Ok(Node {
        _dir: Some(dir),
        cfg,
        addr,
        state,
        child: Some(child),
    })
}

async fn enroll_all(
    n: usize,
    conc: usize,
    addr: &str,
    pin: &str,
    token: &str,
) -> Result<Vec<Cred>> {
    let sem = Arc::new(Semaphore::new(conc));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let sem = sem.clone();
        let (addr, pin, token) = (addr.to_string(), pin.to_string(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            let name = format!("ha{i:05}");
            let (key, csr) = new_key_and_csr(&name)?;
            let ch = connect(
                &addr,
                "127.0.0.1",
                enroll_config(Arc::new(PinVerifier::new(pin)))?,
            )
            .await?;
            let resp = EnrollmentClient::new(ch)
                .enroll(EnrollRequest {
                    token,
                    name: name.clone(),
                    csr_der: csr,
                    agent_version: "ha-bench".into(),
                })
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>(Cred {
                name,
                cert_pem: resp.certificate_pem,
                key_pem: key.serialize_pem(),
            })
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// When node A was killed, and each agent's time from then to its session on B.
static KILLED: OnceLock<Instant> = OnceLock::new();
static MOVED: Mutex<Vec<Duration>> = Mutex::new(Vec::new());

/// A simulated agent: holds a session with heartbeats, moves to the next endpoint after a
/// jittered delay when it is lost. `first` is signalled at its first session.
async fn agent(
    c: Cred,
    endpoints: Vec<String>,
    ca: rustls_pem::Cert,
    initial: Duration,
    first: Arc<Semaphore>,
    first_permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    let (chain, key) = rustls_pem::parse(&c.cert_pem, &c.key_pem)?;
    let cfg = mtls_config(ca, chain, key)?;
    let mut i = 0usize;
    let mut permit = Some(first_permit);
    let mut delay = initial;
    loop {
        let ep = &endpoints[i % endpoints.len()];
        let r: Result<()> = async {
            let ch = connect(ep, "127.0.0.1", cfg.clone()).await?;
            let mut client = AgentClient::new(ch);
            client
                .register(RegisterRequest {
                    claimed_name: c.name.clone(),
                    hostname: c.name.clone(),
                    addresses: vec!["127.0.0.1".into()],
                    os: "ha-bench".into(),
                    agent_version: "ha-bench".into(),
                    ssh_host_keys: vec![],
                    config_revision: String::new(),
                })
                .await?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut inbound = client
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            delay = initial;
            if let Some(k) = KILLED.get() {
                if let Ok(mut m) = MOVED.lock() {
                    m.push(k.elapsed());
                }
            }
            if permit.take().is_some() {
                first.add_permits(1);
            }
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            let mut seq = 0;
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(_)) => {}
                        _ => bail!("session lost"),
                    },
                    _ = tick.tick() => {
                        seq += 1;
                        let hb = AgentMessage { kind: Some(agent_message::Kind::Heartbeat(Heartbeat { seq, agent_time_unix: 0, no_ack: seq % ACK_EVERY != 1 })) };
                        if tx.send(hb).await.is_err() {
                            bail!("session closed");
                        }
                    }
                }
            }
        }
        .await;
        if r.is_ok() {
            return Ok(());
        }
        // As bastide-agent: a delay drawn in [d/2, d], then the next endpoint.
        let half = delay / 2;
        tokio::time::sleep(half + half.mul_f64(rand::random::<f64>())).await;
        delay = (delay * 2).min(Duration::from_secs(60));
        i += 1;
    }
}

fn online(bastide: &Path, cfg: &Path, node: Option<&str>) -> usize {
    let Ok(text) = bastide_cli(bastide, cfg, &["agents", "list", "--json"]) else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["state"] == "online" && node.is_none_or(|n| x["node"] == n))
                .count()
        })
        .unwrap_or(0)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64()
}

/// Enrolls and connects the fleet to `nodes[0]`; returns (enroll, connect+register) times.
async fn fleet(
    args: &Args,
    bastide: &Path,
    nodes: &[&Node],
) -> Result<(Duration, Duration, Vec<tokio::task::JoinHandle<Result<()>>>)> {
    let a = nodes[0];
    let cli = |x: &[&str]| bastide_cli(bastide, &a.cfg, x);
    let pin = cli(&["ca-pin", "--dir", &a.state.display().to_string()])?;
    let token = cli(&[
        "token",
        "create",
        "--uses",
        &args.agents.to_string(),
        "--ttl",
        "2h",
    ])?;
    let t0 = Instant::now();
    let creds = enroll_all(
        args.agents,
        args.concurrency,
        &a.addr,
        pin.trim(),
        token.trim(),
    )
    .await?;
    let enroll = t0.elapsed();
    let ca = fetch_ca(&a.addr, pin.trim()).await?;
    let endpoints: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let done = Arc::new(Semaphore::new(0));
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for c in creds {
        let p = gate.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(agent(
            c,
            endpoints.clone(),
            ca.clone(),
            args.reconnect_initial,
            done.clone(),
            p,
        )));
    }
    let _all = done.acquire_many(args.agents as u32).await?;
    Ok((enroll, t1.elapsed(), tasks))
}

fn main() -> Result<()> {
    let args = Args::parse();
    bastide_agent::tls::install_crypto_provider();
    let bastide = args
        .bastide
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/release/bastide"));
    if !bastide.is_file() {
        bail!(
            "{} not found: cargo build --release -p bastide",
            bastide.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let n = args.agents;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();

    let sqlite = if args.no_sqlite {
        None
    } else {
        let s = init_node(&bastide, None, "")?;
        let (e, r, tasks) = rt.block_on(fleet(&args, &bastide, &[&s]))?;
        for t in tasks {
            t.abort();
        }
        drop(s);
        Some((e, r))
    };

    let pg = Pg::start()?;
    let store = format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://bastide@127.0.0.1:{}/bastide\"\nsslmode = \"disable\"\n",
        pg.port
    );
    let mut a = init_node(&bastide, None, &format!("{store}node = \"a\"\n"))?;
    let bundle = a.state.join("identity.json");
    bastide_cli(
        &bastide,
        &a.cfg,
        &["export-identity", "--out", &bundle.display().to_string()],
    )?;
    let b = init_node(&bastide, Some(&bundle), &format!("{store}node = \"b\"\n"))?;
    let (enroll, register, tasks) = rt.block_on(fleet(&args, &bastide, &[&a, &b]))?;
    let t = Instant::now();
    while online(&bastide, &a.cfg, Some("a")) < n {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the fleet did not come online on A");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // kill -9 of A.
    let _ = KILLED.set(Instant::now());
    if let Some(mut c) = a.child.take() {
        c.kill()?;
        let _ = c.wait();
    }
    let killed = *KILLED.get().context("kill time")?;
    let all_sessions = loop {
        let m = MOVED.lock().map(|m| m.len()).unwrap_or(0);
        if m >= n {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(300) {
            bail!("only {m} of {n} agents moved in 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let listed = loop {
        if online(&bastide, &b.cfg, Some("b")) >= n {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(300) {
            bail!("B never listed the whole fleet online");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut moved = MOVED.lock().map(|m| m.clone()).unwrap_or_default();
    moved.sort();
    for t in tasks {
        t.abort();
    }
    println!(
        "agents                       {n} (reconnect_initial {:?})",
        args.reconnect_initial
    );
    println!(
        "failover (kill -9 to session on B)  p50 {:.2} s  p99 {:.2} s  max {:.2} s  (all sessions {:.2} s)",
        pct(&moved, 0.50),
        pct(&moved, 0.99),
        pct(&moved, 1.0),
        all_sessions.as_secs_f64()
    );
    println!("B lists all online@b after   {:.2} s", listed.as_secs_f64());
    println!(
        "PostgreSQL: enroll {:.0}/s, connect+register {:.0}/s",
        rate(enroll),
        rate(register)
    );
    if let Some((e, r)) = sqlite {
        println!(
            "SQLite:     enroll {:.0}/s, connect+register {:.0}/s  (PostgreSQL/SQLite: enroll {:.2}x, register {:.2}x)",
            rate(e),
            rate(r),
            e.as_secs_f64() / enroll.as_secs_f64(),
            r.as_secs_f64() / register.as_secs_f64()
        );
    }
    drop(b);
    drop(a);
    drop(pg);
    Ok(())
}
