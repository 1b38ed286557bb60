//! Framing of an incoming byte stream: bytes arrive in chunks of any size (a header may be
//! split across reads), messages come out whole, split by `msg_size`. Things received beside
//! the bytes (SCM_RIGHTS fds in the client) are tied to the message they came with.
//!
//! No I/O: the transport reads into [`Framer::space`] and reports with [`Framer::filled`].
//! Everything here is driven by what a peer sent, so it is fuzzed (`fuzz/`).

use crate::{Header, MessageType, ProtoError, HEADER_SIZE};
use std::collections::VecDeque;

/// What the Vec of a kept body larger than one read holds room for when its header arrives
/// (bodies that fit one read get room for all of it): the rest is reserved when it is read
/// into the Vec, and never when it goes to other memory.
pub const BODY_FIRST: usize = 4096;

/// A whole message. `tag` is what the classifier decided from its header.
#[derive(Debug)]
pub struct Frame<D, A> {
    pub header: Header,
    pub tag: D,
    /// The body, or empty when the classifier chose not to keep it.
    pub payload: Vec<u8>,
    /// What arrived with the message's bytes (fds), in arrival order.
    pub attachments: Vec<A>,
}

struct InProgress<D> {
    header: Header,
    tag: D,
    /// Absolute stream offsets of the message: [start, end).
    start: u64,
    end: u64,
    keep: bool,
    body: Vec<u8>,
    remaining: usize,
}

/// Splits a byte stream into messages.
pub struct Framer<D, A> {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Absolute stream offset of `buf[start]`.
    pos: u64,
    max_message: usize,
    /// Attachments, each tagged with the stream offset of the last byte of the read that
    /// brought it. The kernel ends a read right after the segment that carried fds, and a
    /// sender attaches fds to the first segment of a message, so that byte lies in the
    /// message the fds belong to.
    attachments: VecDeque<(u64, A)>,
    cur: Option<InProgress<D>>,
}

impl<D: Copy, A> Framer<D, A> {
    /// A framer reading up to `chunk` bytes at a time that refuses any frame claiming more
    /// than `max_message` bytes.
    pub fn new(chunk: usize, max_message: usize) -> Self {
        Framer {
            buf: vec![0; chunk.max(HEADER_SIZE)],
            start: 0,
            end: 0,
            pos: 0,
            max_message,
            attachments: VecDeque::new(),
            cur: None,
        }
    }

    /// The free space to read into (never empty: unconsumed bytes are moved to the front).
    pub fn space(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`Framer::space`], with `attachments`.
    pub fn filled(&mut self, n: usize, attachments: impl IntoIterator<Item = A>) {
        let n = n.min(self.buf.len() - self.end);
        if n == 0 {
            // Nothing to tie them to: dropped (fds are closed by that).
            return;
        }
        let last = self.pos + (self.end - self.start + n - 1) as u64;
        self.attachments
            .extend(attachments.into_iter().map(|a| (last, a)));
        self.end += n;
    }

    /// The body of the message being received, when the rest of it may be read straight
    /// into it: it is kept, at least `min` of its bytes are still to come, and nothing else is
    /// buffered. The transport reads at most the returned count into the Vec's spare
    /// capacity (reserved in full here) and reports it with [`Framer::filled_body`]: a large
    /// body then crosses memory once, not through the read buffer and again into the body.
    pub fn direct_body(&mut self, min: usize) -> Option<(&mut Vec<u8>, usize)> {
        let (body, remaining) = self.receiving_body(min)?;
        body.reserve_exact(remaining);
        Some((body, remaining))
    }

    /// [`Framer::direct_body`] without reserving the rest: for a transport that puts most of
    /// the body elsewhere and appends to the Vec no more than its spare capacity, which is
    /// room for at least the body's first [`BODY_FIRST`] bytes (all of it if smaller).
    pub fn receiving_body(&mut self, min: usize) -> Option<(&mut Vec<u8>, usize)> {
        if self.start != self.end {
            return None;
        }
        let cur = self.cur.as_mut()?;
        if !cur.keep || cur.remaining < min.max(1) {
            return None;
        }
        Some((&mut cur.body, cur.remaining))
    }

    /// Records that `n` bytes were appended to the body [`Framer::direct_body`] returned,
    /// with `attachments`.
    pub fn filled_body(&mut self, n: usize, attachments: impl IntoIterator<Item = A>) {
        let Some(cur) = self.cur.as_mut() else {
            return;
        };
        let n = n.min(cur.remaining);
        if n == 0 {
            return;
        }
        cur.remaining -= n;
        let last = self.pos + n as u64 - 1;
        self.attachments
            .extend(attachments.into_iter().map(|a| (last, a)));
        // Nothing is buffered, so the next byte to arrive is the one after these.
        self.pos += n as u64;
    }

    /// True while part of a message has been received.
    pub fn mid_message(&self) -> bool {
        self.cur.is_some() || self.start != self.end
    }

