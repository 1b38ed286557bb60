//! Everything shared between callers and the I/O thread, always used under one mutex:
//! the outgoing queue, the pending table, ids, deadlines and the connection state.

use crate::ids::{IdMap, Ids};
use crate::outgoing::{Outgoing, Queue};
use crate::pending::{Pending, Reply, Waiter};
use crate::rx::{Disposition, Message, DIRECT_BODY};
use crate::socket::send_parts;
use crate::target::ReadTarget;
use crate::Error;
use nix::errno::Errno;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::IoSlice;
use std::os::fd::OwnedFd;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;
use vfio_user_proto::{
    command_name, validate_version_reply, Command, Header, MessageType, Version, VersionProposal,
    HEADER_SIZE,
};

/// Most messages one gathered sendmsg carries (well under IOV_MAX).
const MAX_GATHER: usize = 64;

/// Results to hand out once the lock is released (callbacks must never run under it).
#[derive(Default)]
pub struct Fired {
    pub completions: Vec<(Waiter, Result<Reply, Error>)>,
}

thread_local! {
    /// Set while this thread runs completions, which may hold the receive side.
    static IN_COMPLETION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True on a thread that is running completions right now (see [`crate::Client::close`]).
pub fn in_completion() -> bool {
    IN_COMPLETION.with(|f| f.get())
}

impl Fired {
    pub fn fire(self) {
        if self.completions.is_empty() {
            return;
        }
        let outer = IN_COMPLETION.with(|f| f.replace(true));
        for (w, r) in self.completions {
            w.complete(r);
        }
        IN_COMPLETION.with(|f| f.set(outer));
    }
}

/// A request about to be sent: its encoded header, the caller's payload and fds (borrowed:
/// copied, and the fds duplicated, only if it must wait in the queue), its id (None: posted)
/// and seq. A payload handed over (`owned`) is queued as it is, never copied.
pub struct NewRequest<'a> {
    pub header: [u8; HEADER_SIZE],
    pub payload: &'a [u8],
    pub owned: Option<Vec<u8>>,
    pub fds: &'a [BorrowedFd<'a>],
    pub id: Option<u16>,
    pub seq: u64,
}

/// Why a request was not sent.
pub enum SendFailure {
    /// Nothing of it went out and the stream is intact (an fd that is not open, no fd left
    /// to duplicate it): only this request fails.
    Refused(Error),
    /// The socket failed: the connection is over.
    Fatal(Error),
}

impl NewRequest<'_> {
    /// The payload, borrowed or owned.
    pub fn body(&self) -> &[u8] {
        self.owned.as_deref().unwrap_or(self.payload)
    }

    /// The request as a queued message (a copy of its bytes, and our own duplicates of its fds
    /// unless they went already), `written` of its bytes already sent.
    fn queued(self, written: usize) -> Result<Outgoing, SendFailure> {
        let fds = if written > 0 {
            Vec::new()
        } else {
            self.fds
                .iter()
                .map(|f| f.try_clone_to_owned())
                .collect::<Result<Vec<OwnedFd>, _>>()
                .map_err(|e| {
                    let errno = Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EBADF as i32));
                    SendFailure::Refused(Error::new(
                        errno,
                        format!("cannot duplicate an fd to send: {}", errno.desc()),
                    ))
                })?
        };
        let (bytes, body) = match self.owned {
            Some(body) => (self.header.to_vec(), body),
            None => {
                let mut bytes = Vec::with_capacity(HEADER_SIZE + self.payload.len());
                bytes.extend_from_slice(&self.header);
                bytes.extend_from_slice(self.payload);
                (bytes, Vec::new())
            }
        };
        let mut msg = Outgoing {
            id: self.id,
            reply: false,
            seq: self.seq,
            bytes,
            body,
            written: 0,
            fds,
            merge: false,
        };
        msg.advance(written);
        Ok(msg)
    }
}

/// What a send attempt did.
pub enum Sent {
    /// Written whole.
    Done,
    /// Queued (would block, or sends are forced through the queue): the I/O thread must
    /// watch for writability.
    Queued,
    /// Queued while sends are corked: written when the cork is released.
    Corked,
}

