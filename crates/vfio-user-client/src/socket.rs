//! The syscalls: connect, sendmsg with SCM_RIGHTS, recvmsg with MSG_CMSG_CLOEXEC.

use crate::Error;
use nix::errno::Errno;
use nix::sys::socket::{
    self, sendmsg, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The kernel's SCM_MAX_FD: one recvmsg never returns more, so a control buffer this big is
/// never truncated and no received fd can slip past us unclosed.
pub const MAX_RECV_FDS: usize = 253;

/// The send buffer asked for on every connection (the kernel's default is 208 KiB).
pub const SEND_BUFFER: usize = 4 << 20;

/// Opens a nonblocking, close-on-exec AF_UNIX stream connected to `path`, with a send buffer
/// of [`SEND_BUFFER`].
pub fn connect_unix(path: &Path, timeout: Duration) -> Result<OwnedFd, Error> {
    let shown = path.display();
    let fail =
        |errno: Errno, what: &str| Error::new(errno, format!("{what} {shown}: {}", errno.desc()));
    let addr = UnixAddr::new(path).map_err(|e| fail(e, "bad socket path"))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| fail(e, "cannot create a socket for"))?;
    // A MiB-sized message (a region write, a MIG_DATA_WRITE, a DMA_READ reply) then fits the
    // socket whole: one sendmsg writes it, instead of a fifth of it and a wakeup of the I/O
    // thread for each further fifth. The kernel caps it at net.core.wmem_max, quietly.
    let _ = socket::setsockopt(&fd, socket::sockopt::SndBuf, &SEND_BUFFER);
    // A nonblocking AF_UNIX connect either completes at once or fails with EAGAIN when the
    // listener's backlog is full; it does not go on connecting in the background. So retry,
    // backing off, until the deadline.
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => return Ok(fd),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(fail(Errno::ETIMEDOUT, "timed out connecting to"));
                }
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(fail(e, "cannot connect to")),
        }
    }
}

