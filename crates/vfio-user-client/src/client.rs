//! The public client: connect, negotiate, send, close.

use crate::cork::Cork;
use crate::dma_table::DmaTable;
use crate::io_thread;
use crate::irq_table::IrqTable;
use crate::options::{Options, OUR_MAX_MSG_FDS};
use crate::outgoing::Outgoing;
use crate::pending::{Completion, Pending, Reply, Slot, Waiter};
use crate::reader::{ExternalReader, ReaderGuard};
use crate::rx::Rx;
use crate::shared::{CloseNotice, DmaHook, Shared, WAKE_TOKEN};
use crate::socket::connect_unix;
use crate::state::{NewRequest, SendFailure, Sent, State, Stats};
use crate::target::ReadTarget;
use crate::ticket::Ticket;
use crate::Error;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vfio_user_proto::{
    check_request, command_name, reply_fd_limit, reply_size_limit, version::version_payload,
    Capabilities, Command, Header, Version, HEADER_SIZE,
};

/// Most memory (see `Outgoing::cost`) a cork holds queued before writing it anyway.
const CORK_LIMIT: usize = 256 << 10;

/// One request. `fds` are borrowed: the client sends duplicates, the caller keeps its own.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub command: u16,
    pub payload: &'a [u8],
    pub fds: &'a [BorrowedFd<'a>],
    /// Overrides [`Options::timeout`] for this request.
    pub timeout: Option<Duration>,
}

impl<'a> Request<'a> {
    pub fn new(command: u16, payload: &'a [u8]) -> Request<'a> {
        Request {
            command,
            payload,
            fds: &[],
            timeout: None,
        }
    }
}

/// What [`Client::submit`] did with a request: its id and seq, and when it times out.
pub(crate) struct Submitted {
    id: u16,
    seq: u64,
    deadline: Instant,
    timeout: Duration,
}

/// A vfio-user client connection. Dropping it closes the connection.
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: String,
}

impl Client {
    /// Connects to the server socket at `path`.
    pub fn connect(path: &Path, options: Options) -> Result<Client, Error> {
        let sock = connect_unix(path, options.timeout)?;
        Client::from_socket(sock, options, path.display().to_string())
    }

