//! What callers, readers and the I/O thread share: the socket, the wake eventfd, the epoll
//! set, the receive side and the state, plus the operations every one of them needs (failing
//! the connection, announcing its end, answering server requests).

use crate::dma_table::DmaTable;
use crate::irq_table::{untoken, IrqTable};
use crate::options::Options;
use crate::outgoing::Outgoing;
use crate::rx::Rx;
use crate::state::{Fired, Sent, ServerRequest, State};
use crate::Error;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::eventfd::EventFd;
use nix::sys::socket::{shutdown, Shutdown};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;
use vfio_user_proto::{Command, Header};

/// epoll data for the socket and the wake eventfd.
pub const SOCK_TOKEN: u64 = 1;
pub const WAKE_TOKEN: u64 = 2;

pub type CloseHook = Box<dyn FnOnce(&Error) + Send>;

pub(crate) struct Shared {
    pub sock: OwnedFd,
    pub wake: EventFd,
    pub epoll: Epoll,
    /// The receive side. Whoever holds it reads: the I/O thread, or a caller waiting for its
    /// own reply (lock order: rx before state).
    pub rx: Mutex<Rx>,
    pub state: Mutex<State>,
    pub options: Options,
    pub on_close: Mutex<CloseNotice>,
    /// The DMA ranges offered to the server, for serving its DMA_READ/DMA_WRITE.
    pub dma: Arc<Mutex<DmaTable>>,
    /// The eventfds wired to interrupts, which the I/O thread watches.
    pub irqs: Mutex<IrqTable>,
    /// Told of every DMA_READ/DMA_WRITE served, after its reply is queued (see [`DmaHook`]).
    pub dma_hook: Mutex<Option<DmaHook>>,
}

/// Called after a server DMA request was answered: (write, address, count, errno or 0). It
/// runs on the thread that served it and must not block.
pub type DmaHook = Box<dyn Fn(bool, u64, u64, i32) + Send>;

/// The close hook and whether the end has been announced, under one lock so a hook
/// registered at any moment is called exactly once.
#[derive(Default)]
pub struct CloseNotice {
    pub hook: Option<CloseHook>,
    pub announced: Option<Error>,
    /// Called once, by the thread that ends the connection, before it fails anything in
    /// flight, with the state locked: it must not call back into the client (see
    /// [`crate::Client::on_ending`]).
    pub ending: Option<Box<dyn FnOnce() + Send>>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than refusing all further use would; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the socket's epoll registration match what is wanted (called with the state
    /// locked): readable while the I/O thread is the reader, writable while writes queue.
    pub fn sync_interest(&self, st: &mut State) {
        if st.closed.is_some() {
            return;
        }
        // One-shot: one wakeup per burst of arrivals. The I/O thread then reads, or, when a
        // caller or an event loop is the reader, only schedules a backup check and stays
        // unarmed until it is due. A caller reading while the I/O thread is the usual reader
        // (no event loop) disarms it for a burst of calls (`reader.rs`): far cheaper than the
        // thread waking on every reply it is not to read.
        let mut want = EpollFlags::EPOLLONESHOT;
        let caller_only = st.caller_reading && !st.external_reader;
        if st.backup_check_at.is_none() && !caller_only {
            want |= EpollFlags::EPOLLIN;
        }
        if st.want_write {
            want |= EpollFlags::EPOLLOUT;
        }
        if want == EpollFlags::EPOLLONESHOT {
            // Nothing to watch: leave epoll altogether rather than stay registered disarmed.
            // A registration sits on the socket's wait queue, and the server pays for it on
            // every message it sends us (its wakeup takes the epoll's lock to find the entry
            // disarmed): 0.3 µs of the device's CPU per round trip, measured pinned.
            if !st.registered {
                return;
            }
            if self.epoll.delete(&self.sock).is_ok() {
                st.registered = false;
                st.armed = 0;
                return;
            }
            // Could not leave: stay registered, disarmed, as below.
        }
        if st.registered && st.armed == want.bits() as u32 {
            return;
        }
        let mut ev = EpollEvent::new(want, SOCK_TOKEN);
        let done = if st.registered {
            self.epoll.modify(&self.sock, &mut ev)
        } else {
            self.epoll.add(&self.sock, ev)
        };
        if done.is_ok() {
            st.registered = true;
            st.armed = want.bits() as u32;
        }
    }

    pub fn default_timeout(&self) -> Duration {
        self.options.timeout
    }

    pub fn wake_io(&self) {
        let _ = self.wake.write(1);
    }

    /// Reads the eventfd behind epoll data `token`, if it is an interrupt's, and reports what
    /// it counted to the hook. Returns false for any other token.
    pub fn deliver_irq(&self, token: u64) -> bool {
        let Some((group, vector)) = untoken(token) else {
            return false;
        };
        let table = self.irqs.lock().unwrap_or_else(|p| p.into_inner());
        let count = table.take_count(group, vector);
        if count > 0 {
            if let Some(hook) = &table.hook {
                hook(group, vector, count);
            }
        }
        true
    }

