//! One blob downloaded from the swarm: the IO around the pure [`Scheduler`]
//! and [`InOrder`], in the manner of quinn's driver around quinn-proto.
//!
//! Peers' pieces are checked against the tracker's hash list before use; a
//! piece without an agreed hash only ever comes from the origin (the
//! scheduler guarantees it). Pieces are written to the store as they
//! complete, announced as held while the download goes on, and handed to the
//! client strictly in order. The tracker is asked again every
//! [`REFRESH_EVERY`]: peers fetching the blob at the same time grow their
//! bitmaps, and their pieces arrive with the hashes to check them by.
//!
//! Each turn of [`Driver::run`]'s loop is three steps: carry out the
//! scheduler's actions ([`Run::act`]), hand the client what it can have
//! ([`Run::deliver`]), then wait for one event: a piece request ending
//! ([`Run::on_result`]), a tracker answer ([`Run::on_news`]) or a deadline.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::body::Frame;
use sha2::{Digest as _, Sha256};
use tokio::{sync::mpsc, task::AbortHandle};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::{
    acquire::{
        Chunk,
        in_order::{InOrder, Next},
        resume::{ResumeError, on_writer, read_back},
    },
    origin::BoxError,
    store::BlobWriter,
    swarm::{
        Action, Config, Holders, PeerClient, PeerError, PeerId, Progress, Refresh, Scheduler,
        Source,
    },
    telemetry::{Metrics, SourceBytes},
    tracker::{DEFAULT_MAX_PEERS, rendezvous},
    vocab::{Bitmap, Digest},
};

/// Fetches bytes `[start, end)` of the blob from the origin.
pub(super) type RangeFetcher =
    Arc<dyn Fn(u64, u64) -> BoxFuture<'static, Result<Bytes, BoxError>> + Send + Sync>;

/// How often a running download asks the tracker for news.
pub(super) const REFRESH_EVERY: Duration = Duration::from_millis(100);

/// Origin pieces that fail this many times end the download (the client gets an error).
const MAX_ORIGIN_FAILURES: u64 = 8;

/// One blob to download from the swarm, and what to do it with.
pub(super) struct Driver {
    pub digest: Digest,
    pub peers: Arc<PeerClient>,
    pub origin: RangeFetcher,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    pub refresh: Option<Refresh>,
    /// Told of every piece as it is stored.
    pub progress: Option<Progress>,
    /// The request's bytes by source, for its trace.
    pub bytes: SourceBytes,
    /// This node's peer address as the tracker lists it (`None`: unknown,
    /// then it never takes over the origin fetch).
    pub me: Option<SocketAddr>,
}

/// What came of it: the writer back (to commit, without reading it back:
/// [`crate::store::BlobWriter::commit_verified`]) if every piece is held and
/// the blob passed its digest, and the progress to finish.
pub(super) struct Outcome {
    pub writer: Option<BlobWriter>,
    pub progress: Option<Progress>,
    /// Every piece matched its hash but the blob failed its digest: the hash
    /// list was poisoned. The client got an error instead of the last piece.
    pub poisoned: bool,
}

type Done = (u64, Source, Result<Bytes, Failure>);

/// Why a piece request failed.
struct Failure {
    message: String,
    /// The peer is unreachable (see [`crate::swarm::PeerError::is_gone`]).
    gone: bool,
    /// The peer serves as many as it will: ask another, or again later.
    busy: bool,
}

/// Why a download ended before every piece reached the client.
enum Stop {
    /// The blocking store task died; the writer went with it.
    WriterLost,
    /// The client is told this.
    Failed(String),
    /// See [`Outcome::poisoned`].
    Poisoned,
}

