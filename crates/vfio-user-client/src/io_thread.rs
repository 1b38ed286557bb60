//! The I/O thread: polls the socket and a wake eventfd, receives and dispatches, finishes
//! queued writes, enforces deadlines. It never waits on a caller.

use crate::client::Shared;
use crate::rx::{Disposition, ReadOutcome, Rx};
use crate::state::{Fired, ServerRequest};
use crate::Error;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run(shared: Arc<Shared>) {
    let mut rx = Rx::default();
    let heartbeat = (shared.default_timeout() / 2).max(Duration::from_millis(1));
    let sock = shared.sock.as_raw_fd();
    loop {
        let mut fired = Fired::default();
        let (want_write, wake_at, closed) = {
            let mut st = shared.lock();
            let now = Instant::now();
            let next = st.expire(now, &mut fired);
            st.compact_deadlines();
            // With nothing pending, still wake now and then, so that a new request's
            // deadline (at least `heartbeat` away in the common case) needs no wakeup.
            let wake_at = next.unwrap_or(now + heartbeat);
            st.io_wake_at = Some(wake_at);
            (st.want_write, wake_at, st.closed.is_some())
        };
        fired.fire();
        if closed {
            break;
        }
        // Round up so we never wake a hair early and spin.
        let left = wake_at.saturating_duration_since(Instant::now());
        let timeout =
            PollTimeout::try_from(left.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX);
        let mut events = PollFlags::POLLIN;
        if want_write {
            events |= PollFlags::POLLOUT;
        }
        let mut fds = [
            PollFd::new(shared.sock.as_fd(), events),
            PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                shared.fail(Error::new(
                    Errno::ECONNRESET,
                    format!("polling the socket failed: {}", e.desc()),
                ));
                break;
            }
        }
        let sock_ev = fds[0].revents().unwrap_or(PollFlags::empty());
        let wake_ev = fds[1].revents().unwrap_or(PollFlags::empty());
        if wake_ev.contains(PollFlags::POLLIN) {
            let _ = shared.wake.read();
        }
        if sock_ev.contains(PollFlags::POLLOUT) {
            let result = shared.lock().flush(sock);
            if let Err(e) = result {
                shared.fail(e);
                continue;
            }
        }
        if sock_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            if let Err(e) = receive(&shared, &mut rx, sock) {
                shared.fail(e);
            }
        }
    }
    shared.notify_closed();
}

/// Reads until the socket is drained, dispatching every complete message.
fn receive(shared: &Shared, rx: &mut Rx, sock: i32) -> Result<(), Error> {
    loop {
        match rx.read(sock)? {
            ReadOutcome::WouldBlock => return Ok(()),
            ReadOutcome::Eof => {
                let what = if rx.mid_message() {
                    "server closed the connection in the middle of a message"
                } else {
                    "server closed the connection"
                };
                return Err(Error::new(Errno::ECONNRESET, what));
            }
            ReadOutcome::Data { drained } => {
                dispatch(shared, rx)?;
                if drained {
                    return Ok(());
                }
            }
        }
    }
}

fn dispatch(shared: &Shared, rx: &mut Rx) -> Result<(), Error> {
    let mut fired = Fired::default();
    let mut requests = Vec::new();
    let result = {
        let mut guard = shared.lock();
        let st = &mut *guard;
        let mut replies = Vec::new();
        let r = rx.process(
            |h, kind| st.classify(h, kind, &mut fired),
            |m| match m.disposition {
                Disposition::Reply { seq, .. } => replies.push((m, seq)),
                Disposition::Request { keep } => requests.push(ServerRequest {
                    header: m.header,
                    payload: m.payload,
                    fds: m.fds,
                    oversize: !keep,
                }),
                Disposition::Drop => drop(m),
            },
        );
        for (m, seq) in replies {
            st.complete_reply(m, seq, &mut fired);
        }
        r
    };
    fired.fire();
    for req in requests {
        shared.serve(req);
    }
    result
}
