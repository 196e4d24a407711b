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
//! - hash unknown: the origin, or nothing;
//! - some live peer holds it and has a free slot: the best such peer (highest
//!   measured rate, an unmeasured peer counts as the best measured one so it
//!   gets tried; ties to the one with fewer requests out), unless the origin
//!   has been measured faster than that peer, then the origin;
//! - holders exist but all are busy: the origin if the piece is in the read
//!   window, else wait for a slot;
//! - no usable holder (none holds it, or every holder already failed this
//!   piece): the origin if `origin_first`, there are no live peers at all,
//!   the piece has failed before, or it is in the read window and the swarm
//!   has gone `patience` without news (a peer announcing a piece we lack,
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

use crate::store::bitmap::{BadBitmap, Bitmap};

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
    /// Fetch pieces no peer holds from the origin at once (seed peers),
    /// rather than waiting for a peer to announce them.
    pub origin_first: bool,
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
    /// How long a read-window piece nobody holds waits for the swarm while
    /// it makes progress, before it goes to the origin (`None`: no wait).
    /// Nodes that start a pull together thus wait for the one fetching from
    /// the origin instead of each fetching the blob.
    pub patience: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_per_peer: 4,
            max_in_flight: 16,
            max_origin: 4,
            window: 8,
            min_timeout: Duration::from_secs(2),
            initial_timeout: Duration::from_secs(15),
            max_failures: 3,
            origin_first: false,
            endgame: true,
            origin_margin: 1.0,
            busy_window: None,
            rescue_factor: 1,
            rescue_floor: MIN_SAMPLE,
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
    in_flight: usize,
    rate: Rate,
    failures_in_a_row: u32,
}

