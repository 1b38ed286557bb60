//! DMA_MAP and DMA_UNMAP as calls (protocol.md 3.1, 3.2): every check that can be made before
//! sending is made (alignment to the server's page size, overlap with an earlier map, the
//! server's `max_dma_maps`), and the DMA table follows what the server agreed to.

use crate::dma_table::{Entry, LocalMemory};
use crate::join::{Join, JoinDone};
use crate::pending::{Completion, Reply};
use crate::{Client, Error, Request};
use nix::errno::Errno;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;
use vfio_user_proto::dma::{
    dma_map_request, dma_unmap_request, DMA_FLAG_READ, DMA_FLAG_WRITE, DMA_UNMAP_FLAG_ALL,
};
use vfio_user_proto::Command;

/// A range of guest memory to offer the server.
pub struct DmaMap<'a> {
    pub iova: u64,
    pub size: u64,
    /// The device may read / write the range.
    pub read: bool,
    pub write: bool,
    /// The fd that backs the range and the range's offset in it: sent with the map, so the
    /// server can mmap the memory. None: the server must use DMA_READ/DMA_WRITE.
    pub fd: Option<(BorrowedFd<'a>, u64)>,
    /// Where the range lives in this process: DMA_READ/DMA_WRITE to it are served from here.
    /// It must be at least `size` bytes.
    pub local: Option<Arc<dyn LocalMemory>>,
    /// Overrides the client's timeout.
    pub timeout: Option<Duration>,
}

fn invalid(errno: Errno, what: String) -> Error {
    Error::new(errno, what).with_command(Command::DmaMap as u16)
}

