//! Region access: REGION_READ (9) and REGION_WRITE (10) of any length, split into pieces of
//! at most the server's `max_data_xfer_size`, the pieces pipelined, and every echoed offset,
//! region and count checked (protocol.md section 3.8). A short or mismatched echo is EPROTO.

use crate::join::Join;
use crate::pending::Reply;
use crate::{Client, Error};
use nix::errno::Errno;
use std::time::Duration;
use vfio_user_proto::region::{
    check_region_write_reply, region_access, region_read_data, ACCESS_HEADER_SIZE,
};
use vfio_user_proto::{Command, ProtoError};

/// Called once with the bytes read (none, for a write), or the failure.
pub type DataCompletion = Box<dyn FnOnce(Result<ReadData, Error>) + Send>;

/// Bytes read from a region: `buf[start..]`. A transfer of one piece hands over the reply's
/// own buffer with its access header still in front, rather than moving the data.
#[derive(Debug)]
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
        let pieces = split(command, offset, len, self.max_transfer(command)?)?;
        let request = |p: &Piece| region_access(index, p.offset, p.count, None);
        if let [p] = pieces.as_slice() {
            let reply = self.send_wait(self.request(command, &request(p), timeout))?;
            return one_piece(reply, index, *p);
        }
        let tickets = pieces
            .iter()
            .map(|p| self.send_nowait(self.request(command, &request(p), timeout)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = vec![0u8; len];
        for (t, p) in tickets.into_iter().zip(&pieces) {
            let reply = t.wait()?;
            let data = region_read_data(&reply.payload, index, p.offset, p.count)
                .map_err(|e| proto(command, e))?;
            out[p.at..p.at + data.len()].copy_from_slice(data);
        }
        Ok(ReadData::whole(out))
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
        let pieces = split(command, offset, len, self.max_transfer(command)?)?;
        if let [p] = pieces.as_slice() {
            let p = *p;
            let payload = region_access(index, p.offset, p.count, None);
            let on_reply = Box::new(move |r: Result<Reply, Error>| {
                done(r.and_then(|reply| one_piece(reply, index, p)));
            });
            return self.send_callback(self.request(command, &payload, timeout), on_reply);
        }
        self.gather(command, &pieces, vec![0u8; len], done, |p| {
            let request = region_access(index, p.offset, p.count, None);
            let check = move |reply: &Reply, out: &mut Vec<u8>| {
                let data = region_read_data(&reply.payload, index, p.offset, p.count)?;
                out[p.at..p.at + data.len()].copy_from_slice(data);
                Ok(())
            };
            (request, timeout, Box::new(check))
        })
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
            };
            (request, timeout, Box::new(check))
        })
    }

    /// Sends every piece with a callback that checks its reply; the last to settle calls
    /// `done`. A send refused midway fails the transfer once the pieces already sent settle.
    fn gather(
        &self,
        command: Command,
        pieces: &[Piece],
        out: Vec<u8>,
        done: DataCompletion,
        mut build: impl FnMut(Piece) -> (Vec<u8>, Option<Duration>, Box<PieceCheck>),
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
        for (i, p) in pieces.iter().enumerate() {
            let (payload, timeout, check) = build(*p);
            let j = join.clone();
            let on_reply = Box::new(move |r: Result<Reply, Error>| {
                Join::settle(&j, |out| {
                    r.and_then(|reply| check(&reply, out).map_err(|e| proto(command, e)))
                });
            });
            if let Err(e) = self.send_callback(self.request(command, &payload, timeout), on_reply) {
                if i == 0 {
                    return Err(e);
                }
                Join::abandon(&join, pieces.len() - i, e);
                return Ok(());
            }
        }
        Ok(())
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
type PieceCheck = dyn FnOnce(&Reply, &mut Vec<u8>) -> Result<(), ProtoError> + Send;
