//! Syslog load generator for `bench/logs/run.sh`: one TCP connection per host, each sending
//! LINES RFC 5424 messages of SIZE bytes with octet-counting framing (RFC 6587), then a
//! final `END-MARKER` line, so the caller knows a host's file is complete when its last line
//! is the marker. Prints the send rate; the receiver's rate is measured by the script.

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Receiver, host:port.
    #[arg(long)]
    target: String,
    /// Lines per connection.
    #[arg(long, default_value_t = 250_000)]
    lines: usize,
    /// Connections, one host name each (bench-h0, bench-h1, ...).
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Bytes per message (header included).
    #[arg(long, default_value_t = 200)]
    size: usize,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let start = Instant::now();
    let threads: Vec<_> = (0..a.conns)
        .map(|c| {
            let target = a.target.clone();
            let (lines, size) = (a.lines, a.size);
            std::thread::spawn(move || -> Result<()> {
                let s = TcpStream::connect(&target).with_context(|| format!("connect {target}"))?;
                let mut w = BufWriter::with_capacity(256 * 1024, s);
                let head = format!("<13>1 2026-11-27T10:00:00.000Z bench-h{c} benchapp 42 - - ");
                for i in 0..lines {
                    let mut msg = format!("{head}seq={i:010} ");
                    while msg.len() < size {
                        msg.push('x');
                    }
                    write!(w, "{} {}", msg.len(), msg)?;
                }
                let end = format!("{head}END-MARKER");
                write!(w, "{} {}", end.len(), end)?;
                w.flush()?;
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    let total = a.lines * a.conns;
    println!(
        "sent {total} lines in {secs:.2}s ({:.0} lines/s)",
        total as f64 / secs
    );
    Ok(())
}
