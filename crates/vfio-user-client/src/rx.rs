//! The receive side: reads the socket in large chunks (with any fds) into the proto crate's
//! [`Framer`], which splits the stream into messages. Whoever holds it reads.

use crate::socket::{
    cmsg_buffer, recv_append, recv_chunk, recv_raw_then, set_receive_timeout, Received,
};
use crate::target::ReadTarget;
use crate::Error;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use vfio_user_proto::{Frame, Framer, Header, MessageType, MAX_INCOMING_MESSAGE};

const READ_BUFFER: usize = 64 * 1024;
/// A body with at least this much still to come is read straight into its own memory.
pub const DIRECT_BODY: usize = 16 * 1024;
/// A header and a REGION_READ reply's access header: what is read alone when a reply with a
/// target is expected next.
const TARGET_HEAD: usize = vfio_user_proto::HEADER_SIZE + 16;

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

impl Disposition {
    fn keep(self) -> bool {
        matches!(
            self,
            Disposition::Reply { keep: true, .. } | Disposition::Request { keep: true }
        )
    }
}

/// A whole message, ready to dispatch.
pub type Message = Frame<Disposition, OwnedFd>;

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
    framer: Framer<Disposition, OwnedFd>,
    cmsg: Vec<u8>,
    /// The socket's SO_RCVTIMEO as last set here (only the holder of `Rx` reads).
    receive_timeout: Option<Duration>,
    /// Where the data of the reply being received goes, when its request gave memory for it
    /// (see `target.rs`).
    target: Option<Arc<ReadTarget>>,
    /// The last message was a reply read into its target: the next is likely another piece
    /// of the same read, so its header is read alone and its data goes straight to its
    /// target, rather than the first 64 KiB of it through the read buffer and a copy.
    expect_target: bool,
}

impl Default for Rx {
    fn default() -> Self {
        Rx {
            framer: Framer::new(READ_BUFFER, MAX_INCOMING_MESSAGE),
            cmsg: cmsg_buffer(),
            receive_timeout: None,
            target: None,
            expect_target: false,
        }
    }
}

impl Rx {
    /// One nonblocking read.
    pub fn read(&mut self, sock: RawFd) -> Result<ReadOutcome, Error> {
        self.read_inner(sock, false)
    }

    /// One read that waits up to `timeout` for data (WouldBlock when none came, or a signal
    /// interrupted it): a caller waiting for its reply sleeps in recvmsg itself rather than
    /// in poll followed by recvmsg, one syscall fewer per round trip.
    pub fn read_blocking(&mut self, sock: RawFd, timeout: Duration) -> Result<ReadOutcome, Error> {
        if self.target.is_some() {
            // Never sleep in recvmsg while writing into a caller's memory: its lock would be
            // held, and whoever settles that request (under the state lock) would wait.
            return self.wait_then_read(sock, timeout);
        }
        if self.receive_timeout != Some(timeout) {
            set_receive_timeout(sock, timeout).map_err(|e| {
                Error::new(
                    e,
                    format!("cannot set the socket's receive timeout: {}", e.desc()),
                )
            })?;
            self.receive_timeout = Some(timeout);
        }
        self.read_inner(sock, true)
    }

