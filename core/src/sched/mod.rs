//! The piece scheduler for one blob: which piece to ask of which source, and
//! when to give up on a request. A pure state machine in the manner of
//! quinn-proto: no IO, no clock, no async. The driver feeds it events with
//! the current [`Instant`] and carries out the [`Action`]s it returns.
//!
//! # Model
//!
//! The blob is `size` bytes in pieces of `piece_size` (the last one short).
//! Pieces come from peers ([`PeerId`], each with a bitmap of what it holds,
//! which grows while it downloads too) or from the origin (HTTP range
//! requests; it holds every piece). Pieces already on disk (resume) are
//! passed to [`Scheduler::new`].
//!
//! A piece is asked of a peer only if the peer's bitmap has it **and** the
//! driver has said a trusted sha256 for it is known
//! ([`Scheduler::set_hash_known`]); a piece without one comes from the
//! origin only, so a missing or poisoned hash list costs at most a retry from
//! the origin, never an unverified peer byte.
//!
//! # Choosing
//!
//! Each [`Scheduler::poll`] (also run at the end of every event method that
//! takes `now`) first fails requests past their deadline, then walks the
//! pieces that are missing and have no request out, in this order:
//!
//! 1. the read window, `[read_position, read_position + window)` in index
//!    order, so the in-order stream to the client never waits on a far piece;
//! 2. the rest rarest first (fewest live peers hold it), ties broken by
//!    distance past the read position.
//!
//! For each, within the limits (`max_in_flight` overall, `max_per_peer`,
//! `max_origin`):
//!
//! - some live peer holds it and has a free slot: the best such peer (highest
//!   measured rate, an unmeasured peer counts as the best measured one so it
//!   gets tried; ties to the one with fewer requests out), unless the origin
//!   has been measured faster than that peer, then the origin;
//! - holders exist but all are busy: the origin if the piece is in the busy
//!   window ([`Config::busy_window`]), or in the read window once the swarm
//!   has gone `patience` without news; else wait for a slot;
//! - no usable holder (none holds it, or every holder already failed this
//!   piece): the origin if this node leads ([`Scheduler::set_leading`]: it
//!   took over from the node fetching the blob from the origin), there are
//!   no live peers at all, the piece has failed before, or it is in the read
//!   window and the swarm has gone `patience` without news (a peer announcing a piece we lack,
//!   or a piece completing); else wait, since peers that are downloading it
//!   too will likely announce it and that spares the origin. The read window
//!   moves with the client and patience runs out, so every piece is
//!   eventually fetched.
//! - hash unknown: the origin if some peer holds the piece (its bytes could
//!   not be checked), else as with no usable holder (the hash comes with
//!   the first holder's announcement).
//!
//! Rescue: a read-window piece whose single request to a peer is overdue
//! (past its expected time at the peer's measured rate, or `min_timeout`
//! while unmeasured) is asked of a second source by the same rules (another
//! free holder, else the origin), so the stream does not wait for a slow
//! peer's timeout.
//!
//! Endgame (`endgame`): once every missing piece has a request out, pieces
//! with a single request get a second one from another peer (the origin
//! only by the rules above: read window, a failed piece, or a faster
//! origin), slowest expected finish first. The first verified copy cancels
//! the others.
//!
//! Busy: a holder serves a few requests at a time and answers the rest
//! "busy" ([`Scheduler::on_busy`]). That is no failure: the piece is not held
//! against the peer; the peer is only left alone for `busy_backoff`, doubled
//! with each busy answer in a row (at most [`MAX_BUSY_DOUBLINGS`] times), and
//! the piece goes to another holder, typically one that just got it from the
//! busy one, so a fresh piece spreads as a tree rather than a star.
//!
//! Rates are bytes per second per request (EWMA), measured from request to
//! arrival, so they already reflect each source's concurrency. A request's
//! deadline is `max(min_timeout, 4 × expected time)` at its source's rate, or
//! `initial_timeout` while the source is unmeasured. A timed-out request is
//! cancelled and counted as a failure; a timeout also feeds the rate a sample
//! of what it delivered at best, so a slow peer looks slow. A peer that fails
//! a piece is not asked for that piece again. A peer that sends a piece
//! failing its hash is banned for this blob ([`Action::Banned`]); one that
//! fails `max_failures` times in a row is dropped ([`Action::Dropped`]).
//! Neither is asked again, even if announced again. The origin is never given
//! up on: the driver decides when enough origin failures
//! ([`Scheduler::origin_failures`]) mean the pull fails.
//!
//! # Driver contract
//!
//! - Every [`Action::Request`] ends exactly once: by the driver calling
//!   [`Scheduler::on_piece`] or [`Scheduler::on_failure`] for it, or by the
//!   scheduler returning an [`Action::Cancel`] for it (then the driver aborts
//!   it and reports nothing more; a report that comes anyway is tolerated:
//!   a verified piece still missing is accepted, a corrupt one still bans;
//!   if a new request to the same source for the same piece is out by then,
//!   the report answers it).
//! - Each piece's bytes are verified by the driver before it reports them:
//!   `verified` is whether they matched the trusted hash. For an origin piece
//!   without a known hash the driver passes `true` and relies on the whole
//!   blob digest. A peer's piece whose hash became unknown after it was
//!   asked for cannot be checked: report it with `on_failure`, not as
//!   corrupt, and drop the bytes. Only on [`Action::Completed`] does the driver keep the
//!   bytes (write to the store, announce to the tracker, deliver in order);
//!   a duplicate that arrives later gets no `Completed` and is dropped.
//! - [`Action::Done`] comes once, when every piece is held.
//! - After `add_peer`, `update_peer`, `peer_has`, `set_hash_known*` and
//!   `set_read_position` (which take no clock), call [`Scheduler::poll`].
//!   Call it as well at [`Scheduler::next_deadline`], so timeouts fire.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::vocab::{BadBitmap, Bitmap};

