//! SIGINT/SIGTERM as a request to stop training cleanly: the handler only sets a flag; the step
//! loop reduces it over ranks (so every rank stops after the same step), writes a checkpoint and
//! exits 0 — what a preempted SLURM job (SIGTERM, then SIGKILL after a grace period) needs. A
//! second signal kills the process the default way.
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
    // SAFETY: signal(2) is async-signal-safe; the next signal of this kind ends the process.
    unsafe { libc::signal(signal, libc::SIG_DFL) };
}

/// Routes SIGINT and SIGTERM to the stop flag.
pub fn install() {
    // SAFETY: the handler only touches an atomic and calls signal(2).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether this process received SIGINT or SIGTERM since `install`.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