    /// Wraps an already connected stream socket. `name` appears in messages. Its O_NONBLOCK
    /// flag is cleared: every call that must not block says so itself (MSG_DONTWAIT), and a
    /// caller waiting for its own reply sleeps inside recvmsg.
    pub fn from_socket(sock: OwnedFd, options: Options, name: String) -> Result<Client, Error> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(&sock, FcntlArg::F_GETFL)
            .map_err(|e| Error::new(e, format!("cannot configure socket {name}")))?;
        fcntl(
            &sock,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::new(e, format!("cannot configure socket {name}")))?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::new(e, "cannot create the I/O thread's eventfd"))?;
        let state = State::new(
            options.proposal.clone(),
            options.proposal.capabilities.max_data_xfer_size as usize + 16,
        );
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::new(e, "cannot create the I/O thread's epoll"))?;
        epoll
            .add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))
            .map_err(|e| Error::new(e, "cannot watch the I/O thread's eventfd"))?;
        let shared = Arc::new(Shared {
            sock,
            wake,
            epoll,
            rx: Mutex::new(Rx::default()),
            state: Mutex::new(state),
            options,
            on_close: Mutex::new(CloseNotice::default()),
            dma: Arc::default(),
            irqs: Mutex::default(),
            dma_hook: Mutex::default(),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vfio-user-io".into())
            .spawn(move || io_thread::run(for_thread))
            .map_err(|e| Error::new(Errno::EAGAIN, format!("cannot start the I/O thread: {e}")))?;
        Ok(Client {
            shared,
            thread: Mutex::new(Some(thread)),
            path: name,
        })
    }

    /// The socket path (or name) this client is connected to.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Called once, from the I/O thread, when the connection ends for any reason.
    pub fn on_close(&self, hook: impl FnOnce(&Error) + Send + 'static) {
        let announced = {
            let mut n = self
                .shared
                .on_close
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match n.announced.clone() {
                Some(err) => err,
                None => {
                    n.hook = Some(Box::new(hook));
                    return;
                }
            }
        };
        // Registered after the end was announced: call it now so nobody misses it.
        hook(&announced);
    }

    /// Called once, on the thread that ends the connection, before any request in flight is
    /// failed; the close hook ([`Client::on_close`]) follows once all of them are. Lets a
    /// consumer hand the failures and the close over together. It runs with the client's
    /// state locked, so it must not call into the client. Not called if the connection had
    /// already begun to end when it was registered.
    pub fn on_ending(&self, hook: impl FnOnce() + Send + 'static) {
        let st = self.shared.lock();
        if st.closed.is_none() {
            let mut n = self
                .shared
                .on_close
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            n.ending = Some(Box::new(hook));
        }
    }

    /// The negotiated version, once [`Client::negotiate`] has succeeded.
    pub fn version(&self) -> Option<Version> {
        self.shared.lock().version.clone()
    }

    /// Hands reading to an external event loop (see [`ExternalReader`]); the I/O thread keeps
    /// writing, expiring deadlines, and reads only as a backup. Dropping the reader hands
    /// reading back to the I/O thread.
    pub fn external_reader(&self) -> ExternalReader {
        self.shared.lock().external_reader = true;
        self.shared.wake_io();
        ExternalReader {
            shared: self.shared.clone(),
        }
    }

    /// Corks sends until the returned [`Cork`] is dropped: requests nobody blocks on
    /// ([`Client::send_callback`], [`Client::post`]) are then written together, in order, in
    /// as few sendmsg calls as the socket allows. A blocking request sent meanwhile is queued
    /// behind them and the I/O thread writes the lot at once, so nothing waits for the cork.
    pub fn cork(&self) -> Cork {
        Cork::new(&self.shared)
    }

    /// Reads the negotiated server capabilities in place (no copy of the version), once
    /// negotiation has succeeded.
    pub(crate) fn with_server_caps<R>(&self, f: impl FnOnce(&Capabilities) -> R) -> Option<R> {
        self.shared
            .lock()
            .version
            .as_ref()
            .map(|v| f(&v.capabilities))
    }

    /// Sets (or, with None, clears) the function told of every server DMA request served.
    pub fn on_dma(&self, hook: Option<DmaHook>) {
        *self
            .shared
            .dma_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// The eventfds wired to interrupts (see `irq.rs`).
    pub(crate) fn irq_table(&self) -> &Mutex<IrqTable> {
        &self.shared.irqs
    }

    /// The I/O thread's epoll set, which watches those eventfds.
    pub(crate) fn io_epoll(&self) -> &Epoll {
        &self.shared.epoll
    }

    /// The DMA ranges offered to the server (see `dma.rs`).
    pub(crate) fn dma_table(&self) -> &Arc<Mutex<DmaTable>> {
        &self.shared.dma
    }

    /// Send-path and receive counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Why the connection ended, once it has.
    pub fn closed_reason(&self) -> Option<Error> {
        self.shared.lock().closed.clone()
    }

    /// Sends VERSION and validates the reply (blocking).
    pub fn negotiate(&self) -> Result<Version, Error> {
        let slot = Arc::new(Slot::default());
        let reader = ReaderGuard::take(&self.shared);
        let sent = self.submit_version(Waiter::Slot(slot.clone()))?;
        self.ticket(slot, sent).wait_reading(reader)?;
        self.version()
            .ok_or_else(|| Error::proto("VERSION reply was not recorded"))
    }

    /// Sends VERSION; `done` gets the reply once it has been validated (the negotiated
    /// version is then available from [`Client::version`]).
    pub fn negotiate_async(&self, done: Completion) -> Result<(), Error> {
        self.submit_version(Waiter::Callback(done)).map(|_| ())
    }

    fn submit_version(&self, waiter: Waiter) -> Result<Submitted, Error> {
        let proposal = &self.shared.options.proposal;
        let json = proposal.capabilities.to_json();
        let payload = version_payload(proposal, &json);
        let req = Request::new(Command::Version as u16, &payload);
        self.submit(req, Some(waiter), true)
    }

    /// Sends a request and blocks until its reply, its deadline or the end of the connection.
    pub fn send_wait(&self, req: Request<'_>) -> Result<Reply, Error> {
        // Take the reader role before sending, so the reply cannot reach the I/O thread first.
        let reader = ReaderGuard::take(&self.shared);
        self.send_nowait(req)?.wait_reading(reader)
    }

    /// Sends a request; its reply is collected later with [`Ticket::wait`].
    pub fn send_nowait(&self, req: Request<'_>) -> Result<Ticket, Error> {
        let slot = Arc::new(Slot::default());
        let sent = self.submit(req, Some(Waiter::Slot(slot.clone())), false)?;
        Ok(self.ticket(slot, sent))
    }

    /// Sends a request; `done` is called exactly once with the reply or the failure (timeout,
    /// connection end). If this returns an error, nothing was sent and `done` is not called.
    pub fn send_callback(&self, req: Request<'_>, done: Completion) -> Result<(), Error> {
        self.send_callback_into(req, None, done)
    }

    /// [`Client::send_callback`], the reply's data received into `target` when it gives one.
    pub(crate) fn send_callback_into(
        &self,
        req: Request<'_>,
        target: Option<Arc<ReadTarget>>,
        done: Completion,
    ) -> Result<(), Error> {
        let waiter = Some(Waiter::Callback(done));
        Client::submit_on(&self.shared, req, waiter, false, false, None, target).map(|_| ())
    }

    /// [`Client::send_nowait`], the reply's data received into `target`.
    pub(crate) fn send_nowait_into(
        &self,
        req: Request<'_>,
        target: Arc<ReadTarget>,
    ) -> Result<Ticket, Error> {
        let slot = Arc::new(Slot::default());
        let waiter = Some(Waiter::Slot(slot.clone()));
        let sent = Client::submit_on(&self.shared, req, waiter, false, false, None, Some(target))?;
        Ok(self.ticket(slot, sent))
    }

    /// [`Client::send_wait`], the reply's data received into `target`.
    pub(crate) fn send_wait_into(
        &self,
        req: Request<'_>,
        target: Arc<ReadTarget>,
    ) -> Result<Reply, Error> {
        let reader = ReaderGuard::take(&self.shared);
        self.send_nowait_into(req, target)?.wait_reading(reader)
    }

    fn ticket(&self, slot: Arc<Slot>, sent: Submitted) -> Ticket {
        Ticket {
            shared: self.shared.clone(),
            slot,
            id: sent.id,
            seq: sent.seq,
            deadline: sent.deadline,
            timeout: sent.timeout,
        }
    }

    /// Sends a posted request (No_reply): nothing is waited for, the server must not answer.
    /// It is ordered with everything else on the socket, so a later request's reply proves it
    /// was processed (QEMU's posted writes). Only safe while no region is mmapped.
    pub fn post(&self, req: Request<'_>) -> Result<(), Error> {
        self.submit(req, None, false).map(|_| ())
    }

    /// [`Client::post`] of a REGION_WRITE that may travel as an entry of a REGION_WRITE_MULTI
    /// (see `write_multi.rs`).
    pub(crate) fn post_write(&self, req: Request<'_>) -> Result<(), Error> {
        Client::submit_on(&self.shared, req, None, false, true, None, None).map(|_| ())
    }

    /// Queues or writes one request; `waiter` None means a posted (No_reply) request.
    fn submit(
        &self,
        req: Request<'_>,
        waiter: Option<Waiter>,
        version: bool,
    ) -> Result<Submitted, Error> {
        Client::submit_on(&self.shared, req, waiter, version, false, None, None)
    }

    /// [`Client::submit`] on a connection's shared state (for callers that hold only that: a
    /// pump forwarding from one connection's completions to another). `coalesce` lets a small
    /// posted write join a REGION_WRITE_MULTI; `owned`, when set, is the payload (and
    /// `req.payload` is ignored).
    pub(crate) fn submit_on(
        shared: &Arc<Shared>,
        req: Request<'_>,
        waiter: Option<Waiter>,
        version: bool,
        coalesce: bool,
        owned: Option<Vec<u8>>,
        target: Option<Arc<ReadTarget>>,
    ) -> Result<Submitted, Error> {
        let payload = owned.as_deref().unwrap_or(req.payload);
        // Only for messages: no allocation on the path of a request that goes out.
        let name = || command_name(req.command);
        let invalid = |what: String| Error::new(Errno::EINVAL, what).with_command(req.command);
        if !version && req.command == Command::Version as u16 {
            return Err(invalid(
                "VERSION is sent by negotiate(), not as a request".into(),
            ));
        }
        if Command::from_u16(req.command).is_some_and(|c| c.is_server_to_client()) {
            return Err(invalid(format!(
                "{} is sent by the server, not the client",
                name()
            )));
        }
        if HEADER_SIZE + payload.len() > u32::MAX as usize {
            return Err(invalid(format!("{} payload is too large", name())));
        }
        let fds = req.fds;
        let posted = waiter.is_none();
        // A request someone will block on (send_wait, a ticket) never waits behind a cork.
        let corkable = !matches!(waiter, Some(Waiter::Slot(_)));
        let mut header = Header::command(0, req.command, payload.len(), posted).encode();
        let timeout = req.timeout.unwrap_or(shared.options.timeout);
        let deadline = Instant::now() + timeout;
        let sock = shared.sock.as_raw_fd();

        let result = {
            let mut st = shared.lock();
            if let Some(e) = &st.closed {
                return Err(e.clone().with_command(req.command));
            }
            if version {
                if st.version.is_some() || st.version_in_flight {
                    return Err(Error::new(
                        Errno::EALREADY,
                        "VERSION has already been negotiated or is in progress",
                    ));
                }
            } else if st.version.is_none() {
                return Err(Error::new(
                    Errno::ENOTCONN,
                    format!(
                        "cannot send {} before version negotiation has succeeded",
                        name()
                    ),
                )
                .with_command(req.command));
            }
            if let Some(v) = &st.version {
                let max = v.capabilities.max_msg_fds as usize;
                if fds.len() > max {
                    return Err(invalid(format!(
                        "{} carries {} fds; the server accepts at most {max} per message",
                        name(),
                        fds.len()
                    )));
                }
                check_request(req.command, payload, &v.capabilities)
                    .map_err(|what| Error::new(Errno::E2BIG, what).with_command(req.command))?;
            }
            if !st.outgoing.is_empty()
                && st.outgoing.cost() + Outgoing::cost_of(HEADER_SIZE + payload.len(), fds.len())
                    > shared.options.max_queued_bytes
            {
                return Err(Error::new(
                    Errno::ENOBUFS,
                    format!(
                        "{} not sent: {} bytes already wait to be written to a server that is not reading",
                        name(),
                        st.outgoing.cost()
                    ),
                )
                .with_command(req.command));
            }
            if matches!(waiter, Some(Waiter::Callback(_)))
                && !st.external_reader
                && !st.caller_reading
                && st.caller_read_at.take().is_some()
            {
                // The I/O thread was left off the read side after blocking calls; this reply
                // is for it to read, now.
                st.backup_check_at = None;
                shared.sync_interest(&mut st);
            }
            let id = st.alloc_id(waiter.is_some())?;
            header[0..2].copy_from_slice(&id.to_ne_bytes());
            let seq = st.next_seq();
            if version {
                st.version_in_flight = true;
            }
            let wake_for_deadline = match waiter {
                Some(waiter) => st.add_pending(
                    id,
                    Pending {
                        seq,
                        command: req.command,
                        deadline,
                        waiter,
                        sent: false,
                        reply_limit: reply_size_limit(req.command, payload),
                        fd_limit: reply_fd_limit(req.command, OUR_MAX_MSG_FDS),
                        target,
                    },
                ),
                None => false,
            };
            let new = NewRequest {
                header,
                payload: if owned.is_some() { &[] } else { req.payload },
                owned,
                fds,
                id: (!posted).then_some(id),
                seq,
            };
            // A message with fds is written alone anyway, so a cork gains nothing from it:
            // it goes now, behind what the cork holds, rather than as a queued copy whose
            // duplicated fds cost a dup and a close each (dmaMapMany's maps run under the
            // cork of the event loop that resumed the caller).
            let corked = st.corks > 0 && corkable && fds.is_empty();
            let flushed = if st.corks > 0 && !fds.is_empty() && !st.want_write {
                st.flush(sock)
            } else {
                Ok(())
            };
            let sent = if let Err(e) = flushed {
                Err(SendFailure::Fatal(e))
            } else if coalesce && st.coalesce_write(&new, corked) {
                if !corked {
                    st.want_write = true;
                }
                Ok(if corked { Sent::Corked } else { Sent::Queued })
            } else if corked {
                st.cork_request(new).map(|()| Sent::Corked)
            } else {
                st.send_request(sock, new, !shared.options.send_queued)
            };
            let sent = match sent {
                Err(SendFailure::Refused(e)) => {
                    st.forget_refused(id, seq, !posted);
                    return Err(e.with_command(req.command));
                }
                Err(SendFailure::Fatal(e)) => Err(e),
                // A cork holds little: a long burst made under one is written as it grows.
                Ok(Sent::Corked) if st.outgoing.cost() > CORK_LIMIT && !st.want_write => {
                    st.flush(sock).map(|()| {
                        if st.want_write {
                            Sent::Queued
                        } else {
                            Sent::Corked
                        }
                    })
                }
                Ok(s) => Ok(s),
            };
            (id, seq, sent, wake_for_deadline)
        };
        let (id, seq, result, wake_for_deadline) = result;
        match result {
            // Written inline, but its deadline is earlier than the I/O thread's next wakeup.
            Ok(Sent::Done | Sent::Corked) if wake_for_deadline => shared.wake_io(),
            Ok(Sent::Done | Sent::Corked) => {}
            // The I/O thread may be asleep in poll without POLLOUT; wake it to watch.
            Ok(Sent::Queued) => shared.wake_io(),
            Err(e) => shared.fail(e),
        }
        Ok(Submitted {
            id,
            seq,
            deadline,
            timeout,
        })
    }

    /// Closes the connection: every queued and pending request fails with ECONNABORTED,
    /// the I/O thread stops. Idempotent.
    pub fn close(&self) {
        self.shared.fail(Error::new(
            Errno::ECONNABORTED,
            "connection was closed by the client",
        ));
        // Called from a completion (which may hold the receive side the I/O thread needs to
        // announce the close), joining could deadlock: the thread is left to finish alone.
        if crate::state::in_completion() {
            return;
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        if let Some(mut rx) = self.shared.rx_try_lock() {
            rx.reset();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}