    /// Ends the connection with `err`: fails everything at once and stops the I/O thread.
    pub fn fail(&self, err: Error) {
        let mut fired = Fired::default();
        {
            let mut st = self.lock();
            if st.closed.is_none() {
                // Under the state lock, before `closed` is set: nobody can announce the end
                // (notify_closed reads `closed`) before the ending hook has run.
                let ending = {
                    let mut n = self.on_close.lock().unwrap_or_else(|p| p.into_inner());
                    n.ending.take()
                };
                if let Some(ending) = ending {
                    ending();
                }
            }
            st.close(err, &mut fired);
        }
        // Nothing more will be served: let go of the memory behind every range, and stop
        // watching (and close) every interrupt eventfd.
        self.dma.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let groups = self
            .irqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_all();
        for fd in groups.iter().flat_map(|g| &g.fds) {
            let _ = self.epoll.delete(fd);
        }
        let _ = shutdown(self.sock.as_raw_fd(), Shutdown::Both);
        self.wake_io();
        fired.fire();
    }

    /// Announces the end to the close hook, after every completion already taken by a reader
    /// has been handed out (readers fire completions while holding `rx`), so "closed" never
    /// overtakes a reply.
    pub fn notify_closed(&self) {
        drop(self.rx_lock());
        let Some(err) = self.lock().closed.clone() else {
            return;
        };
        let hook = {
            let mut n = self.on_close.lock().unwrap_or_else(|p| p.into_inner());
            n.announced = Some(err.clone());
            n.hook.take()
        };
        if let Some(hook) = hook {
            hook(&err);
        }
    }

    /// The receive side, waiting for it. A completion that panicked while it was held does
    /// not stop everyone else from reading.
    pub fn rx_lock(&self) -> MutexGuard<'_, Rx> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The receive side if nobody holds it right now.
    pub fn rx_try_lock(&self) -> Option<MutexGuard<'_, Rx>> {
        match self.rx.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The dispatch point for server-to-client requests: DMA_READ and DMA_WRITE are served
    /// from the memory behind the ranges mapped (on whichever thread read them: no JS round
    /// trip); anything else gets ENOSYS, and a request too big to store E2BIG. A request that
    /// said No_reply gets nothing back. Fds a server sends with a request are closed: none
    /// belongs there. The stream stays in sync either way.
    pub fn serve(&self, req: ServerRequest) {
        self.lock().stats.server_requests += 1;
        let had_fds = !req.fds.is_empty();
        drop(req.fds);
        let command = Command::from_u16(req.header.command);
        let is_dma = matches!(command, Some(Command::DmaRead | Command::DmaWrite));
        let seen = is_dma.then(|| {
            let word = |at: usize| {
                req.payload
                    .get(at..at + 8)
                    .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
            };
            (command == Some(Command::DmaWrite), word(0), word(8))
        });
        let result = match command {
            _ if req.oversize => Err(Errno::E2BIG),
            _ if had_fds => Err(Errno::EINVAL),
            Some(c @ (Command::DmaRead | Command::DmaWrite)) => {
                let max = self.options.proposal.capabilities.max_data_xfer_size;
                let table = self.dma.lock().unwrap_or_else(|p| p.into_inner());
                table.serve(&req.payload, c == Command::DmaWrite, max)
            }
            _ => Err(Errno::ENOSYS),
        };
        let errno = result.as_ref().err().map_or(0, |e| *e as i32);
        if !req.header.no_reply() {
            self.answer(&req.header, result);
        }
        if let Some((write, address, count)) = seen {
            let hook = self.dma_hook.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hook) = hook.as_ref() {
                hook(write, address, count, errno);
            }
        }
    }

    /// Sends our answer to server request `to`: its reply payload, or an error reply.
    fn answer(&self, to: &Header, result: Result<Vec<u8>, Errno>) {
        let reply = match result {
            Ok(payload) => {
                let mut bytes = Header::reply_to(to, payload.len()).encode().to_vec();
                bytes.extend_from_slice(&payload);
                bytes
            }
            Err(errno) => Header::error_reply_to(to, errno as u32).encode().to_vec(),
        };
        self.send_unnumbered(reply);
    }

    /// Sends a message that expects no reply (our replies to server requests).
    fn send_unnumbered(&self, bytes: Vec<u8>) {
        let msg = Outgoing {
            id: None,
            reply: true,
            seq: 0,
            bytes,
            body: Vec::new(),
            written: 0,
            fds: Vec::new(),
            merge: false,
        };
        let result = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            if st.outgoing.cost() > self.options.max_queued_bytes {
                Err(Error::new(
                    Errno::ECONNRESET,
                    "server floods requests without reading our replies",
                ))
            } else {
                st.send(self.sock.as_raw_fd(), msg, !self.options.send_queued)
            }
        };
        match result {
            Ok(Sent::Done) => {}
            Ok(Sent::Queued | Sent::Corked) => self.wake_io(),
            Err(e) => self.fail(e),
        }
    }
}
