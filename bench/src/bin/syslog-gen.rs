//! Syslog load generator for `bench/logs/run.sh`: one TCP connection per host, each sending
//! LINES RFC 5424 messages of SIZE bytes with octet-counting framing (RFC 6587), then a
//! final `END-MARKER` line, so the caller knows a host's file is complete when its last line
//! is the marker. Prints the send rate; the receiver's rate is measured by the script.
//!
//! Connection `c` comes from its own source address, `127.0.1.<c+1>`: the bastion files a
//! sender that is not an agent under a name of its address (`ip-127-0-1-1`, ...), never under
//! the HOSTNAME it claims (`bench-h<c>`, which rsyslog's per-host template uses).

use std::io::{BufWriter, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
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
    /// Connections, one host name each (bench-h0, bench-h1, ...) and one source address
    /// each (127.0.1.1, 127.0.1.2, ...); at most 254.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Bytes per message (header included).
    #[arg(long, default_value_t = 200)]
    size: usize,
}

/// A TCP connection to `target` from `source` (std cannot bind a client socket).
fn connect_from(source: Ipv4Addr, target: SocketAddr) -> Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source.into(), 0))?;
        let s = sock.connect(target).await?.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s)
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.conns <= 254,
        "--conns: at most 254 (one 127.0.1.x source each)"
    );
    let target = a
        .target
        .to_socket_addrs()
        .with_context(|| format!("target {}", a.target))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("target {}: no IPv4 address", a.target))?;
    let start = Instant::now();
    let threads: Vec<_> = (0..a.conns)
        .map(|c| {
            let (lines, size) = (a.lines, a.size);
            let source = Ipv4Addr::new(127, 0, 1, c as u8 + 1);
            std::thread::spawn(move || -> Result<()> {
                let s = connect_from(source, target)
                    .with_context(|| format!("connect {target} from {source}"))?;
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
