//! Damselfly node agent. One module per concern; see ../shared/DESIGN.md.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod intercept;
pub mod steer;
