//! The fetching side: one cached connection per peer address, one stream
//! per piece; and the pieces peers tell us they now hold (datagrams, see
//! `haves`), passed to the fetch of that blob.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint};
use tracing::debug;

use tokio::sync::{Semaphore, mpsc};

use super::{
    BytesHook, IDLE_TIMEOUT, KEEP_ALIVE, PEER_SERVER_NAME, PeerError, PeerTls, UPLOADS_PER_PEER,
    transport,
    wire::{RESPONSE_HEAD_MAX, Request, ResponseHead},
};
use crate::vocab::{Digest, RateLimiter};

pub struct ClientConfig {
    /// Local UDP address, e.g. `0.0.0.0:0`.
    pub bind: SocketAddr,
    /// For one whole fetch, dialling included.
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Downloads take tokens at [`crate::vocab::rate::Priority::High`]: they
    /// serve this node's own pulls.
    pub rate: Option<Arc<RateLimiter>>,
    pub bytes_in: Option<BytesHook>,
    /// Requests out to one peer at once, over every blob; more wait here
    /// for one to end. A peer serves one node no more than this at once
    /// (its server's `max_uploads_per_peer`) and answers the rest busy, and
    /// a busy answer costs a round trip and a backoff.
    pub max_requests_per_peer: usize,
    /// Counts the haves taken in (metrics).
    pub haves_in: Option<BytesHook>,
}

impl ClientConfig {
    pub fn new(bind: SocketAddr) -> Self {
        Self {
            bind,
            request_timeout: Duration::from_secs(30),
            idle_timeout: IDLE_TIMEOUT,
            keep_alive: KEEP_ALIVE,
            rate: None,
            bytes_in: None,
            max_requests_per_peer: UPLOADS_PER_PEER,
            haves_in: None,
        }
    }
}

pub struct PeerClient {
    endpoint: Endpoint,
    cfg: ClientConfig,
    conns: Mutex<HashMap<SocketAddr, Slot>>,
    listeners: Listeners,
}

/// Per blob being fetched: where to send a peer's address and the index of
/// a piece it now holds.
type Listeners = Arc<Mutex<HashMap<Digest, mpsc::Sender<(SocketAddr, u64)>>>>;

/// Haves waiting for the fetch of one blob, beyond which more are dropped
/// (the tracker tells them too): a few pieces' worth from every peer.
const HAVES_QUEUED: usize = 1024;
/// Datagrams a connection holds before they are read (haves are 42 bytes);
/// past it QUIC drops the oldest.
const DATAGRAMS_BUFFERED: usize = 64 * 1024;

/// The haves for one blob's fetch, until dropped.
pub struct HaveListener {
    rx: mpsc::Receiver<(SocketAddr, u64)>,
    /// Ours in `listeners`, unless a later listener replaced it.
    tx: mpsc::Sender<(SocketAddr, u64)>,
    digest: Digest,
    listeners: Listeners,
}

impl HaveListener {
    /// The next peer address and piece index.
    pub async fn recv(&mut self) -> Option<(SocketAddr, u64)> {
        self.rx.recv().await
    }
}

impl Drop for HaveListener {
    fn drop(&mut self) {
        let mut listeners = lock(&self.listeners);
        if listeners
            .get(&self.digest)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            listeners.remove(&self.digest);
        }
    }
}

/// One peer's connection, and the lock that makes concurrent fetches to a
/// peer not yet connected share a single dial.
#[derive(Default)]
struct Slot {
    conn: Option<Connection>,
    dial: Arc<tokio::sync::Mutex<()>>,
    /// When the peer last completed a handshake or gave us a piece.
    seen: Option<Instant>,
    /// See [`ClientConfig::max_requests_per_peer`].
    requests: Option<Arc<Semaphore>>,
}

/// The peers this node fetches from, from the client's own table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCounts {
    /// Peers dialled since they were last disconnected (e.g. banned).
    pub known: usize,
    /// Of those, the ones that answered within the window asked for.
    pub seen_recently: usize,
    /// Open connections to them.
    pub connected: usize,
}

