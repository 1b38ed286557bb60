//! Reading a reply's data straight into the caller's memory (a JavaScript Buffer), so a large
//! region read crosses memory once, from the kernel into the memory the caller keeps, with
//! nothing allocated per read and nothing for a garbage collector to sweep.
//!
//! The memory is not ours: the caller promises it stays valid until the request settles.
//! Every path that settles a request while its body may still be arriving (a timeout, a
//! failure, the connection's end) first revokes its target, under the lock each write into the
//! memory holds, so no byte lands there once the caller has been told.

use crate::fault_safe;
use crate::socket::Received;
use nix::errno::Errno;
use std::sync::{Arc, Mutex, MutexGuard};

/// Memory a region read lands in: `len` bytes at `ptr`, owned by the caller.
#[derive(Clone, Copy, Debug)]
pub struct ReadInto {
    ptr: *mut u8,
    len: usize,
    /// The memory's file may shrink under it (see [`ReadInto::shrinkable`]).
    guarded: bool,
}

// SAFETY: a ReadInto is an address and a length; the memory behind it is only written under a
// ReadTarget's lock, from whichever thread reads, as `ReadInto::new`'s contract allows.
unsafe impl Send for ReadInto {}

impl ReadInto {
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes, from any thread, until the read it is
    /// given to has settled: its completion has been called (or, for a blocking read, the call
    /// has returned). Nothing else may free or move the memory before that.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> ReadInto {
        ReadInto {
            ptr,
            len,
            guarded: false,
        }
    }

    /// The same memory, marked as a mapping of a file another process may shrink: it is then
    /// written only through the kernel (a read into it fails with EFAULT where a plain copy
    /// would kill the process with SIGBUS).
    pub fn shrinkable(self, shrinkable: bool) -> ReadInto {
        ReadInto {
            guarded: shrinkable,
            ..self
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` bytes at `at`, within this memory.
    pub(crate) fn slice(&self, at: usize, len: usize) -> Option<ReadInto> {
        let end = at.checked_add(len)?;
        (end <= self.len).then(|| ReadInto {
            // `at` is within the caller's allocation (checked just above).
            ptr: self.ptr.wrapping_add(at),
            len,
            guarded: self.guarded,
        })
    }
}

/// The target of one request: where its reply's data goes, from the byte after a `prefix` of
/// the payload (the access header a REGION_READ reply echoes first), which stays in the
/// reply's own buffer with whatever arrived beside the header.
pub struct ReadTarget {
    into: ReadInto,
    prefix: usize,
    state: Mutex<TargetState>,
}

// SAFETY: the memory behind `into` is written only under `state`'s lock, and only while
// `live` (ReadInto::new's contract keeps it valid until then); the rest is plain data.
unsafe impl Sync for ReadTarget {}

struct TargetState {
    /// False once the request settled another way: the memory may be gone.
    live: bool,
    /// Data bytes written straight into the memory; they follow those left in the reply.
    direct: usize,
}

impl ReadTarget {
    pub(crate) fn new(into: ReadInto, prefix: usize) -> ReadTarget {
        ReadTarget {
            into,
            prefix,
            state: Mutex::new(TargetState {
                live: true,
                direct: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TargetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The payload size of the reply whose data fits exactly.
    pub(crate) fn payload_len(&self) -> usize {
        self.prefix + self.into.len
    }

    pub(crate) fn prefix(&self) -> usize {
        self.prefix
    }

    /// After this returns, nothing is written into the memory again.
    pub(crate) fn revoke(&self) {
        self.lock().live = false;
    }

    /// Bytes written straight into the memory so far.
    pub(crate) fn direct(&self) -> usize {
        self.lock().direct
    }

    /// Runs `recv` on the memory still to fill after `kept` data bytes that stayed in the
    /// reply's buffer (at most `max` bytes of it), holding the lock, and counts what it
    /// wrote. None when revoked: the caller reads the bytes somewhere else.
    pub(crate) fn receive(
        &self,
        kept: usize,
        max: usize,
        recv: impl FnOnce(*mut u8, usize) -> nix::Result<Received>,
    ) -> Option<Result<Received, Errno>> {
        let mut st = self.lock();
        if !st.live {
            return None;
        }
        let at = kept + st.direct;
        let room = self.into.len.saturating_sub(at).min(max);
        if room == 0 {
            return None;
        }
        // `at + room` stays within the memory (room is what is left of it).
        let r = recv(self.into.ptr.wrapping_add(at), room);
        if let Ok(got) = &r {
            st.direct += got.bytes.min(room);
        }
        Some(r)
    }

    /// Copies the data bytes that arrived in the reply's own buffer to the front of the
    /// memory: Revoked when the request settled another way (nothing copied), Fault when the
    /// memory's file shrank under it.
    pub(crate) fn fill_front(&self, data: &[u8]) -> Result<(), Unfilled> {
        let st = self.lock();
        if !st.live || data.len() > self.into.len {
            return Err(Unfilled::Revoked);
        }
        // SAFETY: live, so the memory is valid (ReadInto::new's contract); `data` fits it
        // (checked above) and is our own buffer, so the two cannot overlap; memory that may
        // shrink is copied through the kernel.
        unsafe { fault_safe::copy_if(self.into.guarded, self.into.ptr, data.as_ptr(), data.len()) }
            .map_err(|_| Unfilled::Fault)
    }
}

/// Why [`ReadTarget::fill_front`] copied nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unfilled {
    Revoked,
    Fault,
}

/// Stops a read into memory before it settles (an abort): once [`ReadCancel::cancel`] returns,
/// nothing is written into the memory again, each piece's target revoked under the lock every
/// write holds. The read still settles through its completion as its replies arrive (read
/// into their own buffers, then dropped) or fail, so the stream stays in step.
#[derive(Clone, Default)]
pub struct ReadCancel(Arc<Mutex<Cancel>>);

#[derive(Default)]
struct Cancel {
    cancelled: bool,
    targets: Vec<Arc<ReadTarget>>,
}

impl ReadCancel {
    fn lock(&self) -> MutexGuard<'_, Cancel> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After this returns, the read writes nothing more into its memory. Idempotent.
    pub fn cancel(&self) {
        let mut c = self.lock();
        c.cancelled = true;
        for t in c.targets.drain(..) {
            t.revoke();
        }
    }

    /// Puts `target` under this cancel (revoked at once if it was already cancelled).
    pub(crate) fn watch(&self, target: &Arc<ReadTarget>) {
        let mut c = self.lock();
        if c.cancelled {
            target.revoke();
        } else {
            c.targets.push(target.clone());
        }
    }
}
