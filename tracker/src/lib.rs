//! The tracker: which peer holds which pieces of which blob.
//!
//! `state` is the pure state machine (leases, holdings, ranking, who owns
//! which peer id, limits), `server` the thin gRPC service around it
//! (`damselfly tracker`), `tls` its transport (mutual TLS with the cluster
//! CA, bounded connections), and `client` the agent's side, spreading digests
//! over replicas by rendezvous hashing.

mod client;
mod propagation;
pub mod server;
mod state;
pub mod tls;

pub use server::{Config, DEFAULT_HEARTBEAT, DEFAULT_MAX_CONNECTIONS, MAX_IN_FLIGHT, serve};
pub use tls::client_config;

pub use client::{FindResult, MetricsHook, ReplicaHealth, TrackerClient, TrackerError, rendezvous};
pub use state::{Announce, Caller, Candidate, DEFAULT_MAX_PEERS, Found, Limits, PeerInfo, State};
