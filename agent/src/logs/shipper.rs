//! Streams the buffer to the bastion over `ShipLogs`, on the session's mTLS channel: from
//! the oldest unacknowledged batch, in sequence order, with a bounded window of batches in
//! flight; each acknowledgement deletes what it covers. Reconnecting is the session's job:
//! the shipper lives as long as one session and retries its stream within it.

use std::sync::Arc;
use std::time::Duration;

use bastide_proto::v1::LogAck;
use prost::Message;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::buffer::RawBatch;
use super::Shared;

/// Batches sent ahead of the last acknowledgement.
const WINDOW: u64 = 16;
/// A stream with everything acknowledged and nothing new for this long is closed, and
/// opened again for the next batch: an idle agent then holds no stream buffers (tonic's
/// encode buffer keeps the capacity of the largest batch sent, 1 MiB by default, for as
/// long as the stream lives).
pub const IDLE_CLOSE: Duration = Duration::from_secs(10);
/// How often to ask again a bastion without a log store.
const NO_STORE_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ShipError {
    #[error("the bastion has no log store (ShipLogs unimplemented)")]
    NoLogStore,
    #[error("log stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the bastion closed the log stream")]
    Closed,
    #[error("acknowledgement for epoch {got}, ours is {ours}")]
    WrongEpoch { got: u64, ours: u64 },
    #[error("log buffer: {0:#}")]
    Buffer(anyhow::Error),
}

fn classify(s: tonic::Status) -> ShipError {
    if s.code() == tonic::Code::Unimplemented {
        ShipError::NoLogStore
    } else {
        ShipError::Status(s)
    }
}

/// Ships until `cancel` (the session ended). Errors of one stream are retried on the same
/// channel with a growing delay; a bastion without log store is asked again every 30s and
/// reported once.
pub async fn run(client: Channel, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut backoff = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let acked_before = *shared.acked.borrow();
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = ship_once(client.clone(), &shared) => r,
        };
        // A stream that made progress before failing starts the delays over: one refusal
        // an hour must not leave the shipper waiting the longest delay forever.
        if *shared.acked.borrow() > acked_before {
            backoff.reset();
        }
        let delay = match r {
            Err(ShipError::NoLogStore) => {
                if !shared
                    .no_store_reported
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!("the bastion has no log store yet: logs stay in the agent's buffer, asking again every 30s");
                } else {
                    debug!("the bastion still has no log store");
                }
                NO_STORE_RETRY
            }
            Err(ShipError::Status(s)) if s.code() == tonic::Code::ResourceExhausted => {
                let d = backoff.next_delay();
                warn!(code = ?s.code(), error = %s.message(), retry_in_ms = d.as_millis() as u64,
                    "the bastion refused a log batch (its log store is full): keeping every batch in the buffer");
                d
            }
            Err(e) => {
                let d = backoff.next_delay();
                warn!(error = %e, retry_in_ms = d.as_millis() as u64, "log stream ended");
                d
            }
            Ok(()) => {
                debug!("log stream closed while idle");
                // Opened again once there is something to send.
                let mut appended = shared.appended.subscribe();
                loop {
                    if *appended.borrow_and_update() > *shared.acked.borrow() {
                        break;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = appended.changed() => if r.is_err() { return },
                    }
                }
                backoff.reset();
                continue;
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Sends buffered records (already `LogBatch`-encoded) as they are, decodes `LogAck`s.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawBatchCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawBatchEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct AckDecoder;

impl Codec for RawBatchCodec {
    type Encode = RawBatch;
    type Decode = LogAck;
    type Encoder = RawBatchEncoder;
    type Decoder = AckDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawBatchEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        AckDecoder
    }
}

impl Encoder for RawBatchEncoder {
    type Item = RawBatch;
    type Error = tonic::Status;

    fn encode(&mut self, item: RawBatch, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(item.encoded());
        Ok(())
    }
}

