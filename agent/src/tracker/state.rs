//! The tracker's state machine: peers, their leases and which pieces of which
//! blob each holds. Pure — no IO, no clock: every call that depends on time is
//! given `now`, so expiry and ranking are tested deterministically.
//!
//! Nothing here is durable on purpose. Peers re-register and replay their
//! announcements when a heartbeat answers "unknown peer", so losing this state
//! (restart, new replica) costs one heartbeat, not correctness.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use crate::store::{
    Digest,
    bitmap::{BadBitmap, Bitmap},
};

/// A sha256 of one piece; `None` where the announcer does not know it.
pub type PieceHash = Option<[u8; 32]>;

/// Answers at most this many peers unless asked for fewer: more candidates
/// than a scheduler can use only cost bandwidth.
pub const DEFAULT_MAX_PEERS: usize = 32;

/// The most pieces a join may declare: an announcement's bitmap for more would
/// not fit in a gRPC message (tonic's default 4 MiB decoding limit), so no
/// holder could ever describe that blob.
pub const MAX_PIECES: u64 = 8 * 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("unknown peer {0:?} (register first)")]
    UnknownPeer(String),
    #[error("peer id and QUIC address must not be empty")]
    IncompletePeer,
    #[error("{digest}: piece size must be positive")]
    ZeroPieceSize { digest: Digest },
    /// The first holder fixes a blob's size and piece size: bitmaps counted in
    /// different pieces cannot be compared.
    #[error(
        "{digest}: announced as {size} bytes in {piece_size}-byte pieces, \
         known as {known_size} bytes in {known_piece_size}-byte pieces"
    )]
    Geometry {
        digest: Digest,
        size: u64,
        piece_size: u64,
        known_size: u64,
        known_piece_size: u64,
    },
    #[error("{digest}: {source}")]
    Bitmap {
        digest: Digest,
        #[source]
        source: BadBitmap,
    },
    #[error("{digest}: {got} piece hashes for {pieces} pieces")]
    TooManyHashes {
        digest: Digest,
        got: usize,
        pieces: u64,
    },
}

/// Who a peer is and where it serves pieces; fixed for a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: String,
    /// QUIC `host:port`.
    pub quic_addr: String,
    pub node: String,
    pub zone: String,
    /// Bytes per second; 0 = unknown.
    pub upload_capacity: u64,
}

/// What a register or heartbeat grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub heartbeat: Duration,
    pub lease: Duration,
}

/// One announcement: the peer's whole view of a blob, replacing the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub digest: Digest,
    pub size: u64,
    pub piece_size: u64,
    pub hashes: Vec<PieceHash>,
    /// Bit i (LSB first) of byte i/8 = piece i held.
    pub bitmap: Vec<u8>,
}

/// One peer in a `find` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub quic_addr: String,
    pub zone: String,
    pub bitmap: Vec<u8>,
    pub held: u64,
    pub active_uploads: u32,
    pub upload_capacity: u64,
}

/// A `find` answer for a digest somebody holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub size: u64,
    pub piece_size: u64,
    /// Best first; see [`State::find`].
    pub peers: Vec<Candidate>,
    /// Hashes every announcer that knows them agrees on; trailing unknowns
    /// trimmed.
    pub hashes: Vec<PieceHash>,
}

struct Peer {
    info: PeerInfo,
    active_uploads: u32,
    expires: Instant,
    /// Kept so expiry and re-registration find the peer's holdings without
    /// scanning every blob.
    holds: BTreeSet<Digest>,
}

struct Holding {
    bitmap: Bitmap,
    hashes: Vec<PieceHash>,
}

struct Blob {
    size: u64,
    piece_size: u64,
    holders: HashMap<String, Holding>,
}

impl Blob {
    fn pieces(&self) -> u64 {
        self.size.div_ceil(self.piece_size)
    }
}

pub struct State {
    heartbeat: Duration,
    peers: HashMap<String, Peer>,
    blobs: HashMap<Digest, Blob>,
}

