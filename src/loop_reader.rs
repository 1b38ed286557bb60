//! Reads the socket on Node's own event loop (a libuv poll handle), so a reply reaches its
//! promise without a hop through the client's I/O thread. The I/O thread still backs it up
//! when the loop is busy (see `vfio_user_client::ExternalReader`).
//!
//! libuv is reached through the symbols Node exports to addons: this is the N-API boundary.

use crate::events::EventQueue;
use crate::js_callback::JsCallback;
use napi::{Env, Error, Result, Status};
use std::os::raw::{c_int, c_void};
use std::rc::Rc;
use vfio_user_client::ExternalReader;

extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init(event_loop: *mut c_void, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(
        handle: *mut c_void,
        events: c_int,
        cb: extern "C" fn(*mut c_void, c_int, c_int),
    ) -> c_int;
    fn uv_poll_stop(handle: *mut c_void) -> c_int;
    fn uv_close(handle: *mut c_void, cb: extern "C" fn(*mut c_void));
    fn uv_unref(handle: *mut c_void);
}

const UV_POLL: c_int = 8;
const UV_READABLE: c_int = 1;
const UV_DISCONNECT: c_int = 4;

/// Owned by the handle (through its `data` field) from start until libuv's close callback.
struct PollContext {
    /// Taken out when the handle is closed: libuv no longer watches the fd from then on, so
    /// the connection (and its socket) may be released at once, not a loop turn later.
    reader: Option<ExternalReader>,
    /// What reading completed is handed to JS right here, in the same loop turn, rather than
    /// through the threadsafe function (an eventfd write and read and a turn later).
    deliver: Option<(Rc<JsCallback>, EventQueue)>,
    /// The `uv_poll_t`, sized by libuv at run time, 8-byte aligned.
    handle: Box<[u64]>,
}

/// A started poll handle; `close` (or drop) releases it. Main thread only.
pub struct LoopReader {
    handle: *mut c_void,
}

impl LoopReader {
    pub fn start(
        env: &Env,
        reader: ExternalReader,
        deliver: (JsCallback, EventQueue),
    ) -> Result<LoopReader> {
        let event_loop = env.get_uv_event_loop()?.cast::<c_void>();
        // SAFETY: uv_handle_size only reads a static table.
        let size = unsafe { uv_handle_size(UV_POLL) };
        let fd = reader.fd();
        let ctx = Box::into_raw(Box::new(PollContext {
            reader: Some(reader),
            deliver: Some((Rc::new(deliver.0), deliver.1)),
            handle: vec![0u64; size.div_ceil(8)].into_boxed_slice(),
        }));
        // SAFETY: `ctx` is a live allocation we own; its `handle` buffer is at least
        // uv_handle_size(UV_POLL) bytes, suitably aligned, and stays put until on_close frees
        // the context. We are on the loop's thread (napi calls arrive there).
        unsafe {
            let handle = (*ctx).handle.as_mut_ptr().cast::<c_void>();
            if uv_poll_init(event_loop, handle, fd) != 0 {
                drop(Box::from_raw(ctx));
                return Err(Error::new(Status::GenericFailure, "uv_poll_init failed"));
            }
            if let Some(r) = (*ctx).reader.as_ref() {
                r.watched();
            }
            // `data` is the first field of every uv handle.
            *handle.cast::<*mut c_void>() = ctx.cast::<c_void>();
            if uv_poll_start(handle, UV_READABLE | UV_DISCONNECT, on_poll) != 0 {
                uv_close(handle, on_close);
                return Err(Error::new(Status::GenericFailure, "uv_poll_start failed"));
            }
            // Never keep the process alive by itself: the facade refs the loop while
            // requests are in flight.
            uv_unref(handle);
            Ok(LoopReader { handle })
        }
    }

    /// Stops watching and frees the handle (asynchronously, as libuv requires). Idempotent.
    pub fn close(&mut self) {
        if self.handle.is_null() {
            return;
        }
        // SAFETY: the handle was initialised by `start` and not closed yet (we null it).
        // uv_close stops the poll at once; the context stays allocated until on_close, and
        // on_poll cannot run after this, so taking the reader out here races nothing.
        unsafe {
            uv_close(self.handle, on_close);
            let ctx = *self.handle.cast::<*mut PollContext>();
            drop((*ctx).reader.take());
            drop((*ctx).deliver.take());
        }
        self.handle = std::ptr::null_mut();
    }
}

impl Drop for LoopReader {
    fn drop(&mut self) {
        self.close();
    }
}

extern "C" fn on_poll(handle: *mut c_void, status: c_int, _events: c_int) {
    // SAFETY: libuv passes the handle we started; its data field holds our live context
    // until on_close, which cannot run during this callback. Each access below borrows the
    // context only briefly: the JS called at the end may close the reader, which changes it.
    let ctx = unsafe { *handle.cast::<*mut PollContext>() };
    // SAFETY: as above; a short borrow.
    let deliver = unsafe { (*ctx).deliver.clone() };
    if let Some((_, events)) = &deliver {
        events.loop_delivers();
    }
    // SAFETY: as above; `on_readable` never calls into JS.
    let open = unsafe {
        (*ctx)
            .reader
            .as_ref()
            .is_some_and(ExternalReader::on_readable)
    };
    if status < 0 || !open {
        // The connection is over (EOF keeps the fd readable): stop, or the loop would spin.
        // SAFETY: stopping an active or stopped poll handle is allowed.
        unsafe { uv_poll_stop(handle) };
    }
    if let Some((callback, events)) = deliver {
        let taken = events.take_from_loop();
        if !taken.events.is_empty() {
            // Requests the callbacks send (promise reactions run before `call` returns) are
            // written together when this is dropped: one sendmsg for the lot. A lone
            // completion's continuation (an awaited call and the next one) sends inline:
            // queueing and flushing one request costs a copy and more for the same syscall.
            // SAFETY: as above; a short borrow (the cork holds its own reference).
            let _cork = (taken.events.len() > 1)
                .then(|| unsafe { (*ctx).reader.as_ref().map(ExternalReader::cork) });
            if let Err(back) = callback.call(taken) {
                // Not deliverable from here: the threadsafe function takes them.
                for e in back {
                    events.push(e);
                }
            }
        }
    }
}

extern "C" fn on_close(handle: *mut c_void) {
    // SAFETY: libuv calls this once, after which it no longer touches the handle; the
    // context (which owns the handle memory) is ours to free.
    unsafe { drop(Box::from_raw(*handle.cast::<*mut PollContext>())) };
}
