//! The eventfds wired to a device's interrupt vectors, watched by the I/O thread: when the
//! device signals one, the I/O thread reads its counter (so signals between reads coalesce)
//! and hands `(group, vector, count)` to the hook. Each group's eventfds are closed when the
//! group is removed, and all of them when the connection ends (see [`Group`]).

use nix::sys::eventfd::EventFd;
use std::collections::HashMap;
use std::os::fd::AsFd;

/// Called on the I/O thread with a group id, a vector and how many signals it coalesced.
pub type IrqHook = Box<dyn Fn(u32, u32, u64) + Send>;

/// epoll data of an eventfd: this bit set, the group in bits 32..64, the vector below.
pub const IRQ_TOKEN: u64 = 1 << 31;

pub fn token(group: u32, vector: u32) -> u64 {
    (u64::from(group) << 32) | IRQ_TOKEN | u64::from(vector & 0x7fff_ffff)
}

/// Group and vector of a token made by [`token`].
pub fn untoken(t: u64) -> Option<(u32, u32)> {
    (t & IRQ_TOKEN != 0).then_some(((t >> 32) as u32, (t & 0x7fff_ffff) as u32))
}

/// One `enable_irqs` call: an irq index, its first vector, and an eventfd per vector.
pub struct Group {
    pub index: u32,
    pub start: u32,
    pub fds: Vec<EventFd>,
}

#[derive(Default)]
pub struct IrqTable {
    groups: HashMap<u32, Group>,
    next: u32,
    pub hook: Option<IrqHook>,
}

impl IrqTable {
    /// Adds a group; returns its id.
    pub fn add(&mut self, group: Group) -> u32 {
        self.next = self.next.wrapping_add(1).max(1);
        self.groups.insert(self.next, group);
        self.next
    }

    pub fn get(&self, id: u32) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// Takes a group out. Delete its eventfds from any epoll set before dropping it: the
    /// server holds duplicates, so closing ours alone would leave them registered.
    pub fn remove(&mut self, id: u32) -> Option<Group> {
        self.groups.remove(&id)
    }

    /// Reads the counter of vector `vector` of group `id`: how many signals since the last
    /// read (0 if none, or if the group is gone).
    pub fn take_count(&self, id: u32, vector: u32) -> u64 {
        let Some(g) = self.groups.get(&id) else {
            return 0;
        };
        let Some(fd) = vector
            .checked_sub(g.start)
            .and_then(|i| g.fds.get(i as usize))
        else {
            return 0;
        };
        let mut buf = [0u8; 8];
        match nix::unistd::read(fd.as_fd(), &mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            _ => 0,
        }
    }

    /// Every group, taken out (the connection ended).
    pub fn take_all(&mut self) -> Vec<Group> {
        self.groups.drain().map(|(_, g)| g).collect()
    }
}