impl PeerClient {
    /// Binds the client endpoint; needs a tokio runtime.
    pub fn new(tls: &PeerTls, cfg: ClientConfig) -> Result<Self, PeerError> {
        let mut t = transport(cfg.idle_timeout, cfg.keep_alive, 0);
        t.datagram_receive_buffer_size(Some(DATAGRAMS_BUFFERED));
        let config = tls.client_config(Arc::new(t))?;
        let mut endpoint = Endpoint::client(cfg.bind).map_err(|source| PeerError::Bind {
            addr: cfg.bind,
            source,
        })?;
        endpoint.set_default_client_config(config);
        Ok(Self {
            endpoint,
            cfg,
            conns: Mutex::new(HashMap::new()),
            listeners: Listeners::default(),
        })
    }

    /// The pieces of `digest` that the peers we asked for it tell us they
    /// now hold. One fetch per blob listens; a second replaces the first.
    pub fn listen(&self, digest: Digest) -> HaveListener {
        let (tx, rx) = mpsc::channel(HAVES_QUEUED);
        lock(&self.listeners).insert(digest, tx.clone());
        HaveListener {
            rx,
            tx,
            digest,
            listeners: self.listeners.clone(),
        }
    }

    /// Piece `index` of `digest` from the peer at `addr`, which must be
    /// `expected_len` bytes long. Not verified here: the caller checks it
    /// against the hash it trusts.
    pub async fn fetch_piece(
        &self,
        addr: SocketAddr,
        digest: &Digest,
        index: u64,
        expected_len: u64,
    ) -> Result<Bytes, PeerError> {
        let limit = self.cfg.request_timeout;
        let req = Request {
            digest: *digest,
            index,
        };
        let permits = self.requests_to(addr);
        let fetch = async {
            let _permit = permits.acquire().await;
            self.fetch(addr, req, expected_len).await
        };
        let result = tokio::time::timeout(limit, fetch)
            .await
            .unwrap_or(Err(PeerError::Timeout(limit)));
        match &result {
            Ok(_) => self.saw(addr),
            Err(e) => debug!(%addr, %digest, index, error = %e, "piece fetch failed"),
        }
        result
    }

    fn requests_to(&self, addr: SocketAddr) -> Arc<Semaphore> {
        let per_peer = self.cfg.max_requests_per_peer.max(1);
        self.lock()
            .entry(addr)
            .or_default()
            .requests
            .get_or_insert_with(|| Arc::new(Semaphore::new(per_peer)))
            .clone()
    }

    async fn fetch(
        &self,
        addr: SocketAddr,
        req: Request,
        expected_len: u64,
    ) -> Result<Bytes, PeerError> {
        let conn = self.connection(addr).await?;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            // Closed since it was cached (e.g. the peer restarted): dial once more.
            Err(_) => {
                self.forget(addr, &conn);
                self.connection(addr).await?.open_bi().await?
            }
        };
        send.write_all(&req.encode()).await?;
        send.finish()?;

