//! `NativeClient`: a `vfio_user_client::Client` as a JS class.

use crate::convert::{self, NativeError, NativeReplyResult, NativeVersion, NativeVersionResult};
use crate::events::{Event, EventQueue, NativeEvent};
use crate::loop_reader::LoopReader;
use napi::bindgen_prelude::{AsyncTask, Buffer, Either, Function};
use napi::{Env, Result, Task};
use napi_derive::napi;
use nix::errno::Errno;
use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::time::Duration;
use vfio_user_client::{Client, Error, Options, Request};

/// A connection as a JS class. Once the connection has ended and JS has taken its close
/// event, [`NativeClient::release`] lets go of everything native (I/O thread, socket, eventfd,
/// epoll, the JS callback); the same happens when the object is garbage-collected.
#[napi]
pub struct NativeClient {
    /// None once released.
    client: RefCell<Option<Client>>,
    events: EventQueue,
    loop_reader: RefCell<Option<LoopReader>>,
    path: String,
    /// Why the connection ended, kept for calls made after release.
    ended: RefCell<Option<Error>>,
}

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
        options: Options {
            timeout: Duration::from_millis(u64::from(options.timeout_ms)),
            send_queued: options.send_queued,
            max_queued_bytes: options
                .max_queued_bytes
                .map_or(Options::default().max_queued_bytes, |b| b as usize),
            ..Options::default()
        },
    })
}

fn borrow_fds(fds: &[i32]) -> Vec<BorrowedFd<'_>> {
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
        timeout: timeout_ms.map(|ms| Duration::from_millis(u64::from(ms))),
    }
}

#[napi]
impl NativeClient {
    fn wrap(client: Client) -> NativeClient {
        let events = EventQueue::default();
        let on_close = events.clone();
        client.on_close(move |e| on_close.push(Event::Closed(e.clone())));
        NativeClient {
            path: client.path().to_string(),
            client: RefCell::new(Some(client)),
            events,
            loop_reader: RefCell::new(None),
            ended: RefCell::new(None),
        }
    }

    /// Runs `f` on the live client, or returns the error that ended it.
    fn live<R>(
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

    /// Registers the function that receives batches of completions and the close event.
    #[napi]
    pub fn start(&self, env: Env, on_events: Function<'_, Vec<NativeEvent>, ()>) -> Result<()> {
        let queue = self.events.downgrade();
        let tsfn = on_events
            .build_threadsafe_function::<()>()
            .callee_handled::<false>()
            .weak::<true>()
            .build_callback(move |_ctx| Ok(queue.take()))?;
        self.events.set_sink(tsfn);
        if let Some(c) = self.client.borrow().as_ref() {
            // Replies are read on this event loop when it is free (no thread hop per reply).
            *self.loop_reader.borrow_mut() = Some(LoopReader::start(&env, c.external_reader())?);
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
        payload: Buffer,
        fds: Vec<i32>,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let borrowed = borrow_fds(&fds);
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
    pub fn post(&self, command: u32, payload: Buffer, fds: Vec<i32>) -> Option<NativeError> {
        let borrowed = borrow_fds(&fds);
        self.live(|c| c.post(request(command, &payload, &borrowed, None)))
            .err()
            .map(|e| convert::from_error(&e))
    }

    /// Sends a request and blocks the JS thread until its reply (timed condvar).
    #[napi]
    pub fn send_sync(
        &self,
        command: u32,
        payload: Buffer,
        fds: Vec<i32>,
        timeout_ms: Option<u32>,
    ) -> NativeReplyResult {
        let borrowed = borrow_fds(&fds);
        convert::reply_result(
            self.live(|c| c.send_wait(request(command, &payload, &borrowed, timeout_ms))),
        )
    }

    #[napi(getter)]
    pub fn closed(&self) -> bool {
        self.client.borrow().as_ref().is_none_or(Client::is_closed)
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
        if let Some(mut r) = self.loop_reader.borrow_mut().take() {
            r.close();
        }
        let client = self.client.borrow_mut().take();
        if let Some(c) = client {
            c.close();
            *self.ended.borrow_mut() = c.closed_reason();
        }
        self.events.clear_sink();
    }
}

impl Drop for NativeClient {
    /// Garbage-collected (unreachable from JS): nothing native may outlive it.
    fn drop(&mut self) {
        self.release();
    }
}
