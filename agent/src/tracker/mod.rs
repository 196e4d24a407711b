//! The tracker: which peer holds which pieces of which blob.
//!
//! `state` is the pure state machine (leases, holdings, ranking), `server`
//! the thin gRPC service around it (`damselfly tracker`), and `client` the
//! agent's side, spreading digests over replicas by rendezvous hashing.

pub mod client;
pub mod server;
pub mod state;

pub use client::{FindResult, MetricsHook, TrackerClient, TrackerError, rendezvous};
pub use state::{Candidate, PeerInfo, PieceHash};
