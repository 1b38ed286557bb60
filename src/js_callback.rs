//! Calling a JS function from a libuv callback on the JS thread (not from a napi call): as
//! Node's own handles do, through `napi_make_callback`, so that promise reactions and
//! `process.nextTick` callbacks run right after it, and an exception it throws becomes an
//! uncaught exception like any other callback's.

use crate::batch::Batch;
use crate::event::Event;
use napi::bindgen_prelude::ToNapiValue;
use napi::sys;
use std::ptr;

/// A persistent reference to a JS function and the async context it is called in. Created,
/// called and dropped on the JS thread only.
pub struct JsCallback {
    env: sys::napi_env,
    func: sys::napi_ref,
    context: sys::napi_async_context,
}

impl JsCallback {
    /// References `func` (a function value of `env`, during a napi call).
    pub fn new(env: sys::napi_env, func: sys::napi_value) -> napi::Result<JsCallback> {
        let fail =
            |what: &str| napi::Error::from_reason(format!("cannot set up the callback: {what}"));
        let mut cb = JsCallback {
            env,
            func: ptr::null_mut(),
            context: ptr::null_mut(),
        };
        let name = "vfio-user";
        // SAFETY: called during a napi call on the JS thread with a live `env` and `func`;
        // every out-pointer is a local; `cb` releases what was created if a later step fails.
        unsafe {
            if sys::napi_create_reference(env, func, 1, &mut cb.func) != sys::Status::napi_ok {
                return Err(fail("napi_create_reference"));
            }
            let mut resource_name = ptr::null_mut();
            if sys::napi_create_string_utf8(
                env,
                name.as_ptr().cast(),
                name.len() as isize,
                &mut resource_name,
            ) != sys::Status::napi_ok
                || sys::napi_async_init(env, ptr::null_mut(), resource_name, &mut cb.context)
                    != sys::Status::napi_ok
            {
                return Err(fail("napi_async_init"));
            }
        }
        Ok(cb)
    }

    /// Calls the function with `batch` (from a libuv callback on the JS thread). Returns
    /// its events if the call could not even be prepared, so they can go the slow way instead.
    pub fn call(&self, batch: Batch) -> Result<(), Vec<Event>> {
        let env = self.env;
        // SAFETY: we are on the JS thread, outside any napi call (a libuv callback), so a
        // handle scope of our own holds every value made here; the reference and the async
        // context are alive: they are released only by Drop, and callers hold an `Rc` to this
        // callback across the call, so JS closing the client meanwhile cannot drop it.
        unsafe {
            let mut scope = ptr::null_mut();
            if sys::napi_open_handle_scope(env, &mut scope) != sys::Status::napi_ok {
                return Err(batch.events);
            }
            let mut func = ptr::null_mut();
            let mut recv = ptr::null_mut();
            let ready = sys::napi_get_reference_value(env, self.func, &mut func)
                == sys::Status::napi_ok
                && !func.is_null()
                // napi_make_callback wants an object as the receiver.
                && sys::napi_get_global(env, &mut recv) == sys::Status::napi_ok;
            if !ready {
                sys::napi_close_handle_scope(env, scope);
                return Err(batch.events);
            }
            {
                if let Ok(arg) = Batch::to_napi_value(env, batch) {
                    let (context, mut result) = (self.context, ptr::null_mut());
                    let status =
                        sys::napi_make_callback(env, context, recv, func, 1, &arg, &mut result);
                    if status == sys::Status::napi_pending_exception {
                        let mut error = ptr::null_mut();
                        sys::napi_get_and_clear_last_exception(env, &mut error);
                        sys::napi_fatal_exception(env, error);
                    }
                }
            }
            sys::napi_close_handle_scope(env, scope);
        }
        Ok(())
    }
}

impl Drop for JsCallback {
    fn drop(&mut self) {
        // SAFETY: on the JS thread (close, release or the finalizer of the owning object);
        // each was created by `new` and is released once, here.
        unsafe {
            if !self.context.is_null() {
                sys::napi_async_destroy(self.env, self.context);
            }
            if !self.func.is_null() {
                sys::napi_delete_reference(self.env, self.func);
            }
        }
    }
}
