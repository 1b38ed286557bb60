//! Region calls on `NativeClient`: REGION_READ/REGION_WRITE through the client crate's
//! `region.rs`, and the REGION_INFO request and reply through the proto crate's.
//! Offsets arrive as two u32 halves (hi, lo): exact past 2^53, and cheaper than a BigInt.

use crate::client::NativeClient;
use crate::convert::{self, NativeError, Payload};
use crate::event::Event;
use crate::view;
use napi::bindgen_prelude::{BigInt, Buffer, BufferSlice, Either};
use napi::{Env, Result, Status};
use napi_derive::napi;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use vfio_user_client::proto::{region, region_io_fds, Command};
use vfio_user_client::{Error, ReadCancel, ReadData, ReadInto, RegionMapping};

fn offset(hi: u32, lo: u32) -> u64 {
    (u64::from(hi) << 32) | u64::from(lo)
}

/// What an async transfer's completion hands to JS: the bytes read (none for a write) as a
/// plain reply's payload, or the failure.
fn settle(token: u32, r: std::result::Result<ReadData, Error>) -> Event {
    match r {
        Ok(d) => Event::Data(
            token,
            Payload {
                buf: d.buf,
                start: d.start,
            },
        ),
        Err(e) => Event::Done(token, Err(e)),
    }
}

/// A Buffer's memory as the client crate's read target; `shrinkable` when it is a view of DMA
/// memory whose file may shrink (then written only through the kernel).
fn read_into(mut into: BufferSlice, shrinkable: bool) -> ReadInto {
    // SAFETY: an ArrayBuffer's backing store never moves; ts/ keeps the Buffer reachable
    // until the read's event is delivered (or, for a sync read, this call returns), and the
    // client crate writes it only until the read settles, which comes before either.
    unsafe { ReadInto::new(into.as_mut_ptr(), into.len()) }.shrinkable(shrinkable)
}

#[napi]
impl NativeClient {
    /// Reads `length` bytes of region `index` at offset (hi, lo), blocking. Null on failure
    /// (see `take_error`).
    #[napi]
    pub fn region_read_sync<'env>(
        &self,
        env: &'env Env,
        index: u32,
        offset_hi: u32,
        offset_lo: u32,
        length: u32,
        timeout_ms: Option<u32>,
    ) -> Result<Option<BufferSlice<'env>>> {
        let at = offset(offset_hi, offset_lo);
        match self.live(|c| c.region_read(index, at, length as usize, convert::timeout(timeout_ms)))
        {
            Ok(data) => Ok(Some(BufferSlice::copy_from(env, data.as_slice())?)),
            Err(e) => {
                *self.last_error.borrow_mut() = Some(e);
                Ok(None)
            }
        }
    }

    /// Reads `into.length` bytes of region `index` at offset (hi, lo) straight into `into`,
    /// blocking. False on failure (see `take_error`).
    #[napi]
    pub fn region_read_into_sync(
        &self,
        index: u32,
        offset_hi: u32,
        offset_lo: u32,
        into: BufferSlice,
        shrinkable: bool,
        timeout_ms: Option<u32>,
    ) -> bool {
        let at = offset(offset_hi, offset_lo);
        let target = read_into(into, shrinkable);
        self.keep_error(
            self.live(|c| c.region_read_into(index, at, target, convert::timeout(timeout_ms))),
        )
    }

    /// Reads like `region_read_into_sync`; an empty reply event with `token` follows once
    /// nothing writes `into` any more (ts/ keeps it reachable until then). Returns an error if
    /// nothing was sent (then no event follows).
    // One argument per value napi converts; bundling them would allocate an object per read.
    #[allow(clippy::too_many_arguments)]
    #[napi]
    pub fn region_read_into(
        &self,
        token: u32,
        index: u32,
        offset_hi: u32,
        offset_lo: u32,
        into: BufferSlice,
        shrinkable: bool,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let at = offset(offset_hi, offset_lo);
        let target = read_into(into, shrinkable);
        // Registered before the read starts, so its completion (on any thread) always finds
        // its entry to remove.
        let cancel = ReadCancel::default();
        lock(&self.reads).insert(token, cancel.clone());
        let reads = self.reads.clone();
        let done = Box::new(move |r: std::result::Result<(), Error>| {
            lock(&reads).remove(&token);
            events.push(settle(token, r.map(|()| ReadData::default())))
        });
        let started = self.live(|c| {
            let timeout = convert::timeout(timeout_ms);
            c.region_read_into_cancellable(index, at, target, timeout, &cancel, done)
        });
        started.err().map(|e| {
            lock(&self.reads).remove(&token);
            convert::from_error(&e)
        })
    }

    /// Stops the read into memory with `token` from writing into it (an abort): once this
    /// returns nothing lands there again; its event still follows. A settled read: nothing.
    #[napi]
    pub fn cancel_read(&self, token: u32) {
        let cancel = lock(&self.reads).remove(&token);
        if let Some(c) = cancel {
            c.cancel();
        }
    }

    /// Writes `data` to region `index` at offset (hi, lo), blocking. False on failure (see
    /// `take_error`).
    #[napi]
    pub fn region_write_sync(
        &self,
        index: u32,
        offset_hi: u32,
        offset_lo: u32,
        data: BufferSlice,
        timeout_ms: Option<u32>,
    ) -> bool {
        let at = offset(offset_hi, offset_lo);
        match self.live(|c| c.region_write(index, at, &data, convert::timeout(timeout_ms))) {
            Ok(()) => true,
            Err(e) => {
                *self.last_error.borrow_mut() = Some(e);
                false
            }
        }
    }

    /// Reads like `region_read_sync`; the bytes arrive as the payload of a reply event with
    /// `token`. Returns an error if nothing was sent (then no event follows).
    #[napi]
    pub fn region_read(
        &self,
        token: u32,
        index: u32,
        offset_hi: u32,
        offset_lo: u32,
        length: u32,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let at = offset(offset_hi, offset_lo);
        let done = Box::new(move |r| events.push(settle(token, r)));
        self.live(|c| {
            c.region_read_callback(
                index,
                at,
                length as usize,
                convert::timeout(timeout_ms),
                done,
            )
        })
        .err()
        .map(|e| convert::from_error(&e))
    }

    /// Writes like `region_write_sync`; an empty reply event with `token` follows. Returns an
    /// error if nothing was sent (then no event follows).
    #[napi]
    pub fn region_write(
        &self,
        token: u32,
        index: u32,
        offset_hi: u32,
        offset_lo: u32,
        data: BufferSlice,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let at = offset(offset_hi, offset_lo);
        let events = self.events.clone();
        let done = Box::new(move |r| events.push(settle(token, r)));
        self.live(|c| c.region_write_callback(index, at, &data, convert::timeout(timeout_ms), done))
            .err()
            .map(|e| convert::from_error(&e))
    }

    /// Writes as posted writes (No_reply): nothing follows. Returns an error if it could not
    /// all be sent.
    #[napi]
    pub fn region_write_posted(
        &self,
        index: u32,
        offset_hi: u32,
        offset_lo: u32,
        data: BufferSlice,
    ) -> Option<NativeError> {
        let at = offset(offset_hi, offset_lo);
        self.live(|c| c.region_write_posted(index, at, &data))
            .err()
            .map(|e| convert::from_error(&e))
    }
}

