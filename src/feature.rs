//! DEVICE_FEATURE requests and replies and the migration state machine's paths, through the
//! proto crate's `feature.rs`.

use crate::convert::{self, NativeError};
use napi::bindgen_prelude::{Buffer, BufferSlice, Either};
use napi_derive::napi;
use nix::errno::Errno;
use vfio_user_client::proto::{feature, Command};
use vfio_user_client::Error;

fn invalid(what: String) -> NativeError {
    convert::from_error(
        &Error::new(Errno::EINVAL, what).with_command(Command::DeviceFeature as u16),
    )
}

/// A DEVICE_FEATURE request payload (`ops`: the GET/SET/PROBE bits), or why the combination
/// is not allowed.
#[napi]
pub fn feature_request(
    feature: u32,
    ops: u32,
    argsz: u32,
    data: BufferSlice,
) -> Either<Buffer, NativeError> {
    match feature::feature_request(feature as u16, ops, argsz, &data) {
        Ok(p) => Either::A(p.into()),
        Err(what) => Either::B(invalid(what)),
    }
}

/// The data of a DEVICE_FEATURE reply to a request with `flags`.
#[napi]
pub fn feature_reply_data(payload: BufferSlice, flags: u32) -> Either<Buffer, NativeError> {
    match feature::feature_reply_data(&payload, flags) {
        Ok(d) => Either::A(d.to_vec().into()),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceFeature, e)),
    }
}

/// The MIGRATION feature's flags.
#[napi]
pub fn decode_migration_flags(data: BufferSlice) -> Either<u32, NativeError> {
    match feature::decode_migration_flags(&data) {
        Ok(f) => Either::A(f as u32),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceFeature, e)),
    }
}

/// The MIG_DEVICE_STATE data for `state`.
#[napi]
pub fn device_state_data(state: u32) -> Buffer {
    feature::device_state_data(state).to_vec().into()
}

/// The state a MIG_DEVICE_STATE reply reports.
#[napi]
pub fn decode_device_state(data: BufferSlice) -> Either<u32, NativeError> {
    match feature::decode_device_state(&data) {
        Ok(s) => Either::A(s as u32),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceFeature, e)),
    }
}

/// The states to set, one direct arc each, to go from `from` to `to`.
#[napi]
pub fn migration_path(from: u32, to: u32) -> Either<Vec<u32>, NativeError> {
    let (Some(f), Some(t)) = (
        feature::MigState::from_u32(from),
        feature::MigState::from_u32(to),
    ) else {
        return Either::B(invalid(format!("unknown migration state {from} or {to}")));
    };
    match feature::migration_path(f, t) {
        Ok(p) => Either::A(p.into_iter().map(|s| s as u32).collect()),
        Err(what) => Either::B(invalid(what)),
    }
}
