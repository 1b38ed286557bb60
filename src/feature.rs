//! DEVICE_FEATURE requests and replies and the migration state machine's paths, through the
//! proto crate's `feature.rs`.

use crate::convert::{self, NativeError};
use napi::bindgen_prelude::{BigInt, Buffer, BufferSlice, Either};
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

/// DMA_LOGGING_START data: the page size, then [iova, length] pairs, flat.
#[napi]
pub fn logging_start_data(page_size: BigInt, ranges: Vec<BigInt>) -> Buffer {
    let pairs: Vec<(u64, u64)> = ranges
        .chunks_exact(2)
        .map(|p| (p[0].get_u64().1, p[1].get_u64().1))
        .collect();
    feature::logging_start_data(page_size.get_u64().1, &pairs).into()
}

/// The page size a DMA_LOGGING_START reply's data settled on.
#[napi]
pub fn logging_start_page_size(data: BufferSlice) -> Either<BigInt, NativeError> {
    match feature::logging_start_page_size(&data) {
        Ok(p) => Either::A(BigInt::from(p)),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceFeature, e)),
    }
}

/// DMA_LOGGING_REPORT request data, and the reply argsz it needs.
#[napi(object, object_from_js = false)]
pub struct NativeReportRequest {
    pub data: Buffer,
    pub argsz: u32,
}

#[napi]
pub fn logging_report_request(
    iova: BigInt,
    length: BigInt,
    page_size: BigInt,
) -> Either<NativeReportRequest, NativeError> {
    let (iova, length, page) = (iova.get_u64().1, length.get_u64().1, page_size.get_u64().1);
    let need = 8 + feature::REPORT_HEADER as u64 + feature::bitmap_bytes(length, page);
    match u32::try_from(need) {
        Ok(argsz) => Either::A(NativeReportRequest {
            data: feature::logging_report_data(iova, length, page)
                .to_vec()
                .into(),
            argsz,
        }),
        Err(_) => Either::B(invalid(format!(
            "a report of {length} bytes needs a bitmap past 4 GiB"
        ))),
    }
}

/// The dirty ranges of a DMA_LOGGING_REPORT reply's data, flat [iova, length, …].
#[napi]
pub fn decode_dirty_bitmap(
    data: BufferSlice,
    iova: BigInt,
    length: BigInt,
    page_size: BigInt,
) -> Either<Vec<BigInt>, NativeError> {
    match feature::decode_dirty_bitmap(
        &data,
        iova.get_u64().1,
        length.get_u64().1,
        page_size.get_u64().1,
    ) {
        Ok(r) => Either::A(
            r.into_iter()
                .flat_map(|(a, b)| [BigInt::from(a), BigInt::from(b)])
                .collect(),
        ),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceFeature, e)),
    }
}