#[derive(Debug, Clone, Default)]
struct Piece {
    done: bool,
    hash_known: bool,
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
        for i in 0..self.piece_count() {
            let (was, is) = (old.as_ref().is_some_and(|p| p.have.get(i)), have.get(i));
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
            Some(p) => Peer { have, ..p },
            None => Peer {
                have,
                in_flight: 0,
                rate: Rate::default(),
                failures_in_a_row: 0,
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
        let p = self.peers.entry(peer).or_insert_with(|| Peer {
            have: Bitmap::new(count),
            in_flight: 0,
            rate: Rate::default(),
            failures_in_a_row: 0,
        });
        if !p.have.get(piece) {
            p.have.set(piece);
            self.avail[piece as usize] += 1;
            self.news |= !self.pieces[piece as usize].done;
        }
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
        let start = self.read_position;
        let window_end = start.saturating_add(self.config.window.max(1));
        let count = self.piece_count();
        let mut order: Vec<(bool, u32, u64, u64)> = (0..count)
            .filter(|&i| !self.pieces[i as usize].done && !self.has_request(i))
            .map(|i| {
                let in_window = i >= start && i < window_end;
                // Window pieces in index order; the rest rarest first.
                let rarity = if in_window { 0 } else { self.avail[i as usize] };
                let distance = i.wrapping_sub(start) % count;
                (!in_window, rarity, distance, i)
            })
            .collect();
        order.sort_unstable();
        let waiting = order.len();
        let mut sent = 0;
        for (_, _, _, i) in order {
            if self.requests.len() >= self.config.max_in_flight {
                break;
            }
            if let Some(from) = self.choose(i, None) {
                self.request(i, from, now, out);
                sent += 1;
            }
        }
        self.rescue(now, out);
        if self.config.endgame && sent == waiting {
            self.endgame(now, out);
        }
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
            if let Some(other) = self.choose(piece, Some(from)) {
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
            if let Some(other @ Source::Peer(_)) = self.choose(piece, Some(from)) {
                self.request(piece, other, now, out);
            }
        }
    }

    /// Where to ask for `piece` now, if anywhere. `busy` is the source already
    /// asked (endgame, rescue), which must not be asked twice.
    fn choose(&self, i: u64, busy: Option<Source>) -> Option<Source> {
        let piece = &self.pieces[i as usize];
        let origin = (self.origin_in_flight < self.config.max_origin
            && busy != Some(Source::Origin))
        .then_some(Source::Origin);
        let in_window = self.in_window(i);
        // Waiting for a piece nobody can give us yet.
        let no_holder = || {
            let go = self.config.origin_first
                || self.peers.is_empty()
                || piece.failures > 0
                || (in_window && self.patient_until.is_none());
            origin.filter(|_| go)
        };
        if !piece.hash_known {
            let held = self
                .peers
                .iter()
                .any(|(id, p)| p.have.get(i) && !piece.avoid.contains(id));
            return if held { origin } else { no_holder() };
        }
        // An unmeasured peer is assumed as good as the best measured one, so
        // it gets tried rather than starved.
        let optimistic = self
            .peers
            .values()
            .filter_map(|p| p.rate.0)
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))
            .unwrap_or(1.0);
        let mut usable = 0;
        let mut best: Option<(PeerId, f64, usize)> = None;
        for (&id, p) in &self.peers {
            if !p.have.get(i) || piece.avoid.contains(&id) || busy == Some(Source::Peer(id)) {
                continue;
            }
            usable += 1;
            if p.in_flight >= self.config.max_per_peer {
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
            None if usable > 0 => origin.filter(|_| match self.config.busy_window {
                // 0: never; the client waits for the busy peer.
                Some(w) => i >= self.read_position && i - self.read_position < w,
                None => in_window,
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
        self.copies(piece).next().is_some()
    }

    fn copies(&self, piece: u64) -> impl Iterator<Item = Source> + '_ {
        self.requests
            .range((piece, Source::Peer(PeerId(0)))..=(piece, Source::Origin))
            .map(|(&(_, s), _)| s)
    }

    fn end_request(&mut self, piece: u64, from: Source) -> Option<Request> {
        let r = self.requests.remove(&(piece, from))?;
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
        self.news = true;
        out.push(Action::Completed(piece));
        let others: Vec<Source> = self.copies(piece).collect();
        for from in others {
            self.end_request(piece, from);
            out.push(Action::Cancel { piece, from });
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    const PS: u64 = 100;
    const A: PeerId = PeerId(1);
    const B: PeerId = PeerId(2);
    const C: PeerId = PeerId(3);

    fn cfg() -> Config {
        Config {
            endgame: false,
            ..Config::default()
        }
    }

    /// `n` full pieces, none held, every hash known.
    fn sched(n: u64, config: Config) -> Scheduler {
        let mut s = Scheduler::new(n * PS, PS, &vec![0; Bitmap::byte_len(n)], config).unwrap();
        s.set_hash_known_all(true);
        s
    }

    fn bits(n: u64, held: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut b = Bitmap::new(n);
        for i in held {
            b.set(i);
        }
        b.as_bytes().to_vec()
    }

    fn all(n: u64) -> Vec<u8> {
        bits(n, 0..n)
    }

    fn requests(actions: &[Action]) -> Vec<(u64, Source)> {
        actions
            .iter()
            .filter_map(|a| match *a {
                Action::Request { piece, from } => Some((piece, from)),
                _ => None,
            })
            .collect()
    }

    fn pieces(actions: &[Action]) -> Vec<u64> {
        requests(actions).into_iter().map(|(p, _)| p).collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn read_window_goes_first_in_order() {
        let mut s = sched(
            20,
            Config {
                window: 4,
                max_in_flight: 4,
                ..cfg()
            },
        );
        s.add_peer(A, &all(20)).unwrap();
        s.set_read_position(10);
        let t = Instant::now();
        assert_eq!(pieces(&s.poll(t)), [10, 11, 12, 13]);
    }

    #[test]
    fn rarest_first_beyond_the_window() {
        let mut s = sched(
            6,
            Config {
                window: 1,
                max_in_flight: 3,
                ..cfg()
            },
        );
        // Held by 3 peers: 0 and 1; by 2: 2 and 3; by 1: 4 and 5.
        s.add_peer(A, &all(6)).unwrap();
        s.add_peer(B, &bits(6, 0..4)).unwrap();
        s.add_peer(C, &bits(6, 0..2)).unwrap();
        let t = Instant::now();
        assert_eq!(pieces(&s.poll(t)), [0, 4, 5]);
    }

    #[test]
    fn per_peer_and_global_limits() {
        let mut s = sched(
            20,
            Config {
                max_per_peer: 4,
                max_in_flight: 6,
                window: 20,
                ..cfg()
            },
        );
        let t = Instant::now();
        s.add_peer(A, &all(20)).unwrap();
        let first = requests(&s.poll(t));
        let to_a = first.iter().filter(|&&(_, f)| f == Source::Peer(A)).count();
        assert_eq!(to_a, 4);
        // Window pieces with their only holder busy go to the origin, up to
        // the global limit.
        assert_eq!(first.len(), 6);
        assert_eq!(s.in_flight(), 6);
        s.add_peer(B, &all(20)).unwrap();
        assert!(s.poll(t).is_empty(), "global limit reached");
        s.on_piece(0, Source::Peer(A), PS, t, true);
        assert_eq!(s.in_flight(), 6);
    }

    #[test]
    fn busy_holders_leave_far_pieces_waiting() {
        let mut s = sched(
            20,
            Config {
                max_per_peer: 2,
                window: 1,
                ..cfg()
            },
        );
        s.add_peer(A, &all(20)).unwrap();
        let acts = s.poll(Instant::now());
        assert_eq!(requests(&acts).len(), 2);
        assert!(requests(&acts).iter().all(|&(_, f)| f == Source::Peer(A)));
    }

    #[test]
    fn endgame_duplicates_then_cancels() {
        let mut s = sched(
            2,
            Config {
                max_per_peer: 2,
                endgame: true,
                ..cfg()
            },
        );
        s.add_peer(A, &all(2)).unwrap();
        s.add_peer(B, &all(2)).unwrap();
        let t = Instant::now();
        let mut r = requests(&s.poll(t));
        r.sort();
        assert_eq!(
            r,
            [
                (0, Source::Peer(A)),
                (0, Source::Peer(B)),
                (1, Source::Peer(A)),
                (1, Source::Peer(B))
            ]
        );
        let acts = s.on_piece(0, Source::Peer(B), PS, t + secs(1), true);
        assert_eq!(
            acts,
            [
                Action::Completed(0),
                Action::Cancel {
                    piece: 0,
                    from: Source::Peer(A)
                }
            ]
        );
        // The canceled copy arriving anyway changes nothing.
        assert!(
            s.on_piece(0, Source::Peer(A), PS, t + secs(1), true)
                .is_empty()
        );
        let acts = s.on_piece(1, Source::Peer(A), PS, t + secs(1), true);
        assert_eq!(
            acts,
            [
                Action::Completed(1),
                Action::Cancel {
                    piece: 1,
                    from: Source::Peer(B)
                },
                Action::Done
            ]
        );
        assert!(s.is_complete());
        assert_eq!(s.in_flight(), 0);
        assert!(s.poll(t + secs(100)).is_empty(), "Done comes once");
    }

    #[test]
    fn endgame_duplicates_the_slowest_first() {
        let mut s = sched(
            4,
            Config {
                max_per_peer: 1,
                max_in_flight: 3,
                window: 1,
                endgame: true,
                ..cfg()
            },
        );
        let t = Instant::now();
        // Measure A fast and B slow; 2 and 3 wait for a holder meanwhile.
        s.add_peer(A, &bits(4, [0])).unwrap();
        s.add_peer(B, &bits(4, [1])).unwrap();
        assert_eq!(pieces(&s.poll(t)), [0, 1]);
        s.on_piece(0, Source::Peer(A), PS, t + secs(1), true);
        s.on_piece(1, Source::Peer(B), PS, t + secs(10), true);
        s.add_peer(A, &bits(4, [0, 2])).unwrap();
        s.add_peer(B, &bits(4, [1, 3])).unwrap();
        let t = t + secs(10);
        let r = requests(&s.poll(t));
        assert_eq!(r, [(2, Source::Peer(A)), (3, Source::Peer(B))]);
        // No other holder, and neither is in the read window: no duplicate
        // from the origin.
        assert!(s.poll(t).is_empty());
        // Room for one duplicate: B's piece, expected to finish last.
        s.add_peer(C, &bits(4, [2, 3])).unwrap();
        assert_eq!(requests(&s.poll(t)), [(3, Source::Peer(C))]);
    }

    #[test]
    fn timeout_moves_the_piece_to_another_peer() {
        // Piece 0 is held, so piece 1 is outside the read window (no rescue).
        let config = Config { window: 1, ..cfg() };
        let mut s = Scheduler::new(2 * PS, PS, &bits(2, [0]), config).unwrap();
        s.set_hash_known_all(true);
        let t = Instant::now();
        s.add_peer(A, &all(2)).unwrap();
        assert_eq!(requests(&s.poll(t)), [(1, Source::Peer(A))]);
        s.add_peer(B, &all(2)).unwrap();
        let deadline = s.next_deadline().unwrap();
        assert_eq!(deadline, t + Config::default().initial_timeout);
        assert!(s.poll(deadline - secs(1)).is_empty());
        assert_eq!(
            s.poll(deadline),
            [
                Action::Cancel {
                    piece: 1,
                    from: Source::Peer(A)
                },
                Action::Request {
                    piece: 1,
                    from: Source::Peer(B)
                }
            ]
        );
    }

    #[test]
    fn timeout_follows_the_measured_rate_with_a_floor() {
        let mut s = sched(3, Config { window: 1, ..cfg() });
        let t = Instant::now();
        s.add_peer(A, &bits(3, [0])).unwrap();
        s.poll(t);
        // 100 B in 1 s: 1 s expected, so 4 s.
        s.on_piece(0, Source::Peer(A), PS, t + secs(1), true);
        s.add_peer(A, &bits(3, [0, 1])).unwrap();
        let t1 = t + secs(1);
        s.poll(t1);
        assert_eq!(s.next_deadline(), Some(t1 + secs(4)));
        // 100 B in 10 ms: 40 ms, raised to the 2 s floor.
        let t2 = t1 + Duration::from_millis(10);
        s.on_piece(1, Source::Peer(A), PS, t2, true);
        s.add_peer(A, &all(3)).unwrap();
        s.poll(t2);
        assert_eq!(s.next_deadline(), Some(t2 + secs(2)));
    }

    #[test]
    fn corrupt_piece_bans_the_peer_and_goes_elsewhere() {
        let mut s = sched(1, cfg());
        let t = Instant::now();
        s.add_peer(A, &all(1)).unwrap();
        assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A))]);
        s.add_peer(B, &all(1)).unwrap();
        let acts = s.on_piece(0, Source::Peer(A), PS, t, false);
        assert_eq!(
            acts,
            [
                Action::Banned(A),
                Action::Request {
                    piece: 0,
                    from: Source::Peer(B)
                }
            ]
        );
        assert!(s.is_banned(A));
        // Announcing again does not bring it back.
        s.add_peer(A, &all(1)).unwrap();
        s.peer_has(A, 0);
        let acts = s.on_failure(0, Source::Peer(B), t);
        assert_eq!(requests(&acts), [(0, Source::Origin)]);
    }

    #[test]
    fn corrupt_piece_from_the_origin_is_retried() {
        let mut s = sched(1, cfg());
        let t = Instant::now();
        assert_eq!(requests(&s.poll(t)), [(0, Source::Origin)]);
        let acts = s.on_piece(0, Source::Origin, PS, t, false);
        assert_eq!(requests(&acts), [(0, Source::Origin)]);
        assert_eq!(s.origin_failures(), 1);
    }

    #[test]
    fn repeated_failures_drop_the_peer() {
        let mut s = sched(
            4,
            Config {
                max_failures: 2,
                window: 1,
                ..cfg()
            },
        );
        let t = Instant::now();
        s.add_peer(A, &all(4)).unwrap();
        let r = requests(&s.poll(t));
        let a: Vec<u64> = r
            .iter()
            .filter(|(_, f)| *f == Source::Peer(A))
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(a.len(), 4, "{r:?}");
        s.on_failure(a[0], Source::Peer(A), t);
        let acts = s.on_failure(a[1], Source::Peer(A), t);
        assert!(acts.contains(&Action::Dropped(A)));
        assert!(acts.contains(&Action::Cancel {
            piece: a[2],
            from: Source::Peer(A)
        }));
        assert!(s.is_excluded(A) && !s.is_banned(A));
        s.add_peer(A, &all(4)).unwrap();
        assert!(
            requests(&s.poll(t))
                .iter()
                .all(|&(_, f)| f != Source::Peer(A))
        );
        // A ban after a drop is still reported, for the metrics.
        assert_eq!(
            s.on_piece(a[2], Source::Peer(A), PS, t, false)[0],
            Action::Banned(A)
        );
    }

    #[test]
    fn success_resets_the_failure_count() {
        let mut s = sched(
            4,
            Config {
                max_failures: 2,
                max_per_peer: 1,
                window: 1,
                ..cfg()
            },
        );
        let t = Instant::now();
        s.add_peer(A, &all(4)).unwrap();
        assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A))]);
        let acts = s.on_failure(0, Source::Peer(A), t);
        assert_eq!(requests(&acts), [(0, Source::Origin), (1, Source::Peer(A))]);
        s.on_piece(1, Source::Peer(A), PS, t, true);
        let acts = s.on_failure(2, Source::Peer(A), t);
        assert!(!acts.contains(&Action::Dropped(A)), "{acts:?}");
    }

    #[test]
    fn unknown_hash_comes_from_the_origin_only() {
        let mut s = sched(6, Config { window: 6, ..cfg() });
        s.set_hash_known(3, false);
        s.add_peer(A, &all(6)).unwrap();
        s.add_peer(B, &all(6)).unwrap();
        let r = requests(&s.poll(Instant::now()));
        assert_eq!(r.len(), 6);
        for (p, f) in r {
            assert_eq!(f == Source::Origin, p == 3, "piece {p} from {f:?}");
        }
    }

    #[test]
    fn hashes_start_unknown() {
        let mut s = Scheduler::new(3 * PS, PS, &[0], cfg()).unwrap();
        s.add_peer(A, &all(3)).unwrap();
        let r = requests(&s.poll(Instant::now()));
        assert!(r.iter().all(|&(_, f)| f == Source::Origin), "{r:?}");
    }

    #[test]
    fn no_peers_means_the_origin_within_its_cap() {
        let mut s = sched(
            10,
            Config {
                max_origin: 2,
                window: 1,
                ..cfg()
            },
        );
        let r = requests(&s.poll(Instant::now()));
        assert_eq!(r, [(0, Source::Origin), (1, Source::Origin)]);
    }

    #[test]
    fn origin_first_fetches_pieces_no_peer_has() {
        for origin_first in [false, true] {
            let mut s = sched(
                6,
                Config {
                    window: 1,
                    origin_first,
                    ..cfg()
                },
            );
            s.add_peer(A, &bits(6, 0..5)).unwrap();
            let r = requests(&s.poll(Instant::now()));
            assert_eq!(
                r.contains(&(5, Source::Origin)),
                origin_first,
                "origin_first {origin_first}: {r:?}"
            );
            assert!(r.contains(&(0, Source::Peer(A))));
        }
    }

    #[test]
    fn no_holder_waits_until_the_read_window_reaches_it() {
        let mut s = sched(6, Config { window: 2, ..cfg() });
        let t = Instant::now();
        s.add_peer(A, &bits(6, 0..5)).unwrap();
        assert!(!pieces(&s.poll(t)).contains(&5));
        s.set_read_position(4);
        assert!(requests(&s.poll(t)).contains(&(5, Source::Origin)));
    }

    #[test]
    fn patience_waits_for_a_peer_that_is_still_fetching() {
        let config = Config {
            window: 2,
            patience: Some(secs(5)),
            ..cfg()
        };
        let mut s = Scheduler::new(4 * PS, PS, &[0], config).unwrap();
        let t = Instant::now();
        // A peer that holds nothing yet: it is fetching from the origin.
        s.add_peer(A, &bits(4, [])).unwrap();
        assert!(requests(&s.poll(t)).is_empty());
        assert_eq!(s.next_deadline(), Some(t + secs(5)));
        // It announces piece 0 with its hash: we take it from the peer, and
        // the news restarts the wait for piece 1.
        s.add_peer(A, &bits(4, [0])).unwrap();
        s.set_hash_known(0, true);
        assert_eq!(requests(&s.poll(t + secs(4))), [(0, Source::Peer(A))]);
        s.on_piece(0, Source::Peer(A), PS, t + secs(4), true);
        assert!(requests(&s.poll(t + secs(8))).is_empty());
        // No news for the whole patience: the read window goes to the origin.
        let r = requests(&s.poll(t + secs(9)));
        assert_eq!(r, [(1, Source::Origin)]);
        // Without patience the window goes to the origin at once.
        let mut s = sched(4, Config { window: 2, ..cfg() });
        s.set_hash_known_all(false);
        s.add_peer(A, &bits(4, [])).unwrap();
        assert_eq!(
            requests(&s.poll(t)),
            [(0, Source::Origin), (1, Source::Origin)]
        );
    }

    #[test]
    fn slower_peer_than_origin_loses_to_the_origin() {
        let mut s = sched(
            6,
            Config {
                window: 1,
                max_per_peer: 1,
                max_origin: 1,
                ..cfg()
            },
        );
        let t = Instant::now();
        // Measure: origin 100 B/s... peer 10 B/s.
        s.add_peer(A, &bits(6, [1])).unwrap();
        let r = requests(&s.poll(t));
        assert_eq!(r, [(0, Source::Origin), (1, Source::Peer(A))]);
        s.on_piece(0, Source::Origin, PS, t + secs(1), true);
        s.on_piece(1, Source::Peer(A), PS, t + secs(10), true);
        s.add_peer(A, &all(6)).unwrap();
        s.set_read_position(2);
        let r = requests(&s.poll(t + secs(10)));
        // The window piece goes to the faster origin; A takes the next one.
        assert_eq!(r[0], (2, Source::Origin));
        assert_eq!(r[1].1, Source::Peer(A));
    }

    #[test]
    fn overdue_window_piece_is_also_asked_of_the_origin() {
        let mut s = sched(
            3,
            Config {
                window: 1,
                max_per_peer: 1,
                ..cfg()
            },
        );
        let t = Instant::now();
        s.add_peer(A, &all(3)).unwrap();
        assert_eq!(requests(&s.poll(t)), [(0, Source::Peer(A))]);
        // Unmeasured: overdue after min_timeout.
        let at = t + Config::default().min_timeout;
        assert_eq!(s.next_deadline(), Some(at));
        assert!(s.poll(at - secs(1)).is_empty());
        assert_eq!(requests(&s.poll(at)), [(0, Source::Origin)]);
        // Now both copies run to their timeouts.
        assert_eq!(
            s.next_deadline(),
            Some(t + Config::default().initial_timeout)
        );
        let acts = s.on_piece(0, Source::Origin, PS, at + secs(1), true);
        assert_eq!(
            acts[..2],
            [
                Action::Completed(0),
                Action::Cancel {
                    piece: 0,
                    from: Source::Peer(A)
                }
            ]
        );
    }

    #[test]
    fn busy_holders_send_window_pieces_to_the_origin() {
        let mut s = sched(
            4,
            Config {
                window: 2,
                max_per_peer: 1,
                ..cfg()
            },
        );
        s.add_peer(A, &all(4)).unwrap();
        let r = requests(&s.poll(Instant::now()));
        assert_eq!(r, [(0, Source::Peer(A)), (1, Source::Origin)]);
    }

    #[test]
    fn removed_peer_requests_are_cancelled_and_reassigned() {
        let mut s = sched(1, cfg());
        let t = Instant::now();
        s.add_peer(A, &all(1)).unwrap();
        s.add_peer(B, &all(1)).unwrap();
        let first = requests(&s.poll(t))[0].1;
        let Source::Peer(p) = first else {
            panic!("{first:?}")
        };
        let other = if p == A { B } else { A };
        assert_eq!(
            s.remove_peer(p, t),
            [
                Action::Cancel {
                    piece: 0,
                    from: first
                },
                Action::Request {
                    piece: 0,
                    from: Source::Peer(other)
                }
            ]
        );
        assert!(!s.is_excluded(p));
    }

    #[test]
    fn resume_skips_held_pieces() {
        let mut s = Scheduler::new(4 * PS - 50, PS, &bits(4, [0, 2]), cfg()).unwrap();
        assert_eq!((s.piece_count(), s.missing()), (4, 2));
        assert_eq!(s.piece_len(3), 50);
        let r = pieces(&s.poll(Instant::now()));
        assert_eq!(r, [1, 3]);
    }

    #[test]
    fn empty_or_fully_held_blob_is_done_at_once() {
        let mut s = Scheduler::new(0, PS, &[], cfg()).unwrap();
        assert_eq!(s.poll(Instant::now()), [Action::Done]);
        let mut s = Scheduler::new(2 * PS, PS, &all(2), cfg()).unwrap();
        assert_eq!(s.poll(Instant::now()), [Action::Done]);
        assert!(s.poll(Instant::now()).is_empty());
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            Scheduler::new(10, 0, &[], cfg()).unwrap_err(),
            Error::ZeroPieceSize
        );
        assert!(matches!(
            Scheduler::new(10 * PS, PS, &[0], cfg()),
            Err(Error::Bitmap(BadBitmap::Length { .. }))
        ));
        let mut s = sched(3, cfg());
        assert_eq!(
            s.add_peer(A, &[0b1000]),
            Err(Error::Bitmap(BadBitmap::TrailingBits))
        );
        // Out-of-range events are ignored.
        s.peer_has(A, 3);
        s.set_hash_known(99, true);
        let t = Instant::now();
        assert!(s.on_piece(7, Source::Origin, PS, t, true).is_empty());
    }

    #[derive(Debug, Clone, Copy)]
    enum Outcome {
        Verified,
        Corrupt,
        Failed,
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Let this many seconds pass, then poll.
        Poll(u64),
        /// Replace a peer's bitmap (it may shrink: an evicted cache).
        Add(u32, u32),
        /// Bits a peer gained.
        Grow(u32, u32),
        Has(u32, u64),
        Remove(u32),
        ReadPosition(u64),
        HashKnown(u64, bool),
        /// Report the k-th outstanding request.
        Answer(usize, Outcome),
        /// Report the k-th cancelled request anyway.
        Late(usize, Outcome),
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            6 => Just(Outcome::Verified),
            1 => Just(Outcome::Corrupt),
            2 => Just(Outcome::Failed),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let peer = 0u32..6;
        let piece = 0u64..24;
        prop_oneof![
            3 => (0u64..20).prop_map(Op::Poll),
            2 => (peer.clone(), any::<u32>()).prop_map(|(p, m)| Op::Add(p, m)),
            1 => (peer.clone(), any::<u32>()).prop_map(|(p, m)| Op::Grow(p, m)),
            1 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Has(p, i)),
            1 => peer.prop_map(Op::Remove),
            1 => piece.clone().prop_map(Op::ReadPosition),
            1 => (piece, any::<bool>()).prop_map(|(i, k)| Op::HashKnown(i, k)),
            8 => (any::<usize>(), outcome()).prop_map(|(k, o)| Op::Answer(k, o)),
            1 => (any::<usize>(), outcome()).prop_map(|(k, o)| Op::Late(k, o)),
        ]
    }

    fn config() -> impl Strategy<Value = Config> {
        (
            (1usize..5, 1usize..9, 1usize..4, 0u64..6),
            (1u64..4, 4u64..20, 1u32..5, any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (max_per_peer, max_in_flight, max_origin, window),
                    (min_timeout, initial_timeout, max_failures, origin_first, endgame),
                )| Config {
                    max_per_peer,
                    max_in_flight,
                    max_origin,
                    window,
                    min_timeout: secs(min_timeout),
                    initial_timeout: secs(initial_timeout),
                    max_failures,
                    origin_first,
                    endgame,
                    // The agent's settings vary too: wider margins and a
                    // narrower busy window must keep every invariant.
                    origin_margin: if endgame { f64::INFINITY } else { 1.0 },
                    busy_window: origin_first.then_some(u64::from(max_failures) % 2),
                    rescue_factor: max_failures,
                    rescue_floor: secs(u64::from(max_failures) / 2),
                    patience: (max_per_peer % 2 == 0).then(|| secs(min_timeout)),
                },
            )
    }

    /// What the driver knows, built only from what it told the scheduler and
    /// the actions it got back; checked against the rules on every action.
    struct Driver {
        s: Scheduler,
        n: u64,
        config: Config,
        now: Instant,
        held: Vec<bool>,
        completed: Vec<bool>,
        hash_known: Vec<bool>,
        peers: HashMap<u32, u32>,
        excluded: BTreeSet<PeerId>,
        banned: BTreeSet<PeerId>,
        outstanding: BTreeSet<(u64, Source)>,
        cancelled: Vec<(u64, Source)>,
        done: bool,
    }

    impl Driver {
        fn mask_bits(&self, mask: u32) -> Vec<u8> {
            bits(self.n, (0..self.n).filter(|&i| mask & (1 << i) != 0))
        }

        fn apply(&mut self, actions: Vec<Action>) -> Result<(), TestCaseError> {
            for a in actions {
                match a {
                    Action::Request { piece, from } => {
                        let p = piece as usize;
                        prop_assert!(piece < self.n);
                        prop_assert!(!self.held[p] && !self.completed[p], "{piece} is held");
                        prop_assert!(self.outstanding.insert((piece, from)), "asked twice");
                        if let Source::Peer(id) = from {
                            prop_assert!(!self.excluded.contains(&id), "{id:?} is excluded");
                            let mask = self.peers.get(&id.0).copied().unwrap_or(0);
                            prop_assert!(mask & (1 << piece) != 0, "{id:?} lacks {piece}");
                            prop_assert!(self.hash_known[p], "{piece} has no hash");
                        }
                    }
                    Action::Cancel { piece, from } => {
                        prop_assert!(self.outstanding.remove(&(piece, from)));
                        self.cancelled.push((piece, from));
                    }
                    Action::Completed(piece) => {
                        let p = piece as usize;
                        prop_assert!(!self.held[p] && !self.completed[p], "{piece} twice");
                        self.completed[p] = true;
                    }
                    Action::Banned(id) => {
                        prop_assert!(self.banned.insert(id));
                        self.excluded.insert(id);
                    }
                    Action::Dropped(id) => {
                        prop_assert!(self.excluded.insert(id));
                    }
                    Action::Done => {
                        prop_assert!(!self.done);
                        self.done = true;
                        prop_assert!(
                            (0..self.n as usize).all(|i| self.held[i] || self.completed[i])
                        );
                    }
                }
            }
            // A driver sleeping until the next deadline does not spin.
            prop_assert!(self.s.next_deadline().is_none_or(|t| t > self.now));
            let c = &self.config;
            prop_assert!(self.outstanding.len() <= c.max_in_flight);
            prop_assert_eq!(self.s.in_flight(), self.outstanding.len());
            let origin = self
                .outstanding
                .iter()
                .filter(|(_, f)| *f == Source::Origin)
                .count();
            prop_assert!(origin <= c.max_origin);
            for id in 0..6 {
                let to = self
                    .outstanding
                    .iter()
                    .filter(|(_, f)| *f == Source::Peer(PeerId(id)))
                    .count();
                prop_assert!(to <= c.max_per_peer);
            }
            let missing = (0..self.n as usize)
                .filter(|&i| !self.held[i] && !self.completed[i])
                .count();
            prop_assert_eq!(self.s.missing(), missing as u64);
            Ok(())
        }

        fn report(&mut self, piece: u64, from: Source, o: Outcome) -> Result<(), TestCaseError> {
            let len = self.s.piece_len(piece);
            let was_missing = !self.s.is_held(piece);
            let acts = match o {
                Outcome::Verified => self.s.on_piece(piece, from, len, self.now, true),
                Outcome::Corrupt => self.s.on_piece(piece, from, len, self.now, false),
                Outcome::Failed => self.s.on_failure(piece, from, self.now),
            };
            let completed = acts.contains(&Action::Completed(piece));
            prop_assert_eq!(completed, was_missing && matches!(o, Outcome::Verified));
            if let (Outcome::Corrupt, Source::Peer(id)) = (o, from) {
                prop_assert!(self.banned.contains(&id) || acts.contains(&Action::Banned(id)));
            }
            self.apply(acts)
        }

        fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
            let full = (1u32 << self.n) - 1;
            match op {
                Op::Poll(d) => {
                    self.now += secs(d);
                    let acts = self.s.poll(self.now);
                    self.apply(acts)?;
                }
                Op::Add(id, mask) => {
                    let mask = mask & full;
                    self.s.add_peer(PeerId(id), &self.mask_bits(mask)).unwrap();
                    self.peers.insert(id, mask);
                }
                Op::Grow(id, mask) => {
                    let mask = (mask & full) | self.peers.get(&id).copied().unwrap_or(0);
                    self.s
                        .update_peer(PeerId(id), &self.mask_bits(mask))
                        .unwrap();
                    self.peers.insert(id, mask);
                }
                Op::Has(id, i) => {
                    let i = i % self.n;
                    self.s.peer_has(PeerId(id), i);
                    *self.peers.entry(id).or_default() |= 1 << i;
                }
                Op::Remove(id) => {
                    let acts = self.s.remove_peer(PeerId(id), self.now);
                    self.peers.remove(&id);
                    self.apply(acts)?;
                }
                Op::ReadPosition(i) => self.s.set_read_position(i % self.n),
                Op::HashKnown(i, k) => {
                    let i = i % self.n;
                    self.s.set_hash_known(i, k);
                    self.hash_known[i as usize] = k;
                }
                Op::Answer(k, o) => {
                    if !self.outstanding.is_empty() {
                        let r = *self
                            .outstanding
                            .iter()
                            .nth(k % self.outstanding.len())
                            .unwrap();
                        self.outstanding.remove(&r);
                        self.report(r.0, r.1, o)?;
                    }
                }
                Op::Late(k, o) => {
                    if !self.cancelled.is_empty() {
                        let r = self.cancelled[k % self.cancelled.len()];
                        // Ambiguous with a new request to the same place.
                        if !self.outstanding.contains(&r) {
                            self.report(r.0, r.1, o)?;
                        }
                    }
                }
            }
            Ok(())
        }
    }

    proptest! {
        #[test]
        fn invariants_hold_and_every_run_completes(
            n in 1u64..=24,
            last in 1u64..=PS,
            held in any::<u32>(),
            known in any::<u32>(),
            config in config(),
            ops in proptest::collection::vec(op(), 0..150),
        ) {
            let size = (n - 1) * PS + last;
            let held: Vec<bool> = (0..n).map(|i| held & (1 << i) != 0 && i % 3 != 0).collect();
            let held_bits = bits(n, (0..n).filter(|&i| held[i as usize]));
            let mut s = Scheduler::new(size, PS, &held_bits, config.clone()).unwrap();
            let hash_known: Vec<bool> = (0..n).map(|i| known & (1 << i) != 0).collect();
            for (i, &k) in hash_known.iter().enumerate() {
                s.set_hash_known(i as u64, k);
            }
            let mut d = Driver {
                s,
                n,
                config,
                now: Instant::now(),
                held,
                completed: vec![false; n as usize],
                hash_known,
                peers: HashMap::new(),
                excluded: BTreeSet::new(),
                banned: BTreeSet::new(),
                outstanding: BTreeSet::new(),
                cancelled: Vec::new(),
                done: false,
            };
            for op in ops {
                d.step(op)?;
            }
            // From here on the driver reads in order and every source
            // delivers: each round completes at least one piece.
            for _ in 0..2 * n + 5 {
                if d.s.is_complete() {
                    break;
                }
                let first = (0..n).find(|&i| !d.s.is_held(i)).unwrap();
                d.s.set_read_position(first);
                // Patience with a stalled swarm runs out.
                d.now += d.config.patience.unwrap_or_default();
                let acts = d.s.poll(d.now);
                d.apply(acts)?;
                let round: Vec<_> = d.outstanding.iter().copied().collect();
                for r in round {
                    if d.outstanding.remove(&r) {
                        d.report(r.0, r.1, Outcome::Verified)?;
                    }
                }
            }
            prop_assert!(d.s.is_complete(), "{} missing", d.s.missing());
            if !d.done {
                // Complete from the start: Done comes with the first poll.
                let acts = d.s.poll(d.now);
                d.apply(acts)?;
            }
            prop_assert!(d.done);
            prop_assert!(d.outstanding.is_empty());
            prop_assert_eq!(d.s.in_flight(), 0);
        }
    }
}
