//! Load tool: starts a real `bastide` (release build), enrolls N simulated agents through the
//! real enrollment RPC (one TLS connection each, pin checked), connects them all over mutual
//! TLS with a session stream and heartbeats, then reports enrollment time, bastion RSS and
//! the bastion's CPU spent on heartbeats. Everything runs on loopback.
//!
//! Other benchmarks reuse it through `--hold` (keep the fleet connected and print the config
//! path) to measure their own services against a large fleet.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bastide_agent::enroll::new_key_and_csr;
use bastide_agent::session::ACK_EVERY;
use bastide_agent::tls::{connect, enroll_config, mtls_config, PinVerifier};
use bastide_bench::{
    bastide_cli, clk_tck, fetch_ca, free_port, parse_duration, start_bastide, synthetic_batch, Cred,
};
use bastide_proto::v1::agent_client::AgentClient;
use bastide_proto::v1::enrollment_client::EnrollmentClient;
use bastide_proto::v1::{agent_message, AgentMessage, EnrollRequest, Heartbeat, RegisterRequest};
use clap::Parser;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(about = "Enroll and connect N simulated agents against a real bastide")]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Concurrent enrollments / connections in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Heartbeat interval the bastion asks for.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Window over which the bastion's heartbeat CPU is measured.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    window: Duration,
    /// The bastide binary (build it with `cargo build --release -p bastide`).
    #[arg(long)]
    bastide: Option<PathBuf>,
    /// Keep the fleet connected after measuring until Ctrl-C.
    #[arg(long)]
    hold: bool,
    /// Host metric series each agent ships once connected (0: none); the bench then times
    /// scrapes of /metrics/agents.
    #[arg(long, default_value_t = 0)]
    metrics_series: usize,
    /// Configuration push: serve an environment tree, have every simulated agent ACK what it
    /// is pushed, then time N changes of the tree until every agent got the new revision.
    #[arg(long, default_value_t = 0)]
    config_rounds: usize,
    /// Where the tree of --config-rounds comes from: `dir` (watched on disk), `git-webhook`
    /// or `git-poll` (a bare repository on disk followed over file://, commits signed with
    /// an ssh-keygen key and verified; each round times from `git push` to the last ACK; the
    /// webhook is called right after the push, as a git server does). With `git-webhook`,
    /// `bastide config plan` of a new commit is timed too.
    #[arg(long, default_value = "dir")]
    config_source: String,
    /// Restart storm: once all agents are online, restart the bastion this way (`kill`:
    /// SIGKILL, `graceful`: SIGTERM and wait for its exit) and time until every agent is
    /// online again; `--restarts` times. Simulated agents reconnect as the agent does
    /// (its backoff, from `reconnect_initial` 1 s to `reconnect_max` 60 s).
    #[arg(long)]
    restart: Option<String>,
    /// How many restarts with `--restart`.
    #[arg(long, default_value_t = 3)]
    restarts: usize,
    /// Run the fleet against an already running bastion at this address instead of starting
    /// one (with `--pin` and `--token`); prints `fleet online K` when the count of open
    /// sessions changes, and runs until killed or stdin closes. Used by the process tests.
    #[arg(long)]
    attach: Option<String>,
    #[arg(long, requires = "attach")]
    pin: Option<String>,
    #[arg(long, requires = "attach")]
    token: Option<String>,
    /// Memory breakdown: agents connect and register but open no session stream (what a
    /// TLS + HTTP/2 connection costs the bastion alone). They count as online fleet-side.
    #[arg(long)]
    no_session: bool,
    /// One heartbeat in N asks for an acknowledgement, as the agent does (1: every one, as
    /// agents before 0.1 of December 2026 did).
    #[arg(long, default_value_t = ACK_EVERY)]
    ack_every: u64,
    /// Name prefix of the simulated agents.
    #[arg(long, default_value = "load")]
    prefix: String,
}

/// Sessions open on the fleet's side, and connection attempts made after the first.
static FLEET_ONLINE: AtomicU64 = AtomicU64::new(0);
static RECONNECTS: AtomicU64 = AtomicU64::new(0);
static NO_SESSION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ACK_EVERY_N: AtomicU64 = AtomicU64::new(ACK_EVERY);
/// What the fleet registers as host name after its agent name (`--attach`: changed by a
/// `hostname SUFFIX` line on stdin), so that a test can tell which registration a store
/// holds.
static HOSTNAME_SUFFIX: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
/// Connection attempts (connect, register, open the session) that took over 30 s.
static STALLED: AtomicU64 = AtomicU64::new(0);

