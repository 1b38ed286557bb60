//! Plain-object shapes handed to JavaScript, and conversions into them. Results are tagged
//! (`error` set or not) rather than thrown, so the errno survives the trip; `ts/` throws.

use napi::bindgen_prelude::{Buffer, ToNapiValue, TypeName};
use napi::{sys, ValueType};
use napi_derive::napi;
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
pub struct Payload(pub Vec<u8>);

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

impl ToNapiValue for Payload {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
        if val.0.is_empty() || val.0.len() > COPY_LIMIT {
            // SAFETY: forwarded as received (same env, during a conversion into JS).
            return unsafe { Buffer::to_napi_value(env, Buffer::from(val.0)) };
        }
        let mut data = std::ptr::null_mut();
        let mut out = std::ptr::null_mut();
        // SAFETY: `env` is live (we are converting a value for JS on its thread); the source
        // slice is valid for its length and napi copies it before returning.
        let status = unsafe {
            sys::napi_create_buffer_copy(
                env,
                val.0.len(),
                val.0.as_ptr().cast(),
                &mut data,
                &mut out,
            )
        };
        if status != sys::Status::napi_ok {
            return Err(napi::Error::from_reason("cannot create a reply Buffer"));
        }
        Ok(out)
    }
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
        payload: Payload(r.payload),
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
