//! Coalescing small posted writes into REGION_WRITE_MULTI (protocol.md 3.9), as QEMU does,
//! when the server offered `write_multiple`. A posted write of at most 8 bytes that would
//! wait in the queue anyway (sends are corked, or earlier messages are still unwritten) joins
//! the REGION_WRITE_MULTI at the tail of the queue, or starts one. Only the tail is ever
//! joined, so every message keeps its place: whatever was sent after a write goes after it.
//! A write that can go out at once goes out at once, as REGION_WRITE: nothing is held back.

use crate::outgoing::Outgoing;
use crate::state::{NewRequest, State};
use vfio_user_proto::write_multi::{append_write, small_write, write_multi_message};

impl State {
    /// Queues posted REGION_WRITE `req` as an entry of a REGION_WRITE_MULTI when it qualifies
    /// (small, the server takes them, and it would be queued anyway); false when it does not,
    /// and nothing was done.
    pub fn coalesce_write(&mut self, req: &NewRequest<'_>, corked: bool) -> bool {
        let offered = self
            .version
            .as_ref()
            .is_some_and(|v| v.capabilities.write_multiple);
        if !offered || req.id.is_some() || (!corked && self.outgoing.is_empty()) {
            return false;
        }
        let Some(w) = small_write(req.body()) else {
            return false;
        };
        if !self.outgoing.join_last(|msg| append_write(msg, w)) {
            let id = u16::from_ne_bytes([req.header[0], req.header[1]]);
            self.outgoing.push(Outgoing {
                id: None,
                reply: false,
                seq: req.seq,
                bytes: write_multi_message(id, w),
                body: Vec::new(),
                written: 0,
                fds: Vec::new(),
                merge: true,
            });
        }
        self.stats.queued_sends += 1;
        self.stats.coalesced_writes += 1;
        true
    }
}