    /// Forgets everything buffered (after a fatal error), dropping attachments.
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.cur = None;
        self.attachments.clear();
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.pos += n as u64;
    }

    /// The next whole message, if the buffered bytes complete one. `classify` is called once
    /// per message, as soon as its header is complete, and decides its tag and whether its
    /// body is stored (`keep`) before any of it is. A header that breaks framing (type bits,
    /// size) is an error: nothing after it can be trusted.
    pub fn next(
        &mut self,
        classify: impl FnOnce(&Header, MessageType) -> (D, bool),
    ) -> Result<Option<Frame<D, A>>, ProtoError> {
        if self.cur.is_none() {
            if self.end - self.start < HEADER_SIZE {
                return Ok(None);
            }
            let mut raw = [0u8; HEADER_SIZE];
            raw.copy_from_slice(&self.buf[self.start..self.start + HEADER_SIZE]);
            let header = Header::decode(&raw);
            let kind = header.validate(self.max_message)?;
            let (tag, keep) = classify(&header, kind);
            let len = header.payload_len();
            self.cur = Some(InProgress {
                header,
                tag,
                start: self.pos,
                end: self.pos + u64::from(header.size),
                keep,
                // Bounded by `max_message`, and the classifier keeps only what it expects.
                // A body that fits one read is reserved whole; a larger one's rest is
                // reserved when it is read (`direct_body`), not here: it may be read into
                // other memory entirely.
                body: if keep {
                    Vec::with_capacity(if len <= self.buf.len() {
                        len
                    } else {
                        BODY_FIRST
                    })
                } else {
                    Vec::new()
                },
                remaining: len,
            });
            self.consume(HEADER_SIZE);
        }
        let Some(cur) = self.cur.as_mut() else {
            return Ok(None);
        };
        let take = cur.remaining.min(self.end - self.start);
        if cur.keep {
            cur.body
                .extend_from_slice(&self.buf[self.start..self.start + take]);
        }
        cur.remaining -= take;
        let more = cur.remaining > 0;
        self.consume(take);
        if more {
            return Ok(None);
        }
        let Some(done) = self.cur.take() else {
            return Ok(None);
        };
        let mut attachments = Vec::new();
        while self
            .attachments
            .front()
            .is_some_and(|(at, _)| *at < done.end)
        {
            if let Some((at, a)) = self.attachments.pop_front() {
                // Tagged before this message: they belong to nothing we can name and are
                // dropped here (fds closed).
                if at >= done.start {
                    attachments.push(a);
                }
            }
        }
        Ok(Some(Frame {
            header: done.header,
            tag: done.tag,
            payload: done.body,
            attachments,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Header::command(id, 4, payload.len(), false)
            .encode()
            .to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn feed(f: &mut Framer<u16, u32>, bytes: &[u8], att: Vec<u32>) {
        let space = f.space();
        space[..bytes.len()].copy_from_slice(bytes);
        f.filled(bytes.len(), att);
    }

    fn drain(f: &mut Framer<u16, u32>) -> Vec<Frame<u16, u32>> {
        let mut out = Vec::new();
        while let Some(m) = f.next(|h, _| (h.id, true)).expect("valid") {
            out.push(m);
        }
        out
    }

    #[test]
    fn split_header_is_reassembled_and_attachments_follow_their_message() {
        let mut f = Framer::<u16, u32>::new(64, 1 << 20);
        let mut stream = msg(1, b"abcd");
        stream.extend(msg(2, b"efgh"));
        feed(&mut f, &stream[..10], vec![]);
        assert!(drain(&mut f).is_empty());
        assert!(f.mid_message());
        feed(&mut f, &stream[10..20], vec![7]);
        let got = drain(&mut f);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].tag, &got[0].payload[..]), (1, &b"abcd"[..]));
        assert_eq!(got[0].attachments, vec![7]);
        feed(&mut f, &stream[20..], vec![8]);
        let got = drain(&mut f);
        assert_eq!((got[0].tag, got[0].attachments.clone()), (2, vec![8]));
        assert!(!f.mid_message());
    }

    #[test]
    fn unkept_bodies_are_not_stored_and_big_messages_cross_the_buffer() {
        let mut f = Framer::<u16, u32>::new(32, 1 << 20);
        let stream = msg(3, &[9u8; 100]);
        for chunk in stream.chunks(7) {
            feed(&mut f, chunk, vec![]);
            if let Some(m) = f.next(|_, _| (0, false)).expect("valid") {
                assert!(m.payload.is_empty());
                assert_eq!(m.header.size, 116);
            }
        }
    }

    #[test]
    fn a_bad_header_is_an_error() {
        let mut f = Framer::<u16, u32>::new(64, 1 << 20);
        let mut h = Header::command(1, 4, 0, false);
        h.size = 3;
        feed(&mut f, &h.encode(), vec![]);
        assert!(f.next(|_, _| (0, true)).is_err());
        f.reset();
        assert!(!f.mid_message());
    }

    #[test]
    fn a_large_body_is_reserved_only_when_read_into_it() {
        let mut f = Framer::<u16, u32>::new(64, 1 << 20);
        let len = 4 * BODY_FIRST;
        let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let stream = msg(1, &body);
        feed(&mut f, &stream[..HEADER_SIZE + 8], vec![]);
        assert!(drain(&mut f).is_empty());
        // Read elsewhere: the Vec holds the first bytes and room for BODY_FIRST of them.
        let (v, left) = f.receiving_body(1).expect("a body to read");
        assert_eq!((v.len(), left), (8, len - 8));
        assert!(
            v.capacity() >= BODY_FIRST && v.capacity() < len,
            "the whole body was reserved"
        );
        // Read into it: the rest is reserved, and it completes as usual.
        let (v, left) = f.direct_body(1).expect("a body to read");
        assert!(v.capacity() - v.len() >= left);
        v.extend_from_slice(&body[8..]);
        f.filled_body(left, []);
        let got = drain(&mut f);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, body);
    }
}
