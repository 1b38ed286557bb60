//! The leanest N-API round trips possible, floors for `npm run bench`: what any Node addon
//! spends to send a request with sendmsg, receive its reply with recvmsg (with room for fds,
//! as a vfio-user client must have) into a fixed buffer, and hand the payload to JavaScript as
//! a new Buffer: returned from the call (`roundTrip`), or resolving a promise from a libuv poll
//! handle on Node's own loop (`send`). No protocol beyond VERSION, no checks, no queues, no
//! threads, one request at a time. Not shipped.
//!
//! libuv is reached through the symbols Node exports to addons, as the binding's
//! `loop_reader.rs` does.

use napi::bindgen_prelude::{BufferSlice, Unknown};
use napi::{sys, Env, Error, Result, Status};
use napi_derive::napi;
use nix::sys::socket::{recvmsg, sendmsg, MsgFlags};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;
use std::os::raw::{c_int, c_void};
use std::os::unix::net::UnixStream;
use std::ptr;
use vfio_user_proto::version::{encode_version_request, VersionProposal};
use vfio_user_proto::{Capabilities, Header, HEADER_SIZE};

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Status::GenericFailure, format!("{what}: {e}"))
}

extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init(event_loop: *mut c_void, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(
        handle: *mut c_void,
        events: c_int,
        cb: extern "C" fn(*mut c_void, c_int, c_int),
    ) -> c_int;
    fn uv_close(handle: *mut c_void, cb: Option<extern "C" fn(*mut c_void)>);
    fn uv_unref(handle: *mut c_void);
}

const UV_POLL: c_int = 8;
const UV_READABLE: c_int = 1;

/// What the poll handle's callback needs; leaked with the handle (a bench makes a few).
struct Polled {
    env: sys::napi_env,
    fd: c_int,
    buf: Vec<u8>,
    cmsg: Vec<u8>,
    /// The promise of the request in flight, if any.
    deferred: sys::napi_deferred,
    context: sys::napi_async_context,
    /// The resource object of the callback scope, made once (not one per reply).
    resource: sys::napi_ref,
    /// The `uv_poll_t`, sized by libuv at run time; its first field points back here.
    handle: Box<[u64]>,
}

/// One connection, negotiated, with one fixed receive buffer.
#[napi]
pub struct MinimalClient {
    sock: UnixStream,
    buf: Vec<u8>,
    cmsg: Vec<u8>,
    polled: *mut Polled,
}

#[napi]
impl MinimalClient {
    /// Connects to `path` and negotiates version 0.0 with no capabilities.
    #[napi(constructor)]
    pub fn new(path: String) -> Result<Self> {
        let mut sock = UnixStream::connect(&path).map_err(|e| failed("connect", e))?;
        let proposal = VersionProposal {
            major: 0,
            minor: 0,
            capabilities: Capabilities::default(),
        };
        sock.write_all(&encode_version_request(0, &proposal))
            .map_err(|e| failed("send VERSION", e))?;
        let mut head = [0u8; HEADER_SIZE];
        sock.read_exact(&mut head)
            .map_err(|e| failed("read VERSION", e))?;
        let mut body = vec![0u8; Header::decode(&head).payload_len()];
        sock.read_exact(&mut body)
            .map_err(|e| failed("read VERSION", e))?;
        Ok(MinimalClient {
            sock,
            buf: vec![0u8; 64 * 1024],
            cmsg: nix::cmsg_space!([i32; 253]),
            polled: ptr::null_mut(),
        })
    }

    /// Sends `message` and returns a promise of its reply's payload, resolved from a poll
    /// handle on Node's loop when the reply arrives.
    #[napi]
    pub fn send<'env>(&mut self, env: &'env Env, message: BufferSlice) -> Result<Unknown<'env>> {
        if self.polled.is_null() {
            self.polled = start_polling(env, self.sock.as_raw_fd())?;
        }
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(&message)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| failed("sendmsg", e))?;
        let (mut deferred, mut promise) = (ptr::null_mut(), ptr::null_mut());
        // SAFETY: a napi call on the JS thread; `polled` is live (leaked, never freed) and
        // only touched on this thread.
        unsafe {
            if sys::napi_create_promise(env.raw(), &mut deferred, &mut promise)
                != sys::Status::napi_ok
            {
                return Err(failed("napi_create_promise", "failed"));
            }
            (*self.polled).deferred = deferred;
            Ok(Unknown::from_raw_unchecked(env.raw(), promise))
        }
    }

    /// Ends the connection (the test device then serves the next one).
    #[napi]
    pub fn close(&mut self) {
        if !self.polled.is_null() {
            // SAFETY: on the JS thread; the handle was started and is closed once (the
            // pointer is cleared); its memory is leaked, so it outlives libuv's use of it.
            unsafe { uv_close((*self.polled).handle.as_mut_ptr().cast(), None) };
            self.polled = ptr::null_mut();
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Sends `message` (a whole request, header included) and returns its reply's payload as
    /// a new Buffer. The reply must arrive in one read (the bench's replies are 32 bytes).
    #[napi]
    pub fn round_trip<'env>(
        &mut self,
        env: &'env Env,
        message: BufferSlice,
    ) -> Result<BufferSlice<'env>> {
        let fd = self.sock.as_raw_fd();
        sendmsg::<()>(
            fd,
            &[IoSlice::new(&message)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| failed("sendmsg", e))?;
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let n = recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut self.cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| failed("recvmsg", e))?
        .bytes;
        let payload = self.buf.get(HEADER_SIZE..n).unwrap_or_default();
        BufferSlice::copy_from(env, payload)
    }
}