impl Driver {
    pub(super) async fn run(
        mut self,
        writer: BlobWriter,
        holders: Holders,
        client: mpsc::Sender<Chunk>,
    ) -> Outcome {
        let first_refresh = holders.refresh_after;
        let mut run = match Run::start(writer, holders, self.digest, self.config.clone()) {
            Ok(run) => run,
            Err(e) => {
                let _ = client
                    .send(Err(format!("damselfly: scheduler: {e}").into()))
                    .await;
                return self.outcome(None);
            }
        };
        // The sender stays here, so `recv` only ever waits, even without refreshes.
        let (news_tx, mut news) = mpsc::channel::<Holders>(1);
        let _refreshing = self.spawn_refresh(news_tx.clone(), first_refresh);
        let mut haves = self.peers.listen(self.digest);
        let mut actions = run.sched.poll(Instant::now());
        let stopped = loop {
            if let Err(stop) = run.act(&self, actions).await {
                break Some(stop);
            }
            let took_over = run.elect(&self);
            if let Err(stop) = run.act(&self, took_over).await {
                break Some(stop);
            }
            if let Err(stop) = run.deliver(&self, &client).await {
                break Some(stop);
            }
            if run.done && run.order.finished() {
                break None;
            }
            if run.sched.origin_failures() > MAX_ORIGIN_FAILURES {
                warn!(digest = %self.digest, "origin keeps failing; giving up");
                break Some(Stop::Failed(
                    "damselfly: origin range requests keep failing".into(),
                ));
            }
            let wake = run
                .sched
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            actions = tokio::select! {
                got = run.results.recv() => {
                    let Some(done) = got else { break None };
                    run.on_result(&self, done)
                }
                Some(h) = news.recv() => run.on_news(&self, h),
                Some((addr, piece)) = haves.recv() => run.on_have(addr, piece),
                _ = tokio::time::sleep_until(wake.into()) => run.sched.poll(Instant::now()),
            };
        };
        run.tally.record(&Span::current());
        match stopped {
            None => {
                // Handed back only once the in-order stream has checked the
                // blob's digest over the very bytes written: it commits unread.
                let writer = run.writer.take().filter(|_| run.order.finished());
                self.outcome(writer)
            }
            Some(Stop::WriterLost) => self.outcome(None),
            Some(Stop::Failed(message)) => {
                let _ = client.send(Err(message.into())).await;
                self.outcome(None)
            }
            Some(Stop::Poisoned) => {
                warn!(digest = %self.digest, "every piece matched its hash but the blob fails its digest: poisoned hash list; not delivered");
                let _ = client
                    .send(Err("damselfly: blob failed its digest check".into()))
                    .await;
                let mut outcome = self.outcome(None);
                outcome.poisoned = true;
                outcome
            }
        }
    }

    fn outcome(&mut self, writer: Option<BlobWriter>) -> Outcome {
        Outcome {
            writer,
            progress: self.progress.take(),
            poisoned: false,
        }
    }

    /// Asks the tracker every [`REFRESH_EVERY`], or as often as its last
    /// answer allows, and passes on the answers, until the receiver is gone.
    fn spawn_refresh(&self, tx: mpsc::Sender<Holders>, first: Duration) -> Option<AbortOnDrop> {
        let refresh = self.refresh.clone()?;
        Some(AbortOnDrop(tokio::spawn(async move {
            let mut wait = first.max(REFRESH_EVERY);
            loop {
                tokio::time::sleep(wait).await;
                if let Some(h) = refresh().await {
                    wait = h.refresh_after.max(REFRESH_EVERY);
                    if tx.send(h).await.is_err() {
                        return;
                    }
                }
            }
        })))
    }

    fn request(
        &self,
        piece: u64,
        from: Source,
        (start, len): (u64, u64),
        addrs: &[SocketAddr],
        tx: mpsc::UnboundedSender<Done>,
        span: Span,
    ) -> AbortHandle {
        let digest = self.digest;
        match from {
            Source::Peer(p) => {
                let client = self.peers.clone();
                let addr = addrs[p.0 as usize];
                tokio::spawn(
                    async move {
                        let r = client
                            .fetch_piece(addr, &digest, piece, len)
                            .await
                            .map_err(|e| Failure {
                                gone: e.is_gone(),
                                busy: matches!(e, PeerError::Busy),
                                message: e.to_string(),
                            });
                        let _ = tx.send((piece, from, r));
                    }
                    .instrument(span),
                )
                .abort_handle()
            }
            Source::Origin => {
                let fetch = self.origin.clone();
                tokio::spawn(
                    async move {
                        let r = fetch(start, start + len).await.map_err(|e| Failure {
                            message: e.to_string(),
                            gone: false,
                            busy: false,
                        });
                        let _ = tx.send((piece, from, r));
                    }
                    .instrument(span),
                )
                .abort_handle()
            }
        }
    }
}