/// A close-on-exec duplicate of `fd`, checked to be a connected AF_UNIX stream socket (made
/// elsewhere: QEMU's `socket.fd=`, socket activation, a socketpair), with a send buffer of
/// [`SEND_BUFFER`]. The caller keeps `fd`.
pub fn adopt_unix_stream(fd: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd, Error> {
    let n = fd.as_raw_fd();
    let fail = |errno: Errno, what: &str| Error::new(errno, format!("fd {n} {what}"));
    let kind = socket::getsockopt(&fd, socket::sockopt::SockType)
        .map_err(|e| fail(e, &format!("is not a socket: {}", e.desc())))?;
    if kind != SockType::Stream {
        return Err(fail(Errno::EPROTOTYPE, "is not a stream socket"));
    }
    let local: socket::SockaddrStorage =
        socket::getsockname(n).map_err(|e| fail(e, &format!("has no address: {}", e.desc())))?;
    if socket::SockaddrLike::family(&local) != Some(AddressFamily::Unix) {
        return Err(fail(Errno::EAFNOSUPPORT, "is not an AF_UNIX socket"));
    }
    socket::getpeername::<socket::SockaddrStorage>(n)
        .map_err(|e| fail(e, &format!("is not connected: {}", e.desc())))?;
    let owned = fd.try_clone_to_owned().map_err(|e| {
        let e = Errno::from_raw(e.raw_os_error().unwrap_or(0));
        fail(e, &format!("cannot be duplicated: {}", e.desc()))
    })?;
    let _ = socket::setsockopt(&owned, socket::sockopt::SndBuf, &SEND_BUFFER);
    Ok(owned)
}

/// One nonblocking sendmsg of `iov` gathered (writev-style), with `fds` as SCM_RIGHTS when
/// there are any. MSG_NOSIGNAL: a closed peer is an EPIPE error, not a process-killing
/// SIGPIPE.
pub fn send_parts(sock: RawFd, iov: &[IoSlice<'_>], fds: &[RawFd]) -> nix::Result<usize> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            sock,
            iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// What one recvmsg produced.
pub struct Received {
    pub bytes: usize,
    pub fds: Vec<OwnedFd>,
}

/// One recvmsg into `buf`. `cmsg` must hold [`MAX_RECV_FDS`] descriptors. Nonblocking unless
/// `block`; a blocking one waits at most the socket's SO_RCVTIMEO (then EAGAIN) and returns
/// EINTR when a signal interrupts it, so its caller can look at its deadline again.
pub fn recv_chunk(
    sock: RawFd,
    buf: &mut [u8],
    cmsg: &mut [u8],
    block: bool,
) -> nix::Result<Received> {
    // SAFETY: `buf` is `buf.len()` writable bytes, borrowed mutably for the whole call.
    unsafe { recv_raw(sock, buf.as_mut_ptr(), buf.len(), cmsg, block) }
}

/// One recvmsg appending at most `max` bytes to `body`, straight into its spare capacity
/// (reserved as needed), with any fds; blocking or not as for [`recv_chunk`]. A large message
/// body then crosses memory once: from the kernel into the Vec the caller receives.
pub fn recv_append(
    sock: RawFd,
    body: &mut Vec<u8>,
    max: usize,
    cmsg: &mut [u8],
    block: bool,
) -> nix::Result<Received> {
    body.reserve(max);
    let spare = &mut body.spare_capacity_mut()[..max];
    // SAFETY: the spare capacity is `max` writable bytes we own, for the whole call.
    let r = unsafe { recv_raw(sock, spare.as_mut_ptr().cast(), max, cmsg, block)? };
    // SAFETY: recvmsg initialised exactly the first `r.bytes` bytes of the spare capacity.
    unsafe { body.set_len(body.len() + r.bytes) };
    Ok(r)
}

/// One recvmsg of at most `len` bytes into memory at `ptr`, with any fds; blocking or not as
/// for [`recv_chunk`].
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
pub unsafe fn recv_raw(
    sock: RawFd,
    ptr: *mut u8,
    len: usize,
    cmsg: &mut [u8],
    block: bool,
) -> nix::Result<Received> {
    // SAFETY: forwarded under this function's contract.
    unsafe { recv_raw_then(sock, (ptr, len), &mut [], cmsg, block) }
}

/// [`recv_raw`] into `len` bytes at `ptr`, then (in the same call, if more has arrived) into
/// `then`: the rest of a body read into other memory, and whatever follows it read into the
/// read buffer, with no second syscall.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
pub unsafe fn recv_raw_then(
    sock: RawFd,
    (ptr, len): (*mut u8, usize),
    then: &mut [u8],
    cmsg: &mut [u8],
    block: bool,
) -> nix::Result<Received> {
    use nix::libc;
    let mut iov = [
        libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        },
        libc::iovec {
            iov_base: then.as_mut_ptr().cast(),
            iov_len: then.len(),
        },
    ];
    // SAFETY: an all-zero msghdr is a valid empty one; the fields set below point at `iov`
    // and `cmsg`, which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = if then.is_empty() { 1 } else { 2 };
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.len() as _;
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if !block {
        flags |= libc::MSG_DONTWAIT;
    }
    let n = loop {
        // SAFETY: `msg` describes `len` writable bytes at `ptr` (this function's contract),
        // then `then` (borrowed mutably for the call), and the control buffer; the kernel
        // writes at most that much.
        let n = unsafe { libc::recvmsg(sock, &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        match Errno::last() {
            Errno::EINTR if !block => continue,
            e => return Err(e),
        }
    };
    let fds = take_rights(&msg)?;
    Ok(Received { bytes: n, fds })
}

/// The fds an SCM_RIGHTS control message of `msg` carried, now owned. A truncated control
/// buffer means something other than fds came, or the kernel could not install them all (the
/// process's fd limit): fail the stream, after taking (and so closing) every fd that did
/// arrive.
fn take_rights(msg: &nix::libc::msghdr) -> nix::Result<Vec<OwnedFd>> {
    use nix::libc;
    let mut fds = Vec::new();
    // SAFETY: `msg` was just filled by recvmsg; the CMSG_* walk stays within
    // msg_control/msg_controllen, as those macros guarantee.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel just installed it for us; this OwnedFd is its only owner.
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    if msg.msg_flags & nix::libc::MSG_CTRUNC != 0 {
        return Err(Errno::ENOBUFS);
    }
    Ok(fds)
}

/// Sets how long a blocking recvmsg on `sock` may wait.
pub fn set_receive_timeout(sock: RawFd, timeout: Duration) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    use nix::sys::time::{TimeVal, TimeValLike};
    // SAFETY: `sock` is the client's socket, open for as long as its owner (Shared) lives,
    // which outlives this call; the borrow ends with it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock) };
    // Zero would mean "wait for ever": never ask for less than a microsecond.
    let micros = timeout.as_micros().clamp(1, i64::MAX as u128) as i64;
    setsockopt(&fd, ReceiveTimeout, &TimeVal::microseconds(micros))
}

/// A control buffer big enough for [`MAX_RECV_FDS`] descriptors.
pub fn cmsg_buffer() -> Vec<u8> {
    nix::cmsg_space!([RawFd; MAX_RECV_FDS])
}