#[derive(Default)]
pub struct State {
    /// Set once the connection is finished; the error every new request gets.
    pub closed: Option<Error>,
    pub version: Option<Version>,
    pub version_in_flight: bool,
    /// What we proposed, kept to check the reply against.
    pub proposal: Option<VersionProposal>,
    /// Largest server request body we store (DMA_WRITE data plus its 16-byte header).
    pub max_request_payload: usize,
    pub outgoing: Queue,
    pub pending: IdMap<Pending>,
    ids: Ids,
    deadlines: BinaryHeap<Reverse<(Instant, u64, u16)>>,
    next_seq: u64,
    /// The I/O thread should poll for POLLOUT.
    pub want_write: bool,
    /// When the I/O thread, asleep in poll, will wake up by itself at the latest. A new
    /// deadline before this needs a wakeup; a later one (the common case) costs nothing.
    pub io_wake_at: Option<Instant>,
    /// A caller waiting for its reply is reading the socket itself (no thread hop); the
    /// I/O thread stays off the read side meanwhile.
    pub caller_reading: bool,
    /// An event loop in the caller's process reads the socket when it is readable
    /// ([`crate::ExternalReader`]); the I/O thread only steps in when data sits unread past a
    /// grace period (the loop is busy), so a server request is never stuck behind it.
    pub external_reader: bool,
    /// When the I/O thread checks whether data the external reader should have taken is
    /// still waiting.
    pub backup_check_at: Option<Instant>,
    /// When a blocking caller last stopped reading, with no event loop: the I/O thread stays
    /// off the read side while such calls follow one another (see `reader.rs`).
    pub caller_read_at: Option<Instant>,
    /// Corks held ([`crate::Cork`]): while any is, requests nobody waits for on the spot are
    /// queued and written together when the last is released.
    pub corks: u32,
    /// The socket's current epoll registration: registered at all, and its event bits.
    pub registered: bool,
    pub armed: u32,
    pub stats: Stats,
}

/// Counters for observability and tests of the send path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages written whole by the caller's thread (the inline fast path).
    pub inline_sends: u64,
    /// Messages that went through the outgoing queue (would-block, ordering, send_queued).
    pub queued_sends: u64,
    /// sendmsg calls that wrote from the queue (several messages each when they can).
    pub queue_writes: u64,
    /// Write calls that wrote only part of what was offered.
    pub partial_writes: u64,
    /// Replies read and dropped because nobody waited for them (late or unexpected).
    pub dropped_replies: u64,
    /// Requests from the server answered by the dispatch point.
    pub server_requests: u64,
    /// Ids held for the late reply of a request that timed out or failed on the wire.
    pub tombstones: u64,
    /// Posted writes sent as entries of a REGION_WRITE_MULTI.
    pub coalesced_writes: u64,
    /// Backup checks of the I/O thread that found data another reader had left unread.
    pub backup_reads: u64,
}

impl State {
    pub fn new(proposal: VersionProposal, max_request_payload: usize) -> State {
        State {
            proposal: Some(proposal),
            max_request_payload,
            ..State::default()
        }
    }

    pub fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// The next 16-bit id not held by a pending request or a tombstone; held when the
    /// request wants a reply. Refused at once (EAGAIN) when every id is held.
    pub fn alloc_id(&mut self, hold: bool) -> Result<u16, Error> {
        self.ids.take(hold).ok_or_else(|| {
            Error::new(
                Errno::EAGAIN,
                format!(
                    "all 65536 message ids are held ({} waiting for the late reply of a request that timed out)",
                    self.ids.tombstones()
                ),
            )
        })
    }

    pub fn stats(&self) -> Stats {
        Stats {
            tombstones: self.ids.tombstones() as u64,
            ..self.stats
        }
    }

    /// Adds a request to the pending table; returns true if the I/O thread must be woken to
    /// honour its deadline.
    pub fn add_pending(&mut self, id: u16, p: Pending) -> bool {
        let wake = self.io_wake_at.is_none_or(|w| p.deadline < w);
        self.deadlines.push(Reverse((p.deadline, p.seq, id)));
        self.pending.insert(id, p);
        wake
    }

    /// A reply arrived for `id` that nobody waits for; returns true if it was a late reply
    /// to a timed-out request (its id is released now).
    pub fn bury(&mut self, id: u16) -> bool {
        self.stats.dropped_replies += 1;
        if self.ids.is_tombstone(id) {
            self.ids.release(id);
            true
        } else {
            false
        }
    }