/// The state of one download between events. Dropping it aborts every
/// request still out.
struct Run {
    sched: Scheduler,
    peers: PeerTable,
    writer: Option<BlobWriter>,
    piece_size: u64,
    /// Per piece: the trusted sha256 (from the tracker, or of the origin's bytes).
    hashes: Vec<Option<[u8; 32]>>,
    order: InOrder,
    results_tx: mpsc::UnboundedSender<Done>,
    results: mpsc::UnboundedReceiver<Done>,
    running: HashMap<(u64, Source), AbortHandle>,
    /// One span per piece request, ended with its result (in the trace of
    /// the request being served; absent when untraced).
    spans: HashMap<(u64, Source), Span>,
    /// Verified bytes waiting for the scheduler's `Completed`.
    arrived: HashMap<u64, Bytes>,
    tally: SourceTally,
    client_open: bool,
    done: bool,
    /// A peer was dropped or left since the last election.
    lost_peer: bool,
}

impl Run {
    fn start(
        writer: BlobWriter,
        holders: Holders,
        digest: Digest,
        config: Config,
    ) -> Result<Self, crate::swarm::Error> {
        let pieces = writer.pieces();
        let mut held = Bitmap::new(pieces);
        for i in (0..pieces).filter(|&i| writer.has_piece(i)) {
            held.set(i);
        }
        let mut sched =
            Scheduler::new(writer.size(), writer.piece_size(), held.as_bytes(), config)?;
        let mut peers = PeerTable::default();
        for (addr, bitmap) in &holders.peers {
            let id = peers.id(*addr);
            if let Err(e) = sched.add_peer(id, bitmap) {
                warn!(peer = %addr, error = %e, "ignoring a peer with a malformed bitmap");
            }
        }
        let mut hashes = holders.hashes;
        hashes.resize(pieces as usize, None);
        for (i, h) in hashes.iter().enumerate() {
            sched.set_hash_known(i as u64, h.is_some());
        }
        let (results_tx, results) = mpsc::unbounded_channel();
        Ok(Self {
            sched,
            peers,
            piece_size: writer.piece_size(),
            writer: Some(writer),
            hashes,
            order: InOrder::new(digest, pieces),
            results_tx,
            results,
            running: HashMap::new(),
            spans: HashMap::new(),
            arrived: HashMap::new(),
            tally: SourceTally::default(),
            client_open: true,
            done: false,
            lost_peer: false,
        })
    }

    /// Carries out the scheduler's actions: requests out, cancels, and the
    /// bytes of completed pieces to the store and the in-order queue.
    async fn act(&mut self, job: &Driver, actions: Vec<Action>) -> Result<(), Stop> {
        for action in actions {
            match action {
                Action::Request { piece, from } => {
                    if from == Source::Origin {
                        debug!(digest = %job.digest, piece, next = self.order.position(), in_flight = self.sched.in_flight(), "piece from the origin");
                    }
                    let span = (piece * self.piece_size, self.sched.piece_len(piece));
                    let traced = piece_span(piece, from, &self.peers.addrs);
                    let task = job.request(
                        piece,
                        from,
                        span,
                        &self.peers.addrs,
                        self.results_tx.clone(),
                        traced.clone(),
                    );
                    self.running.insert((piece, from), task);
                    self.spans.insert((piece, from), traced);
                }
                Action::Cancel { piece, from } => {
                    debug!(digest = %job.digest, piece, ?from, "cancelled");
                    if let Some(t) = self.running.remove(&(piece, from)) {
                        t.abort();
                    }
                    if let Some(s) = self.spans.remove(&(piece, from)) {
                        s.record("result", "cancelled");
                    }
                }
                Action::Completed(piece) => {
                    let Some(data) = self.arrived.remove(&piece) else {
                        continue;
                    };
                    let copy = data.clone();
                    // Checked against this sum in `on_result`: not hashed again.
                    let sum =
                        self.hashes[piece as usize].unwrap_or_else(|| Sha256::digest(&data).into());
                    let written = on_writer(&mut self.writer, move |w| {
                        w.write_hashed_piece(piece, &copy, sum)
                    })
                    .await
                    .ok_or(Stop::WriterLost)?;
                    match written {
                        Ok(()) => {
                            if let Some(p) = &job.progress {
                                p.piece(piece, sum);
                            }
                        }
                        Err(e) => {
                            warn!(digest = %job.digest, error = %e, "store write failed during a swarm download")
                        }
                    }
                    self.order.insert(piece, data);
                }
                Action::Banned(peer) => {
                    let addr = self.peers.addrs.get(peer.0 as usize);
                    warn!(digest = %job.digest, ?addr, "peer sent a piece that fails its hash: banned for this blob");
                    job.metrics.piece("peer", "banned");
                }
                Action::Dropped(peer) => {
                    self.lost_peer = true;
                    debug!(digest = %job.digest, addr = ?self.peers.addrs.get(peer.0 as usize), "peer dropped after repeated failures");
                }
                Action::Done => self.done = true,
            }
        }
        // Bytes the scheduler did not complete were a late duplicate.
        self.arrived.clear();
        Ok(())
    }

