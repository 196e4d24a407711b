//! Getting a blob's bytes once the origin has said this client may have it:
//! from the cache, from peers, or from the origin, written to the store as
//! they come and streamed to the client at once. `registry/` decides who may
//! have what and speaks HTTP; this module decides where the bytes come from.
//!
//! - [`lead`]: one download per digest on this node; the others wait for it;
//! - [`hit`]: a cached blob, verified as it is read, repaired from the origin;
//! - [`download`]: a blob from the origin in one stream;
//! - [`swarm`] with [`driver`] and [`in_order`]: a blob from peers, pieces
//!   the swarm cannot give from the origin, delivered in order and checked
//!   against the blob's digest;
//! - [`resume`]: what a killed download left, used by both;
//! - [`poison`]: blobs whose swarm copy lied, kept off the swarm a while;
//! - [`origin`]: every request the blob path makes to the origin.

mod download;
mod driver;
mod hit;
mod lead;
mod origin;
mod poison;
mod resume;
mod swarm;

pub use origin::OriginBlob;

use damselfly_core::in_order;
use std::{path::PathBuf, sync::Arc, time::Instant};

use bytes::Bytes;
use hyper::{Response, StatusCode, body::Frame, body::Incoming};
use tokio::sync::mpsc;
use tracing::{Instrument, field, info, info_span};

use crate::{
    origin::{BoxError, OriginError, headers::content_length},
    store::{BlobReader, BlobWriter, Store, StoreError},
    swarm::{Progress, Swarm},
    telemetry::{Metrics, SourceBytes},
    vocab::{Digest, RateLimiter},
};
use download::Download;
use lead::{Inflight, Lead};
use poison::Poisoned;

/// One piece of a blob's body on its way to the client.
pub type Chunk = Result<Frame<Bytes>, BoxError>;

/// Chunks in flight between a producer and a client connection.
pub const CHANNEL_DEPTH: usize = 8;

/// Where a blob's bytes come from, for the client the origin said yes to.
pub struct Acquire {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Peers to fetch from; `None` without a tracker.
    pub swarm: Option<Arc<Swarm>>,
    /// `--origin-rate`: shared by every blob byte fetched from an origin to
    /// be cached (blobs only streamed through are not counted).
    pub origin_rate: Arc<RateLimiter>,
    inflight: Inflight,
    poisoned: Poisoned,
    /// Cached pieces in memory on their way to clients, for all of them.
    hit_memory: hit::HitMemory,
}

/// What came of asking for a blob.
pub enum Acquired {
    /// Complete in the cache (after waiting for another request's download).
    Cached(BlobReader),
    /// On its way: from the swarm or the origin, into the store as it comes.
    Streaming {
        size: u64,
        body: mpsc::Receiver<Chunk>,
    },
    /// The origin's answer to the GET, not a blob to cache: relay it as is.
    Relay(Response<Incoming>),
    /// Nothing for the agent to add: send the client's request to the origin
    /// as it came.
    Carry,
    /// The origin could not be asked.
    Unreachable(OriginError),
}

