//! One connection's DMA maps (each fd mmapped), the device's DMA writes into them, and dirty
//! logging over them: DMA_LOGGING_START/STOP/REPORT (protocol.md 3.12), bit i of the report
//! being page i of the range asked, in word i / 64.

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

pub const EINVAL: u32 = 22;
pub const EFAULT: u32 = 14;
pub const EACCES: u32 = 13;
pub const EEXIST: u32 = 17;
pub const ENOSPC: u32 = 28;
pub const MAX_MAPS: usize = 64;
const DMA_WRITE: u32 = 2;

struct Map {
    iova: u64,
    size: u64,
    flags: u32,
    /// The fd's pages, when one came; without one the device cannot reach the memory.
    mem: Option<NonNull<u8>>,
}

/// Dirty logging in progress: its page size, the ranges logged, the pages written since the
/// last report (by address of the logging page).
struct Logging {
    page: u64,
    ranges: Vec<(u64, u64)>,
    dirty: BTreeSet<u64>,
}

#[derive(Default)]
pub struct Dma {
    maps: Vec<Map>,
    logging: Option<Logging>,
}

impl Dma {
    pub fn map(
        &mut self,
        iova: u64,
        size: u64,
        offset: u64,
        flags: u32,
        fd: Option<OwnedFd>,
    ) -> Result<(), u32> {
        if size == 0 || flags & !3 != 0 || iova.checked_add(size).is_none() {
            return Err(EINVAL);
        }
        if self.maps.len() >= MAX_MAPS {
            return Err(ENOSPC);
        }
        if self
            .maps
            .iter()
            .any(|m| iova < m.iova + m.size && m.iova < iova + size)
        {
            return Err(EEXIST);
        }
        let mem = match fd {
            None => None,
            Some(fd) => {
                let len = NonZeroUsize::new(size as usize).ok_or(EINVAL)?;
                let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
                let offset = i64::try_from(offset).map_err(|_| EINVAL)?;
                // SAFETY: a fresh shared mapping of an fd the client sent; nothing else refers
                // to it until it is unmapped in `unmap` or on drop. The fd may close after. (A
                // client that shrinks the file under it makes a later DMA write fault: this is
                // a test device and trusts its client that far.)
                let p = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, fd, offset) }
                    .map_err(|e| e as u32)?;
                Some(p.cast())
            }
        };
        self.maps.push(Map {
            iova,
            size,
            flags,
            mem,
        });
        Ok(())
    }

    /// DMA_UNMAP of one earlier map (exactly), or of every map.
    pub fn unmap(&mut self, iova: u64, size: u64, all: bool) -> Result<(), u32> {
        if all {
            for m in std::mem::take(&mut self.maps) {
                release(m);
            }
            return Ok(());
        }
        let at = self
            .maps
            .iter()
            .position(|m| m.iova == iova && m.size == size)
            .ok_or(EINVAL)?;
        release(self.maps.remove(at));
        Ok(())
    }

    /// The device writes `len` bytes of `fill` at `iova` of the client's memory.
    pub fn device_write(&mut self, iova: u64, len: u64, fill: u8) -> Result<(), u32> {
        let end = iova.checked_add(len).ok_or(EFAULT)?;
        let m = self
            .maps
            .iter()
            .find(|m| iova >= m.iova && end <= m.iova + m.size)
            .ok_or(EFAULT)?;
        if m.flags & DMA_WRITE == 0 {
            return Err(EACCES);
        }
        let mem = m.mem.ok_or(EFAULT)?;
        // SAFETY: [iova, end) lies inside this map, whose `size` bytes are mapped at `mem`
        // until it is unmapped, which needs `&mut self`.
        unsafe {
            std::ptr::write_bytes(
                mem.as_ptr().add((iova - m.iova) as usize),
                fill,
                len as usize,
            );
        }
        if let Some(l) = &mut self.logging {
            let logged =
                |a: u64| l.ranges.is_empty() || l.ranges.iter().any(|&(s, n)| a >= s && a - s < n);
            let mut page = Some(iova / l.page * l.page);
            while let Some(p) = page.filter(|&p| p < end) {
                if logged(p) {
                    l.dirty.insert(p);
                }
                page = p.checked_add(l.page);
            }
        }
        Ok(())
    }

    /// DMA_LOGGING_START: the page size settled on (at least 4 KiB, a power of two).
    pub fn start_logging(&mut self, page: u64, ranges: Vec<(u64, u64)>) -> Result<u64, u32> {
        if self.logging.is_some() {
            return Err(EINVAL);
        }
        if ranges
            .iter()
            .any(|&(s, n)| n == 0 || s.checked_add(n).is_none())
        {
            return Err(EINVAL);
        }
        let page = page.max(4096).checked_next_power_of_two().ok_or(EINVAL)?;
        self.logging = Some(Logging {
            page,
            ranges,
            dirty: BTreeSet::new(),
        });
        Ok(page)
    }

    pub fn stop_logging(&mut self) -> Result<(), u32> {
        self.logging.take().map(|_| ()).ok_or(EINVAL)
    }

    /// DMA_LOGGING_REPORT: the bitmap of [iova, iova + length) in pages of `page`, at most
    /// `room` bytes of it (else nothing is cleared and it is refused); what it reports is
    /// cleared.
    pub fn report(
        &mut self,
        iova: u64,
        length: u64,
        page: u64,
        room: usize,
    ) -> Result<Vec<u8>, u32> {
        let l = self.logging.as_mut().ok_or(EINVAL)?;
        if !page.is_power_of_two() || length == 0 || iova.checked_add(length).is_none() {
            return Err(EINVAL);
        }
        let pages = length.div_ceil(page);
        if pages.div_ceil(64).saturating_mul(8) > room as u64 {
            return Err(EINVAL);
        }
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        let end = iova + length;
        let hit: Vec<u64> = l
            .dirty
            .range(iova / l.page * l.page..end)
            .copied()
            .collect();
        for d in hit {
            l.dirty.remove(&d);
            // A dirty logging page marks every report page it overlaps inside the range.
            let from = d.max(iova);
            let to = d.saturating_add(l.page).min(end);
            let mut i = (from - iova) / page;
            // Offsets from `iova` stay below `length`: no overflow near the top of memory.
            while i < pages && i * page < to - iova {
                words[(i / 64) as usize] |= 1 << (i % 64);
                i += 1;
            }
        }
        Ok(words.iter().flat_map(|w| w.to_ne_bytes()).collect())
    }
}

fn release(m: Map) {
    if let Some(p) = m.mem {
        // SAFETY: `p` is the mapping made in `map` for `m.size` bytes, unmapped only here.
        let _ = unsafe { munmap(p.cast(), m.size as usize) };
    }
}

impl Drop for Dma {
    fn drop(&mut self) {
        for m in std::mem::take(&mut self.maps) {
            release(m);
        }
    }
}
