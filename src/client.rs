//! `NativeClient`: a `vfio_user_client::Client` as a JS class.

use crate::batch::{Batch, BatchArea};
use crate::convert::{self, NativeError, NativeVersion, NativeVersionResult};
use crate::event::Event;
use crate::events::EventQueue;
use crate::js_callback::JsCallback;
use crate::loop_reader::LoopReader;
use napi::bindgen_prelude::{
    AsyncTask, BufferSlice, Either, Function, JsValue, Uint32Array, Uint8Array,
};
use napi::{Env, Result, Status, Task};
use napi_derive::napi;
use nix::errno::Errno;
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vfio_user_client::{Client, Error, Options, ReadCancel, Request};

/// A connection as a JS class. Once the connection has ended and JS has taken its close
/// event, [`NativeClient::release`] lets go of everything native (I/O thread, socket, eventfd,
/// epoll, the JS callback); the same happens when the object is garbage-collected.
#[napi]
pub struct NativeClient {
    /// None once released.
    client: RefCell<Option<Client>>,
    /// The reads into memory in flight, by token, for `cancel_read` (an abort); each leaves
    /// when it settles.
    pub(crate) reads: Arc<Mutex<HashMap<u32, ReadCancel>>>,
    pub(crate) events: EventQueue,
    loop_reader: RefCell<Option<LoopReader>>,
    path: String,
    /// Why the connection ended, kept for calls made after release.
    ended: RefCell<Option<Error>>,
    /// Where `send_sync` puts a reply's header fields and fds (see [`SCRATCH_WORDS`]), so a
    /// reply reaches JS as one Buffer and a few integers instead of two objects.
    scratch: RefCell<Option<Uint32Array>>,
    /// The typed arrays batches of plain replies are written into (see `batch.rs`), kept
    /// referenced while the event queue may write into them.
    batch_arrays: RefCell<Option<(Uint32Array, Uint8Array)>>,
    /// Held from [`NativeClient::cork`] to [`NativeClient::uncork`] (the end of a JS job).
    cork: RefCell<Option<vfio_user_client::Cork>>,
    /// Where `send_sync` copies a reply payload of up to the array's length; JS copies it out
    /// into a pooled Buffer, which costs less than a new Buffer made here.
    data: RefCell<Option<Uint8Array>>,
    /// The failure of the last `send_sync` that returned no reply, for `take_error`.
    pub(crate) last_error: RefCell<Option<Error>>,
}

/// Most served-DMA reports waiting for JS at once (see `observe_dma`).
const MAX_QUEUED_DMA_REPORTS: usize = 4096;

/// `send_sync`'s scratch: id, command, flags, fd count, then up to 16 fds.
pub const SCRATCH_WORDS: usize = 4 + vfio_user_client::OUR_MAX_MSG_FDS as usize;

/// Reply payloads too big for the data array but up to this size are copied into a
/// JS-owned Buffer (cheaper than an external one, which needs a finalizer); bigger ones are
/// handed over without a copy.
const COPY_LIMIT: usize = 64 * 1024;

#[napi(object)]
pub struct NativeConnectOptions {
    pub timeout_ms: u32,
    pub send_queued: bool,
    /// Checked by ts/ to be a safe integer of at least 64 KiB.
    pub max_queued_bytes: Option<f64>,
}

pub struct ConnectTask {
    path: PathBuf,
    options: Options,
}

impl Task for ConnectTask {
    type Output = std::result::Result<Client, Error>;
    type JsValue = Either<NativeClient, NativeError>;

    fn compute(&mut self) -> Result<Self::Output> {
        Ok(Client::connect(&self.path, self.options.clone()))
    }

    fn resolve(&mut self, _env: Env, output: Self::Output) -> Result<Self::JsValue> {
        Ok(match output {
            Ok(client) => Either::A(NativeClient::wrap(client)),
            Err(e) => Either::B(convert::from_error(&e)),
        })
    }
}

/// Connects on a libuv worker (a full listen backlog can make connect wait); resolves to the
/// client or to the error.
#[napi(ts_return_type = "Promise<NativeClient | NativeError>")]
pub fn connect(path: String, options: NativeConnectOptions) -> AsyncTask<ConnectTask> {
    AsyncTask::new(ConnectTask {
        path: PathBuf::from(path),
        options: connect_options(&options),
    })
}

fn connect_options(options: &NativeConnectOptions) -> Options {
    Options {
        timeout: Duration::from_millis(u64::from(options.timeout_ms)),
        send_queued: options.send_queued,
        max_queued_bytes: options
            .max_queued_bytes
            .map_or(Options::default().max_queued_bytes, |b| b as usize),
        ..Options::default()
    }
}

