//! DEVICE_GET_INFO's request and reply, through the proto crate's `device.rs`.

use crate::convert::NativeError;
use napi::bindgen_prelude::{Buffer, BufferSlice, Either};
use napi_derive::napi;
use vfio_user_client::proto::{device, Command};

/// A decoded DEVICE_GET_INFO reply.
#[napi(object, object_from_js = false)]
pub struct NativeDeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// The DEVICE_GET_INFO request payload.
#[napi]
pub fn device_info_request() -> Buffer {
    device::device_info_request().to_vec().into()
}

/// Decodes a DEVICE_GET_INFO reply payload.
#[napi]
pub fn decode_device_info(payload: BufferSlice) -> Either<NativeDeviceInfo, NativeError> {
    match device::decode_device_info(&payload) {
        Ok(d) => Either::A(NativeDeviceInfo {
            flags: d.flags,
            num_regions: d.num_regions,
            num_irqs: d.num_irqs,
        }),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceGetInfo, e)),
    }
}
