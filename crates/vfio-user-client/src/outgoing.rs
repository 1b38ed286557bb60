//! A message not yet (fully) written to the socket.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

pub struct Outgoing {
    /// The request id, or None for a message that expects no reply (our replies to server
    /// requests, posted writes).
    pub id: Option<u16>,
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub written: usize,
    /// Our own duplicates of the caller's fds; they travel with the first chunk only and are
    /// closed once sent or when the message is dropped.
    pub fds: Vec<OwnedFd>,
}

/// Allocator bookkeeping per heap block, counted so a flood of tiny messages costs what it
/// really holds.
const MALLOC_OVERHEAD: usize = 16;

impl Outgoing {
    /// Memory one queued message holds: its queue slot (counted twice, since a queue's
    /// buffer may be up to twice its length), its bytes' heap block and its fds. Bounding
    /// the sum of these, not the bytes on the wire, bounds the memory a server that never
    /// reads can make us hold.
    pub fn cost_of(bytes: usize, fds: usize) -> usize {
        2 * std::mem::size_of::<Outgoing>()
            + bytes.next_multiple_of(16)
            + MALLOC_OVERHEAD
            + fds * std::mem::size_of::<OwnedFd>()
    }

    pub fn cost(&self) -> usize {
        Outgoing::cost_of(self.bytes.capacity(), self.fds.capacity())
    }

    pub fn remaining(&self) -> &[u8] {
        &self.bytes[self.written..]
    }

    pub fn raw_fds(&self) -> Vec<RawFd> {
        if self.written == 0 {
            self.fds.iter().map(|f| f.as_raw_fd()).collect()
        } else {
            Vec::new()
        }
    }

    /// Records that `n` more bytes went out; returns true when the message is complete.
    pub fn advance(&mut self, n: usize) -> bool {
        if n > 0 {
            // The fds went with the first chunk; our duplicates are no longer needed.
            self.fds.clear();
        }
        self.written += n;
        self.written >= self.bytes.len()
    }
}