impl Client {
    /// Checks `map` against what the server negotiated and the ranges already mapped, and
    /// records it; returns the request payload and the record's generation.
    fn prepare_map(&self, map: &DmaMap<'_>) -> Result<([u8; 32], u64), Error> {
        let (pgsizes, max_dma_maps) = self
            .with_server_caps(|c| (c.pgsizes, c.max_dma_maps))
            .ok_or_else(|| {
                invalid(
                    Errno::ENOTCONN,
                    "cannot map DMA before version negotiation has succeeded".into(),
                )
            })?;
        // The smallest page size the server supports; every map is aligned to it.
        let page = 1u64 << pgsizes.trailing_zeros().min(63);
        let (iova, size) = (map.iova, map.size);
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(invalid(
                Errno::EINVAL,
                format!("a DMA map of {size} bytes at {iova:#x} is empty or wraps around"),
            ));
        }
        let fd_offset = map.fd.map_or(0, |(_, o)| o);
        if !iova.is_multiple_of(page)
            || !size.is_multiple_of(page)
            || !fd_offset.is_multiple_of(page)
        {
            return Err(invalid(
                Errno::EINVAL,
                format!(
                    "DMA map iova {iova:#x}, size {size:#x} and fd offset {fd_offset:#x} must be multiples of the server's page size {page:#x}"
                ),
            ));
        }
        if let Some(local) = &map.local {
            if (local.as_ptr_len().1 as u64) < size {
                return Err(invalid(
                    Errno::EINVAL,
                    format!("the memory behind the DMA map at {iova:#x} is smaller than its {size} bytes"),
                ));
            }
        }
        if map.fd.is_none() && map.local.is_none() {
            return Err(invalid(
                Errno::EINVAL,
                format!("the DMA map at {iova:#x} has neither an fd nor local memory behind it"),
            ));
        }
        let mut table = self.dma_table().lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, len)) = table.overlapping(iova, size) {
            return Err(invalid(
                Errno::EEXIST,
                format!("the DMA map at {iova:#x} overlaps the one at {at:#x} ({len} bytes)"),
            ));
        }
        if table.count() as u64 >= max_dma_maps {
            return Err(invalid(
                Errno::ENOSPC,
                format!("the server accepts at most {max_dma_maps} DMA maps"),
            ));
        }
        let flags =
            if map.read { DMA_FLAG_READ } else { 0 } | if map.write { DMA_FLAG_WRITE } else { 0 };
        let generation = table.insert(
            iova,
            Entry {
                size,
                read: map.read,
                write: map.write,
                local: map.local.clone(),
                generation: 0,
            },
        );
        Ok((dma_map_request(flags, fd_offset, iova, size), generation))
    }

    fn map_request<'a>(
        map: &DmaMap<'a>,
        payload: &'a [u8],
        fds: &'a [BorrowedFd<'a>],
    ) -> Request<'a> {
        Request {
            command: Command::DmaMap as u16,
            payload,
            fds,
            timeout: map.timeout,
        }
    }

    /// Sends DMA_MAP and waits for the server's answer. The range is served (DMA_READ/WRITE)
    /// from the moment it is sent; a refusal forgets it again.
    pub fn dma_map(&self, map: &DmaMap<'_>) -> Result<(), Error> {
        let (payload, generation) = self.prepare_map(map)?;
        let fds: Vec<BorrowedFd<'_>> = map.fd.iter().map(|(fd, _)| *fd).collect();
        let result = self.send_wait(Self::map_request(map, &payload, &fds));
        if result.is_err() {
            self.dma_table()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(map.iova, generation);
        }
        result.map(|_| ())
    }

    /// [`Client::dma_map`] without blocking: `done` gets the reply. If this returns an error,
    /// nothing was sent and `done` is not called.
    pub fn dma_map_callback(&self, map: &DmaMap<'_>, done: Completion) -> Result<(), Error> {
        let (payload, generation) = self.prepare_map(map)?;
        let fds: Vec<BorrowedFd<'_>> = map.fd.iter().map(|(fd, _)| *fd).collect();
        let table = self.dma_table().clone();
        let iova = map.iova;
        let on_reply = Box::new(move |r: Result<Reply, Error>| {
            if r.is_err() {
                table
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(iova, generation);
            }
            done(r);
        });
        let sent = self.send_callback(Self::map_request(map, &payload, &fds), on_reply);
        if sent.is_err() {
            self.dma_table()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(iova, generation);
        }
        sent
    }

    /// [`Client::dma_map_callback`] for each of `maps`, pipelined (one message each, with its
    /// fd), settled as one call: `done` is called once every map sent has been answered, with
    /// the first failure if any. Each map is checked as it is sent, so one that overlaps an
    /// earlier one of the same list is refused too. If this returns an error, nothing was
    /// sent and `done` is not called; if a later map cannot be sent, none after it is, and
    /// the maps sent settle the call with that error. Each map the server refused is
    /// forgotten; the others stay mapped.
    pub fn dma_map_many_callback(
        &self,
        maps: &[DmaMap<'_>],
        done: JoinDone<()>,
    ) -> Result<(), Error> {
        if maps.is_empty() {
            done(Ok(()));
            return Ok(());
        }
        let join = Join::new((), maps.len(), done);
        Join::send_parts(&join, maps.len(), |k| {
            let j = join.clone();
            let part = Box::new(move |r: Result<Reply, Error>| Join::settle(&j, |_| r.map(drop)));
            self.dma_map_callback(&maps[k], part)
        })
    }

    /// Checks that [iova, iova + size) is exactly an earlier map; returns its generation.
    fn prepare_unmap(&self, iova: u64, size: u64) -> Result<u64, Error> {
        let table = self.dma_table().lock().unwrap_or_else(|p| p.into_inner());
        table.get(iova, size).map(|e| e.generation).ok_or_else(|| {
            Error::new(
                Errno::EINVAL,
                format!("no DMA map of {size} bytes at {iova:#x} to unmap (it must match a map exactly)"),
            )
            .with_command(Command::DmaUnmap as u16)
        })
    }

    fn unmap_request(payload: &[u8], timeout: Option<Duration>) -> Request<'_> {
        Request {
            command: Command::DmaUnmap as u16,
            payload,
            fds: &[],
            timeout,
        }
    }

    /// Sends DMA_UNMAP for a range mapped earlier (exactly) and waits for the server. The
    /// range is served until the server has answered (it must stop using it first).
    pub fn dma_unmap(&self, iova: u64, size: u64, timeout: Option<Duration>) -> Result<(), Error> {
        let generation = self.prepare_unmap(iova, size)?;
        let payload = dma_unmap_request(0, iova, size);
        self.send_wait(Self::unmap_request(&payload, timeout))?;
        self.dma_table()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(iova, generation);
        Ok(())
    }

    /// [`Client::dma_unmap`] without blocking. If this returns an error, nothing was sent and
    /// `done` is not called.
    pub fn dma_unmap_callback(
        &self,
        iova: u64,
        size: u64,
        timeout: Option<Duration>,
        done: Completion,
    ) -> Result<(), Error> {
        let generation = self.prepare_unmap(iova, size)?;
        let payload = dma_unmap_request(0, iova, size);
        let table = self.dma_table().clone();
        let on_reply = Box::new(move |r: Result<Reply, Error>| {
            if r.is_ok() {
                table
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(iova, generation);
            }
            done(r);
        });
        self.send_callback(Self::unmap_request(&payload, timeout), on_reply)
    }

    /// Sends DMA_UNMAP with the ALL flag; once the server agrees, nothing is mapped.
    pub fn dma_unmap_all_callback(
        &self,
        timeout: Option<Duration>,
        done: Completion,
    ) -> Result<(), Error> {
        let payload = dma_unmap_request(DMA_UNMAP_FLAG_ALL, 0, 0);
        let table = self.dma_table().clone();
        let on_reply = Box::new(move |r: Result<Reply, Error>| {
            if r.is_ok() {
                table.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            done(r);
        });
        self.send_callback(Self::unmap_request(&payload, timeout), on_reply)
    }

    /// How many DMA ranges are mapped (or being mapped) now.
    pub fn dma_maps(&self) -> usize {
        self.dma_table()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count()
    }
}
