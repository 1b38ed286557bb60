//! This process's CPU time so far, for the benchmark binaries' per-request figures.

use nix::sys::resource::{getrusage, UsageWho};

/// User and system CPU microseconds this process has used (zeros if getrusage fails).
pub fn cpu_us() -> (f64, f64) {
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(r) => (us(r.user_time()), us(r.system_time())),
        Err(_) => (0.0, 0.0),
    }
}