impl Decoder for AckDecoder {
    type Item = LogAck;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<LogAck>, tonic::Status> {
        LogAck::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding a log acknowledgement: {e}")))
    }
}

/// One `ShipLogs` stream, until it fails, or `Ok` once closed while idle (`IDLE_CLOSE`).
pub async fn ship_once(channel: Channel, shared: &Arc<Shared>) -> Result<(), ShipError> {
    let (tx, rx) = mpsc::channel::<RawBatch>(4);
    let idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The sender runs beside the call: a server may wait for the first batch before it
    // answers with its response headers.
    let sender = tokio::spawn(send_loop(shared.clone(), tx, idle.clone()));
    let _abort = AbortOnDrop(sender);
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| {
        ShipError::Status(tonic::Status::unavailable(format!(
            "channel not ready: {e}"
        )))
    })?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.extensions_mut()
        .insert(tonic::GrpcMethod::new("bastide.v1.Agent", "ShipLogs"));
    let mut acks = grpc
        .streaming(
            req,
            PathAndQuery::from_static("/bastide.v1.Agent/ShipLogs"),
            RawBatchCodec,
        )
        .await
        .map_err(classify)?
        .into_inner();
    let mut announced = false;
    loop {
        match acks.message().await {
            Ok(Some(ack)) => {
                if ack.epoch != shared.epoch {
                    return Err(ShipError::WrongEpoch {
                        got: ack.epoch,
                        ours: shared.epoch,
                    });
                }
                if !announced {
                    announced = true;
                    // Once per agent run at info: streams come and go with idleness.
                    if !shared
                        .acks_reported
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        info!(acked = ack.seq, "the bastion acknowledges log batches");
                    } else {
                        debug!(acked = ack.seq, "log stream acknowledged");
                    }
                }
                let s = shared.clone();
                tokio::task::spawn_blocking(move || s.ack(ack.seq))
                    .await
                    .map_err(|e| ShipError::Buffer(e.into()))?
                    .map_err(ShipError::Buffer)?;
            }
            // The sender ended the stream with everything acknowledged.
            Ok(None) if idle.load(std::sync::atomic::Ordering::Relaxed) => return Ok(()),
            Ok(None) => return Err(ShipError::Closed),
            Err(s) => return Err(classify(s)),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send_loop(
    shared: Arc<Shared>,
    tx: mpsc::Sender<RawBatch>,
    idle: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut appended = shared.appended.subscribe();
    let mut acked = shared.acked.subscribe();
    let mut next = *acked.borrow_and_update() + 1;
    loop {
        let a = *acked.borrow_and_update();
        next = next.max(a + 1);
        let last = *appended.borrow_and_update();
        if next > last {
            if a >= last {
                // Everything sent is acknowledged: wait for more, for a while.
                tokio::select! {
                    r = appended.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(IDLE_CLOSE) => {
                        idle.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            } else {
                tokio::select! {
                    r = appended.changed() => if r.is_err() { return },
                    r = acked.changed() => if r.is_err() { return },
                }
            }
            continue;
        }
        if next - a > WINDOW {
            if acked.changed().await.is_err() {
                return;
            }
            continue;
        }
        let s = shared.clone();
        let seq = next;
        let batch = match tokio::task::spawn_blocking(move || s.read_raw(seq)).await {
            Ok(Ok(Some(b))) => b,
            // Acknowledged meanwhile: the loop moves past it.
            Ok(Ok(None)) => {
                next += 1;
                continue;
            }
            Ok(Err(e)) => {
                warn!(seq, error = %format!("{e:#}"), "cannot read a buffered log batch");
                return;
            }
            Err(_) => return,
        };
        if tx.send(batch).await.is_err() {
            return;
        }
        let stats = &shared.stats;
        stats
            .batches_shipped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if stats
            .highest_sent
            .fetch_max(seq, std::sync::atomic::Ordering::Relaxed)
            >= seq
        {
            stats
                .batches_resent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        next += 1;
    }
}
