//! The serving side: accept authenticated peers, answer each stream with one
//! piece from the [`PieceSource`], within the upload limits.
//!
//! A peer that stops reading must not pin what others need: every write, and
//! the peer's acknowledgement of a finished answer, must make progress within
//! [`ServerConfig::write_timeout`], or the stream is reset, which drops what
//! QUIC still buffers for it, and its upload slot and memory are released.
//!
//! A few answers at a time: [`ServerConfig::max_uploads`] in all and
//! [`ServerConfig::max_uploads_per_peer`] to one peer; a request beyond them
//! is answered busy at once, not queued. A handful of streams fill the
//! uplink as well as many do, and each answer then gets a larger share of
//! it, so a fresh piece reaches its first few peers soonest and the rest
//! take it from them (their schedulers try another holder when told busy):
//! a relay tree instead of every node waiting on the one that holds it.
//!
//! Memory held by uploads: each answer holds its whole piece (read at once)
//! from the read until the peer has acknowledged the last byte or the stream
//! is reset; QUIC's send buffer only references those bytes. So at most
//! `max_uploads × piece size` (4 × 4 MiB = 16 MiB by default), plus what a
//! request may buffer on its way in: [`REQUEST_WINDOW`] per stream,
//! [`CONNECTION_WINDOW`] per connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::{sync::Semaphore, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    BytesHook, IDLE_TIMEOUT, KEEP_ALIVE, PeerError, PeerTls, PieceSource, UPLOADS_PER_PEER,
    haves::Haves,
    slots::UploadSlots,
    transport,
    wire::{REQUEST_LEN, Request, ResponseHead},
};
use crate::{store::StoreError, vocab::RateLimiter};

/// Set to `1` in an agent's environment to make it flip a byte in every piece
/// it uploads: end-to-end tests use it to check that receivers catch, ban
/// and report a lying peer. Read once, by [`ServerConfig::new`].
pub(super) const CORRUPT_UPLOADS_ENV: &str = "DAMSELFLY_TEST_CORRUPT_UPLOADS";

/// Pieces go out in writes of this size, each paid for at the rate limiter
/// and counted, so limits and metrics follow the transfer smoothly.
const CHUNK: usize = 64 * 1024;

/// What a client may send on one stream before we read it: requests are
/// [`REQUEST_LEN`] bytes, so anything more is only memory for a hostile peer.
pub(super) const REQUEST_WINDOW: u32 = 1024;
/// The same for a whole connection.
pub(super) const CONNECTION_WINDOW: u32 = 64 * 1024;

/// QUIC error code of a stream reset because the peer stopped taking data.
const STALLED: u32 = 1;

pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Distinct peers served at once; more are answered busy. `None`: no limit.
    pub max_upload_peers: Option<usize>,
    /// Concurrent requests one connection may have open.
    pub max_streams_per_peer: u32,
    /// Requests answered at once, each holding its piece in memory; more
    /// are answered busy.
    pub max_uploads: usize,
    /// The same for one connection, so one peer cannot take every upload.
    pub max_uploads_per_peer: usize,
    /// For a request's header to arrive once its stream is open.
    pub request_timeout: Duration,
    /// For the peer to take each write, and to acknowledge a finished answer.
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Uploads take tokens at [`crate::vocab::rate::Priority::Low`].
    pub rate: Option<Arc<RateLimiter>>,
    pub bytes_out: Option<BytesHook>,
    /// Test-only: flip a byte in every piece sent. See [`CORRUPT_UPLOADS_ENV`].
    pub corrupt_uploads: bool,
    /// Who asked for the blobs this node fetches, told of each new piece;
    /// and which pieces of a blob fetched from the origin went out.
    pub haves: Arc<Haves>,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            max_upload_peers: Some(16),
            max_streams_per_peer: 16,
            max_uploads: 4,
            max_uploads_per_peer: UPLOADS_PER_PEER,
            request_timeout: Duration::from_secs(10),
            // A 64 KiB write waits on the peer reading; 5 s is a peer slower
            // than 13 KB/s, or gone.
            write_timeout: Duration::from_secs(5),
            idle_timeout: IDLE_TIMEOUT,
            keep_alive: KEEP_ALIVE,
            rate: None,
            bytes_out: None,
            corrupt_uploads: std::env::var(CORRUPT_UPLOADS_ENV).is_ok_and(|v| v == "1"),
            haves: Arc::default(),
        }
    }
}