/// A peer, as the driver numbers them; the scheduler attaches no meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Peer(PeerId),
    Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch `piece` from `from`.
    Request { piece: u64, from: Source },
    /// Abort that request; report nothing more for it.
    Cancel { piece: u64, from: Source },
    /// `piece` is held: keep the bytes that were just reported.
    Completed(u64),
    /// The peer sent a corrupt piece; it is never asked again for this blob.
    Banned(PeerId),
    /// The peer failed too often in a row; it is never asked again for this
    /// blob.
    Dropped(PeerId),
    /// Every piece is held.
    Done,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Requests out to one peer.
    pub max_per_peer: usize,
    /// Requests out in all, origin and endgame duplicates included.
    pub max_in_flight: usize,
    /// Requests out to the origin.
    pub max_origin: usize,
    /// Pieces from the read position on that go before all others; at
    /// least 1 is used, so the piece the client waits for is never starved.
    pub window: u64,
    /// Floor of a measured source's timeout.
    pub min_timeout: Duration,
    /// Timeout for a source with no rate measured yet.
    pub initial_timeout: Duration,
    /// Failures (errors or timeouts) in a row after which a peer is dropped.
    pub max_failures: u32,
    /// Duplicate the slowest requests once every missing piece is out.
    pub endgame: bool,
    /// The origin is preferred over a peer only when measured this many
    /// times faster (1.0: whenever faster). Above 1, origin bytes are saved
    /// at some cost in speed.
    pub origin_margin: f64,
    /// With every holder busy, pieces this close to the read position go to
    /// the origin rather than wait (`None`: the whole read window; `Some(0)`:
    /// none, though rescue still covers the piece at the read position).
    pub busy_window: Option<u64>,
    /// A read-window piece counts as overdue at its peer after this many
    /// times its expected time (rescue asks a second source then).
    pub rescue_factor: u32,
    /// ... and never before this long (a second source costs bytes too).
    pub rescue_floor: Duration,
    /// A peer that answered busy is not asked again for this long (doubled
    /// with each busy answer in a row).
    pub busy_backoff: Duration,
    /// How long a read-window piece nobody holds waits for the swarm while
    /// it makes progress, before it goes to the origin (`None`: no wait).
    /// Nodes that start a pull together thus wait for the one fetching from
    /// the origin instead of each fetching the blob. A read-window piece
    /// whose holders all answer busy waits as long (`None`: as long as
    /// they do, within the busy window).
    pub patience: Option<Duration>,
}

impl Config {
    /// The policy the agent runs. Origin bytes are what the swarm saves: a
    /// piece goes there only when the client is waiting on it and no peer
    /// can give it, never because the origin looks faster.
    pub fn production() -> Self {
        Self {
            // Per-request rates understate a peer serving several pieces at
            // once, so speed alone never sends a piece a peer can give to the
            // origin.
            origin_margin: f64::INFINITY,
            busy_window: Some(0),
            rescue_factor: 4,
            rescue_floor: Duration::from_secs(10),
            // A peer serving many nodes at once answers each request slowly
            // but surely; a dead one shows as a connection error long before
            // these run out. Timing out a slow request would send its piece
            // to the origin.
            min_timeout: Duration::from_secs(30),
            initial_timeout: Duration::from_secs(60),
            // Nodes pulling together wait for the one fetching from the
            // origin while its pieces keep coming. Seeds too: a seed the
            // tracker names no holder to is the one that fetches from the
            // origin (the join decides that); one that finds another node
            // already fetching waits for its pieces like anyone, or several
            // seeds preheating together would each take the image from the
            // origin.
            patience: Some(Duration::from_secs(10)),
            // What a peer serves one node at once (the peer server's
            // `max_uploads_per_peer`); more would only be answered busy.
            max_per_peer: 2,
            endgame: false,
            ..Self::eager()
        }
    }

