//! `vfio-user-test-device SOCKET`: a small PCI device served with rust-vmm's `vfio_user`
//! Server, the real peer our integration tests and benchmarks talk to.
//!
//! - config space (region 7, 256 bytes) with vendor 0x1b36 / device 0x0005 (QEMU's PCI test
//!   device ids); writable except the id words.
//! - BAR0 (region 0, 4 KiB) backed by a memfd, readable and writable over the socket and
//!   handed out as an mmapable fd through a sparse-mmap area covering the whole region.
//!   Writing a u32 `v` at `DOORBELL` (0xffc) signals MSI vector `v` if an eventfd is wired to
//!   it, else INTx.
//! - BAR2 (region 2, 1 MiB) of plain memory, readable and writable over the socket only: room
//!   for large transfers (split by `max_data_xfer_size`) and the throughput benchmark.
//! - A DMA engine in BAR0: write the source iova at `DMA_SRC` (0xfe0, u64), the destination
//!   at `DMA_DST` (0xfe8, u64), then a length (u32) at `DMA_GO` (0xff0): the device copies
//!   that many bytes between the two through the memory behind its DMA maps (their fds), so
//!   a test sees the device really use what the client mapped.
//! - IRQs: INTx (1 vector), MSI (4 vectors), MSI-X/ERR/REQ with none; eventfds via SET_IRQS.
//! - DEVICE_RESET clears BAR0 and BAR2 and restores config space.
//!
//! It prints `listening SOCKET` once bound, then serves clients one after another until it is
//! killed. A client that trips a panic inside the crate does not take the device down.

mod lifetime;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};

const NUM_REGIONS: u32 = 9;
const BAR0: u32 = 0;
const BAR2: u32 = 2;
const BAR2_SIZE: u64 = 1 << 20;
const CONFIG: u32 = 7;
const BAR0_SIZE: u64 = 4096;
const CONFIG_SIZE: u64 = 256;
const DOORBELL: u64 = 0xffc;
const DMA_SRC: u64 = 0xfe0;
const DMA_DST: u64 = 0xfe8;
const DMA_GO: u64 = 0xff0;
const IRQ_INTX: u32 = 0;
const IRQ_MSI: u32 = 1;
const MSI_VECTORS: u32 = 4;

struct Device {
    bar0: File,
    bar2: Vec<u8>,
    config: [u8; CONFIG_SIZE as usize],
    /// (irq index, vector) -> eventfd.
    irqs: HashMap<(u32, u32), File>,
    /// DMA windows by address: (size, offset in the fd, fd).
    /// DMA maps by iova: their size, and the memory behind them, mapped from their fd as a
    /// device maps guest RAM (pread would not do for hugetlbfs files, which have no read()).
    dma: HashMap<u64, (u64, Option<DmaWindow>)>,
}

fn initial_config() -> [u8; CONFIG_SIZE as usize] {
    let mut c = [0u8; CONFIG_SIZE as usize];
    c[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x0005u16.to_le_bytes());
    c[0x0b] = 0xff; // class: unassigned
    c
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// The crate checks only the region index; offsets and sizes are ours to check.
fn check_range(region: u32, offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(invalid(format!(
            "access of {len} bytes at {offset:#x} outside region {region} ({size} bytes)"
        ))),
    }
}

/// The memory of one DMA map, mapped shared from its fd; unmapped when dropped.
struct DmaWindow {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
}

impl DmaWindow {
    fn map(file: &File, offset: u64, size: u64) -> io::Result<DmaWindow> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let len = usize::try_from(size).map_err(|_| invalid(format!("DMA map of {size} bytes")))?;
        let at =
            i64::try_from(offset).map_err(|_| invalid(format!("DMA map at offset {offset}")))?;
        let n =
            std::num::NonZeroUsize::new(len).ok_or_else(|| invalid("an empty DMA map".into()))?;
        // SAFETY: a fresh shared mapping of the client's file, at an address the kernel picks;
        // it aliases nothing of ours and lives until this window is dropped.
        let ptr = unsafe {
            mmap(
                None,
                n,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file,
                at,
            )
        }
        .map_err(io::Error::from)?;
        Ok(DmaWindow { ptr, len })
    }

    /// `len` bytes at `at` (the caller checked they lie inside).
    #[allow(clippy::mut_from_ref)]
    fn slice(&self, at: u64, len: u64) -> &mut [u8] {
        // SAFETY: [at, at + len) lies inside the mapping (dma_window checks it against the
        // map's size, which is the mapping's length); the device serves one request at a
        // time, so no two slices are used at once; the guest may write the same memory, as
        // real DMA races with it.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().cast::<u8>().add(at as usize),
                len as usize,
            )
        }
    }
}

