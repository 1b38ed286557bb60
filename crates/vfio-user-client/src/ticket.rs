//! A request whose reply is collected later, blocking ([`Ticket::wait`]).

use crate::pending::{Reply, Slot};
use crate::reader::ReaderGuard;
use crate::shared::Shared;
use crate::state::Fired;
use crate::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request sent with [`Client::send_nowait`], to be collected with [`Ticket::wait`].
pub struct Ticket {
    pub(crate) shared: Arc<Shared>,
    pub(crate) slot: Arc<Slot>,
    pub(crate) id: u16,
    pub(crate) seq: u64,
    pub(crate) deadline: Instant,
    /// The request's whole timeout (deadline minus when it was sent).
    pub(crate) timeout: Duration,
}

impl Ticket {
    /// Blocks until the reply arrives, the deadline passes or the connection ends.
    pub fn wait(self) -> Result<Reply, Error> {
        if let Some(r) = self.slot.try_take() {
            return r;
        }
        let shared = self.shared.clone();
        let reader = ReaderGuard::take(&shared);
        self.wait_reading(reader)
    }

    /// Fast path: read the reply on this thread, as a blocking client would, instead of
    /// waking the I/O thread to wake us. Anything else that arrives meanwhile is dispatched
    /// exactly as the I/O thread would. Without the reader role, sleep until the I/O thread
    /// (or another reading caller) fills the slot.
    pub(crate) fn wait_reading(self, reader: Option<ReaderGuard<'_>>) -> Result<Reply, Error> {
        if let Some(mut reader) = reader {
            reader.read_until(&self.slot, self.deadline, self.timeout);
        } else {
            // Someone else was reading. They may stop before our reply comes (an event loop's
            // backup read, another caller): look again now and then instead of relying on a
            // backup check alone.
            loop {
                let now = Instant::now();
                if now >= self.deadline {
                    break;
                }
                let nap = self.deadline.min(now + Duration::from_millis(1));
                if let Some(r) = self.slot.wait_until(Some(nap)) {
                    return r;
                }
                if let Some(mut reader) = ReaderGuard::take(&self.shared) {
                    reader.read_until(&self.slot, self.deadline, self.timeout);
                    break;
                }
            }
        }
        if let Some(r) = self.slot.wait_until(Some(self.deadline)) {
            return r;
        }
        // Our deadline passed before the I/O thread noticed: expire it ourselves (no thread
        // hop), unless a reply slipped in meanwhile, which then is in the slot.
        let mut fired = Fired::default();
        self.shared.lock().time_out(self.id, self.seq, &mut fired);
        fired.fire();
        self.slot.wait()
    }
}
