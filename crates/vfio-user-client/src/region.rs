//! Region access: REGION_READ (9) and REGION_WRITE (10) of any length, split into pieces of
//! at most the server's `max_data_xfer_size`, the pieces pipelined, and every echoed offset,
//! region and count checked (protocol.md section 3.8). A short or mismatched echo is EPROTO.

use crate::join::Join;
use crate::pending::Reply;
use crate::target::{ReadCancel, ReadInto, ReadTarget, Unfilled};
use crate::{Client, Error};
use nix::errno::Errno;
use std::sync::Arc;
use std::time::Duration;
use vfio_user_proto::region::{
    check_region_write_reply, region_access, region_read_data, region_read_head, ACCESS_HEADER_SIZE,
};
use vfio_user_proto::{Command, ProtoError};

/// The most bytes one REGION_READ asks for, whatever the server's `max_data_xfer_size`. A
/// reply this big (with its 32 bytes of headers) fits a server's socket buffer at the
/// kernel's default size (208 KiB), so the server writes it whole and goes on to the next
/// piece while we read this one; a bigger reply stalls the server until we have read most of
/// it, and nothing overlaps. Measured against the test device: 1 MiB read as pipelined pieces
/// comes ~1.4x faster than as one; 192 KiB pieces beat 128 KiB ones by 6-10% of time and CPU
/// once the last read of a piece took the next header along, and 256 KiB ones lose (see the
/// README's benchmark section).
pub const READ_PIECE: usize = 192 << 10;

/// Called once with the bytes read (none, for a write), or the failure.
pub type DataCompletion = Box<dyn FnOnce(Result<ReadData, Error>) + Send>;

/// Called once when a read into the caller's memory has settled: the memory is filled, or
/// the read failed (and its contents are unspecified). Either way nothing writes it again.
pub type IntoCompletion = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// Bytes read from a region: `buf[start..]`. A transfer of one piece hands over the reply's
/// own buffer with its access header still in front, rather than moving the data.
#[derive(Debug, Default)]
pub struct ReadData {
    pub buf: Vec<u8>,
    pub start: usize,
}

impl ReadData {
    fn whole(buf: Vec<u8>) -> ReadData {
        ReadData { buf, start: 0 }
    }

    pub fn as_slice(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    /// The bytes as a Vec of their own (moves them to the front when needed).
    pub fn into_vec(mut self) -> Vec<u8> {
        self.buf.drain(..self.start.min(self.buf.len()));
        self.buf
    }
}

/// Where one piece of a transfer goes: its region offset, its byte count, and where its bytes
/// sit in the caller's buffer.
#[derive(Clone, Copy)]
struct Piece {
    offset: u64,
    count: u32,
    at: usize,
}

fn proto(command: Command, e: ProtoError) -> Error {
    Error::proto(e.0).with_command(command as u16)
}

/// Splits `len` bytes at `offset` into pieces of at most `max`.
fn split(command: Command, offset: u64, len: usize, max: usize) -> Result<Vec<Piece>, Error> {
    if offset.checked_add(len as u64).is_none() {
        return Err(Error::new(
            Errno::EINVAL,
            format!("{len} bytes at offset {offset} run past 2^64"),
        )
        .with_command(command as u16));
    }
    let max = max.clamp(1, u32::MAX as usize);
    Ok((0..len)
        .step_by(max)
        .map(|at| Piece {
            offset: offset + at as u64,
            count: (len - at).min(max) as u32,
            at,
        })
        .collect())
}

impl Client {
    /// The server's `max_data_xfer_size`, once negotiated.
    fn max_transfer(&self, command: Command) -> Result<usize, Error> {
        self.with_server_caps(|c| c.max_data_xfer_size as usize)
            .ok_or_else(|| {
                Error::new(
                    Errno::ENOTCONN,
                    "cannot access a region before version negotiation has succeeded",
                )
                .with_command(command as u16)
            })
    }

