//! Completions travel to JavaScript in batches: read on the event loop, they are handed over
//! by the poll callback itself (`loop_reader.rs`); from other threads, each completion is pushed
//! on a queue, and only the push that finds the queue empty schedules a call into JS, which
//! then takes everything queued. Thousands in flight cost one JS call per wakeup, not one
//! per request, and no libuv threadpool thread is ever parked.

use crate::batch::Batch;
use crate::convert::{self, NativeError, NativeReply, Payload};
use napi::bindgen_prelude::BigInt;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use std::sync::{Arc, Mutex, Weak};
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

pub type Tsfn = ThreadsafeFunction<(), (), Batch, Status, false, true>;

#[derive(Clone, Default)]
pub struct EventQueue {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    tsfn: Option<Arc<Tsfn>>,
    /// The event loop is reading the socket and will hand over what is queued itself when
    /// done: pushes meanwhile need not wake the threadsafe function.
    loop_delivers: bool,
}

impl EventQueue {
    pub fn set_sink(&self, tsfn: Tsfn) {
        self.lock().tsfn = Some(Arc::new(tsfn));
    }

    /// Drops the sink: the JS callback is released, and events pushed later are discarded.
    pub fn clear_sink(&self) {
        let tsfn = self.lock().tsfn.take();
        drop(tsfn);
    }

    /// A handle that does not keep the queue alive, for the sink's own callback (which the
    /// queue owns: a strong handle there would be a cycle that is never freed).
    pub fn downgrade(&self) -> WeakEventQueue {
        WeakEventQueue(Arc::downgrade(&self.inner))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes `e` unless `cap` events already wait for JS: for reports a peer can make
    /// arbitrarily many of (served DMA requests) while JS is busy. Returns whether it was
    /// queued.
    pub fn push_unless_full(&self, e: Event, cap: usize) -> bool {
        let first = {
            let mut g = self.lock();
            if g.events.len() >= cap {
                return false;
            }
            g.events.push(e);
            g.events.len() == 1 && !g.loop_delivers
        };
        if first {
            self.wake();
        }
        true
    }

    pub fn push(&self, e: Event) {
        let first = {
            let mut g = self.lock();
            g.events.push(e);
            g.events.len() == 1 && !g.loop_delivers
        };
        if first {
            self.wake();
        }
    }

    /// Schedules one JS call for whatever is queued (also used once the sink exists, for
    /// events pushed before it did).
    pub fn wake(&self) {
        let tsfn = {
            let g = self.lock();
            if g.events.is_empty() {
                None
            } else {
                g.tsfn.clone()
            }
        };
        if let Some(t) = tsfn {
            t.call((), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }

    /// The event loop starts reading; it delivers what gets queued with
    /// [`EventQueue::take_from_loop`].
    pub fn loop_delivers(&self) {
        self.lock().loop_delivers = true;
    }

    /// Takes everything queued and ends [`EventQueue::loop_delivers`], in one step, so an event
    /// pushed from another thread right after is not missed (its push wakes the sink).
    pub fn take_from_loop(&self) -> Vec<Event> {
        let mut g = self.lock();
        g.loop_delivers = false;
        std::mem::take(&mut g.events)
    }

    /// Takes everything queued (on the JS thread).
    pub fn take(&self) -> Batch {
        Batch(std::mem::take(&mut self.lock().events))
    }
}

/// See [`EventQueue::downgrade`].
pub struct WeakEventQueue(Weak<Mutex<Inner>>);

impl WeakEventQueue {
    /// Takes everything queued, if the queue still exists (on the JS thread).
    pub fn take(&self) -> Batch {
        match self.0.upgrade() {
            Some(inner) => EventQueue { inner }.take(),
            None => Batch(Vec::new()),
        }
    }
}