impl Acquire {
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        swarm: Option<Arc<Swarm>>,
        origin_rate: Arc<RateLimiter>,
    ) -> Self {
        Self {
            store,
            metrics,
            swarm,
            origin_rate,
            inflight: Inflight::default(),
            poisoned: Poisoned::default(),
            hit_memory: hit::HitMemory::default(),
        }
    }

    /// The whole blob `digest`, known not to be cached when asked. `size`:
    /// what the origin's yes said, if it did. `bytes`: the request's bytes
    /// by source, for its trace.
    pub async fn get(
        &self,
        digest: Digest,
        size: Option<u64>,
        origin: OriginBlob,
        bytes: SourceBytes,
    ) -> Acquired {
        let lead = match self.inflight.claim(digest) {
            Ok(lead) => lead,
            Err(follower) => {
                return match (lead::wait(follower).await, self.store.get(&digest)) {
                    (true, Some(reader)) => Acquired::Cached(reader),
                    _ => Acquired::Carry,
                };
            }
        };
        self.miss(lead, size, origin, bytes).await
    }

    /// Streams bytes `[start, end)` of a cached blob, each piece verified as
    /// it is read; a corrupt piece drops the copy and the rest comes from
    /// the origin.
    pub fn read(
        &self,
        reader: BlobReader,
        (start, end): (u64, u64),
        origin: OriginBlob,
        bytes: SourceBytes,
    ) -> mpsc::Receiver<Chunk> {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let ctx = hit::Continuation {
            digest: reader.digest(),
            origin,
            rate: self.origin_rate.clone(),
            store: Some(self.store.clone()),
            metrics: self.metrics.clone(),
            bytes,
            memory: self.hit_memory.clone(),
        };
        let span = info_span!("cache.read", start, end);
        tokio::spawn(hit::stream_hit(reader, start, end, tx, ctx).instrument(span));
        rx
    }

    /// We lead: fetch from the swarm or the origin.
    async fn miss(
        &self,
        lead: Lead,
        size: Option<u64>,
        origin: OriginBlob,
        bytes: SourceBytes,
    ) -> Acquired {
        let digest = lead.digest;
        // The authorization answer was cached (or a redirect): a HEAD tells the size
        // without a blob byte, so the swarm can still be asked.
        let size = match size {
            Some(s) => Some(s),
            None if self.swarm.is_some() => origin.size().await,
            None => None,
        };
        let Some(size) = size else {
            // Still unknown: learn it from the GET itself.
            return match origin.get(None).await {
                Ok(resp) if resp.status() == StatusCode::OK => match content_length(resp.headers())
                {
                    Some(size) => self.download_whole(lead, size, resp, bytes).await,
                    None => Acquired::Relay(resp),
                },
                Ok(resp) => Acquired::Relay(resp),
                Err(e) => Acquired::Unreachable(e),
            };
        };
        let writer = match self.begin(&digest, size).await {
            Ok(w) => w,
            Err(e) => {
                info!(%digest, error = %e, "store cannot take this blob; streaming it through");
                return Acquired::Carry;
            }
        };
        let mut progress = None;
        let now = Instant::now();
        if let Some(swarm) = self
            .swarm
            .as_ref()
            .filter(|_| !self.poisoned.contains(&digest, now))
        {
            match swarm.join(&digest, size).await {
                Some(holders) => {
                    let job = swarm::SwarmJob {
                        swarm: swarm.clone(),
                        metrics: self.metrics.clone(),
                        store: self.store.clone(),
                        poisoned: self.poisoned.clone(),
                        origin_rate: self.origin_rate.clone(),
                    };
                    let body = job.start(writer, lead, holders, origin, bytes);
                    return Acquired::Streaming { size, body };
                }
                // We are the first: others that ask now wait for our pieces.
                None => progress = Some(swarm::progress_of(swarm, &writer, true)),
            }
        }
        // Resume: what a killed download already wrote stays; fetch from the first gap.
        let first_missing = writer.missing_pieces().first().copied().unwrap_or(0);
        let offset = first_missing * writer.piece_size();
        let resp = match origin.get((offset > 0).then_some(offset)).await {
            Ok(r) => r,
            Err(e) => return Acquired::Unreachable(e),
        };
        let status = resp.status();
        if status != StatusCode::OK && !(offset > 0 && status == StatusCode::PARTIAL_CONTENT) {
            return Acquired::Relay(resp);
        }
        // A 200 to a range request restarts from byte 0.
        let body_offset = if status == StatusCode::OK { 0 } else { offset };
        self.download(writer, lead, size, resp, body_offset, progress, bytes)
    }

    /// The origin's 200 for the whole blob, found before the store was asked.
    async fn download_whole(
        &self,
        lead: Lead,
        size: u64,
        resp: Response<Incoming>,
        bytes: SourceBytes,
    ) -> Acquired {
        match self.begin(&lead.digest, size).await {
            // This body starts at byte 0, so pieces a killed download left are rewritten.
            Ok(w) => self.download(w, lead, size, resp, 0, None, bytes),
            Err(e) => {
                info!(digest = %lead.digest, error = %e, "store cannot take this blob; streaming it through");
                Acquired::Relay(resp)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn download(
        &self,
        writer: BlobWriter,
        lead: Lead,
        size: u64,
        resp: Response<Incoming>,
        body_offset: u64,
        progress: Option<Progress>,
        bytes: SourceBytes,
    ) -> Acquired {
        let digest = lead.digest;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let job = Download {
            writer: Some(writer),
            digest,
            size,
            metrics: self.metrics.clone(),
            client: tx,
            progress,
            rate: self.origin_rate.clone(),
            bytes,
        };
        let body = resp.into_body();
        let swarm = self.swarm.clone();
        let span = info_span!(
            "origin.download",
            size,
            offset = body_offset,
            cached = field::Empty
        );
        tokio::spawn(
            async move {
                let (cached, progress) = job.run(body, body_offset).await;
                tracing::Span::current().record("cached", cached.is_some());
                lead.finish(cached.is_some());
                match (progress, swarm, cached) {
                    (Some(p), _, cached) => p.finish(cached).await,
                    (None, Some(swarm), Some(reader)) => swarm.announce_complete(reader).await,
                    _ => {}
                }
            }
            .instrument(span),
        );
        Acquired::Streaming { size, body: rx }
    }

    async fn begin(&self, digest: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let (store, digest) = (self.store.clone(), *digest);
        tokio::task::spawn_blocking(move || store.begin(&digest, size))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Io {
                    path: PathBuf::from("(blocking task)"),
                    source: std::io::Error::other(e),
                })
            })
    }
}
