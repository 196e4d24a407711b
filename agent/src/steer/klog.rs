//! The kernel programs' own log lines (aya-log: which process connected
//! where, steered or why not) as `tracing` events under [`TARGET`], at debug.
//! `DAMSELFLY_LOG=damselfly::kernel=debug` turns them on; at any other level
//! the programs are loaded with logging compiled out by the verifier.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

use super::SteerError;

pub(super) const TARGET: &str = "damselfly::kernel";

/// aya-log hands records to a `log::Log`; ours re-emits them as tracing events.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: TARGET, "{}", record.args());
    }

    fn flush(&self) {}
}

/// Reads the programs' ring buffer whenever the kernel says it has records.
pub(super) fn spawn_reader(ebpf: &mut Ebpf) -> Result<tokio::task::JoinHandle<()>, SteerError> {
    let logger = EbpfLogger::init_with_logger(ebpf, ToTracing)
        .map_err(|e| SteerError::KernelLog(e.to_string()))?;
    // SAFETY: the logger owns the ring buffer's fd and keeps it open, unchanged,
    // for as long as the AsyncFd owns the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| SteerError::KernelLog(e.to_string()))?;
    Ok(tokio::spawn(async move {
        while let Ok(mut ready) = fd.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}
