//! `store-bench`: drives the bastion's log store (`bastide::logs::Store`) directly, the way
//! thousands of agents do: N distinct hosts, each with one batch of 1-20 small lines in
//! flight at a time (an agent waits for its acknowledgement), for a fixed time. Prints the
//! acknowledged lines/s, group commits/s, fsyncs per group and the acknowledgement latency.
//!
//! ```text
//! cargo build --release -p bastide-bench --bin store-bench
//! target/release/store-bench --dir /work/tmp/store-bench --hosts 100,1000,5000 --secs 15
//! ```
//!
//! The directory must be on a real disk (ext4...), not tmpfs: fsync is what is measured.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bastide::logs::format::{day_of, now_ms};
use bastide::logs::metrics::counters;
use bastide::logs::{Chunk, Mark, Store};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Parent directory of the stores (one fresh store per run); must not be tmpfs.
    #[arg(long, default_value = "/work/tmp/store-bench")]
    dir: std::path::PathBuf,
    /// Host counts to measure, comma-separated.
    #[arg(long, default_value = "100,1000,5000", value_delimiter = ',')]
    hosts: Vec<usize>,
    /// Measured seconds per run (after a warm-up of 3 s).
    #[arg(long, default_value_t = 15)]
    secs: u64,
    /// Most lines per batch (each batch has 1..=this).
    #[arg(long, default_value_t = 20)]
    max_lines: u32,
    /// Runs per host count (the median is printed too).
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

struct Figures {
    lines_per_s: f64,
    groups_per_s: f64,
    fsyncs_per_group: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Seconds until every host had its first batch acknowledged (its file created).
    first_all_s: f64,
}

async fn run_once(args: &Args, hosts: usize) -> Result<Figures> {
    let dir = args.dir.join(format!("h{hosts}-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = Store::open(&dir, None)?;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let lines = Arc::new(AtomicU64::new(0));
    let first_acked = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let mut tasks = Vec::with_capacity(hosts);
    for h in 0..hosts {
        let store = store.clone();
        let (stop, measuring, lines, lat, first_acked) = (
            stop.clone(),
            measuring.clone(),
            lines.clone(),
            lat.clone(),
            first_acked.clone(),
        );
        let max_lines = args.max_lines;
        tasks.push(tokio::spawn(async move {
            let host: Arc<str> = Arc::from(format!("host-{h:05}"));
            let mut seq = 0u64;
            // Spread the first batches over 100 ms, as agents connecting at different times.
            tokio::time::sleep(Duration::from_micros((h as u64 * 20) % 100_000)).await;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let n = 1 + rand::random::<u32>() % max_lines.max(1);
                let mut data = Vec::with_capacity(n as usize * 120);
                for i in 0..n {
                    data.extend_from_slice(
                        format!(
                            "2026-11-27T09:40:00.000000+00:00 {host} app[1234]: request {seq}/{i} served in 12 ms status=200 bytes=5120\n"
                        )
                        .as_bytes(),
                    );
                }
                let chunk = Chunk {
                    host: host.clone(),
                    day: day_of(now_ms()),
                    data,
                    lines: n,
                };
                let mark = Mark {
                    agent: host.to_string(),
                    epoch: 1,
                    seq,
                };
                let t = Instant::now();
                match store.write(vec![chunk], Some(mark)).await {
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("store error: {e}");
                        return;
                    }
                }
                if seq == 1 {
                    first_acked.fetch_add(1, Ordering::Relaxed);
                }
                if measuring.load(Ordering::Relaxed) {
                    lines.fetch_add(u64::from(n), Ordering::Relaxed);
                    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    if let Ok(mut l) = lat.lock() {
                        l.push(us);
                    }
                }
            }
        }));
    }
    // Warm-up: every host's file created (what a start or a new day costs), then 3 s.
    let t_start = Instant::now();
    while (first_acked.load(Ordering::Relaxed) as usize) < hosts
        && t_start.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_all = t_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = counters();
    let g0 = c.commits.load(Ordering::Relaxed);
    let f0 = c.store_fsyncs.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let groups = c.commits.load(Ordering::Relaxed) - g0;
    let fsyncs = c.store_fsyncs.load(Ordering::Relaxed) - f0;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    drop(store);
    let mut l = std::mem::take(&mut *lat.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .map_or(0.0, |&u| f64::from(u) / 1000.0)
    };
    let f = Figures {
        lines_per_s: lines.load(Ordering::Relaxed) as f64 / el,
        groups_per_s: groups as f64 / el,
        fsyncs_per_group: fsyncs as f64 / groups.max(1) as f64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        first_all_s: first_all,
    };
    // Give the writer thread a moment to finish, then free the disk.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(f)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "store-bench: dir {} ({} s per run, batches of 1-{} lines)",
        args.dir.display(),
        args.secs,
        args.max_lines
    );
    println!("hosts    lines/s   groups/s  fsyncs/group  ack p50 ms  ack p99 ms  all files s");
    for &hosts in &args.hosts {
        let mut all = Vec::new();
        for _ in 0..args.runs.max(1) {
            let f = run_once(&args, hosts).await?;
            println!(
                "{hosts:>5} {:>10.0} {:>10.1} {:>13.1} {:>11.1} {:>11.1} {:>12.1}",
                f.lines_per_s,
                f.groups_per_s,
                f.fsyncs_per_group,
                f.p50_ms,
                f.p99_ms,
                f.first_all_s
            );
            all.push(f);
        }
        if all.len() > 1 {
            println!(
                "{hosts:>5} {:>10.0} {:>10.1} {:>13.1} {:>11.1} {:>11.1}  (median)",
                median(all.iter().map(|f| f.lines_per_s).collect()),
                median(all.iter().map(|f| f.groups_per_s).collect()),
                median(all.iter().map(|f| f.fsyncs_per_group).collect()),
                median(all.iter().map(|f| f.p50_ms).collect()),
                median(all.iter().map(|f| f.p99_ms).collect()),
            );
        }
    }
    Ok(())
}
