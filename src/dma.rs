//! DMA calls on `NativeClient` (through the client crate's `dma.rs`) and `NativeDmaMemory`,
//! a memfd mapping seen from JS as a Buffer over the same pages.

use crate::client::NativeClient;
use crate::convert::{self, NativeError, Payload};
use crate::event::Event;
use crate::view;
use napi::bindgen_prelude::{BigInt, BigUint64ArraySlice, BufferSlice, Either, Uint8ArraySlice};
use napi::{Env, Result, Status};
use napi_derive::napi;
use nix::errno::Errno;
use std::sync::{Arc, Mutex};
use vfio_user_client::{DmaMap, DmaMemory, Error};

/// DMA memory: a memfd mapped into this process. Its fd goes with DMA_MAP; `array_buffer()`
/// gives JS views of the mapping (windows, each at most one ArrayBuffer long). `close` lets go
/// of the mapping once ts/ has detached every view (every Buffer over them then reads as
/// empty): it is unmapped at once unless a DMA map still uses it (then with the last such
/// map). Without `close`, the mapping lives until this object, its views and every map using
/// it are gone.
#[napi]
pub struct NativeDmaMemory {
    memory: Arc<Slot>,
}

/// The mapping while it is open: shared with the view's finalizer, emptied by `close`.
type Slot = Mutex<Option<Arc<DmaMemory>>>;

/// Allocates `size` bytes of DMA memory (a memfd, mapped shared), of huge pages when `huge`.
#[napi]
pub fn allocate_dma_memory(size: f64, huge: bool) -> Either<NativeDmaMemory, NativeError> {
    wrap_memory(DmaMemory::allocate_with(size as usize, huge))
}

/// `size` bytes of the caller's `fd` from `offset`, mapped shared (the caller keeps `fd`); a
/// file that may shrink only with `allow_shrinkable`.
#[napi]
pub fn dma_memory_from_fd(
    fd: i32,
    offset: BigInt,
    size: f64,
    allow_shrinkable: bool,
) -> Either<NativeDmaMemory, NativeError> {
    // SAFETY: ts/ checked it is a non-negative integer; it is only borrowed during this call
    // (duplicated), and a number that is not an open fd fails with EBADF.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let offset = u64_of(&offset);
    wrap_memory(DmaMemory::from_fd(
        borrowed,
        offset,
        size as usize,
        allow_shrinkable,
    ))
}

fn wrap_memory(m: std::result::Result<DmaMemory, Error>) -> Either<NativeDmaMemory, NativeError> {
    match m {
        Ok(m) => Either::A(NativeDmaMemory {
            memory: Arc::new(Mutex::new(Some(Arc::new(m)))),
        }),
        Err(e) => Either::B(convert::from_error(&e)),
    }
}

impl NativeDmaMemory {
    /// The mapping, or EBADF once closed.
    fn mapping(&self) -> std::result::Result<Arc<DmaMemory>, Error> {
        let slot = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        slot.clone()
            .ok_or_else(|| Error::new(Errno::EBADF, "the DMA memory was closed"))
    }
}

#[napi]
impl NativeDmaMemory {
    /// The memfd while it is open (borrowed: close it with `close`), else null.
    #[napi(getter)]
    pub fn fd(&self) -> Option<i32> {
        self.mapping().ok().and_then(|m| m.raw_fd())
    }

    /// Its size in bytes (0 once closed).
    #[napi(getter)]
    pub fn size(&self) -> f64 {
        self.mapping().map(|m| m.len() as f64).unwrap_or(0.0)
    }

    /// Whether its file may shrink under the mapping (a caller's fd mapped with
    /// `allowShrinkable`).
    #[napi(getter)]
    pub fn shrinkable(&self) -> bool {
        self.mapping().is_ok_and(|m| m.shrinkable())
    }

    /// An ArrayBuffer over `length` bytes of the mapping from `offset` (external, detachable;
    /// no copy: reads and writes are the device's view). ts/ checks the range and the length
    /// against `buffer.constants.MAX_LENGTH`, and detaches every view with `detach` before
    /// `close`.
    #[napi(ts_return_type = "ArrayBuffer")]
    pub fn array_buffer(
        &self,
        env: Env,
        offset: f64,
        length: f64,
    ) -> Result<napi::bindgen_prelude::Unknown<'_>> {
        let m = self
            .mapping()
            .map_err(|e| napi::Error::new(Status::GenericFailure, e.message))?;
        let (offset, length) = (offset as usize, length as usize);
        if offset.checked_add(length).is_none_or(|end| end > m.len()) {
            return Err(napi::Error::new(
                Status::InvalidArg,
                format!("{length} bytes at {offset} pass the end of the DMA memory"),
            ));
        }
        // SAFETY: the range lies inside the mapping (checked above), which stays mapped until
        // `close`, which comes after ts/ detached this view, or, without `close`, while the
        // slot the view holds keeps it.
        unsafe {
            view::external(
                env,
                m.as_ptr().wrapping_add(offset),
                length,
                self.memory.clone(),
                "DMA memory",
            )
        }
    }

    /// Closes the fd and lets go of the mapping: unmapped now, or with the last DMA map that
    /// still uses it. Every view must have been detached first. Idempotent.
    #[napi]
    pub fn close(&self) {
        let m = self.memory.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(m) = m {
            m.close_fd();
        }
    }
}