    /// Removes request `id` (if it is still the one with `seq`) from whichever queue holds it
    /// and fails it with `err`. A request already on the wire leaves a tombstone.
    pub fn fail_request(&mut self, id: u16, seq: u64, err: Error, fired: &mut Fired) {
        match self.pending.get(&id) {
            Some(p) if p.seq == seq => {}
            _ => return,
        }
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        p.revoke_target();
        if p.command == Command::Version as u16 {
            self.version_in_flight = false;
        }
        let mut on_wire = p.sent;
        if !p.sent {
            if let Some(queued) = self.outgoing.request_mut(id, seq) {
                if queued.written > 0 {
                    // Partly written: the rest must still go out or the stream desyncs.
                    // Its reply, if any, will be dropped.
                    queued.id = None;
                    on_wire = true;
                } else {
                    self.outgoing.remove_unstarted(id, seq);
                }
            }
        }
        if on_wire {
            self.ids.tombstone(id);
        } else {
            self.ids.release(id);
        }
        fired
            .completions
            .push((p.waiter, Err(err.with_command(p.command))));
    }

    /// Fails request `id` (if it is still the one with `seq`) with ETIMEDOUT.
    pub fn time_out(&mut self, id: u16, seq: u64, fired: &mut Fired) {
        let command = self.pending.get(&id).map_or(0, |p| p.command);
        let err = Error::new(
            Errno::ETIMEDOUT,
            format!("no reply to {} before the deadline", command_name(command)),
        );
        self.fail_request(id, seq, err, fired);
    }

    /// Fails every request whose deadline has passed; returns the next deadline, if any.
    pub fn expire(&mut self, now: Instant, fired: &mut Fired) -> Option<Instant> {
        while let Some(Reverse((when, seq, id))) = self.deadlines.peek().copied() {
            let live = self.pending.get(&id).is_some_and(|p| p.seq == seq);
            if !live {
                self.deadlines.pop();
                continue;
            }
            if when > now {
                return Some(when);
            }
            self.deadlines.pop();
            self.time_out(id, seq, fired);
        }
        None
    }

    /// Keeps the deadline heap from growing with completed requests.
    pub fn compact_deadlines(&mut self) {
        if self.deadlines.len() > 1024 && self.deadlines.len() > 4 * self.pending.len() {
            self.deadlines = self
                .pending
                .iter()
                .map(|(id, p)| Reverse((p.deadline, p.seq, *id)))
                .collect();
        }
    }

    /// Appends `msg` behind anything queued, or writes it inline when the queue is empty and
    /// `inline` is allowed. A request becomes `sent` once its last byte is written.
    pub fn send(&mut self, sock: RawFd, msg: Outgoing, inline: bool) -> Result<Sent, Error> {
        self.outgoing.push(msg);
        if self.outgoing.len() > 1 || !inline {
            self.stats.queued_sends += 1;
            self.want_write = true;
            return Ok(Sent::Queued);
        }
        self.flush(sock)?;
        Ok(if self.outgoing.is_empty() {
            self.stats.inline_sends += 1;
            Sent::Done
        } else {
            self.stats.queued_sends += 1;
            Sent::Queued
        })
    }

    /// Sends request `id` (None: posted) made of `header` and `payload`. When nothing is
    /// queued and `inline` is allowed it is written straight from them in one gathered
    /// sendmsg, with no copy; whatever the socket did not take is queued, as a copy (or, for
    /// an owned payload, as it is).
    pub fn send_request(
        &mut self,
        sock: RawFd,
        req: NewRequest<'_>,
        inline: bool,
    ) -> Result<Sent, SendFailure> {
        if !inline || !self.outgoing.is_empty() {
            let msg = req.queued(0)?;
            return self.send(sock, msg, inline).map_err(SendFailure::Fatal);
        }
        let raw: Vec<RawFd> = req.fds.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [IoSlice::new(&req.header), IoSlice::new(req.body())];
        let total = HEADER_SIZE + req.body().len();
        let (id, seq) = (req.id, req.seq);
        let written = match send_parts(sock, &iov, &raw) {
            Ok(n) => n,
            Err(Errno::EAGAIN) => 0,
            // Our socket is open, so an fd of the caller's is not: nothing was sent.
            Err(Errno::EBADF) if !raw.is_empty() => {
                return Err(SendFailure::Refused(Error::new(
                    Errno::EBADF,
                    "an fd to send is not an open file descriptor",
                )))
            }
            Err(e) => {
                return Err(SendFailure::Fatal(Error::new(
                    Errno::ECONNRESET,
                    format!("connection lost while sending: {}", e.desc()),
                )))
            }
        };
        if written >= total {
            if let Some(p) = id.and_then(|id| self.pending.get_mut(&id)) {
                if p.seq == seq {
                    p.sent = true;
                }
            }
            self.stats.inline_sends += 1;
            return Ok(Sent::Done);
        }
        if written > 0 {
            self.stats.partial_writes += 1;
        }
        let msg = req.queued(written)?;
        self.outgoing.push(msg);
        self.stats.queued_sends += 1;
        self.want_write = true;
        Ok(Sent::Queued)
    }

