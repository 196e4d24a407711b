//! `cargo xtask sim`: a discrete-event simulation of a rollout, N agents
//! pulling one image at once, that drives the agent's real piece scheduler
//! ([`damselfly_core::sched`]) and the tracker's real state
//! ([`damselfly_tracker::State`]) on a simulated clock and network
//! ([`net`]), so rollouts far larger than the testbed can be tried. The
//! README's "Simulated rollouts" says what is modelled and where it is
//! optimistic.

pub mod model;
pub mod net;
pub mod report;
