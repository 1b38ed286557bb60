//! The 16-bit message ids of one connection.
//!
//! An id is *held* from the moment a request that wants a reply takes it until that reply
//! can no longer arrive: its reply came, it failed before any of it was written, or the
//! connection ended. A request that timed out (or failed) after it went on the wire leaves a
//! *tombstone*: its id stays held until its late reply arrives, however long that takes and
//! however many there are, so a late reply is never taken for the answer to a newer request.
//! When every id is held, new requests are refused (EAGAIN): the stream's history cannot
//! tell whose reply would come next, so we do not guess.
//!
//! Bitmaps keep every operation cheap, including a refusal when the space is full.

use std::hash::{BuildHasherDefault, Hasher};

const WORDS: usize = (u16::MAX as usize + 1) / 64;

/// Hashes message ids for the tables keyed by them: a multiply that spreads the 16 bits over
/// the word (the table's control bytes come from its top bits). The ids in a table are ours;
/// a peer only makes us look one up, so SipHash's defence against chosen keys buys nothing,
/// and it cost about 100 instructions a lookup, several lookups a request.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A hash map keyed by message id.
pub type IdMap<V> = std::collections::HashMap<u16, V, BuildHasherDefault<IdHasher>>;

pub struct Ids {
    held: Box<[u64; WORDS]>,
    tombstones: Box<[u64; WORDS]>,
    held_count: usize,
    tombstone_count: usize,
    /// Where the search for a free id starts: ids are handed out round-robin, so an id is
    /// reused as late as possible.
    next: u16,
}

impl Default for Ids {
    fn default() -> Self {
        Ids {
            held: Box::new([0; WORDS]),
            tombstones: Box::new([0; WORDS]),
            held_count: 0,
            tombstone_count: 0,
            next: 0,
        }
    }
}

fn bit(id: u16) -> (usize, u64) {
    (id as usize / 64, 1u64 << (id % 64))
}

impl Ids {
    /// The next free id, marked held when `hold` (a posted request, which expects no reply,
    /// takes an id without holding it). None when every id is held.
    pub fn take(&mut self, hold: bool) -> Option<u16> {
        if self.held_count > u16::MAX as usize {
            return None;
        }
        let start = self.next as usize;
        // Search word by word from `start`, wrapping once: at most WORDS + 1 words.
        for step in 0..=WORDS {
            let w = (start / 64 + step) % WORDS;
            let mut free = !self.held[w];
            if step == 0 {
                free &= u64::MAX << (start % 64);
            }
            if free == 0 {
                continue;
            }
            let id = (w * 64 + free.trailing_zeros() as usize) as u16;
            self.next = id.wrapping_add(1);
            if hold {
                self.held[w] |= 1 << (id % 64);
                self.held_count += 1;
            }
            return Some(id);
        }
        None
    }

    /// The reply to `id` arrived, or its request never reached the wire: the id is free.
    pub fn release(&mut self, id: u16) {
        let (w, m) = bit(id);
        if self.held[w] & m != 0 {
            self.held[w] &= !m;
            self.held_count -= 1;
        }
        if self.tombstones[w] & m != 0 {
            self.tombstones[w] &= !m;
            self.tombstone_count -= 1;
        }
    }

    /// Request `id` was given up on after it went on the wire: keep the id until its reply.
    pub fn tombstone(&mut self, id: u16) {
        let (w, m) = bit(id);
        if self.held[w] & m == 0 {
            self.held[w] |= m;
            self.held_count += 1;
        }
        if self.tombstones[w] & m == 0 {
            self.tombstones[w] |= m;
            self.tombstone_count += 1;
        }
    }

    pub fn is_tombstone(&self, id: u16) -> bool {
        let (w, m) = bit(id);
        self.tombstones[w] & m != 0
    }

    /// Ids held by a tombstone (awaiting a late reply).
    pub fn tombstones(&self) -> usize {
        self.tombstone_count
    }

    /// The connection ended: no reply can arrive any more.
    pub fn clear(&mut self) {
        self.held.fill(0);
        self.tombstones.fill(0);
        self.held_count = 0;
        self.tombstone_count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skipping_held_and_refusing_when_full() {
        let mut ids = Ids::default();
        assert_eq!(ids.take(true), Some(0));
        assert_eq!(ids.take(false), Some(1));
        // A posted request's id is not held.
        assert_eq!(ids.take(true), Some(2));
        ids.release(0);
        // Round-robin: 0 is free again but comes back only after a wrap.
        assert_eq!(ids.take(true), Some(3));
        for expect in 4..=u16::MAX {
            assert_eq!(ids.take(true), Some(expect));
        }
        assert_eq!(ids.take(true), Some(0));
        assert_eq!(ids.take(true), Some(1));
        assert_eq!(ids.take(true), None);
        assert_eq!(ids.take(false), None);
        ids.tombstone(700);
        assert_eq!(ids.take(true), None, "a tombstone keeps its id held");
        ids.release(700);
        assert_eq!(ids.take(true), Some(700));
        ids.clear();
        assert_eq!(ids.take(true), Some(701));
    }

    #[test]
    fn tombstones_are_counted_and_released_by_their_reply() {
        let mut ids = Ids::default();
        for _ in 0..10_000 {
            let id = ids.take(true).expect("free id");
            ids.tombstone(id);
        }
        assert_eq!(ids.tombstones(), 10_000);
        assert!(ids.is_tombstone(9_999));
        ids.release(9_999);
        assert!(!ids.is_tombstone(9_999));
        assert_eq!(ids.tombstones(), 9_999);
    }
}