    /// Queues request `req` while sends are corked; written with the rest at uncork.
    pub fn cork_request(&mut self, req: NewRequest<'_>) -> Result<(), SendFailure> {
        let msg = req.queued(0)?;
        self.outgoing.push(msg);
        self.stats.queued_sends += 1;
        Ok(())
    }

    /// Forgets request `id` (with `seq`) that was refused before any of it was sent: no
    /// completion runs, its id is free again.
    pub fn forget_refused(&mut self, id: u16, seq: u64, held: bool) {
        if self.pending.get(&id).is_some_and(|p| p.seq == seq) {
            if let Some(p) = self.pending.remove(&id) {
                p.revoke_target();
                if p.command == Command::Version as u16 {
                    self.version_in_flight = false;
                }
            }
        }
        if held {
            self.ids.release(id);
        }
    }

    /// Writes queued messages, several per sendmsg, until the queue is empty or the socket
    /// would block. An error other than would-block is fatal for the connection.
    pub fn flush(&mut self, sock: RawFd) -> Result<(), Error> {
        loop {
            let (result, offered) = {
                let (iov, fds) = self.outgoing.gather(MAX_GATHER);
                if iov.is_empty() {
                    break;
                }
                let offered: usize = iov.iter().map(|s| s.len()).sum();
                (send_parts(sock, &iov, &fds), offered)
            };
            match result {
                Ok(n) => {
                    self.stats.queue_writes += 1;
                    if n < offered {
                        self.stats.partial_writes += 1;
                    }
                    let pending = &mut self.pending;
                    self.outgoing.wrote(n, |m| {
                        if let Some(p) = m.id.and_then(|id| pending.get_mut(&id)) {
                            if p.seq == m.seq {
                                p.sent = true;
                            }
                        }
                    });
                }
                Err(Errno::EAGAIN) => {
                    self.want_write = true;
                    return Ok(());
                }
                Err(e) => {
                    return Err(Error::new(
                        Errno::ECONNRESET,
                        format!("connection lost while sending: {}", e.desc()),
                    ))
                }
            }
        }
        self.want_write = false;
        Ok(())
    }

    /// Ends the connection: every queued and pending request fails with `err` at once.
    pub fn close(&mut self, err: Error, fired: &mut Fired) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(err.clone());
        self.outgoing.clear();
        for (_, p) in self.pending.drain() {
            p.revoke_target();
            fired
                .completions
                .push((p.waiter, Err(err.clone().with_command(p.command))));
        }
        self.deadlines.clear();
        self.ids.clear();
        self.want_write = false;
    }
}

/// A request from the server, handed to the dispatch point once the lock is released.
pub struct ServerRequest {
    pub header: Header,
    // Read by the DMA_READ/DMA_WRITE handler that the command-set work adds.
    #[allow(dead_code)]
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Too big to store: answered with E2BIG.
    pub oversize: bool,
}

