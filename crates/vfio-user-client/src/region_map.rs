//! A device region's memory mapped into this process from the fd the server sent with its
//! region info (protocol.md 3.4): reads and writes through it never send a message.

use crate::Error;
use nix::errno::Errno;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

/// One mmapped area; unmapped when dropped.
pub struct RegionMapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: plain shared memory owned by this object, tied to no thread; accesses through the
// pointer are ordered by their callers, as accesses to device memory are.
unsafe impl Send for RegionMapping {}
// SAFETY: as above; `&RegionMapping` hands out only the pointer and length.
unsafe impl Sync for RegionMapping {}

impl RegionMapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write when `writable`.
    pub fn map(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<RegionMapping, Error> {
        let size = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| Error::new(Errno::EINVAL, format!("cannot map {len} bytes")))?;
        let offset = i64::try_from(offset)
            .map_err(|_| Error::new(Errno::EINVAL, format!("mmap offset {offset} is too large")))?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping at an address the kernel picks; it aliases no Rust
        // object, and the fd is only read during the call.
        let ptr = unsafe { mmap(None, size, prot, MapFlags::MAP_SHARED, fd, offset) }
            .map_err(|e| Error::new(e, format!("cannot mmap the region: {}", e.desc())))?;
        Ok(RegionMapping {
            ptr,
            len: size.get(),
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; its owner guarantees nothing
        // reaches the memory any more (the binding detaches the JS views first).
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
