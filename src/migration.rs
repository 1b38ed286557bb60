//! The device-state stream (MIG_DATA_READ / MIG_DATA_WRITE) through the proto crate's
//! `migration.rs`, and the native pump from one connection's stream into another's.

use crate::client::NativeClient;
use crate::convert::{self, NativeError, Payload};
use crate::event::Event;
use napi::bindgen_prelude::{Buffer, BufferSlice, Either};
use napi_derive::napi;
use vfio_user_client::proto::{migration, Command};
use vfio_user_client::Pumped;

/// A MIG_DATA_READ request for up to `size` bytes.
#[napi]
pub fn mig_data_read_request(size: u32) -> Buffer {
    migration::mig_data_read_request(size).to_vec().into()
}

/// Where the data of a MIG_DATA_READ reply to a request for `asked` bytes lies in the payload.
#[napi(object)]
pub struct NativeRange {
    pub start: u32,
    pub end: u32,
}

/// Where the data of a MIG_DATA_READ reply to a request for `asked` bytes lies in its
/// payload: JS takes a view of it, so a chunk of device state is never copied here.
#[napi]
pub fn mig_data_read_data(payload: BufferSlice, asked: u32) -> Either<NativeRange, NativeError> {
    match migration::mig_data_read_data(&payload, asked) {
        // The data is at the front of what follows the header; any padding after it is not.
        Ok(d) => Either::A(NativeRange {
            start: migration::MIG_DATA_HEADER as u32,
            end: (migration::MIG_DATA_HEADER + d.len()) as u32,
        }),
        Err(e) => Either::B(NativeError::proto_reply(Command::MigDataRead, e)),
    }
}

/// A MIG_DATA_WRITE request carrying `data`.
#[napi]
pub fn mig_data_write_request(data: BufferSlice) -> Buffer {
    migration::mig_data_write_request(&data).into()
}

#[napi]
impl NativeClient {
    /// Moves this connection's device-state stream into `dest`'s (see
    /// `Client::pump_state_to`); a reply event with `token` follows, whose payload
    /// [`decode_pumped`] reads. Returns an error if nothing was sent (then no event follows).
    #[napi]
    pub fn pump_state_to(
        &self,
        token: u32,
        dest: &NativeClient,
        chunk: u32,
        limit: f64,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let done = Box::new(move |r: Result<Pumped, vfio_user_client::Error>| {
            events.push(match r {
                Ok(p) => Event::Data(token, Payload::whole(encode_pumped(p))),
                Err(e) => Event::Done(token, Err(e)),
            })
        });
        let limit = if limit.is_finite() && limit > 0.0 {
            limit as u64
        } else {
            u64::MAX
        };
        self.live(|c| {
            dest.live(|d| c.pump_state_to(d, chunk, limit, convert::timeout(timeout_ms), done))
        })
        .err()
        .map(|e| convert::from_error(&e))
    }
}

/// What a pump moved, as the payload of its reply event (events carry bytes): the bytes
/// moved (u64, little-endian), then 1 if the stream ended. [`decode_pumped`] reads it.
fn encode_pumped(p: Pumped) -> Vec<u8> {
    let mut buf = p.bytes.to_le_bytes().to_vec();
    buf.push(u8::from(p.ended));
    buf
}

/// What a pump moved.
#[napi(object, object_from_js = false)]
pub struct NativePumped {
    pub bytes: f64,
    pub ended: bool,
}

/// What [`NativeClient::pump_state_to`] reported, from its reply event's payload.
#[napi]
pub fn decode_pumped(payload: BufferSlice) -> NativePumped {
    let mut bytes = [0u8; 8];
    let n = payload.len().min(8);
    bytes[..n].copy_from_slice(&payload[..n]);
    NativePumped {
        bytes: u64::from_le_bytes(bytes) as f64,
        ended: payload.get(8) == Some(&1),
    }
}
