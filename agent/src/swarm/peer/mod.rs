//! The peer data plane: pieces of blobs between agents over QUIC.
//!
//! Every agent runs a [`PeerServer`] on `--peer-listen` (default
//! `0.0.0.0:7401/udp`) and fetches with one [`PeerClient`]. Each request is
//! one bidirectional stream naming (digest, piece index); the answer is the
//! piece, streamed (see [`wire`] for the bytes). A client keeps one
//! connection per peer address and runs many streams on it; connections are
//! kept alive and re-dialled once closed. Both ends authenticate with the
//! cluster CA (see [`tls`]).
//!
//! The server serves only what a [`PieceSource`] holds, verified by the
//! store as it is read; the receiver still checks every piece against the
//! sha256 the tracker's holders agree on (`acquire/driver.rs`), since a
//! peer may lie.

mod client;
mod haves;
mod server;
mod slots;
mod tls;
pub mod wire;

#[cfg(test)]
pub(crate) mod tests;

use std::{io, sync::Arc, time::Duration};

use bytes::Bytes;
use quinn::{TransportConfig, VarInt};

use crate::{
    store::{Store, StoreError},
    vocab::Digest,
};

use crate::pki::PEER_SERVER_NAME;
pub use client::{ClientConfig, HaveListener, PeerClient};
pub use haves::Haves;
pub use server::{PeerServer, ServerConfig};
pub use tls::PeerTls;
use tls::TlsError;
use wire::WireError;

/// A connection with no traffic for this long is closed; keep-alives make
/// that happen only when the peer is gone. Not shorter: under heavy loss
/// QUIC's probe backoff leaves live connections silent for seconds (1.5 s
/// here made the 16-node bench 1.6 x slower and fetch the image 4.9 x from
/// the origin, every false "gone" dropping a peer), so a dead node is
/// usually known from the tracker first (its connection to the tracker
/// closed, or its lease ran out).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Requests one node has answered by one peer at once: the server's
/// default `max_uploads_per_peer`, and what the client sends a peer at once.
pub(super) const UPLOADS_PER_PEER: usize = 2;

/// Called with a byte count as piece payload goes out or comes in (metrics).
pub(super) type BytesHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Where the server finds pieces: complete blobs, and pieces of downloads
/// still running. Called on a blocking thread, so it may read from disk.
pub trait PieceSource: Send + Sync {
    /// `None` if the blob or the piece is not held here; an error if it is
    /// held but could not be read (e.g. [`StoreError::Corrupt`]).
    fn piece(&self, digest: &Digest, index: u64) -> Option<Result<Bytes, StoreError>>;
}

/// Complete blobs, and the pieces held of blobs still downloading (so nodes
/// that start together share while they fetch).
impl PieceSource for Store {
    fn piece(&self, digest: &Digest, index: u64) -> Option<Result<Bytes, StoreError>> {
        let complete = |s: &Store| Some(s.get(digest)?.read_piece(index));
        complete(self)
            .or_else(|| self.partial_piece(digest, index))
            // It may have been committed between the two looks.
            .or_else(|| complete(self))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("send: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("receive: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("receive: {0}")]
    ReadExact(#[from] quinn::ReadExactError),
    #[error("stream: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer does not have piece {index} of {digest}")]
    NotFound { digest: Digest, index: u64 },
    #[error("the peer refused: too many peers being served")]
    Busy,
    #[error("the peer failed to read the piece")]
    Remote,
    #[error(transparent)]
    Protocol(#[from] WireError),
    #[error("piece is {actual} bytes, expected {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("stream ended after {got} of {expected} bytes")]
    Truncated { got: u64, expected: u64 },
    #[error("piece does not match its sha256")]
    Mismatch,
}

impl PeerError {
    /// The peer is unreachable: its connection died or could not be made.
    /// Unlike a refused or failed piece, nothing more is to be had from it.
    pub fn is_gone(&self) -> bool {
        use quinn::{ReadError, ReadExactError, WriteError};
        matches!(
            self,
            Self::Connect(_)
                | Self::Connection(_)
                | Self::Write(WriteError::ConnectionLost(_))
                | Self::Read(ReadError::ConnectionLost(_))
                | Self::ReadExact(ReadExactError::ReadError(ReadError::ConnectionLost(_)))
        )
    }
}

/// Shared by both ends; `bidi_streams` is how many streams the other end
/// may open at once (0 for a client, which is never asked anything; it is
/// only told of pieces, in datagrams: see [`haves`]).
fn transport(idle: Duration, keep_alive: Duration, bidi_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    // Past the QUIC varint range (2^62 ms) means "never": fall back to none.
    t.max_idle_timeout(idle.try_into().ok());
    t.keep_alive_interval(Some(keep_alive));
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}