/// A decoded DEVICE_GET_REGION_INFO reply.
#[napi(object, object_from_js = false)]
pub struct NativeRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub size: BigInt,
    pub offset: BigInt,
    /// Offset and size of each sparse mmap area, flat: [offset0, size0, offset1, size1, …].
    pub sparse: Option<Vec<BigInt>>,
    pub region_type: Option<u32>,
    pub region_subtype: Option<u32>,
    pub warnings: Vec<String>,
}

/// The DEVICE_GET_REGION_INFO request payload for `index`, accepting up to `argsz` bytes.
#[napi]
pub fn region_info_request(index: u32, argsz: u32) -> Buffer {
    region::region_info_request(index, argsz).to_vec().into()
}

/// Decodes a DEVICE_GET_REGION_INFO reply payload for `index`.
#[napi]
pub fn decode_region_info(
    payload: BufferSlice,
    index: u32,
) -> Either<NativeRegionInfo, NativeError> {
    match region::decode_region_info(&payload, index) {
        Ok(r) => Either::A(NativeRegionInfo {
            argsz: r.argsz,
            flags: r.flags,
            index: r.index,
            size: BigInt::from(r.size),
            offset: BigInt::from(r.offset),
            sparse: r.sparse.map(|areas| {
                areas
                    .iter()
                    .flat_map(|a| [BigInt::from(a.offset), BigInt::from(a.size)])
                    .collect()
            }),
            region_type: r.region_type.map(|t| t.0),
            region_subtype: r.region_type.map(|t| t.1),
            warnings: r.warnings,
        }),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceGetRegionInfo, e)),
    }
}

/// A region's memory mapped from its fd. `array_buffer` gives JS views of it (windows, each at
/// most one ArrayBuffer long); `unmap` comes after ts/ has detached every view (every Buffer
/// over them then reads as empty), so JS can never reach unmapped memory.
#[napi]
pub struct NativeRegionMapping {
    mapping: Arc<Mutex<Option<RegionMapping>>>,
}