    /// The plain rules with nothing held back: the origin whenever it is
    /// measured faster or the read window waits, short timeouts, no
    /// patience. Tests start here to exercise one rule at a time; the agent
    /// runs [`Config::production`].
    pub fn eager() -> Self {
        Self {
            max_per_peer: 4,
            max_in_flight: 16,
            max_origin: 4,
            window: 8,
            min_timeout: Duration::from_secs(2),
            initial_timeout: Duration::from_secs(15),
            max_failures: 3,
            endgame: true,
            origin_margin: 1.0,
            busy_window: None,
            rescue_factor: 1,
            rescue_floor: MIN_SAMPLE,
            busy_backoff: Duration::from_millis(50),
            patience: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("piece size must be positive")]
    ZeroPieceSize,
    #[error(transparent)]
    Bitmap(#[from] BadBitmap),
}

/// A busy peer's backoff doubles at most this many times (50 ms: 0.4 s): a
/// holder serving a few peers frees a slot every fraction of a piece time.
pub const MAX_BUSY_DOUBLINGS: u32 = 3;
/// A request's timeout is this many times its expected duration.
const TIMEOUT_FACTOR: u32 = 4;
/// Weight of a new sample in a rate.
const EWMA_ALPHA: f64 = 0.3;
/// Shortest elapsed time a sample is taken to have, so an instant arrival
/// (clock granularity) cannot make a rate infinite.
const MIN_SAMPLE: Duration = Duration::from_millis(1);

/// Bytes per second per request, once measured.
#[derive(Debug, Clone, Copy, Default)]
struct Rate(Option<f64>);

impl Rate {
    fn sample(&mut self, bytes: u64, elapsed: Duration) {
        let r = bytes as f64 / elapsed.max(MIN_SAMPLE).as_secs_f64();
        self.0 = Some(match self.0 {
            Some(old) => old + EWMA_ALPHA * (r - old),
            None => r,
        });
    }
}

#[derive(Debug, Clone)]
struct Peer {
    have: Bitmap,
    /// Pieces it holds that this node lacks: a peer with none is passed over
    /// without looking at its bitmap.
    useful: u64,
    in_flight: usize,
    rate: Rate,
    failures_in_a_row: u32,
    busy_in_a_row: u32,
    /// Answered busy: not asked anything until then.
    busy_until: Option<Instant>,
}

impl Peer {
    fn new(have: Bitmap) -> Self {
        Self {
            have,
            useful: 0,
            in_flight: 0,
            rate: Rate::default(),
            failures_in_a_row: 0,
            busy_in_a_row: 0,
            busy_until: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Piece {
    done: bool,
    hash_known: bool,
    /// Requests out for it (`requests` holds them; this spares a lookup
    /// per piece per poll).
    out: u32,
    failures: u32,
    /// Peers that failed this piece: not asked for it again.
    avoid: Vec<PeerId>,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    started: Instant,
    deadline: Instant,
    /// A read-window rescue was tried; [`Scheduler::next_deadline`] stops
    /// naming its time so the driver does not spin on it.
    rescued: bool,
}

/// How many peers a poll may ask for something this node lacks (see
/// [`Scheduler::free_peers`]) and every piece one of them holds.
struct Free {
    peers: usize,
    offered: Bitmap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Excluded {
    Banned,
    Dropped,
}

#[derive(Debug, Clone)]
pub struct Scheduler {
    config: Config,
    size: u64,
    piece_size: u64,
    pieces: Vec<Piece>,
    missing: u64,
    /// Live peers holding each piece.
    avail: Vec<u32>,
    peers: BTreeMap<PeerId, Peer>,
    excluded: BTreeMap<PeerId, Excluded>,
    requests: BTreeMap<(u64, Source), Request>,
    origin_in_flight: usize,
    origin_rate: Rate,
    origin_failures: u64,
    read_position: u64,
    done_reported: bool,
    /// A peer announced a piece we lack, or a piece completed, since the last poll.
    news: bool,
    last_news: Option<Instant>,
    /// While patience lasts: when it runs out (a deadline for the driver).
    patient_until: Option<Instant>,
    /// This node fetches what no peer holds from the origin without waiting:
    /// it took over from a node that was doing so and died.
    leading: bool,
    /// The rate an unmeasured peer is assumed to have: the best measured
    /// one, so it gets tried rather than starved. Set at each schedule
    /// (rates change only with arrivals and timeouts, not while choosing).
    optimistic: f64,
}

impl Scheduler {
    /// `held` is the bitmap of pieces already on disk, in the store's layout
    /// ([`Bitmap::as_bytes`]). No hash is known yet: see
    /// [`Self::set_hash_known`].
    pub fn new(size: u64, piece_size: u64, held: &[u8], config: Config) -> Result<Self, Error> {
        if piece_size == 0 {
            return Err(Error::ZeroPieceSize);
        }
        let count = size.div_ceil(piece_size);
        let held = Bitmap::from_bytes(count, held)?;
        let pieces: Vec<Piece> = (0..count)
            .map(|i| Piece {
                done: held.get(i),
                ..Piece::default()
            })
            .collect();
        Ok(Self {
            config,
            size,
            piece_size,
            missing: count - held.held(),
            avail: vec![0; pieces.len()],
            pieces,
            peers: BTreeMap::new(),
            excluded: BTreeMap::new(),
            requests: BTreeMap::new(),
            origin_in_flight: 0,
            origin_rate: Rate::default(),
            origin_failures: 0,
            read_position: 0,
            done_reported: false,
            news: false,
            last_news: None,
            patient_until: None,
            leading: false,
            optimistic: 1.0,
        })
    }

    pub fn piece_count(&self) -> u64 {
        self.pieces.len() as u64
    }

    /// Length of piece `i` (the last one may be short).
    pub fn piece_len(&self, i: u64) -> u64 {
        self.size
            .saturating_sub(i.saturating_mul(self.piece_size))
            .min(self.piece_size)
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Pieces not held yet.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    pub fn is_held(&self, i: u64) -> bool {
        self.pieces.get(i as usize).is_some_and(|p| p.done)
    }

    /// Requests out, duplicates included.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Origin pieces that failed, timed out or were corrupt.
    pub fn origin_failures(&self) -> u64 {
        self.origin_failures
    }

    pub fn is_banned(&self, peer: PeerId) -> bool {
        self.excluded.get(&peer) == Some(&Excluded::Banned)
    }

    /// Banned or dropped: never asked again.
    pub fn is_excluded(&self, peer: PeerId) -> bool {
        self.excluded.contains_key(&peer)
    }

    /// When the next request times out or a read-window piece is overdue at
    /// its peer: call [`Self::poll`] then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.requests
            .iter()
            .map(|(&(piece, from), r)| match self.rescue_at(piece, from, r) {
                Some(t) if !r.rescued && self.copies(piece).nth(1).is_none() => t.min(r.deadline),
                _ => r.deadline,
            })
            .chain(self.patient_until.filter(|_| self.missing > 0))
            .chain(
                self.peers
                    .values()
                    .filter_map(|p| p.busy_until)
                    .filter(|_| self.missing > 0),
            )
            .min()
    }

    /// A peer and the pieces it holds (same layout as the store's bitmap).
    /// A known peer's bitmap is replaced; a banned or dropped one is ignored.
    pub fn add_peer(&mut self, peer: PeerId, bitmap: &[u8]) -> Result<(), Error> {
        let have = Bitmap::from_bytes(self.piece_count(), bitmap)?;
        if self.excluded.contains_key(&peer) {
            return Ok(());
        }
        let old = self.peers.remove(&peer);
        let mut useful = 0;
        for i in 0..self.piece_count() {
            let (was, is) = (old.as_ref().is_some_and(|p| p.have.get(i)), have.get(i));
            useful += u64::from(is && !self.pieces[i as usize].done);
            let a = &mut self.avail[i as usize];
            match (was, is) {
                (false, true) => {
                    *a += 1;
                    self.news |= !self.pieces[i as usize].done;
                }
                (true, false) => *a -= 1,
                _ => {}
            }
        }
        let peer_state = match old {
            Some(p) => Peer { have, useful, ..p },
            None => Peer {
                useful,
                ..Peer::new(have)
            },
        };
        self.peers.insert(peer, peer_state);
        Ok(())
    }

    /// Same as [`Self::add_peer`]: peers re-announce their whole bitmap.
    pub fn update_peer(&mut self, peer: PeerId, bitmap: &[u8]) -> Result<(), Error> {
        self.add_peer(peer, bitmap)
    }

    /// The peer announced one more piece. An unknown peer is added.
    pub fn peer_has(&mut self, peer: PeerId, piece: u64) {
        if piece >= self.piece_count() || self.excluded.contains_key(&peer) {
            return;
        }
        let count = self.piece_count();
        let p = self
            .peers
            .entry(peer)
            .or_insert_with(|| Peer::new(Bitmap::new(count)));
        if !p.have.get(piece) {
            p.have.set(piece);
            self.avail[piece as usize] += 1;
            let lack = !self.pieces[piece as usize].done;
            p.useful += u64::from(lack);
            self.news |= lack;
        }
    }

    /// Whether a poll could now ask `peer` for `piece`: this node lacks it,
    /// its hash is known, nobody is asked for it yet, and the peer and this
    /// node have a request to spare. A driver told of pieces one at a time
    /// polls only then.
    pub fn could_ask(&self, peer: PeerId, piece: u64) -> bool {
        let (Some(p), Some(i)) = (self.peers.get(&peer), self.pieces.get(piece as usize)) else {
            return false;
        };
        !i.done
            && i.hash_known
            && i.out == 0
            && self.is_free(p)
            && self.requests.len() < self.config.max_in_flight
    }

    /// The peer is gone (connection closed, tracker forgot it). Its requests
    /// are cancelled and their pieces go elsewhere. Unlike a dropped peer, it
    /// may be added again.
    pub fn remove_peer(&mut self, peer: PeerId, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.forget_peer(peer, &mut out);
        self.poll_into(now, &mut out);
        out
    }

    /// The peer is unreachable (its connection died): its requests are
    /// cancelled without counting against their pieces, and it is never
    /// asked again for this blob, even if the tracker still lists it.
    pub fn drop_peer(&mut self, peer: PeerId, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.exclude(peer, Excluded::Dropped, &mut out);
        self.poll_into(now, &mut out);
        out
    }

    /// The peers that may still be asked (announced, neither dropped nor
    /// banned).
    pub fn live_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// From now on this node fetches the pieces no peer can give from the
    /// origin at once, as the node that first joined the blob does: the
    /// driver says so when that node died and this one was chosen to take
    /// over. Call [`Self::poll`] after.
    pub fn set_leading(&mut self) {
        self.leading = true;
    }

    pub fn leading(&self) -> bool {
        self.leading
    }

    /// Whether a trusted sha256 for `piece` is known. Until it is, the piece
    /// comes from the origin only.
    pub fn set_hash_known(&mut self, piece: u64, known: bool) {
        if let Some(p) = self.pieces.get_mut(piece as usize) {
            p.hash_known = known;
        }
    }

    /// [`Self::set_hash_known`] for every piece (a whole hash list arrived).
    pub fn set_hash_known_all(&mut self, known: bool) {
        for p in &mut self.pieces {
            p.hash_known = known;
        }
    }

    /// The next piece the client must be sent, in order.
    pub fn set_read_position(&mut self, piece: u64) {
        self.read_position = piece.min(self.piece_count());
    }

    /// Fails requests past their deadline and sends out new ones.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.poll_into(now, &mut out);
        out
    }

    /// `bytes` of `piece` arrived from `from`; `verified` says whether they
    /// matched the piece's trusted hash. A corrupt piece from a peer bans it;
    /// from the origin it is retried.
    pub fn on_piece(
        &mut self,
        piece: u64,
        from: Source,
        bytes: u64,
        now: Instant,
        verified: bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if piece >= self.piece_count() {
            return out;
        }
        let request = self.end_request(piece, from);
        if verified {
            if let Some(r) = request {
                let elapsed = now.saturating_duration_since(r.started);
                match from {
                    Source::Origin => self.origin_rate.sample(bytes, elapsed),
                    Source::Peer(id) => {
                        if let Some(p) = self.peers.get_mut(&id) {
                            p.rate.sample(bytes, elapsed);
                            p.failures_in_a_row = 0;
                            p.busy_in_a_row = 0;
                        }
                    }
                }
            }
            if !self.pieces[piece as usize].done {
                self.complete(piece, &mut out);
            }
        } else {
            match from {
                Source::Peer(id) => self.exclude(id, Excluded::Banned, &mut out),
                Source::Origin => {
                    self.origin_failures += 1;
                    self.pieces[piece as usize].failures += 1;
                }
            }
        }
        self.poll_into(now, &mut out);
        out
    }

    /// The peer answered the request for `piece` "busy": see the module
    /// docs. The piece is asked elsewhere or waits; the peer is asked again
    /// after its backoff.
    pub fn on_busy(&mut self, piece: u64, peer: PeerId, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if piece < self.piece_count() && self.end_request(piece, Source::Peer(peer)).is_some() {
            let base = self.config.busy_backoff;
            if let Some(p) = self.peers.get_mut(&peer) {
                let backoff = base.saturating_mul(1 << p.busy_in_a_row.min(MAX_BUSY_DOUBLINGS));
                p.busy_in_a_row = p.busy_in_a_row.saturating_add(1);
                p.busy_until = Some(now + backoff);
            }
        }
        self.poll_into(now, &mut out);
        out
    }

    /// The request for `piece` from `from` failed (error, reset, refused).
    pub fn on_failure(&mut self, piece: u64, from: Source, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if piece < self.piece_count() && self.end_request(piece, from).is_some() {
            self.failed(piece, from, &mut out);
        }
        self.poll_into(now, &mut out);
        out
    }

    fn poll_into(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.news || self.last_news.is_none() {
            self.news = false;
            self.last_news = Some(now);
        }
        self.patient_until = match (self.config.patience, self.last_news) {
            (Some(p), Some(t)) => Some(t + p).filter(|&until| until > now),
            _ => None,
        };
        for p in self.peers.values_mut() {
            p.busy_until = p.busy_until.filter(|&t| t > now);
        }
        self.expire(now, out);
        self.schedule(now, out);
        if self.missing == 0 && !self.done_reported {
            self.done_reported = true;
            out.push(Action::Done);
        }
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<Action>) {
        let expired: Vec<(u64, Source)> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(&k, _)| k)
            .collect();
        for (piece, from) in expired {
            // An earlier expiry may have dropped this peer, and its requests.
            let Some(r) = self.end_request(piece, from) else {
                continue;
            };
            out.push(Action::Cancel { piece, from });
            // It delivered the piece no faster than this, if at all.
            let len = self.piece_len(piece);
            let elapsed = now.saturating_duration_since(r.started);
            match from {
                Source::Origin => self.origin_rate.sample(len, elapsed),
                Source::Peer(id) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.rate.sample(len, elapsed);
                    }
                }
            }
            self.failed(piece, from, out);
        }
    }

    fn schedule(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.missing == 0 {
            return;
        }
        self.optimistic = self
            .peers
            .values()
            .filter_map(|p| p.rate.0)
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))
            .unwrap_or(1.0);
        let start = self.read_position;
        let window_end = start.saturating_add(self.config.window.max(1));
        let count = self.piece_count();
        let mut free = self.free_peers();
        // Past the read window (and the busy window), a piece no free peer
        // offers goes nowhere unless to the origin, and a follower sends it
        // there only if it failed before or its holders cannot be checked
        // (see `choose`): leave the rest out, so a poll in a big swarm sorts
        // only what it may send.
        let anywhere = self.leading || self.peers.is_empty();
        let near_end = match self.config.busy_window {
            Some(w) => window_end.max(start.saturating_add(w)),
            None => window_end,
        };
        // Missing pieces with no request out, left out or not.
        let mut waiting = 0;
        let mut order: Vec<(bool, u32, u64, u64)> = (0..count)
            .filter(|&i| {
                let p = &self.pieces[i as usize];
                if p.done || self.has_request(i) {
                    return false;
                }
                waiting += 1;
                anywhere
                    || (i >= start && i < near_end)
                    || free.offered.get(i)
                    || p.failures > 0
                    || (!p.hash_known && self.avail[i as usize] > 0)
            })
            .map(|i| {
                let in_window = i >= start && i < window_end;
                // Window pieces in index order; the rest rarest first.
                let rarity = if in_window { 0 } else { self.avail[i as usize] };
                let distance = i.wrapping_sub(start) % count;
                (!in_window, rarity, distance, i)
            })
            .collect();
        order.sort_unstable();
        let mut sent = 0;
        for (_, _, _, i) in order {
            if self.requests.len() >= self.config.max_in_flight
                || (free.peers == 0 && self.origin_in_flight >= self.config.max_origin)
            {
                break;
            }
            if let Some(from) = self.choose(i, None, &free) {
                self.request(i, from, now, out);
                sent += 1;
                if let Source::Peer(id) = from
                    && self.peers[&id].in_flight >= self.config.max_per_peer
                {
                    // The pieces only this peer offered would each cost a
                    // look at every peer to find nobody.
                    free = self.free_peers();
                }
            }
        }
        self.rescue(now, out);
        if self.config.endgame && sent == waiting {
            self.endgame(now, out);
        }
    }

