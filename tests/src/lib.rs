//! The Damselfly testbed: simulated nodes (network namespace + cgroup) on one
//! machine, real processes started inside them, and cleanup that also runs on
//! panic and sweeps what killed runs left behind.
//!
//! Every object a run makes is named `dfly-<pid>-<n>...`, so a later run can
//! tell a dead run's leftovers (its pid is gone) from a live run's.

pub mod agent;
pub mod bench;
pub mod body;
pub mod cluster;
pub mod containerd;
pub mod docker;
pub mod image;
pub mod origin;
pub mod otlp;
pub mod pki;
pub mod podman;
pub mod probe;
pub mod signals;
pub mod testbed;
pub mod tools;
pub mod trust;

pub use agent::Agent;
pub use containerd::Containerd;
pub use image::Image;
pub use origin::Origin;
pub use testbed::{Mount, Node, Proc, Testbed};
