//! Soak and scale (issue 10, point 4): starts a real `bastide` (release build), enrolls N
//! simulated agents through the real enrollment RPC, connects them over mutual TLS and keeps
//! them busy for a long time the way real agents are:
//!
//! - a `Session` stream with heartbeats and one `MetricsBatch` per metrics interval;
//! - a `ShipLogs` stream shipping numbered log lines (`LogBatch{epoch, seq, events}`, one
//!   batch per batch interval), keeping every unacknowledged batch and resending it after a
//!   broken stream, as `bastide-agent`'s shipper does;
//! - a change of the environment tree the bastion's `[config_push]` watches every config
//!   interval; every simulated agent answers each `ConfigPush` with a `ConfigResult` ACK.
//!
//! Every sample interval it records the bastion's RSS, open file descriptors, threads and CPU
//! to a CSV. At the end it stops shipping, waits for every batch to be acknowledged, and
//! checks: every config round acknowledged by every agent, and every acknowledged log line in
//! the store (`<dir>/<host>/<day>.log`) exactly once (none missing, none duplicated).
//!
//! Run it through `bench/soak/run.sh` (raises `ulimit -n`, sets `MALLOC_ARENA_MAX` as the
//! systemd unit does, builds the release binaries).

use bastide_agent::session::ACK_EVERY;
use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
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
use bastide_proto::v1::{
    agent_message, bastion_message, AgentMessage, ConfigResult, EnrollRequest, Heartbeat, LogBatch,
    LogEvent, RegisterRequest,
};
use clap::Parser;
use tokio::sync::{watch, Semaphore};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Soak: N simulated agents shipping logs and metrics with config pushes")]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 5000)]
    agents: usize,
    /// How long the fleet runs once every agent is online.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent enrollments / connections in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Heartbeat interval the bastion asks for.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Log lines per second per agent.
    #[arg(long, default_value_t = 1)]
    lines_per_sec: u64,
    /// One log batch per agent this often (lines_per_sec x this = lines per batch).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    batch_interval: Duration,
    /// Bytes of each log message (padded).
    #[arg(long, default_value_t = 120)]
    line_bytes: usize,
    /// One MetricsBatch per agent this often.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    metrics_interval: Duration,
    /// Series in each MetricsBatch.
    #[arg(long, default_value_t = 60)]
    metrics_series: usize,
    /// A change of the environment tree this often.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    config_interval: Duration,
    /// Bastion resource sample this often.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    sample: Duration,
    /// CSV of the samples.
    #[arg(long, default_value = "soak-samples.csv")]
    csv: PathBuf,
    /// Working directory (bastion state, log store); default a temporary one, removed after.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The bastide binary (build it with `cargo build --release -p bastide`).
    #[arg(long)]
    bastide: Option<PathBuf>,
    /// How long to wait at the end for outstanding log batches and config ACKs.
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    drain: Duration,
}

/// One reading of a process from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    rss_kib: u64,
    threads: u64,
    fds: u64,
    cpu_ticks: u64,
}

fn proc_sample(pid: u32) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, utime 11, stime 12.
    let cpu_ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(ProcSample {
        rss_kib: field("VmRSS:").context("VmRSS")?,
        threads: field("Threads:").context("Threads")?,
        fds,
        cpu_ticks,
    })
}

fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// The environment tree; `round` is a project variable the chrony template prints, so every
/// pushed revision names its round.
fn write_tree(env: &Path, round: usize) -> Result<()> {
    let proj = env.join("clouds/c/sites/s/instances/i/projects/soak");
    std::fs::create_dir_all(&proj)?;
    std::fs::create_dir_all(env.join("templates"))?;
    std::fs::write(
        env.join("global.toml"),
        "[vars]\nntp = [\"a.pool\", \"b.pool\"]\n[files.chrony]\npath = \"/etc/chrony/chrony.conf\"\ntemplate = \"chrony.j2\"\non_change = \"chrony\"\n[files.resolv]\npath = \"/etc/resolv.conf\"\ncontent = \"nameserver {{ bastion.address }}\\nsearch {{ agent.name }}.soak\\n\"\n[agent]\nmetrics_interval = \"15s\"\n",
    )?;
    std::fs::write(
        env.join("templates/chrony.j2"),
        "# round {{ round }} for {{ agent.name }}\n{% for s in ntp %}server {{ s }} iburst\n{% endfor %}",
    )?;
    let tmp = proj.join(".project.toml.tmp");
    std::fs::write(&tmp, format!("[vars]\nround = {round}\n"))?;
    std::fs::rename(&tmp, proj.join("project.toml"))?;
    Ok(())
}