        let mut head = [0u8; RESPONSE_HEAD_MAX];
        recv.read_exact(&mut head[..1]).await?;
        let head = match ResponseHead::decode(&head[..1])? {
            Some((h, _)) => h,
            None => {
                recv.read_exact(&mut head[1..]).await?;
                let Some((h, _)) = ResponseHead::decode(&head)? else {
                    return Err(PeerError::Truncated {
                        got: 0,
                        expected: RESPONSE_HEAD_MAX as u64,
                    });
                };
                h
            }
        };
        let len = match head {
            ResponseHead::Ok { len } => len,
            ResponseHead::NotFound => {
                return Err(PeerError::NotFound {
                    digest: req.digest,
                    index: req.index,
                });
            }
            ResponseHead::Busy => return Err(PeerError::Busy),
            ResponseHead::Error => return Err(PeerError::Remote),
        };
        // Checked before reading, so a peer cannot make us buffer more than
        // the one piece we asked for.
        if len != expected_len {
            let _ = recv.stop(0u32.into());
            return Err(PeerError::Length {
                expected: expected_len,
                actual: len,
            });
        }
        let mut body = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
        while (body.len() as u64) < len {
            let want = usize::try_from(len - body.len() as u64).unwrap_or(usize::MAX);
            let Some(chunk) = recv.read_chunk(want, true).await? else {
                return Err(PeerError::Truncated {
                    got: body.len() as u64,
                    expected: len,
                });
            };
            let n = chunk.bytes.len() as u64;
            if let Some(rate) = &self.cfg.rate {
                rate.acquire_high(n).await;
            }
            if let Some(hook) = &self.cfg.bytes_in {
                hook(n);
            }
            body.extend_from_slice(&chunk.bytes);
        }
        Ok(body.freeze())
    }

    /// The open connection to `addr`, dialled if there is none.
    async fn connection(&self, addr: SocketAddr) -> Result<Connection, PeerError> {
        let dial = {
            let mut conns = self.lock();
            let slot = conns.entry(addr).or_default();
            if let Some(c) = live(&slot.conn) {
                return Ok(c);
            }
            slot.dial.clone()
        };
        let _dialling = dial.lock().await;
        // Someone else may have connected while we waited for the lock.
        if let Some(c) = self.lock().get(&addr).and_then(|s| live(&s.conn)) {
            return Ok(c);
        }
        // quinn drives a connection inside the span current when it is dialled,
        // for the connection's whole life: dial outside every span, or the
        // trace of the blob that happened to dial would never end.
        let connecting = tracing::dispatcher::with_default(&tracing::Dispatch::none(), || {
            self.endpoint.connect(addr, PEER_SERVER_NAME)
        })?;
        let conn = connecting.await?;
        debug!(%addr, "connected to peer");
        tokio::spawn(take_haves(
            conn.clone(),
            addr,
            self.listeners.clone(),
            self.cfg.haves_in.clone(),
        ));
        let mut conns = self.lock();
        let slot = conns.entry(addr).or_default();
        slot.conn = Some(conn.clone());
        slot.seen = Some(Instant::now());
        Ok(conn)
    }

    /// Whether the connection to `addr` died other than by this node's
    /// hand: the peer stopped answering (idle timeout), reset it, or shut
    /// down. A peer not dialled, or dialled again since, is not known to be
    /// unreachable.
    pub fn unreachable(&self, addr: SocketAddr) -> bool {
        self.lock()
            .get(&addr)
            .and_then(|s| s.conn.as_ref()?.close_reason())
            .is_some_and(|why| !matches!(why, quinn::ConnectionError::LocallyClosed))
    }

    fn saw(&self, addr: SocketAddr) {
        if let Some(slot) = self.lock().get_mut(&addr) {
            slot.seen = Some(Instant::now());
        }
    }

    /// Drops `conn` from the cache if it is still the one cached for `addr`.
    fn forget(&self, addr: SocketAddr, conn: &Connection) {
        let mut conns = self.lock();
        if let Some(slot) = conns.get_mut(&addr)
            && slot
                .conn
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            slot.conn = None;
        }
    }

    /// Closes and forgets the connection to `addr`, e.g. for a banned peer.
    pub fn disconnect(&self, addr: SocketAddr) {
        if let Some(slot) = self.lock().remove(&addr)
            && let Some(c) = slot.conn
        {
            c.close(0u32.into(), b"disconnect");
        }
    }

    /// Open connections to peers (the `damselfly_peers_connected` gauge).
    pub fn peers_connected(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| live(&s.conn).is_some())
            .count()
    }

    /// Known, recently seen (within `recent`) and connected peers.
    pub fn counts(&self, recent: Duration) -> PeerCounts {
        let conns = self.lock();
        PeerCounts {
            known: conns.len(),
            seen_recently: conns
                .values()
                .filter(|s| s.seen.is_some_and(|t| t.elapsed() < recent))
                .count(),
            connected: conns.values().filter(|s| live(&s.conn).is_some()).count(),
        }
    }

    /// Closes every connection and waits (briefly) for the peers to be told.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Slot>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Passes each have `conn`'s peer sends to the fetch of its blob, until the
/// connection closes. A malformed datagram is dropped, as is a have for a
/// blob no fetch listens to or whose fetch is behind.
async fn take_haves(
    conn: Connection,
    addr: SocketAddr,
    listeners: Listeners,
    count: Option<BytesHook>,
) {
    while let Ok(d) = conn.read_datagram().await {
        let Ok(have) = Request::decode(&d) else {
            debug!(%addr, len = d.len(), "malformed have dropped");
            continue;
        };
        let tx = lock(&listeners).get(&have.digest).cloned();
        if let Some(tx) = tx
            && tx.try_send((addr, have.index)).is_ok()
            && let Some(count) = &count
        {
            count(1);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn live(conn: &Option<Connection>) -> Option<Connection> {
    conn.as_ref()
        .filter(|c| c.close_reason().is_none())
        .cloned()
}
