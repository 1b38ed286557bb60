//! Memory for DMA: a memfd, sized and mapped shared into this process. Its fd goes with
//! DMA_MAP so the server can mmap the same pages; the mapping here is what the caller (and
//! DMA_READ/DMA_WRITE serving) reads and writes.
//!
//! The server gets the fd itself, so it could `ftruncate` the file, and every touch of the lost
//! pages here would be SIGBUS. Memory made here is sealed against that (as QEMU's memfd
//! backend seals guest RAM); memory over a caller's fd must be sealed too, unless the caller
//! accepts the risk, and then native code only copies it through the kernel
//! ([`crate::fault_safe`]).

use crate::dma_table::LocalMemory;
use crate::Error;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
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
    /// Where the mapping starts in the fd's file (0 for memory allocated here).
    file_offset: u64,
    /// The file may shrink under the mapping (no F_SEAL_SHRINK): copy only through the kernel.
    shrinkable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this object; nothing in it is tied to a
// thread, and accesses through the raw pointer are the callers' to order (as with memory a
// device DMAs into).
unsafe impl Send for DmaMemory {}
// SAFETY: as above; `&DmaMemory` hands out only the pointer and length.
unsafe impl Sync for DmaMemory {}

impl DmaMemory {
    /// A zero-filled memfd of `len` bytes (at least 1), mapped read-write and shared, sealed
    /// so that nobody it is given to can shrink or grow it (nor seal it further).
    pub fn allocate(len: usize) -> Result<DmaMemory, Error> {
        DmaMemory::allocate_with(len, false)
    }

    /// [`DmaMemory::allocate`], backed by huge pages when `huge` (`MFD_HUGETLB`: the system's
    /// default huge page size, which `len` must be a multiple of, from the pages reserved in
    /// `/proc/sys/vm/nr_hugepages`).
    pub fn allocate_with(len: usize, huge: bool) -> Result<DmaMemory, Error> {
        if len == 0 {
            return Err(Error::new(Errno::EINVAL, "DMA memory must not be empty"));
        }
        let fail = |e: Errno, what: &str| Error::new(e, format!("{what}: {}", e.desc()));
        let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        if huge {
            let page = huge_page_size().ok_or_else(|| {
                Error::new(
                    Errno::ENOTSUP,
                    "this system has no huge pages (no Hugepagesize in /proc/meminfo)",
                )
            })?;
            if !len.is_multiple_of(page) {
                return Err(Error::new(
                    Errno::EINVAL,
                    format!("huge-page DMA memory must be a multiple of {page} bytes, not {len}"),
                ));
            }
            flags |= MFdFlags::MFD_HUGETLB;
        }
        let fd = memfd_create(c"vfio-user-dma", flags).map_err(|e| fail(e, "memfd_create"))?;
        nix::unistd::ftruncate(&fd, len as i64).map_err(|e| fail(e, "sizing DMA memory"))?;
        // A server given this fd could otherwise truncate it, and the next touch of the memory
        // here (ours, or serving its DMA) would kill the process with SIGBUS.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| fail(e, "sealing DMA memory"))?;
        let ptr = map_shared(&fd, len, 0).map_err(|e| {
            if huge && e == Errno::ENOMEM {
                Error::new(
                    e,
                    format!("mapping {len} bytes of huge pages: not enough reserved (/proc/sys/vm/nr_hugepages)"),
                )
            } else {
                fail(e, "mapping DMA memory")
            }
        })?;
        Ok(DmaMemory {
            fd: Mutex::new(Some(fd)),
            ptr,
            len,
            file_offset: 0,
            shrinkable: false,
        })
    }

