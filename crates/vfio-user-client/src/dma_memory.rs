//! Memory for DMA: a memfd, sized and mapped shared into this process. Its fd goes with
//! DMA_MAP so the server can mmap the same pages; the mapping here is what the caller (and
//! DMA_READ/DMA_WRITE serving) reads and writes.

use crate::dma_table::LocalMemory;
use crate::Error;
use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// A shared memfd mapping of `len` bytes. Its fd may be closed early ([`DmaMemory::close_fd`]);
/// the mapping goes when the object is dropped: hold it in an `Arc` for as long as anything
/// may touch the memory.
pub struct DmaMemory {
    fd: Mutex<Option<OwnedFd>>,
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this object; nothing in it is tied to a
// thread, and accesses through the raw pointer are the callers' to order (as with memory a
// device DMAs into).
unsafe impl Send for DmaMemory {}
// SAFETY: as above; `&DmaMemory` hands out only the pointer and length.
unsafe impl Sync for DmaMemory {}

impl DmaMemory {
    /// A zero-filled memfd of `len` bytes (at least 1), mapped read-write and shared.
    pub fn allocate(len: usize) -> Result<DmaMemory, Error> {
        let size = NonZeroUsize::new(len)
            .ok_or_else(|| Error::new(Errno::EINVAL, "DMA memory must not be empty"))?;
        let fail = |e: Errno, what: &str| Error::new(e, format!("{what}: {}", e.desc()));
        let fd = memfd_create(c"vfio-user-dma", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| fail(e, "memfd_create"))?;
        nix::unistd::ftruncate(&fd, len as i64).map_err(|e| fail(e, "sizing DMA memory"))?;
        // SAFETY: a fresh shared mapping of a file we own, at an address the kernel picks;
        // it aliases no Rust object.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| fail(e, "mapping DMA memory"))?;
        Ok(DmaMemory {
            fd: Mutex::new(Some(fd)),
            ptr,
            len,
        })
    }

    /// Runs `f` with the fd, or fails with EBADF once it has been closed.
    pub fn with_fd<R>(&self, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Result<R, Error> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        match fd.as_ref() {
            Some(fd) => Ok(f(fd.as_fd())),
            None => Err(Error::new(Errno::EBADF, "the DMA memory's fd was closed")),
        }
    }

    /// The fd's number while it is open (borrowed: never close it).
    pub fn raw_fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Closes the fd now; the mapping stays until the last holder lets go.
    pub fn close_fd(&self) {
        self.fd.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The memory from `offset` on, as DMA_READ/DMA_WRITE serving sees it.
    pub fn from_offset(self: &Arc<Self>, offset: usize) -> Arc<dyn LocalMemory> {
        Arc::new(Slice {
            memory: self.clone(),
            offset: offset.min(self.len),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }
}

impl LocalMemory for DmaMemory {
    fn as_ptr_len(&self) -> (*mut u8, usize) {
        (self.as_ptr(), self.len)
    }
}

/// Part of a [`DmaMemory`], from an offset to its end.
struct Slice {
    memory: Arc<DmaMemory>,
    offset: usize,
}

impl LocalMemory for Slice {
    fn as_ptr_len(&self) -> (*mut u8, usize) {
        // SAFETY: `offset` was clamped to the mapping's length, so the pointer stays inside
        // (or one past the end of) the mapping.
        let ptr = unsafe { self.memory.as_ptr().add(self.offset) };
        (ptr, self.memory.len - self.offset)
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `allocate`, unmapped once; whoever could still reach it
        // holds this object (through an Arc), so nobody does once it drops.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
