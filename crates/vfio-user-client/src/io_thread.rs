//! The I/O thread: waits (epoll) on the socket and a wake eventfd, receives and dispatches,
//! finishes queued writes, enforces deadlines. It never waits on a caller.

use crate::reader::CALLER_GRACE;
use crate::receive::receive;
use crate::shared::{Shared, WAKE_TOKEN};
use crate::state::Fired;
use crate::Error;
use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags, EpollTimeout};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long data may wait for an external reader before the I/O thread reads it itself.
const BACKUP_GRACE: Duration = Duration::from_millis(10);

pub fn run(shared: Arc<Shared>) {
    let sock = shared.sock.as_raw_fd();
    let heartbeat = (shared.default_timeout() / 2).max(Duration::from_millis(1));
    let mut events = [EpollEvent::empty(); 32];
    loop {
        backup_read(&shared, sock);
        let mut fired = Fired::default();
        let (wake_at, closed) = {
            let mut st = shared.lock();
            let now = Instant::now();
            let next = st.expire(now, &mut fired);
            st.compact_deadlines();
            // With nothing pending, still wake now and then, so that a new request's
            // deadline (at least `heartbeat` away in the common case) needs no wakeup.
            let mut wake_at = next.unwrap_or(now + heartbeat);
            st.io_wake_at = Some(wake_at);
            if let Some(check) = st.backup_check_at {
                wake_at = wake_at.min(check);
            }
            shared.sync_interest(&mut st);
            (wake_at, st.closed.is_some())
        };
        fired.fire();
        if closed {
            break;
        }
        // Round up so we never wake a hair early and spin.
        let left = wake_at.saturating_duration_since(Instant::now());
        let timeout =
            EpollTimeout::try_from(left.as_micros().div_ceil(1000)).unwrap_or(EpollTimeout::MAX);
        let n = match shared.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => {
                shared.fail(Error::new(
                    Errno::ECONNRESET,
                    format!("waiting on the socket failed: {}", e.desc()),
                ));
                break;
            }
        };
        for ev in &events[..n] {
            if ev.data() == WAKE_TOKEN {
                let _ = shared.wake.read();
                continue;
            }
            if shared.deliver_irq(ev.data()) {
                continue;
            }
            let flags = ev.events();
            let (external, caller) = {
                let mut st = shared.lock();
                // The one-shot registration is disarmed by the kernel once it fires.
                st.armed = u32::MAX;
                (st.external_reader, st.caller_reading)
            };
            if flags.contains(EpollFlags::EPOLLOUT) {
                let result = shared.lock().flush(sock);
                if let Err(e) = result {
                    shared.fail(e);
                    continue;
                }
            }
            let readable = EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
            if !flags.intersects(readable) {
                continue;
            }
            // Read, unless a caller or the event loop is the reader: then come back after a
            // grace period in case it stops short (the one-shot will not wake us meanwhile).
            let read = !external
                && !caller
                && match shared.rx_try_lock() {
                    Some(mut rx) => {
                        if let Err(e) = receive(&shared, &mut rx, sock) {
                            shared.fail(e);
                        }
                        true
                    }
                    None => false,
                };
            if !read {
                let mut st = shared.lock();
                let now = Instant::now();
                let hangup = flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
                // A reader handing back the role, or a hangup the event loop should see:
                // look again right away. Otherwise give the reader its grace period.
                let someone_reads = external || st.caller_reading;
                let now_please = !st.caller_reading && (hangup || !someone_reads);
                let at = if now_please { now } else { now + BACKUP_GRACE };
                if st.backup_check_at.is_none_or(|t| at < t) {
                    st.backup_check_at = Some(at);
                }
            }
        }
    }
    shared.notify_closed();
}

/// Reads whatever another reader (a caller, an event loop) left waiting past the grace period;
/// while blocking calls still follow one another, only looks again later.
fn backup_read(shared: &Shared, sock: i32) {
    let due = {
        let mut st = shared.lock();
        let now = Instant::now();
        match st.backup_check_at {
            Some(t) if t <= now => {
                // A caller reading now serves whatever arrives itself: look again after the
                // longer grace. One that read a moment ago may be about to call again.
                let next = if st.external_reader {
                    None
                } else if st.caller_reading {
                    Some(now + BACKUP_GRACE)
                } else {
                    st.caller_read_at
                        .map(|r| r + CALLER_GRACE)
                        .filter(|&at| now < at)
                };
                st.backup_check_at = next;
                next.is_none()
            }
            _ => false,
        }
    };
    if !due {
        return;
    }
    // Busy means someone is reading right now: nothing to back up.
    if let Some(mut rx) = shared.rx_try_lock() {
        match receive(shared, &mut rx, sock) {
            Ok(true) => shared.lock().stats.backup_reads += 1,
            Ok(false) => {}
            Err(e) => shared.fail(e),
        }
    }
}
