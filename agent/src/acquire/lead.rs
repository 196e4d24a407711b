//! One download per digest on this node: the first request leads, the rest
//! wait for it and then serve the cached copy.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use crate::vocab::Digest;

/// Downloads in progress by digest; each receiver learns whether it ended
/// in the cache.
#[derive(Default, Clone)]
pub(super) struct Inflight(Arc<Mutex<HashMap<Digest, watch::Receiver<Option<bool>>>>>);

/// What a request that did not get the lead waits on: `Some(true)` once the
/// leader has cached the blob, `Some(false)` if it did not.
pub(super) type Follower = watch::Receiver<Option<bool>>;

impl Inflight {
    /// Become the one downloading `digest`, or get what to wait on.
    pub(super) fn claim(&self, digest: Digest) -> Result<Lead, Follower> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = map.get(&digest) {
            return Err(done.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(digest, rx);
        Ok(Lead {
            digest,
            inflight: self.clone(),
            done: Some(tx),
        })
    }
}

/// Waits for the leader: whether the blob is now cached.
pub(super) async fn wait(mut follower: Follower) -> bool {
    follower
        .wait_for(Option::is_some)
        .await
        .map(|v| *v == Some(true))
        .unwrap_or(false)
}

/// The right to download one digest; whoever waits on it learns the outcome
/// when it is finished or dropped (a drop is a failure: followers go to the
/// origin).
pub(super) struct Lead {
    pub digest: Digest,
    inflight: Inflight,
    done: Option<watch::Sender<Option<bool>>>,
}

impl Lead {
    pub(super) fn finish(mut self, cached: bool) {
        self.release(cached);
    }

    fn release(&mut self, cached: bool) {
        if let Some(done) = self.done.take() {
            self.inflight
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.digest);
            let _ = done.send(Some(cached));
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.release(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leads_the_others_learn_whether_it_cached() {
        let inflight = Inflight::default();
        let d = Digest([1; 32]);
        let lead = inflight.claim(d).ok().unwrap();
        let follower = inflight.claim(d).err().unwrap();
        // Another digest is not held up.
        assert!(inflight.claim(Digest([2; 32])).is_ok());
        lead.finish(true);
        assert!(wait(follower).await);
        // Finished: the next request leads again (a new download if the
        // cached copy went meanwhile).
        assert!(inflight.claim(d).is_ok());
    }

    #[tokio::test]
    async fn a_dropped_lead_is_a_failure_and_frees_the_digest() {
        let inflight = Inflight::default();
        let d = Digest([1; 32]);
        let lead = inflight.claim(d).ok().unwrap();
        let follower = inflight.claim(d).err().unwrap();
        drop(lead);
        assert!(!wait(follower).await);
        assert!(inflight.claim(d).is_ok());
    }
}