/// A git source for the config rounds: the work tree is the environment directory.
struct GitBench {
    keys: PathBuf,
    bare: PathBuf,
    webhook: Option<(String, String)>,
}

impl GitBench {
    fn git(&self, dir: &std::path::Path, args: &[&str]) -> Result<String> {
        let key = format!("user.signingkey={}", self.keys.join("k").display());
        let o = Command::new("git")
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HOME", &self.keys)
            .args([
                "-c",
                "user.name=b",
                "-c",
                "user.email=b@x",
                "-c",
                "gpg.format=ssh",
                "-c",
            ])
            .arg(key)
            .args(args)
            .output()
            .context("git (apt-get install git)")?;
        if !o.status.success() {
            bail!("git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    fn setup(root: &std::path::Path, env: &std::path::Path, webhook: bool) -> Result<Self> {
        let keys = root.join("keys");
        std::fs::create_dir_all(&keys)?;
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
            .arg(keys.join("k"))
            .status()?;
        if !st.success() {
            bail!("ssh-keygen failed");
        }
        let pubkey = std::fs::read_to_string(keys.join("k.pub"))?;
        let mut p = pubkey.split_whitespace();
        std::fs::write(
            keys.join("signers"),
            format!(
                "bench {} {}\n",
                p.next().unwrap_or(""),
                p.next().unwrap_or("")
            ),
        )?;
        let bare = root.join("env.git");
        std::fs::create_dir_all(&bare)?;
        let secret = keys.join("hook");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&secret)?
                .write_all(b"bench-secret\n")?;
        }
        let g = GitBench {
            keys,
            bare: bare.clone(),
            webhook: webhook.then(|| {
                (
                    format!("127.0.0.1:{}", free_port().unwrap_or(9471)),
                    secret.display().to_string(),
                )
            }),
        };
        g.git(&bare, &["init", "-q", "--bare", "-b", "main"])?;
        g.git(env, &["init", "-q", "-b", "main"])?;
        g.commit(env)?;
        g.push(env)?;
        Ok(g)
    }

    fn commit(&self, env: &std::path::Path) -> Result<String> {
        self.git(env, &["add", "-A"])?;
        self.git(env, &["commit", "-q", "-S", "--allow-empty", "-m", "round"])?;
        self.git(env, &["rev-parse", "HEAD"])
    }

    fn push(&self, env: &std::path::Path) -> Result<()> {
        let bare = self.bare.display().to_string();
        self.git(
            env,
            &["push", "-q", "--force", &bare, "HEAD:refs/heads/main"],
        )?;
        Ok(())
    }

    fn config(&self) -> String {
        let (poll, hook) = match &self.webhook {
            Some((listen, secret)) => (
                "1h",
                format!("webhook = {{ listen = {listen:?}, secret_file = {secret:?} }}\n"),
            ),
            None => ("1s", String::new()),
        };
        format!(
            "[config_push.git]\nurl = \"file://{}\"\npoll_interval = \"{poll}\"\nallowed_signers = {:?}\n{hook}",
            self.bare.display(),
            self.keys.join("signers").display().to_string()
        )
    }

    /// Calls the webhook as GitLab does.
    fn call_hook(&self) -> Result<()> {
        use std::io::{Read, Write};
        let Some((listen, _)) = &self.webhook else {
            return Ok(());
        };
        let body = r#"{"ref":"refs/heads/main"}"#;
        let mut s = std::net::TcpStream::connect(listen)?;
        write!(
            s,
            "POST /hooks/config HTTP/1.0\r\nHost: x\r\nX-Gitlab-Token: bench-secret\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        if !r.starts_with("HTTP/1.0 202") && !r.starts_with("HTTP/1.1 202") {
            bail!("webhook: {r}");
        }
        Ok(())
    }
}

/// When each simulated agent received a configuration push (this round).
static PUSHES: std::sync::Mutex<Vec<Instant>> = std::sync::Mutex::new(Vec::new());

