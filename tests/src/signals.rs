//! Ctrl-C for long harness runs: a run's testbeds live on a worker thread's
//! stack, so a signal cannot unwind into their `Drop`. The main thread waits
//! for the signals instead and removes everything by the run's tag.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::testbed::sweep_run;

/// Set while a run is kept up on purpose for the user to look at (`dfly-demo
/// --keep`): Ctrl-C then is the normal end, exit status 0.
pub static KEEPING: AtomicBool = AtomicBool::new(false);

/// Run `work` on a worker thread; on SIGINT, SIGTERM or SIGHUP kill and
/// remove everything this process made (`dfly-<pid>-...`) and exit 128+sig.
pub fn run_or_sweep(
    work: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    // Before any thread exists, so every thread inherits the mask and the
    // signals wait for `sigwait` below (std resets the mask for children).
    let signals = Signals::block();
    let worker = std::thread::spawn(move || {
        let _wake = WakeMain;
        work()
    });
    let sig = signals.wait();
    if sig == libc::SIGUSR1 {
        return worker
            .join()
            .map_err(|_| anyhow::anyhow!("the run panicked"))?;
    }
    let keeping = KEEPING.load(Ordering::SeqCst);
    if !keeping {
        eprintln!("\ninterrupted (signal {sig}): removing the testbed");
    }
    // The nodes' daemons are our children: killed but unreaped, they stay in
    // their cgroups as zombies and the cgroups cannot be removed. Nobody will
    // wait for them now, so let the kernel reap them.
    // SAFETY: plain libc calls; no handler is installed.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
    }
    sweep_run(std::process::id());
    eprintln!("testbed removed");
    std::process::exit(if keeping { 0 } else { 128 + sig });
}

/// The signals that end a run, plus SIGUSR1: the worker saying it is done.
struct Signals(libc::sigset_t);

impl Signals {
    fn block() -> Self {
        // SAFETY: plain libc calls on a local set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Self(set)
        }
    }

    fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: the set is initialized; sig is a valid out pointer.
        unsafe { libc::sigwait(&self.0, &mut sig) };
        sig
    }
}

/// Wakes the main thread when the worker ends, also by panic.
struct WakeMain;

impl Drop for WakeMain {
    fn drop(&mut self) {
        // SAFETY: plain syscall to our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    }
}
