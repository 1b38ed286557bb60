//! Copying to or from memory another process can take away under us: a shared mapping of a
//! file the server may shrink (an unsealed memfd, a hugetlbfs or tmpfs file). A plain load or
//! store past the file's new end is SIGBUS, which kills Node. The kernel's own copy does not
//! fault: `process_vm_readv` on this process copies through the kernel, and a page that is
//! gone fails the call with EFAULT instead.

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::libc;
use std::os::fd::AsFd;

/// Whether the file behind `fd` may shrink under a mapping of it: it is not sealed with
/// F_SEAL_SHRINK (a file that cannot be sealed, not shmem or hugetlbfs, has no seals).
pub fn may_shrink(fd: impl AsFd) -> bool {
    let seals =
        fcntl(fd, FcntlArg::F_GET_SEALS).map_or(SealFlag::empty(), SealFlag::from_bits_truncate);
    !seals.contains(SealFlag::F_SEAL_SHRINK)
}

/// Copies `len` bytes from `src` to `dst` through the kernel: EFAULT (nothing signalled) when
/// either side is not mapped, or is mapped past the end of its file. Reading our own memory
/// needs no privilege (the ptrace check passes for the same thread group; Yama is not asked).
///
/// # Safety
/// `dst` must not overlap `src`, and nothing else may be reading `dst` as Rust data while the
/// copy runs (the memory is shared with a device: its bytes are never Rust values).
pub unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> Result<(), Errno> {
    let mut done = 0;
    while done < len {
        let local = libc::iovec {
            iov_base: dst.wrapping_add(done).cast(),
            iov_len: len - done,
        };
        let remote = libc::iovec {
            iov_base: src.wrapping_add(done).cast_mut().cast(),
            iov_len: len - done,
        };
        // SAFETY: one iovec each side, describing memory the caller named; the kernel checks
        // every page and fails with EFAULT rather than touch one that is gone.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        match n {
            // A short copy stops at the first page that is gone; the next call says why.
            n if n > 0 => done += n as usize,
            0 => return Err(Errno::EFAULT),
            _ => match Errno::last() {
                Errno::EINTR => continue,
                // Seccomp (or an old kernel) refusing the call: refuse the access rather than
                // fall back to a copy that can kill the process.
                Errno::ENOSYS | Errno::EPERM => return Err(Errno::EFAULT),
                e => return Err(e),
            },
        }
    }
    Ok(())
}

/// [`copy`] when `guarded`, else a plain copy (memory that cannot go away: sealed, or ours).
///
/// # Safety
/// As for [`copy`]; without `guarded`, both ranges must also stay mapped and backed for the
/// whole copy.
pub unsafe fn copy_if(
    guarded: bool,
    dst: *mut u8,
    src: *const u8,
    len: usize,
) -> Result<(), Errno> {
    if guarded {
        // SAFETY: this function's contract.
        unsafe { copy(dst, src, len) }
    } else {
        // SAFETY: this function's contract: both ranges are mapped, backed, and disjoint.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::copy;
    use nix::errno::Errno;
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
    use std::num::NonZeroUsize;

    #[test]
    fn copies_both_ways_and_fails_with_efault_past_a_shrunk_file() {
        let fd = memfd_create(c"fault-safe", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 8192).unwrap();
        let len = NonZeroUsize::new(8192).unwrap();
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a fresh mapping of our own memfd, unmapped below.
        let map = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, &fd, 0) }.unwrap();
        let mem: *mut u8 = map.as_ptr().cast();
        let data = *b"through the kernel";
        let mut back = [0u8; 18];
        // SAFETY: 18 bytes inside the 8 KiB mapping, and our own arrays.
        unsafe {
            copy(mem.add(4096), data.as_ptr(), 18).unwrap();
            copy(back.as_mut_ptr(), mem.add(4096), 18).unwrap();
        }
        assert_eq!(back, data);
        nix::unistd::ftruncate(&fd, 0).unwrap();
        // SAFETY: as above; the pages are gone now, which is what is tested.
        unsafe {
            assert_eq!(copy(back.as_mut_ptr(), mem, 18), Err(Errno::EFAULT));
            assert_eq!(copy(mem.add(4096), data.as_ptr(), 18), Err(Errno::EFAULT));
            munmap(map, 8192).unwrap();
        }
    }
}
