//! A blob from the swarm: the [`Driver`] runs in a task of its own, and what
//! comes of it (cached, poisoned, failed) is settled here.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;
use tracing::{Instrument, Span, field, info, info_span, warn};

use crate::{
    acquire::{
        CHANNEL_DEPTH, Chunk,
        driver::{Driver, RangeFetcher},
        lead::Lead,
        origin::OriginBlob,
        poison::Poisoned,
    },
    store::{BlobWriter, Store},
    swarm::{Holders, Progress, Swarm},
    telemetry::{Metrics, SourceBytes},
    vocab::RateLimiter,
};

pub(super) struct SwarmJob {
    pub swarm: Arc<Swarm>,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub poisoned: Poisoned,
    pub origin_rate: Arc<RateLimiter>,
}

impl SwarmJob {
    /// Fetch from peers (and the origin for what they cannot give),
    /// streaming to the client in order and into the store.
    pub(super) fn start(
        self,
        writer: BlobWriter,
        lead: Lead,
        holders: Holders,
        origin: OriginBlob,
        bytes: SourceBytes,
    ) -> mpsc::Receiver<Chunk> {
        let (digest, size) = (lead.digest, writer.size());
        let rate = self.origin_rate.clone();
        let range: RangeFetcher = Arc::new(move |start, end| {
            let (origin, rate) = (origin.clone(), rate.clone());
            Box::pin(async move { origin.range_bytes(&rate, start, end).await })
        });
        let job = Driver {
            digest,
            peers: self.swarm.peers.clone(),
            origin: range,
            metrics: self.metrics.clone(),
            config: self.swarm.config.clone(),
            refresh: Some(self.swarm.refresher(digest, size)),
            progress: Some(progress_of(&self.swarm, &writer, false)),
            bytes,
            me: self.swarm.tracker.me().quic_addr.parse().ok(),
        };
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let span = info_span!(
            "swarm.fetch",
            size,
            pieces = writer.pieces(),
            peers = field::Empty,
            pieces.peer = field::Empty,
            pieces.origin = field::Empty,
            cached = field::Empty,
            poisoned = field::Empty,
        );
        let (poisoned, store) = (self.poisoned, self.store);
        tokio::spawn(
            async move {
                let outcome = job.run(writer, holders, tx).await;
                if outcome.poisoned {
                    Span::current().record("poisoned", true);
                    // The pieces match the lying hashes: drop them all, tell the
                    // tracker, and let the client's retry go to the origin.
                    poisoned.insert(digest, Instant::now());
                    let _ = tokio::task::spawn_blocking(move || store.remove(&digest)).await;
                    if let Some(p) = outcome.progress {
                        p.abandon().await;
                    }
                    lead.finish(false);
                    return;
                }
                let committed = match outcome.writer {
                    Some(w) if w.missing_pieces().is_empty() => {
                        tokio::task::spawn_blocking(move || w.commit_verified())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                    _ => None,
                };
                lead.finish(committed.is_some());
                Span::current().record("cached", committed.is_some());
                match &committed {
                    Some(_) => info!(%digest, size, "cached from the swarm"),
                    None => warn!(%digest, "swarm download not cached"),
                }
                if let Some(p) = outcome.progress {
                    p.finish(committed).await;
                }
            }
            .instrument(span),
        );
        rx
    }
}

/// Starts telling the tracker, and the peers that ask us, what we hold of
/// the blob `writer` fills; `seeding`: from the origin, for the swarm.
pub(super) fn progress_of(swarm: &Arc<Swarm>, writer: &BlobWriter, seeding: bool) -> Progress {
    let bitmap = writer.bitmap().clone();
    // Only a resumed download holds pieces already; their sums are a few reads.
    let hashes = if bitmap.held() > 0 {
        writer.held_hashes().unwrap_or_default()
    } else {
        Vec::new()
    };
    Progress::start(
        swarm.clone(),
        writer.digest(),
        (writer.size(), writer.piece_size()),
        bitmap,
        hashes,
        seeding,
    )
}
