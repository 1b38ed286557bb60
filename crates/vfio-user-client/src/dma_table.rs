//! The DMA ranges this client has offered the server, and serving the server's DMA_READ and
//! DMA_WRITE requests from the memory behind them (protocol.md 3.11): bounds and overflow
//! checked, EFAULT for an address nobody mapped, the spec's reply layout.

use crate::fault_safe;
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::sync::Arc;
use vfio_user_proto::dma::{decode_dma_request, dma_reply_head};

/// Memory in this process behind a DMA range.
pub trait LocalMemory: Send + Sync {
    /// Its start and length. It must stay mapped and writable for as long as this object
    /// lives.
    fn as_ptr_len(&self) -> (*mut u8, usize);

    /// True when the file behind it may shrink under the mapping (another process holds its
    /// fd and nothing seals it): then it is copied only through the kernel, which fails with
    /// EFAULT where a plain copy would be SIGBUS.
    fn shrinkable(&self) -> bool {
        false
    }
}

/// One mapped range.
pub struct Entry {
    pub size: u64,
    pub read: bool,
    pub write: bool,
    /// Where DMA_READ/DMA_WRITE to this range are served from (None: the server got an fd and
    /// accesses the memory itself).
    pub local: Option<Arc<dyn LocalMemory>>,
    /// Tells this map from a later one at the same address.
    pub generation: u64,
}

#[derive(Default)]
pub struct DmaTable {
    maps: BTreeMap<u64, Entry>,
    next_generation: u64,
}

impl DmaTable {
    /// How many ranges are mapped.
    pub fn count(&self) -> usize {
        self.maps.len()
    }

    /// The map that overlaps [iova, iova + size), if any.
    pub fn overlapping(&self, iova: u64, size: u64) -> Option<(u64, u64)> {
        let end = iova.saturating_add(size);
        self.maps
            .range(..end)
            .next_back()
            .filter(|(start, e)| start.saturating_add(e.size) > iova)
            .map(|(start, e)| (*start, e.size))
    }

    /// Records a map; returns its generation.
    pub fn insert(&mut self, iova: u64, mut entry: Entry) -> u64 {
        self.next_generation += 1;
        entry.generation = self.next_generation;
        self.maps.insert(iova, entry);
        self.next_generation
    }

    /// The map at exactly `iova` with `size`, if there is one.
    pub fn get(&self, iova: u64, size: u64) -> Option<&Entry> {
        self.maps.get(&iova).filter(|e| e.size == size)
    }

    /// Forgets the map at `iova`, if it is still the one of `generation`.
    pub fn remove(&mut self, iova: u64, generation: u64) {
        if self
            .maps
            .get(&iova)
            .is_some_and(|e| e.generation == generation)
        {
            self.maps.remove(&iova);
        }
    }

    pub fn clear(&mut self) {
        self.maps.clear();
    }

    /// Serves a DMA_READ (`write` false) or DMA_WRITE request of at most `max` bytes:
    /// the reply payload, or the errno to refuse it with.
    pub fn serve(&self, payload: &[u8], write: bool, max: u64) -> Result<Vec<u8>, Errno> {
        let access = decode_dma_request(payload, write).map_err(|_| Errno::EINVAL)?;
        if access.count > max {
            return Err(Errno::E2BIG);
        }
        let (iova, entry) = self
            .maps
            .range(..=access.address)
            .next_back()
            .ok_or(Errno::EFAULT)?;
        let offset = access.address - iova;
        if offset.saturating_add(access.count) > entry.size {
            return Err(Errno::EFAULT);
        }
        // A device reads memory mapped READ and writes memory mapped WRITE.
        if (write && !entry.write) || (!write && !entry.read) {
            return Err(Errno::EACCES);
        }
        let local = entry.local.as_ref().ok_or(Errno::EFAULT)?;
        let (ptr, len) = local.as_ptr_len();
        let (offset, count) = (offset as usize, access.count as usize);
        if offset.saturating_add(count) > len {
            return Err(Errno::EFAULT);
        }
        let mut reply = dma_reply_head(access.address, access.count).to_vec();
        let guarded = local.shrinkable();
        if write {
            // SAFETY: [offset, offset + count) lies inside the memory, which stays mapped while
            // its entry is in this table (the caller holds the table's lock); `access.data` is
            // exactly `count` bytes of another buffer. Memory whose file may shrink is copied
            // through the kernel: a server that truncated it gets EFAULT, not us SIGBUS.
            unsafe {
                fault_safe::copy_if(
                    guarded,
                    ptr.wrapping_add(offset),
                    access.data.as_ptr(),
                    count,
                )?
            };
        } else {
            reply.reserve_exact(count);
            let room = reply.as_mut_ptr().wrapping_add(reply.len());
            // SAFETY: as above, into the reply's reserved room for `count` more bytes.
            unsafe { fault_safe::copy_if(guarded, room, ptr.wrapping_add(offset), count)? };
            // SAFETY: the copy initialised those `count` bytes.
            unsafe { reply.set_len(reply.len() + count) };
        }
        Ok(reply)
    }
}
