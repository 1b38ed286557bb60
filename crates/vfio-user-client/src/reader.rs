//! Reading on a thread other than the I/O thread: a caller waiting for its own reply
//! ([`ReaderGuard`], no thread hop), or an event loop ([`ExternalReader`]).

use crate::pending::Slot;
use crate::receive::{read_once, receive};
use crate::rx::Rx;
use crate::shared::Shared;
use crate::Error;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

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
        shared.sync_interest(&mut st);
        drop(st);
        Some(ReaderGuard { shared, rx })
    }
}

impl ReaderGuard<'_> {
    /// Reads and dispatches until `slot` is filled, `deadline` passes or the connection ends.
    pub fn read_until(&mut self, slot: &Slot, deadline: Instant) {
        let sock = self.shared.sock.as_fd();
        while !slot.is_filled() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
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
            // The I/O thread was told to wait for us; we are done, so it may read (and be
            // woken) at once rather than after the grace period.
            st.backup_check_at = None;
        }
        self.shared.sync_interest(&mut st);
    }
}
