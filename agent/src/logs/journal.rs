//! The systemd journal source: a `journalctl --follow --output=json` child, restarted after
//! the last stored cursor when it exits. The cursor travels with each event and reaches the
//! checkpoint only once the event is in the buffer.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bastide_proto::v1::LogEvent;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::checkpoint::{Checkpoints, Update};
use super::config::{LogSourceConfig, StartAt};
use super::{Item, Stats};

/// One journal entry as the pipeline needs it.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub event: LogEvent,
    pub cursor: String,
    pub truncated: bool,
}

fn field_str<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a str> {
    o.get(k).and_then(Value::as_str)
}

/// Journal field values are strings, or arrays of byte values when not valid UTF-8 (or
/// binary), or null when too large and `--all` was not given.
fn field_bytes(v: Option<&Value>) -> Vec<u8> {
    match v {
        Some(Value::String(s)) => s.as_bytes().to_vec(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses one line of `journalctl --output=json`.
pub fn parse_entry(line: &[u8], max_message: usize) -> Result<Entry, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let Value::Object(o) = v else {
        return Err("not a JSON object".into());
    };
    let cursor = field_str(&o, "__CURSOR").ok_or("no __CURSOR")?.to_string();
    let mut message = field_bytes(o.get("MESSAGE"));
    let truncated = message.len() > max_message;
    message.truncate(max_message);
    let timestamp_ms = field_str(&o, "__REALTIME_TIMESTAMP")
        .and_then(|t| t.parse::<i64>().ok())
        .map(|us| us / 1000)
        .unwrap_or_else(super::now_ms);
    let severity = field_str(&o, "PRIORITY")
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|p| *p <= 7)
        .unwrap_or(6);
    let facility = field_str(&o, "SYSLOG_FACILITY")
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|p| *p <= 23)
        .unwrap_or(1);
    let app = field_str(&o, "SYSLOG_IDENTIFIER")
        .or_else(|| field_str(&o, "_COMM"))
        .unwrap_or_default()
        .chars()
        .take(64)
        .collect();
    Ok(Entry {
        event: LogEvent {
            timestamp_ms,
            source: "journal".into(),
            app,
            severity,
            facility,
            message,
        },
        cursor,
        truncated,
    })
}

/// Reads one line of at most `limit` bytes into `buf`; Ok(None) at end of stream, Ok(Some
/// (false)) when the line was longer (its rest is skipped).
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut fits = true;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if buf.is_empty() && fits {
                None
            } else {
                Some(fits)
            });
        }
        let (take, done) = match memchr::memchr(b'\n', avail) {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        let room = limit.saturating_sub(buf.len());
        if take > room {
            fits = false;
        }
        buf.extend_from_slice(&avail[..take.min(room)]);
        r.consume(take);
        if done {
            return Ok(Some(fits));
        }
    }
}

