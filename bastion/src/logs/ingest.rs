//! Agent log ingest: the bastion end of `ShipLogs`. Batches are formatted in the stream's
//! task (so agents format in parallel), queued to the store's writer without waiting (so one
//! agent's batches pipeline into group commits), and acknowledged in order once durable.
//!
//! One stream per agent at a time: a new stream cancels the previous one and waits until it
//! has stopped reading, so two streams can never interleave one agent's sequence numbers
//! (a batch overtaking an earlier one would make the earlier one look like a duplicate).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bastide_proto::v1::{LogAck, LogBatch};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use super::format::{day_of, now_ms, push_line_with, TsCache};
use super::metrics::{counters, Source};
use super::store::{Chunk, Mark, StoreError, Stored};
use super::Logs;

/// Batches queued to the writer and not yet acknowledged, per stream.
const IN_FLIGHT: usize = 64;
/// Most events in one batch.
pub const MAX_EVENTS: usize = 100_000;

type Slot = (u64, CancellationToken, Arc<tokio::sync::Mutex<()>>);

/// The live stream of each agent.
#[derive(Clone, Default)]
pub struct Streams(Arc<Mutex<HashMap<String, Slot>>>);

/// Formats a batch into one chunk for `agent`, filed under today's date.
pub fn format_batch(agent: &str, batch: &LogBatch, max_event: usize) -> Chunk {
    let now = now_ms();
    let c = counters();
    let mut data = Vec::with_capacity(
        batch
            .events
            .iter()
            .map(|e| e.message.len().min(max_event) + 96)
            .sum(),
    );
    let (mut bytes, mut bad, mut truncated) = (0u64, 0u64, 0u64);
    let mut tsc = TsCache::default();
    for e in &batch.events {
        let mut msg: &[u8] = &e.message;
        if msg.len() > max_event {
            msg = &msg[..max_event];
            truncated += 1;
        }
        while let Some((&last, rest)) = msg.split_last() {
            if last == b'\n' || last == b'\r' {
                msg = rest;
            } else {
                break;
            }
        }
        bytes += msg.len() as u64;
        let ts = if e.timestamp_ms > 0 {
            e.timestamp_ms
        } else {
            now
        };
        let app = if e.app.is_empty() {
            e.source.rsplit('/').next().unwrap_or("")
        } else {
            e.app.as_str()
        };
        if !push_line_with(
            &mut data,
            &mut tsc,
            ts,
            agent,
            app,
            e.facility.min(255) as u8,
            e.severity.min(255) as u8,
            msg,
        ) {
            bad += 1;
        }
    }
    c.add(Source::Agent, batch.events.len() as u64, bytes);
    c.invalid_utf8[Source::Agent as usize].fetch_add(bad, Relaxed);
    c.truncated[Source::Agent as usize].fetch_add(truncated, Relaxed);
    Chunk {
        host: Arc::from(agent),
        day: day_of(now),
        data,
        lines: batch.events.len() as u32,
    }
}

/// The gRPC status of a batch the store did not take: `RESOURCE_EXHAUSTED` when its
/// filesystem is full, `UNAVAILABLE` otherwise; the agent keeps the batch either way.
fn refusal(e: &StoreError) -> Status {
    match e {
        StoreError::Full(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// Serves one `ShipLogs` stream of `agent` (the certificate's name).
pub async fn ship(
    logs: Logs,
    agent: String,
    mut inbound: Streaming<LogBatch>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<LogAck, Status>> {
    let (tx, rx) = mpsc::channel::<Result<LogAck, Status>>(IN_FLIGHT);
    let (pending_tx, mut pending_rx) =
        mpsc::channel::<(u64, u64, oneshot::Receiver<Result<Stored, StoreError>>)>(IN_FLIGHT);

    // Take over from a previous stream of the same agent.
    let me = CancellationToken::new();
    let id = rand::random::<u64>();
    let lock = {
        let mut map = match logs.streams.0.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let lock = match map.get(&agent) {
            Some((_, old, lock)) => {
                old.cancel();
                lock.clone()
            }
            None => Arc::new(tokio::sync::Mutex::new(())),
        };
        map.insert(agent.clone(), (id, me.clone(), lock.clone()));
        lock
    };

    let reader_tx = tx.clone();
    let max_event = logs.cfg.max_event_bytes;
    let streams = logs.streams.clone();
    let store = logs.store.clone();
    let name = agent.clone();
    tokio::spawn(async move {
        let _guard = lock.lock().await;
        // Every batch of the previous stream is queued by now: the writer may expect this
        // agent's refused batches again.
        if store.stream_started(&name).await.is_err() {
            let _ = reader_tx.send(Err(refusal(&StoreError::Closed))).await;
            return;
        }
        debug!(agent = %name, "log stream opened");
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = me.cancelled() => {
                    debug!(agent = %name, "log stream replaced by a newer one");
                    break;
                }
                m = inbound.message() => m,
            };
            let batch = match msg {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(status) => {
                    debug!(agent = %name, error = %status, "log stream ended");
                    break;
                }
            };
            if batch.seq == 0 || batch.events.len() > MAX_EVENTS {
                warn!(agent = %name, seq = batch.seq, events = batch.events.len(), "log batch refused");
                let _ = reader_tx
                    .send(Err(Status::invalid_argument(format!(
                        "batch seq must be >= 1 and hold at most {MAX_EVENTS} events"
                    ))))
                    .await;
                break;
            }
            let (epoch, seq) = (batch.epoch, batch.seq);
            let name2 = name.clone();
            // Formatting a large batch is CPU work: off the async workers.
            let chunk =
                match tokio::task::spawn_blocking(move || format_batch(&name2, &batch, max_event))
                    .await
                {
                    Ok(c) => c,
                    Err(_) => break,
                };
            let mark = Mark {
                agent: name.clone(),
                epoch,
                seq,
            };
            let chunks = if chunk.lines == 0 {
                vec![]
            } else {
                vec![chunk]
            };
            let done = match store.submit(chunks, Some(mark)).await {
                Ok(d) => d,
                Err(e) => {
                    let _ = reader_tx.send(Err(refusal(&e))).await;
                    break;
                }
            };
            if pending_tx.send((epoch, seq, done)).await.is_err() {
                break;
            }
        }
        let mut map = match streams.0.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.get(&name).is_some_and(|(i, _, _)| *i == id) {
            map.remove(&name);
        }
    });

    tokio::spawn(async move {
        while let Some((epoch, seq, done)) = pending_rx.recv().await {
            match done.await {
                Ok(Ok(_)) => {
                    if tx.send(Ok(LogAck { epoch, seq })).await.is_err() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    warn!(agent = %agent, epoch, seq, error = %e, "log batch not stored, refused (the agent keeps it and retries)");
                    let _ = tx.send(Err(refusal(&e))).await;
                    break;
                }
                Err(_) => {
                    let _ = tx
                        .send(Err(Status::unavailable("the log store is shutting down")))
                        .await;
                    break;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