impl State {
    /// Decides from a header alone what its body is for, so nothing is stored for a message
    /// nobody wants and no reply can be matched to the wrong request.
    pub fn classify(&mut self, h: &Header, kind: MessageType, fired: &mut Fired) -> Disposition {
        // A late reply to a timed-out request (a VERSION tried again, too) is not stray: it
        // is drained and dropped below like any late reply.
        let stray = kind == MessageType::Command
            || !(self.pending.contains_key(&h.id) || self.ids.is_tombstone(h.id));
        if self.version_in_flight && stray {
            // Until VERSION is answered nothing else may come, and VERSION is the only
            // request in flight: anything else is a broken VERSION reply, said as such.
            let what = match kind {
                MessageType::Command => format!(
                    "server sent a request ({}) instead of the VERSION reply",
                    command_name(h.command)
                ),
                MessageType::Reply => format!(
                    "VERSION reply carries id {}, which matches no request",
                    h.id
                ),
            };
            self.fail_version(Error::proto(what), fired);
            return Disposition::Drop;
        }
        if kind == MessageType::Command {
            return Disposition::Request {
                keep: h.payload_len() <= self.max_request_payload,
            };
        }
        let Some(p) = self.pending.get(&h.id) else {
            // A late reply to a timed-out request, or one nobody asked for: drained, dropped.
            self.bury(h.id);
            return Disposition::Drop;
        };
        let (seq, command, limit, sent) = (p.seq, p.command, p.reply_limit, p.sent);
        let problem = if h.command != command {
            Some(format!(
                "reply to {} (id {}) carries command {}",
                command_name(command),
                h.id,
                command_name(h.command)
            ))
        } else if h.no_reply() {
            Some(format!(
                "reply to {} has No_reply set",
                command_name(command)
            ))
        } else if h.size as usize > limit && !h.is_error() {
            Some(format!(
                "reply to {} is {} bytes, more than the {limit} the request allows",
                command_name(command),
                h.size
            ))
        } else {
            None
        };
        let early_refusal = h.is_error() && h.size as usize == HEADER_SIZE;
        match problem {
            Some(what) => {
                self.fail_request(h.id, seq, Error::proto(what), fired);
                // This message was its reply, malformed: no other is coming.
                self.bury(h.id);
                Disposition::Drop
            }
            // A server may refuse a request after its header, before we finished writing it:
            // a header-only error reply is its answer. Anything else before the request is
            // fully written cannot be its reply. The rest of the request is still written.
            None if !(sent || early_refusal) => {
                self.stats.dropped_replies += 1;
                Disposition::Drop
            }
            // An error reply's payload (there should be none) is not stored.
            None => Disposition::Reply {
                seq,
                keep: !h.is_error(),
            },
        }
    }

    /// The memory the request gave for the data of reply `h`, once `classify` has taken that
    /// reply as its own (`d`). Not looked up for a small reply, which arrives whole with its
    /// header: its data is copied out of the reply's buffer at completion all the same.
    pub fn reply_target(&self, h: &Header, d: Disposition) -> Option<Arc<ReadTarget>> {
        match d {
            Disposition::Reply { seq, keep: true } if h.payload_len() >= DIRECT_BODY => self
                .pending
                .get(&h.id)
                .filter(|p| p.seq == seq)
                .and_then(|p| p.target.clone()),
            _ => None,
        }
    }

    /// Fails the VERSION request in flight; its real reply, if it ever comes, is dropped.
    fn fail_version(&mut self, err: Error, fired: &mut Fired) {
        let version = Command::Version as u16;
        let found = self
            .pending
            .iter()
            .find(|(_, p)| p.command == version)
            .map(|(id, p)| (*id, p.seq));
        if let Some((id, seq)) = found {
            self.fail_request(id, seq, err, fired);
        }
    }

    /// Hands a complete reply to its waiter.
    pub fn complete_reply(&mut self, m: Message, seq: u64, fired: &mut Fired) {
        let id = m.header.id;
        let live = self.pending.get(&id).is_some_and(|p| p.seq == seq);
        if !live {
            // It timed out while its body was arriving; the id is released now.
            self.bury(id);
            return;
        }
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.ids.release(id);
        let h = m.header;
        let mut result = if h.is_error() {
            Err(Error::from_error_reply(h.error, h.command))
        } else if m.attachments.len() > p.fd_limit {
            Err(Error::proto(format!(
                "reply to {} carried {} fds, at most {} expected",
                command_name(h.command),
                m.attachments.len(),
                p.fd_limit
            ))
            .with_command(h.command))
        } else {
            Ok(Reply {
                header: h,
                payload: m.payload,
                fds: m.attachments,
            })
        };
        if p.command == Command::Version as u16 {
            self.version_in_flight = false;
            if let (Ok(reply), Some(proposal)) = (&result, &self.proposal) {
                match validate_version_reply(proposal, &reply.payload) {
                    Ok(v) => self.version = Some(v),
                    Err(e) => result = Err(Error::proto(e.0).with_command(p.command)),
                }
            }
        }
        fired.completions.push((p.waiter, result));
    }
}
