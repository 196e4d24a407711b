//! The `max_upload_peers` limit: how many distinct peers are being served at
//! once. A peer holds its slot while at least one of its requests is being
//! answered, not while merely connected (keep-alive holds connections open
//! indefinitely, which would pin slots for nothing).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

/// Peers are told apart by address: there is one connection per peer pair,
/// and the address is what the tracker names them by.
pub(super) struct UploadSlots {
    max: Option<usize>,
    serving: Mutex<HashMap<SocketAddr, usize>>,
}

impl UploadSlots {
    /// `None`: no limit.
    pub(super) fn new(max: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            max,
            serving: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one request from `peer`, or `None` if `peer` is not being
    /// served yet and the limit is reached.
    pub(super) fn try_acquire(self: &Arc<Self>, peer: SocketAddr) -> Option<SlotGuard> {
        let mut serving = self.lock();
        let full = self.max.is_some_and(|max| serving.len() >= max);
        match serving.get_mut(&peer) {
            Some(n) => *n += 1,
            None if full => return None,
            None => {
                serving.insert(peer, 1);
            }
        }
        Some(SlotGuard {
            slots: self.clone(),
            peer,
        })
    }

    /// Distinct peers being served now.
    pub(super) fn serving(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, usize>> {
        self.serving.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request's hold on its peer's slot.
pub(super) struct SlotGuard {
    slots: Arc<UploadSlots>,
    peer: SocketAddr,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut serving = self.slots.lock();
        if let Some(n) = serving.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                serving.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn limits_distinct_peers_not_requests() {
        let s = UploadSlots::new(Some(2));
        let a1 = s.try_acquire(addr(1)).unwrap();
        let a2 = s.try_acquire(addr(1)).unwrap();
        let b = s.try_acquire(addr(2)).unwrap();
        assert_eq!(s.serving(), 2);
        assert!(s.try_acquire(addr(3)).is_none());
        // More requests from a peer already served are fine.
        let a3 = s.try_acquire(addr(1)).unwrap();
        drop((a1, a2));
        assert!(
            s.try_acquire(addr(3)).is_none(),
            "peer 1 still has a request"
        );
        drop(a3);
        let c = s.try_acquire(addr(3)).unwrap();
        assert_eq!(s.serving(), 2);
        drop((b, c));
        assert_eq!(s.serving(), 0);
    }

    #[test]
    fn zero_refuses_everyone_and_none_nobody() {
        assert!(UploadSlots::new(Some(0)).try_acquire(addr(1)).is_none());
        let s = UploadSlots::new(None);
        let held: Vec<_> = (0..100).map(|p| s.try_acquire(addr(p)).unwrap()).collect();
        assert_eq!(s.serving(), 100);
        drop(held);
    }
}