/// A running server; dropping it closes the endpoint and every connection.
pub struct PeerServer {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    source: Arc<dyn PieceSource>,
    slots: Arc<UploadSlots>,
    uploads: Arc<Semaphore>,
    max_uploads: usize,
    per_peer: usize,
    request_timeout: Duration,
    write_timeout: Duration,
    rate: Option<Arc<RateLimiter>>,
    bytes_out: Option<BytesHook>,
    corrupt: bool,
    connected: AtomicUsize,
    haves: Arc<Haves>,
}

impl PeerServer {
    /// Binds and starts accepting; needs a tokio runtime.
    pub fn bind(
        tls: &PeerTls,
        source: Arc<dyn PieceSource>,
        cfg: ServerConfig,
    ) -> Result<Self, PeerError> {
        let mut t = transport(cfg.idle_timeout, cfg.keep_alive, cfg.max_streams_per_peer);
        // Datagrams go out only (haves), but quinn sends none without a
        // receive buffer: a small one, where a client's only displace each
        // other (never read).
        t.datagram_receive_buffer_size(Some(REQUEST_WINDOW as usize));
        t.stream_receive_window(VarInt::from_u32(REQUEST_WINDOW));
        t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
        let server = tls.server_config(Arc::new(t))?;
        let endpoint = Endpoint::server(server, cfg.listen).map_err(|source| PeerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| PeerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        if cfg.corrupt_uploads {
            warn!("corrupting every uploaded piece ({CORRUPT_UPLOADS_ENV}): test use only");
        }
        let shared = Arc::new(Shared {
            source,
            slots: UploadSlots::new(cfg.max_upload_peers),
            uploads: Arc::new(Semaphore::new(cfg.max_uploads.max(1))),
            max_uploads: cfg.max_uploads.max(1),
            per_peer: cfg.max_uploads_per_peer.max(1),
            request_timeout: cfg.request_timeout,
            write_timeout: cfg.write_timeout,
            rate: cfg.rate,
            bytes_out: cfg.bytes_out,
            corrupt: cfg.corrupt_uploads,
            connected: AtomicUsize::new(0),
            haves: cfg.haves,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        info!(addr = %local_addr, "peer server listening");
        Ok(Self {
            endpoint,
            local_addr,
            shared,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Authenticated inbound connections now open.
    pub fn peers_connected(&self) -> usize {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Distinct peers with a request being answered now.
    pub fn peers_serving(&self) -> usize {
        self.shared.slots.serving()
    }

    /// Pieces held in memory for answers now.
    pub fn pieces_in_memory(&self) -> usize {
        self.shared.max_uploads - self.shared.uploads.available_permits()
    }

    /// Closes every connection and waits (briefly) for the peers to be told.
    pub async fn shutdown(self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, shared).await,
                // Also how an unauthenticated peer ends: worth seeing.
                Err(e) => info!(%peer, error = %e, "peer handshake failed"),
            }
        });
    }
}

/// Counts a connection for as long as it lives.
struct Connected<'a>(&'a AtomicUsize);

impl<'a> Connected<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(conn: Connection, shared: Arc<Shared>) {
    let peer = conn.remote_address();
    let _connected = Connected::new(&shared.connected);
    let uploads = Arc::new(Semaphore::new(shared.per_peer));
    debug!(%peer, "peer connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (shared, uploads, conn) = (shared.clone(), uploads.clone(), conn.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(send, recv, &conn, &shared, &uploads).await {
                        debug!(%peer, error = %e, "peer request ended early");
                    }
                });
            }
            Err(e) => {
                debug!(%peer, reason = %e, "peer disconnected");
                return;
            }
        }
    }
}

