//! The tap's socket I/O for one relay direction: nonblocking reads and writes that wait in
//! poll, watching the session's other socket meanwhile. Once either side of a session has
//! hung up (its EOF read, or a hang-up seen while waiting), the session lingers: a side that
//! then keeps it open without reading or writing (a server that never reads, or keeps its
//! socket after EOF) has at most the tap's linger before the session is ended, so that no
//! silent peer can hold a session's threads and fds for ever.

use crate::socket::{recv_chunk, Received};
use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a session may stay open once one of its sides has hung up, by default.
pub const TAP_LINGER: Duration = Duration::from_secs(5);

/// A session's linger: unset until a side hangs up, then when the session must end.
pub struct Linger {
    after: Duration,
    deadline: Mutex<Option<Instant>>,
}

impl Linger {
    pub fn new(after: Duration) -> Linger {
        Linger {
            after,
            deadline: Mutex::new(None),
        }
    }

    /// A side hung up: the session ends within the linger from now (or from the first
    /// hang-up, if this is not it).
    pub fn start(&self) {
        let mut d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        d.get_or_insert_with(|| Instant::now() + self.after);
    }

    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expired(&self) -> String {
        format!(
            "a side hung up and the other kept the session open past the tap's linger ({} ms)",
            self.after.as_millis()
        )
    }
}

/// Why a wait ended without the socket becoming ready.
pub enum Waited {
    /// The linger ran out.
    Lingered(String),
    Failed(Errno),
}

/// Waits until `sock` is ready for `events` (POLLIN or POLLOUT), watching `other` for a
/// hang-up (which starts the linger) until the linger has started, then for at most what is
/// left of it. Raw poll: nix's flags lack POLLRDHUP, and its `revents` refuses bits it lacks.
fn wait(sock: &OwnedFd, events: i16, other: &OwnedFd, linger: &Linger) -> Result<(), Waited> {
    use nix::libc::{poll, pollfd, POLLERR, POLLHUP, POLLRDHUP};
    loop {
        let deadline = linger.deadline();
        let timeout = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Waited::Lingered(linger.expired()));
                }
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            }
        };
        let mut fds = [
            pollfd {
                fd: sock.as_raw_fd(),
                events,
                revents: 0,
            },
            pollfd {
                fd: other.as_raw_fd(),
                events: POLLRDHUP,
                revents: 0,
            },
        ];
        // Once lingering, the other side's hang-up (level-triggered: it stays) is not asked.
        let watched = if deadline.is_none() { 2 } else { 1 };
        // SAFETY: `fds` holds `watched` initialised pollfds of sockets this session owns,
        // borrowed for the call; poll writes only their `revents`.
        if unsafe { poll(fds.as_mut_ptr(), watched, timeout) } < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(Waited::Failed(e)),
            }
        }
        if fds[0].revents & (events | POLLHUP | POLLERR) != 0 {
            // The read or write says what it is (data, EOF, EPIPE).
            return Ok(());
        }
        if watched == 2 && fds[1].revents & (POLLRDHUP | POLLHUP | POLLERR) != 0 {
            linger.start();
        }
    }
}

/// One read from `from` (into `buf`, with any fds), waiting for one while watching `to`.
pub fn recv(
    from: &OwnedFd,
    to: &OwnedFd,
    buf: &mut [u8],
    cmsg: &mut [u8],
    linger: &Linger,
) -> Result<Received, Waited> {
    loop {
        match recv_chunk(from.as_raw_fd(), buf, cmsg, false) {
            Err(Errno::EAGAIN) => wait(from, nix::libc::POLLIN, to, linger)?,
            Err(e) => return Err(Waited::Failed(e)),
            Ok(got) => return Ok(got),
        }
    }
}

/// Writes all of `bytes` to `to`, `fds` with the first bytes that leave (so they stay with
/// the bytes they came with), waiting for room while watching `from`. MSG_NOSIGNAL: a closed
/// peer is EPIPE, not SIGPIPE.
pub fn send_all(
    to: &OwnedFd,
    from: &OwnedFd,
    bytes: &[u8],
    fds: &[RawFd],
    linger: &Linger,
) -> Result<(), Waited> {
    let mut at = 0;
    let mut first = true;
    while at < bytes.len() {
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if first && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        let iov = [IoSlice::new(&bytes[at..])];
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        match nix::sys::socket::sendmsg::<()>(to.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => {
                at += n;
                first = false;
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => wait(to, nix::libc::POLLOUT, from, linger)?,
            Err(e) => return Err(Waited::Failed(e)),
        }
    }
    Ok(())
}
