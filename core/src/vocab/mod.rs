//! The words every layer shares: a blob's digest, a bitmap of pieces, a
//! piece's hash, a byte-rate limiter and the kernel's per-port counters.
//! Nothing here imports the rest of the crate, so any module may use it
//! without tying itself to another's internals.

mod bitmap;
mod digest;
mod rate;

pub use bitmap::{BadBitmap, Bitmap};
pub use digest::{BadDigest, Digest};
pub use rate::RateLimiter;

/// A sha256 of one piece; `None` where the announcer does not know it.
pub type PieceHash = Option<[u8; 32]>;

/// The kernel's count of connects to one steered port: sent to the agent,
/// or let through to where they were going.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PortCounters {
    pub port: u16,
    pub steered: u64,
    pub passed: u64,
}
