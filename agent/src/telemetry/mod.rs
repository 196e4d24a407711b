//! What the agent tells about itself: Prometheus metrics, OpenTelemetry
//! traces, the last warnings and errors, and the time stamps they carry.
//! Every layer reports here; this module imports none of them but `steer`
//! (the kernel's per-port counters), so it sits below all that report.

pub mod metrics;
pub mod recent;
pub mod stamp;
pub mod trace;