    /// `len` bytes of memory the caller already has behind `fd` (guest RAM in a memfd, a
    /// hugetlbfs file), from `offset` (page-aligned), mapped read-write and shared. The
    /// caller keeps `fd`: this works on a duplicate, which goes with each DMA_MAP.
    ///
    /// A file the server could shrink (no F_SEAL_SHRINK: an unsealed memfd, a hugetlbfs or
    /// tmpfs file) is refused with EPERM unless `allow_shrinkable`; then native code copies
    /// the memory only through the kernel, and the risk of touching it directly is the
    /// caller's.
    pub fn from_fd(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        allow_shrinkable: bool,
    ) -> Result<DmaMemory, Error> {
        if len == 0 {
            return Err(Error::new(Errno::EINVAL, "DMA memory must not be empty"));
        }
        let n = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let fail = |e: Errno, what: &str| Error::new(e, format!("fd {n}: {what}: {}", e.desc()));
        let owned = fd.try_clone_to_owned().map_err(|e| {
            fail(
                Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                "cannot be duplicated",
            )
        })?;
        let shrinkable = crate::fault_safe::may_shrink(&owned);
        if shrinkable && !allow_shrinkable {
            return Err(Error::new(
                Errno::EPERM,
                format!(
                    "fd {n} can be shrunk by the server it is mapped to (no F_SEAL_SHRINK), and \
                     touching the lost pages would kill this process: seal it (a memfd made with \
                     MFD_ALLOW_SEALING, then F_ADD_SEALS F_SEAL_SHRINK), or accept the risk \
                     (allowShrinkable)"
                ),
            ));
        }
        // A mapping past the end of the file maps, and the first touch there (ours, or the
        // device's DMA served from it) is SIGBUS: refuse it here.
        let size = nix::sys::stat::fstat(&owned)
            .map_err(|e| fail(e, "cannot be examined"))?
            .st_size;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > size as u64) {
            return Err(Error::new(
                Errno::EINVAL,
                format!("fd {n}: {len} bytes at offset {offset} pass the end of its file ({size} bytes)"),
            ));
        }
        let at = i64::try_from(offset).map_err(|_| {
            Error::new(
                Errno::EINVAL,
                format!("offset {offset} is past what mmap takes"),
            )
        })?;
        let ptr = map_shared(&owned, len, at).map_err(|e| {
            fail(
                e,
                &format!("cannot map {len} bytes at offset {offset} (page-aligned, inside the file, opened read-write)"),
            )
        })?;
        Ok(DmaMemory {
            fd: Mutex::new(Some(owned)),
            ptr,
            len,
            file_offset: offset,
            shrinkable,
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

    /// Where the range at `offset` of this memory is, for a [`crate::DmaMap`] of it: `fd` (the
    /// memory's, from [`DmaMemory::with_fd`]) at the range's offset in the file, for the
    /// server, and the memory itself from `offset`, to serve its DMA requests from.
    pub fn range<'a>(
        self: &Arc<Self>,
        fd: BorrowedFd<'a>,
        offset: u64,
    ) -> ((BorrowedFd<'a>, u64), Arc<dyn LocalMemory>) {
        let local = self.from_offset(usize::try_from(offset).unwrap_or(usize::MAX));
        ((fd, self.file_offset.saturating_add(offset)), local)
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

    /// Whether the file behind it may shrink under the mapping (see [`DmaMemory::from_fd`]).
    pub fn shrinkable(&self) -> bool {
        self.shrinkable
    }

    /// The start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }
}

/// A read-write shared mapping of `len` bytes of `fd` from `offset`.
fn map_shared(fd: &OwnedFd, len: usize, offset: i64) -> nix::Result<NonNull<std::ffi::c_void>> {
    let size = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
    // SAFETY: a fresh shared mapping of a file we hold, at an address the kernel picks; it
    // aliases no Rust object.
    unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            offset,
        )
    }
}

/// The system's default huge page size (`Hugepagesize:` of /proc/meminfo), if it has one.
fn huge_page_size() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("Hugepagesize:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl LocalMemory for DmaMemory {
    fn as_ptr_len(&self) -> (*mut u8, usize) {
        (self.as_ptr(), self.len)
    }

    fn shrinkable(&self) -> bool {
        self.shrinkable
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

    fn shrinkable(&self) -> bool {
        self.memory.shrinkable
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `allocate`, unmapped once; whoever could still reach it
        // holds this object (through an Arc), so nobody does once it drops.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}
