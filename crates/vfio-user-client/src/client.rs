//! The public client: connect, negotiate, send, close.

use crate::io_thread::{self, read_once, receive, SOCK_TOKEN, WAKE_TOKEN};
use crate::outgoing::Outgoing;
use crate::pending::{Completion, Pending, Reply, Slot, Waiter};
use crate::rx::Rx;
use crate::socket::connect_unix;
use crate::state::{Fired, Sent, ServerRequest, State, Stats};
use crate::Error;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{shutdown, Shutdown};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vfio_user_proto::{
    check_request, command_name, reply_fd_limit, reply_size_limit, version::version_payload,
    Capabilities, Command, Header, Version, VersionProposal, HEADER_SIZE,
};

/// Most fds we accept in one message, as advertised in our capabilities.
pub const OUR_MAX_MSG_FDS: u32 = 16;

/// Default for [`Options::max_queued_bytes`].
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 256 << 20;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Default time to wait for a reply (per call overridable). QEMU's default is 5 s.
    pub timeout: Duration,
    /// Never write from the caller's thread: every message goes through the queue and the
    /// I/O thread (QEMU's `x-send-queued`). For tests of that path and for callers that must
    /// never make a syscall.
    pub send_queued: bool,
    /// What we propose in VERSION.
    pub proposal: VersionProposal,
    /// Most bytes queued for a server that does not read: beyond this, new requests are
    /// refused (ENOBUFS) and a server that floods us with requests while not reading our
    /// replies is disconnected.
    pub max_queued_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_millis(5000),
            send_queued: false,
            proposal: VersionProposal {
                major: 0,
                minor: 0,
                capabilities: Capabilities {
                    max_msg_fds: OUR_MAX_MSG_FDS,
                    ..Capabilities::default()
                },
            },
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}

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

type CloseHook = Box<dyn FnOnce(&Error) + Send>;

pub(crate) struct Shared {
    pub sock: OwnedFd,
    pub wake: EventFd,
    pub epoll: Epoll,
    /// The receive side. Whoever holds it reads: the I/O thread, or a caller waiting for its
    /// own reply (lock order: rx before state).
    pub rx: Mutex<Rx>,
    state: Mutex<State>,
    options: Options,
    on_close: Mutex<CloseNotice>,
}

/// The close hook and whether the end has been announced, under one lock so a hook
/// registered at any moment is called exactly once.
#[derive(Default)]
struct CloseNotice {
    hook: Option<CloseHook>,
    announced: Option<Error>,
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
        // caller or an event loop is the reader, only schedules a backup check. Leaving it
        // armed while a caller reads costs less than two epoll_ctl calls per blocking call.
        let mut want = EpollFlags::EPOLLONESHOT;
        if st.backup_check_at.is_none() {
            want |= EpollFlags::EPOLLIN;
        }
        if st.want_write {
            want |= EpollFlags::EPOLLOUT;
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

    /// Makes the calling thread the reader if nobody is reading right now.
    fn become_reader(&self) -> Option<ReaderGuard<'_>> {
        let rx = self.rx_try_lock()?;
        let mut st = self.lock();
        if st.closed.is_some() || st.caller_reading {
            return None;
        }
        st.caller_reading = true;
        self.sync_interest(&mut st);
        drop(st);
        Some(ReaderGuard { shared: self, rx })
    }

    pub fn default_timeout(&self) -> Duration {
        self.options.timeout
    }

    pub fn wake_io(&self) {
        let _ = self.wake.write(1);
    }

    /// Ends the connection with `err`: fails everything at once and stops the I/O thread.
    pub fn fail(&self, err: Error) {
        let mut fired = Fired::default();
        self.lock().close(err, &mut fired);
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

    /// The dispatch point for server-to-client requests. Until DMA is served, every request
    /// gets an error reply (ENOSYS, or E2BIG when too big to store) unless it said No_reply;
    /// its fds are closed. The stream stays in sync either way.
    pub fn serve(&self, req: ServerRequest) {
        self.lock().stats.server_requests += 1;
        drop(req.fds);
        if req.header.no_reply() {
            return;
        }
        let errno = if req.oversize {
            Errno::E2BIG
        } else {
            Errno::ENOSYS
        };
        let reply = Header::error_reply_to(&req.header, errno as u32).encode();
        self.send_unnumbered(reply.to_vec());
    }

    /// Sends a message that expects no reply (our replies to server requests).
    fn send_unnumbered(&self, bytes: Vec<u8>) {
        let msg = Outgoing {
            id: None,
            seq: 0,
            bytes,
            written: 0,
            fds: Vec::new(),
        };
        let result = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            if st.queued_bytes > self.options.max_queued_bytes {
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
            Ok(Sent::Queued) => self.wake_io(),
            Err(e) => self.fail(e),
        }
    }
}

/// Lets an event loop (Node's, through the binding) read the socket on its own thread when it
/// is readable, so replies reach promise callbacks without a hop through the I/O thread.
pub struct ExternalReader {
    shared: Arc<Shared>,
}

impl ExternalReader {
    /// The socket, to watch for readability. Borrowed: never close it.
    pub fn fd(&self) -> RawFd {
        self.shared.sock.as_raw_fd()
    }