impl State {
    /// `heartbeat` is the interval peers are told to keep. The lease is one and
    /// a half of it: one late heartbeat is forgiven, and with expiry swept
    /// every quarter interval a silent peer is gone within two intervals.
    pub fn new(heartbeat: Duration) -> Self {
        Self {
            heartbeat,
            peers: HashMap::new(),
            blobs: HashMap::new(),
        }
    }

    pub fn lease(&self) -> Lease {
        Lease {
            heartbeat: self.heartbeat,
            lease: self.heartbeat * 3 / 2,
        }
    }

    /// How often the server should call [`State::expire`].
    pub fn sweep_interval(&self) -> Duration {
        self.heartbeat / 4
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Start or renew a lease. A known peer keeps its holdings: re-registering
    /// is how a peer recovers from a lost heartbeat answer, and it re-announces
    /// anyway.
    pub fn register(
        &mut self,
        info: PeerInfo,
        active_uploads: u32,
        now: Instant,
    ) -> Result<Lease, StateError> {
        if info.id.is_empty() || info.quic_addr.is_empty() {
            return Err(StateError::IncompletePeer);
        }
        let lease = self.lease();
        let expires = now + lease.lease;
        match self.peers.get_mut(&info.id) {
            Some(p) if p.expires > now => {
                p.info = info;
                p.active_uploads = active_uploads;
                p.expires = expires;
            }
            _ => {
                // An expired record not yet swept is dropped with its holdings
                // so a re-registration starts from what the peer replays.
                self.drop_peer(&info.id);
                self.peers.insert(
                    info.id.clone(),
                    Peer {
                        info,
                        active_uploads,
                        expires,
                        holds: BTreeSet::new(),
                    },
                );
            }
        }
        Ok(lease)
    }

    /// Renew a lease. A peer whose lease ran out is unknown even if the sweep
    /// has not run yet: it must re-register and replay, or the tracker would
    /// keep holdings it already stopped vouching for.
    pub fn heartbeat(
        &mut self,
        id: &str,
        active_uploads: u32,
        now: Instant,
    ) -> Result<Lease, StateError> {
        let lease = self.lease();
        let p = self.live_peer_mut(id, now)?;
        p.active_uploads = active_uploads;
        p.expires = now + lease.lease;
        Ok(lease)
    }

    /// Replace `id`'s bitmap and hashes for a blob.
    pub fn announce(&mut self, id: &str, a: Announce, now: Instant) -> Result<(), StateError> {
        let digest = a.digest;
        if a.piece_size == 0 {
            return Err(StateError::ZeroPieceSize { digest });
        }
        self.live_peer_mut(id, now)?;
        if let Some(b) = self.blobs.get(&digest)
            && (b.size != a.size || b.piece_size != a.piece_size)
        {
            return Err(StateError::Geometry {
                digest,
                size: a.size,
                piece_size: a.piece_size,
                known_size: b.size,
                known_piece_size: b.piece_size,
            });
        }
        let pieces = a.size.div_ceil(a.piece_size);
        let bitmap = Bitmap::from_bytes(pieces, &a.bitmap)
            .map_err(|source| StateError::Bitmap { digest, source })?;
        if a.hashes.len() as u64 > pieces {
            return Err(StateError::TooManyHashes {
                digest,
                got: a.hashes.len(),
                pieces,
            });
        }
        let blob = self.blobs.entry(digest).or_insert_with(|| Blob {
            size: a.size,
            piece_size: a.piece_size,
            holders: HashMap::new(),
        });
        blob.holders.insert(
            id.to_string(),
            Holding {
                bitmap,
                hashes: a.hashes,
            },
        );
        if let Some(p) = self.peers.get_mut(id) {
            p.holds.insert(digest);
        }
        Ok(())
    }

    /// `id` no longer holds `digest`. Withdrawing what was never announced is
    /// fine: the caller may be retrying.
    pub fn withdraw(&mut self, id: &str, digest: &Digest, now: Instant) -> Result<(), StateError> {
        self.live_peer_mut(id, now)?.holds.remove(digest);
        self.remove_holding(id, digest);
        Ok(())
    }

    /// [`State::find`], then, if `join` gives the blob's geometry, records
    /// `asking` as a holder of no piece yet (an announcement it already made
    /// stays). Answer and record are one step under the caller's lock, so of
    /// peers joining together exactly one is told nobody else has it.
    pub fn find_and_join(
        &mut self,
        digest: &Digest,
        asking: &str,
        zone: &str,
        max_peers: usize,
        join: Option<(u64, u64)>,
        now: Instant,
    ) -> Option<Found> {
        let found = self.find(digest, asking, zone, max_peers, now);
        let Some((size, piece_size)) = join else {
            return found;
        };
        let held = self
            .blobs
            .get(digest)
            .is_some_and(|b| b.holders.contains_key(asking));
        // The empty bitmap is sized by numbers the asker merely states: build
        // it only for a geometry an announcement could also describe (one
        // that would be refused anyway once allocated cost memory for nothing).
        let pieces = (piece_size > 0).then(|| size.div_ceil(piece_size));
        if let Some(pieces) = pieces.filter(|&p| p <= MAX_PIECES)
            && !held
        {
            // Refused (unknown peer, other geometry): the answer alone is
            // still right, and the asker's own announcements will follow.
            let _ = self.announce(
                asking,
                Announce {
                    digest: *digest,
                    size,
                    piece_size,
                    hashes: Vec::new(),
                    bitmap: Bitmap::new(pieces).as_bytes().to_vec(),
                },
                now,
            );
        }
        found
    }

    /// Who holds or is fetching pieces of `digest`, for `asking` in `zone`;
    /// `None` when nobody does. Ranked: peers in the asker's zone first (an
    /// empty zone matches nothing), then most pieces held, then fewest active
    /// uploads, then most upload capacity; ties by id so the answer is
    /// deterministic. Excludes the asker and peers whose lease ran out. Peers
    /// holding no piece yet are listed (last): they are downloading it, and
    /// waiting for their pieces spares the origin.
    pub fn find(
        &self,
        digest: &Digest,
        asking: &str,
        zone: &str,
        max_peers: usize,
        now: Instant,
    ) -> Option<Found> {
        let blob = self.blobs.get(digest)?;
        let live: Vec<(&Peer, &Holding)> = blob
            .holders
            .iter()
            .filter_map(|(id, h)| Some((self.peers.get(id)?, h)))
            .filter(|(p, _)| p.expires > now)
            .collect();
        if live.is_empty() {
            return None;
        }
        let hashes = merge_hashes(blob.pieces(), live.iter().map(|(_, h)| &h.hashes[..]));
        let same_zone = |p: &Peer| !zone.is_empty() && p.info.zone == zone;
        let mut ranked: Vec<&(&Peer, &Holding)> =
            live.iter().filter(|(p, _)| p.info.id != asking).collect();
        ranked.sort_by(|(a, ha), (b, hb)| {
            same_zone(b)
                .cmp(&same_zone(a))
                .then(hb.bitmap.held().cmp(&ha.bitmap.held()))
                .then(a.active_uploads.cmp(&b.active_uploads))
                .then(b.info.upload_capacity.cmp(&a.info.upload_capacity))
                .then(a.info.id.cmp(&b.info.id))
        });
        let limit = if max_peers == 0 {
            DEFAULT_MAX_PEERS
        } else {
            max_peers
        };
        let peers = ranked
            .into_iter()
            .take(limit)
            .map(|(p, h)| Candidate {
                id: p.info.id.clone(),
                quic_addr: p.info.quic_addr.clone(),
                zone: p.info.zone.clone(),
                bitmap: h.bitmap.as_bytes().to_vec(),
                held: h.bitmap.held(),
                active_uploads: p.active_uploads,
                upload_capacity: p.info.upload_capacity,
            })
            .collect();
        Some(Found {
            size: blob.size,
            piece_size: blob.piece_size,
            peers,
            hashes,
        })
    }

    /// Forget peers whose lease ran out, with everything they announced.
    /// Returns how many were dropped.
    pub fn expire(&mut self, now: Instant) -> usize {
        let dead: Vec<String> = self
            .peers
            .values()
            .filter(|p| p.expires <= now)
            .map(|p| p.info.id.clone())
            .collect();
        for id in &dead {
            self.drop_peer(id);
        }
        dead.len()
    }

    fn live_peer_mut(&mut self, id: &str, now: Instant) -> Result<&mut Peer, StateError> {
        if self.peers.get(id).is_some_and(|p| p.expires <= now) {
            self.drop_peer(id);
        }
        self.peers
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownPeer(id.to_string()))
    }