    /// Peers that may be asked for something now ([`Self::is_free`]).
    /// Choosing looks at these only, so a poll in a big swarm where every
    /// holder is busy costs little.
    fn free_peers(&self) -> Free {
        let mut free = Free {
            peers: 0,
            offered: Bitmap::new(self.piece_count()),
        };
        for p in self.peers.values() {
            if self.is_free(p) {
                free.peers += 1;
                free.offered.union_with(&p.have);
            }
        }
        free
    }

    /// Below its request limit, not backing off after a busy answer, and
    /// holding something this node lacks.
    fn is_free(&self, p: &Peer) -> bool {
        p.in_flight < self.config.max_per_peer && p.busy_until.is_none() && p.useful > 0
    }

    fn in_window(&self, i: u64) -> bool {
        i >= self.read_position && i - self.read_position < self.config.window.max(1)
    }

    /// When a read-window piece out to a single peer is overdue (its expected
    /// time at the peer's rate, or `min_timeout` while unmeasured), so the
    /// client should not wait for the timeout.
    fn rescue_at(&self, piece: u64, from: Source, r: &Request) -> Option<Instant> {
        if from == Source::Origin || !self.in_window(piece) {
            return None;
        }
        if let Some(w) = self.config.busy_window
            && piece - self.read_position >= w.max(1)
        {
            return None;
        }
        Some(
            r.started
                + self
                    .expected(piece, from)
                    .unwrap_or(self.config.min_timeout)
                    .max(MIN_SAMPLE)
                    .saturating_mul(self.config.rescue_factor.max(1))
                    .max(self.config.rescue_floor),
        )
    }

