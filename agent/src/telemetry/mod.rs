//! What the agent tells about itself: Prometheus metrics, OpenTelemetry
//! traces, the last warnings and errors, and the time stamps they carry.
//! Every layer reports here and this module imports none of them (the
//! kernel's per-port counters are handed in by the wiring), so it sits below
//! all that report.

mod metrics;
mod recent;
mod stamp;
mod trace;

pub use trace::{Identity, Telemetry};

pub use metrics::{InterceptTotals, Metrics};
pub use recent::{LogEvent, RecentErrors};
pub use stamp::Stamp;
pub use trace::SourceBytes;
