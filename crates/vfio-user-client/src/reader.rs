//! Reading on a thread other than the I/O thread: a caller waiting for its own reply
//! ([`ReaderGuard`], no thread hop), or an event loop ([`ExternalReader`]).

use crate::cork::Cork;
use crate::pending::Slot;
use crate::receive::{read_once, read_once_waiting, receive};
use crate::rx::Rx;
use crate::shared::Shared;
use crate::Error;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

/// Lets an event loop (Node's, through the binding) read the socket on its own thread when it
/// is readable, so replies reach promise callbacks without a hop through the I/O thread.
pub struct ExternalReader {
    pub(crate) shared: Arc<Shared>,
}

impl ExternalReader {
    /// The socket, to watch for readability. Borrowed: never close it.
    pub fn fd(&self) -> RawFd {
        self.shared.sock.as_raw_fd()
    }

    /// Call once the event loop watches [`ExternalReader::fd`]: undoes what some loops do to
    /// a watched fd (libuv's `uv_poll_init` sets O_NONBLOCK), which would make a caller's
    /// blocking wait for its reply return at once and fall back to poll plus recvmsg. The
    /// client's own nonblocking calls say MSG_DONTWAIT, so they need no flag. Should this
    /// fail, waits only cost that extra syscall.
    pub fn watched(&self) {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let sock = &self.shared.sock;
        if let Ok(flags) = fcntl(sock, FcntlArg::F_GETFL) {
            let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
            let _ = fcntl(sock, FcntlArg::F_SETFL(flags));
        }
    }

    /// Corks sends (see [`Cork`]) while the loop hands what it read to its callbacks.
    pub fn cork(&self) -> Cork {
        Cork::new(&self.shared)
    }

    /// Reads and dispatches what is available. Returns false once the connection has ended
    /// (stop watching).
    pub fn on_readable(&self) -> bool {
        if let Some(mut rx) = self.shared.rx_try_lock() {
            if let Err(e) = receive(&self.shared, &mut rx, self.fd()) {
                self.shared.fail(e);
            }
        }
        self.shared.lock().closed.is_none()
    }
}

impl Drop for ExternalReader {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.external_reader = false;
        st.backup_check_at = None;
        drop(st);
        self.shared.wake_io();
    }
}

/// How late past its deadline a blocking read may wake (see [`ReaderGuard::read_until`]).
const BLOCKING_SLACK: Duration = Duration::from_millis(1);

/// With no event loop, how long after a blocking call the I/O thread stays off the read side,
/// expecting the next call: calls back to back then cost no epoll_ctl each (the I/O thread is
/// disarmed once per burst). It looks whether the burst is over every 10 ms while a caller
/// reads (that caller serves whatever arrives) and CALLER_GRACE after the last one stopped;
/// so a server request arriving after a burst waits for it about 10 ms at worst.
pub const CALLER_GRACE: Duration = Duration::from_millis(1);

/// The receive side held by a waiting caller; hands it back to the I/O thread on drop.
pub struct ReaderGuard<'a> {
    shared: &'a Shared,
    rx: MutexGuard<'a, Rx>,
}

impl<'a> ReaderGuard<'a> {
    /// Makes the calling thread the reader if nobody is reading right now.
    pub fn take(shared: &'a Shared) -> Option<ReaderGuard<'a>> {
        let rx = shared.rx_try_lock()?;
        let mut st = shared.lock();
        if st.closed.is_some() || st.caller_reading {
            return None;
        }
        st.caller_reading = true;
        let first_of_burst = !st.external_reader && st.backup_check_at.is_none();
        if first_of_burst {
            st.backup_check_at = Some(Instant::now() + CALLER_GRACE);
        }
        shared.sync_interest(&mut st);
        drop(st);
        if first_of_burst {
            // The I/O thread may sleep long; it must look again when the burst may be over.
            shared.wake_io();
        }
        Some(ReaderGuard { shared, rx })
    }
}

impl ReaderGuard<'_> {
    /// Reads and dispatches until `slot` is filled, `deadline` passes or the connection ends.
    /// `timeout` is the request's whole timeout: while almost all of it is left (the request
    /// was sent less than [`BLOCKING_SLACK`] ago), waits happen inside a blocking recvmsg
    /// bounded by it, which overshoots the deadline by less than [`BLOCKING_SLACK`]; after
    /// that, poll with the exact time left.
    pub fn read_until(&mut self, slot: &Slot, deadline: Instant, timeout: Duration) {
        let sock = self.shared.sock.as_fd();
        while !slot.is_filled() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            if timeout.saturating_sub(left) < BLOCKING_SLACK {
                // The timeout is the same from call to call, so the socket's SO_RCVTIMEO
                // is set once, not per request.
                let r =
                    read_once_waiting(self.shared, &mut self.rx, sock.as_raw_fd(), Some(timeout));
                if let Err(e) = r {
                    self.shared.fail(e);
                    return;
                }
                continue;
            }
            let timeout =
                PollTimeout::try_from(left.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    self.shared.fail(Error::new(
                        Errno::ECONNRESET,
                        format!("waiting on the socket failed: {}", e.desc()),
                    ));
                    return;
                }
            }
            if let Err(e) = read_once(self.shared, &mut self.rx, sock.as_raw_fd()) {
                self.shared.fail(e);
                return;
            }
        }
    }
}

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.caller_reading = false;
        if !st.external_reader {
            if st.pending.is_empty() {
                // Nobody else waits for a reply: stay off the read side, for the next call.
                st.caller_read_at = Some(Instant::now());
            } else {
                // Other requests wait: the I/O thread reads for them from now on.
                st.backup_check_at = None;
            }
        }
        self.shared.sync_interest(&mut st);
    }
}