    fn drop_peer(&mut self, id: &str) {
        if let Some(p) = self.peers.remove(id) {
            for d in &p.holds {
                self.remove_holding(id, d);
            }
        }
    }

    fn remove_holding(&mut self, id: &str, digest: &Digest) {
        if let Some(b) = self.blobs.get_mut(digest) {
            b.holders.remove(id);
            // The geometry belongs to the holders: with none left, the next
            // announcer sets it afresh.
            if b.holders.is_empty() {
                self.blobs.remove(digest);
            }
        }
    }
}

/// Per piece: the hash every announcer that knows one agrees on, or `None`
/// when nobody knows it or two disagree. A liar can thus only erase a hash
/// (the downloader then verifies another way or retries), never plant one
/// that others contradict.
fn merge_hashes<'a>(pieces: u64, lists: impl Iterator<Item = &'a [PieceHash]>) -> Vec<PieceHash> {
    #[derive(Clone, Copy)]
    enum Slot {
        Unknown,
        Agreed([u8; 32]),
        Conflict,
    }
    // Sized by the hashes actually sent, not by the piece count: slots past
    // every list stay unknown and are trimmed anyway, and `pieces` follows
    // from a size anybody may claim.
    let lists: Vec<&[PieceHash]> = lists.collect();
    let longest = lists.iter().map(|l| l.len()).max().unwrap_or(0);
    let mut slots = vec![Slot::Unknown; longest.min(usize::try_from(pieces).unwrap_or(usize::MAX))];
    for list in lists {
        for (slot, h) in slots.iter_mut().zip(list) {
            let Some(h) = h else { continue };
            *slot = match *slot {
                Slot::Unknown => Slot::Agreed(*h),
                Slot::Agreed(a) if a == *h => Slot::Agreed(a),
                _ => Slot::Conflict,
            };
        }
    }
    let mut out: Vec<PieceHash> = slots
        .into_iter()
        .map(|s| match s {
            Slot::Agreed(h) => Some(h),
            Slot::Unknown | Slot::Conflict => None,
        })
        .collect();
    while out.last() == Some(&None) {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_secs(5);

    fn info(id: &str, zone: &str) -> PeerInfo {
        PeerInfo {
            id: id.into(),
            quic_addr: format!("{id}.example:7401"),
            node: format!("node-{id}"),
            zone: zone.into(),
            upload_capacity: 100,
        }
    }

    fn digest() -> Digest {
        Digest::of(b"blob")
    }

    /// A 10-piece blob of 1-byte pieces; `held` lists the pieces in the bitmap.
    fn ann(held: &[u64], hashes: Vec<PieceHash>) -> Announce {
        let mut b = Bitmap::new(10);
        for &i in held {
            b.set(i);
        }
        Announce {
            digest: digest(),
            size: 10,
            piece_size: 1,
            hashes,
            bitmap: b.as_bytes().to_vec(),
        }
    }

    fn ids(f: &Found) -> Vec<&str> {
        f.peers.iter().map(|c| c.id.as_str()).collect()
    }

    #[test]
    fn ranks_zone_then_pieces_then_load() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        for (id, zone, load) in [
            ("far-full", "b", 0),
            ("near-few", "a", 0),
            ("near-many-busy", "a", 5),
            ("near-many-idle", "a", 1),
            ("far-few", "b", 0),
        ] {
            s.register(info(id, zone), load, t0).unwrap();
        }
        let all: Vec<u64> = (0..10).collect();
        s.announce("far-full", ann(&all, vec![]), t0).unwrap();
        s.announce("near-few", ann(&[1], vec![]), t0).unwrap();
        s.announce("near-many-busy", ann(&[1, 2, 3], vec![]), t0)
            .unwrap();
        s.announce("near-many-idle", ann(&[4, 5, 6], vec![]), t0)
            .unwrap();
        s.announce("far-few", ann(&[9], vec![]), t0).unwrap();

        let f = s.find(&digest(), "asker", "a", 0, t0).unwrap();
        assert_eq!(
            ids(&f),
            [
                "near-many-idle",
                "near-many-busy",
                "near-few",
                "far-full",
                "far-few"
            ]
        );
        assert_eq!((f.size, f.piece_size), (10, 1));
        assert_eq!(f.peers[0].held, 3);
        assert_eq!(f.peers[0].quic_addr, "near-many-idle.example:7401");

        // No zone: pieces decide.
        let f = s.find(&digest(), "asker", "", 0, t0).unwrap();
        assert_eq!(ids(&f)[0], "far-full");
        // The limit keeps the best.
        let f = s.find(&digest(), "asker", "a", 2, t0).unwrap();
        assert_eq!(ids(&f), ["near-many-idle", "near-many-busy"]);
    }

    #[test]
    fn heartbeat_updates_load_and_ranking() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("x", "a"), 0, t0).unwrap();
        s.register(info("y", "a"), 3, t0).unwrap();
        s.announce("x", ann(&[0], vec![]), t0).unwrap();
        s.announce("y", ann(&[1], vec![]), t0).unwrap();
        assert_eq!(
            ids(&s.find(&digest(), "z", "a", 0, t0).unwrap()),
            ["x", "y"]
        );
        s.heartbeat("x", 9, t0).unwrap();
        s.heartbeat("y", 0, t0).unwrap();
        assert_eq!(
            ids(&s.find(&digest(), "z", "a", 0, t0).unwrap()),
            ["y", "x"]
        );
    }

    #[test]
    fn asking_peer_is_not_answered_and_starting_peers_come_last() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("me", "a"), 0, t0).unwrap();
        s.register(info("other", "a"), 0, t0).unwrap();
        s.register(info("starting", "a"), 0, t0).unwrap();
        s.announce("me", ann(&[0, 1, 2], vec![]), t0).unwrap();
        s.announce("other", ann(&[0], vec![]), t0).unwrap();
        s.announce("starting", ann(&[], vec![]), t0).unwrap();
        let f = s.find(&digest(), "me", "a", 0, t0).unwrap();
        assert_eq!(ids(&f), ["other", "starting"]);
        s.withdraw("starting", &digest(), t0).unwrap();
        // Only the asker holds it: still an answer (geometry, hashes), no peers.
        s.withdraw("other", &digest(), t0).unwrap();
        let f = s.find(&digest(), "me", "a", 0, t0).unwrap();
        assert!(f.peers.is_empty());
        assert!(s.find(&Digest::of(b"other"), "me", "a", 0, t0).is_none());
    }

    #[test]
    fn of_peers_joining_together_only_the_first_hears_nobody() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        for id in ["a", "b", "c"] {
            s.register(info(id, ""), 0, t0).unwrap();
        }
        let join = Some((10, 1));
        assert!(s.find_and_join(&digest(), "a", "", 0, join, t0).is_none());
        let f = s.find_and_join(&digest(), "b", "", 0, join, t0).unwrap();
        assert_eq!(ids(&f), ["a"]);
        assert_eq!(f.peers[0].held, 0);
        let f = s.find_and_join(&digest(), "c", "", 0, join, t0).unwrap();
        assert_eq!(ids(&f), ["a", "b"]);

        // Joining again keeps what the joiner announced since.
        s.announce("a", ann(&[0, 1], vec![]), t0).unwrap();
        s.find_and_join(&digest(), "a", "", 0, join, t0);
        let f = s.find(&digest(), "b", "", 0, t0).unwrap();
        assert_eq!(f.peers[0].id, "a");
        assert_eq!(f.peers[0].held, 2);

        // A plain find records nothing; an unknown asker is answered but not recorded.
        assert!(s.find(&Digest::of(b"x"), "a", "", 0, t0).is_none());
        assert!(
            s.find_and_join(&Digest::of(b"x"), "ghost", "", 0, join, t0)
                .is_none()
        );
        assert!(s.find(&Digest::of(b"x"), "a", "", 0, t0).is_none());
    }

    /// Found by fuzz/fuzz_targets/tracker.rs: a join stating a piece size of
    /// 0, or more pieces than any announcement could describe, allocated a
    /// bitmap of the stated size (gigabytes from a 60-byte request).
    #[test]
    fn joins_of_impossible_geometry_record_nothing() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("a", ""), 0, t0).unwrap();
        for join in [(3_130_569_987, 0), (u64::MAX, 1), (MAX_PIECES + 1, 1)] {
            assert!(
                s.find_and_join(&digest(), "a", "", 0, Some(join), t0)
                    .is_none()
            );
            assert_eq!(s.blob_count(), 0, "{join:?}");
        }
        s.find_and_join(&digest(), "a", "", 0, Some((MAX_PIECES, 1)), t0);
        assert_eq!(s.blob_count(), 1);
    }

    /// Merged hashes cost what the announcers sent, not what the size claims.
    #[test]
    fn merged_hashes_are_sized_by_the_hashes_sent() {
        assert_eq!(merge_hashes(u64::MAX, std::iter::empty()), vec![]);
        let h = [Some([1; 32]), None, Some([2; 32])];
        assert_eq!(merge_hashes(u64::MAX, [&h[..]].into_iter()), h);
        assert_eq!(merge_hashes(2, [&h[..]].into_iter()), [Some([1; 32])]);
    }

    #[test]
    fn announce_replaces_the_bitmap() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("p", ""), 0, t0).unwrap();
        s.announce("p", ann(&[0], vec![]), t0).unwrap();
        s.announce("p", ann(&[3, 4], vec![]), t0).unwrap();
        let f = s.find(&digest(), "q", "", 0, t0).unwrap();
        assert_eq!(f.peers[0].held, 2);
        assert_eq!(f.peers[0].bitmap, vec![0b0001_1000, 0]);
    }

    #[test]
    fn silent_peer_disappears_within_two_intervals() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("quiet", "a"), 0, t0).unwrap();
        s.register(info("chatty", "a"), 0, t0).unwrap();
        s.announce("quiet", ann(&[0], vec![]), t0).unwrap();
        s.announce("chatty", ann(&[1], vec![]), t0).unwrap();

        // The server sweeps every quarter interval; walk time like it does.
        let mut now = t0;
        let mut gone_at = None;
        while now <= t0 + 2 * HB {
            now += s.sweep_interval();
            if (now - t0).as_millis().is_multiple_of(HB.as_millis()) {
                s.heartbeat("chatty", 0, now).unwrap();
            }
            s.expire(now);
            let f = s.find(&digest(), "asker", "a", 0, now).unwrap();
            if gone_at.is_none() && !ids(&f).contains(&"quiet") {
                gone_at = Some(now - t0);
            }
        }
        let gone_at = gone_at.expect("quiet peer never expired");
        assert!(
            gone_at > HB,
            "expired before one missed heartbeat: {gone_at:?}"
        );
        assert!(gone_at <= 2 * HB, "{gone_at:?}");
        assert_eq!(s.peer_count(), 1);
        assert_eq!(
            s.heartbeat("quiet", 0, now),
            Err(StateError::UnknownPeer("quiet".into()))
        );
        assert_eq!(
            ids(&s.find(&digest(), "asker", "a", 0, now).unwrap()),
            ["chatty"]
        );
    }

    #[test]
    fn find_hides_lapsed_peers_before_the_sweep() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("p", ""), 0, t0).unwrap();
        s.announce("p", ann(&[0], vec![]), t0).unwrap();
        let later = t0 + s.lease().lease;
        assert!(s.find(&digest(), "q", "", 0, later).is_none());
        // And a lapsed peer must register again, which clears its holdings.
        assert!(matches!(
            s.announce("p", ann(&[0], vec![]), later),
            Err(StateError::UnknownPeer(_))
        ));
        s.register(info("p", ""), 0, later).unwrap();
        assert!(s.find(&digest(), "q", "", 0, later).is_none());
        assert_eq!(s.blob_count(), 0);
    }

    #[test]
    fn reregistering_a_live_peer_keeps_its_holdings() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("p", ""), 0, t0).unwrap();
        s.announce("p", ann(&[0], vec![]), t0).unwrap();
        s.register(info("p", "z"), 0, t0 + HB).unwrap();
        let f = s.find(&digest(), "q", "z", 0, t0 + HB).unwrap();
        assert_eq!(f.peers[0].zone, "z");
    }

    #[test]
    fn expiry_drops_announcements_and_empty_blobs() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("p", ""), 0, t0).unwrap();
        s.announce("p", ann(&[0], vec![]), t0).unwrap();
        assert_eq!(s.expire(t0 + HB), 0);
        assert_eq!(s.expire(t0 + 2 * HB), 1);
        assert_eq!((s.peer_count(), s.blob_count()), (0, 0));
    }

    #[test]
    fn hashes_merge_and_conflicts_drop_the_hash() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        for id in ["a", "b", "c"] {
            s.register(info(id, ""), 0, t0).unwrap();
        }
        let h = |b: u8| Some([b; 32]);
        // a knows pieces 0-1, b knows 1-2 (agrees on 1), c lies about 2.
        s.announce("a", ann(&[0], vec![h(0), h(1)]), t0).unwrap();
        s.announce("b", ann(&[1], vec![None, h(1), h(2)]), t0)
            .unwrap();
        let f = s.find(&digest(), "x", "", 0, t0).unwrap();
        assert_eq!(f.hashes, vec![h(0), h(1), h(2)]);

        s.announce("c", ann(&[2], vec![None, None, h(9), h(3)]), t0)
            .unwrap();
        let f = s.find(&digest(), "x", "", 0, t0).unwrap();
        assert_eq!(f.hashes, vec![h(0), h(1), None, h(3)]);

        // Once the liar is gone, the honest hash is back.
        s.withdraw("c", &digest(), t0).unwrap();
        let f = s.find(&digest(), "x", "", 0, t0).unwrap();
        assert_eq!(f.hashes, vec![h(0), h(1), h(2)]);
    }

    #[test]
    fn malformed_announcements_are_refused() {
        let t0 = Instant::now();
        let mut s = State::new(HB);
        s.register(info("p", ""), 0, t0).unwrap();
        let mut a = ann(&[0], vec![]);
        a.bitmap.push(0);
        assert!(matches!(
            s.announce("p", a, t0),
            Err(StateError::Bitmap { .. })
        ));
        let a = ann(&[0], vec![None; 11]);
        assert!(matches!(
            s.announce("p", a, t0),
            Err(StateError::TooManyHashes { .. })
        ));
        let mut a = ann(&[0], vec![]);
        a.piece_size = 0;
        assert!(matches!(
            s.announce("p", a, t0),
            Err(StateError::ZeroPieceSize { .. })
        ));
        assert!(matches!(
            s.announce("nobody", ann(&[0], vec![]), t0),
            Err(StateError::UnknownPeer(_))
        ));
        // Geometry is fixed by the first holder.
        s.announce("p", ann(&[0], vec![]), t0).unwrap();
        s.register(info("q", ""), 0, t0).unwrap();
        let a = Announce {
            digest: digest(),
            size: 10,
            piece_size: 5,
            hashes: vec![],
            bitmap: vec![1],
        };
        assert!(matches!(
            s.announce("q", a, t0),
            Err(StateError::Geometry { .. })
        ));
        let mut bad = info("r", "");
        bad.quic_addr.clear();
        assert_eq!(s.register(bad, 0, t0), Err(StateError::IncompletePeer));
    }
}
