//! A device region's memory mapped into this process from the fd the server sent with its
//! region info (protocol.md 3.4): reads and writes through it never send a message.
//!
//! The fd is the server's: a file shorter than the area maps, and the first touch past its
//! end is SIGBUS, so the size is checked first; a file the server can still shrink (no
//! F_SEAL_SHRINK) is mapped only when the caller accepts that risk.

use crate::fault_safe::may_shrink;
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
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write when `writable`. A regular file
    /// (a memfd included) must hold the whole area (else EINVAL), and be sealed against
    /// shrinking unless `allow_shrinkable` (else EPERM).
    pub fn map(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        writable: bool,
        allow_shrinkable: bool,
    ) -> Result<RegionMapping, Error> {
        let size = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| Error::new(Errno::EINVAL, format!("cannot map {len} bytes")))?;
        check_file(fd, offset, len, allow_shrinkable)?;
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

/// Refuses a regular file that does not hold `len` bytes at `offset`, or that may shrink
/// under the mapping without the caller's leave. Other files (a device's character special
/// file) have no size to check and cannot be truncated.
fn check_file(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    allow_shrinkable: bool,
) -> Result<(), Error> {
    let st = nix::sys::stat::fstat(fd)
        .map_err(|e| Error::new(e, format!("cannot examine the region's fd: {}", e.desc())))?;
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
        return Ok(());
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::new(
            Errno::EINVAL,
            format!(
                "the region's fd holds {size} bytes, less than the {len} bytes at offset \
                 {offset} the server offers to map (touching the rest would be SIGBUS)"
            ),
        ));
    }
    if !allow_shrinkable && may_shrink(fd) {
        return Err(Error::new(
            Errno::EPERM,
            "the region's fd is a file the server can shrink (no F_SEAL_SHRINK), and touching \
             the lost pages would kill this process: map it only if you accept that risk \
             (allowShrinkable)",
        ));
    }
    Ok(())
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; its owner guarantees nothing
        // reaches the memory any more (the binding detaches the JS views first).
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
