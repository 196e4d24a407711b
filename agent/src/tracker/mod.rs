//! The tracker: which peer holds which pieces of which blob.
//!
//! `state` is the pure state machine (leases, holdings, ranking, who owns
//! which peer id, limits), `server` the thin gRPC service around it
//! (`damselfly tracker`), `tls` its transport (mutual TLS with the cluster
//! CA, bounded connections), and `client` the agent's side, spreading digests
//! over replicas by rendezvous hashing.

pub mod client;
pub mod server;
pub mod state;
pub mod tls;

pub use client::{FindResult, MetricsHook, ReplicaHealth, TrackerClient, TrackerError, rendezvous};
pub use state::{Caller, Candidate, Limits, PeerInfo};