    /// Reads `len` bytes at `offset` of region `index`, blocking.
    pub fn region_read(
        &self,
        index: u32,
        offset: u64,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<ReadData, Error> {
        let command = Command::RegionRead;
        let pieces = split(command, offset, len, self.read_piece(command)?)?;
        if let [p] = pieces.as_slice() {
            let request = region_access(index, p.offset, p.count, None);
            let reply = self.send_wait(self.request(command, &request, timeout))?;
            return one_piece(reply, index, *p);
        }
        let mut out = vec![0u8; len];
        // SAFETY: `out` outlives the call, which returns once every piece has settled.
        let into = unsafe { ReadInto::new(out.as_mut_ptr(), out.len()) };
        self.read_pieces_into(index, &pieces, into, timeout)?;
        Ok(ReadData::whole(out))
    }

    /// The size of the pieces a read is split into: the server's `max_data_xfer_size`, but
    /// at most [`READ_PIECE`].
    fn read_piece(&self, command: Command) -> Result<usize, Error> {
        Ok(self.max_transfer(command)?.min(READ_PIECE))
    }

    /// Writes `data` at `offset` of region `index`, blocking until the server has answered
    /// every piece.
    pub fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        let command = Command::RegionWrite;
        let pieces = split(command, offset, data.len(), self.max_transfer(command)?)?;
        let tickets = pieces
            .iter()
            .map(|p| {
                let bytes = &data[p.at..p.at + p.count as usize];
                let payload = region_access(index, p.offset, p.count, Some(bytes));
                self.send_nowait(self.request(command, &payload, timeout))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (t, p) in tickets.into_iter().zip(&pieces) {
            let reply = t.wait()?;
            check_region_write_reply(&reply.payload, index, p.offset, p.count)
                .map_err(|e| proto(command, e))?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of region `index` as posted writes (No_reply): ordered with
    /// everything else on the socket, answered by nothing.
    pub fn region_write_posted(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let command = Command::RegionWrite;
        for p in split(command, offset, data.len(), self.max_transfer(command)?)? {
            let bytes = &data[p.at..p.at + p.count as usize];
            let payload = region_access(index, p.offset, p.count, Some(bytes));
            self.post_write(self.request(command, &payload, None))?;
        }
        Ok(())
    }

    /// [`Client::region_read`] without blocking: `done` gets the bytes. If this returns an
    /// error, nothing was sent and `done` is not called.
    pub fn region_read_callback(
        &self,
        index: u32,
        offset: u64,
        len: usize,
        timeout: Option<Duration>,
        done: DataCompletion,
    ) -> Result<(), Error> {
        let command = Command::RegionRead;
        let pieces = split(command, offset, len, self.read_piece(command)?)?;
        if let [p] = pieces.as_slice() {
            let p = *p;
            let payload = region_access(index, p.offset, p.count, None);
            let on_reply = Box::new(move |r: Result<Reply, Error>| {
                done(r.and_then(|reply| one_piece(reply, index, p)));
            });
            return self.send_callback(self.request(command, &payload, timeout), on_reply);
        }
        let mut out = vec![0u8; len];
        // SAFETY: moving `out` into the completion moves its pointer, not its heap buffer,
        // which is freed only after that completion runs, once every piece has settled (or,
        // if nothing was sent, with the completion, never written).
        let into = unsafe { ReadInto::new(out.as_mut_ptr(), out.len()) };
        let done: IntoCompletion = Box::new(move |r| done(r.map(|()| ReadData::whole(out))));
        self.read_pieces_into_callback(index, &pieces, into, timeout, &ReadCancel::default(), done)
    }

    /// [`Client::region_write`] without blocking: `done` gets an empty result once every
    /// piece is answered. If this returns an error, nothing was sent and `done` is not called.
    pub fn region_write_callback(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
        timeout: Option<Duration>,
        done: DataCompletion,
    ) -> Result<(), Error> {
        let command = Command::RegionWrite;
        let pieces = split(command, offset, data.len(), self.max_transfer(command)?)?;
        self.gather(command, &pieces, Vec::new(), done, |p| {
            let bytes = &data[p.at..p.at + p.count as usize];
            let request = region_access(index, p.offset, p.count, Some(bytes));
            let check = move |reply: &Reply, _: &mut Vec<u8>| {
                check_region_write_reply(&reply.payload, index, p.offset, p.count)
                    .map_err(|e| proto(Command::RegionWrite, e))
            };
            Ok(PieceRequest::new(request, timeout, Box::new(check)))
        })
    }

    /// Sends every piece with a callback that checks its reply; the last to settle calls
    /// `done`. A piece that cannot be built or sent midway fails the transfer once the pieces
    /// already sent settle.
    fn gather(
        &self,
        command: Command,
        pieces: &[Piece],
        out: Vec<u8>,
        done: DataCompletion,
        mut build: impl FnMut(Piece) -> Result<PieceRequest, Error>,
    ) -> Result<(), Error> {
        if pieces.is_empty() {
            done(Ok(ReadData::whole(out)));
            return Ok(());
        }
        let join = Join::new(
            out,
            pieces.len(),
            Box::new(move |r: Result<Vec<u8>, Error>| done(r.map(ReadData::whole))),
        );
        Join::send_parts(&join, pieces.len(), |k| {
            build(pieces[k]).and_then(|piece| {
                let PieceRequest {
                    payload,
                    timeout,
                    check,
                    target,
                } = piece;
                let j = join.clone();
                let on_reply = Box::new(move |r: Result<Reply, Error>| {
                    Join::settle(&j, |out| r.and_then(|reply| check(&reply, out)));
                });
                let request = self.request(command, &payload, timeout);
                self.send_callback_into(request, target, on_reply)
            })
        })
    }

    /// Reads `into.len()` bytes at `offset` of region `index` straight into `into`, blocking.
    /// The pieces are pipelined as for [`Client::region_read`]; when this returns, every one
    /// has settled and nothing writes `into` again.
    pub fn region_read_into(
        &self,
        index: u32,
        offset: u64,
        into: ReadInto,
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        let command = Command::RegionRead;
        let pieces = split(command, offset, into.len(), self.read_piece(command)?)?;
        self.read_pieces_into(index, &pieces, into, timeout)
    }

    /// [`Client::region_read_into`] of `pieces`, blocking until every one has settled.
    fn read_pieces_into(
        &self,
        index: u32,
        pieces: &[Piece],
        into: ReadInto,
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        let command = Command::RegionRead;
        let request = |p: &Piece| region_access(index, p.offset, p.count, None);
        let checked = |reply: Result<Reply, Error>, t: &ReadTarget, p: Piece| {
            reply.and_then(|r| finish_into(&r, t, index, p))
        };
        if let [p] = pieces {
            let t = piece_target(&into, p)?;
            let reply = self.send_wait_into(self.request(command, &request(p), timeout), t.clone());
            return checked(reply, &t, *p);
        }
        let mut sent = Vec::with_capacity(pieces.len());
        let mut first_error = None;
        for p in pieces {
            let t = match piece_target(&into, p) {
                Ok(t) => t,
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            };
            match self.send_nowait_into(self.request(command, &request(p), timeout), t.clone()) {
                Ok(ticket) => sent.push((ticket, t, *p)),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        // Every piece sent must settle before `into` is the caller's again.
        for (ticket, t, p) in sent {
            if let Err(e) = checked(ticket.wait(), &t, p) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// [`Client::region_read_into`] without blocking: `done` is called once every piece has
    /// settled. If this returns an error, nothing was sent and `done` is not called.
    pub fn region_read_into_callback(
        &self,
        index: u32,
        offset: u64,
        into: ReadInto,
        timeout: Option<Duration>,
        done: IntoCompletion,
    ) -> Result<(), Error> {
        self.region_read_into_cancellable(
            index,
            offset,
            into,
            timeout,
            &ReadCancel::default(),
            done,
        )
    }

    /// [`Client::region_read_into_callback`], which `cancel` can stop writing into `into`
    /// before it settles (an abort): see [`ReadCancel`].
    pub fn region_read_into_cancellable(
        &self,
        index: u32,
        offset: u64,
        into: ReadInto,
        timeout: Option<Duration>,
        cancel: &ReadCancel,
        done: IntoCompletion,
    ) -> Result<(), Error> {
        let command = Command::RegionRead;
        let pieces = split(command, offset, into.len(), self.read_piece(command)?)?;
        self.read_pieces_into_callback(index, &pieces, into, timeout, cancel, done)
    }

    /// [`Client::region_read_into_cancellable`] of `pieces`.
    fn read_pieces_into_callback(
        &self,
        index: u32,
        pieces: &[Piece],
        into: ReadInto,
        timeout: Option<Duration>,
        cancel: &ReadCancel,
        done: IntoCompletion,
    ) -> Result<(), Error> {
        let command = Command::RegionRead;
        let done: DataCompletion = Box::new(move |r| done(r.map(|_| ())));
        self.gather(command, pieces, Vec::new(), done, |p| {
            let target = piece_target(&into, &p)?;
            cancel.watch(&target);
            let t = target.clone();
            let check = move |reply: &Reply, _: &mut Vec<u8>| finish_into(reply, &t, index, p);
            let request = region_access(index, p.offset, p.count, None);
            Ok(PieceRequest {
                target: Some(target),
                ..PieceRequest::new(request, timeout, Box::new(check))
            })
        })
    }

    fn request<'a>(
        &self,
        command: Command,
        payload: &'a [u8],
        timeout: Option<Duration>,
    ) -> crate::Request<'a> {
        crate::Request {
            command: command as u16,
            payload,
            fds: &[],
            timeout,
        }
    }
}

/// A one-piece read: the reply checked, its buffer handed over as it is.
fn one_piece(reply: Reply, index: u32, p: Piece) -> Result<ReadData, Error> {
    region_read_data(&reply.payload, index, p.offset, p.count)
        .map_err(|e| proto(Command::RegionRead, e))?;
    Ok(ReadData {
        buf: reply.payload,
        start: ACCESS_HEADER_SIZE,
    })
}

/// Checks one piece's reply and puts its bytes where they belong.
type PieceCheck = dyn FnOnce(&Reply, &mut Vec<u8>) -> Result<(), Error> + Send;

/// One piece of a transfer as [`Client::gather`] sends it.
struct PieceRequest {
    payload: Vec<u8>,
    timeout: Option<Duration>,
    check: Box<PieceCheck>,
    /// Where the reply's data is received, for a read into the caller's memory.
    target: Option<Arc<ReadTarget>>,
}

impl PieceRequest {
    fn new(payload: Vec<u8>, timeout: Option<Duration>, check: Box<PieceCheck>) -> Self {
        PieceRequest {
            payload,
            timeout,
            check,
            target: None,
        }
    }
}

/// The target for piece `p` of a read into `into`.
fn piece_target(into: &ReadInto, p: &Piece) -> Result<Arc<ReadTarget>, Error> {
    let slice = into.slice(p.at, p.count as usize).ok_or_else(|| {
        Error::new(Errno::EINVAL, "a piece lies outside the memory read into")
            .with_command(Command::RegionRead as u16)
    })?;
    Ok(Arc::new(ReadTarget::new(slice, ACCESS_HEADER_SIZE)))
}

/// Checks one piece's reply whose data went into `target`, and moves the data that arrived
/// beside its header to the front of the target.
fn finish_into(reply: &Reply, target: &ReadTarget, index: u32, p: Piece) -> Result<(), Error> {
    let command = Command::RegionRead;
    let head = region_read_head(&reply.payload, target.direct(), index, p.offset, p.count)
        .map_err(|e| proto(command, e))?;
    match target.fill_front(head) {
        Ok(()) => Ok(()),
        Err(Unfilled::Revoked) => Err(proto(
            command,
            ProtoError::new("REGION_READ reply settled after its request".to_string()),
        )),
        // Not the server's bytes at fault but the memory: the caller's file shrank under it.
        Err(Unfilled::Fault) => Err(Error::new(
            Errno::EFAULT,
            "the memory read into is gone (its file was shrunk)",
        )
        .with_command(command as u16)),
    }
}
