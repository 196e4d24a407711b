//! Damselfly node agent. One module per concern; see ../shared/DESIGN.md.

pub mod admin;
pub mod agent;
pub mod ca;
pub mod cli;
pub mod intercept;
pub mod oci;
pub mod pki;
pub mod registry;
pub mod steer;
pub mod store;
pub mod swarm;
#[doc(hidden)]
pub mod testing;
pub mod tracker;
pub mod upstream;
