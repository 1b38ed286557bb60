//! Reading the socket and dispatching what arrives, for whoever holds the receive side
//! (the I/O thread, a waiting caller, an event loop).

use crate::rx::{Disposition, ReadOutcome, Rx};
use crate::shared::Shared;
use crate::state::{Fired, ServerRequest};
use crate::Error;
use nix::errno::Errno;
use std::time::Duration;

/// Reads per wakeup at most (64 KiB each): a flooding server cannot keep a reader, the I/O
/// thread or Node's event loop, from its other work; level-triggered readiness brings it back.
const MAX_READS_PER_WAKEUP: usize = 16;

/// Reads until the socket is drained (or the per-wakeup budget is spent), dispatching every
/// complete message. True when anything was read.
pub fn receive(shared: &Shared, rx: &mut Rx, sock: i32) -> Result<bool, Error> {
    let mut read = false;
    for _ in 0..MAX_READS_PER_WAKEUP {
        match read_once(shared, rx, sock)? {
            ReadOutcome::WouldBlock => return Ok(read),
            ReadOutcome::Data { drained: true } => return Ok(true),
            _ => read = true,
        }
    }
    Ok(read)
}

/// One read and the dispatch of whatever it completed. EOF is an error. After any error the
/// buffered state is dropped (its fds closed): the stream is over.
pub fn read_once(shared: &Shared, rx: &mut Rx, sock: i32) -> Result<ReadOutcome, Error> {
    read_once_waiting(shared, rx, sock, None)
}

/// [`read_once`], waiting up to `wait` (if given) for data to arrive.
pub fn read_once_waiting(
    shared: &Shared,
    rx: &mut Rx,
    sock: i32,
    wait: Option<Duration>,
) -> Result<ReadOutcome, Error> {
    let r = read_and_dispatch(shared, rx, sock, wait);
    if r.is_err() {
        rx.reset();
    }
    r
}

fn read_and_dispatch(
    shared: &Shared,
    rx: &mut Rx,
    sock: i32,
    wait: Option<Duration>,
) -> Result<ReadOutcome, Error> {
    let outcome = match wait {
        Some(t) => rx.read_blocking(sock, t)?,
        None => rx.read(sock)?,
    };
    match outcome {
        ReadOutcome::Eof => {
            let what = if rx.mid_message() {
                "server closed the connection in the middle of a message"
            } else {
                "server closed the connection"
            };
            Err(Error::new(Errno::ECONNRESET, what))
        }
        ReadOutcome::Data { .. } => {
            dispatch(shared, rx)?;
            Ok(outcome)
        }
        ReadOutcome::WouldBlock => Ok(outcome),
    }
}
/// Dispatches every whole buffered message, one at a time and in stream order: each reply
/// is completed before the next header is judged.
fn dispatch(shared: &Shared, rx: &mut Rx) -> Result<(), Error> {
    let mut fired = Fired::default();
    let mut requests = Vec::new();
    let result = {
        let mut guard = shared.lock();
        let st = &mut *guard;
        loop {
            let m = match rx.next(|h, kind| {
                let d = st.classify(h, kind, &mut fired);
                (d, st.reply_target(h, d))
            }) {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            match m.tag {
                Disposition::Reply { seq, .. } => st.complete_reply(m, seq, &mut fired),
                Disposition::Request { keep } => requests.push(ServerRequest {
                    header: m.header,
                    payload: m.payload,
                    fds: m.attachments,
                    oversize: !keep,
                }),
                Disposition::Drop => drop(m),
            }
        }
    };
    fired.fire();
    for req in requests {
        shared.serve(req);
    }
    result
}
