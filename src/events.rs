//! Completions travel to JavaScript in batches: read on the event loop, they are handed over
//! by the poll callback itself (`loop_reader.rs`); from other threads, each completion is pushed
//! on a queue, and only the push that finds the queue empty schedules a call into JS, which
//! then takes everything queued. Thousands in flight cost one JS call per wakeup, not one
//! per request, and no libuv threadpool thread is ever parked.

use crate::batch::{Batch, BatchArea};
use crate::event::Event;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use std::sync::{Arc, Mutex, Weak};

pub type Tsfn = ThreadsafeFunction<(), (), Batch, Status, false, true>;

#[derive(Clone, Default)]
pub struct EventQueue {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    tsfn: Option<Arc<Tsfn>>,
    /// Where plain replies are handed over without an N-API call each (see `batch.rs`);
    /// forgotten with the sink, before the client lets go of the memory.
    area: Option<BatchArea>,
    /// The event loop is reading the socket and will hand over what is queued itself when
    /// done: pushes meanwhile need not wake the threadsafe function.
    loop_delivers: bool,
    /// The connection is ending: the failures of everything in flight are being queued and
    /// the close event follows them. Nothing is handed over until it does, so JS settles
    /// the failures and emits 'close' in one call.
    ending: bool,
}

impl EventQueue {
    pub fn set_sink(&self, tsfn: Tsfn, area: BatchArea) {
        let mut g = self.lock();
        g.tsfn = Some(Arc::new(tsfn));
        g.area = Some(area);
    }

    /// Drops the sink: the JS callback is released, events pushed later are discarded, and
    /// the shared memory is no longer written.
    pub fn clear_sink(&self) {
        let tsfn = {
            let mut g = self.lock();
            g.area = None;
            g.tsfn.take()
        };
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
            g.events.len() == 1 && !g.loop_delivers && !g.ending
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
            g.events.len() == 1 && !g.loop_delivers && !g.ending
        };
        if first {
            self.wake();
        }
    }

    /// Queues that `vector` of interrupt group `group` fired `count` times, adding to a report
    /// of the same vector still waiting for JS if there is one: a device signalling in a
    /// loop while JS is busy (a long synchronous call) grows no queue, and JS gets the sum.
    pub fn push_irq(&self, group: u32, vector: u32, count: u64) {
        {
            let mut g = self.lock();
            let waiting = g.events.iter_mut().rev().find_map(|e| match e {
                Event::Irq(gr, v, c) if *gr == group && *v == vector => Some(c),
                _ => None,
            });
            if let Some(c) = waiting {
                *c = c.saturating_add(count);
                return;
            }
        }
        self.push(Event::Irq(group, vector, count));
    }

    /// The connection begins to end: hold everything back until [`EventQueue::push_end`].
    pub fn hold_for_end(&self) {
        self.lock().ending = true;
    }

    /// Queues the close event behind the failures it follows and hands them all over.
    pub fn push_end(&self, e: Event) {
        let wake = {
            let mut g = self.lock();
            g.events.push(e);
            g.ending = false;
            !g.loop_delivers
        };
        if wake {
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
    pub fn take_from_loop(&self) -> Batch {
        let mut g = self.lock();
        g.loop_delivers = false;
        if g.ending {
            return Batch::new(Vec::new(), g.area);
        }
        Batch::new(std::mem::take(&mut g.events), g.area)
    }

    /// Takes everything queued (on the JS thread); nothing while the end is held back.
    pub fn take(&self) -> Batch {
        let mut g = self.lock();
        if g.ending {
            return Batch::new(Vec::new(), g.area);
        }
        Batch::new(std::mem::take(&mut g.events), g.area)
    }
}

/// See [`EventQueue::downgrade`].
pub struct WeakEventQueue(Weak<Mutex<Inner>>);

impl WeakEventQueue {
    /// Takes everything queued, if the queue still exists (on the JS thread).
    pub fn take(&self) -> Batch {
        match self.0.upgrade() {
            Some(inner) => EventQueue { inner }.take(),
            None => Batch::new(Vec::new(), None),
        }
    }
}
