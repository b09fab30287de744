//! The direct-tcpip pump: bytes both ways between an SSH channel and a TCP connection to
//! the target, with half-close (EOF one way keeps the other flowing), an idle timeout, and
//! the channel's flow control respected without blocking the rest of the connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Counters;

/// Bytes moved each way.
#[derive(Debug, Default)]
pub struct Traffic {
    pub to_target: AtomicU64,
    pub from_target: AtomicU64,
}

/// Read size from the target: two of the client's usual 32 KiB packets per read.
const READ_BUF: usize = 64 * 1024;

/// Bytes from the client held for a target that is slower than the client. russh re-opens
/// a channel's window as data arrives, not as it is consumed, and hands data to the
/// channel through a bounded queue that its connection loop waits on: a channel that
/// stops reading stalls every channel of the connection. So each channel is drained at
/// once into this buffer; only when it is full does the channel stop reading (and the
/// connection wait), for at most the stall timeout.
const TARGET_BUFFER: usize = 8 * 1024 * 1024;

/// Pumps until both directions are done, either side closes, the channel is idle for
/// `idle`, or `stop` is cancelled. Closes the channel at the end.
pub async fn pump(
    channel: Channel<Msg>,
    tcp: TcpStream,
    idle: Duration,
    stall: Duration,
    stop: CancellationToken,
    traffic: Arc<Traffic>,
    counters: Arc<Counters>,
) -> &'static str {
    let (mut rd, wr) = channel.split();
    let (mut tr, mut tw) = tcp.into_split();
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let touch = |last: &AtomicU64| {
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    let end = stop.child_token();
    let why = Arc::new(std::sync::Mutex::new("closed"));
    let set_why = |w: &'static str| {
        if let Ok(mut g) = why.lock() {
            if *g == "closed" {
                *g = w;
            }
        }
    };

    // Client to target: `drain` empties the channel into `buf` (up to TARGET_BUFFER),
    // `feed` writes it to the target. `None` in the buffer is the client's EOF.
    let buf = std::sync::Mutex::new((std::collections::VecDeque::new(), 0usize));
    let room = tokio::sync::Notify::new();
    let ready = tokio::sync::Notify::new();
    let drain = async {
        loop {
            loop {
                let full = buf.lock().map(|g| g.1 >= TARGET_BUFFER).unwrap_or(true);
                if !full {
                    break;
                }
                tokio::select! {
                    _ = end.cancelled() => return,
                    _ = room.notified() => {}
                }
            }
            let msg = tokio::select! {
                _ = end.cancelled() => return,
                m = rd.wait() => m,
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    touch(&last);
                    if let Ok(mut g) = buf.lock() {
                        g.1 += data.len();
                        g.0.push_back(Some(data));
                    }
                    ready.notify_one();
                }
                Some(ChannelMsg::Eof) => {
                    // The client is done sending; the target may still answer.
                    if let Ok(mut g) = buf.lock() {
                        g.0.push_back(None);
                    }
                    ready.notify_one();
                    return;
                }
                Some(ChannelMsg::Close) | None => {
                    set_why("client closed");
                    end.cancel();
                    return;
                }
                Some(_) => {}
            }
        }
    };
    let feed = async {
        loop {
            let next = buf.lock().ok().and_then(|mut g| g.0.pop_front());
            let Some(chunk) = next else {
                tokio::select! {
                    _ = end.cancelled() => return,
                    _ = ready.notified() => {}
                }
                continue;
            };
            let Some(data) = chunk else {
                let _ = tw.shutdown().await;
                return;
            };
            let len = data.len();
            let mut off = 0;
            while off < len {
                // Progress, not completion, is timed: a slow target is fine, a target
                // that takes nothing for `stall` is not.
                let w = tokio::select! {
                    _ = end.cancelled() => return,
                    w = tokio::time::timeout(stall, tw.write(&data[off..])) => w,
                };
                match w {
                    Ok(Ok(n)) if n > 0 => off += n,
                    Ok(_) => {
                        set_why("target write failed");
                        end.cancel();
                        return;
                    }
                    Err(_) => {
                        set_why("target not reading");
                        end.cancel();
                        return;
                    }
                }
            }
            if let Ok(mut g) = buf.lock() {
                g.1 -= len;
            }
            room.notify_one();
            traffic.to_target.fetch_add(len as u64, Ordering::Relaxed);
            counters
                .bytes_to_target
                .fetch_add(len as u64, Ordering::Relaxed);
        }
    };
    let up = async { tokio::join!(drain, feed) };

    let down = async {
        let mut writer = wr.make_writer();
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let n = tokio::select! {
                _ = end.cancelled() => return,
                r = tr.read(&mut buf) => match r {
                    Ok(n) => n,
                    Err(_) => { set_why("target read failed"); end.cancel(); return; }
                },
            };
            if n == 0 {
                let _ = wr.eof().await;
                return;
            }
            touch(&last);
            let w = tokio::select! {
                _ = end.cancelled() => return,
                w = writer.write_all(&buf[..n]) => w,
            };
            if w.is_err() {
                set_why("client gone");
                end.cancel();
                return;
            }
            traffic.from_target.fetch_add(n as u64, Ordering::Relaxed);
            counters
                .bytes_from_target
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    };

    let idle_watch = async {
        loop {
            let seen = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + seen + idle;
            tokio::select! {
                _ = end.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let seen2 = Duration::from_millis(last.load(Ordering::Relaxed));
            if seen2 == seen {
                set_why("idle timeout");
                end.cancel();
                return;
            }
        }
    };

    let both = async { tokio::join!(up, down) };
    tokio::select! {
        _ = both => {}
        _ = idle_watch => {}
    }
    if stop.is_cancelled() {
        set_why("bastion shutting down");
    }
    end.cancel();
    let _ = wr.close().await;
    let w = why.lock().map(|g| *g).unwrap_or("closed");
    w
}
