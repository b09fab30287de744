//! The direct-tcpip pump: bytes both ways between an SSH channel and a TCP connection to
//! the target, with half-close (EOF one way keeps the other flowing), an idle timeout, and
//! per-channel flow control: the client's window for a channel is re-opened only as its
//! target takes the data, so a slow or stuck target stalls its own channel, never the
//! connection's other channels.

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

/// Consumed bytes are handed back to the client's window in batches of this much (or half
/// the window if smaller): each hand-back is one SSH_MSG_CHANNEL_WINDOW_ADJUST packet.
/// OpenSSH re-opens its windows after about three packets (3 x 32 KiB); 256 KiB is 4096
/// window adjustments per GiB, far below the data packets' cost, and a fraction of the
/// 16 MiB window the client may still use meanwhile.
const CREDIT_BATCH: u32 = 256 * 1024;

/// How the channel's receive window is managed: russh (patched, see vendor/README.md) only
/// re-opens it when `consumed` is called, so the client can never have more than `window`
/// bytes in flight or buffered here for this channel, and a target that stops reading
/// stalls this channel only.
pub struct Window {
    pub handle: russh::server::Handle,
    pub id: russh::ChannelId,
    /// The initial window (russh's `Config::window_size`).
    pub size: u32,
    /// The largest packet the client may send (`Config::maximum_packet_size`).
    pub max_packet: u32,
}

/// Pumps until both directions are done, either side closes, the channel is idle for
/// `idle`, or `stop` is cancelled. Closes the channel at the end.
#[allow(clippy::too_many_arguments)]
pub async fn pump(
    channel: Channel<Msg>,
    window: Window,
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

    // Client to target: `drain` always empties the channel's queue at once into `buf` (so
    // russh's connection loop never waits on this channel), `feed` writes it to the target
    // and hands the consumed bytes back to the client's window. `None` in the buffer is the
    // client's EOF. The buffer cannot exceed the window: a client that sends more than it
    // was granted breaks the protocol and loses the channel.
    let limit = window.size as usize + window.max_packet as usize;
    let batch = CREDIT_BATCH.min(window.size / 2).max(1);
    let buf = std::sync::Mutex::new((std::collections::VecDeque::new(), 0usize));
    let ready = tokio::sync::Notify::new();
    let drain = async {
        loop {
            let msg = tokio::select! {
                _ = end.cancelled() => return,
                m = rd.wait() => m,
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    touch(&last);
                    let over = match buf.lock() {
                        Ok(mut g) => {
                            g.1 += data.len();
                            g.0.push_back(Some(data));
                            g.1 > limit
                        }
                        Err(_) => true,
                    };
                    if over {
                        set_why("client overran the channel window");
                        end.cancel();
                        return;
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
        let mut owed: u32 = 0;
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
            owed = owed.saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
            if owed >= batch {
                if window
                    .handle
                    .channel_consumed(window.id, owed)
                    .await
                    .is_err()
                {
                    set_why("client gone");
                    end.cancel();
                    return;
                }
                owed = 0;
            }
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