/// A DMA_MAP request as JS describes it.
#[napi(object)]
pub struct NativeDmaMapArgs {
    pub iova: BigInt,
    pub size: BigInt,
    /// Offset of the range in the memory (and its fd).
    pub offset: BigInt,
    pub read: bool,
    pub write: bool,
    pub timeout_ms: Option<u32>,
}

fn u64_of(b: &BigInt) -> u64 {
    // ts/ checked it is in [0, 2^64).
    b.get_u64().1
}

impl NativeClient {
    /// Runs `f` with the map `args` describes over `memory`.
    fn with_map<R>(
        &self,
        args: &NativeDmaMapArgs,
        memory: &NativeDmaMemory,
        f: impl FnOnce(&vfio_user_client::Client, &DmaMap<'_>) -> std::result::Result<R, Error>,
    ) -> std::result::Result<R, Error> {
        let mem = &memory.mapping()?;
        mem.with_fd(|fd| {
            let map = dma_map(
                mem,
                fd,
                [u64_of(&args.iova), u64_of(&args.size), u64_of(&args.offset)],
                (args.read, args.write),
                args.timeout_ms,
            );
            self.live(|c| f(c, &map))
        })?
    }
}

/// The DMA_MAP of `[iova, size, offset]` of `mem` (whose fd is `fd`).
fn dma_map<'a>(
    mem: &Arc<DmaMemory>,
    fd: std::os::fd::BorrowedFd<'a>,
    [iova, size, offset]: [u64; 3],
    (read, write): (bool, bool),
    timeout_ms: Option<u32>,
) -> DmaMap<'a> {
    let (fd, local) = mem.range(fd, offset);
    DmaMap {
        iova,
        size,
        read,
        write,
        fd: Some(fd),
        local: Some(local),
        timeout: convert::timeout(timeout_ms),
    }
}

#[napi]
impl NativeClient {
    /// Sends DMA_MAP; a reply event with `token` follows. Returns an error if nothing was
    /// sent (a check failed before sending).
    #[napi]
    pub fn dma_map(
        &self,
        token: u32,
        args: NativeDmaMapArgs,
        memory: &NativeDmaMemory,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let done = Box::new(move |r| events.push(Event::Done(token, r)));
        self.with_map(&args, memory, |c, m| c.dma_map_callback(m, done))
            .err()
            .map(|e| convert::from_error(&e))
    }

    /// Sends a DMA_MAP for each range of `memory` that `ranges` lists (iova, size and offset
    /// in the memory, three numbers each; `access` bit 0 read, bit 1 write, one byte each),
    /// pipelined; one event with `token` follows once every map sent was answered: an empty
    /// payload, or the first failure. Returns an error if nothing was sent.
    #[napi]
    pub fn dma_map_many(
        &self,
        token: u32,
        memory: &NativeDmaMemory,
        ranges: BigUint64ArraySlice,
        access: Uint8ArraySlice,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let done = Box::new(move |r: std::result::Result<(), Error>| {
            events.push(match r {
                Ok(()) => Event::Data(token, Payload::whole(Vec::new())),
                Err(e) => Event::Done(token, Err(e)),
            })
        });
        let sent = memory.mapping().and_then(|mem| {
            mem.with_fd(|fd| {
                let maps: Vec<DmaMap<'_>> = ranges
                    .chunks_exact(3)
                    .zip(access.iter())
                    .map(|(r, a)| {
                        let access = (a & 1 != 0, a & 2 != 0);
                        dma_map(&mem, fd, [r[0], r[1], r[2]], access, timeout_ms)
                    })
                    .collect();
                self.live(|c| c.dma_map_many_callback(&maps, done))
            })?
        });
        sent.err().map(|e| convert::from_error(&e))
    }