/// Follows the journal until `cancel`; events and cursors go to `tx`.
pub async fn run(
    journalctl: std::path::PathBuf,
    cfg: LogSourceConfig,
    ckpts: Checkpoints,
    max_line: usize,
    tx: mpsc::Sender<Item>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    let source = cfg.id();
    let mut cursor = ckpts.journal.get(&source).cloned();
    let seen_before = ckpts.seen.contains(&source);
    let mut failures = 0u32;
    let mut first = true;
    // JSON escaping and byte arrays can take several bytes per message byte.
    let limit = max_line * 6 + (16 << 10);
    loop {
        let mut cmd = tokio::process::Command::new(&journalctl);
        cmd.args([
            "--follow",
            "--output=json",
            "--all",
            "--no-pager",
            "--quiet",
        ]);
        match &cursor {
            Some(c) => {
                cmd.arg(format!("--after-cursor={c}"));
            }
            None if first && !seen_before && cfg.start_at == StartAt::End => {
                cmd.arg("--lines=0");
            }
            None => {
                cmd.arg("--boot");
            }
        }
        for u in &cfg.units {
            cmd.arg(format!("--unit={u}"));
        }
        if let Some(d) = &cfg.journal_directory {
            cmd.arg("--directory").arg(d);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if failures == 0 {
                    warn!(error = %e, "cannot start journalctl: the journal source is idle (retrying every 30s)");
                }
                failures += 1;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => continue,
                }
            }
        };
        if first {
            first = false;
            if tx
                .send(Item::Update(Update::Seen {
                    source: source.clone(),
                }))
                .await
                .is_err()
            {
                return;
            }
        }
        let (Some(out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
            return;
        };
        let mut out = BufReader::with_capacity(64 << 10, out);
        let mut line = Vec::new();
        let mut got_any = false;
        loop {
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = read_line_bounded(&mut out, &mut line, limit) => r,
            };
            match r {
                Ok(Some(true)) => match parse_entry(&line, max_line) {
                    Ok(e) => {
                        got_any = true;
                        stats
                            .lines_read_journal
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if e.truncated {
                            stats
                                .truncated
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        cursor = Some(e.cursor.clone());
                        let item = Item::Event {
                            event: e.event,
                            update: Some(Update::Journal {
                                source: source.clone(),
                                cursor: e.cursor,
                            }),
                        };
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            r = tx.send(item) => if r.is_err() { return },
                        }
                    }
                    Err(e) => warn!(error = %e, "unparseable journalctl output line skipped"),
                },
                Ok(Some(false)) => {
                    warn!(limit, "journal entry over the size limit skipped");
                    stats.lost("journal_entry_too_long", line.len() as u64);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let status = child.wait().await;
        let mut msg = Vec::new();
        let _ = (&mut err).take(4096).read_to_end(&mut msg).await;
        failures = if got_any { 1 } else { failures + 1 };
        if failures <= 3 || failures.is_multiple_of(100) {
            warn!(status = ?status.ok(), stderr = %String::from_utf8_lossy(&msg).trim(), "journalctl exited: restarting it after the last stored cursor");
        } else {
            info!("journalctl exited again");
        }
        let delay = Duration::from_secs(u64::from(failures.min(6)) * 5);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_string_and_byte_array_messages() {
        let line = br#"{"__CURSOR":"s=abc;i=1","__REALTIME_TIMESTAMP":"1764237600123456","PRIORITY":"3","SYSLOG_FACILITY":"4","SYSLOG_IDENTIFIER":"sshd","_COMM":"sshd-session","MESSAGE":"Failed password for root"}"#;
        let e = parse_entry(line, 1024).unwrap();
        assert_eq!(e.cursor, "s=abc;i=1");
        assert_eq!(e.event.timestamp_ms, 1764237600123);
        assert_eq!(e.event.severity, 3);
        assert_eq!(e.event.facility, 4);
        assert_eq!(e.event.app, "sshd");
        assert_eq!(e.event.message, b"Failed password for root");
        assert_eq!(e.event.source, "journal");

        // Invalid UTF-8 comes as an array of bytes; no PRIORITY means info, no identifier
        // falls back to _COMM.
        let line = br#"{"__CURSOR":"c2","MESSAGE":[104,105,255,10],"_COMM":"daemon"}"#;
        let e = parse_entry(line, 1024).unwrap();
        assert_eq!(e.event.message, vec![104, 105, 255, 10]);
        assert_eq!((e.event.severity, e.event.facility), (6, 1));
        assert_eq!(e.event.app, "daemon");

        // Null MESSAGE (too large without --all), out-of-range PRIORITY, long message.
        let e = parse_entry(br#"{"__CURSOR":"c3","MESSAGE":null,"PRIORITY":"12"}"#, 10).unwrap();
        assert!(e.event.message.is_empty());
        assert_eq!(e.event.severity, 6);
        let e = parse_entry(br#"{"__CURSOR":"c4","MESSAGE":"0123456789abcdef"}"#, 10).unwrap();
        assert_eq!(e.event.message, b"0123456789");
        assert!(e.truncated);

        assert!(parse_entry(br#"{"MESSAGE":"no cursor"}"#, 10).is_err());
        assert!(parse_entry(b"[1,2]", 10).is_err());
        assert!(parse_entry(b"{not json", 10).is_err());
    }

    #[tokio::test]
    async fn bounded_line_reader_skips_overlong_lines() {
        let data = b"short\nxxxxxxxxxxxxxxxxxxxxxxxx\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).await.unwrap(),
            Some(true)
        );
        assert_eq!(buf, b"short\n");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).await.unwrap(),
            Some(false)
        );
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).await.unwrap(),
            Some(true)
        );
        assert_eq!(buf, b"last");
        assert_eq!(read_line_bounded(&mut r, &mut buf, 10).await.unwrap(), None);
    }
}
