//! Damselfly's pure core: the words every part of the agent shares
//! ([`vocab`]), the piece scheduler ([`sched`]) and in-order delivery with
//! the blob digest check ([`in_order`]), and the numbers the bench and
//! the simulator share ([`rollout`]). No sockets and no clock: time is
//! passed in, so all of it is tested without IO, in the manner of
//! quinn-proto. A crate of its own so that the compiler keeps it that way.

pub mod in_order;
pub mod rollout;
pub mod sched;
pub mod vocab;