    /// Sends DMA_MAP and blocks until the reply. False on failure (see `take_error`).
    #[napi]
    pub fn dma_map_sync(&self, args: NativeDmaMapArgs, memory: &NativeDmaMemory) -> bool {
        self.keep_error(self.with_map(&args, memory, |c, m| c.dma_map(m)))
    }

    /// Sends DMA_UNMAP for a range mapped earlier; a reply event with `token` follows.
    /// Returns an error if nothing was sent.
    #[napi]
    pub fn dma_unmap(
        &self,
        token: u32,
        iova: BigInt,
        size: BigInt,
        timeout_ms: Option<u32>,
    ) -> Option<NativeError> {
        let events = self.events.clone();
        let done = Box::new(move |r| events.push(Event::Done(token, r)));
        let (iova, size) = (u64_of(&iova), u64_of(&size));
        self.live(|c| c.dma_unmap_callback(iova, size, convert::timeout(timeout_ms), done))
            .err()
            .map(|e| convert::from_error(&e))
    }

    /// Sends DMA_UNMAP and blocks until the reply. False on failure (see `take_error`).
    #[napi]
    pub fn dma_unmap_sync(&self, iova: BigInt, size: BigInt, timeout_ms: Option<u32>) -> bool {
        let (iova, size) = (u64_of(&iova), u64_of(&size));
        self.keep_error(self.live(|c| c.dma_unmap(iova, size, convert::timeout(timeout_ms))))
    }

    /// Sends DMA_UNMAP for everything; a reply event with `token` follows.
    #[napi]
    pub fn dma_unmap_all(&self, token: u32, timeout_ms: Option<u32>) -> Option<NativeError> {
        let events = self.events.clone();
        let done = Box::new(move |r| events.push(Event::Done(token, r)));
        self.live(|c| c.dma_unmap_all_callback(convert::timeout(timeout_ms), done))
            .err()
            .map(|e| convert::from_error(&e))
    }

    /// How many DMA ranges are mapped now.
    #[napi(getter)]
    pub fn dma_maps(&self) -> u32 {
        self.live(|c| Ok(c.dma_maps() as u32)).unwrap_or(0)
    }
}

/// A JS Buffer's memory behind a DMA range that has no fd: the server's DMA_READ/DMA_WRITE
/// to it are served from it.
struct JsMemory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory (an ArrayBuffer's backing store, which never moves); ts/ keeps the
// Buffer reachable until the range is unmapped or the connection ends, and the client crate
// touches it only while the range is in its DMA table.
unsafe impl Send for JsMemory {}
// SAFETY: as above.
unsafe impl Sync for JsMemory {}

impl vfio_user_client::LocalMemory for JsMemory {
    fn as_ptr_len(&self) -> (*mut u8, usize) {
        (self.ptr, self.len)
    }
}

#[napi]
impl NativeClient {
    /// Sends DMA_MAP with no fd for a range backed by `memory` (a Buffer ts/ keeps alive
    /// until the range is unmapped): the server must use DMA_READ/DMA_WRITE, served from it.
    /// A reply event with `token` follows; returns an error if nothing was sent.
    #[napi]
    pub fn dma_map_buffer(
        &self,
        token: u32,
        args: NativeDmaMapArgs,
        memory: BufferSlice,
    ) -> Option<NativeError> {
        let map = buffer_map(&args, memory);
        let events = self.events.clone();
        let done = Box::new(move |r| events.push(Event::Done(token, r)));
        self.live(|c| c.dma_map_callback(&map, done))
            .err()
            .map(|e| convert::from_error(&e))
    }

    /// `dma_map_buffer`, blocking until the reply. False on failure (see `take_error`).
    #[napi]
    pub fn dma_map_buffer_sync(&self, args: NativeDmaMapArgs, memory: BufferSlice) -> bool {
        let map = buffer_map(&args, memory);
        self.keep_error(self.live(|c| c.dma_map(&map)))
    }
}

/// The map `args` describes over a JS Buffer (see [`JsMemory`]).
fn buffer_map(args: &NativeDmaMapArgs, mut memory: BufferSlice) -> DmaMap<'static> {
    let offset = (u64_of(&args.offset) as usize).min(memory.len());
    let local = Arc::new(JsMemory {
        // SAFETY: `offset` is within the Buffer.
        ptr: unsafe { memory.as_mut_ptr().add(offset) },
        len: memory.len() - offset,
    });
    DmaMap {
        iova: u64_of(&args.iova),
        size: u64_of(&args.size),
        read: args.read,
        write: args.write,
        fd: None,
        local: Some(local),
        timeout: convert::timeout(args.timeout_ms),
    }
}