    /// Hands the client every piece it can have, in order; pieces held from
    /// before (resume) are read back from the store, verified.
    async fn deliver(&mut self, job: &Driver, client: &mpsc::Sender<Chunk>) -> Result<(), Stop> {
        loop {
            let writer = self.writer.as_ref();
            match self.order.next(|i| writer.is_some_and(|w| w.has_piece(i))) {
                Next::Deliver(data) => {
                    if self.client_open {
                        self.client_open = client.send(Ok(Frame::data(data))).await.is_ok();
                    }
                    self.sched.set_read_position(self.order.position());
                }
                Next::ReadBack(i) => {
                    let data = read_back(&mut self.writer, i, &job.metrics, &job.bytes)
                        .await
                        .map_err(|e| match e {
                            ResumeError::WriterLost(_) => Stop::WriterLost,
                            e => Stop::Failed(e.to_string()),
                        })?;
                    self.order.insert(i, data);
                }
                Next::Poisoned => return Err(Stop::Poisoned),
                Next::Wait | Next::Finished => return Ok(()),
            }
        }
    }

    /// A piece request ended: verify what it brought and tell the scheduler.
    fn on_result(&mut self, job: &Driver, (piece, from, result): Done) -> Vec<Action> {
        self.running.remove(&(piece, from));
        let traced = self.spans.remove(&(piece, from)).unwrap_or_else(Span::none);
        let now = Instant::now();
        let source = if from == Source::Origin {
            "origin"
        } else {
            "peer"
        };
        let data = match (from, result) {
            (_, Ok(data)) => data,
            // Only a peer answers busy.
            (Source::Peer(id), Err(Failure { busy: true, .. })) => {
                traced.record("result", "busy");
                job.metrics.piece(source, "busy");
                return self.sched.on_busy(piece, id, now);
            }
            (_, Err(e)) => {
                debug!(digest = %job.digest, piece, ?from, error = %e.message, "piece failed");
                traced.record("result", "failed");
                traced.record("error", field::display(&e.message));
                job.metrics.piece(source, "failed");
                return match from {
                    Source::Peer(id) if e.gone => {
                        warn!(piece, peer = ?self.peers.addrs.get(id.0 as usize), error = %e.message, "peer unreachable: dropped for this blob");
                        self.sched.drop_peer(id, now)
                    }
                    Source::Peer(_) => {
                        warn!(piece, error = %e.message, "peer piece failed");
                        self.sched.on_failure(piece, from, now)
                    }
                    Source::Origin => self.sched.on_failure(piece, from, now),
                };
            }
        };
        let sum: [u8; 32] = Sha256::digest(&data).into();
        let verified = match from {
            // The origin's bytes are the truth for this piece (the blob
            // digest still checks them all).
            Source::Origin => {
                self.hashes[piece as usize] = Some(sum);
                true
            }
            Source::Peer(_) => self.hashes[piece as usize] == Some(sum),
        };
        let result = if verified { "ok" } else { "corrupt" };
        job.metrics.piece(source, result);
        traced.record("bytes", data.len());
        traced.record("result", result);
        let len = data.len() as u64;
        if verified {
            job.metrics.blob_bytes(source, len);
            job.bytes.add(source, len);
            self.tally.count(from);
            self.arrived.insert(piece, data);
        }
        self.sched.on_piece(piece, from, len, now, verified)
    }

    /// A peer we asked for this blob now holds `piece` (see
    /// `swarm::peer::haves`). Taken only from a peer the tracker named, and
    /// only once the tracker has given the piece's hash: until then the piece
    /// could not be checked, and the scheduler would send it to the origin.
    /// A peer that lies costs one request, answered "not found".
    fn on_have(&mut self, addr: SocketAddr, piece: u64) -> Vec<Action> {
        let Some(&id) = self.peers.ids.get(&addr) else {
            return Vec::new();
        };
        if self.hashes.get(piece as usize).is_none_or(Option::is_none) {
            return Vec::new();
        }
        self.sched.peer_has(id, piece);
        if self.sched.could_ask(id, piece) {
            self.sched.poll(Instant::now())
        } else {
            Vec::new()
        }
    }

