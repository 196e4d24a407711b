//! A cache hit: the blob read from the store, verified piece by piece, and
//! repaired from the origin if a piece fails.
//!
//! A piece is verified whole, so it is in memory whole while it goes out.
//! Every client reading from the cache shares one budget of such pieces
//! ([`HitMemory`]): a node serving hundreds of readers at once (a seed
//! during a preheat) holds a few pieces, not two per reader.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    acquire::{Chunk, origin::OriginBlob},
    store::{BlobReader, Store},
    telemetry::{Metrics, SourceBytes},
    vocab::{Digest, RateLimiter},
};

/// Cache hits are queued in slices of this size (a verified piece is up to 4 MiB).
const HIT_SLICE: usize = 256 * 1024;

/// Pieces read from the cache held in memory at once, across all readers.
const HIT_PIECES_IN_MEMORY: usize = 8;
/// A reader waits this long for its share before it reads anyway: clients
/// that stop reading keep their pieces, and must not stall every other.
const HIT_MEMORY_WAIT: Duration = Duration::from_secs(10);

/// The budget of cached pieces in memory for clients, shared by all readers.
#[derive(Clone)]
pub(super) struct HitMemory(Arc<Semaphore>);

impl Default for HitMemory {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(HIT_PIECES_IN_MEMORY)))
    }
}

impl HitMemory {
    async fn piece(&self) -> Option<OwnedSemaphorePermit> {
        match tokio::time::timeout(HIT_MEMORY_WAIT, self.0.clone().acquire_owned()).await {
            Ok(permit) => permit.ok(),
            Err(_) => {
                debug!("no memory for a cached piece in time: reading it anyway");
                None
            }
        }
    }
}

/// A verified piece and its share of the budget, released when the last
/// slice of it has been written out.
struct Held {
    data: Bytes,
    _share: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// What serving the rest of a hit from the origin takes, should a piece be corrupt.
pub(super) struct Continuation {
    pub origin: OriginBlob,
    pub rate: Arc<RateLimiter>,
    pub store: Option<Store>,
    pub metrics: Arc<Metrics>,
    pub digest: Digest,
    pub bytes: SourceBytes,
    pub memory: HitMemory,
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
    let stopped = send_cached(reader, start, end, &tx, &ctx).await;
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

/// Sends the verified pieces of `[start, end)` to `tx`, one piece read at a
/// time within the shared budget. `Some(pos)`: a piece at `pos` was corrupt
/// or unreadable, the rest is the origin's to send; `None`: all sent, or
/// the client left.
async fn send_cached(
    reader: BlobReader,
    start: u64,
    end: u64,
    tx: &mpsc::Sender<Chunk>,
    ctx: &Continuation,
) -> Option<u64> {
    let mut pos = start;
    let mut chunks = match reader.read_range(start, end) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cached blob unreadable; the rest comes from the origin");
            return Some(pos);
        }
    };
    loop {
        let share = ctx.memory.piece().await;
        // Blocking reads on the blocking pool.
        let (back, next) = tokio::task::spawn_blocking(move || {
            let next = chunks.next();
            (chunks, next)
        })
        .await
        .ok()?;
        chunks = back;
        let data = match next? {
            Ok(data) => data,
            Err(e) => {
                warn!(error = %e, "cached blob failed verification; the rest comes from the origin");
                return Some(pos);
            }
        };
        pos += data.len() as u64;
        ctx.metrics.blob_bytes("cache", data.len() as u64);
        ctx.bytes.add("cache", data.len() as u64);
        // Zero-copy slices of the piece; its share goes with the last one.
        let mut data = Bytes::from_owner(Held {
            data,
            _share: share,
        });
        while !data.is_empty() {
            let slice = data.split_to(data.len().min(HIT_SLICE));
            if tx.send(Ok(Frame::data(slice))).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::HeaderMap;

    use super::*;
    use crate::{
        origin::{OriginClient, OriginRef},
        testing::TempDir,
    };

    const PS: u64 = 64 * 1024;

    /// A committed 3-piece blob, and what a hit needs to stream it.
    fn cached(dir: &TempDir) -> (BlobReader, Continuation, Vec<u8>) {
        let data: Vec<u8> = (0..3 * PS).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let store = Store::open(&dir.0, 1 << 30, PS).unwrap();
        let mut w = store.begin(&digest, data.len() as u64).unwrap();
        for (i, piece) in data.chunks(PS as usize).enumerate() {
            w.write_piece(i as u64, piece).unwrap();
        }
        let reader = w.commit().unwrap();
        let origin = OriginBlob::new(
            &OriginClient::with_roots(rustls::RootCertStore::empty()),
            &OriginRef::new("https", "registry.test", 443),
            &format!("/v2/app/blobs/{digest}"),
            HeaderMap::new(),
        );
        let ctx = Continuation {
            origin,
            rate: Arc::new(RateLimiter::unlimited()),
            store: Some(store),
            metrics: Arc::new(Metrics::new()),
            digest,
            bytes: SourceBytes::default(),
            memory: HitMemory::default(),
        };
        (reader, ctx, data)
    }

    /// The whole budget, as readers that hold every share take it.
    async fn all_of(memory: &HitMemory) -> OwnedSemaphorePermit {
        let all = HIT_PIECES_IN_MEMORY as u32;
        memory.0.clone().acquire_many_owned(all).await.unwrap()
    }

    async fn drain(mut rx: mpsc::Receiver<Chunk>) -> Vec<u8> {
        let mut got = Vec::new();
        while let Some(Ok(frame)) = rx.recv().await {
            got.extend_from_slice(&frame.into_data().unwrap());
        }
        got
    }

    #[tokio::test(start_paused = true)]
    async fn a_piece_waits_for_its_share_of_memory_and_gives_it_back() {
        let dir = TempDir::new("hit");
        let (reader, ctx, data) = cached(&dir);
        let memory = ctx.memory.clone();
        // Other readers hold the whole budget.
        let held = all_of(&memory).await;
        let (tx, rx) = mpsc::channel(64);
        let started = tokio::time::Instant::now();
        let reading = tokio::spawn(async move { send_cached(reader, 0, 3 * PS, &tx, &ctx).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!reading.is_finished(), "read before any memory was free");
        drop(held);
        let got = tokio::spawn(drain(rx));
        assert_eq!(reading.await.unwrap(), None);
        assert_eq!(got.await.unwrap(), data);
        assert!(started.elapsed() < HIT_MEMORY_WAIT);
        // Every share came back once its piece was sent.
        assert_eq!(memory.0.available_permits(), HIT_PIECES_IN_MEMORY);
    }

    /// Clients that stop reading keep their pieces: the others read anyway
    /// once they have waited long enough, rather than stall for good.
    #[tokio::test(start_paused = true)]
    async fn a_reader_is_never_stalled_for_good_by_others_that_stopped() {
        let dir = TempDir::new("hit");
        let (reader, ctx, data) = cached(&dir);
        let _stalled = all_of(&ctx.memory).await;
        let (tx, rx) = mpsc::channel(64);
        let started = tokio::time::Instant::now();
        let got = tokio::spawn(drain(rx));
        assert_eq!(send_cached(reader, 0, 3 * PS, &tx, &ctx).await, None);
        drop(tx);
        assert_eq!(got.await.unwrap(), data);
        assert!(started.elapsed() >= HIT_MEMORY_WAIT);
    }
}