    /// Waits up to `timeout` in poll, then reads without blocking.
    fn wait_then_read(&mut self, sock: RawFd, timeout: Duration) -> Result<ReadOutcome, Error> {
        // SAFETY: `sock` is the client's socket, open while its owner (Shared) lives, which
        // outlives this call; the borrow ends with it.
        let fd = unsafe { BorrowedFd::borrow_raw(sock) };
        let ms =
            PollTimeout::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX);
        match poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], ms) {
            Ok(0) | Err(Errno::EINTR) => Ok(ReadOutcome::WouldBlock),
            Ok(_) => self.read_inner(sock, false),
            Err(e) => Err(Error::new(
                Errno::ECONNRESET,
                format!("waiting on the socket failed: {}", e.desc()),
            )),
        }
    }

    /// One read of the current reply's data into its target. None when there is nothing to
    /// read there (no target, the framer holds other bytes, or the target was revoked).
    fn read_target(&mut self, sock: RawFd, block: bool) -> Option<Result<ReadOutcome, Error>> {
        let target = self.target.clone()?;
        // Only the access header goes into the reply's own Vec: nothing more is reserved.
        let (have, left) = self.framer.receiving_body(1).map(|(b, l)| (b.len(), l))?;
        let prefix = target.prefix();
        if have < prefix {
            // The rest of the access header first, into the reply's own buffer.
            let (body, _) = self.framer.receiving_body(1)?;
            let received =
                recv_append(sock, body, (prefix - have).min(left), &mut self.cmsg, block);
            return Some(self.body_read(received, left, block));
        }
        // Whatever follows the body (most often the next piece's header and access header)
        // is read in the same call into the read buffer, empty while a body is read
        // directly: one recvmsg per piece fewer, and a short read says the socket is empty.
        let space = self.framer.space();
        let tail = TARGET_HEAD.min(space.len());
        let then = &mut space[..tail];
        let cmsg = &mut self.cmsg;
        let mut offered = 0;
        // SAFETY: `receive` hands over `room` writable bytes of the caller's memory and
        // holds its lock for the whole call; `then` is the framer's own buffer.
        let got = target.receive(have - prefix, left, |ptr, room| unsafe {
            // Only a read that can end the body goes on past it.
            let then = if room == left { then } else { &mut [][..] };
            offered = room + then.len();
            recv_raw_then(sock, (ptr, room), then, cmsg, block)
        });
        let Some(received) = got else {
            // Revoked: the request is over; its body is read and dropped as usual.
            self.target = None;
            return None;
        };
        Some(match received {
            Ok(r) if r.bytes == 0 => Ok(ReadOutcome::Eof),
            Ok(r) => {
                let body = r.bytes.min(left);
                let beyond = r.bytes - body;
                // fds end a read: they came with its last segment, so they belong with the
                // bytes past the body when there are any (the framer ties them to the
                // message holding a read's last byte).
                if beyond == 0 {
                    self.framer.filled_body(body, r.fds);
                } else {
                    self.framer.filled_body(body, []);
                    self.framer.filled(beyond, r.fds);
                }
                Ok(ReadOutcome::Data {
                    drained: r.bytes < offered,
                })
            }
            Err(e) => Self::failed(e, block),
        })
    }

    /// What a read of a body with `left` bytes to come brought, recorded in the framer.
    fn body_read(
        &mut self,
        received: nix::Result<Received>,
        left: usize,
        block: bool,
    ) -> Result<ReadOutcome, Error> {
        match received {
            Ok(r) if r.bytes == 0 => Ok(ReadOutcome::Eof),
            Ok(r) => {
                let drained = r.bytes < left;
                self.framer.filled_body(r.bytes, r.fds);
                Ok(ReadOutcome::Data { drained })
            }
            Err(e) => Self::failed(e, block),
        }
    }

    fn read_inner(&mut self, sock: RawFd, block: bool) -> Result<ReadOutcome, Error> {
        if let Some(r) = self.read_target(sock, block) {
            return r;
        }
        if let Some((body, left)) = self.framer.direct_body(DIRECT_BODY) {
            let received = recv_append(sock, body, left, &mut self.cmsg, block);
            return self.body_read(received, left, block);
        }
        let at_boundary = !self.framer.mid_message();
        let mut space = self.framer.space();
        if self.expect_target && at_boundary {
            space = &mut space[..TARGET_HEAD];
        }
        let room = space.len();
        match recv_chunk(sock, space, &mut self.cmsg, block) {
            Ok(r) if r.bytes == 0 => Ok(ReadOutcome::Eof),
            Ok(r) => {
                self.framer.filled(r.bytes, r.fds);
                Ok(ReadOutcome::Data {
                    drained: r.bytes < room,
                })
            }
            Err(e) => Self::failed(e, block),
        }
    }

    fn failed(e: Errno, block: bool) -> Result<ReadOutcome, Error> {
        match e {
            Errno::EAGAIN => Ok(ReadOutcome::WouldBlock),
            Errno::EINTR if block => Ok(ReadOutcome::WouldBlock),
            e => Err(Error::new(
                Errno::ECONNRESET,
                format!("connection lost while receiving: {}", e.desc()),
            )),
        }
    }

    /// Forgets everything buffered after a fatal error, closing fds nobody will take.
    pub fn reset(&mut self) {
        self.framer.reset();
        self.target = None;
        self.expect_target = false;
    }

    /// True while a message is partly received.
    pub fn mid_message(&self) -> bool {
        self.framer.mid_message()
    }

    /// The next whole buffered message. `classify` decides from its header what its body is
    /// for, and may name memory for its data; it runs only once every earlier message has been
    /// returned, so it sees the state they left (a VERSION reply completed before the request
    /// behind it is judged). The memory is used only when the reply is exactly the size it
    /// fits (anything else is read as usual, and found wrong when checked).
    pub fn next(
        &mut self,
        classify: impl FnOnce(&Header, MessageType) -> (Disposition, Option<Arc<ReadTarget>>),
    ) -> Result<Option<Message>, Error> {
        let mut target = None;
        let r = self
            .framer
            .next(|h, kind| {
                let (d, t) = classify(h, kind);
                target = t.filter(|t| d.keep() && h.payload_len() == t.payload_len());
                (d, d.keep())
            })
            .map_err(|e| Error::new(Errno::ECONNRESET, format!("protocol violation: {e}")))?;
        if r.is_some() {
            self.expect_target = self.target.take().is_some();
        } else if target.is_some() {
            self.target = target;
        }
        Ok(r)
    }
}
