//! What the agent tells about itself: Prometheus metrics, OpenTelemetry
//! traces, the last warnings and errors, and the time stamps they carry.
//! Every layer reports here and this module imports none of them (the
//! kernel's per-port counters are handed in by the wiring), so it sits below
//! all that report.

pub mod metrics;
pub mod recent;
pub mod stamp;
pub mod trace;
