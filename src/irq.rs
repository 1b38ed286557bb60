//! Interrupts: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS through the proto crate's `irq.rs`,
//! and eventfd groups through the client crate's `irq.rs`.

use crate::client::NativeClient;
use crate::convert::{self, NativeError};
use crate::event::Event;
use napi::bindgen_prelude::{Buffer, BufferSlice, Either};
use napi_derive::napi;
use vfio_user_client::proto::{irq, Command};
use vfio_user_client::IrqFds;

/// A decoded DEVICE_GET_IRQ_INFO reply.
#[napi(object, object_from_js = false)]
pub struct NativeIrqInfo {
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// The DEVICE_GET_IRQ_INFO request payload for `index`.
#[napi]
pub fn irq_info_request(index: u32) -> Buffer {
    irq::irq_info_request(index).to_vec().into()
}

/// Decodes a DEVICE_GET_IRQ_INFO reply payload for `index`.
#[napi]
pub fn decode_irq_info(payload: BufferSlice, index: u32) -> Either<NativeIrqInfo, NativeError> {
    match irq::decode_irq_info(&payload, index) {
        Ok(i) => Either::A(NativeIrqInfo {
            flags: i.flags,
            index: i.index,
            count: i.count,
        }),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceGetIrqInfo, e)),
    }
}

/// The DEVICE_SET_IRQS request payload (`data`: one byte per vector, with DATA_BOOL).
#[napi]
pub fn set_irqs_request(
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: BufferSlice,
) -> Buffer {
    irq::set_irqs_request(flags, index, start, count, &data).into()
}

/// An enabled group of vectors: its id (as irq events name it) and its eventfds (borrowed).
#[napi(object, object_from_js = false)]
pub struct NativeIrqGroup {
    pub group: u32,
    pub fds: Vec<i32>,
}

#[napi]
impl NativeClient {
    /// Makes and wires an eventfd per vector of [start, start + count) of irq `index`, read
    /// here when `watch`, or wires the caller's `fds` (never read here); a reply event with
    /// `token` follows once the server has answered every chunk.
    #[napi]
    #[allow(clippy::too_many_arguments)]
    pub fn enable_irqs(
        &self,
        token: u32,
        index: u32,
        start: u32,
        count: u32,
        timeout_ms: Option<u32>,
        watch: bool,
        fds: Option<Vec<i32>>,
    ) -> Either<NativeIrqGroup, NativeError> {
        let events = self.events.clone();
        let done = Box::new(move |r| events.push(Event::Done(token, r)));
        let given = fds.as_deref().map(crate::client::borrow_fds);
        let source = match &given {
            Some(fds) => IrqFds::Given(fds),
            None => IrqFds::Make { watch },
        };
        let timeout = convert::timeout(timeout_ms);
        match self.live(|c| c.enable_irqs_with(index, start, count, source, timeout, done)) {
            Ok(e) => Either::A(NativeIrqGroup {
                group: e.group,
                fds: e.fds,
            }),
            Err(e) => Either::B(convert::from_error(&e)),
        }
    }

    /// Stops group `group` at once (eventfds closed) and unwires it on the device; a reply
    /// event with `token` follows. Returns an error if nothing was sent.
    #[napi]
    pub fn disable_irqs(
        &self,
        token: u32,
        group: u32,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let done = Box::new(move |r| events.push(Event::Done(token, r)));
        self.live(|c| c.disable_irqs(group, convert::timeout(timeout_ms), done))
            .err()
            .map(|e| convert::from_error(&e))
    }
}

/// A new eventfd (close-on-exec, nonblocking, counter 0), handed to JavaScript: the caller owns
/// the number and closes it (`fs.closeSync`). Node cannot make one.
#[napi]
pub fn create_event_fd() -> Either<i32, NativeError> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::os::fd::{IntoRawFd, OwnedFd};
    match EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK) {
        Ok(fd) => Either::A(OwnedFd::from(fd).into_raw_fd()),
        Err(e) => Either::B(convert::from_error(&vfio_user_client::Error::new(
            e,
            format!("cannot make an eventfd: {}", e.desc()),
        ))),
    }
}