    /// Asks overdue read-window pieces of a second source too: the origin, or
    /// another free holder.
    fn rescue(&mut self, now: Instant, out: &mut Vec<Action>) {
        let end = self
            .read_position
            .saturating_add(self.config.window.max(1))
            .min(self.piece_count());
        for piece in self.read_position..end {
            let (Some(from), None) = ({
                let mut copies = self.copies(piece);
                (copies.next(), copies.next())
            }) else {
                continue;
            };
            let r = self.requests[&(piece, from)];
            if self.rescue_at(piece, from, &r).is_none_or(|t| t > now) {
                continue;
            }
            if let Some(r) = self.requests.get_mut(&(piece, from)) {
                r.rescued = true;
            }
            if self.requests.len() >= self.config.max_in_flight {
                continue;
            }
            if let Some(other) = self.choose(piece, Some(from), &self.free_peers()) {
                self.request(piece, other, now, out);
            }
        }
    }

    fn endgame(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut single: Vec<(Instant, u64, Source)> = Vec::new();
        let mut it = self.requests.iter().peekable();
        while let Some((&(piece, from), r)) = it.next() {
            let mut copies = 1;
            while it.peek().is_some_and(|((p, _), _)| *p == piece) {
                it.next();
                copies += 1;
            }
            if copies == 1 {
                let finish = match self.expected(piece, from) {
                    Some(d) => r.started + d,
                    None => r.deadline,
                };
                single.push((finish, piece, from));
            }
        }
        // Slowest expected finish first.
        single.sort_unstable_by(|a, b| b.cmp(a));
        for (_, piece, from) in single {
            if self.requests.len() >= self.config.max_in_flight {
                break;
            }
            // Only to other peers: a duplicate from the origin costs the
            // origin bytes the swarm exists to save.
            if let Some(other @ Source::Peer(_)) =
                self.choose(piece, Some(from), &self.free_peers())
            {
                self.request(piece, other, now, out);
            }
        }
    }