/// A client on an already connected AF_UNIX stream socket `fd` (the caller keeps `fd`; the
/// client works on a duplicate), named `fd:N` in messages.
#[napi]
pub fn connect_fd(fd: i32, options: NativeConnectOptions) -> Either<NativeClient, NativeError> {
    // SAFETY: ts/ checked it is a non-negative integer; it is only borrowed during this call
    // (checked and duplicated), and a number that is not an open fd fails with EBADF.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let started = vfio_user_client::adopt_unix_stream(borrowed)
        .and_then(|sock| Client::from_socket(sock, connect_options(&options), format!("fd:{fd}")));
    match started {
        Ok(client) => Either::A(NativeClient::wrap(client)),
        Err(e) => Either::B(convert::from_error(&e)),
    }
}

pub(crate) fn borrow_fds(fds: &[i32]) -> Vec<BorrowedFd<'_>> {
    fds.iter()
        // SAFETY: the caller (ts/) has checked each is a non-negative integer; the client
        // only duplicates them (F_DUPFD_CLOEXEC) during this call, and a number that is not
        // an open fd makes that dup fail with EBADF rather than touch anything.
        .map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) })
        .collect()
}

fn request<'a>(
    command: u32,
    payload: &'a [u8],
    fds: &'a [BorrowedFd<'a>],
    timeout_ms: Option<u32>,
) -> Request<'a> {
    Request {
        command: command as u16,
        payload,
        fds,
        timeout: convert::timeout(timeout_ms),
    }
}

#[napi]
impl NativeClient {
    fn wrap(client: Client) -> NativeClient {
        let events = EventQueue::default();
        // The failures of what was in flight and the close event reach JS in one batch.
        let on_ending = events.clone();
        client.on_ending(move || on_ending.hold_for_end());
        let on_close = events.clone();
        client.on_close(move |e| on_close.push_end(Event::Closed(e.clone())));
        let on_irq = events.clone();
        client.on_irq(Box::new(move |group, vector, count| {
            on_irq.push_irq(group, vector, count);
        }));
        NativeClient {
            path: client.path().to_string(),
            client: RefCell::new(Some(client)),
            reads: Arc::default(),
            events,
            loop_reader: RefCell::new(None),
            ended: RefCell::new(None),
            scratch: RefCell::new(None),
            batch_arrays: RefCell::new(None),
            cork: RefCell::new(None),
            data: RefCell::new(None),
            last_error: RefCell::new(None),
        }
    }

    /// Runs `f` on the live client, or returns the error that ended it.
    pub(crate) fn live<R>(
        &self,
        f: impl FnOnce(&Client) -> std::result::Result<R, Error>,
    ) -> std::result::Result<R, Error> {
        match self.client.borrow().as_ref() {
            Some(c) => f(c),
            None => Err(self.ended.borrow().clone().unwrap_or_else(|| {
                Error::new(Errno::ECONNABORTED, "connection was closed by the client")
            })),
        }
    }

