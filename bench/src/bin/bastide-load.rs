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
use bastide_agent::tls::{connect, enroll_config, mtls_config, PinVerifier};
use bastide_bench::{
    bastide_cli, clk_tck, fetch_ca, free_port, parse_duration, rustls_pem, start_bastide,
    synthetic_batch, Cred,
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
}

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
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let sem = sem.clone();
        let (addr, pin, token) = (addr.to_string(), pin.to_string(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            let name = format!("load{i:05}");
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
    let mut creds = Vec::with_capacity(n);
    for t in tasks {
        creds.push(t.await??);
    }
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
            use rustls_pem::parse;
            let (chain, key) = parse(&c.cert_pem, &c.key_pem)?;
            let cfg = mtls_config(ca, chain, key)?;
            // As a real agent, try again when the bastion is too busy to answer in time
            // (thousands of handshakes at once on a loaded machine).
            let mut tries = 0;
            let ch = loop {
                match connect(&addr, "127.0.0.1", cfg.clone()).await {
                    Ok(ch) => break ch,
                    Err(_) if tries < 5 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(500 * tries)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let mut client = AgentClient::new(ch);
            client
                .register(RegisterRequest {
                    claimed_name: c.name.clone(),
                    hostname: c.name.clone(),
                    addresses: vec!["127.0.0.1".into()],
                    os: "load".into(),
                    agent_version: "load".into(),
                    ssh_host_keys: vec![],
                    config_revision: String::new(),
                })
                .await?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut inbound = client
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            drop(permit);
            if series > 0 {
                tx.send(AgentMessage {
                    kind: Some(agent_message::Kind::Metrics(synthetic_batch(series))),
                })
                .await?;
            }
            let tx2 = tx.clone();
            tokio::spawn(async move {
                use bastide_proto::v1::{bastion_message, ConfigResult};
                while let Ok(Some(m)) = inbound.message().await {
                    match m.kind {
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
                            let _ = tx2.send(ack).await;
                        }
                        _ => {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
            // Spread heartbeats over the interval, as real agents started at random times.
            tokio::time::sleep(hb.mul_f64(rand::random::<f64>())).await;
            let mut seq = 0;
            let mut tick = tokio::time::interval(hb);
            loop {
                tick.tick().await;
                seq += 1;
                let m = AgentMessage {
                    kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                        seq,
                        agent_time_unix: 0,
                    })),
                };
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(())
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
        let online = list
            .as_array()
            .map(|a| a.iter().filter(|x| x["state"] == "online").count())
            .unwrap_or(0);
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