    /// Where to ask for `piece` now, if anywhere. `busy` is the source already
    /// asked (endgame, rescue), which must not be asked twice; `free` is
    /// [`Self::free_peers`].
    fn choose(&self, i: u64, busy: Option<Source>, free: &Free) -> Option<Source> {
        let piece = &self.pieces[i as usize];
        let origin = (self.origin_in_flight < self.config.max_origin
            && busy != Some(Source::Origin))
        .then_some(Source::Origin);
        let in_window = self.in_window(i);
        // Waiting for a piece nobody can give us yet.
        let no_holder = || {
            let go = self.leading
                || self.peers.is_empty()
                || piece.failures > 0
                || (in_window && self.patient_until.is_none());
            origin.filter(|_| go)
        };
        let avail = self.avail[i as usize] as usize;
        // No live peer holds it (the common case in a big, fresh swarm):
        // no need to look at each peer.
        if avail == 0 {
            return no_holder();
        }
        // Some live peer holds it that has not failed it and is not the one
        // already asked. Holders outnumbering the peers to leave out settle
        // it without a look at each.
        let usable = || {
            let left_out = piece.avoid.len() + usize::from(matches!(busy, Some(Source::Peer(_))));
            avail > left_out
                || self.peers.iter().any(|(&id, p)| {
                    p.have.get(i) && !piece.avoid.contains(&id) && busy != Some(Source::Peer(id))
                })
        };
        if !piece.hash_known {
            return if usable() { origin } else { no_holder() };
        }
        let optimistic = self.optimistic;
        let mut best: Option<(PeerId, f64, usize)> = None;
        let offered = free.offered.get(i);
        for (&id, p) in self.peers.iter().filter(|_| offered) {
            if !self.is_free(p)
                || !p.have.get(i)
                || piece.avoid.contains(&id)
                || busy == Some(Source::Peer(id))
            {
                continue;
            }
            let rate = p.rate.0.unwrap_or(optimistic);
            if best.is_none_or(|(_, r, n)| rate > r || (rate == r && p.in_flight < n)) {
                best = Some((id, rate, p.in_flight));
            }
        }
        match best {
            Some((id, _, _)) => {
                let slower = matches!(
                    (self.origin_rate.0, self.peers[&id].rate.0),
                    (Some(o), Some(r)) if o > r * self.config.origin_margin
                );
                if slower && origin.is_some() {
                    origin
                } else {
                    Some(Source::Peer(id))
                }
            }
            // Nothing can be asked of the origin either: no need to know why.
            None if origin.is_none() => None,
            // Every usable holder is at its limit or backing off. The client
            // waits for them, but not forever: holders that stay busy while
            // the swarm goes `patience` without news (one that answers busy
            // to everyone, say) do not hold up the read window.
            None if usable() => origin.filter(|_| {
                let near = match self.config.busy_window {
                    // 0: none; the client waits for the busy peer.
                    Some(w) => i >= self.read_position && i - self.read_position < w,
                    None => in_window,
                };
                near || (in_window
                    && self.config.patience.is_some()
                    && self.patient_until.is_none())
            }),
            None => no_holder(),
        }
    }