    /// A fresh tracker answer: peers' bitmaps, and hashes we lacked.
    fn on_news(&mut self, job: &Driver, holders: Holders) -> Vec<Action> {
        let now = Instant::now();
        // Hashes first: the peers' update may poll the scheduler (a peer no
        // longer listed), and a piece a peer holds whose hash is not known
        // yet would go to the origin.
        for (i, h) in holders.hashes.into_iter().enumerate() {
            // Ours came from the origin or an earlier answer: keep it.
            if let (Some(ours @ None), Some(h)) = (self.hashes.get_mut(i), h) {
                *ours = Some(h);
                self.sched.set_hash_known(i as u64, true);
            }
        }
        let (mut actions, left) = self.peers.update(&mut self.sched, holders.peers, now);
        self.lost_peer |= left;
        // A peer with nothing asked of it dies silently: its connection
        // says so when keep-alives go unanswered, long before the tracker's
        // lease runs out.
        let dead: Vec<PeerId> = self
            .sched
            .live_peers()
            .filter(|p| {
                self.peers
                    .addrs
                    .get(p.0 as usize)
                    .is_some_and(|&a| job.peers.unreachable(a))
            })
            .collect();
        for id in dead {
            warn!(digest = %job.digest, peer = ?self.peers.addrs.get(id.0 as usize), "peer unreachable: dropped for this blob");
            actions.extend(self.sched.drop_peer(id, now));
            self.lost_peer = true;
        }
        actions.extend(self.sched.poll(now));
        actions
    }
}

impl Run {
    /// After a peer is lost, the peers still fetching this blob and this
    /// node agree, without a word, on one of them to take over fetching from
    /// the origin what no peer holds: the highest rendezvous weight of its
    /// address with the digest wins. If the lost peer was the one doing so,
    /// its followers thus carry on at once and the origin sends the rest
    /// about once, instead of each follower waiting out its patience and
    /// then fetching the rest itself.
    fn elect(&mut self, job: &Driver) -> Vec<Action> {
        if !std::mem::take(&mut self.lost_peer) || self.sched.leading() || self.done {
            return Vec::new();
        }
        let Some(me) = job.me else {
            return Vec::new();
        };
        let mut candidates: Vec<String> = self
            .sched
            .live_peers()
            .filter_map(|p| self.peers.addrs.get(p.0 as usize))
            .map(SocketAddr::to_string)
            .collect();
        candidates.push(me.to_string());
        if rendezvous(&candidates, &job.digest) != Some(candidates.len() - 1) {
            return Vec::new();
        }
        info!(digest = %job.digest, peers = candidates.len() - 1, "a peer of this blob is gone: taking over fetching from the origin what no peer holds");
        self.sched.set_leading();
        self.sched.poll(Instant::now())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for (_, t) in self.running.drain() {
            t.abort();
        }
    }
}

/// The span of one piece request, a child of the current (`swarm.fetch`) span.
fn piece_span(piece: u64, from: Source, addrs: &[SocketAddr]) -> Span {
    let (source, peer) = match from {
        Source::Origin => ("origin", None),
        Source::Peer(p) => ("peer", addrs.get(p.0 as usize)),
    };
    info_span!(
        "piece",
        index = piece,
        source,
        peer = peer.map(field::display),
        bytes = field::Empty,
        result = field::Empty,
        error = field::Empty,
    )
}

/// What one fetch took from where, for its span.
#[derive(Default)]
struct SourceTally {
    peers: std::collections::HashSet<PeerId>,
    from_peers: u64,
    from_origin: u64,
}

impl SourceTally {
    fn count(&mut self, from: Source) {
        match from {
            Source::Peer(p) => {
                self.peers.insert(p);
                self.from_peers += 1;
            }
            Source::Origin => self.from_origin += 1,
        }
    }

    fn record(&self, span: &Span) {
        span.record("peers", self.peers.len());
        span.record("pieces.peer", self.from_peers);
        span.record("pieces.origin", self.from_origin);
    }
}

/// Peers as the scheduler numbers them: an id per address, never reused.
#[derive(Default)]
struct PeerTable {
    addrs: Vec<SocketAddr>,
    ids: HashMap<SocketAddr, PeerId>,
}

