//! A cache hit: the blob read from the store, verified piece by piece, and
//! repaired from the origin if a piece fails.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::mpsc;
use tracing::{Instrument, info_span, warn};

use crate::{
    acquire::{Chunk, origin::OriginBlob},
    store::{BlobReader, Store},
    telemetry::{Metrics, SourceBytes},
    vocab::{Digest, RateLimiter},
};

/// Cache hits are queued in slices of this size (a verified piece is up to 4 MiB).
const HIT_SLICE: usize = 256 * 1024;

/// What serving the rest of a hit from the origin takes, should a piece be corrupt.
pub(super) struct Continuation {
    pub origin: OriginBlob,
    pub rate: Arc<RateLimiter>,
    pub store: Option<Store>,
    pub metrics: Arc<Metrics>,
    pub digest: Digest,
    pub bytes: SourceBytes,
}

/// Streams bytes `[start, end)` of a cached blob to `tx`, each piece checked
/// against its stored hash as it is read; from a corrupt piece on, the rest
/// comes from the origin and the copy is dropped.
pub(super) async fn stream_hit(
    reader: BlobReader,
    start: u64,
    end: u64,
    tx: mpsc::Sender<Chunk>,
    ctx: Continuation,
) {
    let metrics = ctx.metrics.clone();
    let counted = ctx.bytes.clone();
    let sender = tx.clone();
    // Blocking reads on the blocking pool; returns where it stopped if a piece was corrupt.
    let stopped = tokio::task::spawn_blocking(move || {
        let mut pos = start;
        let chunks = match reader.read_range(start, end) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cached blob unreadable; the rest comes from the origin");
                return Some(pos);
            }
        };
        for chunk in chunks {
            match chunk {
                Ok(mut data) => {
                    pos += data.len() as u64;
                    metrics.blob_bytes("cache", data.len() as u64);
                    counted.add("cache", data.len() as u64);
                    // Zero-copy slices: the queue holds little more than one piece per client.
                    while !data.is_empty() {
                        let slice = data.split_to(data.len().min(HIT_SLICE));
                        if sender.blocking_send(Ok(Frame::data(slice))).is_err() {
                            return None;
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cached blob failed verification; the rest comes from the origin");
                    return Some(pos);
                }
            }
        }
        None
    })
    .await
    .unwrap_or(None);
    let Some(pos) = stopped else { return };
    let span = info_span!("origin.range", start = pos, end, repair = true);
    async move {
        if let Some(store) = &ctx.store {
            let (store, digest) = (store.clone(), ctx.digest);
            let _ = tokio::task::spawn_blocking(move || store.remove(&digest)).await;
        }
        let mut body = match ctx.origin.range(pos, end).await {
            Ok(r) => r.into_body(),
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        ctx.rate.acquire_high(d.len() as u64).await;
                        ctx.metrics.blob_bytes("origin", d.len() as u64);
                        ctx.bytes.add("origin", d.len() as u64);
                    }
                    if tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}
