//! Damselfly node agent. One module per concern, in layers that import only
//! downwards; the repository's ARCHITECTURE.md lists them and walks the path
//! of one blob, SECURITY.md says who can reach what.

pub mod acquire;
pub mod admin;
pub mod agent;
pub mod ca;
pub mod cli;
pub mod intercept;
pub mod oci;
pub mod origin;
pub mod registry;
pub mod steer;
pub mod swarm;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;

pub use damselfly_core::vocab;
pub use damselfly_pki as pki;
pub use damselfly_store as store;
pub use damselfly_tracker as tracker;
