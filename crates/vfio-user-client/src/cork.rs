//! Corking: while a [`Cork`] is held, requests that nobody waits for on the spot are queued
//! instead of written one sendmsg each, and releasing it writes them together (gathered).
//! An event loop holds one while it hands a batch of replies to its callbacks, which send
//! the next requests at once: 64 requests then cost one syscall, not 64.

use crate::shared::Shared;
use crate::state::Sent;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};

/// Held while sends are corked; dropping it writes what was queued meanwhile. It does not
/// keep the connection alive: a client released while corked lets go of its socket at once.
pub struct Cork {
    shared: Weak<Shared>,
}

impl Cork {
    pub(crate) fn new(shared: &Arc<Shared>) -> Cork {
        shared.lock().corks += 1;
        Cork {
            shared: Arc::downgrade(shared),
        }
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let result = {
            let mut st = shared.lock();
            st.corks -= 1;
            // With the socket full the I/O thread is already waiting to write the queue.
            if st.corks > 0 || st.outgoing.is_empty() || st.want_write || st.closed.is_some() {
                return;
            }
            st.flush(shared.sock.as_raw_fd()).map(|()| {
                if st.want_write {
                    Sent::Queued
                } else {
                    Sent::Done
                }
            })
        };
        match result {
            Ok(Sent::Done) => {}
            // The socket filled up: the I/O thread finishes when it is writable.
            Ok(_) => shared.wake_io(),
            Err(e) => shared.fail(e),
        }
    }
}
