//! The tracker's state machine: peers, their leases and which pieces of which
//! blob each holds. Pure — no IO, no clock: every call that depends on time is
//! given `now`, so expiry and ranking are tested deterministically.
//!
//! Nothing here is durable on purpose. Peers re-register and replay their
//! announcements when a heartbeat answers "unknown peer", so losing this state
//! (restart, new replica) costs one heartbeat, not correctness.
//!
//! # Trust and bounds
//!
//! Every caller holds a cluster certificate, but a node can be compromised,
//! so nothing a caller sends is trusted to size anything:
//!
//! - A peer id belongs to the [`Caller`] that registered it (the
//!   certificate's own identity where it has one, else the source address):
//!   while its lease runs, nobody else can register it, renew it, announce or
//!   withdraw for it, or join a blob in its name.
//! - Every number is checked against [`Limits`] before it allocates: piece
//!   size and count (so bitmap and hash-list lengths), name lengths, digests
//!   per peer, holders per digest, peers in all and per caller.
//! - Every registration and holding is charged its heap bytes
//!   ([`PEER_OVERHEAD`], [`HOLDING_OVERHEAD`], [`HASH_BYTES`] plus its
//!   strings and bitmap; each blob's hash votes, [`VOTE_BYTES`], to the
//!   state as a whole), and a change that would take the total past
//!   [`Limits::max_bytes`], or one caller's share past
//!   [`Limits::max_bytes_per_caller`], is refused. So the state never holds
//!   more than `max_bytes` of heap, whatever the callers send.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    time::{Duration, Instant},
};

use damselfly_core::vocab::PieceHash;
use damselfly_core::vocab::{BadBitmap, Bitmap, Digest};

/// Answers at most this many peers unless asked for fewer: more candidates
/// than a scheduler can use only cost bandwidth.
pub const DEFAULT_MAX_PEERS: usize = 32;

/// Heap charged for a registration besides its strings: its entries in the
/// peer and caller maps with hash-table slack, and allocator headers.
pub(super) const PEER_OVERHEAD: u64 = 1024;
/// Heap charged for a holding besides its bitmap, hashes and the holder's id:
/// its entries in the blob's holder map and in the peer's digest set, a whole
/// blob entry (as if every holding were of a blob of its own), table slack
/// and allocator headers.
pub(super) const HOLDING_OVERHEAD: u64 = 1024;
/// Heap per piece hash kept (`Option<[u8; 32]>`).
pub(super) const HASH_BYTES: u64 = 33;
/// Heap of a blob's [`Votes`]: per piece slot, and per distinct hash of a
/// piece (36 bytes and the allocator's header). Honest holders share one
/// vote per piece, so this is charged to the state as a whole, not to the
/// holders: a caller's own hashes already bound how many votes it can add.
const VOTE_SLOT_BYTES: u64 = 24;
const VOTE_BYTES: u64 = 48;

/// What the tracker accepts. The defaults fit a cluster of a few thousand
/// nodes with 4 MiB pieces (blobs up to 64 GiB) in 256 MiB of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Live registrations at once.
    pub max_peers: usize,
    /// Live registrations by one [`Caller`]: an agent has one, or two while
    /// a restarted one's old lease runs out.
    pub max_peers_per_caller: usize,
    /// Blobs one peer holds (or is fetching) at once.
    pub max_digests_per_peer: usize,
    /// Holders of one blob; more are refused (they still fetch from the
    /// others, they are just not named).
    pub max_peers_per_digest: usize,
    /// Pieces of one blob: bounds its bitmap (`max_pieces / 8` bytes) and
    /// hash list, and with [`Self::max_piece_size`] the blob's size.
    pub max_pieces: u64,
    pub max_piece_size: u64,
    /// Bytes of a peer id, QUIC address, node name or zone.
    pub max_name: usize,
    /// Peers in one `Find` answer.
    pub max_answer: usize,
    /// Heap the whole state may hold (see the module doc).
    pub max_bytes: u64,
    /// Of which one caller's registrations and holdings.
    pub max_bytes_per_caller: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self::with_max_bytes(256 << 20)
    }
}

