//! One blob fetched from the swarm: the IO around the pure [`Scheduler`].
//!
//! Peers' pieces are checked against the tracker's hash list before use; a
//! piece without an agreed hash only ever comes from the origin (the
//! scheduler guarantees it). Pieces are written to the store as they
//! complete, announced as held while the fetch goes on, and handed to the
//! client strictly in order. The tracker is asked again every
//! [`REFRESH_EVERY`]: peers fetching the blob at the same time grow their
//! bitmaps, and their pieces arrive with the hashes to check them by.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::body::Frame;
use sha2::{Digest as _, Sha256};
use tokio::{sync::mpsc, task::AbortHandle};
use tracing::{Instrument, Span, debug, field, info_span, warn};

use crate::{
    store::{BlobWriter, Digest, bitmap::Bitmap},
    swarm::{
        peer::PeerClient,
        progress::Progress,
        sched::{Action, Config, PeerId, Scheduler, Source},
    },
    telemetry::{metrics::Metrics, trace::SourceBytes},
    upstream::BoxError,
};

/// Fetches bytes `[start, end)` of the blob from the origin.
pub type RangeFetcher =
    Arc<dyn Fn(u64, u64) -> BoxFuture<'static, Result<Bytes, BoxError>> + Send + Sync>;

pub type Chunk = Result<Frame<Bytes>, BoxError>;

/// Asks the tracker again who holds what (`None`: no answer, nobody).
pub type Refresh = Arc<dyn Fn() -> BoxFuture<'static, Option<Holders>> + Send + Sync>;

/// How often a running fetch asks the tracker for news.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// Origin pieces that fail this many times end the download (the client gets an error).
const MAX_ORIGIN_FAILURES: u64 = 8;

/// Where the tracker says the pieces are.
pub struct Holders {
    pub peers: Vec<(SocketAddr, Vec<u8>)>,
    /// Per piece: the sha256 the holders agree on.
    pub hashes: Vec<Option<[u8; 32]>>,
}

pub struct Fetch {
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
}

/// What came of it: the writer back (to commit) if every piece is held, and
/// the progress to finish.
pub struct Outcome {
    pub writer: Option<BlobWriter>,
    pub progress: Option<Progress>,
    /// Every piece matched its hash but the blob failed its digest: the hash
    /// list was poisoned. The client got an error instead of the last piece.
    pub poisoned: bool,
}

type Done = (u64, Source, Result<Bytes, String>);

impl Fetch {
    pub async fn run(
        mut self,
        writer: BlobWriter,
        holders: Holders,
        client: mpsc::Sender<Chunk>,
    ) -> Outcome {
        let pieces = writer.pieces();
        let piece_size = writer.piece_size();
        let mut held = Bitmap::new(pieces);
        for i in 0..pieces {
            if writer.has_piece(i) {
                held.set(i);
            }
        }
        let mut hashes = holders.hashes;
        hashes.resize(pieces as usize, None);
        let mut sched = match Scheduler::new(
            writer.size(),
            writer.piece_size(),
            held.as_bytes(),
            self.config.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                let _ = client
                    .send(Err(format!("damselfly: scheduler: {e}").into()))
                    .await;
                return self.outcome(None);
            }
        };
        let mut peers = PeerTable::default();
        for (addr, bitmap) in &holders.peers {
            let id = peers.id(*addr);
            if let Err(e) = sched.add_peer(id, bitmap) {
                warn!(peer = %addr, error = %e, "ignoring a peer with a malformed bitmap");
            }
        }
        for (i, h) in hashes.iter().enumerate() {
            sched.set_hash_known(i as u64, h.is_some());
        }
        // The sender stays here, so `recv` only ever waits, even without refreshes.
        let (news_tx, mut news) = mpsc::channel::<Holders>(1);
        let _refreshing = self.spawn_refresh(news_tx.clone());

