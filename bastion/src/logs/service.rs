//! How the daemon starts the log store (see `crate::service`): it is opened (and recovered)
//! at bind time, before anything can write to it, and published for the agents' endpoint
//! and syslog. Also `bastide logs` (a streaming admin command) and the store's status.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::Logs;
use crate::config::Config;
use crate::control::{send_line, AdminResponse};
use crate::metrics::names;
use crate::service::{Ctx, Service};

/// The admin command of the log store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogsRequest {
    /// `bastide logs`: the answer is streamed, one `{"line": ...}` per event, then the
    /// usual response line.
    Logs(super::query::LogsQuery),
}

const COMMANDS: &[&str] = &["logs"];

/// The log store, opened.
pub struct LogStore {
    logs: Logs,
}

impl Service for LogStore {
    const NAME: &'static str = "logs";

    async fn bind(cfg: &Config, ctx: &Ctx) -> Result<Option<Self>> {
        let Some(l) = &cfg.logs else {
            ctx.admin
                .off(COMMANDS, "the log store is off (no [logs] table)");
            return Ok(None);
        };
        let logs = Logs::open(l.clone(), &cfg.state_dir)
            .with_context(|| format!("{}: logs", cfg.source.display()))?;
        ctx.handles.provide(logs.clone());
        let l = logs.clone();
        ctx.admin.stream(COMMANDS, move |req: LogsRequest, rd, wr| {
            let LogsRequest::Logs(q) = req;
            logs_stream(q, l.clone(), rd, wr)
        });
        let l = logs.clone();
        ctx.admin.status("logs", move || l.status());
        ctx.collectors.register(collect);
        ctx.collectors.register_text(|out| {
            let micros = super::metrics::counters().commit_micros.load(Relaxed);
            names::text_counter(
                out,
                names::LOGS_COMMIT_SECONDS,
                names::LOGS_COMMIT_SECONDS_HELP,
                micros as f64 / 1e6,
            );
        });
        Ok(Some(Self { logs }))
    }

    async fn run(self, _ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
        super::run(self.logs, shutdown).await
    }
}

/// Copies the log store's and syslog's counters into the recorder (before each scrape).
pub(crate) fn collect() {
    for (name, source, v) in super::metrics::counters().export() {
        let labels = source
            .map(|s| vec![::metrics::Label::new("source", s)])
            .unwrap_or_default();
        names::export(name, labels, v);
    }
}

/// Streams `bastide logs`: matching stored lines, then (with `follow`) live ones until the
/// client goes away. Each event is one `{"line": "..."}` line; the last line is the usual
/// response.
async fn logs_stream(
    q: super::query::LogsQuery,
    logs: Logs,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
) -> Result<()> {
    use super::query::{scan, Filter};
    async fn send(wr: &mut OwnedWriteHalf, v: &serde_json::Value) -> Result<()> {
        send_line(wr, v).await
    }
    let end = |r: Result<u64>| {
        serde_json::to_value(AdminResponse::from_result(
            r.map(|n| serde_json::json!({ "events": n })),
        ))
    };
    let filter = match Filter::new(&q) {
        Ok(f) => Arc::new(f),
        Err(e) => return send(&mut wr, &end(Err(e))?).await,
    };
    // Subscribe before reading the files: a line committed meanwhile is shown (at worst
    // twice), never missed.
    let mut live = q.follow.then(|| logs.store.subscribe());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
    let dir = logs.store.dir().to_path_buf();
    let f2 = filter.clone();
    let scanner = tokio::task::spawn_blocking(move || {
        scan(&dir, &f2, &mut |line| tx.blocking_send(line).is_ok())
    });
    let mut n = 0u64;
    while let Some(line) = rx.recv().await {
        if send(&mut wr, &serde_json::json!({ "line": line }))
            .await
            .is_err()
        {
            return Ok(());
        }
        n += 1;
    }
    let scanned = scanner.await.context("log scan task")?;
    if let Err(e) = scanned {
        return send(&mut wr, &end(Err(e))?).await;
    }
    if let Some(live) = live.as_mut() {
        let mut probe = [0u8; 64];
        loop {
            tokio::select! {
                // The client closing its end stops the stream.
                r = rd.read(&mut probe) => if matches!(r, Ok(0) | Err(_)) { return Ok(()); },
                g = live.recv() => match g {
                    Ok(chunks) => {
                        for c in chunks.iter() {
                            for line in String::from_utf8_lossy(&c.data).lines() {
                                if filter.line_ok(line).is_some() {
                                    if send(&mut wr, &serde_json::json!({ "line": line })).await.is_err() {
                                        return Ok(());
                                    }
                                    n += 1;
                                }
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                        let note = format!("(bastide: {k} groups of lines skipped: the output was too slow)");
                        if send(&mut wr, &serde_json::json!({ "notice": note })).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(_) => break,
                },
            }
        }
    }
    send(&mut wr, &end(Ok(n))?).await
}
