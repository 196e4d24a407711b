//! Fetching a blob's pieces from peers and the origin. The decisions live in
//! the pure [`sched`] state machine; the IO around it stays thin.

mod peer;
mod progress;

#[cfg(test)]
pub(crate) use peer::tests as peer_tests;

pub use peer::{
    ClientConfig, HaveListener, Haves, PeerClient, PeerError, PeerServer, PeerTls, ServerConfig,
    wire,
};
pub use progress::Progress;
pub use sched::{Action, Config, Error, PeerId, Scheduler, Source};

pub use damselfly_core::sched;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

use tracing::{Span, debug, field, info, instrument, warn};

use crate::{
    store::{BlobReader, piece_size_for},
    tracker::TrackerClient,
    vocab::{Bitmap, Digest},
};

/// Where the tracker says the pieces are.
pub struct Holders {
    pub peers: Vec<(SocketAddr, Vec<u8>)>,
    /// Per piece: the sha256 the holders agree on.
    pub hashes: Vec<Option<[u8; 32]>>,
    /// The tracker's word on when to ask again (it grows with the swarm).
    pub refresh_after: Duration,
}

/// Asks the tracker again who holds what (`None`: no answer, nobody).
pub type Refresh = Arc<dyn Fn() -> BoxFuture<'static, Option<Holders>> + Send + Sync>;

/// How long a pull waits for the tracker before going to the origin alone.
const FIND_TIMEOUT: Duration = Duration::from_secs(2);

/// This node's place in the swarm: who to ask, and how to fetch from peers.
pub struct Swarm {
    pub tracker: TrackerClient,
    pub peers: Arc<peer::PeerClient>,
    /// The peer server's: what our fetches tell the peers that ask us.
    pub haves: Arc<Haves>,
    pub config: sched::Config,
    /// The store's largest piece size: a join tells the tracker the piece
    /// size the store cuts the blob into ([`piece_size_for`]).
    pub max_piece_size: u64,
}

impl Swarm {
    /// Peers that hold or are fetching pieces of `digest` (with the same
    /// size), or `None`: no tracker answer, nobody has it, or the holders
    /// disagree with the origin. Either way the tracker now counts us as
    /// fetching it, so of nodes asking together only the first hears `None`.
    #[instrument(name = "swarm.join", skip_all, fields(peers = 0, hashes = field::Empty))]
    pub async fn join(&self, digest: &Digest, size: u64) -> Option<Holders> {
        let join = Some((size, piece_size_for(size, self.max_piece_size)));
        let holders = self.find(digest, size, join).await?;
        let known = holders.hashes.iter().filter(|h| h.is_some()).count();
        Span::current().record("peers", holders.peers.len());
        Span::current().record("hashes", known);
        info!(%digest, peers = holders.peers.len(), hashes = known, "fetching from the swarm");
        Some(holders)
    }

    /// A fresh look at who holds what, for a fetch in progress.
    pub fn refresher(self: &Arc<Self>, digest: Digest, size: u64) -> Refresh {
        let this = self.clone();
        Arc::new(move || {
            let this = this.clone();
            Box::pin(async move { this.find(&digest, size, None).await })
        })
    }

    async fn find(&self, digest: &Digest, size: u64, join: Option<(u64, u64)>) -> Option<Holders> {
        let ask = self.tracker.find_and_join(digest, join);
        let found = match tokio::time::timeout(FIND_TIMEOUT, ask).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                debug!(%digest, error = %e, "tracker find failed; origin only");
                return None;
            }
            Err(_) => {
                debug!(%digest, "tracker did not answer in time; origin only");
                return None;
            }
        };
        if found.peers.is_empty() || found.size != size {
            return None;
        }
        let peers: Vec<_> = found
            .peers
            .into_iter()
            .filter_map(|c| Some((c.quic_addr.parse().ok()?, c.bitmap)))
            .collect();
        if peers.is_empty() {
            return None;
        }
        Some(Holders {
            peers,
            hashes: found.hashes,
            refresh_after: found.refresh_after,
        })
    }

    /// Tell the tracker we hold all of `reader`'s blob, with its piece hashes.
    pub async fn announce_complete(&self, reader: BlobReader) {
        let digest = reader.digest();
        let (size, piece_size, pieces) = (reader.size(), reader.piece_size(), reader.pieces());
        let hashes = match tokio::task::spawn_blocking(move || reader.piece_hashes()).await {
            Ok(Ok(h)) => h.into_iter().map(Some).collect(),
            _ => return,
        };
        let mut bitmap = Bitmap::new(pieces);
        for i in 0..pieces {
            bitmap.set(i);
        }
        if let Err(e) = self
            .tracker
            .announce(
                &digest,
                size,
                piece_size,
                hashes,
                bitmap.as_bytes().to_vec(),
            )
            .await
        {
            warn!(%digest, error = %e, "announce failed");
        }
    }
}