/// The round a push carries (`# round N for ...` in the chrony file).
fn round_of(p: &bastide_proto::v1::ConfigPush) -> Option<usize> {
    p.files.iter().find_map(|f| {
        let s = String::from_utf8_lossy(&f.content);
        s.strip_prefix("# round ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    })
}

/// What one simulated agent did, read at the end.
#[derive(Default)]
struct AgentStats {
    /// Config rounds this agent acknowledged.
    rounds: Mutex<BTreeSet<usize>>,
    pushes: AtomicU64,
    /// Highest log batch sequence number sent and acknowledged.
    sent_seq: AtomicU64,
    acked_seq: AtomicU64,
    log_reconnects: AtomicU64,
    session_reconnects: AtomicU64,
    metrics_sent: AtomicU64,
    heartbeat_acks: AtomicU64,
    /// The log stream has drained (every batch acknowledged) after the stop.
    drained: std::sync::atomic::AtomicBool,
}

/// Whole-fleet state shared with the driver.
struct Fleet {
    agents: Vec<Arc<AgentStats>>,
    /// When each round's tree was written.
    round_written: Mutex<Vec<Instant>>,
    /// Per round: agents that ACKed it, and the latest ACK's delay after the write (ms).
    round_acks: Vec<AtomicUsize>,
    round_last_ms: Vec<AtomicU64>,
    sessions_up: AtomicUsize,
    connect_retries: AtomicU64,
    /// Pushes whose files carry no round (a tree not written by this tool).
    no_round: AtomicU64,
}

struct Sample {
    t: f64,
    p: ProcSample,
    cpu_pct: f64,
    sessions: usize,
    lines_acked: u64,
    metrics: u64,
    round: usize,
    load: String,
    self_rss_kib: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    bastide_agent::tls::install_crypto_provider();
    // Each process (this tool, and the bastion, which inherits the limit) holds one socket
    // per agent, plus files: the bastion's log store keeps at most 512 open.
    let need = args.agents as u64 + 1024;
    if nofile_limit() < need {
        bail!(
            "open files limit {} is too low for {} agents (each is a socket here and one in the bastion, each process under this limit): run `ulimit -n {}` first (bench/soak/run.sh does)",
            nofile_limit(),
            args.agents,
            need.max(65536)
        );
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
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let state = dir.join("state");
    let store = dir.join("store");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let out = Command::new(&bastide)
        .args(["init", "--project", "soak"])
        .args(["--agents-listen", &addr, "--metrics-listen", &metrics_addr])
        .arg("--dir")
        .arg(&state)
        .output()?;
    if !out.status.success() {
        bail!("init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cfg = state.join("bastide.toml");
    let env = dir.join("env");
    write_tree(&env, 0)?;
    let hb = args.heartbeat.as_secs().max(1);
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
            &format!("heartbeat_interval = \"{hb}s\""),
        )
        .replace(
            "heartbeat_timeout = \"35s\"",
            &format!("heartbeat_timeout = \"{}s\"", hb * 4),
        );
    let text = format!(
        "{text}\n[config_push]\ndir = {:?}\ncloud = \"c\"\nsite = \"s\"\ninstance = \"i\"\nbastion_address = \"127.0.0.1\"\n\n[logs]\ndir = {:?}\n",
        env.display().to_string(),
        store.display().to_string()
    );
    std::fs::write(&cfg, text)?;
    let mut child = start_bastide(
        &bastide,
        &cfg,
        &dir.join("bastide.log"),
        Duration::from_secs(30),
    )?;
    let pid = child.id();
    let cli = |a: &[&str]| bastide_cli(&bastide, &cfg, a);
    let arena = std::fs::read(format!("/proc/{pid}/environ"))
        .ok()
        .and_then(|e| {
            e.split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(b"MALLOC_ARENA_MAX=").map(|v| v.to_vec()))
        })
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let pin = cli(&["ca-pin", "--dir", &state.display().to_string()])?;
    let token = cli(&[
        "token",
        "create",
        "--uses",
        &args.agents.to_string(),
        "--ttl",
        "4h",
    ])?;
    let idle = proc_sample(pid)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(soak(
        &args,
        &addr,
        &pin,
        &token,
        pid,
        &cli,
        &env,
        &metrics_addr,
        idle,
        arena.as_deref(),
    ));
    let _ = child.kill();
    let _ = child.wait();
    let result = result.and_then(|fleet| {
        let v = verify_store(&store, &fleet, &args)?;
        Ok((fleet, v))
    });
    match result {
        Ok((_, v)) if v.missing == 0 && v.duplicated == 0 => Ok(()),
        Ok(_) => bail!("log lines missing or duplicated"),
        Err(e) => {
            eprintln!(
                "bastion log: {}",
                std::fs::read_to_string(dir.join("bastide.log"))
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn soak(
    args: &Args,
    addr: &str,
    pin: &str,
    token: &str,
    pid: u32,
    cli: &dyn Fn(&[&str]) -> Result<String>,
    env: &Path,
    metrics_addr: &str,
    idle: ProcSample,
    arena: Option<&str>,
) -> Result<Arc<Fleet>> {
    let n = args.agents;
    let max_rounds = (args.duration.as_secs() / args.config_interval.as_secs().max(1)) as usize + 2;
    let fleet = Arc::new(Fleet {
        agents: (0..n).map(|_| Arc::new(AgentStats::default())).collect(),
        round_written: Mutex::new(vec![Instant::now()]),
        round_acks: (0..max_rounds).map(|_| AtomicUsize::new(0)).collect(),
        round_last_ms: (0..max_rounds).map(|_| AtomicU64::new(0)).collect(),
        sessions_up: AtomicUsize::new(0),
        connect_retries: AtomicU64::new(0),
        no_round: AtomicU64::new(0),
    });
    let creds = enroll_all(args, addr, pin, token).await?;
    let ca = fetch_ca(addr, pin).await?;
    let (stop_logs_tx, stop_logs) = watch::channel(false);
    let (stop_all_tx, stop_all) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let t1 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, c) in creds.into_iter().enumerate() {
        let sem = sem.clone();
        let addr = addr.to_string();
        let ca = ca.clone();
        let fleet = fleet.clone();
        let (stop_logs, stop_all) = (stop_logs.clone(), stop_all.clone());
        let a = SimArgs {
            heartbeat: args.heartbeat,
            metrics_interval: args.metrics_interval,
            metrics_series: args.metrics_series,
            batch_interval: args.batch_interval,
            lines_per_batch: args.lines_per_sec * args.batch_interval.as_secs().max(1),
            line_bytes: args.line_bytes,
        };
        tasks.push(tokio::spawn(async move {
            // A real agent retries a failed connection (handshake timeouts happen on a
            // bastion busy with thousands of them): so does this one, with backoff.
            let mut attempt = 0u32;
            let channel = loop {
                let _permit = sem.clone().acquire_owned().await?;
                let (chain, key) = rustls_pem::parse(&c.cert_pem, &c.key_pem)?;
                let cfg = mtls_config(ca.clone(), chain, key)?;
                match connect(&addr, "127.0.0.1", cfg).await {
                    Ok(ch) => break ch,
                    Err(e) if attempt < 30 => {
                        attempt += 1;
                        fleet.connect_retries.fetch_add(1, Relaxed);
                        drop(_permit);
                        let d = Duration::from_millis(500 * u64::from(attempt.min(10)))
                            + Duration::from_millis(rand::random::<u64>() % 1000);
                        if attempt == 1 {
                            eprintln!("{}: connect failed, retrying: {e:#}", c.name);
                        }
                        tokio::time::sleep(d).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let stats = fleet.agents[i].clone();
            let logs = tokio::spawn(ship_logs(
                channel.clone(),
                c.name.clone(),
                a,
                stats.clone(),
                stop_logs,
            ));
            session(channel, c.name, a, stats, fleet, stop_all).await;
            let _ = logs.await;
            Ok::<_, anyhow::Error>(())
        }));
    }
    // Wait until every simulated agent has its session open (the bastion's admin socket is
    // not polled meanwhile: listing 5,000 agents every second slows the handshakes down),
    // then ask the bastion how many it counts online.
    loop {
        if fleet.sessions_up.load(Relaxed) >= n || t1.elapsed() > Duration::from_secs(1200) {
            break;
        }
        if let Some(f) = tasks.iter().position(|c| c.is_finished()) {
            let t = tasks.remove(f);
            t.await??;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let mut online = 0;
    for _ in 0..30 {
        match cli(&["agents", "list", "--json"]) {
            Ok(s) => {
                let list: serde_json::Value = serde_json::from_str(&s)?;
                online = list
                    .as_array()
                    .map(|a| a.iter().filter(|x| x["state"] == "online").count())
                    .unwrap_or(0);
                if online >= n {
                    break;
                }
            }
            Err(e) => eprintln!("asking the bastion: {e:#}"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let connect_time = t1.elapsed();
    println!(
        "fleet: {online} of {n} agents online after {:.1} s; soaking for {} s",
        connect_time.as_secs_f64(),
        args.duration.as_secs()
    );
    if online < n {
        bail!("only {online} of {n} agents came online");
    }

    // The soak: samples, config rounds.
    let tck = clk_tck();
    let mut samples: Vec<Sample> = Vec::new();
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&args.csv)?);
    writeln!(
        csv,
        "elapsed_s,rss_kib,fds,threads,cpu_pct,sessions_up,log_lines_acked,metrics_batches,config_round,loadavg1,soak_tool_rss_kib"
    )?;
    let lines_per_batch = args.lines_per_sec * args.batch_interval.as_secs().max(1);
    let t0 = Instant::now();
    let mut prev = proc_sample(pid)?;
    let mut prev_t = t0;
    let mut round = 0usize;
    let mut next_sample = t0;
    let mut next_round = t0 + args.config_interval;
    let mut take = |samples: &mut Vec<Sample>,
                    round: usize,
                    prev: &mut ProcSample,
                    prev_t: &mut Instant|
     -> Result<()> {
        let p = proc_sample(pid)?;
        let now = Instant::now();
        let dt = now.duration_since(*prev_t).as_secs_f64();
        // The first sample follows the previous reading at once: no CPU figure for it.
        let cpu_pct = if dt >= 1.0 {
            (p.cpu_ticks - prev.cpu_ticks) as f64 / tck / dt * 100.0
        } else {
            0.0
        };
        *prev = p;
        *prev_t = now;
        let s = Sample {
            t: now.duration_since(t0).as_secs_f64(),
            p,
            cpu_pct,
            sessions: fleet.sessions_up.load(Relaxed),
            lines_acked: fleet
                .agents
                .iter()
                .map(|a| a.acked_seq.load(Relaxed) * lines_per_batch)
                .sum(),
            metrics: fleet
                .agents
                .iter()
                .map(|a| a.metrics_sent.load(Relaxed))
                .sum(),
            round,
            load: load_avg(),
            self_rss_kib: proc_sample(std::process::id())
                .map(|s| s.rss_kib)
                .unwrap_or(0),
        };
        writeln!(
            csv,
            "{:.0},{},{},{},{:.1},{},{},{},{},{},{}",
            s.t,
            s.p.rss_kib,
            s.p.fds,
            s.p.threads,
            s.cpu_pct,
            s.sessions,
            s.lines_acked,
            s.metrics,
            s.round,
            s.load,
            s.self_rss_kib
        )?;
        csv.flush()?;
        println!(
            "t={:>5.0}s rss={:>7.1} MiB fds={:>5} threads={:>3} cpu={:>5.1}% sessions={} lines_acked={} round={} load={}",
            s.t,
            s.p.rss_kib as f64 / 1024.0,
            s.p.fds,
            s.p.threads,
            s.cpu_pct,
            s.sessions,
            s.lines_acked,
            s.round,
            s.load
        );
        samples.push(s);
        Ok(())
    };
    let end = t0 + args.duration;
    loop {
        let now = Instant::now();
        if now >= next_sample {
            take(&mut samples, round, &mut prev, &mut prev_t)?;
            next_sample += args.sample;
        }
        if now >= end {
            break;
        }
        if now >= next_round && round + 1 < max_rounds {
            round += 1;
            if let Ok(mut w) = fleet.round_written.lock() {
                w.push(Instant::now());
            }
            write_tree(env, round)?;
            next_round += args.config_interval;
        }
        let wake = next_sample.min(next_round).min(end);
        tokio::time::sleep(
            wake.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        )
        .await;
    }
    let rounds = round;

    // Drain: no new log batches; wait until every batch is acknowledged and every agent
    // has ACKed the last round.
    let _ = stop_logs_tx.send(true);
    let td = Instant::now();
    loop {
        let drained = fleet
            .agents
            .iter()
            .filter(|a| a.drained.load(Relaxed))
            .count();
        let last = fleet.round_acks[rounds].load(Relaxed);
        if (drained == n && last >= n) || td.elapsed() > args.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain_time = td.elapsed();
    let out_of_sync = out_of_sync(metrics_addr);
    take(&mut samples, rounds, &mut prev, &mut prev_t)?;
    let _ = stop_all_tx.send(true);

    // Summary of the run (the store is checked after the bastion stopped).
    let mib = |k: u64| k as f64 / 1024.0;
    let first = samples.first().context("no samples")?;
    let last = samples.last().context("no samples")?;
    let max_rss = samples.iter().map(|s| s.p.rss_kib).max().unwrap_or(0);
    let cpu: Vec<f64> = samples.iter().skip(1).map(|s| s.cpu_pct).collect();
    let cpu_mean = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64;
    let cpu_max = cpu.iter().cloned().fold(0.0, f64::max);
    // RSS trend after a warm-up of a sixth of the run: least squares, MiB per 10 minutes.
    let warm: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= args.duration.as_secs_f64() / 6.0)
        .collect();
    let slope = if warm.len() >= 3 {
        let m = warm.len() as f64;
        let mx = warm.iter().map(|s| s.t).sum::<f64>() / m;
        let my = warm.iter().map(|s| s.p.rss_kib as f64).sum::<f64>() / m;
        let sxy: f64 = warm
            .iter()
            .map(|s| (s.t - mx) * (s.p.rss_kib as f64 - my))
            .sum();
        let sxx: f64 = warm.iter().map(|s| (s.t - mx).powi(2)).sum();
        if sxx > 0.0 {
            sxy / sxx * 600.0 / 1024.0
        } else {
            0.0
        }
    } else {
        0.0
    };
    let sum = |f: &dyn Fn(&AgentStats) -> u64| -> u64 {
        fleet.agents.iter().map(|a| f(a.as_ref())).sum()
    };
    let mut all_rounds = 0;
    let mut missing_rounds = 0;
    for a in &fleet.agents {
        let got = a.rounds.lock().map(|r| r.clone()).unwrap_or_default();
        if (0..=rounds).all(|r| got.contains(&r)) {
            all_rounds += 1;
        }
        missing_rounds += (0..=rounds).filter(|r| !got.contains(r)).count();
    }
    let mut lat: Vec<u64> = (1..=rounds)
        .map(|r| fleet.round_last_ms[r].load(Relaxed))
        .collect();
    lat.sort();
    println!();
    println!("== soak summary ==");
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| agents | {n} ({online} online after {:.0} s) |",
        connect_time.as_secs_f64()
    );
    println!(
        "| duration | {:.0} s, {} samples every {} s (CSV {}) |",
        last.t,
        samples.len(),
        args.sample.as_secs(),
        args.csv.display()
    );
    println!(
        "| MALLOC_ARENA_MAX in the bastion | {} |",
        arena.unwrap_or("unset")
    );
    println!(
        "| bastion RSS idle (no agents) | {:.1} MiB |",
        mib(idle.rss_kib)
    );
    println!(
        "| bastion RSS start / end / max | {:.1} / {:.1} / {:.1} MiB (end - start {:+.1} MiB) |",
        mib(first.p.rss_kib),
        mib(last.p.rss_kib),
        mib(max_rss),
        mib(last.p.rss_kib) - mib(first.p.rss_kib)
    );
    println!("| bastion RSS trend after warm-up | {slope:+.2} MiB per 10 min |");
    println!(
        "| bastion fds start / end | {} / {} (idle {}) |",
        first.p.fds, last.p.fds, idle.fds
    );
    println!(
        "| bastion threads start / end | {} / {} |",
        first.p.threads, last.p.threads
    );
    println!("| bastion CPU mean / max of samples | {cpu_mean:.1} / {cpu_max:.1} % of one core |");
    println!(
        "| config rounds | {} changes + initial; {all_rounds} of {n} agents ACKed every one; {missing_rounds} (agent, round) ACKs missing; {} pushes without a round; bastion out of sync at end: {} |",
        rounds,
        fleet.no_round.load(Relaxed),
        out_of_sync.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
    );
    if !lat.is_empty() {
        println!(
            "| config push, last agent's ACK after the change | median {} ms, max {} ms (includes the bastion's debounce) |",
            lat[lat.len() / 2],
            lat[lat.len() - 1]
        );
    }
    println!(
        "| log batches sent / acked | {} / {} ({} lines each); drained in {:.1} s |",
        sum(&|a| a.sent_seq.load(Relaxed)),
        sum(&|a| a.acked_seq.load(Relaxed)),
        lines_per_batch,
        drain_time.as_secs_f64()
    );
    println!(
        "| metrics batches sent | {} |",
        sum(&|a| a.metrics_sent.load(Relaxed))
    );
    println!(
        "| heartbeat acks | {} |",
        sum(&|a| a.heartbeat_acks.load(Relaxed))
    );
    println!(
        "| connection retries while the fleet connected | {} |",
        fleet.connect_retries.load(Relaxed)
    );
    println!(
        "| reconnects (log streams / sessions) | {} / {} |",
        sum(&|a| a.log_reconnects.load(Relaxed)),
        sum(&|a| a.session_reconnects.load(Relaxed))
    );
    if missing_rounds > 0 {
        bail!("{missing_rounds} config round ACKs missing");
    }
    Ok(fleet)
}

#[derive(Clone, Copy)]
struct SimArgs {
    heartbeat: Duration,
    metrics_interval: Duration,
    metrics_series: usize,
    batch_interval: Duration,
    lines_per_batch: u64,
    line_bytes: usize,
}

/// Session stream: register, heartbeats, metrics, config ACKs; reopened when it breaks.
async fn session(
    channel: Channel,
    name: String,
    a: SimArgs,
    stats: Arc<AgentStats>,
    fleet: Arc<Fleet>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        if !first {
            stats.session_reconnects.fetch_add(1, Relaxed);
            let jitter = Duration::from_millis(rand::random::<u64>() % 3000);
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(1) + jitter) => {}
            }
        }
        first = false;
        let mut client = AgentClient::new(channel.clone());
        if client
            .register(RegisterRequest {
                claimed_name: name.clone(),
                hostname: name.clone(),
                addresses: vec!["127.0.0.1".into()],
                os: "soak".into(),
                agent_version: "soak".into(),
                ssh_host_keys: vec![],
                config_revision: String::new(),
            })
            .await
            .is_err()
        {
            continue;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut inbound = match client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(_) => continue,
        };
        fleet.sessions_up.fetch_add(1, Relaxed);
        // Spread heartbeats and metrics over their intervals, as real agents started at
        // random times.
        let mut hb = tokio::time::interval_at(
            tokio::time::Instant::now() + a.heartbeat.mul_f64(rand::random::<f64>()),
            a.heartbeat,
        );
        let mut mt = tokio::time::interval_at(
            tokio::time::Instant::now() + a.metrics_interval.mul_f64(rand::random::<f64>()),
            a.metrics_interval,
        );
        let mut seq = 0;
        let stopped = loop {
            tokio::select! {
                _ = stop.changed() => break true,
                m = inbound.message() => match m {
                    Ok(Some(m)) => match m.kind {
                        Some(bastion_message::Kind::Config(p)) => {
                            stats.pushes.fetch_add(1, Relaxed);
                            let ack = AgentMessage {
                                kind: Some(agent_message::Kind::ConfigResult(ConfigResult {
                                    revision: p.revision.clone(),
                                    ok: true,
                                    ..Default::default()
                                })),
                            };
                            if tx.send(ack).await.is_err() {
                                break false;
                            }
                            if let Some(r) = round_of(&p) {
                                let new = stats.rounds.lock().map(|mut s| s.insert(r)).unwrap_or(false);
                                if new && r < fleet.round_acks.len() {
                                    fleet.round_acks[r].fetch_add(1, Relaxed);
                                    let written = fleet.round_written.lock().ok().and_then(|w| w.get(r).copied());
                                    if let Some(w) = written {
                                        fleet.round_last_ms[r].fetch_max(w.elapsed().as_millis() as u64, Relaxed);
                                    }
                                }
                            } else {
                                fleet.no_round.fetch_add(1, Relaxed);
                            }
                        }
                        Some(bastion_message::Kind::HeartbeatAck(_)) => {
                            stats.heartbeat_acks.fetch_add(1, Relaxed);
                        }
                        None => {}
                    },
                    _ => break false,
                },
                _ = hb.tick() => {
                    seq += 1;
                    let m = AgentMessage {
                        kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                            seq,
                            agent_time_unix: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_secs() as i64)
                                .unwrap_or(0),
                            // As the agent: an acknowledgement every ACK_EVERY heartbeats.
                            no_ack: seq % ACK_EVERY != 1,
                        })),
                    };
                    if tx.send(m).await.is_err() {
                        break false;
                    }
                }
                _ = mt.tick(), if a.metrics_series > 0 => {
                    let m = AgentMessage {
                        kind: Some(agent_message::Kind::Metrics(synthetic_batch(a.metrics_series))),
                    };
                    if tx.send(m).await.is_err() {
                        break false;
                    }
                    stats.metrics_sent.fetch_add(1, Relaxed);
                }
            }
        };
        fleet.sessions_up.fetch_sub(1, Relaxed);
        if stopped {
            return;
        }
    }
}

/// `ShipLogs`: one batch of numbered lines per batch interval; every batch is kept until
/// acknowledged and resent on a new stream after a failure (the bastion drops what it already
/// stored by epoch and sequence number). Stops producing on `stop`, returns once drained.
async fn ship_logs(
    channel: Channel,
    name: String,
    a: SimArgs,
    stats: Arc<AgentStats>,
    mut stop: watch::Receiver<bool>,
) {
    let epoch: u64 = rand::random::<u64>() | 1;
    let mut pending: std::collections::VecDeque<LogBatch> = Default::default();
    let mut next_seq = 1u64;
    let mut stopping = false;
    let pad = "x".repeat(a.line_bytes.saturating_sub(name.len() + 16));
    // Start at a random point of the interval.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + a.batch_interval.mul_f64(rand::random::<f64>()),
        a.batch_interval,
    );
    let mut first = true;
    loop {
        if !first {
            stats.log_reconnects.fetch_add(1, Relaxed);
            let jitter = Duration::from_millis(rand::random::<u64>() % 3000);
            tokio::time::sleep(Duration::from_secs(1) + jitter).await;
        }
        first = false;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<LogBatch>();
        for b in &pending {
            let _ = tx.send(b.clone());
        }
        let mut client = AgentClient::new(channel.clone());
        let call = client.ship_logs(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        tokio::pin!(call);
        let mut acks: Option<tonic::Streaming<bastide_proto::v1::LogAck>> = None;
        loop {
            tokio::select! {
                r = &mut call, if acks.is_none() => match r {
                    Ok(resp) => acks = Some(resp.into_inner()),
                    Err(_) => break,
                },
                m = async { match acks.as_mut() { Some(s) => s.message().await, None => std::future::pending().await } }, if acks.is_some() => match m {
                    Ok(Some(ack)) if ack.epoch == epoch => {
                        while pending.front().is_some_and(|b| b.seq <= ack.seq) {
                            pending.pop_front();
                        }
                        stats.acked_seq.fetch_max(ack.seq, Relaxed);
                        if stopping && pending.is_empty() {
                            stats.drained.store(true, Relaxed);
                            return;
                        }
                    }
                    _ => break,
                },
                _ = tick.tick(), if !stopping => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                    let base = (next_seq - 1) * a.lines_per_batch;
                    let batch = LogBatch {
                        epoch,
                        seq: next_seq,
                        events: (1..=a.lines_per_batch)
                            .map(|k| LogEvent {
                                timestamp_ms: now,
                                source: "/var/log/soak.log".into(),
                                app: "soak".into(),
                                severity: 6,
                                facility: 1,
                                message: format!("soak {name} n={:09} {pad}", base + k).into_bytes(),
                            })
                            .collect(),
                    };
                    next_seq += 1;
                    stats.sent_seq.store(batch.seq, Relaxed);
                    pending.push_back(batch.clone());
                    if tx.send(batch).is_err() {
                        break;
                    }
                }
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    if pending.is_empty() {
                        stats.drained.store(true, Relaxed);
                        return;
                    }
                }
            }
        }
    }
}

async fn enroll_all(args: &Args, addr: &str, pin: &str, token: &str) -> Result<Vec<Cred>> {
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let sem = sem.clone();
        let (addr, pin, token) = (addr.to_string(), pin.to_string(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            let name = format!("soak{i:05}");
            let (key, csr) = new_key_and_csr(&name)?;
            let verifier = Arc::new(PinVerifier::new(pin));
            let ch = connect(&addr, "127.0.0.1", enroll_config(verifier)?).await?;
            let resp = EnrollmentClient::new(ch)
                .enroll(EnrollRequest {
                    token,
                    name: name.clone(),
                    csr_der: csr,
                    agent_version: "soak".into(),
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
    println!(
        "enrolled {} agents in {:.1} s",
        args.agents,
        t0.elapsed().as_secs_f64()
    );
    Ok(creds)
}

/// `bastide_agents_config_out_of_sync` from the bastion's /metrics.
fn out_of_sync(metrics_addr: &str) -> Option<u64> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(metrics_addr).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("bastide_agents_config_out_of_sync "))
        .and_then(|v| v.trim().parse().ok())
}

struct Verdict {
    missing: u64,
    duplicated: u64,
}

/// Reads every agent's files in the store and checks each acknowledged line is there once.
fn verify_store(store: &Path, fleet: &Fleet, args: &Args) -> Result<Verdict> {
    let lpb = args.lines_per_sec * args.batch_interval.as_secs().max(1);
    let t = Instant::now();
    let (mut sent, mut acked, mut stored) = (0u64, 0u64, 0u64);
    let (mut missing, mut duplicated, mut unacked_stored, mut foreign) = (0u64, 0u64, 0u64, 0u64);
    let mut agents_bad = 0usize;
    for (i, a) in fleet.agents.iter().enumerate() {
        let name = format!("soak{i:05}");
        let s = a.sent_seq.load(Relaxed) * lpb;
        let k = a.acked_seq.load(Relaxed) * lpb;
        sent += s;
        acked += k;
        let mut seen = vec![0u8; s as usize + 1];
        let dir = store.join(&name);
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        for f in files {
            if f.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let r = std::io::BufReader::new(std::fs::File::open(&f)?);
            for line in r.split(b'\n') {
                let line = line?;
                let Some(pos) = line.windows(2).position(|w| w == b"n=") else {
                    foreign += 1;
                    continue;
                };
                let num = line[pos + 2..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .fold(0u64, |v, b| v * 10 + u64::from(b - b'0'));
                stored += 1;
                match seen.get_mut(num as usize) {
                    Some(c) if num > 0 => *c = c.saturating_add(1),
                    _ => foreign += 1,
                }
            }
        }
        let (mut m, mut d) = (0, 0);
        for (num, &c) in seen.iter().enumerate().skip(1) {
            if c > 1 {
                d += u64::from(c - 1);
            }
            if c == 0 && (num as u64) <= k {
                m += 1;
            }
            if c > 0 && (num as u64) > k {
                unacked_stored += 1;
            }
        }
        if m > 0 || d > 0 {
            agents_bad += 1;
        }
        missing += m;
        duplicated += d;
    }
    println!(
        "| log lines sent / acked / stored | {sent} / {acked} / {stored} (store read in {:.1} s) |",
        t.elapsed().as_secs_f64()
    );
    println!(
        "| log lines missing / duplicated | {missing} / {duplicated} ({agents_bad} agents affected; {unacked_stored} stored but never acked; {foreign} unparsable) |"
    );
    Ok(Verdict {
        missing,
        duplicated,
    })
}
