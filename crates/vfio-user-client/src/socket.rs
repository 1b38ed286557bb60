//! The syscalls: connect, sendmsg with SCM_RIGHTS, recvmsg with MSG_CMSG_CLOEXEC.

use crate::Error;
use nix::errno::Errno;
use nix::sys::socket::{
    self, recvmsg, sendmsg, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The kernel's SCM_MAX_FD: one recvmsg never returns more, so a control buffer this big is
/// never truncated and no received fd can slip past us unclosed.
pub const MAX_RECV_FDS: usize = 253;

/// Opens a nonblocking, close-on-exec AF_UNIX stream connected to `path`.
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
    let mut iov = [IoSliceMut::new(buf)];
    let flags = if block {
        MsgFlags::MSG_CMSG_CLOEXEC
    } else {
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT
    };
    loop {
        let msg = match recvmsg::<()>(sock, &mut iov, Some(cmsg), flags) {
            Err(Errno::EINTR) if !block => continue,
            other => other?,
        };
        let mut fds = Vec::new();
        // cmsgs() refuses to iterate a truncated buffer. Ours holds SCM_MAX_FD, so truncation
        // means something other than fds arrived; fail the stream rather than guess.
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: the kernel just installed `r` in our fd table for us (SCM_RIGHTS);
                    // nothing else refers to it, so this OwnedFd is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
        return Ok(Received {
            bytes: msg.bytes,
            fds,
        });
    }
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