impl PeerTable {
    fn id(&mut self, addr: SocketAddr) -> PeerId {
        *self.ids.entry(addr).or_insert_with(|| {
            self.addrs.push(addr);
            PeerId(self.addrs.len() as u32 - 1)
        })
    }

    /// Applies a fresh tracker answer: new and grown bitmaps; peers no longer
    /// listed are gone (their lease ran out, or their connection to the
    /// tracker closed), and their requests go elsewhere. A full answer
    /// ([`DEFAULT_MAX_PEERS`]) names only some of the holders, so there a
    /// peer left out may well be alive: it is kept.
    fn update(
        &mut self,
        sched: &mut Scheduler,
        holders: Vec<(SocketAddr, Vec<u8>)>,
        now: Instant,
    ) -> (Vec<Action>, bool) {
        let full = holders.len() >= DEFAULT_MAX_PEERS;
        let mut listed = Vec::with_capacity(holders.len());
        for (addr, bitmap) in holders {
            let id = self.id(addr);
            listed.push(id);
            if let Err(e) = sched.update_peer(id, &bitmap) {
                debug!(peer = %addr, error = %e, "ignoring a malformed bitmap");
            }
        }
        let mut actions = Vec::new();
        let mut left = false;
        if full {
            return (actions, left);
        }
        for &id in self.ids.values() {
            if !listed.contains(&id) && sched.live_peers().any(|p| p == id) {
                left = true;
                actions.extend(sched.remove_peer(id, now));
            }
        }
        (actions, left)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        store::Store,
        swarm::peer_tests::{Ca, PS, blob, client, piece, pieces, server},
        testing::TempDir,
    };

    /// A peer that lies consistently: its pieces match the hashes it announced,
    /// but together they are not the blob. The fetch driver must not hand the
    /// client the whole thing: the last piece is withheld and an error sent.
    #[tokio::test]
    async fn a_poisoned_hash_list_never_completes_a_blob_for_the_client() {
        let ca = Ca::new("cluster");
        let real = blob(3 * PS as usize + 100, 1);
        let fake = blob(real.len(), 2);
        let digest = Digest::of(&real);
        // The liar holds other bytes under the real digest, as a partial blob
        // (served piece by piece, verified against its own sums).
        let liar_dir = TempDir::new("liar");
        let liar = Store::open(&liar_dir.0, 1 << 30, PS).unwrap();
        let mut lie = liar.begin(&digest, real.len() as u64).unwrap();
        let mut sums = Vec::new();
        for i in 0..pieces(&fake) {
            sums.push(Some(lie.write_piece(i, piece(&fake, i)).unwrap()));
        }
        let srv = server(&ca.tls(&ca, "liar"), Arc::new(liar.clone()), |_| {});

        let dir = TempDir::new("victim");
        let store = Store::open(&dir.0, 1 << 30, PS).unwrap();
        let writer = store.begin(&digest, real.len() as u64).unwrap();
        let origin_bytes = Bytes::from(real.clone());
        let origin: RangeFetcher = Arc::new(move |start, end| {
            let b = origin_bytes.slice(start as usize..end as usize);
            Box::pin(async move { Ok(b) })
        });
        let job = Driver {
            digest,
            peers: Arc::new(client(&ca.tls(&ca, "victim"))),
            origin,
            metrics: Arc::new(Metrics::new()),
            config: Config::eager(),
            refresh: None,
            progress: None,
            bytes: Default::default(),
            me: None,
        };
        let mut full = crate::vocab::Bitmap::new(pieces(&real));
        for i in 0..pieces(&real) {
            full.set(i);
        }
        let holders = Holders {
            peers: vec![(srv.local_addr(), full.as_bytes().to_vec())],
            hashes: sums,
            refresh_after: Duration::ZERO,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let outcome = job.run(writer, holders, tx).await;
        let (mut got, mut failed) = (0usize, false);
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Ok(frame) => got += frame.into_data().map(|d| d.len()).unwrap_or(0),
                Err(_) => failed = true,
            }
        }
        assert!(outcome.poisoned);
        assert!(outcome.writer.is_none());
        assert!(failed, "the client must get an error");
        let last = piece(&real, pieces(&real) - 1).len();
        assert_eq!(got, real.len() - last, "everything but the last piece");
        drop(lie);
    }
}