async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    conn: &Connection,
    shared: &Shared,
    peer_uploads: &Arc<Semaphore>,
) -> Result<(), PeerError> {
    let peer = conn.remote_address();
    let mut buf = [0u8; REQUEST_LEN];
    tokio::time::timeout(shared.request_timeout, recv.read_exact(&mut buf))
        .await
        .map_err(|_| PeerError::Timeout(shared.request_timeout))??;
    let req = match Request::decode(&buf) {
        Ok(r) => r,
        Err(e) => {
            respond(&mut send, ResponseHead::Error, shared.write_timeout).await?;
            return Err(e.into());
        }
    };
    // Busy or not, it trades this blob: tell it of our next pieces.
    shared.haves.asked(&req.digest, conn);
    let Some(_slot) = shared.slots.try_acquire(peer) else {
        debug!(%peer, "upload refused: max upload peers reached");
        return respond(&mut send, ResponseHead::Busy, shared.write_timeout).await;
    };
    // Both are released when this answer ends.
    let uploads = (
        peer_uploads.clone().try_acquire_owned(),
        shared.uploads.clone().try_acquire_owned(),
    );
    let _upload = match uploads {
        (Ok(mine), Ok(all)) => (mine, all),
        _ => {
            debug!(%peer, "upload refused: as many uploads as allowed already");
            return respond(&mut send, ResponseHead::Busy, shared.write_timeout).await;
        }
    };
    if !shared.haves.may_send(&req.digest, req.index) {
        debug!(%peer, index = req.index, "upload refused: seeding pieces nobody has yet first");
        return respond(&mut send, ResponseHead::Busy, shared.write_timeout).await;
    }
    let source = shared.source.clone();
    let read = tokio::task::spawn_blocking(move || source.piece(&req.digest, req.index)).await;
    let piece = match read {
        Ok(Some(Ok(piece))) => piece,
        Ok(None | Some(Err(StoreError::NoSuchPiece { .. } | StoreError::MissingPiece { .. }))) => {
            return respond(&mut send, ResponseHead::NotFound, shared.write_timeout).await;
        }
        Ok(Some(Err(e))) => {
            warn!(digest = %req.digest, index = req.index, error = %e, "cannot serve piece");
            return respond(&mut send, ResponseHead::Error, shared.write_timeout).await;
        }
        Err(e) => {
            warn!(digest = %req.digest, index = req.index, error = %e, "piece read panicked");
            return respond(&mut send, ResponseHead::Error, shared.write_timeout).await;
        }
    };
    shared.haves.sending(&req.digest, req.index);
    let piece = if shared.corrupt {
        corrupt(piece)
    } else {
        piece
    };
    let (head, n) = ResponseHead::Ok {
        len: piece.len() as u64,
    }
    .encode();
    let limit = shared.write_timeout;
    write_within(&mut send, Bytes::copy_from_slice(&head[..n]), limit).await?;
    let mut at = 0;
    while at < piece.len() {
        let chunk = piece.slice(at..piece.len().min(at + CHUNK));
        let len = chunk.len() as u64;
        at += chunk.len();
        // Waiting for our own rate limit is not the peer's stall.
        if let Some(rate) = &shared.rate {
            rate.acquire_low(len).await;
        }
        write_within(&mut send, chunk, limit).await?;
        if let Some(hook) = &shared.bytes_out {
            hook(len);
        }
    }
    finish(&mut send, limit).await
}

/// Writes `data`; a peer that does not take it within `limit` gets the
/// stream reset, which drops what QUIC still buffers for it.
async fn write_within(
    send: &mut SendStream,
    data: Bytes,
    limit: Duration,
) -> Result<(), PeerError> {
    let written = tokio::time::timeout(limit, send.write_chunk(data)).await;
    match written {
        Ok(r) => Ok(r?),
        Err(_) => {
            debug!(stream = %send.id(), "peer stopped reading; resetting the stream");
            let _ = send.reset(STALLED.into());
            Err(PeerError::Timeout(limit))
        }
    }
}

/// Finishes the stream and holds on (and so to the piece's memory) until the
/// peer has acknowledged every byte, which QUIC would otherwise keep buffered
/// for a peer that never reads; a peer that does not within `limit` gets the
/// stream reset, which drops that buffer.
async fn finish(send: &mut SendStream, limit: Duration) -> Result<(), PeerError> {
    send.finish()?;
    match tokio::time::timeout(limit, send.stopped()).await {
        Ok(_) => Ok(()),
        Err(_) => {
            let _ = send.reset(STALLED.into());
            Err(PeerError::Timeout(limit))
        }
    }
}

async fn respond(
    send: &mut SendStream,
    head: ResponseHead,
    limit: Duration,
) -> Result<(), PeerError> {
    let (buf, n) = head.encode();
    write_within(send, Bytes::copy_from_slice(&buf[..n]), limit).await?;
    finish(send, limit).await
}

/// Flips one byte in the middle, where no length check can catch it.
fn corrupt(piece: Bytes) -> Bytes {
    if piece.is_empty() {
        return piece;
    }
    let mut b = BytesMut::from(&piece[..]);
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    b.freeze()
}