        let mut writer = Some(writer);
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        let mut running: HashMap<(u64, Source), AbortHandle> = HashMap::new();
        // One span per piece request, ended with its result (in the trace of
        // the request being served; absent when untraced).
        let mut spans: HashMap<(u64, Source), Span> = HashMap::new();
        let mut tally = SourceTally::default();
        let mut arrived: HashMap<u64, Bytes> = HashMap::new();
        let mut ready: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut next = 0u64;
        // Piece hashes come from peers, so only the blob digest vouches for
        // the whole: the last piece is held back until it matches.
        let mut whole = Sha256::new();
        let mut client_open = true;
        let mut done = false;
        let mut actions = sched.poll(Instant::now());
        loop {
            for action in actions.drain(..) {
                match action {
                    Action::Request { piece, from } => {
                        if from == Source::Origin {
                            debug!(digest = %self.digest, piece, next, in_flight = sched.in_flight(), "piece from the origin");
                        }
                        let span = (piece * piece_size, sched.piece_len(piece));
                        let traced = piece_span(piece, from, &peers.addrs);
                        let task = self.request(
                            piece,
                            from,
                            span,
                            &peers.addrs,
                            tx.clone(),
                            traced.clone(),
                        );
                        running.insert((piece, from), task);
                        spans.insert((piece, from), traced);
                    }
                    Action::Cancel { piece, from } => {
                        debug!(digest = %self.digest, piece, ?from, "cancelled");
                        if let Some(t) = running.remove(&(piece, from)) {
                            t.abort();
                        }
                        if let Some(s) = spans.remove(&(piece, from)) {
                            s.record("result", "cancelled");
                        }
                    }
                    Action::Completed(piece) => {
                        let Some(data) = arrived.remove(&piece) else {
                            continue;
                        };
                        let copy = data.clone();
                        let Some(r) =
                            on_writer(&mut writer, move |w| w.write_piece(piece, &copy)).await
                        else {
                            return self.outcome(None);
                        };
                        match r {
                            Ok(sum) => {
                                if let Some(p) = &self.progress {
                                    p.piece(piece, sum);
                                }
                            }
                            Err(e) => {
                                warn!(digest = %self.digest, error = %e, "store write failed during a swarm download")
                            }
                        }
                        ready.insert(piece, data);
                    }
                    Action::Banned(peer) => {
                        let addr = peers.addrs.get(peer.0 as usize);
                        warn!(digest = %self.digest, ?addr, "peer sent a piece that fails its hash: banned for this blob");
                        self.metrics.piece("peer", "banned");
                    }
                    Action::Dropped(peer) => {
                        debug!(digest = %self.digest, addr = ?peers.addrs.get(peer.0 as usize), "peer dropped after repeated failures");
                    }
                    Action::Done => done = true,
                }
            }
            arrived.clear();

            // Hand the client every piece it can have, in order.
            while next < pieces {
                let data = match ready.remove(&next) {
                    Some(d) => d,
                    None if writer.as_ref().is_some_and(|w| w.has_piece(next)) => {
                        // Held from before (resume): read it back, verified.
                        let i = next;
                        let Some(r) = on_writer(&mut writer, move |w| w.read_piece(i)).await else {
                            return self.outcome(None);
                        };
                        match r {
                            Ok(d) => {
                                self.metrics.blob_bytes("cache", d.len() as u64);
                                self.bytes.add("cache", d.len() as u64);
                                d
                            }
                            Err(e) => {
                                let _ = client
                                    .send(Err(format!("damselfly: resumed piece: {e}").into()))
                                    .await;
                                return self.outcome(None);
                            }
                        }
                    }
                    None => break,
                };
                whole.update(&data);
                if next + 1 == pieces
                    && Digest(std::mem::take(&mut whole).finalize().into()) != self.digest
                {
                    warn!(digest = %self.digest, "every piece matched its hash but the blob fails its digest: poisoned hash list; not delivered");
                    let _ = client
                        .send(Err("damselfly: blob failed its digest check".into()))
                        .await;
                    for (_, t) in running.drain() {
                        t.abort();
                    }
                    let mut outcome = self.outcome(None);
                    outcome.poisoned = true;
                    return outcome;
                }
                if client_open {
                    client_open = client.send(Ok(Frame::data(data))).await.is_ok();
                }
                next += 1;
                sched.set_read_position(next);
            }
            if done && next >= pieces {
                break;
            }
            if sched.origin_failures() > MAX_ORIGIN_FAILURES {
                warn!(digest = %self.digest, "origin keeps failing; giving up");
                let _ = client
                    .send(Err("damselfly: origin range requests keep failing".into()))
                    .await;
                for (_, t) in running.drain() {
                    t.abort();
                }
                return self.outcome(None);
            }

            let wake = sched
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                got = rx.recv() => {
                    let Some((piece, from, result)) = got else { break };
                    running.remove(&(piece, from));
                    let traced = spans.remove(&(piece, from)).unwrap_or_else(Span::none);
                    let now = Instant::now();
                    actions = match result {
                        Ok(data) => {
                            let sum: [u8; 32] = Sha256::digest(&data).into();
                            let verified = match from {
                                Source::Origin => {
                                    hashes[piece as usize] = Some(sum);
                                    true
                                }
                                Source::Peer(_) => hashes[piece as usize] == Some(sum),
                            };
                            let source = if matches!(from, Source::Origin) { "origin" } else { "peer" };
                            self.metrics.piece(source, if verified { "ok" } else { "corrupt" });
                            traced.record("bytes", data.len());
                            traced.record("result", if verified { "ok" } else { "corrupt" });
                            if verified {
                                self.metrics.blob_bytes(source, data.len() as u64);
                                self.bytes.add(source, data.len() as u64);
                                tally.count(from);
                                arrived.insert(piece, data.clone());
                            }
                            sched.on_piece(piece, from, data.len() as u64, now, verified)
                        }
                        Err(e) => {
                            debug!(digest = %self.digest, piece, ?from, error = %e, "piece failed");
                            if matches!(from, Source::Peer(_)) { warn!(piece, error = %e, "peer piece failed"); }
                            traced.record("result", "failed");
                            traced.record("error", field::display(&e));
                            self.metrics.piece(if matches!(from, Source::Origin) { "origin" } else { "peer" }, "failed");
                            sched.on_failure(piece, from, now)
                        }
                    };
                }
                Some(h) = news.recv() => {
                    let now = Instant::now();
                    actions = peers.update(&mut sched, h.peers, now);
                    for (i, h) in h.hashes.into_iter().enumerate() {
                        // Ours came from the origin or an earlier answer: keep it.
                        if let (Some(ours @ None), Some(h)) = (hashes.get_mut(i), h) {
                            *ours = Some(h);
                            sched.set_hash_known(i as u64, true);
                        }
                    }
                    actions.extend(sched.poll(now));
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    actions = sched.poll(Instant::now());
                }
            }
        }
        tally.record(&Span::current());
        self.outcome(writer)
    }

    fn outcome(&mut self, writer: Option<BlobWriter>) -> Outcome {
        Outcome {
            writer,
            progress: self.progress.take(),
            poisoned: false,
        }
    }

    /// Asks the tracker every [`REFRESH_EVERY`] and passes on the answers,
    /// until the receiver is gone.
    fn spawn_refresh(&self, tx: mpsc::Sender<Holders>) -> Option<AbortOnDrop> {
        let refresh = self.refresh.clone()?;
        Some(AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH_EVERY).await;
                if let Some(h) = refresh().await
                    && tx.send(h).await.is_err()
                {
                    return;
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
                            .map_err(|e| e.to_string());
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
                        let r = fetch(start, start + len).await.map_err(|e| e.to_string());
                        let _ = tx.send((piece, from, r));
                    }
                    .instrument(span),
                )
                .abort_handle()
            }
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
    /// listed are gone (their lease ran out), and their requests go elsewhere.
    fn update(
        &mut self,
        sched: &mut Scheduler,
        holders: Vec<(SocketAddr, Vec<u8>)>,
        now: Instant,
    ) -> Vec<Action> {
        let mut listed = Vec::with_capacity(holders.len());
        for (addr, bitmap) in holders {
            let id = self.id(addr);
            listed.push(id);
            if let Err(e) = sched.update_peer(id, &bitmap) {
                debug!(peer = %addr, error = %e, "ignoring a malformed bitmap");
            }
        }
        let mut actions = Vec::new();
        for &id in self.ids.values() {
            if !listed.contains(&id) {
                actions.extend(sched.remove_peer(id, now));
            }
        }
        actions
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run a blocking store call on the writer off the async threads; `None`
/// if there is no writer or the blocking task died (the writer is lost then).
pub async fn on_writer<T: Send + 'static>(
    writer: &mut Option<BlobWriter>,
    f: impl FnOnce(&mut BlobWriter) -> T + Send + 'static,
) -> Option<T> {
    let mut w = writer.take()?;
    let (w, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut w);
        (w, out)
    })
    .await
    .ok()?;
    *writer = Some(w);
    Some(out)
}
