//! ArrayBuffers over native mappings (DMA memory, a mapped region): made external, so that JS
//! reads and writes the mapped pages themselves, and detached before the pages are unmapped.

use napi::bindgen_prelude::Unknown;
use napi::{sys, Env, Result, Status};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// What one view keeps alive: the mapping's owner, let go by the view's finalizer, or at once
/// when the view could not be made.
struct ViewHold<T> {
    hold: Mutex<Option<Arc<T>>>,
}

/// Releases a view's hold once V8 has let go of its ArrayBuffer.
extern "C" fn release<T>(_env: sys::napi_env, _data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `hint` is the reference `external` gave up to this finalizer, which napi runs at
    // most once per ArrayBuffer.
    drop(unsafe { Arc::from_raw(hint.cast::<ViewHold<T>>()) });
}

/// An external ArrayBuffer over `len` bytes at `ptr`, keeping `hold` (the owner of the
/// mapping) until it is collected. `len` must not pass `buffer.constants.MAX_LENGTH` (ts/
/// checks it: past it Node refuses).
///
/// Node runs (or schedules) the finalizer itself when it refuses a view, at least for a length
/// past its limit, and returns an error all the same; releasing `hold` again then would free
/// it twice (the heap corruption seen with views over 4 GiB). So the finalizer keeps a
/// reference of its own whatever happens, and a refusal only empties it: at worst its few
/// bytes stay allocated, never the mapping, and never freed twice.
///
/// # Safety
/// `ptr` must stay valid for reads and writes of `len` bytes until the view is detached or,
/// failing that, while `hold` lives.
pub unsafe fn external<T: Send + Sync + 'static>(
    env: Env,
    ptr: *mut u8,
    len: usize,
    hold: Arc<T>,
    what: &str,
) -> Result<Unknown<'_>> {
    let view = Arc::new(ViewHold {
        hold: Mutex::new(Some(hold)),
    });
    let hint = Arc::into_raw(view.clone());
    let mut out = std::ptr::null_mut();
    // SAFETY: the memory is this function's contract; `hint` is handed to `release`, which
    // takes it back exactly once. `env` is live, on its thread.
    let status = unsafe {
        sys::napi_create_external_arraybuffer(
            env.raw(),
            ptr.cast(),
            len,
            Some(release::<T>),
            hint.cast_mut().cast(),
            &mut out,
        )
    };
    if status != sys::Status::napi_ok {
        view.hold.lock().unwrap_or_else(|p| p.into_inner()).take();
        return Err(napi::Error::new(
            Status::GenericFailure,
            format!("cannot create an ArrayBuffer of {len} bytes over {what}"),
        ));
    }
    // SAFETY: `out` is a live value of this env.
    Ok(unsafe { Unknown::from_raw_unchecked(env.raw(), out) })
}

/// Detaches `view`, an ArrayBuffer from a mapping's `array_buffer`, before the mapping goes, so
/// that no Buffer over it can reach that memory again (every view then reads as empty). A
/// view already detached is fine.
#[napi_derive::napi(ts_args_type = "view: ArrayBuffer")]
pub fn detach_view(env: Env, view: Unknown) -> Result<()> {
    use napi::JsValue;
    // SAFETY: `view` is a live value of this env; detaching an external ArrayBuffer is
    // allowed, and a detached one stays detached.
    let status = unsafe { sys::napi_detach_arraybuffer(env.raw(), view.raw()) };
    if status != sys::Status::napi_ok && status != sys::Status::napi_detachable_arraybuffer_expected
    {
        return Err(napi::Error::new(
            Status::GenericFailure,
            "cannot detach a mapping's ArrayBuffer; it stays mapped",
        ));
    }
    Ok(())
}
