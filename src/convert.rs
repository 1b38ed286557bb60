//! Plain-object shapes handed to JavaScript, and conversions into them. Results are tagged
//! (`error` set or not) rather than thrown, so the errno survives the trip; `ts/` throws.

use napi::bindgen_prelude::{ToNapiValue, TypeName};
use napi::{sys, ValueType};
use napi_derive::napi;
use std::ffi::c_void;
use std::os::fd::IntoRawFd;
use vfio_user_client::proto::{Capabilities, Command, ProtoError, Version};
use vfio_user_client::{Error, Reply};

#[napi(object)]
pub struct NativeError {
    pub errno: i32,
    pub code: String,
    pub message: String,
    pub command: Option<u32>,
}

impl NativeError {
    pub fn proto(message: String) -> NativeError {
        from_error(&Error::proto(message))
    }

    /// A reply to `command` that broke the protocol (EPROTO).
    pub fn proto_reply(command: Command, e: ProtoError) -> NativeError {
        from_error(&Error::proto(e.0).with_command(command as u16))
    }
}

pub fn from_error(e: &Error) -> NativeError {
    NativeError {
        errno: e.errno as i32,
        code: e.code(),
        message: e.message.clone(),
        command: e.command.map(u32::from),
    }
}

/// A reply payload on its way to JS: small ones are copied into a JS-owned Buffer, which
/// costs less than an external one (a backing store and a finalizer per reply, swept later);
/// big ones are handed over without a copy.
pub struct Payload {
    pub buf: Vec<u8>,
    /// Where the bytes start in `buf` (a region read leaves its access header in front).
    pub start: usize,
}

impl Payload {
    pub fn whole(buf: Vec<u8>) -> Payload {
        Payload { buf, start: 0 }
    }

    fn bytes(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }
}

/// Payloads up to this size are copied.
const COPY_LIMIT: usize = 64 * 1024;

impl TypeName for Payload {
    fn type_name() -> &'static str {
        "Buffer"
    }

    fn value_type() -> ValueType {
        ValueType::Object
    }
}

/// Frees the Vec behind an external Buffer once V8 has collected the Buffer.
extern "C" fn drop_payload(_env: sys::napi_env, _data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `hint` is the Box<Vec<u8>> leaked in `to_napi_value` for this Buffer alone, and
    // napi calls this finalizer exactly once.
    drop(unsafe { Box::from_raw(hint.cast::<Vec<u8>>()) });
}

impl ToNapiValue for Payload {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
        let len = val.bytes().len();
        if len > COPY_LIMIT {
            // Handed over without a copy: the Buffer views our Vec from `start`.
            let start = val.start;
            let owned = Box::into_raw(Box::new(val.buf));
            let mut out = std::ptr::null_mut();
            // SAFETY: `owned` is a live Vec of at least `start + len` bytes that nothing else
            // touches until the finalizer frees it; `env` is live, on its thread.
            let status = unsafe {
                let data = (*owned).as_mut_ptr().add(start);
                sys::napi_create_external_buffer(
                    env,
                    len,
                    data.cast(),
                    Some(drop_payload),
                    owned.cast(),
                    &mut out,
                )
            };
            if status == sys::Status::napi_ok {
                return Ok(out);
            }
            // External buffers refused (some embedders forbid them, which napi says before it
            // takes the finalizer): copy instead. The other refusal, a length past
            // buffer.constants.MAX_LENGTH, after which Node runs the finalizer itself, cannot
            // happen: payloads are bounded by the negotiated message size, far below it.
            // SAFETY: napi did not take `owned`; it is ours again.
            let buf = unsafe { Box::from_raw(owned) };
            // SAFETY: as below.
            return unsafe { copy_buffer(env, buf.get(start..).unwrap_or_default()) };
        }
        // SAFETY: forwarded as received (same env, during a conversion into JS).
        unsafe { copy_buffer(env, val.bytes()) }
    }
}

/// A JS-owned Buffer holding a copy of `bytes`.
///
/// # Safety
/// `env` must be live and the call made on its thread.
unsafe fn copy_buffer(env: sys::napi_env, bytes: &[u8]) -> napi::Result<sys::napi_value> {
    let mut data = std::ptr::null_mut();
    let mut out = std::ptr::null_mut();
    // SAFETY: per this function's contract; the source slice is valid for its length and napi
    // copies it before returning.
    let status = unsafe {
        sys::napi_create_buffer_copy(env, bytes.len(), bytes.as_ptr().cast(), &mut data, &mut out)
    };
    if status != sys::Status::napi_ok {
        return Err(napi::Error::from_reason("cannot create a reply Buffer"));
    }
    Ok(out)
}

#[napi(object, object_from_js = false)]
pub struct NativeReply {
    pub id: u32,
    pub command: u32,
    pub flags: u32,
    #[napi(ts_type = "Buffer")]
    pub payload: Payload,
    /// Received fds, now owned by JavaScript.
    pub fds: Vec<i32>,
}

pub fn reply(r: Reply) -> NativeReply {
    NativeReply {
        id: u32::from(r.header.id),
        command: u32::from(r.header.command),
        flags: r.header.flags,
        payload: Payload::whole(r.payload),
        fds: r.fds.into_iter().map(IntoRawFd::into_raw_fd).collect(),
    }
}

#[napi(object)]
pub struct NativeMigration {
    pub pgsize: f64,
    pub max_bitmap_size: f64,
}

#[napi(object)]
pub struct NativeTwinSocket {
    pub supported: bool,
    pub fd_index: Option<u32>,
}

#[napi(object)]
pub struct NativeCapabilities {
    pub max_msg_fds: u32,
    pub max_data_xfer_size: f64,
    pub max_dma_maps: f64,
    pub pgsizes: f64,
    pub migration: Option<NativeMigration>,
    pub write_multiple: bool,
    pub twin_socket: Option<NativeTwinSocket>,
}

pub fn capabilities(c: &Capabilities) -> NativeCapabilities {
    NativeCapabilities {
        max_msg_fds: c.max_msg_fds,
        max_data_xfer_size: c.max_data_xfer_size as f64,
        max_dma_maps: c.max_dma_maps as f64,
        pgsizes: c.pgsizes as f64,
        migration: c.migration.map(|m| NativeMigration {
            pgsize: m.pgsize as f64,
            max_bitmap_size: m.max_bitmap_size as f64,
        }),
        write_multiple: c.write_multiple,
        twin_socket: c.twin_socket.map(|t| NativeTwinSocket {
            supported: t.supported,
            fd_index: t.fd_index,
        }),
    }
}

#[napi(object)]
pub struct NativeCapabilitiesResult {
    pub capabilities: Option<NativeCapabilities>,
    pub warnings: Vec<String>,
    pub error: Option<NativeError>,
}

#[napi(object)]
pub struct NativeVersion {
    pub major: u32,
    pub minor: u32,
    pub capabilities: NativeCapabilities,
    pub warnings: Vec<String>,
}

pub fn version(v: &Version) -> NativeVersion {
    NativeVersion {
        major: u32::from(v.major),
        minor: u32::from(v.minor),
        capabilities: capabilities(&v.capabilities),
        warnings: v.warnings.clone(),
    }
}

#[napi(object)]
pub struct NativeVersionResult {
    pub version: Option<NativeVersion>,
    pub error: Option<NativeError>,
}

/// A timeout in ms from JS (checked there) as a Duration.
pub fn timeout(ms: Option<u32>) -> Option<std::time::Duration> {
    ms.map(|ms| std::time::Duration::from_millis(u64::from(ms)))
}