fn start_polling(env: &Env, fd: c_int) -> Result<*mut Polled> {
    let event_loop = env.get_uv_event_loop()?.cast::<c_void>();
    // SAFETY: uv_handle_size only reads a static table.
    let size = unsafe { uv_handle_size(UV_POLL) };
    let polled = Box::into_raw(Box::new(Polled {
        env: env.raw(),
        fd,
        buf: vec![0u8; 64 * 1024],
        cmsg: nix::cmsg_space!([i32; 253]),
        deferred: ptr::null_mut(),
        context: ptr::null_mut(),
        resource: ptr::null_mut(),
        handle: vec![0u64; size.div_ceil(8)].into_boxed_slice(),
    }));
    // SAFETY: on the JS thread during a napi call; `polled` is a live allocation that is
    // never freed, so the handle inside it and the pointer back to it stay valid.
    unsafe {
        let name = "bench";
        let mut resource_name = ptr::null_mut();
        sys::napi_create_string_utf8(
            env.raw(),
            name.as_ptr().cast(),
            name.len() as isize,
            &mut resource_name,
        );
        sys::napi_async_init(
            env.raw(),
            ptr::null_mut(),
            resource_name,
            &mut (*polled).context,
        );
        let mut resource = ptr::null_mut();
        sys::napi_create_object(env.raw(), &mut resource);
        sys::napi_create_reference(env.raw(), resource, 1, &mut (*polled).resource);
        let handle = (*polled).handle.as_mut_ptr().cast::<c_void>();
        if uv_poll_init(event_loop, handle, fd) != 0 {
            return Err(failed("uv_poll_init", "failed"));
        }
        *handle.cast::<*mut Polled>() = polled;
        if uv_poll_start(handle, UV_READABLE, on_poll) != 0 {
            uv_close(handle, None);
            return Err(failed("uv_poll_start", "failed"));
        }
        // A pending promise keeps nothing alive by itself; the bench awaits it.
        uv_unref(handle);
    }
    Ok(polled)
}

extern "C" fn on_poll(handle: *mut c_void, _status: c_int, _events: c_int) {
    // SAFETY: libuv passes the handle we started; its first field points at our (leaked,
    // live) state; we are on the JS thread, outside any napi call, so a handle scope and a
    // callback scope of our own hold what is made here (closing the callback scope runs the
    // promise's reactions, as Node's own handles do).
    unsafe {
        let st = &mut **handle.cast::<*mut Polled>();
        let mut iov = [IoSliceMut::new(&mut st.buf)];
        let Ok(got) = recvmsg::<()>(
            st.fd,
            &mut iov,
            Some(&mut st.cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) else {
            return;
        };
        let n = got.bytes;
        let deferred = std::mem::replace(&mut st.deferred, ptr::null_mut());
        if deferred.is_null() || n < HEADER_SIZE {
            return;
        }
        let env = st.env;
        let mut scope = ptr::null_mut();
        sys::napi_open_handle_scope(env, &mut scope);
        let mut resource = ptr::null_mut();
        sys::napi_get_reference_value(env, st.resource, &mut resource);
        let mut callback_scope = ptr::null_mut();
        sys::napi_open_callback_scope(env, resource, st.context, &mut callback_scope);
        let (mut data, mut buffer) = (ptr::null_mut(), ptr::null_mut());
        let payload = &st.buf[HEADER_SIZE..n];
        sys::napi_create_buffer_copy(
            env,
            payload.len(),
            payload.as_ptr().cast(),
            &mut data,
            &mut buffer,
        );
        sys::napi_resolve_deferred(env, deferred, buffer);
        sys::napi_close_callback_scope(env, callback_scope);
        sys::napi_close_handle_scope(env, scope);
    }
}

/// The socketpair floor of the 1 MiB reads, seen from JavaScript: a thread writes `mib` MiB
/// into a socketpair, a MiB per write, and `read` fills the memory it is given from the
/// other end. Reading into one Buffer, or into a new one each MiB, measures in the same run
/// what the memory JavaScript reads into costs by itself, with no protocol at all.
#[napi]
pub struct MinimalStream {
    reader: Option<UnixStream>,
    writer: Option<std::thread::JoinHandle<()>>,
}

#[napi]
impl MinimalStream {
    /// A socketpair and a thread writing `mib` MiB into it, a MiB per write.
    #[napi(constructor)]
    pub fn new(mib: u32) -> Result<Self> {
        const MIB: usize = 1 << 20;
        let (mut a, b) = UnixStream::pair().map_err(|e| failed("socketpair", e))?;
        let writer = std::thread::spawn(move || {
            let chunk = vec![0x5au8; MIB];
            for _ in 0..mib {
                // The reader closed early: nothing more to write.
                if a.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        Ok(MinimalStream {
            reader: Some(b),
            writer: Some(writer),
        })
    }

    /// Blocks until `into` is full.
    #[napi]
    pub fn read(&mut self, mut into: BufferSlice) -> Result<()> {
        let reader = self
            .reader
            .as_mut()
            .ok_or_else(|| failed("read", "the stream is closed"))?;
        reader.read_exact(&mut into).map_err(|e| failed("read", e))
    }

    /// Closes the reading end and waits for the writer to stop.
    #[napi]
    pub fn close(&mut self) {
        drop(self.reader.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
