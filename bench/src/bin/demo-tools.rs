//! Small helpers for `scripts/demo`, so that the demo needs nothing beyond a fresh Debian
//! with Rust:
//!
//! - `demo-tools ports N`: prints N free loopback ports, one a line, each free for TCP and
//!   UDP on 127.0.0.1 (taken below the kernel's ephemeral range when there is room, so a
//!   client connection's source port cannot take one between this check and the bind).
//! - `demo-tools smtp-sink ADDR DIR`: a minimal SMTP server that accepts every message and
//!   writes it to `DIR/<time>-<n>.eml` (the envelope as `X-Sink-*` header lines, then the
//!   message), for machines without Postfix's `smtp-sink`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["ports", n] => {
            let n: usize = n.parse().context("ports N: N is a number")?;
            for p in free_ports(n)? {
                println!("{p}");
            }
            Ok(())
        }
        ["smtp-sink", addr, dir] => smtp_sink(addr, Path::new(dir)),
        _ => bail!("usage: demo-tools ports N | demo-tools smtp-sink ADDR DIR"),
    }
}

fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

fn free_ports(n: usize) -> Result<Vec<u16>> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FIRST: u16 = 10_000;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    if low > FIRST + 1_000 {
        let span = u64::from(low - FIRST);
        let mut x = u64::from(std::process::id())
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        for _ in 0..10_000 {
            if out.len() == n {
                return Ok(out);
            }
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let port = FIRST + ((x >> 33) % span) as u16;
            if seen.insert(port) && is_free(port) {
                out.push(port);
            }
        }
    }
    while out.len() < n {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if seen.insert(port) && is_free(port) {
            out.push(port);
        }
    }
    Ok(out)
}

fn smtp_sink(addr: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let dir = Arc::new(dir.to_path_buf());
    let count = Arc::new(AtomicU64::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let dir = dir.clone();
        let count = count.clone();
        std::thread::spawn(move || {
            if let Err(e) = session(conn, &dir, &count) {
                eprintln!("smtp-sink: {e:#}");
            }
        });
    }
    Ok(())
}

/// One SMTP session: every command is accepted; each DATA is stored.
fn session(conn: TcpStream, dir: &Path, count: &AtomicU64) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    out.write_all(b"220 demo-tools smtp-sink ESMTP\r\n")?;
    let (mut from, mut to) = (String::new(), Vec::<String>::new());
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let verb = cmd
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => out.write_all(b"250-demo-tools\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n")?,
            "MAIL" => {
                from = cmd.get(10..).unwrap_or("").to_string();
                to.clear();
                out.write_all(b"250 2.1.0 Ok\r\n")?;
            }
            "RCPT" => {
                to.push(cmd.get(8..).unwrap_or("").to_string());
                out.write_all(b"250 2.1.5 Ok\r\n")?;
            }
            "DATA" => {
                out.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                let mut msg = format!("X-Sink-From: {from}\r\nX-Sink-To: {}\r\n", to.join(", "));
                loop {
                    line.clear();
                    if input.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    if line.trim_end_matches(['\r', '\n']) == "." {
                        break;
                    }
                    msg.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                let n = count.fetch_add(1, Ordering::Relaxed);
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let path: PathBuf = dir.join(format!("{secs}-{n}.eml"));
                let tmp = dir.join(format!(".{secs}-{n}.tmp"));
                std::fs::write(&tmp, msg)?;
                std::fs::rename(&tmp, &path)?;
                out.write_all(b"250 2.0.0 Ok: stored\r\n")?;
            }
            "QUIT" => {
                out.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => out.write_all(b"250 2.0.0 Ok\r\n")?,
        }
    }
}
