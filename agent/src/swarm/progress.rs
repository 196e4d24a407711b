//! Telling the tracker what we hold of a blob while we are still fetching
//! it, so nodes pulling it at the same time take pieces from us instead of
//! each going to the origin.
//!
//! Pieces land far more often than the tracker needs to hear: the latest
//! state sits in a watch channel and one task announces it at most every
//! [`ANNOUNCE_EVERY`]. The last state is always sent before [`Progress::finish`]
//! announces the committed blob, so a late partial announcement can never
//! overwrite the complete one.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};
use tracing::debug;

use crate::{
    store::BlobReader,
    swarm::{Haves, Swarm},
    vocab::{Bitmap, Digest},
};

/// Longest a new piece waits to be announced, unless the tracker asks for
/// less often.
pub(super) const ANNOUNCE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Held {
    bitmap: Bitmap,
    hashes: Vec<Option<[u8; 32]>>,
}

/// This node's holdings of one blob being fetched. Dropping it without
/// [`Progress::finish`] still announces the last pieces (they stay servable
/// from the partial file), or withdraws if there are none.
pub struct Progress {
    held: watch::Sender<Held>,
    task: JoinHandle<()>,
    swarm: Arc<Swarm>,
    digest: Digest,
    _telling: Telling,
}

/// Peers that asked us for the blob hear of each piece until it is dropped.
struct Telling {
    haves: Arc<Haves>,
    digest: Digest,
}

impl Drop for Telling {
    fn drop(&mut self) {
        self.haves.end(&self.digest);
    }
}

impl Progress {
    /// Starts announcing; `bitmap` and `hashes` are what is held already
    /// (a resumed download). `seeding`: this node fetches the blob from the
    /// origin for the swarm (see [`Haves`]).
    pub fn start(
        swarm: Arc<Swarm>,
        digest: Digest,
        (size, piece_size): (u64, u64),
        bitmap: Bitmap,
        mut hashes: Vec<Option<[u8; 32]>>,
        seeding: bool,
    ) -> Self {
        hashes.resize(bitmap.pieces() as usize, None);
        swarm
            .haves
            .start(digest, bitmap.pieces(), bitmap.held(), seeding);
        let _telling = Telling {
            haves: swarm.haves.clone(),
            digest,
        };
        let (held, rx) = watch::channel(Held { bitmap, hashes });
        let task = tokio::spawn(announce_loop(swarm.clone(), digest, size, piece_size, rx));
        Self {
            held,
            task,
            swarm,
            digest,
            _telling,
        }
    }

    /// Piece `index`, whose sha256 is `sum`, is now held (and servable).
    pub fn piece(&self, index: u64, sum: [u8; 32]) {
        self.swarm.haves.held(&self.digest, index);
        self.held.send_modify(|h| {
            if index < h.bitmap.pieces() {
                h.bitmap.set(index);
                h.hashes[index as usize] = Some(sum);
            }
        });
    }

    /// The fetch is over: flush the last partial state, then announce the
    /// blob as committed, if it was.
    pub async fn finish(self, committed: Option<BlobReader>) {
        let Progress {
            held, task, swarm, ..
        } = self;
        drop(held);
        let _ = task.await;
        if let Some(reader) = committed {
            swarm.announce_complete(reader).await;
        }
    }

    /// The pieces are being thrown away (the blob failed its digest): take
    /// back every announcement.
    pub async fn abandon(self) {
        let Progress {
            held,
            task,
            swarm,
            digest,
            ..
        } = self;
        drop(held);
        let _ = task.await;
        if let Err(e) = swarm.tracker.withdraw(&digest).await {
            debug!(%digest, error = %e, "withdraw failed");
        }
    }
}

async fn announce_loop(
    swarm: Arc<Swarm>,
    digest: Digest,
    size: u64,
    piece_size: u64,
    mut rx: watch::Receiver<Held>,
) {
    // Held pieces as last told to the tracker (the join told it "none").
    let mut told = 0;
    // The tracker's word on when to announce again (it grows with the swarm).
    let mut wait = ANNOUNCE_EVERY;
    // What a resumed download already holds goes out at once.
    rx.mark_changed();
    loop {
        // Yields a value sent just before the sender was dropped, then ends.
        let closed = rx.changed().await.is_err();
        let held = rx.borrow_and_update().clone();
        let count = held.bitmap.held();
        if count != told {
            let bitmap = held.bitmap.as_bytes().to_vec();
            match swarm
                .tracker
                .announce(&digest, size, piece_size, held.hashes, bitmap)
                .await
            {
                Ok(pace) => wait = pace.max(ANNOUNCE_EVERY),
                Err(e) => debug!(%digest, error = %e, "progress announce failed"),
            }
            told = count;
        }
        if closed {
            break;
        }
        tokio::time::sleep(wait).await;
    }
    if told == 0 {
        // We joined as fetching and got nothing: others must not wait on us.
        let _ = swarm.tracker.withdraw(&digest).await;
    }
}