impl Drop for DmaWindow {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once, and no slice of it outlives
        // `&self` borrows, which end before the window is dropped.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

// SAFETY: a DmaWindow is an address and a length of shared memory, tied to no thread.
unsafe impl Send for DmaWindow {}

impl Device {
    /// The memory behind [iova, iova + len), if one map with an fd holds it all.
    fn dma_window(&self, iova: u64, len: u64) -> io::Result<&mut [u8]> {
        self.dma
            .iter()
            .find(|(base, (size, _))| {
                iova >= **base
                    && (iova - **base)
                        .checked_add(len)
                        .is_some_and(|end| end <= *size)
            })
            .and_then(|(base, (_, w))| w.as_ref().map(|w| w.slice(iova - *base, len)))
            .ok_or_else(|| {
                invalid(format!(
                    "no DMA map with an fd holds {len} bytes at {iova:#x}"
                ))
            })
    }

    /// The DMA engine: copies `len` bytes from the iova in DMA_SRC to the one in DMA_DST.
    fn dma_copy(&self, len: u32) -> io::Result<()> {
        let mut reg = [0u8; 8];
        self.bar0.read_exact_at(&mut reg, DMA_SRC)?;
        let src = u64::from_le_bytes(reg);
        self.bar0.read_exact_at(&mut reg, DMA_DST)?;
        let dst = u64::from_le_bytes(reg);
        let data = self.dma_window(src, u64::from(len))?.to_vec();
        self.dma_window(dst, u64::from(len))?.copy_from_slice(&data);
        Ok(())
    }

    fn signal(&self, vector: u32) -> io::Result<()> {
        let fd = self
            .irqs
            .get(&(IRQ_MSI, vector))
            .or_else(|| self.irqs.get(&(IRQ_INTX, 0)));
        if let Some(f) = fd {
            nix::unistd::write(f, &1u64.to_ne_bytes()).map_err(io::Error::from)?;
        }
        Ok(())
    }
}

impl ServerBackend for Device {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match region {
            BAR0 => {
                check_range(region, offset, data.len(), BAR0_SIZE)?;
                self.bar0.read_exact_at(data, offset)
            }
            BAR2 => {
                check_range(region, offset, data.len(), BAR2_SIZE)?;
                data.copy_from_slice(&self.bar2[offset as usize..offset as usize + data.len()]);
                Ok(())
            }
            CONFIG => {
                check_range(region, offset, data.len(), CONFIG_SIZE)?;
                data.copy_from_slice(&self.config[offset as usize..offset as usize + data.len()]);
                Ok(())
            }
            _ => Err(invalid(format!("region {region} is not readable"))),
        }
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        match region {
            BAR0 => {
                check_range(region, offset, data.len(), BAR0_SIZE)?;
                self.bar0.write_all_at(data, offset)?;
                if data.len() == 4 && (offset == DOORBELL || offset == DMA_GO) {
                    let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                    if offset == DMA_GO {
                        self.dma_copy(v)?;
                    } else {
                        self.signal(v)?;
                    }
                }
                Ok(())
            }
            BAR2 => {
                check_range(region, offset, data.len(), BAR2_SIZE)?;
                self.bar2[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                Ok(())
            }
            CONFIG => {
                check_range(region, offset, data.len(), CONFIG_SIZE)?;
                let start = offset as usize;
                for (i, b) in data.iter().enumerate() {
                    // Vendor and device ids are read-only.
                    if start + i >= 4 {
                        self.config[start + i] = *b;
                    }
                }
                Ok(())
            }
            _ => Err(invalid(format!("region {region} is not writable"))),
        }
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        if size == 0 || self.dma.contains_key(&address) {
            return Err(invalid(format!("bad DMA map at {address:#x}")));
        }
        let window = match fd {
            Some(f) => Some(DmaWindow::map(&f, offset, size)?),
            None => None,
        };
        self.dma.insert(address, (size, window));
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        match self.dma.get(&address) {
            Some((s, _)) if *s == size => {
                self.dma.remove(&address);
                Ok(())
            }
            _ => Err(invalid(format!("no DMA map at {address:#x}+{size:#x}"))),
        }
    }

