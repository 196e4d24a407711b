//! Cache accounting: capacity, LRU order, pins and watermarks. A pure state
//! machine: no IO and no clock (callers pass a `tick`, any monotonic u64; the
//! store uses nanoseconds since the epoch so file mtimes fit in).
//!
//! Every blob on disk, complete or partial, is an entry and counts its full
//! size: a partial blob's space is reserved when it is begun, so a download
//! that started can always finish. Entries with pins (a live reader or writer)
//! are never chosen for eviction. Eviction has hysteresis: nothing is evicted
//! until use exceeds the high watermark, then least-recently-used unpinned
//! entries go until use is at or below the low watermark.
//!
//! Pins carry the entry's generation, so a reader of a blob that was removed
//! (say, after a corrupt read) cannot, when it is dropped, unpin a new entry
//! for the same key.

use std::collections::{BTreeMap, BTreeSet};

/// Eviction starts above this share of capacity...
pub(super) const HIGH_PERCENT: u64 = 95;
/// ...and stops at this one.
pub(super) const LOW_PERCENT: u64 = 85;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub size: u64,
    pub last_use: u64,
    pub pins: u32,
    pub complete: bool,
    /// A writer holds it (and one of the pins).
    pub writing: bool,
    pub generation: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum Refused {
    #[error("{size} bytes do not fit: {used} of {capacity} used, {pinned} pinned")]
    NoSpace {
        size: u64,
        used: u64,
        pinned: u64,
        capacity: u64,
    },
    #[error("another writer holds this blob")]
    Busy,
    #[error("the blob is already complete")]
    Complete,
    #[error("the blob is already present")]
    Exists,
    #[error("no such blob")]
    Absent,
}

/// A successful reservation: the new entry's generation, and the entries
/// already dropped from the accounting whose files the caller must delete.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Reserved<K> {
    pub generation: u64,
    pub evicted: Vec<K>,
}

#[derive(Debug, Clone)]
pub(super) struct Accounting<K> {
    capacity: u64,
    high: u64,
    low: u64,
    used: u64,
    entries: BTreeMap<K, Entry>,
    /// (last_use, key) of every entry; ties broken by key so the order is total.
    lru: BTreeSet<(u64, K)>,
    next_generation: u64,
}

impl<K: Ord + Clone> Accounting<K> {
    /// Watermarks at [`HIGH_PERCENT`] and [`LOW_PERCENT`] of `capacity`.
    pub(super) fn new(capacity: u64) -> Self {
        let pct = |p: u64| (u128::from(capacity) * u128::from(p) / 100) as u64;
        Self::with_watermarks(capacity, pct(HIGH_PERCENT), pct(LOW_PERCENT))
    }

    /// # Panics
    /// Unless `low <= high <= capacity`.
    pub(super) fn with_watermarks(capacity: u64, high: u64, low: u64) -> Self {
        assert!(
            low <= high && high <= capacity,
            "watermarks {low} <= {high} <= {capacity}"
        );
        Self {
            capacity,
            high,
            low,
            used: 0,
            entries: BTreeMap::new(),
            lru: BTreeSet::new(),
            next_generation: 1,
        }
    }

    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(super) fn used(&self) -> u64 {
        self.used
    }

    #[cfg(test)]
    pub(super) fn high(&self) -> u64 {
        self.high
    }

    #[cfg(test)]
    pub(super) fn low(&self) -> u64 {
        self.low
    }

