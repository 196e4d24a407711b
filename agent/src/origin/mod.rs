//! The origin: the registries Damselfly stands in front of, and the client
//! that reaches them when neither the cache nor the swarm can answer.
//!
//! - [`client`]: the HTTP client ([`OriginClient`]) and where its requests
//!   may go;
//! - [`target`]: one registry's requests ([`OriginRef`]), the agent's own or
//!   a steered connection's;
//! - [`hosts`]: which hosts count as registries ([`RegistryHosts`]).

mod client;
pub mod headers;
pub mod hosts;
mod target;

pub use client::{Body, BoxError, OriginClient, OriginError, carries_credentials, empty};
pub use hosts::RegistryHosts;
pub use target::{OriginRef, Steered};
