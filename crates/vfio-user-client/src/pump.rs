//! Moving a device-state stream from one connection to another (protocol.md 3.13) with no
//! copy in between: a MIG_DATA_READ reply's payload (argsz, size, data) is laid out exactly as
//! a MIG_DATA_WRITE request's, so each reply received is sent on as a request, its buffer
//! handed over whole. One read is in flight at a time (a short read ends the stream, and a
//! read past the end of a pre-copy round would take the next round's data), and up to
//! [`WRITES_IN_FLIGHT`] writes; everything runs in the completions, on whichever thread reads.

use crate::pending::{Reply, Waiter};
use crate::shared::Shared;
use crate::{Client, Error, Request};
use nix::errno::Errno;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use vfio_user_proto::bytes::put_u32;
use vfio_user_proto::migration::{mig_data_read_data, mig_data_read_request, MIG_DATA_HEADER};
use vfio_user_proto::Command;

/// MIG_DATA_WRITE messages kept in flight to the destination.
pub const WRITES_IN_FLIGHT: usize = 4;

/// What a pump moved: bytes, and whether the source's stream ended (a short read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pumped {
    pub bytes: u64,
    pub ended: bool,
}

/// Called once, when every write is acknowledged or the pump failed.
pub type PumpDone = Box<dyn FnOnce(Result<Pumped, Error>) + Send>;

struct Pump {
    source: Weak<Shared>,
    dest: Weak<Shared>,
    chunk: u32,
    limit: u64,
    timeout: Option<Duration>,
    st: Mutex<Progress>,
}

struct Progress {
    bytes: u64,
    reading: bool,
    writes: usize,
    ended: bool,
    error: Option<Error>,
    done: Option<PumpDone>,
}

impl Client {
    /// Moves this connection's device-state stream (MIG_DATA_READ, in reads of `chunk` bytes)
    /// into `dest` (MIG_DATA_WRITE) until the stream ends or at least `limit` bytes moved;
    /// `done` gets what moved once every write is acknowledged, or the first failure. This
    /// device must be in PRE_COPY or STOP_COPY, `dest` in RESUMING. If this returns an error
    /// nothing was sent and `done` is not called.
    pub fn pump_state_to(
        &self,
        dest: &Client,
        chunk: u32,
        limit: u64,
        timeout: Option<Duration>,
        done: PumpDone,
    ) -> Result<(), Error> {
        if chunk == 0 {
            return Err(Error::new(
                Errno::EINVAL,
                "a pump reads chunks of at least 1 byte",
            ));
        }
        let pump = Arc::new(Pump {
            source: Arc::downgrade(&self.shared),
            dest: Arc::downgrade(&dest.shared),
            chunk,
            limit,
            timeout,
            st: Mutex::new(Progress {
                bytes: 0,
                reading: true,
                writes: 0,
                ended: false,
                error: None,
                done: Some(done),
            }),
        });
        pump.read()
    }
}

/// The connection behind `w`, or the error of one that is gone.
fn live(w: &Weak<Shared>) -> Result<Arc<Shared>, Error> {
    w.upgrade()
        .ok_or_else(|| Error::new(Errno::ECONNABORTED, "the connection was closed"))
}

impl Pump {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(self: &Arc<Self>) -> Result<(), Error> {
        let me = self.clone();
        let payload = mig_data_read_request(self.chunk);
        let req = Request {
            timeout: self.timeout,
            ..Request::new(Command::MigDataRead as u16, &payload)
        };
        let waiter = Waiter::Callback(Box::new(move |r| me.on_read(r)));
        Client::submit_on(
            &live(&self.source)?,
            req,
            Some(waiter),
            false,
            false,
            None,
            None,
        )
        .map(|_| ())
    }

    fn write(self: &Arc<Self>, payload: Vec<u8>) -> Result<(), Error> {
        let me = self.clone();
        let req = Request {
            timeout: self.timeout,
            ..Request::new(Command::MigDataWrite as u16, &[])
        };
        let waiter = Waiter::Callback(Box::new(move |r: Result<Reply, Error>| {
            let mut st = me.lock();
            st.writes -= 1;
            if let Err(e) = r {
                st.error.get_or_insert(e);
            }
            me.next(st);
        }));
        Client::submit_on(
            &live(&self.dest)?,
            req,
            Some(waiter),
            false,
            false,
            Some(payload),
            None,
        )
        .map(|_| ())
    }

    fn on_read(self: Arc<Self>, r: Result<Reply, Error>) {
        let forward = r.and_then(|reply| {
            let n = mig_data_read_data(&reply.payload, self.chunk)
                .map_err(|e| Error::proto(e.0).with_command(Command::MigDataRead as u16))?
                .len();
            Ok((reply.payload, n))
        });
        // `reading` stays set until this read's data is submitted: no other thread may issue
        // the next read (whose data must be written after this one's) before that.
        let mut st = self.lock();
        match forward {
            Err(e) => {
                st.error.get_or_insert(e);
            }
            Ok((mut payload, n)) => {
                st.ended = n < self.chunk as usize;
                // After a failure nothing more is written: the stream is broken anyway.
                if n > 0 && st.error.is_none() {
                    // The reply may be padded past its data (libvfio-user pads to the size
                    // asked): what goes on carries `size` bytes and says so, never the padding.
                    payload.truncate(MIG_DATA_HEADER + n);
                    put_u32(&mut payload, 0, (MIG_DATA_HEADER + n) as u32);
                    st.bytes += n as u64;
                    st.writes += 1;
                    drop(st);
                    let sent = self.write(payload);
                    st = self.lock();
                    if let Err(e) = sent {
                        st.writes -= 1;
                        st.error.get_or_insert(e);
                    }
                }
            }
        }
        st.reading = false;
        self.next(st);
    }

    /// Reads on while there is room for another write, or reports once nothing is in flight.
    fn next<'a>(self: &'a Arc<Self>, mut st: MutexGuard<'a, Progress>) {
        let more = st.error.is_none() && !st.ended && st.bytes < self.limit;
        if more && !st.reading && st.writes < WRITES_IN_FLIGHT {
            st.reading = true;
            drop(st);
            let sent = self.read();
            st = self.lock();
            if let Err(e) = sent {
                st.reading = false;
                st.error.get_or_insert(e);
            }
        }
        let finished = !st.reading && st.writes == 0 && (st.error.is_some() || !more);
        if !finished {
            return;
        }
        let Some(done) = st.done.take() else {
            return;
        };
        let result = match st.error.take() {
            Some(e) => Err(e),
            None => Ok(Pumped {
                bytes: st.bytes,
                ended: st.ended,
            }),
        };
        drop(st);
        done(result);
    }
}