    fn reset(&mut self) -> io::Result<()> {
        self.bar0.write_all_at(&[0u8; BAR0_SIZE as usize], 0)?;
        self.bar2.fill(0);
        self.config = initial_config();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let vectors = match index {
            IRQ_INTX => 1,
            IRQ_MSI => MSI_VECTORS,
            _ => 0,
        };
        if start.checked_add(count).is_none_or(|end| end > vectors) {
            return Err(invalid(format!(
                "vectors {start}+{count} outside irq index {index}"
            )));
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD == 0 {
            return Ok(());
        }
        if fds.is_empty() {
            for v in start..start + count {
                self.irqs.remove(&(index, v));
            }
            return Ok(());
        }
        if fds.len() != count as usize {
            return Err(invalid(format!("{} fds for {count} vectors", fds.len())));
        }
        for (v, fd) in (start..).zip(fds) {
            self.irqs.insert((index, v), fd);
        }
        Ok(())
    }
}

fn region(index: u32, size: u64, flags: u32) -> vfio_region_info {
    vfio_region_info {
        argsz: std::mem::size_of::<vfio_region_info>() as u32,
        flags,
        index,
        cap_offset: 0,
        size,
        offset: 0,
    }
}

fn main() {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: vfio-user-test-device SOCKET");
        std::process::exit(2);
    };
    lifetime::die_with_parent(&path);
    let bar0_fd: OwnedFd = match nix::sys::memfd::memfd_create(
        c"vfio-user-test-bar0",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    ) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("memfd_create: {e}");
            std::process::exit(1);
        }
    };
    let bar0 = File::from(bar0_fd);
    if let Err(e) = bar0.set_len(BAR0_SIZE) {
        eprintln!("sizing BAR0: {e}");
        std::process::exit(1);
    }
    // Sealed, as a careful server seals memory it shares: a client may map it without
    // accepting that it could shrink under the mapping.
    let seals = nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_SEAL;
    if let Err(e) = nix::fcntl::fcntl(&bar0, nix::fcntl::FcntlArg::F_ADD_SEALS(seals)) {
        eprintln!("sealing BAR0: {e}");
        std::process::exit(1);
    }
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let regions: Vec<ServerRegion> = (0..NUM_REGIONS)
        .map(|i| match i {
            BAR0 => ServerRegion {
                region_info: region(i, BAR0_SIZE, rw | VFIO_REGION_INFO_FLAG_MMAP),
                sparse_areas: vec![SparseArea {
                    area: vfio_region_sparse_mmap_area {
                        offset: 0,
                        size: BAR0_SIZE,
                    },
                }],
                mmap_fd: Some(bar0.as_raw_fd()),
            },
            BAR2 => ServerRegion {
                region_info: region(i, BAR2_SIZE, rw),
                sparse_areas: vec![],
                mmap_fd: None,
            },
            CONFIG => ServerRegion {
                region_info: region(i, CONFIG_SIZE, rw),
                sparse_areas: vec![],
                mmap_fd: None,
            },
            _ => ServerRegion {
                region_info: region(i, 0, 0),
                sparse_areas: vec![],
                mmap_fd: None,
            },
        })
        .collect();
    let irqs = vec![
        IrqInfo {
            index: IRQ_INTX,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 1,
        },
        IrqInfo {
            index: IRQ_MSI,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: MSI_VECTORS,
        },
        IrqInfo {
            index: 2,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 0,
        },
        IrqInfo {
            index: 3,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 0,
        },
        IrqInfo {
            index: 4,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 0,
        },
    ];
    let server = match Server::new(&path, true, irqs, regions) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot serve on {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let mut device = Device {
        bar0,
        bar2: vec![0; BAR2_SIZE as usize],
        config: initial_config(),
        irqs: HashMap::new(),
        dma: HashMap::new(),
    };
    println!("listening {}", path.display());
    loop {
        // Each run() serves one client until EOF. A client's state (DMA maps, irq fds) goes
        // with it, as the spec asks; the device state stays.
        let result = catch_unwind(AssertUnwindSafe(|| server.run(&mut device)));
        device.irqs.clear();
        device.dma.clear();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("client session ended: {e}"),
            Err(_) => eprintln!("client session panicked inside vfio_user; serving the next"),
        }
    }
}
