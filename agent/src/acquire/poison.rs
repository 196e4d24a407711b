//! Blobs whose swarm copy failed its digest (a poisoned hash list): for a
//! while they are fetched from the origin alone.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::vocab::Digest;

/// How long a blob whose swarm download was poisoned skips the swarm.
pub(super) const POISON_TTL: Duration = Duration::from_secs(600);

#[derive(Default, Clone)]
pub(super) struct Poisoned(Arc<Mutex<HashMap<Digest, Instant>>>);

impl Poisoned {
    pub(super) fn insert(&self, digest: Digest, now: Instant) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, now);
    }

    /// Whether `digest` was poisoned less than [`POISON_TTL`] before `now`;
    /// older entries are forgotten.
    pub(super) fn contains(&self, digest: &Digest, now: Instant) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, since| now.saturating_duration_since(*since) < POISON_TTL);
        map.contains_key(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_blob_skips_the_swarm_for_the_ttl_only() {
        let p = Poisoned::default();
        let (d, t) = (Digest([7; 32]), Instant::now());
        assert!(!p.contains(&d, t));
        p.insert(d, t);
        assert!(p.contains(&d, t + POISON_TTL - Duration::from_secs(1)));
        assert!(!p.contains(&Digest([8; 32]), t));
        assert!(!p.contains(&d, t + POISON_TTL));
        // Forgotten, not just hidden.
        assert!(!p.contains(&d, t));
    }
}