    fn request(&mut self, piece: u64, from: Source, now: Instant, out: &mut Vec<Action>) {
        let timeout = match self.expected(piece, from) {
            Some(d) => (d * TIMEOUT_FACTOR).max(self.config.min_timeout),
            None => self.config.initial_timeout,
        };
        match from {
            Source::Origin => self.origin_in_flight += 1,
            Source::Peer(id) => {
                self.peers
                    .get_mut(&id)
                    .expect("chosen peers are live")
                    .in_flight += 1
            }
        }
        self.pieces[piece as usize].out += 1;
        self.requests.insert(
            (piece, from),
            Request {
                started: now,
                deadline: now + timeout,
                rescued: false,
            },
        );
        out.push(Action::Request { piece, from });
    }

    /// How long `piece` should take from `from` at its measured rate.
    fn expected(&self, piece: u64, from: Source) -> Option<Duration> {
        let rate = match from {
            Source::Origin => self.origin_rate.0,
            Source::Peer(id) => self.peers.get(&id)?.rate.0,
        }?;
        Some(Duration::from_secs_f64(
            (self.piece_len(piece) as f64 / rate).min(1e9),
        ))
    }

    fn has_request(&self, piece: u64) -> bool {
        self.pieces[piece as usize].out > 0
    }

    fn copies(&self, piece: u64) -> impl Iterator<Item = Source> + '_ {
        self.requests
            .range((piece, Source::Peer(PeerId(0)))..=(piece, Source::Origin))
            .map(|(&(_, s), _)| s)
    }

    fn end_request(&mut self, piece: u64, from: Source) -> Option<Request> {
        let r = self.requests.remove(&(piece, from))?;
        self.pieces[piece as usize].out -= 1;
        match from {
            Source::Origin => self.origin_in_flight -= 1,
            Source::Peer(id) => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.in_flight -= 1;
                }
            }
        }
        Some(r)
    }

    fn failed(&mut self, piece: u64, from: Source, out: &mut Vec<Action>) {
        let p = &mut self.pieces[piece as usize];
        p.failures += 1;
        match from {
            Source::Origin => self.origin_failures += 1,
            Source::Peer(id) => {
                if !p.avoid.contains(&id) {
                    p.avoid.push(id);
                }
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.failures_in_a_row += 1;
                    if peer.failures_in_a_row >= self.config.max_failures {
                        self.exclude(id, Excluded::Dropped, out);
                    }
                }
            }
        }
    }

    fn complete(&mut self, piece: u64, out: &mut Vec<Action>) {
        self.pieces[piece as usize].done = true;
        self.missing -= 1;
        for p in self.peers.values_mut().filter(|p| p.have.get(piece)) {
            p.useful -= 1;
        }
        self.news = true;
        out.push(Action::Completed(piece));
        let others: Vec<Source> = self.copies(piece).collect();
        for from in others {
            self.end_request(piece, from);
            out.push(Action::Cancel { piece, from });
        }
    }

    /// The counts kept alongside the state agree with it (tests).
    #[cfg(test)]
    fn check_counts(&self) {
        for (i, piece) in self.pieces.iter().enumerate() {
            let i = i as u64;
            let holders = self.peers.values().filter(|p| p.have.get(i)).count();
            assert_eq!(self.avail[i as usize] as usize, holders, "avail of {i}");
            assert_eq!(
                piece.out as usize,
                self.copies(i).count(),
                "requests for {i}"
            );
        }
        for (id, p) in &self.peers {
            let lacked = (0..self.piece_count())
                .filter(|&i| p.have.get(i) && !self.pieces[i as usize].done)
                .count();
            assert_eq!(p.useful as usize, lacked, "useful of {id:?}");
        }
    }

    /// Cancels the peer's requests and forgets it (and its pieces).
    fn forget_peer(&mut self, id: PeerId, out: &mut Vec<Action>) {
        let theirs: Vec<u64> = self
            .requests
            .keys()
            .filter(|(_, s)| *s == Source::Peer(id))
            .map(|&(piece, _)| piece)
            .collect();
        for piece in theirs {
            self.end_request(piece, Source::Peer(id));
            out.push(Action::Cancel {
                piece,
                from: Source::Peer(id),
            });
        }
        if let Some(p) = self.peers.remove(&id) {
            for i in 0..self.piece_count() {
                if p.have.get(i) {
                    self.avail[i as usize] -= 1;
                }
            }
        }
    }

    fn exclude(&mut self, id: PeerId, why: Excluded, out: &mut Vec<Action>) {
        let before = self.excluded.get(&id).copied();
        // A ban outranks a drop (metrics count bans); nothing undoes either.
        if before == Some(Excluded::Banned) || before == Some(why) {
            return;
        }
        self.forget_peer(id, out);
        self.excluded.insert(id, why);
        out.push(match why {
            Excluded::Banned => Action::Banned(id),
            Excluded::Dropped => Action::Dropped(id),
        });
    }
}

#[cfg(test)]
mod tests;
