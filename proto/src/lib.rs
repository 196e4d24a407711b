//! Generated gRPC code for Damselfly's APIs. The `.proto` files next to this
//! crate are the contract; this crate only compiles them.

/// The tracker: which peer holds which pieces of which blob (`tracker.proto`).
pub mod tracker {
    tonic::include_proto!("damselfly.tracker.v1");
}