    pub(super) fn get(&self, key: &K) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, &Entry)> {
        self.entries.iter()
    }

    /// Adds an unpinned entry found on disk at startup, replacing any entry
    /// for `key`. It may take use past capacity; [`Self::evict_candidates`]
    /// then says what to drop.
    pub(super) fn insert(&mut self, key: K, size: u64, complete: bool, tick: u64) -> u64 {
        self.remove(&key);
        let generation = self.bump();
        self.put(key, size, complete, tick, 0, false, generation);
        generation
    }

    /// Makes room for a new blob of `size` bytes and adds it as a partial
    /// entry, pinned once by its writer. Unpinned entries are evicted (LRU
    /// first) if the new use would exceed the high watermark, down to the low
    /// one where possible. Nothing changes when it is refused.
    pub(super) fn reserve(&mut self, key: K, size: u64, tick: u64) -> Result<Reserved<K>, Refused> {
        if self.entries.contains_key(&key) {
            return Err(Refused::Exists);
        }
        let mut used = self.used.saturating_add(size);
        let mut evicted = Vec::new();
        if used > self.high {
            for (_, k) in &self.lru {
                if used <= self.low {
                    break;
                }
                let e = &self.entries[k];
                if e.pins == 0 {
                    used -= e.size;
                    evicted.push(k.clone());
                }
            }
        }
        if used > self.capacity {
            let pinned = self
                .entries
                .values()
                .filter(|e| e.pins > 0)
                .map(|e| e.size)
                .sum();
            return Err(Refused::NoSpace {
                size,
                used: self.used,
                pinned,
                capacity: self.capacity,
            });
        }
        for k in &evicted {
            self.remove(k);
        }
        let generation = self.bump();
        self.put(key, size, false, tick, 1, true, generation);
        Ok(Reserved {
            generation,
            evicted,
        })
    }

    /// A writer takes over an unpinned partial entry (resume).
    pub(super) fn resume(&mut self, key: &K, tick: u64) -> Result<u64, Refused> {
        let e = self.entries.get(key).ok_or(Refused::Absent)?;
        if e.complete {
            return Err(Refused::Complete);
        }
        if e.writing {
            return Err(Refused::Busy);
        }
        let e = self.entries.get_mut(key).expect("checked");
        e.writing = true;
        e.pins += 1;
        let generation = e.generation;
        self.touch(key, tick);
        Ok(generation)
    }

    /// The writer of generation `generation` is done; `complete` says whether
    /// the blob was committed. Its pin is released separately by [`Self::unpin`].
    pub(super) fn end_write(&mut self, key: &K, generation: u64, complete: bool) {
        if let Some(e) = self.entries.get_mut(key)
            && e.generation == generation
        {
            e.writing = false;
            e.complete |= complete;
        }
    }

    /// Pins a complete entry for a reader and marks it used. `None` if there
    /// is no complete entry for `key`.
    pub(super) fn pin(&mut self, key: &K, tick: u64) -> Option<u64> {
        let e = self.entries.get_mut(key)?;
        if !e.complete {
            return None;
        }
        e.pins += 1;
        let generation = e.generation;
        self.touch(key, tick);
        Some(generation)
    }

    /// Releases a pin taken on generation `generation`; a pin on an entry
    /// that has since been removed (or replaced) is ignored.
    pub(super) fn unpin(&mut self, key: &K, generation: u64) {
        if let Some(e) = self.entries.get_mut(key)
            && e.generation == generation
        {
            debug_assert!(e.pins > 0, "unpin without pin");
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Moves `key` to the most-recently-used end. A `tick` older than the
    /// entry's last use is ignored.
    pub(super) fn touch(&mut self, key: &K, tick: u64) {
        if let Some(e) = self.entries.get_mut(key)
            && tick > e.last_use
        {
            self.lru.remove(&(e.last_use, key.clone()));
            e.last_use = tick;
            self.lru.insert((tick, key.clone()));
        }
    }

    pub(super) fn remove(&mut self, key: &K) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.lru.remove(&(e.last_use, key.clone()));
        self.used -= e.size;
        Some(e)
    }

    /// What to delete, least recently used first, to get from above the high
    /// watermark to at or below the low one. Pinned entries are skipped, so
    /// the result may stop short. Empty while use is at or below high.
    /// Does not change anything: the caller removes each one it deletes.
    pub(super) fn evict_candidates(&self) -> Vec<K> {
        let mut out = Vec::new();
        if self.used <= self.high {
            return out;
        }
        let mut used = self.used;
        for (_, k) in &self.lru {
            if used <= self.low {
                break;
            }
            let e = &self.entries[k];
            if e.pins == 0 {
                used -= e.size;
                out.push(k.clone());
            }
        }
        out
    }

    fn bump(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        key: K,
        size: u64,
        complete: bool,
        tick: u64,
        pins: u32,
        writing: bool,
        generation: u64,
    ) {
        self.used += size;
        self.lru.insert((tick, key.clone()));
        self.entries.insert(
            key,
            Entry {
                size,
                last_use: tick,
                pins,
                complete,
                writing,
                generation,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acct() -> Accounting<u32> {
        // capacity 100, evict above 90 down to 50.
        Accounting::with_watermarks(100, 90, 50)
    }

    #[test]
    fn default_watermarks() {
        let a = Accounting::<u32>::new(1000);
        assert_eq!((a.high(), a.low()), (950, 850));
        let a = Accounting::<u32>::new(u64::MAX);
        assert!(a.low() < a.high() && a.high() < a.capacity());
    }

    #[test]
    fn evicts_least_recently_used_down_to_low() {
        let mut a = acct();
        a.insert(1, 30, true, 10);
        a.insert(2, 30, true, 20);
        a.insert(3, 35, true, 30);
        assert_eq!(a.used(), 95);
        a.touch(&1, 40);
        // 2 is now oldest; dropping it leaves 65 > 50, so 3 goes too.
        assert_eq!(a.evict_candidates(), vec![2, 3]);
    }

    #[test]
    fn nothing_evicted_below_high() {
        let mut a = acct();
        a.insert(1, 90, true, 1);
        assert!(a.evict_candidates().is_empty());
    }

    #[test]
    fn pinned_entries_are_skipped() {
        let mut a = acct();
        a.insert(1, 60, true, 1);
        a.insert(2, 35, true, 2);
        let g = a.pin(&1, 3).unwrap();
        // 1 is pinned (and now most recent anyway); only 2 can go.
        assert_eq!(a.evict_candidates(), vec![2]);
        a.unpin(&1, g);
        a.touch(&2, 10);
        assert_eq!(a.evict_candidates(), vec![1]);
    }

    #[test]
    fn reserve_evicts_or_refuses_without_changes() {
        let mut a = acct();
        a.insert(1, 40, true, 1);
        a.insert(2, 40, true, 2);
        let r = a.reserve(3, 30, 3).unwrap();
        // 110 > 90: drop 1 (70), drop 2 (30) to reach <= 50.
        assert_eq!(r.evicted, vec![1, 2]);
        assert_eq!(a.used(), 30);
        let e = a.get(&3).unwrap();
        assert!(e.writing && e.pins == 1 && !e.complete);

        // 3 is pinned by its writer: 80 more cannot fit beside it.
        let before = a.clone().used();
        assert!(matches!(
            a.reserve(4, 80, 4),
            Err(Refused::NoSpace { pinned: 30, .. })
        ));
        assert_eq!(a.used(), before);
        assert!(a.get(&4).is_none());
        assert!(matches!(a.reserve(5, 101, 5), Err(Refused::NoSpace { .. })));
        assert_eq!(a.reserve(3, 1, 6), Err(Refused::Exists));
    }

    #[test]
    fn reserve_fits_under_capacity_even_if_low_is_unreachable() {
        let mut a = acct();
        let g = a.reserve(1, 60, 1).unwrap().generation;
        a.insert(2, 10, true, 2);
        // 60 pinned + 35 = 95 after dropping 2: above high, below capacity.
        let r = a.reserve(3, 35, 3).unwrap();
        assert_eq!(r.evicted, vec![2]);
        assert_eq!(a.used(), 95);
        a.end_write(&1, g, true);
        a.unpin(&1, g);
        assert_eq!(a.evict_candidates(), vec![1]);
    }

    #[test]
    fn writer_lifecycle() {
        let mut a = acct();
        let g = a.reserve(1, 10, 1).unwrap().generation;
        assert_eq!(a.pin(&1, 2), None, "partial blobs are not readable");
        assert_eq!(a.resume(&1, 2), Err(Refused::Busy));
        a.end_write(&1, g, false);
        a.unpin(&1, g);
        assert_eq!(a.resume(&1, 3), Ok(g));
        a.end_write(&1, g, true);
        assert_eq!(a.resume(&1, 4), Err(Refused::Complete));
        assert_eq!(a.resume(&2, 4), Err(Refused::Absent));
        assert_eq!(a.pin(&1, 5), Some(g));
        assert_eq!(a.get(&1).unwrap().pins, 2);
    }

    #[test]
    fn stale_unpin_does_not_touch_a_new_generation() {
        let mut a = acct();
        a.insert(1, 10, true, 1);
        let old = a.pin(&1, 2).unwrap();
        a.remove(&1);
        let new = a.reserve(1, 10, 3).unwrap().generation;
        assert_ne!(old, new);
        a.unpin(&1, old);
        assert_eq!(a.get(&1).unwrap().pins, 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u64, bool),
        Reserve(u8, u64),
        Pin(u8),
        Unpin(u8),
        EndWrite(u8, bool),
        Touch(u8),
        Remove(u8),
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = 0u8..8;
        let size = 0u64..60;
        prop_oneof![
            (key.clone(), size.clone(), any::<bool>()).prop_map(|(k, s, c)| Op::Insert(k, s, c)),
            (key.clone(), size).prop_map(|(k, s)| Op::Reserve(k, s)),
            key.clone().prop_map(Op::Pin),
            key.clone().prop_map(Op::Unpin),
            (key.clone(), any::<bool>()).prop_map(|(k, c)| Op::EndWrite(k, c)),
            key.clone().prop_map(Op::Touch),
            key.prop_map(Op::Remove),
            Just(Op::Evict),
        ]
    }

    fn check_sums(a: &Accounting<u8>) {
        let sum: u64 = a.iter().map(|(_, e)| e.size).sum();
        assert_eq!(a.used(), sum);
        assert_eq!(a.lru.len(), a.len());
        for (k, e) in a.iter() {
            assert!(a.lru.contains(&(e.last_use, *k)));
            assert!(!e.writing || e.pins > 0, "a writer holds a pin");
        }
    }

    proptest! {
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..80)) {
            let mut a = Accounting::<u8>::with_watermarks(100, 90, 60);
            // Pins the test holds, as (key, generation), like live readers/writers.
            let mut held: Vec<(u8, u64)> = Vec::new();
            let mut writers: Vec<(u8, u64)> = Vec::new();
            for (tick, op) in ops.into_iter().enumerate() {
                let tick = tick as u64 + 1;
                match op {
                    Op::Insert(k, s, c) => {
                        // The store only inserts at startup, before anything is pinned.
                        if a.get(&k).is_none_or(|e| e.pins == 0) {
                            a.insert(k, s, c, tick);
                        }
                    }
                    Op::Reserve(k, s) => {
                        let before = a.clone();
                        match a.reserve(k, s, tick) {
                            Ok(r) => {
                                for v in &r.evicted {
                                    let e = before.get(v).unwrap();
                                    prop_assert_eq!(e.pins, 0, "evicted a pinned entry");
                                }
                                prop_assert!(a.used() <= a.capacity());
                                writers.push((k, r.generation));
                            }
                            Err(_) => {
                                prop_assert_eq!(a.used(), before.used());
                                prop_assert_eq!(a.len(), before.len());
                            }
                        }
                    }
                    Op::Pin(k) => {
                        if let Some(g) = a.pin(&k, tick) {
                            held.push((k, g));
                        }
                    }
                    Op::Unpin(k) => {
                        if let Some(i) = held.iter().position(|&(hk, _)| hk == k) {
                            let (k, g) = held.remove(i);
                            a.unpin(&k, g);
                        }
                    }
                    Op::EndWrite(k, c) => {
                        if let Some(i) = writers.iter().position(|&(wk, _)| wk == k) {
                            let (k, g) = writers.remove(i);
                            a.end_write(&k, g, c);
                            a.unpin(&k, g);
                        }
                    }
                    Op::Touch(k) => a.touch(&k, tick),
                    Op::Remove(k) => {
                        // The store refuses to remove a blob under a writer.
                        if a.get(&k).is_none_or(|e| !e.writing) {
                            a.remove(&k);
                        }
                    }
                    Op::Evict => {
                        let before = a.used();
                        let victims = a.evict_candidates();
                        for v in &victims {
                            prop_assert_eq!(a.get(v).unwrap().pins, 0, "pinned entry chosen");
                            a.remove(v);
                        }
                        if before > a.high() {
                            let all_pinned = a.iter().all(|(_, e)| e.pins > 0);
                            prop_assert!(a.used() <= a.low() || all_pinned,
                                "used {} > low {} with unpinned entries left", a.used(), a.low());
                        } else {
                            prop_assert!(victims.is_empty());
                        }
                    }
                }
                check_sums(&a);
                // Pins counted by the accounting match those the test holds.
                for (k, e) in a.iter() {
                    let n = held.iter().chain(&writers)
                        .filter(|&&(hk, g)| hk == *k && g == e.generation).count();
                    prop_assert_eq!(e.pins as usize, n);
                }
            }
        }
    }
}
