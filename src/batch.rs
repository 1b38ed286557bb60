//! A batch of completions as JavaScript receives it. Plain replies (no flags but the reply
//! type, no fds, a payload of at most [`MAX_SHARED_PAYLOAD`] bytes) and typed calls' small
//! results cost no N-API call each: they are written into two typed arrays the client shares
//! with JS once, at start ([`BatchArea`]), and JS slices their payloads out of one pooled copy.
//! Everything else (a bigger payload, a reply with fds or unusual flags, a failure, an
//! interrupt, the close) travels in the array passed to the callback.
//!
//! The words array: `[entries, payload bytes used, then per entry: token, id, length]`, the
//! payloads back to back in the data array in entry order. An entry whose length is
//! [`SPECIAL`] takes the next value of the array: a Buffer (or null) for a plain reply too big
//! to share, else a `NativeEvent`. Events past the words' room follow in the array, three
//! slots each: `token, id, payload` for a plain reply, `token, 0, NativeEvent` otherwise. The
//! order of events is the order of entries, then of the tail.
//!
//! JS sets the entry count back to 0 once it has read them; a batch converted while it is not
//! 0 (a delivery nested in a listener called during one) leaves the area alone and uses the
//! array only.

use crate::convert::Payload;
use crate::event::{Event, NativeEvent};
use napi::bindgen_prelude::{ToNapiValue, TypeName};
use napi::{sys, ValueType};

/// The length of an entry whose value is in the array.
pub const SPECIAL: u32 = u32::MAX;

/// Larger payloads are handed over as Buffers of their own: JS's pool serves copies up to
/// 4 KiB, and a user keeping one small reply keeps the whole batch's copy alive.
pub const MAX_SHARED_PAYLOAD: usize = 2048;

/// Words before the first entry: the entry count and the payload bytes used.
const HEAD_WORDS: usize = 2;

/// The two typed arrays shared with JS, as raw memory. They are referenced by the
/// `NativeClient` that owns the queue holding this, and the queue forgets this
/// (`EventQueue::clear_sink`) before the client lets go of them.
#[derive(Clone, Copy)]
pub struct BatchArea {
    words: *mut u32,
    words_len: usize,
    data: *mut u8,
    data_len: usize,
}

// SAFETY: only pointers travel between threads (the queue is shared with the I/O thread);
// the memory behind them is read and written on the JS thread alone, in `to_napi_value`.
unsafe impl Send for BatchArea {}

impl BatchArea {
    /// The area over `words` and `data`.
    ///
    /// # Safety
    /// Both must stay allocated and unmoved, must not overlap, and must be used by nothing
    /// but the client's delivery code for as long as the area is held.
    pub unsafe fn new(words: &mut [u32], data: &mut [u8]) -> BatchArea {
        BatchArea {
            words: words.as_mut_ptr(),
            words_len: words.len(),
            data: data.as_mut_ptr(),
            data_len: data.len(),
        }
    }
}

pub struct Batch {
    pub events: Vec<Event>,
    pub area: Option<BatchArea>,
}

impl Batch {
    pub fn new(events: Vec<Event>, area: Option<BatchArea>) -> Batch {
        Batch { events, area }
    }
}

impl TypeName for Batch {
    fn type_name() -> &'static str {
        "Array<number | Buffer | NativeEvent | null> | null"
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
        // SAFETY: per this function's contract.
        return unsafe { null(env) };
    }
    // SAFETY: per this function's contract.
    unsafe { Payload::to_napi_value(env, p) }
}

/// JavaScript's null.
///
/// # Safety
/// `env` must be live and the call made on its thread.
unsafe fn null(env: sys::napi_env) -> napi::Result<sys::napi_value> {
    let mut null = std::ptr::null_mut();
    // SAFETY: per this function's contract.
    if unsafe { sys::napi_get_null(env, &mut null) } != sys::Status::napi_ok {
        return Err(fail());
    }
    Ok(null)
}

fn fail() -> napi::Error {
    napi::Error::from_reason("cannot build a completion batch")
}

