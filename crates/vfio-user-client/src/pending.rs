//! A request waiting for its reply, and the ways a reply reaches whoever waits for it.

use crate::target::ReadTarget;
use crate::Error;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use vfio_user_proto::Header;

/// A successful reply: its header, payload and any fds it carried (now the caller's).
#[derive(Debug)]
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Called exactly once, on the I/O thread or the thread that failed the request.
/// It must not block: the I/O thread never waits on its callers.
pub type Completion = Box<dyn FnOnce(Result<Reply, Error>) + Send>;

/// Where a blocking or later-collected request's result lands.
#[derive(Default)]
pub struct Slot {
    inner: Mutex<SlotInner>,
    ready: Condvar,
}

#[derive(Default)]
struct SlotInner {
    result: Option<Result<Reply, Error>>,
    /// A thread sleeps on `ready`. When the waiter read its own reply (the fast path) nobody
    /// sleeps, and filling the slot costs no futex wake.
    sleeping: bool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn fill(&self, r: Result<Reply, Error>) {
        let mut g = self.lock();
        g.result = Some(r);
        if g.sleeping {
            self.ready.notify_all();
        }
    }

    /// Takes the result if it is there already.
    pub fn try_take(&self) -> Option<Result<Reply, Error>> {
        self.lock().result.take()
    }

    pub fn is_filled(&self) -> bool {
        self.lock().result.is_some()
    }

    /// Waits until filled or `deadline` (`None`: wait for ever); `None` means the deadline
    /// passed first.
    pub fn wait_until(&self, deadline: Option<Instant>) -> Option<Result<Reply, Error>> {
        let mut g = self.lock();
        loop {
            if let Some(r) = g.result.take() {
                return Some(r);
            }
            g.sleeping = true;
            g = match deadline {
                None => self.ready.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        g.sleeping = false;
                        return None;
                    }
                    self.ready
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            g.sleeping = false;
        }
    }

    /// Waits with no deadline; used once the request is known to be completed or failed.
    pub fn wait(&self) -> Result<Reply, Error> {
        loop {
            if let Some(r) = self.wait_until(None) {
                return r;
            }
        }
    }
}

pub enum Waiter {
    Slot(Arc<Slot>),
    Callback(Completion),
}

impl Waiter {
    pub fn complete(self, r: Result<Reply, Error>) {
        match self {
            Waiter::Slot(s) => s.fill(r),
            // A panicking callback must not take the reader (often the I/O thread) down.
            Waiter::Callback(f) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(r)));
            }
        }
    }
}

/// A request in the pending table, from submission until its reply, failure or timeout.
pub struct Pending {
    /// Distinguishes this request from an earlier one that used the same id.
    pub seq: u64,
    pub command: u16,
    pub deadline: Instant,
    pub waiter: Waiter,
    /// Fully written: only then may a reply match it.
    pub sent: bool,
    /// Largest acceptable reply message and how many fds it may carry.
    pub reply_limit: usize,
    pub fd_limit: usize,
    /// Memory the reply's data is received into, when the caller gave some.
    pub target: Option<Arc<ReadTarget>>,
}

impl Pending {
    /// The request settles now, perhaps while its reply is arriving: no more of it may land
    /// in the caller's memory.
    pub fn revoke_target(&self) {
        if let Some(t) = &self.target {
            t.revoke();
        }
    }
}
