//! The device's regions: BAR0 is the migrated state, BAR1 the control registers, region 7 a
//! PCI config header. Accesses are bounds-checked here; what a control register does is
//! returned to the connection, which owns the DMA maps the device writes through.
//!
//! BAR1 registers (little-endian, at these offsets):
//! - 0x00 u64 DMA address, 0x08 u64 DMA length, 0x10 u32 DMA GO: writing it makes the device
//!   fill [address, address + length) of the client's mapped memory with the value's low byte.
//! - 0x18 u32 first page, 0x1c u32 stride, 0x20 u32 WORK: writing N makes the device rewrite N
//!   pages of its state (every stride-th from the first), as a running device does.
//! - 0x28 u64 REGION_WRITE messages received, 0x30 u64 REGION_WRITE_MULTI messages, 0x38 u64
//!   entries in them (read-only).
//! - 0x100..0x1000: scratch bytes, read back as written.

use crate::dma::EINVAL;
use crate::state::{Device, EBUSY};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vfio_user_proto::bytes::{u32_at, u64_at};
use vfio_user_proto::region::{REGION_FLAG_READ, REGION_FLAG_WRITE};

pub const STATE: u32 = 0;
pub const CTRL: u32 = 1;
pub const CONFIG: u32 = 7;
const CTRL_SIZE: u64 = 4096;
const CONFIG_SIZE: u64 = 256;
const DMA_GO: u64 = 0x10;
const WORK: u64 = 0x20;
const COUNTERS: u64 = 0x28;
const SCRATCH: u64 = 0x100;

pub struct Regions {
    state_size: u64,
    ctrl: Mutex<[u8; CTRL_SIZE as usize]>,
    writes: AtomicU64,
    multi: AtomicU64,
    entries: AtomicU64,
}

/// A DMA the device was asked to do: address, length, fill byte.
pub type DmaGo = (u64, u64, u8);

impl Regions {
    pub fn new(state_size: u64) -> Regions {
        Regions {
            state_size,
            ctrl: Mutex::new([0; CTRL_SIZE as usize]),
            writes: AtomicU64::new(0),
            multi: AtomicU64::new(0),
            entries: AtomicU64::new(0),
        }
    }

    fn size(&self, index: u32) -> u64 {
        match index {
            STATE => self.state_size,
            CTRL => CTRL_SIZE,
            CONFIG => CONFIG_SIZE,
            _ => 0,
        }
    }

    /// DEVICE_GET_REGION_INFO's 32 bytes: readable and writable, no mmap, no caps.
    pub fn info(&self, index: u32) -> Result<Vec<u8>, u32> {
        if index >= 9 {
            return Err(EINVAL);
        }
        let size = self.size(index);
        let flags = if size > 0 {
            REGION_FLAG_READ | REGION_FLAG_WRITE
        } else {
            0
        };
        let mut out = Vec::with_capacity(32);
        for w in [32, flags, index, 0] {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        out.extend_from_slice(&size.to_ne_bytes());
        out.extend_from_slice(&(u64::from(index) << 40).to_ne_bytes());
        Ok(out)
    }

    fn check(&self, index: u32, offset: u64, len: usize) -> Result<usize, u32> {
        let size = self.size(index);
        if offset > size || len as u64 > size - offset {
            return Err(EINVAL);
        }
        Ok(offset as usize)
    }

    pub fn read(
        &self,
        dev: &mut Device,
        index: u32,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), u32> {
        let at = self.check(index, offset, len)?;
        match index {
            STATE => out.extend_from_slice(&dev.memory[at..at + len]),
            CTRL => {
                let mut regs = *self.ctrl.lock().unwrap_or_else(|e| e.into_inner());
                let counters = [&self.writes, &self.multi, &self.entries];
                for (i, c) in counters.iter().enumerate() {
                    let r = COUNTERS as usize + 8 * i;
                    regs[r..r + 8].copy_from_slice(&c.load(Ordering::Relaxed).to_le_bytes());
                }
                out.extend_from_slice(&regs[at..at + len]);
            }
            _ => out.extend_from_slice(&config_space()[at..at + len]),
        }
        Ok(())
    }

    /// Applies a write; returns the DMA it starts, if it wrote DMA GO.
    pub fn write(
        &self,
        dev: &mut Device,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<DmaGo>, u32> {
        let at = self.check(index, offset, data.len())?;
        match index {
            STATE => dev.write(at, data).map(|()| None),
            CTRL => {
                let end = offset + data.len() as u64;
                if offset < SCRATCH && end > COUNTERS {
                    return Err(EINVAL);
                }
                let mut regs = self.ctrl.lock().unwrap_or_else(|e| e.into_inner());
                regs[at..at + data.len()].copy_from_slice(data);
                let hits = |reg: u64| offset <= reg && end > reg;
                let le32 = |r: usize| u32_at(&regs[r..r + 4], 0).map(u32::from_le);
                if hits(WORK) {
                    if !dev.running() {
                        return Err(EBUSY);
                    }
                    let (first, stride, count) = (le32(0x18), le32(0x1c), le32(0x20));
                    let (Some(f), Some(s), Some(n)) = (first, stride, count) else {
                        return Err(EINVAL);
                    };
                    dev.work(f as usize, s as usize, n as usize)?;
                }
                if hits(DMA_GO) {
                    let iova = u64_at(&regs[0..8], 0).map(u64::from_le).ok_or(EINVAL)?;
                    let len = u64_at(&regs[8..16], 0).map(u64::from_le).ok_or(EINVAL)?;
                    return Ok(Some((iova, len, regs[DMA_GO as usize])));
                }
                Ok(None)
            }
            // Config space is read-only; writes are ignored, as a real header's are mostly.
            _ => Ok(None),
        }
    }

    pub fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_multi(&self, entries: u64) {
        self.multi.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_add(entries, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        *self.ctrl.lock().unwrap_or_else(|e| e.into_inner()) = [0; CTRL_SIZE as usize];
    }
}

/// A type-0 PCI header: vendor 0x1b36 (Red Hat, QEMU's devices), device 0x11ec, class ff
/// (unassigned), no capabilities.
fn config_space() -> [u8; CONFIG_SIZE as usize] {
    let mut c = [0u8; CONFIG_SIZE as usize];
    c[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x11ecu16.to_le_bytes());
    c[0x0b] = 0xff;
    c[0x2c..0x2e].copy_from_slice(&0x1b36u16.to_le_bytes());
    c[0x2e..0x30].copy_from_slice(&0x0001u16.to_le_bytes());
    c
}