    /// Registers the function that receives batches of completions and the close event, the
    /// arrays batches share with it (`batch_words`, `batch_data`: see `batch.rs`), and the
    /// scratch arrays of `send_sync`: `scratch` (at least [`SCRATCH_WORDS`] long) and `data`,
    /// for small payloads. The arrays must be JS's own, used for nothing else.
    #[napi(
        ts_args_type = "onEvents: (batch: Array<number | Buffer | NativeEvent | null> | null) => void, batchWords: Uint32Array, batchData: Uint8Array, scratch: Uint32Array, data: Uint8Array"
    )]
    pub fn start(
        &self,
        env: Env,
        on_events: Function<'_, Batch, ()>,
        mut batch_words: Uint32Array,
        mut batch_data: Uint8Array,
        scratch: Uint32Array,
        data: Uint8Array,
    ) -> Result<()> {
        if self.batch_arrays.borrow().is_some() {
            return Err(napi::Error::new(
                Status::GenericFailure,
                "start() was already called",
            ));
        }
        if scratch.len() < SCRATCH_WORDS {
            return Err(napi::Error::new(
                Status::InvalidArg,
                format!("scratch must hold {SCRATCH_WORDS} words"),
            ));
        }
        *self.scratch.borrow_mut() = Some(scratch);
        *self.data.borrow_mut() = Some(data);
        // SAFETY: on the JS thread during a napi call; the arrays are referenced by this
        // object until `release`, which makes the queue forget the area first; taking their
        // data (napi_get_typedarray_info) moved it out of V8's heap for good, so it does not
        // move; ts/client.ts gives two arrays of their own, used for nothing else.
        let area = unsafe { BatchArea::new(batch_words.as_mut(), batch_data.as_mut()) };
        *self.batch_arrays.borrow_mut() = Some((batch_words, batch_data));
        let callback = JsCallback::new(env.raw(), on_events.value().value)?;
        let queue = self.events.downgrade();
        let tsfn = on_events
            .build_threadsafe_function::<()>()
            .callee_handled::<false>()
            .weak::<true>()
            .build_callback(move |_ctx| Ok(queue.take()))?;
        self.events.set_sink(tsfn, area);
        if let Some(c) = self.client.borrow().as_ref() {
            // Replies are read on this event loop when it is free (no thread hop per reply).
            *self.loop_reader.borrow_mut() = Some(LoopReader::start(
                &env,
                c.external_reader(),
                (callback, self.events.clone()),
            )?);
        }
        // Anything that happened before the sink existed (a close) is delivered now.
        self.events.wake();
        Ok(())
    }

    #[napi(getter)]
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// Sends VERSION; the result arrives as an event with `token`. Returns an error if
    /// nothing could be sent.
    #[napi]
    pub fn negotiate(&self, token: u32) -> Option<NativeError> {
        let events = self.events.clone();
        self.live(|c| c.negotiate_async(Box::new(move |r| events.push(Event::Done(token, r)))))
            .err()
            .map(|e| convert::from_error(&e))
    }

    #[napi]
    pub fn negotiate_sync(&self) -> NativeVersionResult {
        match self.live(Client::negotiate) {
            Ok(v) => NativeVersionResult {
                version: Some(convert::version(&v)),
                error: None,
            },
            Err(e) => NativeVersionResult {
                version: None,
                error: Some(convert::from_error(&e)),
            },
        }
    }

    #[napi]
    pub fn version(&self) -> Option<NativeVersion> {
        let v = self.client.borrow().as_ref().and_then(Client::version);
        v.as_ref().map(convert::version)
    }

    /// Sends a request; the reply or failure arrives as an event with `token`. Returns an
    /// error if nothing was sent (then no event follows).
    #[napi]
    pub fn send(
        &self,
        token: u32,
        command: u32,
        payload: BufferSlice,
        fds: Option<Vec<i32>>,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let borrowed = borrow_fds(fds.as_deref().unwrap_or_default());
        self.live(|c| {
            c.send_callback(
                request(command, &payload, &borrowed, timeout_ms),
                Box::new(move |r| events.push(Event::Done(token, r))),
            )
        })
        .err()
        .map(|e| convert::from_error(&e))
    }

    /// Sends a posted request (No_reply). Returns an error if nothing was sent.
    #[napi]
    pub fn post(
        &self,
        command: u32,
        payload: BufferSlice,
        fds: Option<Vec<i32>>,
    ) -> Option<NativeError> {
        let borrowed = borrow_fds(fds.as_deref().unwrap_or_default());
        self.live(|c| c.post(request(command, &payload, &borrowed, None)))
            .err()
            .map(|e| convert::from_error(&e))
    }

    /// Sends a request and blocks the JS thread until its reply (timed condvar). Puts the
    /// reply's header fields and fds in the scratch array and returns its payload: its length
    /// when it was copied into the data array, else a Buffer. Returns null on failure; the
    /// error is taken with `take_error`.
    #[napi(ts_return_type = "number | Buffer | null")]
    pub fn send_sync<'env>(
        &self,
        env: &'env Env,
        command: u32,
        payload: BufferSlice,
        fds: Option<Vec<i32>>,
        timeout_ms: Option<u32>,
    ) -> Result<Option<Either<u32, BufferSlice<'env>>>> {
        let borrowed = borrow_fds(fds.as_deref().unwrap_or_default());
        let result = self.live(|c| c.send_wait(request(command, &payload, &borrowed, timeout_ms)));
        let reply = match result {
            Ok(r) => r,
            Err(e) => {
                *self.last_error.borrow_mut() = Some(e);
                return Ok(None);
            }
        };
        let mut scratch = self.scratch.borrow_mut();
        let Some(array) = scratch.as_mut() else {
            return Err(napi::Error::new(
                Status::GenericFailure,
                "start() was not called",
            ));
        };
        // SAFETY: the array is referenced (kept alive) by this object and we are on the JS
        // thread, which runs no JS during this call: nothing else reads or writes it now.
        let words = unsafe { array.as_mut() };
        let h = reply.header;
        words[0] = u32::from(h.id);
        words[1] = u32::from(h.command);
        words[2] = h.flags;
        // The client bounds a reply's fds by what we advertised (16); more cannot arrive.
        words[3] = reply.fds.len().min(SCRATCH_WORDS - 4) as u32;
        for (w, fd) in words[4..].iter_mut().zip(reply.fds) {
            *w = fd.into_raw_fd() as u32;
        }
        let len = reply.payload.len();
        if let Some(data) = self.data.borrow_mut().as_mut() {
            // SAFETY: as for the scratch array above.
            let bytes = unsafe { data.as_mut() };
            if let Some(room) = bytes.get_mut(..len) {
                room.copy_from_slice(&reply.payload);
                return Ok(Some(Either::A(len as u32)));
            }
        }
        let payload = if len <= COPY_LIMIT {
            BufferSlice::copy_from(env, &reply.payload)?
        } else {
            BufferSlice::from_data(env, reply.payload)?
        };
        Ok(Some(Either::B(payload)))
    }

    /// Keeps a sync call's failure for `take_error`; true when it succeeded.
    pub(crate) fn keep_error<T>(&self, r: std::result::Result<T, Error>) -> bool {
        match r {
            Ok(_) => true,
            Err(e) => {
                *self.last_error.borrow_mut() = Some(e);
                false
            }
        }
    }

    /// Starts (or stops) reporting served server DMA requests as events: only while JS has
    /// a `'dma'` listener, so serving costs nothing more otherwise.
    #[napi]
    pub fn observe_dma(&self, enabled: bool) {
        let events = self.events.clone();
        // Reports JS has not taken yet stop queueing here; the next one says how many
        // were missed, so a server flooding DMA requests cannot grow this queue without bound.
        let missed = std::sync::atomic::AtomicU32::new(0);
        let hook: Option<vfio_user_client::DmaHook> = enabled.then(|| {
            Box::new(move |write, address, count, errno| {
                use std::sync::atomic::Ordering::Relaxed;
                let before = missed.load(Relaxed);
                let e = Event::Dma(write, address, count, errno, before);
                if events.push_unless_full(e, MAX_QUEUED_DMA_REPORTS) {
                    missed.fetch_sub(before, Relaxed);
                } else {
                    missed.fetch_add(1, Relaxed);
                }
            }) as vfio_user_client::DmaHook
        });
        if let Some(c) = self.client.borrow().as_ref() {
            c.on_dma(hook);
        }
    }

    /// The error of the last `send_sync` that returned null.
    #[napi]
    pub fn take_error(&self) -> Option<NativeError> {
        self.last_error
            .borrow_mut()
            .take()
            .map(|e| convert::from_error(&e))
    }

    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.client.borrow().as_ref().is_none_or(Client::is_closed)
    }

    /// Corks sends: requests nobody blocks on are queued until [`NativeClient::uncork`], then
    /// written together (small posted writes as REGION_WRITE_MULTI). Idempotent.
    #[napi]
    pub fn cork(&self) {
        if self.cork.borrow().is_some() {
            return;
        }
        let cork = self.client.borrow().as_ref().map(Client::cork);
        *self.cork.borrow_mut() = cork;
    }

    /// Releases [`NativeClient::cork`]: what was queued is written now. Idempotent.
    #[napi]
    pub fn uncork(&self) {
        let cork = self.cork.borrow_mut().take();
        drop(cork);
    }

    /// Closes the connection; in-flight requests fail with ECONNABORTED, and the close event
    /// follows. Idempotent.
    #[napi]
    pub fn close(&self) {
        if let Some(mut r) = self.loop_reader.borrow_mut().take() {
            r.close();
        }
        if let Some(c) = self.client.borrow().as_ref() {
            c.close();
        }
    }

    /// Lets go of everything native: the connection is closed if it was not, its I/O thread
    /// joined, its fds closed, and the JS callback released (no event follows). JS calls it
    /// once it has taken the close event. Idempotent.
    #[napi]
    pub fn release(&self) {
        self.uncork();
        if let Some(mut r) = self.loop_reader.borrow_mut().take() {
            r.close();
        }
        let client = self.client.borrow_mut().take();
        if let Some(c) = client {
            c.close();
            *self.ended.borrow_mut() = c.closed_reason();
        }
        self.events.clear_sink();
        self.batch_arrays.borrow_mut().take();
    }
}

impl Drop for NativeClient {
    /// Garbage-collected (unreachable from JS): nothing native may outlive it.
    fn drop(&mut self) {
        self.release();
    }
}