/// An event split into what JS settles: token, id, and the payload of a plain reply or the
/// event's object form.
enum Split {
    Plain(u32, u32, Payload),
    Other(u32, Event),
}

fn split(event: Event) -> Split {
    match event {
        Event::Done(token, Ok(r)) if r.header.flags == PLAIN_REPLY && r.fds.is_empty() => {
            Split::Plain(token, u32::from(r.header.id), Payload::whole(r.payload))
        }
        Event::Data(token, payload) => Split::Plain(token, 0, payload),
        other => Split::Other(other.token(), other),
    }
}

/// The values the array carries, appended in order; the array is made on first use.
struct Values {
    env: sys::napi_env,
    array: sys::napi_value,
    len: u32,
}

impl Values {
    /// # Safety
    /// `env` must be live and the call made on its thread; `v` a value of it.
    unsafe fn push(&mut self, v: sys::napi_value) -> napi::Result<()> {
        // SAFETY: per this function's contract.
        unsafe {
            if self.array.is_null()
                && sys::napi_create_array(self.env, &mut self.array) != sys::Status::napi_ok
            {
                return Err(fail());
            }
            if sys::napi_set_element(self.env, self.array, self.len, v) != sys::Status::napi_ok {
                return Err(fail());
            }
        }
        self.len += 1;
        Ok(())
    }

    /// # Safety
    /// As for [`Values::push`].
    unsafe fn push_value(&mut self, value: Split) -> napi::Result<()> {
        // SAFETY: per this function's contract.
        unsafe {
            let v = match value {
                Split::Plain(_, _, payload) => payload_or_null(self.env, payload)?,
                Split::Other(_, e) => NativeEvent::to_napi_value(self.env, e.into_native())?,
            };
            self.push(v)
        }
    }
}

impl ToNapiValue for Batch {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
        let mut values = Values {
            env,
            array: std::ptr::null_mut(),
            len: 0,
        };
        // SAFETY: the area's memory is alive and unmoved while the queue holds it (see
        // `BatchArea`), and only touched here and by JS, both on this thread, never at once:
        // JS is not running while a batch is converted, except for a nested delivery, which
        // finds a non-zero entry count and leaves the area alone.
        let (words, data): (&mut [u32], &mut [u8]) = match val.area {
            Some(a) if a.words_len > HEAD_WORDS && unsafe { *a.words } == 0 => unsafe {
                (
                    std::slice::from_raw_parts_mut(a.words, a.words_len),
                    std::slice::from_raw_parts_mut(a.data, a.data_len),
                )
            },
            _ => (&mut [], &mut []),
        };
        let room = words.len().saturating_sub(HEAD_WORDS) / 3;
        let (mut entries, mut used) = (0usize, 0usize);
        for event in val.events {
            let value = split(event);
            let (token, id) = match &value {
                Split::Plain(token, id, _) => (*token, *id),
                Split::Other(token, _) => (*token, 0),
            };
            if entries == room {
                // SAFETY: `env` is live and we are on its thread (converting for JS).
                unsafe {
                    values.push(u32::to_napi_value(env, token)?)?;
                    values.push(u32::to_napi_value(env, id)?)?;
                    values.push_value(value)?;
                }
                continue;
            }
            let at = HEAD_WORDS + 3 * entries;
            let mut length = SPECIAL;
            if let Split::Plain(_, _, p) = &value {
                let bytes = p.buf.get(p.start..).unwrap_or_default();
                if bytes.len() <= MAX_SHARED_PAYLOAD {
                    if let Some(to) = data.get_mut(used..used + bytes.len()) {
                        to.copy_from_slice(bytes);
                        used += bytes.len();
                        length = bytes.len() as u32;
                    }
                }
            }
            if length == SPECIAL {
                // SAFETY: as above.
                unsafe { values.push_value(value)? };
            }
            words[at..at + 3].copy_from_slice(&[token, id, length]);
            entries += 1;
        }
        if let Some(head) = words.get_mut(..HEAD_WORDS) {
            head.copy_from_slice(&[entries as u32, used as u32]);
        }
        if values.array.is_null() {
            // SAFETY: as above.
            return unsafe { null(env) };
        }
        Ok(values.array)
    }
}