fn write_tree(env: &std::path::Path, round: usize) -> Result<()> {
    let proj = env.join("clouds/c/sites/s/instances/i/projects/load");
    std::fs::create_dir_all(&proj)?;
    std::fs::create_dir_all(env.join("templates"))?;
    std::fs::write(
        env.join("global.toml"),
        "[vars]\nntp = [\"a.pool\", \"b.pool\"]\n[files.chrony]\npath = \"/etc/chrony/chrony.conf\"\ntemplate = \"chrony.j2\"\non_change = \"chrony\"\n[files.resolv]\npath = \"/etc/resolv.conf\"\ncontent = \"nameserver {{ bastion.address }}\\nsearch {{ agent.name }}.load\\n\"\n[agent]\nmetrics_interval = \"15s\"\n",
    )?;
    std::fs::write(
        env.join("templates/chrony.j2"),
        "# round {{ round }} for {{ agent.name }} ({{ agent.addresses | join(',') }})\n{% for s in ntp %}server {{ s }} iburst\n{% endfor %}{% for i in range(20) %}# filler line {{ i }} {{ agent.name }}\n{% endfor %}",
    )?;
    let tmp = proj.join(".project.toml.tmp");
    std::fs::write(&tmp, format!("[vars]\nround = {round}\n"))?;
    std::fs::rename(&tmp, proj.join("project.toml"))?;
    Ok(())
}

/// (RSS bytes, CPU ticks) of a process from /proc.
fn proc_usage(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, utime 11, stime 12.
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok((rss_kb * 1024, ticks))
}