    /// Reads and dispatches what is available. Returns false once the connection has ended
    /// (stop watching).
    pub fn on_readable(&self) -> bool {
        if let Some(mut rx) = self.shared.rx_try_lock() {
            if let Err(e) = receive(&self.shared, &mut rx, self.fd()) {
                self.shared.fail(e);
            }
        }
        self.shared.lock().closed.is_none()
    }
}

impl Drop for ExternalReader {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.external_reader = false;
        st.backup_check_at = None;
        drop(st);
        self.shared.wake_io();
    }
}

/// The receive side held by a waiting caller; hands it back to the I/O thread on drop.
struct ReaderGuard<'a> {
    shared: &'a Shared,
    rx: MutexGuard<'a, Rx>,
}

impl ReaderGuard<'_> {
    /// Reads and dispatches until `slot` is filled, `deadline` passes or the connection ends.
    fn read_until(&mut self, slot: &Slot, deadline: Instant) {
        let sock = self.shared.sock.as_fd();
        while !slot.is_filled() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let timeout =
                PollTimeout::try_from(left.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    self.shared.fail(Error::new(
                        Errno::ECONNRESET,
                        format!("waiting on the socket failed: {}", e.desc()),
                    ));
                    return;
                }
            }
            if let Err(e) = read_once(self.shared, &mut self.rx, sock.as_raw_fd()) {
                self.shared.fail(e);
                return;
            }
        }
    }
}

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.caller_reading = false;
        if !st.external_reader {
            // The I/O thread was told to wait for us; we are done, so it may read (and be
            // woken) at once rather than after the grace period.
            st.backup_check_at = None;
        }
        self.shared.sync_interest(&mut st);
    }
}

/// A request sent with [`Client::send_nowait`], to be collected with [`Ticket::wait`].
pub struct Ticket {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    id: u16,
    seq: u64,
    deadline: Instant,
}

impl Ticket {
    /// Blocks until the reply arrives, the deadline passes or the connection ends.
    pub fn wait(self) -> Result<Reply, Error> {
        if let Some(r) = self.slot.try_take() {
            return r;
        }
        let shared = self.shared.clone();
        let reader = shared.become_reader();
        self.wait_reading(reader)
    }

    /// Fast path: read the reply on this thread, as a blocking client would, instead of
    /// waking the I/O thread to wake us. Anything else that arrives meanwhile is dispatched
    /// exactly as the I/O thread would. Without the reader role, sleep until the I/O thread
    /// (or another reading caller) fills the slot.
    fn wait_reading(self, reader: Option<ReaderGuard<'_>>) -> Result<Reply, Error> {
        if let Some(mut reader) = reader {
            reader.read_until(&self.slot, self.deadline);
        } else {
            // Someone else was reading. They may stop before our reply comes (an event loop's
            // backup read, another caller): look again now and then instead of relying on a
            // backup check alone.
            loop {
                let now = Instant::now();
                if now >= self.deadline {
                    break;
                }
                let nap = self.deadline.min(now + Duration::from_millis(1));
                if let Some(r) = self.slot.wait_until(Some(nap)) {
                    return r;
                }
                if let Some(mut reader) = self.shared.become_reader() {
                    reader.read_until(&self.slot, self.deadline);
                    break;
                }
            }
        }
        if let Some(r) = self.slot.wait_until(Some(self.deadline)) {
            return r;
        }
        // Our deadline passed before the I/O thread noticed: expire it ourselves (no thread
        // hop), unless a reply slipped in meanwhile, which then is in the slot.
        let mut fired = Fired::default();
        self.shared.lock().time_out(self.id, self.seq, &mut fired);
        fired.fire();
        self.slot.wait()
    }
}

/// A vfio-user client connection. Dropping it closes the connection.
pub struct Client {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: String,
}

impl Client {
    /// Connects to the server socket at `path`.
    pub fn connect(path: &Path, options: Options) -> Result<Client, Error> {
        let sock = connect_unix(path, options.timeout)?;
        Client::from_socket(sock, options, path.display().to_string())
    }

    /// Wraps an already connected stream socket (it is made nonblocking). `name` appears in
    /// messages.
    pub fn from_socket(sock: OwnedFd, options: Options, name: String) -> Result<Client, Error> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(&sock, FcntlArg::F_GETFL)
            .map_err(|e| Error::new(e, format!("cannot configure socket {name}")))?;
        fcntl(
            &sock,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
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
        let reader = self.shared.become_reader();
        let (id, seq, deadline) = self.submit_version(Waiter::Slot(slot.clone()))?;
        self.ticket(slot, id, seq, deadline).wait_reading(reader)?;
        self.version()
            .ok_or_else(|| Error::proto("VERSION reply was not recorded"))
    }

    /// Sends VERSION; `done` gets the reply once it has been validated (the negotiated
    /// version is then available from [`Client::version`]).
    pub fn negotiate_async(&self, done: Completion) -> Result<(), Error> {
        self.submit_version(Waiter::Callback(done)).map(|_| ())
    }

