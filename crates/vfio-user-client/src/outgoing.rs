//! A message not yet (fully) written to the socket.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

pub struct Outgoing {
    /// The request id, or None for a message that expects no reply (our replies to server
    /// requests, posted writes).
    pub id: Option<u16>,
    /// Our answer to a server request: it goes ahead of our own requests that have not
    /// started, since a server may take the next message it reads as that answer (and must
    /// never wait behind our queue for it).
    pub reply: bool,
    pub seq: u64,
    /// The header, and the payload when it was copied.
    pub bytes: Vec<u8>,
    /// A payload handed over whole (never copied), written after `bytes`.
    pub body: Vec<u8>,
    pub written: usize,
    /// Our own duplicates of the caller's fds; they travel with the first chunk only and are
    /// closed once sent or when the message is dropped.
    pub fds: Vec<OwnedFd>,
    /// A REGION_WRITE_MULTI we made from posted writes: more may join it until it is written.
    pub merge: bool,
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
        Outgoing::cost_of(
            self.bytes.capacity() + self.body.capacity(),
            self.fds.capacity(),
        )
    }

    fn len(&self) -> usize {
        self.bytes.len() + self.body.len()
    }

    /// The bytes not yet written, in up to two parts (empty ones included).
    pub fn remaining(&self) -> [&[u8]; 2] {
        match self.written.checked_sub(self.bytes.len()) {
            None => [&self.bytes[self.written..], &self.body],
            Some(into_body) => [&[], &self.body[into_body.min(self.body.len())..]],
        }
    }

    fn remaining_len(&self) -> usize {
        self.len().saturating_sub(self.written)
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
        self.written >= self.len()
    }
}

/// Messages waiting to be written, in two lines: our replies to server requests, which go
/// first, and our own requests, in submission order. A message partly written is always
/// finished before any other starts (the stream would be corrupt otherwise). Tracks what the
/// queued entries cost in memory.
#[derive(Default)]
pub struct Queue {
    replies: VecDeque<Outgoing>,
    requests: VecDeque<Outgoing>,
    /// Sum of [`Outgoing::cost`] of everything queued.
    cost: usize,
}

impl Queue {
    pub fn len(&self) -> usize {
        self.replies.len() + self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory held by queued messages (see [`Outgoing::cost`]).
    pub fn cost(&self) -> usize {
        self.cost
    }

    pub fn push(&mut self, msg: Outgoing) {
        self.cost += msg.cost();
        if msg.reply {
            self.replies.push_back(msg);
        } else {
            self.requests.push_back(msg);
        }
    }

    /// The line the next bytes come from: whichever message is partly written, else replies.
    fn line(&mut self) -> &mut VecDeque<Outgoing> {
        let request_started = self.requests.front().is_some_and(|m| m.written > 0);
        if request_started || self.replies.is_empty() {
            &mut self.requests
        } else {
            &mut self.replies
        }
    }

    /// The message to write next.
    pub fn next(&mut self) -> Option<&mut Outgoing> {
        self.line().front_mut()
    }

    /// Every queued message in the order [`Queue::next`] hands them out.
    fn in_order(&self) -> impl Iterator<Item = &Outgoing> {
        let started = self.requests.front().filter(|m| m.written > 0);
        let behind = self.requests.iter().skip(usize::from(started.is_some()));
        started.into_iter().chain(&self.replies).chain(behind)
    }

    /// What one gathered sendmsg should carry: the next message's unwritten bytes and the
    /// fds that go with them, then whole messages behind it in write order, up to `max`
    /// messages (each one or two slices). A message with fds is written alone: its fds must
    /// arrive with its own bytes.
    pub fn gather(&self, max: usize) -> (Vec<IoSlice<'_>>, Vec<RawFd>) {
        let mut iov = Vec::new();
        let mut fds = Vec::new();
        for m in self.in_order().take(max) {
            if iov.is_empty() {
                fds = m.raw_fds();
            } else if !fds.is_empty() || !m.fds.is_empty() {
                break;
            }
            iov.extend(
                m.remaining()
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(IoSlice::new),
            );
        }
        (iov, fds)
    }

    /// Records that `n` bytes of a [`Queue::gather`] went out; `done` sees each message
    /// that is now completely written, as it leaves the queue.
    pub fn wrote(&mut self, mut n: usize, mut done: impl FnMut(&Outgoing)) {
        while n > 0 {
            let Some(front) = self.next() else {
                return;
            };
            let take = n.min(front.remaining_len());
            n -= take;
            if !front.advance(take) {
                return;
            }
            if let Some(m) = self.pop_next() {
                done(&m);
            }
        }
    }

    /// Removes the message [`Queue::next`] returned, once it is completely written.
    pub fn pop_next(&mut self) -> Option<Outgoing> {
        let msg = self.line().pop_front()?;
        self.refund(&msg);
        Some(msg)
    }

    /// Lets `join` add to the last of our requests if it is a message writes may still join
    /// (see [`Outgoing::merge`]) and none of it is written; the queue's cost follows what
    /// `join` did. False when there is no such message or `join` declined.
    pub fn join_last(&mut self, join: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        let Some(last) = self.requests.back_mut() else {
            return false;
        };
        if !last.merge || last.written > 0 {
            return false;
        }
        let before = last.cost();
        let joined = join(&mut last.bytes);
        self.cost = self.cost - before + last.cost();
        joined
    }

    /// Our request `id` (with `seq`) if it is still queued: None if it is not.
    pub fn request_mut(&mut self, id: u16, seq: u64) -> Option<&mut Outgoing> {
        self.requests
            .iter_mut()
            .find(|o| o.id == Some(id) && o.seq == seq)
    }

    /// Drops our request `id` (with `seq`) if none of it has been written.
    pub fn remove_unstarted(&mut self, id: u16, seq: u64) {
        let pos = self
            .requests
            .iter()
            .position(|o| o.id == Some(id) && o.seq == seq && o.written == 0);
        if let Some(msg) = pos.and_then(|p| self.requests.remove(p)) {
            self.refund(&msg);
        }
    }

    fn refund(&mut self, msg: &Outgoing) {
        self.cost = self.cost.saturating_sub(msg.cost());
        // A line that grew under a burst gives its memory back once it is empty.
        for line in [&mut self.replies, &mut self.requests] {
            if line.is_empty() && line.capacity() > 64 {
                line.shrink_to(16);
            }
        }
    }

    /// Drops everything queued (the connection ended); fds are closed with their messages.
    pub fn clear(&mut self) {
        *self = Queue::default();
    }
}
