//! A request waiting for its reply, and the ways a reply reaches whoever waits for it.

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
    result: Mutex<Option<Result<Reply, Error>>>,
    ready: Condvar,
}

impl Slot {
    pub fn fill(&self, r: Result<Reply, Error>) {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(r);
        self.ready.notify_all();
    }

    /// Waits until filled or `deadline`; `None` means the deadline passed first.
    pub fn wait_until(&self, deadline: Instant) -> Option<Result<Reply, Error>> {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.take() {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .ready
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits with no deadline; used once the request is known to be completed or failed.
    pub fn wait(&self) -> Result<Reply, Error> {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = self.ready.wait(g).unwrap_or_else(|p| p.into_inner());
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
            Waiter::Callback(f) => f(r),
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
}