    fn submit_version(&self, waiter: Waiter) -> Result<(u16, u64, Instant), Error> {
        let proposal = &self.shared.options.proposal;
        let json = proposal.capabilities.to_json();
        let payload = version_payload(proposal, &json);
        let req = Request::new(Command::Version as u16, &payload);
        self.submit(req, Some(waiter), true)
    }

    /// Sends a request and blocks until its reply, its deadline or the end of the connection.
    pub fn send_wait(&self, req: Request<'_>) -> Result<Reply, Error> {
        // Take the reader role before sending, so the reply cannot reach the I/O thread first.
        let reader = self.shared.become_reader();
        self.send_nowait(req)?.wait_reading(reader)
    }

    /// Sends a request; its reply is collected later with [`Ticket::wait`].
    pub fn send_nowait(&self, req: Request<'_>) -> Result<Ticket, Error> {
        let slot = Arc::new(Slot::default());
        let (id, seq, deadline) = self.submit(req, Some(Waiter::Slot(slot.clone())), false)?;
        Ok(self.ticket(slot, id, seq, deadline))
    }

    /// Sends a request; `done` is called exactly once with the reply or the failure (timeout,
    /// connection end). If this returns an error, nothing was sent and `done` is not called.
    pub fn send_callback(&self, req: Request<'_>, done: Completion) -> Result<(), Error> {
        self.submit(req, Some(Waiter::Callback(done)), false)
            .map(|_| ())
    }

    fn ticket(&self, slot: Arc<Slot>, id: u16, seq: u64, deadline: Instant) -> Ticket {
        Ticket {
            shared: self.shared.clone(),
            slot,
            id,
            seq,
            deadline,
        }
    }

    /// Sends a posted request (No_reply): nothing is waited for, the server must not answer.
    /// It is ordered with everything else on the socket, so a later request's reply proves it
    /// was processed (QEMU's posted writes). Only safe while no region is mmapped.
    pub fn post(&self, req: Request<'_>) -> Result<(), Error> {
        self.submit(req, None, false).map(|_| ())
    }

    /// Queues or writes one request; `waiter` None means a posted (No_reply) request.
    fn submit(
        &self,
        req: Request<'_>,
        waiter: Option<Waiter>,
        version: bool,
    ) -> Result<(u16, u64, Instant), Error> {
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
        if HEADER_SIZE + req.payload.len() > u32::MAX as usize {
            return Err(invalid(format!("{} payload is too large", name())));
        }
        let fds = req
            .fds
            .iter()
            .map(|f| f.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EBADF as i32));
                Error::new(
                    errno,
                    format!("cannot duplicate an fd for {}: {}", name(), errno.desc()),
                )
            })?;
        let mut bytes = Vec::with_capacity(HEADER_SIZE + req.payload.len());
        let posted = waiter.is_none();
        bytes.extend_from_slice(
            &Header::command(0, req.command, req.payload.len(), posted).encode(),
        );
        bytes.extend_from_slice(req.payload);
        let timeout = req.timeout.unwrap_or(self.shared.options.timeout);
        let deadline = Instant::now() + timeout;
        let sock = self.shared.sock.as_raw_fd();

        let result = {
            let mut st = self.shared.lock();
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
                check_request(req.command, req.payload, &v.capabilities)
                    .map_err(|what| Error::new(Errno::E2BIG, what).with_command(req.command))?;
            }
            if !st.outgoing.is_empty()
                && st.queued_bytes + Outgoing::cost_of(bytes.len(), fds.len())
                    > self.shared.options.max_queued_bytes
            {
                return Err(Error::new(
                    Errno::ENOBUFS,
                    format!(
                        "{} not sent: {} bytes already wait to be written to a server that is not reading",
                        name(),
                        st.queued_bytes
                    ),
                )
                .with_command(req.command));
            }
            let id = st.alloc_id(waiter.is_some())?;
            bytes[0..2].copy_from_slice(&id.to_ne_bytes());
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
                        reply_limit: reply_size_limit(req.command, req.payload),
                        fd_limit: reply_fd_limit(req.command, OUR_MAX_MSG_FDS),
                    },
                ),
                None => false,
            };
            let msg = Outgoing {
                id: (!posted).then_some(id),
                seq,
                bytes,
                written: 0,
                fds,
            };
            let sent = st.send(sock, msg, !self.shared.options.send_queued);
            (id, seq, sent, wake_for_deadline)
        };
        let (id, seq, result, wake_for_deadline) = result;
        match result {
            // Written inline, but its deadline is earlier than the I/O thread's next wakeup.
            Ok(Sent::Done) if wake_for_deadline => self.shared.wake_io(),
            Ok(Sent::Done) => {}
            // The I/O thread may be asleep in poll without POLLOUT; wake it to watch.
            Ok(Sent::Queued) => self.shared.wake_io(),
            Err(e) => self.shared.fail(e),
        }
        Ok((id, seq, deadline))
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