impl Limits {
    /// The defaults with a state budget of `max_bytes`, of which one caller
    /// may take a sixteenth: a compromised node cannot crowd out the rest.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self {
            max_peers: 4096,
            max_peers_per_caller: 4,
            max_digests_per_peer: 16384,
            // Every peer the tracker takes: in a rollout every node holds
            // the image, and one left unnamed is one fewer source (simulated
            // 2,600 nodes: p99 100 s at 1,024, 55 s at 4,096).
            max_peers_per_digest: 4096,
            max_pieces: 16384,
            max_piece_size: 64 << 20,
            max_name: 256,
            max_answer: 64,
            max_bytes,
            max_bytes_per_caller: max_bytes / 16,
        }
    }

    /// The largest `Announce` or `Find` answer these limits allow, encoded:
    /// the gRPC message size limit is set from it.
    pub fn max_message(&self) -> usize {
        // A hash is 34 bytes on the wire (tag, length, 32), a holding's
        // strings and numbers well under 4 names; 4 KiB covers the rest.
        let hashes = self.max_pieces as usize * 34;
        let bitmap = self.max_pieces.div_ceil(8) as usize + 16;
        let holding = bitmap + 4 * (self.max_name + 4) + 32;
        hashes + self.max_answer * holding + 4096
    }
}

/// Who is calling, as far as the tracker can tell: what a peer id is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The client certificate's own names beyond the shared ones
    /// ([`damselfly_pki::node_identity`]): per-node certificates.
    Identity(String),
    /// A certificate every node shares: only the source address tells
    /// callers apart.
    Address(IpAddr),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Identity(id) => write!(f, "certificate {id}"),
            Caller::Address(a) => write!(f, "address {a}"),
        }
    }
}