fn main() -> Result<()> {
    let args = Args::parse();
    bastide_agent::tls::install_crypto_provider();
    NO_SESSION.store(args.no_session, Ordering::Relaxed);
    ACK_EVERY_N.store(args.ack_every.max(1), Ordering::Relaxed);
    if let Some(addr) = &args.attach {
        return attach(&args, addr);
    }
    let root = std::env::current_dir()?;
    let bastide = args
        .bastide
        .clone()
        .unwrap_or_else(|| root.join("target/release/bastide"));
    if !bastide.is_file() {
        bail!(
            "{} not found: run `cargo build --release -p bastide` first",
            bastide.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let out = Command::new(&bastide)
        .args(["init", "--project", "load"])
        .args(["--agents-listen", &addr, "--metrics-listen", &metrics_addr])
        .arg("--dir")
        .arg(&state)
        .output()?;
    if !out.status.success() {
        bail!("init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cfg = state.join("bastide.toml");
    let env = dir.path().join("env");
    if args.config_rounds > 0 {
        write_tree(&env, 0)?;
    }
    let text = std::fs::read_to_string(&cfg)?
        // The whole simulated fleet dials from 127.0.0.1: lift the per-source bounds meant
        // for strangers' certificate-less connections.
        .replace(
            "max_unauthenticated_per_address = 32",
            "max_unauthenticated_per_address = 1000000",
        )
        .replace(
            "max_unauthenticated_connections = 256",
            "max_unauthenticated_connections = 1000000",
        )
        .replace(
            "heartbeat_interval = \"10s\"",
            &format!(
                "heartbeat_interval = \"{}s\"",
                args.heartbeat.as_secs().max(1)
            ),
        )
        .replace(
            "heartbeat_timeout = \"35s\"",
            &format!(
                "heartbeat_timeout = \"{}s\"",
                args.heartbeat.as_secs().max(1) * 4
            ),
        );
    let git = match args.config_source.as_str() {
        "dir" => None,
        "git-webhook" | "git-poll" if args.config_rounds > 0 => Some(GitBench::setup(
            dir.path(),
            &env,
            args.config_source == "git-webhook",
        )?),
        other => {
            bail!("--config-source {other:?}: dir, git-webhook or git-poll (with --config-rounds)")
        }
    };
    let text = match (&git, args.config_rounds > 0) {
        (Some(g), true) => format!(
            "{text}\n[config_push]\ncloud = \"c\"\nsite = \"s\"\ninstance = \"i\"\nbastion_address = \"127.0.0.1\"\n\n{}",
            g.config()
        ),
        (None, true) => format!(
            "{text}\n[config_push]\ndir = {:?}\ncloud = \"c\"\nsite = \"s\"\ninstance = \"i\"\nbastion_address = \"127.0.0.1\"\n",
            env.display().to_string()
        ),
        _ => text,
    };
    std::fs::write(&cfg, text)?;
    let mut child = start_bastide(
        &bastide,
        &cfg,
        &dir.path().join("bastide.log"),
        Duration::from_secs(20),
    )?;
    let pid = child.id();
    let cli = |a: &[&str]| bastide_cli(&bastide, &cfg, a);
    let pin = cli(&["ca-pin", "--dir", &state.display().to_string()])?;
    let token = cli(&[
        "token",
        "create",
        "--uses",
        &args.agents.to_string(),
        "--ttl",
        "2h",
    ])?;
    let (rss0, _) = proc_usage(pid)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(drive(&args, &addr, &pin, &token, pid, &cli, rss0));
    let result = match (&args.restart, result) {
        (Some(mode), Ok(())) => restarts(&args, mode, &mut child, &bastide, &cfg, dir.path()),
        (_, r) => r,
    };
    let result = result.and_then(|()| {
        if args.config_rounds > 0 {
            config_bench(&args, &env, &cli, &metrics_addr, git.as_ref())?;
        }
        if args.metrics_series > 0 {
            scrape_bench(&metrics_addr, args.agents)
        } else {
            Ok(())
        }
    });
    if args.hold && result.is_ok() {
        println!("holding the fleet; bastion config: {}", cfg.display());
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn drive(
    args: &Args,
    addr: &str,
    pin: &str,
    token: &str,
    pid: u32,
    cli: &dyn Fn(&[&str]) -> Result<String>,
    rss0: u64,
) -> Result<()> {
    let n = args.agents;
    let sem = Arc::new(Semaphore::new(args.concurrency));

    // 1. Enroll N agents through the real RPC.
    let t0 = Instant::now();
    let creds = enroll_all(args, addr, pin, token).await?;
    let enroll_time = t0.elapsed();

    // 2. Connect all of them with a session stream and heartbeats.
    let acks = Arc::new(AtomicU64::new(0));
    let t1 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let ca = fetch_ca(addr, pin).await?;
    for c in creds {
        let sem = sem.clone();
        let addr = addr.to_string();
        let ca = ca.clone();
        let acks = acks.clone();
        let hb = args.heartbeat;
        let series = args.metrics_series;
        conns.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await?;
            agent_loop(c, addr, ca, acks, hb, series, permit).await
        }));
    }
    // Wait until the bastion sees them all online.
    let online = loop {
        // While thousands register (an fsync each), the daemon may not answer within the
        // CLI's 5 s: ask again rather than give up.
        let list: serde_json::Value = match cli(&["agents", "list", "--json"]) {
            Ok(text) => serde_json::from_str(&text)?,
            Err(_) if t1.elapsed() < Duration::from_secs(600) => serde_json::Value::Null,
            Err(e) => return Err(e),
        };
        let online = if args.no_session {
            FLEET_ONLINE.load(Ordering::Relaxed) as usize
        } else {
            list.as_array()
                .map(|a| a.iter().filter(|x| x["state"] == "online").count())
                .unwrap_or(0)
        };
        if online >= n || t1.elapsed() > Duration::from_secs(600) {
            break online;
        }
        if let Some(f) = conns.iter().position(|c| c.is_finished()) {
            let t = conns.remove(f);
            t.await??;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let connect_time = t1.elapsed();
    // Let heartbeats settle into their steady spread, then measure.
    tokio::time::sleep(args.heartbeat).await;
    let (rss1, ticks0) = proc_usage(pid)?;
    let acks0 = acks.load(Ordering::Relaxed);
    tokio::time::sleep(args.window).await;
    let (rss2, ticks1) = proc_usage(pid)?;
    let acks1 = acks.load(Ordering::Relaxed);
    let cpu_pct = (ticks1 - ticks0) as f64 / clk_tck() / args.window.as_secs_f64() * 100.0;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("agents                 {n} (online {online})");
    println!(
        "enroll                 {:.2} s ({:.0} enrollments/s)",
        enroll_time.as_secs_f64(),
        n as f64 / enroll_time.as_secs_f64()
    );
    println!("connect+register       {:.2} s", connect_time.as_secs_f64());
    println!(
        "bastion RSS            {:.1} MiB idle, {:.1} MiB with {n} agents ({:.1} KiB/agent)",
        mib(rss0),
        mib(rss1.max(rss2)),
        (rss1.max(rss2) - rss0) as f64 / 1024.0 / n as f64
    );
    println!(
        "heartbeats             {} acks in {:.0} s (interval {} s)",
        acks1 - acks0,
        args.window.as_secs_f64(),
        args.heartbeat.as_secs()
    );
    println!(
        "bastion CPU            {:.2} % of one core ({:.3} % per 1,000 agents)",
        cpu_pct,
        cpu_pct * 1000.0 / n as f64
    );
    if online < n {
        bail!("only {online} of {n} agents came online");
    }
    Ok(())
}

/// Enrolls `--agents` agents through the real RPC, `--concurrency` at a time.
async fn enroll_all(args: &Args, addr: &str, pin: &str, token: &str) -> Result<Vec<Cred>> {
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let sem = sem.clone();
        let (addr, pin, token) = (addr.to_string(), pin.to_string(), token.to_string());
        let name = format!("{}{i:05}", args.prefix);
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            let (key, csr) = new_key_and_csr(&name)?;
            let verifier = Arc::new(PinVerifier::new(pin));
            let ch = connect(&addr, "127.0.0.1", enroll_config(verifier)?).await?;
            let resp = EnrollmentClient::new(ch)
                .enroll(EnrollRequest {
                    token,
                    name: name.clone(),
                    csr_der: csr,
                    agent_version: "load".into(),
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
    let mut creds = Vec::with_capacity(args.agents);
    for t in tasks {
        creds.push(t.await??);
    }
    Ok(creds)
}

/// CPU ticks (user + system) of this process.
fn self_ticks() -> u64 {
    proc_usage(std::process::id()).map(|(_, t)| t).unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Restarts the bastion `--restarts` times (`kill`: SIGKILL; `graceful`: SIGTERM, then its
/// exit) and times each until every agent is online again, as the fleet sees it (sessions
/// open) and as the bastion does (`agents list`).
fn restarts(
    args: &Args,
    mode: &str,
    child: &mut std::process::Child,
    bastide: &std::path::Path,
    cfg: &std::path::Path,
    dir: &std::path::Path,
) -> Result<()> {
    let n = args.agents as u64;
    let tck = clk_tck();
    let mut alls = Vec::new();
    for round in 1..=args.restarts {
        // Settle: all online, quiet.
        std::thread::sleep(Duration::from_secs(2));
        let load = loadavg();
        let fleet0 = self_ticks();
        let reconnects0 = RECONNECTS.load(Ordering::Relaxed);
        let t0 = Instant::now();
        match mode {
            "kill" => child.kill()?,
            "graceful" => {
                let st = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()?;
                if !st.success() {
                    bail!("kill -TERM failed");
                }
            }
            other => bail!("--restart {other:?}: kill or graceful"),
        }
        child.wait()?;
        let down = t0.elapsed();
        // The fleet noticed (sockets closed by the kernel or by the bastion).
        while FLEET_ONLINE.load(Ordering::Relaxed) >= n && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        *child = start_bastide(
            bastide,
            cfg,
            &dir.join(format!("bastide-restart{round}.log")),
            Duration::from_secs(60),
        )?;
        let started = t0.elapsed();
        let mut fleet_all = None;
        let all = loop {
            if t0.elapsed() > Duration::from_secs(600) {
                bail!(
                    "restart {round}: only {} of {n} agents back after 600 s",
                    FLEET_ONLINE.load(Ordering::Relaxed)
                );
            }
            if FLEET_ONLINE.load(Ordering::Relaxed) >= n {
                fleet_all.get_or_insert(t0.elapsed());
                let online = bastide_cli(bastide, cfg, &["agents", "list", "--json"])
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| {
                        v.as_array()
                            .map(|a| a.iter().filter(|x| x["state"] == "online").count())
                    })
                    .unwrap_or(0) as u64;
                if online >= n {
                    break t0.elapsed();
                }
            } else {
                fleet_all = None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let fleet_all = fleet_all.unwrap_or(all);
        let storm = fleet_all.saturating_sub(started).as_secs_f64().max(0.001);
        let (rss, bastion_ticks) = proc_usage(child.id())?;
        let fleet_ticks = self_ticks() - fleet0;
        println!(
            "restart {round} ({mode}, {n} agents, load {load}): stopped in {:.2} s, ready {:.2} s, all online {:.2} s after the {}, {:.2} s after start (bastion: {:.2} s); bastion CPU {:.0} % of a core since start, fleet CPU {:.0} %; {} reconnection attempts ({} stalled over 30 s); RSS {:.0} MiB",
            down.as_secs_f64(),
            started.as_secs_f64(),
            fleet_all.as_secs_f64(),
            if mode == "kill" { "kill" } else { "SIGTERM" },
            storm,
            all.as_secs_f64(),
            bastion_ticks as f64 / tck / fleet_all.saturating_sub(down).as_secs_f64().max(0.001) * 100.0,
            fleet_ticks as f64 / tck / fleet_all.as_secs_f64().max(0.001) * 100.0,
            RECONNECTS.load(Ordering::Relaxed) - reconnects0,
            STALLED.load(Ordering::Relaxed),
            rss as f64 / (1024.0 * 1024.0),
        );
        alls.push(fleet_all);
    }
    alls.sort();
    println!(
        "restart storm ({mode}, {n} agents, median of {}): all online {:.2} s after the {}",
        alls.len(),
        alls[alls.len() / 2].as_secs_f64(),
        if mode == "kill" { "kill" } else { "SIGTERM" },
    );
    Ok(())
}

/// `--attach`: enroll and run the fleet against a bastion started by someone else (the
/// process tests), printing the count of open sessions when it changes.
fn attach(args: &Args, addr: &str) -> Result<()> {
    let pin = args.pin.clone().context("--pin")?;
    let token = args.token.clone().context("--token")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let creds = enroll_all(args, addr, &pin, &token).await?;
        let ca = fetch_ca(addr, &pin).await?;
        let sem = Arc::new(Semaphore::new(args.concurrency));
        let acks = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for c in creds {
            let permit = sem.clone().acquire_owned().await?;
            tasks.spawn(agent_loop(
                c,
                addr.to_string(),
                ca.clone(),
                acks.clone(),
                args.heartbeat,
                0,
                permit,
            ));
        }
        // Ends with stdin (the test that started us is gone) or a failed agent; a line
        // `hostname SUFFIX` changes what later registrations report.
        let (eof_tx, mut eof) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if let Some(sfx) = line.strip_prefix("hostname ") {
                    if let Ok(mut s) = HOSTNAME_SUFFIX.lock() {
                        *s = sfx.trim().to_string();
                    }
                }
            }
            let _ = eof_tx.send(());
        });
        let mut last = u64::MAX;
        loop {
            let now = FLEET_ONLINE.load(Ordering::Relaxed);
            if now != last {
                use std::io::Write;
                println!("fleet online {now}");
                std::io::stdout().flush()?;
                last = now;
            }
            tokio::select! {
                _ = &mut eof => return Ok(()),
                Some(r) = tasks.join_next() => r??,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
}

/// One simulated agent for as long as the fleet runs: connects, registers, opens its
/// session and heartbeats; when the session ends it reconnects as `bastide-agent` does
/// (`Backoff` from 1 s to 60 s, reset after a registered session). `permit` bounds the
/// first connection only: reconnections after a restart come all at once, as a real
/// fleet's.
async fn agent_loop(
    c: Cred,
    addr: String,
    ca: bastide_bench::rustls_pem::Cert,
    acks: Arc<AtomicU64>,
    hb: Duration,
    series: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    use bastide_agent::backoff::Backoff;
    use bastide_proto::v1::{bastion_message, ConfigResult};
    let (chain, key) = bastide_bench::rustls_pem::parse(&c.cert_pem, &c.key_pem)?;
    let cfg = mtls_config(ca, chain, key)?;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut permit = Some(permit);
    let mut first = true;
    loop {
        if !first {
            RECONNECTS.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        // Bounded, so that a connection lost half-way through cannot hold an agent forever.
        let session = tokio::time::timeout(Duration::from_secs(30), async {
            let ch = connect(&addr, "127.0.0.1", cfg.clone()).await?;
            let mut client = AgentClient::new(ch);
            client
                .register(RegisterRequest {
                    claimed_name: c.name.clone(),
                    hostname: format!(
                        "{}{}",
                        c.name,
                        HOSTNAME_SUFFIX
                            .lock()
                            .map(|s| s.clone())
                            .unwrap_or_default()
                    ),
                    addresses: vec!["127.0.0.1".into()],
                    os: "load".into(),
                    agent_version: "load".into(),
                    ssh_host_keys: vec![],
                    config_revision: String::new(),
                })
                .await?;
            if NO_SESSION.load(Ordering::Relaxed) {
                FLEET_ONLINE.fetch_add(1, Ordering::Relaxed);
                let _hold = client.clone();
                std::future::pending::<()>().await;
            }
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let inbound = client
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>((tx, inbound))
        })
        .await;
        let (tx, mut inbound) = match session {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => {
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            Err(_) => {
                STALLED.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        drop(permit.take());
        FLEET_ONLINE.fetch_add(1, Ordering::Relaxed);
        if series > 0 {
            let _ = tx
                .send(AgentMessage {
                    kind: Some(agent_message::Kind::Metrics(synthetic_batch(series))),
                })
                .await;
        }
        // Spread heartbeats over the interval, as real agents started at random times.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + hb.mul_f64(rand::random::<f64>()),
            hb,
        );
        let mut seq = 0;
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => match m.kind {
                        Some(bastion_message::Kind::Config(p)) => {
                            if let Ok(mut v) = PUSHES.lock() {
                                v.push(Instant::now());
                            }
                            let ack = AgentMessage {
                                kind: Some(agent_message::Kind::ConfigResult(ConfigResult {
                                    revision: p.revision,
                                    ok: true,
                                    ..Default::default()
                                })),
                            };
                            let _ = tx.send(ack).await;
                        }
                        _ => {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    _ => break,
                },
                _ = tick.tick() => {
                    seq += 1;
                    let m = AgentMessage {
                        kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                            seq,
                            agent_time_unix: 0,
                            no_ack: {
                                let every = ACK_EVERY_N.load(Ordering::Relaxed);
                                every > 1 && seq % every != 1
                            },
                        })),
                    };
                    // Never block the loop (and the reading of the session's end) on a
                    // stream that is no longer drained.
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = tx.try_send(m) {
                        break;
                    }
                }
            }
        }
        FLEET_ONLINE.fetch_sub(1, Ordering::Relaxed);
        // As the agent: a registered session resets the backoff, then waits its first delay.
        backoff.reset();
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Changes the tree `config_rounds` times; each time, measures how long until every agent
/// received its new revision (and ACKed it at once), and until the bastion counted every
/// agent in sync again. Render time per agent comes from `bastide config check`.
fn config_bench(
    args: &Args,
    env: &std::path::Path,
    cli: &dyn Fn(&[&str]) -> Result<String>,
    metrics_addr: &str,
    git: Option<&GitBench>,
) -> Result<()> {
    let n = args.agents;
    let out_of_sync = || -> Option<u64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(metrics_addr).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("bastide_agents_config_out_of_sync "))
            .and_then(|v| v.trim().parse().ok())
    };
    // Initial revisions were pushed at connection: wait until all are in.
    let t = Instant::now();
    while out_of_sync() != Some(0) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("agents never got in sync: {:?} out of sync", out_of_sync());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut alls = Vec::new();
    let mut syncs = Vec::new();
    for round in 1..=args.config_rounds {
        PUSHES.lock().map_err(|_| anyhow::anyhow!("lock"))?.clear();
        std::thread::sleep(Duration::from_millis(500));
        let t0 = match git {
            // From `git push`: the commit is made (and signed) before.
            Some(g) => {
                write_tree(env, round)?;
                g.commit(env)?;
                let t0 = Instant::now();
                g.push(env)?;
                g.call_hook()?;
                t0
            }
            None => {
                let t0 = Instant::now();
                write_tree(env, round)?;
                t0
            }
        };
        let mut all_in = None;
        loop {
            let got = PUSHES.lock().map(|v| v.len()).unwrap_or(0);
            if got >= n && all_in.is_none() {
                all_in = Some(t0.elapsed());
            }
            // A scrape renders every agent's series: poll it gently so as not to slow down
            // the ACKs it waits for (50 ms resolution on that figure).
            if all_in.is_some() && out_of_sync() == Some(0) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("round {round}: only {got} of {n} agents got the new revision");
            }
            std::thread::sleep(Duration::from_millis(if all_in.is_some() { 50 } else { 5 }));
        }
        let synced = t0.elapsed();
        let mut lat: Vec<Duration> = PUSHES
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .iter()
            .map(|t| t.duration_since(t0))
            .collect();
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
        println!(
            "config round {round}: push received p50 {:.0} ms, p99 {:.0} ms, all {:.0} ms; bastion saw all ACKs by {:.0} ms",
            pct(0.5).as_secs_f64() * 1000.0,
            pct(0.99).as_secs_f64() * 1000.0,
            all_in.unwrap_or_default().as_secs_f64() * 1000.0,
            synced.as_secs_f64() * 1000.0
        );
        p50s.push(pct(0.5));
        p99s.push(pct(0.99));
        alls.push(all_in.unwrap_or_default());
        syncs.push(synced);
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    println!(
        "config push from {} ({n} agents, median of {} rounds): p50 {:.0} ms, p99 {:.0} ms, last agent {:.0} ms, all ACKs at the bastion {:.0} ms",
        args.config_source,
        args.config_rounds,
        med(&mut p50s),
        med(&mut p99s),
        med(&mut alls),
        med(&mut syncs)
    );
    // `config plan` of a new commit the bastion has not applied (webhook mode: not called).
    if let (Some(g), true) = (git, args.config_source == "git-webhook") {
        write_tree(env, args.config_rounds + 1)?;
        g.commit(env)?;
        g.push(env)?;
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let out = cli(&["config", "plan", "--json"]);
            let took = t.elapsed();
            // Exit 2 (changes, nothing on stderr) is the expected outcome; the CLI helper
            // reports any non-zero exit as an error with the stderr.
            match out {
                Ok(_) => {}
                Err(e) if e.to_string().trim_end().ends_with(':') => {}
                Err(e) => bail!("config plan: {e}"),
            }
            times.push(took);
        }
        times.sort();
        println!(
            "config plan            {:.0} ms for {n} agents (median of 3; fetch, export, render and diff)",
            times[1].as_secs_f64() * 1000.0
        );
        // The offline form: a registry snapshot, then the plan of the working tree with no
        // bastion (as a CI job on the git server runs it).
        let snap = env.with_extension("snapshot.json");
        let snap_s = snap.display().to_string();
        let t = Instant::now();
        cli(&["config", "snapshot", "--out", &snap_s])?;
        let export = t.elapsed();
        let size = std::fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);
        let dir = env.display().to_string();
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let out = cli(&[
                "config",
                "plan",
                "--offline",
                "--snapshot",
                &snap_s,
                "--dir",
                &dir,
                "--json",
            ]);
            let took = t.elapsed();
            match out {
                Ok(_) => {}
                Err(e) if e.to_string().trim_end().ends_with(':') => {}
                Err(e) => bail!("config plan --offline: {e}"),
            }
            times.push(took);
        }
        times.sort();
        let _ = std::fs::remove_file(&snap);
        println!(
            "config snapshot        {:.0} ms for {n} agents ({:.1} MiB); plan --offline {:.0} ms (median of 3)",
            export.as_secs_f64() * 1000.0,
            size as f64 / (1024.0 * 1024.0),
            times[1].as_secs_f64() * 1000.0
        );
    }
    let check = cli(&["config", "check"])?;
    let ms: f64 = check
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    println!(
        "config render          {ms:.1} ms for {n} agents ({:.1} us per agent, wall time on all cores, tree load included)",
        ms * 1000.0 / n as f64
    );
    Ok(())
}

/// Times scrapes of /metrics/agents (median of 5) and reports their size.
fn scrape_bench(metrics_addr: &str, agents: usize) -> Result<()> {
    use std::io::{Read, Write};
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(metrics_addr)?;
        write!(
            s,
            "GET /metrics/agents HTTP/1.0\r\nHost: {metrics_addr}\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        times.push(t.elapsed());
        bytes = buf.len();
    }
    times.sort();
    println!(
        "scrape /metrics/agents {:.1} ms median of 5 ({:.1} MiB, {agents} agents)",
        times[2].as_secs_f64() * 1000.0,
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