/// Maps `size` bytes of the region fd `fd` at `offset` (borrowed: the caller keeps it). A
/// regular file must hold them, and be sealed against shrinking unless `allow_shrinkable`.
#[napi]
pub fn map_region(
    fd: i32,
    offset: BigInt,
    size: BigInt,
    writable: bool,
    allow_shrinkable: bool,
) -> Either<NativeRegionMapping, NativeError> {
    // SAFETY: ts/ passes the fd a RegionInfo owns, open for the duration of this call; mmap
    // only reads it (a closed number fails with EBADF).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let (offset, size) = (offset.get_u64().1, size.get_u64().1);
    match RegionMapping::map(fd, offset, size, writable, allow_shrinkable) {
        Ok(m) => Either::A(NativeRegionMapping {
            mapping: Arc::new(Mutex::new(Some(m))),
        }),
        Err(e) => Either::B(convert::from_error(&e)),
    }
}

#[napi]
impl NativeRegionMapping {
    /// An ArrayBuffer over `length` bytes of the mapping from `offset` (external, detachable).
    /// ts/ checks the range and the length against `buffer.constants.MAX_LENGTH`, and detaches
    /// every view with `detach` before `unmap`.
    #[napi(ts_return_type = "ArrayBuffer")]
    pub fn array_buffer(
        &self,
        env: Env,
        offset: f64,
        length: f64,
    ) -> Result<napi::bindgen_prelude::Unknown<'_>> {
        let guard = lock(&self.mapping);
        let Some(m) = guard.as_ref() else {
            return Err(napi::Error::new(
                Status::GenericFailure,
                "the region is unmapped",
            ));
        };
        let (offset, length) = (offset as usize, length as usize);
        if offset.checked_add(length).is_none_or(|end| end > m.len()) {
            return Err(napi::Error::new(
                Status::InvalidArg,
                format!("{length} bytes at {offset} pass the end of the mapped area"),
            ));
        }
        let ptr = m.as_ptr().wrapping_add(offset);
        drop(guard);
        // SAFETY: the range lies inside the mapping (checked above), which stays mapped until
        // `unmap`, which comes after ts/ detached this view, or, without it, while the slot
        // the view holds keeps it.
        unsafe { view::external(env, ptr, length, self.mapping.clone(), "the region") }
    }

    /// Unmaps, once every view has been detached. Idempotent.
    #[napi]
    pub fn unmap(&self) {
        lock(&self.mapping).take();
    }
}

/// One DEVICE_GET_REGION_IO_FDS record.
#[napi(object, object_from_js = false)]
pub struct NativeIoFdRecord {
    pub offset: BigInt,
    pub size: BigInt,
    pub fd_index: u32,
    pub kind: u32,
    pub flags: u32,
    pub datamatch: BigInt,
    pub shadow_fd_index: Option<u32>,
    pub shadow_offset: Option<BigInt>,
}

/// A decoded DEVICE_GET_REGION_IO_FDS reply.
#[napi(object, object_from_js = false)]
pub struct NativeRegionIoFds {
    pub argsz: u32,
    pub count: u32,
    pub stride: u32,
    pub records: Vec<NativeIoFdRecord>,
}

/// The DEVICE_GET_REGION_IO_FDS request payload for `index`, accepting `argsz` bytes.
#[napi]
pub fn region_io_fds_request(index: u32, argsz: u32) -> Buffer {
    region_io_fds::region_io_fds_request(index, argsz)
        .to_vec()
        .into()
}

/// Decodes a DEVICE_GET_REGION_IO_FDS reply for region `index` of `region_size` bytes that
/// came with `fds` fds.
#[napi]
pub fn decode_region_io_fds(
    payload: BufferSlice,
    index: u32,
    region_size: BigInt,
    fds: u32,
) -> Either<NativeRegionIoFds, NativeError> {
    let size = region_size.get_u64().1;
    match region_io_fds::decode_region_io_fds(&payload, index, size, fds as usize) {
        Ok(r) => Either::A(NativeRegionIoFds {
            argsz: r.argsz,
            count: r.count,
            stride: r.stride as u32,
            records: r
                .records
                .iter()
                .map(|x| NativeIoFdRecord {
                    offset: BigInt::from(x.offset),
                    size: BigInt::from(x.size),
                    fd_index: x.fd_index,
                    kind: x.kind,
                    flags: x.flags,
                    datamatch: BigInt::from(x.datamatch),
                    shadow_fd_index: x.shadow.map(|s| s.0),
                    shadow_offset: x.shadow.map(|s| BigInt::from(s.1)),
                })
                .collect(),
        }),
        Err(e) => Either::B(NativeError::proto_reply(Command::DeviceGetRegionIoFds, e)),
    }
}

/// The reads in flight, even if a completion panicked while holding them.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
