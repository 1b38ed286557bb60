//! Framing of the incoming byte stream (I/O thread only): reads in large chunks, splits them
//! into messages by `msg_size` (a header split across reads is simply reassembled), and ties
//! received fds to the message they came with.

use crate::socket::{cmsg_buffer, recv_chunk};
use crate::Error;
use nix::errno::Errno;
use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};
use vfio_user_proto::{Header, MessageType, HEADER_SIZE, MAX_INCOMING_MESSAGE};

const READ_BUFFER: usize = 64 * 1024;

/// What to do with the message being received, decided from its header before any of its
/// body is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The reply to pending request `seq`; its body is stored when `keep`.
    Reply { seq: u64, keep: bool },
    /// A request from the server; `keep` is false when it is too big to store.
    Request { keep: bool },
    /// Read and discard (late, unexpected or rejected reply).
    Drop,
}

/// A whole message, ready to dispatch.
pub struct Message {
    pub header: Header,
    pub disposition: Disposition,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

struct InProgress {
    header: Header,
    disposition: Disposition,
    /// Absolute stream offsets of the message.
    start: u64,
    end: u64,
    keep: bool,
    body: Vec<u8>,
    remaining: usize,
}

pub enum ReadOutcome {
    /// Bytes arrived; `drained` is true when the read did not fill the buffer, so the socket
    /// is most likely empty and polling again is cheaper than another read.
    Data {
        drained: bool,
    },
    WouldBlock,
    Eof,
}

pub struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Absolute stream offset of `buf[start]`.
    pos: u64,
    cmsg: Vec<u8>,
    /// Received fds, each tagged with the stream offset of the last byte of the read that
    /// brought it. The kernel ends a read right after the segment that carried fds, and a
    /// sender attaches fds to the first segment of a message, so that byte lies in the
    /// message the fds belong to.
    fds: VecDeque<(u64, OwnedFd)>,
    cur: Option<InProgress>,
}

impl Default for Rx {
    fn default() -> Self {
        Rx {
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            pos: 0,
            cmsg: cmsg_buffer(),
            fds: VecDeque::new(),
            cur: None,
        }
    }
}

impl Rx {
    pub fn read(&mut self, sock: RawFd) -> Result<ReadOutcome, Error> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let space = self.buf.len() - self.end;
        match recv_chunk(sock, &mut self.buf[self.end..], &mut self.cmsg) {
            Ok(r) if r.bytes == 0 => {
                drop(r.fds);
                Ok(ReadOutcome::Eof)
            }
            Ok(r) => {
                let last = self.pos + (self.end - self.start + r.bytes - 1) as u64;
                self.fds.extend(r.fds.into_iter().map(|f| (last, f)));
                self.end += r.bytes;
                Ok(ReadOutcome::Data {
                    drained: r.bytes < space,
                })
            }
            Err(Errno::EAGAIN) => Ok(ReadOutcome::WouldBlock),
            Err(e) => Err(Error::new(
                Errno::ECONNRESET,
                format!("connection lost while receiving: {}", e.desc()),
            )),
        }
    }

    /// Forgets everything buffered after a fatal error, closing fds nobody will take.
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.cur = None;
        self.fds.clear();
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.pos += n as u64;
    }

    /// True while a message's body is partly received.
    pub fn mid_message(&self) -> bool {
        self.cur.is_some() || self.start != self.end
    }

    /// Splits buffered bytes into messages. `classify` decides from a header what to do with
    /// its body; `deliver` receives each complete message. A header that breaks framing
    /// (type bits, size) is fatal: nothing after it can be trusted.
    pub fn process(
        &mut self,
        mut classify: impl FnMut(&Header, MessageType) -> Disposition,
        mut deliver: impl FnMut(Message),
    ) -> Result<(), Error> {
        loop {
            if self.cur.is_none() {
                if self.end - self.start < HEADER_SIZE {
                    return Ok(());
                }
                let mut raw = [0u8; HEADER_SIZE];
                raw.copy_from_slice(&self.buf[self.start..self.start + HEADER_SIZE]);
                let header = Header::decode(&raw);
                let kind = header.validate(MAX_INCOMING_MESSAGE).map_err(|e| {
                    Error::new(Errno::ECONNRESET, format!("protocol violation: {e}"))
                })?;
                let disposition = classify(&header, kind);
                let len = header.payload_len();
                let keep = matches!(
                    disposition,
                    Disposition::Reply { keep: true, .. } | Disposition::Request { keep: true }
                );
                self.cur = Some(InProgress {
                    header,
                    disposition,
                    start: self.pos,
                    end: self.pos + u64::from(header.size),
                    // Bounded: classify only keeps bodies within the request's reply limit
                    // or our own transfer size.
                    keep,
                    body: if keep {
                        Vec::with_capacity(len)
                    } else {
                        Vec::new()
                    },
                    remaining: len,
                });
                self.consume(HEADER_SIZE);
            }
            let Some(cur) = self.cur.as_mut() else {
                return Ok(());
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
                return Ok(());
            }
            let Some(done) = self.cur.take() else {
                return Ok(());
            };
            let mut fds = Vec::new();
            while let Some((at, _)) = self.fds.front() {
                if *at >= done.end {
                    break;
                }
                if let Some((at, fd)) = self.fds.pop_front() {
                    // Fds tagged before this message belong to nothing we can name; they
                    // are closed here by being dropped.
                    if at >= done.start {
                        fds.push(fd);
                    }
                }
            }
            deliver(Message {
                header: done.header,
                disposition: done.disposition,
                payload: done.body,
                fds,
            });
        }
    }
}
