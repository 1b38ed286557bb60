//! DEVICE_GET_IRQ_INFO's request and reply, through the proto crate's `irq.rs`.

use crate::convert::NativeError;
use napi::bindgen_prelude::{Buffer, BufferSlice, Either};
use napi_derive::napi;
use vfio_user_client::proto::{irq, Command};

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
