//! Damselfly node agent. One module per concern; see ../shared/DESIGN.md.

pub mod admin;
pub mod agent;
pub mod ca;
pub mod cli;
pub mod intercept;
pub mod registry;
pub mod steer;
pub mod store;
<<<<<<< HEAD
<<<<<<< HEAD
pub mod tracker;
=======
pub mod swarm;
>>>>>>> wip-sched
=======
pub mod swarm;
>>>>>>> wip-peer
pub mod upstream;
