//! What happened, for JavaScript to settle: one [`Event`] per completion, interrupt, served
//! DMA request or close, and its object form ([`NativeEvent`]) for what does not travel as a
//! plain reply. The queue that carries them is `events.rs`; the array they reach JS in is
//! `batch.rs`.

use crate::convert::{self, NativeError, NativeReply, Payload};
use napi::bindgen_prelude::BigInt;
use napi_derive::napi;
use vfio_user_client::{Error, Reply};

/// One thing that happened, for the JS side to settle.
#[napi(object, object_from_js = false)]
#[derive(Default)]
pub struct NativeEvent {
    /// The request's token, or 0 for the connection's own events.
    pub token: u32,
    pub reply: Option<NativeReply>,
    pub error: Option<NativeError>,
    /// Set once, when the connection has ended; the error says why.
    pub closed: Option<NativeError>,
    /// An interrupt: a vector of an enabled group fired `count` times since it was last read.
    pub irq: Option<NativeIrq>,
    /// A server DMA request that was served (or refused: errno set).
    pub dma: Option<NativeDma>,
}

#[napi(object, object_from_js = false)]
pub struct NativeDma {
    pub write: bool,
    pub address: BigInt,
    pub count: f64,
    /// Set when it was refused: the errno's name.
    pub code: Option<String>,
    /// Requests served but not reported before this one, because JS had not taken the
    /// earlier reports yet (see [`EventQueue::push_unless_full`]).
    pub missed: u32,
}

#[napi(object, object_from_js = false)]
pub struct NativeIrq {
    pub group: u32,
    pub vector: u32,
    pub count: f64,
}

pub enum Event {
    Done(u32, Result<Reply, Error>),
    /// A typed call's bytes (a region read; none for a write), settled like a plain reply.
    Data(u32, Payload),
    /// A vector of an interrupt group fired: (group, vector, count).
    Irq(u32, u32, u64),
    /// A server DMA request was answered: (write, address, count, errno or 0, reports missed
    /// before it).
    Dma(bool, u64, u64, i32, u32),
    Closed(Error),
}

impl Event {
    /// The request's token, or 0 for the connection's own events.
    pub fn token(&self) -> u32 {
        match self {
            Event::Done(token, _) | Event::Data(token, _) => *token,
            Event::Closed(_) | Event::Irq(..) | Event::Dma(..) => 0,
        }
    }

    pub fn into_native(self) -> NativeEvent {
        match self {
            Event::Done(token, Ok(r)) => NativeEvent {
                token,
                reply: Some(convert::reply(r)),
                ..NativeEvent::default()
            },
            Event::Done(token, Err(e)) => NativeEvent {
                token,
                error: Some(convert::from_error(&e)),
                ..NativeEvent::default()
            },
            Event::Data(token, payload) => NativeEvent {
                token,
                reply: Some(NativeReply {
                    id: 0,
                    command: 0,
                    flags: 1,
                    payload,
                    fds: Vec::new(),
                }),
                ..NativeEvent::default()
            },
            Event::Irq(group, vector, count) => NativeEvent {
                irq: Some(NativeIrq {
                    group,
                    vector,
                    count: count as f64,
                }),
                ..NativeEvent::default()
            },
            Event::Dma(write, address, count, errno, missed) => NativeEvent {
                dma: Some(NativeDma {
                    write,
                    address: BigInt::from(address),
                    count: count as f64,
                    code: (errno != 0).then(|| format!("{:?}", nix::errno::Errno::from_raw(errno))),
                    missed,
                }),
                ..NativeEvent::default()
            },
            Event::Closed(e) => NativeEvent {
                closed: Some(convert::from_error(&e)),
                ..NativeEvent::default()
            },
        }
    }
}
