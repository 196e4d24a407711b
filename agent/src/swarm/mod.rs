//! Fetching a blob's pieces from peers and the origin. The decisions live in
//! the pure [`sched`] state machine; the IO around it stays thin.

pub mod peer;
pub mod rate;
pub mod sched;
