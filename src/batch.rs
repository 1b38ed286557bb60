//! A batch of completions as JavaScript receives it: one flat array, three slots per event,
//! so the common case costs no object per event. A plain reply (no flags but the reply type,
//! no fds) is `token, id, payload` with the payload a Buffer (null when empty); anything else (a reply with
//! fds or unusual flags, a failure, the close) is `token, 0, NativeEvent`.

use crate::convert::Payload;
use crate::event::{Event, NativeEvent};
use napi::bindgen_prelude::{ToNapiValue, TypeName};
use napi::{sys, ValueType};

pub struct Batch(pub Vec<Event>);

impl TypeName for Batch {
    fn type_name() -> &'static str {
        "Array<number | Buffer | NativeEvent | null>"
    }

    fn value_type() -> ValueType {
        ValueType::Object
    }
}

/// The header flags of a plain reply: the reply type and nothing else.
const PLAIN_REPLY: u32 = 1;

/// A payload as a Buffer, or null when it is empty (JS shares one empty Buffer for those:
/// replies to maps, unmaps and writes then cost no ArrayBuffer each).
///
/// # Safety
/// `env` must be live and the call made on its thread.
unsafe fn payload_or_null(env: sys::napi_env, p: Payload) -> napi::Result<sys::napi_value> {
    if p.buf.len() <= p.start {
        let mut null = std::ptr::null_mut();
        // SAFETY: per this function's contract.
        if unsafe { sys::napi_get_null(env, &mut null) } != sys::Status::napi_ok {
            return Err(napi::Error::from_reason("cannot build a completion batch"));
        }
        return Ok(null);
    }
    // SAFETY: per this function's contract.
    unsafe { Payload::to_napi_value(env, p) }
}

impl ToNapiValue for Batch {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
        let fail = || napi::Error::from_reason("cannot build a completion batch");
        let mut array = std::ptr::null_mut();
        // SAFETY: `env` is live and we are on its thread (converting a value for JS); every
        // value set into the array was just made in the same env.
        unsafe {
            if sys::napi_create_array_with_length(env, 3 * val.0.len(), &mut array)
                != sys::Status::napi_ok
            {
                return Err(fail());
            }
            for (i, event) in val.0.into_iter().enumerate() {
                let (token, id, value) = match event {
                    Event::Done(token, Ok(r))
                        if r.header.flags == PLAIN_REPLY && r.fds.is_empty() =>
                    {
                        let id = u32::from(r.header.id);
                        (token, id, payload_or_null(env, Payload::whole(r.payload))?)
                    }
                    Event::Data(token, payload) => (token, 0, payload_or_null(env, payload)?),
                    other => (
                        other.token(),
                        0,
                        NativeEvent::to_napi_value(env, other.into_native())?,
                    ),
                };
                let slots = [
                    u32::to_napi_value(env, token)?,
                    u32::to_napi_value(env, id)?,
                    value,
                ];
                for (k, v) in slots.into_iter().enumerate() {
                    if sys::napi_set_element(env, array, (3 * i + k) as u32, v)
                        != sys::Status::napi_ok
                    {
                        return Err(fail());
                    }
                }
            }
        }
        Ok(array)
    }
}