impl Caller {
    fn heap(&self) -> u64 {
        match self {
            Caller::Identity(id) => id.capacity() as u64,
            Caller::Address(_) => 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("unknown peer {0:?} (register first)")]
    UnknownPeer(String),
    #[error("peer id and QUIC address must not be empty")]
    IncompletePeer,
    #[error("{what} is {len} bytes, at most {max} allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{digest}: piece size {piece_size} is not within 1..={max}")]
    BadPieceSize {
        digest: Digest,
        piece_size: u64,
        max: u64,
    },
    #[error("{digest}: {size} bytes in {piece_size}-byte pieces is more than {max} pieces")]
    TooManyPieces {
        digest: Digest,
        size: u64,
        piece_size: u64,
        max: u64,
    },
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
    #[error("peer {id:?} is registered by another caller ({owner}); it cannot be taken over")]
    Taken { id: String, owner: Caller },
    #[error("peer {id:?} is not yours: it was registered by {owner}")]
    NotYours { id: String, owner: Caller },
    #[error("{max} peers are registered, the most this tracker takes")]
    TooManyPeers { max: usize },
    #[error("{caller} already has {max} peers registered, the most one caller may")]
    TooManyPeersOfCaller { caller: Caller, max: usize },
    #[error("peer {id:?} already holds {max} blobs, the most one peer may")]
    TooManyDigests { id: String, max: usize },
    #[error("{digest} already has {max} holders, the most one blob may")]
    TooManyHolders { digest: Digest, max: usize },
    #[error("{what} needs {needed} more bytes of tracker state: {used} of {max} in use{whose}")]
    OutOfMemory {
        what: &'static str,
        needed: u64,
        used: u64,
        max: u64,
        whose: String,
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

impl PeerInfo {
    fn check(&self, max: usize) -> Result<(), StateError> {
        if self.id.is_empty() || self.quic_addr.is_empty() {
            return Err(StateError::IncompletePeer);
        }
        for (what, s) in [
            ("peer id", &self.id),
            ("QUIC address", &self.quic_addr),
            ("node name", &self.node),
            ("zone", &self.zone),
        ] {
            check_len(what, s, max)?;
        }
        Ok(())
    }

    fn heap(&self) -> u64 {
        // The id is kept twice: as the map key and in the record.
        (2 * self.id.capacity()
            + self.quic_addr.capacity()
            + self.node.capacity()
            + self.zone.capacity()) as u64
    }
}

/// Refuses a string longer than `max` bytes.
pub(super) fn check_len(what: &'static str, s: &str, max: usize) -> Result<(), StateError> {
    if s.len() > max {
        return Err(StateError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    Ok(())
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
    /// How long the asker should wait before asking again ([`State::pace`]).
    pub refresh_after: Duration,
}

struct Peer {
    info: PeerInfo,
    /// [`id_hash`] of its id, computed once: a find orders thousands of
    /// holders by it.
    sample: u64,
    owner: Caller,
    active_uploads: u32,
    expires: Instant,
    /// Kept so expiry and re-registration find the peer's holdings without
    /// scanning every blob.
    holds: BTreeSet<Digest>,
    /// Bytes charged for the registration and every holding.
    charge: u64,
    /// The connection the peer last registered or heartbeat over (the
    /// server's number for it), if the server tracks them.
    connection: Option<u64>,
}

struct Holding {
    bitmap: Bitmap,
    hashes: Vec<PieceHash>,
    charge: u64,
}

struct Blob {
    size: u64,
    piece_size: u64,
    holders: HashMap<String, Holding>,
    votes: Votes,
}

/// Per piece, each hash the blob's holders announced and how many did: the
/// agreed hash list ([`Votes::agreed`]) without going over every holder's
/// list at each find. Kept with the holdings, so it counts every holder
/// until its holding is taken out (withdrawn, expired, replaced).
#[derive(Default)]
struct Votes {
    slots: Vec<Vec<([u8; 32], u32)>>,
    /// Distinct (piece, hash) votes.
    votes: u64,
}

impl Votes {
    /// Heap charged for it ([`VOTE_SLOT_BYTES`], [`VOTE_BYTES`]).
    fn heap(&self) -> u64 {
        VOTE_SLOT_BYTES * self.slots.len() as u64 + VOTE_BYTES * self.votes
    }

    fn add(&mut self, hashes: &[PieceHash]) {
        // Exact reservations throughout: the charge counts what is used,
        // and a Vec's growth would hold up to four times that.
        if self.slots.len() < hashes.len() {
            self.slots.reserve_exact(hashes.len() - self.slots.len());
            self.slots.resize_with(hashes.len(), Vec::new);
        }
        for (slot, h) in self.slots.iter_mut().zip(hashes) {
            let Some(h) = h else { continue };
            match slot.iter_mut().find(|(v, _)| v == h) {
                Some((_, n)) => *n += 1,
                None => {
                    slot.reserve_exact(1);
                    slot.push((*h, 1));
                    self.votes += 1;
                }
            }
        }
    }

    fn remove(&mut self, hashes: &[PieceHash]) {
        for (slot, h) in self.slots.iter_mut().zip(hashes) {
            let Some(h) = h else { continue };
            if let Some(at) = slot.iter().position(|(v, _)| v == h) {
                slot[at].1 -= 1;
                if slot[at].1 == 0 {
                    slot.swap_remove(at);
                    slot.shrink_to_fit();
                    self.votes -= 1;
                }
            }
        }
        while self.slots.last().is_some_and(Vec::is_empty) {
            self.slots.pop();
        }
        if self.slots.capacity() > 2 * self.slots.len() {
            self.slots.shrink_to_fit();
        }
    }

    /// Per piece: the hash every announcer that knows one agrees on, or
    /// `None` when nobody knows it or two disagree. A liar can thus only
    /// erase a hash (the downloader then verifies another way or retries),
    /// never plant one that others contradict. Trailing unknowns trimmed.
    fn agreed(&self) -> Vec<PieceHash> {
        let mut out: Vec<PieceHash> = self
            .slots
            .iter()
            .map(|slot| match slot[..] {
                [(h, _)] => Some(h),
                _ => None,
            })
            .collect();
        while out.last() == Some(&None) {
            out.pop();
        }
        out
    }
}

/// What one caller has: how many peers, how many bytes.
#[derive(Default)]
struct Usage {
    peers: usize,
    bytes: u64,
}

pub struct State {
    heartbeat: Duration,
    limits: Limits,
    peers: HashMap<String, Peer>,
    blobs: HashMap<Digest, Blob>,
    callers: HashMap<Caller, Usage>,
    /// Bytes charged in all.
    bytes: u64,
}

impl State {
    /// `heartbeat` is the interval peers are told to keep. The lease is one and
    /// a half of it: one late heartbeat is forgiven, and with expiry swept
    /// every quarter interval a silent peer is gone within two intervals.
    pub fn new(heartbeat: Duration) -> Self {
        Self::with_limits(heartbeat, Limits::default())
    }

    pub fn with_limits(heartbeat: Duration, limits: Limits) -> Self {
        Self {
            heartbeat,
            limits,
            peers: HashMap::new(),
            blobs: HashMap::new(),
            callers: HashMap::new(),
            bytes: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
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

    /// Heap bytes charged now; never above [`Limits::max_bytes`].
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Start or renew a lease. A known peer keeps its holdings: re-registering
    /// is how a peer recovers from a lost heartbeat answer, and it re-announces
    /// anyway. A live peer id registered by another caller is refused.
    pub fn register(
        &mut self,
        caller: &Caller,
        info: PeerInfo,
        active_uploads: u32,
        now: Instant,
    ) -> Result<Lease, StateError> {
        info.check(self.limits.max_name)?;
        let lease = self.lease();
        let expires = now + lease.lease;
        let fresh = PEER_OVERHEAD + info.heap() + caller.heap();
        match self.peers.get(&info.id) {
            Some(p) if p.expires > now => {
                if p.owner != *caller {
                    return Err(StateError::Taken {
                        id: info.id,
                        owner: p.owner.clone(),
                    });
                }
                let old = PEER_OVERHEAD + p.info.heap() + caller.heap();
                self.admit(caller, fresh.saturating_sub(old), 0, "registration")?;
                let p = self.peers.get_mut(&info.id).expect("looked up above");
                p.info = info;
                p.active_uploads = active_uploads;
                p.expires = expires;
                p.charge = p.charge - old + fresh;
                self.recharge(caller, old, fresh);
            }
            _ => {
                // An expired record not yet swept is dropped with its holdings
                // so a re-registration starts from what the peer replays.
                self.drop_peer(&info.id);
                if self.peers.len() >= self.limits.max_peers {
                    return Err(StateError::TooManyPeers {
                        max: self.limits.max_peers,
                    });
                }
                let mine = self.callers.get(caller).map_or(0, |u| u.peers);
                if mine >= self.limits.max_peers_per_caller {
                    return Err(StateError::TooManyPeersOfCaller {
                        caller: caller.clone(),
                        max: self.limits.max_peers_per_caller,
                    });
                }
                self.admit(caller, fresh, 0, "registration")?;
                self.recharge(caller, 0, fresh);
                self.callers.entry(caller.clone()).or_default().peers += 1;
                self.peers.insert(
                    info.id.clone(),
                    Peer {
                        sample: id_hash(&info.id),
                        info,
                        owner: caller.clone(),
                        active_uploads,
                        expires,
                        holds: BTreeSet::new(),
                        charge: fresh,
                        connection: None,
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
        caller: &Caller,
        id: &str,
        active_uploads: u32,
        now: Instant,
    ) -> Result<Lease, StateError> {
        let lease = self.lease();
        let p = self.own_peer_mut(caller, id, now)?;
        p.active_uploads = active_uploads;
        p.expires = now + lease.lease;
        Ok(lease)
    }

    /// Checks a blob's size and piece size against the limits; its piece
    /// count if they pass.
    pub fn check_geometry(
        &self,
        digest: &Digest,
        size: u64,
        piece_size: u64,
    ) -> Result<u64, StateError> {
        let l = &self.limits;
        if piece_size == 0 || piece_size > l.max_piece_size {
            return Err(StateError::BadPieceSize {
                digest: *digest,
                piece_size,
                max: l.max_piece_size,
            });
        }
        let pieces = size.div_ceil(piece_size);
        if pieces > l.max_pieces {
            return Err(StateError::TooManyPieces {
                digest: *digest,
                size,
                piece_size,
                max: l.max_pieces,
            });
        }
        Ok(pieces)
    }

    /// Replace `id`'s bitmap and hashes for a blob. Refused without touching
    /// anything: a peer that is not the caller's, numbers past the limits, a
    /// size or piece size other than the holders', state past its budget.
    pub fn announce(
        &mut self,
        caller: &Caller,
        id: &str,
        a: Announce,
        now: Instant,
    ) -> Result<(), StateError> {
        let digest = a.digest;
        let pieces = self.check_geometry(&digest, a.size, a.piece_size)?;
        if a.hashes.len() as u64 > pieces {
            return Err(StateError::TooManyHashes {
                digest,
                got: a.hashes.len(),
                pieces,
            });
        }
        let bitmap = Bitmap::from_bytes(pieces, &a.bitmap)
            .map_err(|source| StateError::Bitmap { digest, source })?;
        let holds = self.own_peer_mut(caller, id, now)?.holds.len();
        let blob = self.blobs.get(&digest);
        if let Some(b) = blob
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
        let old = blob.and_then(|b| b.holders.get(id)).map(|h| h.charge);
        if old.is_none() {
            if holds >= self.limits.max_digests_per_peer {
                return Err(StateError::TooManyDigests {
                    id: id.to_string(),
                    max: self.limits.max_digests_per_peer,
                });
            }
            if blob.is_some_and(|b| b.holders.len() >= self.limits.max_peers_per_digest) {
                return Err(StateError::TooManyHolders {
                    digest,
                    max: self.limits.max_peers_per_digest,
                });
            }
        }
        let mut hashes = a.hashes;
        hashes.shrink_to_fit();
        let charge = HOLDING_OVERHEAD
            + id.len() as u64
            + bitmap.as_bytes().len() as u64
            + HASH_BYTES * hashes.capacity() as u64;
        let old = old.unwrap_or(0);
        // At worst each hash is a vote of its own in a slot of its own.
        let votes = (VOTE_SLOT_BYTES + VOTE_BYTES) * hashes.len() as u64;
        self.admit(caller, charge.saturating_sub(old), votes, "announcement")?;
        self.recharge(caller, old, charge);
        let blob = self.blobs.entry(digest).or_insert_with(|| Blob {
            size: a.size,
            piece_size: a.piece_size,
            holders: HashMap::new(),
            votes: Votes::default(),
        });
        let votes_before = blob.votes.heap();
        blob.votes.add(&hashes);
        let replaced = blob.holders.insert(
            id.to_string(),
            Holding {
                bitmap,
                hashes,
                charge,
            },
        );
        if let Some(old) = replaced {
            blob.votes.remove(&old.hashes);
        }
        self.bytes = self.bytes - votes_before + blob.votes.heap();
        let p = self.peers.get_mut(id).expect("checked live above");
        p.holds.insert(digest);
        p.charge = p.charge - old + charge;
        Ok(())
    }

    /// `id` no longer holds `digest`. Withdrawing what was never announced is
    /// fine: the caller may be retrying.
    pub fn withdraw(
        &mut self,
        caller: &Caller,
        id: &str,
        digest: &Digest,
        now: Instant,
    ) -> Result<(), StateError> {
        self.own_peer_mut(caller, id, now)?.holds.remove(digest);
        let freed = self.take_holding(id, digest);
        if let Some(p) = self.peers.get_mut(id) {
            p.charge -= freed;
        }
        self.recharge(caller, freed, 0);
        Ok(())
    }

    /// [`State::find`], then, if `join` gives the blob's geometry, records
    /// `asking` as a holder of no piece yet (an announcement it already made
    /// stays). Answer and record are one step under the caller's lock, so of
    /// peers joining together exactly one is told nobody else has it.
    /// Joining in the name of another caller's peer, or with a geometry past
    /// the limits, is refused.
    #[allow(clippy::too_many_arguments)]
    pub fn find_and_join(
        &mut self,
        caller: &Caller,
        digest: &Digest,
        asking: &str,
        zone: &str,
        max_peers: usize,
        join: Option<(u64, u64)>,
        now: Instant,
    ) -> Result<Option<Found>, StateError> {
        let Some((size, piece_size)) = join else {
            return Ok(self.find(digest, asking, zone, max_peers, now));
        };
        let pieces = self.check_geometry(digest, size, piece_size)?;
        if let Some(p) = self.peers.get(asking)
            && p.expires > now
            && p.owner != *caller
        {
            return Err(StateError::NotYours {
                id: asking.to_string(),
                owner: p.owner.clone(),
            });
        }
        let found = self.find(digest, asking, zone, max_peers, now);
        let held = self
            .blobs
            .get(digest)
            .is_some_and(|b| b.holders.contains_key(asking));
        if !held {
            // Refused (unknown peer, other geometry, a limit): the answer
            // alone is still right, and the asker's own announcements will
            // follow (or be refused on their own).
            let _ = self.announce(
                caller,
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
        Ok(found)
    }

    /// Who holds or is fetching pieces of `digest`, for `asking` in `zone`;
    /// `None` when nobody does. Ranked: peers in the asker's zone first (an
    /// empty zone matches nothing), then most pieces held, then fewest active
    /// uploads, then most upload capacity; ties by id so the answer is
    /// deterministic. Excludes the asker and peers whose lease ran out. Peers
    /// holding no piece yet are listed (last): they are downloading it, and
    /// waiting for their pieces spares the origin. At most `max_peers` (0:
    /// [`DEFAULT_MAX_PEERS`]), never more than [`Limits::max_answer`].
    ///
    /// When more peers hold the blob than an answer names, a quarter of it
    /// goes to the best ranked (the most complete: where fresh pieces are)
    /// and the rest to others picked by a hash of the asker's and their ids,
    /// zone first: each asker sees its own, stable sample, so the swarm
    /// trades along many paths rather than every node asking the same few.
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
        let hashes = blob.votes.agreed();
        let same_zone = |p: &Peer| !zone.is_empty() && p.info.zone == zone;
        let rank = |(a, ha): &&(&Peer, &Holding), (b, hb): &&(&Peer, &Holding)| {
            same_zone(b)
                .cmp(&same_zone(a))
                .then(hb.bitmap.held().cmp(&ha.bitmap.held()))
                .then(a.active_uploads.cmp(&b.active_uploads))
                .then(b.info.upload_capacity.cmp(&a.info.upload_capacity))
                .then(a.info.id.cmp(&b.info.id))
        };
        let mut ranked: Vec<&(&Peer, &Holding)> =
            live.iter().filter(|(p, _)| p.info.id != asking).collect();
        let limit = if max_peers == 0 {
            DEFAULT_MAX_PEERS
        } else {
            max_peers
        }
        .min(self.limits.max_answer);
        // Selections rather than sorts of every holder: a find costs
        // O(holders), and one replica answers a whole swarm's finds.
        if ranked.len() > limit {
            let best = limit / 4;
            let asker = id_hash(asking);
            if best > 0 {
                ranked.select_nth_unstable_by(best - 1, rank);
            }
            let mut others: Vec<(bool, u64, &str, &(&Peer, &Holding))> = ranked[best..]
                .iter()
                .map(|e| {
                    let id = e.0.info.id.as_str();
                    (!same_zone(e.0), sample_key(asker, e.0.sample), id, *e)
                })
                .collect();
            let take = limit - best;
            if take > 0 && others.len() > take {
                others
                    .select_nth_unstable_by(take - 1, |x, y| (x.0, x.1, x.2).cmp(&(y.0, y.1, y.2)));
            }
            others.truncate(take);
            ranked.truncate(best);
            ranked.extend(others.into_iter().map(|(_, _, _, e)| e));
        }
        // The best ranked stay first: everyone else ranks below them.
        ranked.sort_by(rank);
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
            refresh_after: pace(live.len()),
        })
    }

    /// How long a holder of `digest` should wait before announcing it again,
    /// and anyone before asking about it again: 100 ms per 32 holders, at
    /// most 2 s. Every call about a digest goes to one replica, so its calls
    /// per second must not grow with the swarm: about 320 finds and as many
    /// announces a second however many hold it, up to 640 holders.
    pub fn pace(&self, digest: &Digest) -> Duration {
        pace(self.blobs.get(digest).map_or(0, |b| b.holders.len()))
    }

    /// The live peer `id` of `caller` speaks over connection `conn` (the
    /// server's number for it): when that connection closes, the peer is
    /// gone ([`State::connection_closed`]). Called after every registration
    /// and heartbeat, so a peer that reconnects moves to its new connection.
    pub fn bind_connection(
        &mut self,
        caller: &Caller,
        id: &str,
        conn: u64,
        now: Instant,
    ) -> Result<(), StateError> {
        self.own_peer_mut(caller, id, now)?.connection = Some(conn);
        Ok(())
    }

    /// Connection `conn` closed: the peers bound to it are forgotten at once,
    /// with everything they announced, rather than when their lease runs
    /// out. A process that dies has its connections closed by its kernel,
    /// so the peers waiting on its pieces learn within a find, not a lease.
    /// A peer still alive registers again at its next heartbeat (told it is
    /// unknown) and replays its announcements. Returns how many were dropped.
    pub fn connection_closed(&mut self, conn: u64) -> usize {
        let gone: Vec<String> = self
            .peers
            .values()
            .filter(|p| p.connection == Some(conn))
            .map(|p| p.info.id.clone())
            .collect();
        for id in &gone {
            self.drop_peer(id);
        }
        gone.len()
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

    /// The live peer `id`, if `caller` registered it.
    fn own_peer_mut(
        &mut self,
        caller: &Caller,
        id: &str,
        now: Instant,
    ) -> Result<&mut Peer, StateError> {
        let p = self.live_peer_mut(id, now)?;
        if p.owner != *caller {
            return Err(StateError::NotYours {
                id: id.to_string(),
                owner: p.owner.clone(),
            });
        }
        Ok(p)
    }

    /// Whether `caller` may take `extra` more bytes, and the state `extra`
    /// plus `shared` (charged to nobody: see [`VOTE_BYTES`]).
    fn admit(
        &self,
        caller: &Caller,
        extra: u64,
        shared: u64,
        what: &'static str,
    ) -> Result<(), StateError> {
        let l = &self.limits;
        if self.bytes + extra + shared > l.max_bytes {
            return Err(StateError::OutOfMemory {
                what,
                needed: extra + shared,
                used: self.bytes,
                max: l.max_bytes,
                whose: String::new(),
            });
        }
        let mine = self.callers.get(caller).map_or(0, |u| u.bytes);
        if mine + extra > l.max_bytes_per_caller {
            return Err(StateError::OutOfMemory {
                what,
                needed: extra,
                used: mine,
                max: l.max_bytes_per_caller,
                whose: format!(" by {caller}"),
            });
        }
        Ok(())
    }

    /// Replaces a charge of `old` bytes by one of `new`.
    fn recharge(&mut self, caller: &Caller, old: u64, new: u64) {
        self.bytes = self.bytes - old + new;
        let u = self.callers.entry(caller.clone()).or_default();
        u.bytes = u.bytes - old + new;
    }

    fn drop_peer(&mut self, id: &str) {
        if let Some(p) = self.peers.remove(id) {
            for d in &p.holds {
                self.take_holding(id, d);
            }
            // The registration and every holding, all charged to the peer.
            self.recharge(&p.owner, p.charge, 0);
            if let Some(u) = self.callers.get_mut(&p.owner) {
                u.peers -= 1;
                if u.peers == 0 {
                    self.callers.remove(&p.owner);
                }
            }
        }
    }

    /// Takes `id`'s holding of `digest` out of its blob; what it was charged.
    fn take_holding(&mut self, id: &str, digest: &Digest) -> u64 {
        let Some(b) = self.blobs.get_mut(digest) else {
            return 0;
        };
        let Some(h) = b.holders.remove(id) else {
            return 0;
        };
        let votes_before = b.votes.heap();
        b.votes.remove(&h.hashes);
        self.bytes = self.bytes - votes_before + b.votes.heap();
        // The geometry belongs to the holders: with none left, the next
        // announcer sets it afresh.
        if b.holders.is_empty() {
            self.blobs.remove(digest);
        }
        h.charge
    }
}

/// See [`State::pace`].
const PACE: Duration = Duration::from_millis(100);
const PACE_PER: usize = 32;
const MAX_PACE: Duration = Duration::from_secs(2);

fn pace(holders: usize) -> Duration {
    PACE.saturating_mul(holders.div_ceil(PACE_PER).max(1) as u32)
        .min(MAX_PACE)
}

fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Orders the holders an asker is shown beyond the best ranked (by their
/// [`id_hash`]es): the same order for the same asker every time (its sample
/// is stable across finds), a different one for each asker. SplitMix64's
/// finaliser, a bijection, so distinct holders never tie.
fn sample_key(asker: u64, holder: u64) -> u64 {
    let mut z = asker ^ holder;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
