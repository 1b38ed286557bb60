//! One client connection: messages read with their fds, each command decoded and answered.
//! The device (its state) is shared by every connection; DMA maps and dirty logging belong
//! to the connection that made them.

use crate::dma::{Dma, EINVAL};
use crate::regions::Regions;
use crate::state::{Device, Piece};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use vfio_user_proto::bytes::{u32_at, u64_at};
use vfio_user_proto::feature::{MigState, FEATURE_GET, FEATURE_PROBE, FEATURE_SET};
use vfio_user_proto::write_multi::decode_write_multi;
use vfio_user_proto::{Command, Header, HEADER_SIZE};

const E2BIG: u32 = 7;
const ENOTSUP: u32 = 95;
/// The most bytes one message may carry (a MIG_DATA_WRITE of `max_data_xfer_size`).
const MAX_MESSAGE: usize = (1 << 20) + 64;

pub struct Options {
    pub write_multiple: bool,
    /// Pad every MIG_DATA_READ reply with zeros to the size asked, as libvfio-user does
    /// (lib/migration.c allocates the reply for the size asked and sends it whole; `argsz`
    /// and `size` give the real count).
    pub pad_reads: bool,
}

pub struct Conn {
    sock: UnixStream,
    /// The last message's payload, and the reply being built (its header first): kept from
    /// message to message so a MiB of state crosses memory once each way, with no allocation.
    rx: Vec<u8>,
    tx: Vec<u8>,
    device: Arc<Mutex<Device>>,
    regions: Arc<Regions>,
    dma: Dma,
    options: Arc<Options>,
}

impl Conn {
    pub fn new(
        sock: UnixStream,
        device: Arc<Mutex<Device>>,
        regions: Arc<Regions>,
        options: Arc<Options>,
    ) -> Conn {
        // As the client does: a MiB of state leaves in one write (capped by wmem_max).
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBuf, &(4 << 20));
        Conn {
            sock,
            rx: Vec::new(),
            tx: Vec::new(),
            device,
            regions,
            dma: Dma::default(),
            options,
        }
    }

    fn device(&self) -> MutexGuard<'_, Device> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves requests until the client goes or sends something unreadable.
    pub fn serve(mut self) {
        while let Some((h, fds)) = self.receive() {
            if h.command == Command::MigDataRead as u16 && !h.no_reply() {
                if self.mig_data_read(&h).is_err() {
                    return;
                }
                continue;
            }
            if h.command == Command::MigDataWrite as u16 {
                if self.mig_data_write(&h).is_err() {
                    return;
                }
                continue;
            }
            let rx = std::mem::take(&mut self.rx);
            let mut tx = std::mem::take(&mut self.tx);
            tx.clear();
            tx.extend_from_slice(&[0; HEADER_SIZE]);
            let answer = self.handle(&h, &rx[..h.payload_len()], fds, &mut tx);
            self.rx = rx;
            if !h.no_reply() {
                let head = match answer {
                    Ok(()) => Header::reply_to(&h, tx.len() - HEADER_SIZE),
                    Err(errno) => {
                        tx.truncate(HEADER_SIZE);
                        Header::error_reply_to(&h, errno)
                    }
                };
                tx[..HEADER_SIZE].copy_from_slice(&head.encode());
                if self.sock.write_all(&tx).is_err() {
                    return;
                }
            }
            self.tx = tx;
        }
    }

    /// Answers MIG_DATA_READ, sending the state's bytes straight from the state (one
    /// gathered write, the device held meanwhile so they cannot change under it).
    fn mig_data_read(&mut self, h: &Header) -> std::io::Result<()> {
        let want = u32_at(&self.rx[..h.payload_len()], 4);
        let mut heads = Vec::new();
        let device = self.device.clone();
        let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
        let pieces = match want {
            Some(w) if w <= 1 << 20 => dev.read(w as usize, &mut heads),
            Some(_) => Err(E2BIG),
            None => Err(EINVAL),
        };
        let pieces = match pieces {
            Ok(p) => p,
            Err(errno) => {
                return self
                    .sock
                    .write_all(&Header::error_reply_to(h, errno).encode());
            }
        };
        let slices: Vec<&[u8]> = pieces
            .iter()
            .map(|p| match p {
                Piece::Head(r) => &heads[r.clone()],
                Piece::State(r) => &dev.memory[r.clone()],
            })
            .collect();
        let n: usize = slices.iter().map(|s| s.len()).sum();
        // `want` is Some here: a missing one was refused above.
        let asked = want.unwrap_or(0) as usize;
        let padding = if self.options.pad_reads {
            vec![0u8; asked.saturating_sub(n)]
        } else {
            Vec::new()
        };
        let mut head = Header::reply_to(h, 8 + n + padding.len()).encode().to_vec();
        head.extend_from_slice(&(8 + n as u32).to_ne_bytes());
        head.extend_from_slice(&(n as u32).to_ne_bytes());
        let mut iov: Vec<IoSlice<'_>> = std::iter::once(head.as_slice())
            .chain(slices)
            .chain(std::iter::once(padding.as_slice()))
            .map(IoSlice::new)
            .collect();
        let mut iov = &mut iov[..];
        while !iov.is_empty() {
            let written = self.sock.write_vectored(iov)?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut iov, written);
        }
        Ok(())
    }

    /// Answers MIG_DATA_WRITE, whose payload is still unread: its data goes from the socket
    /// straight into the state.
    fn mig_data_write(&mut self, h: &Header) -> std::io::Result<()> {
        let len = h.payload_len();
        let mut head = [0u8; 8];
        let outcome = if len < 8 {
            std::io::copy(&mut (&self.sock).take(len as u64), &mut std::io::sink())?;
            Err(EINVAL)
        } else {
            self.sock.read_exact(&mut head)?;
            let size = u32_at(&head, 4).unwrap_or(0) as usize;
            if size != len - 8 {
                std::io::copy(
                    &mut (&self.sock).take((len - 8) as u64),
                    &mut std::io::sink(),
                )?;
                Err(EINVAL)
            } else {
                let device = self.device.clone();
                let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
                dev.load_from(&mut self.sock, size)?
            }
        };
        if h.no_reply() {
            return Ok(());
        }
        let reply = match outcome {
            Ok(()) => Header::reply_to(h, 0),
            Err(errno) => Header::error_reply_to(h, errno),
        };
        self.sock.write_all(&reply.encode())
    }

    /// The next message's header and the fds that came with its first bytes; its payload is
    /// in `rx`.
    fn receive(&mut self) -> Option<(Header, Vec<OwnedFd>)> {
        let mut raw = [0u8; HEADER_SIZE];
        let mut got = 0;
        let mut fds = Vec::new();
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 16]);
        while got < HEADER_SIZE {
            let mut iov = [IoSliceMut::new(&mut raw[got..])];
            let msg = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .ok()?;
            if msg.bytes == 0 {
                return None;
            }
            for c in msg.cmsgs().ok()? {
                if let ControlMessageOwned::ScmRights(r) = c {
                    // SAFETY: the kernel just installed these fds for us; nothing else owns them.
                    fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
            got += msg.bytes;
        }
        let h = Header::decode(&raw);
        let len = h.payload_len();
        if len > MAX_MESSAGE {
            return None;
        }
        if h.command == Command::MigDataWrite as u16 {
            // Read by `mig_data_write`, straight into the state.
            return Some((h, fds));
        }
        if self.rx.len() < len {
            self.rx.resize(len, 0);
        }
        self.sock.read_exact(&mut self.rx[..len]).ok()?;
        Some((h, fds))
    }

    /// Answers one request, appending the reply's payload to `tx`.
    fn handle(
        &mut self,
        h: &Header,
        p: &[u8],
        fds: Vec<OwnedFd>,
        tx: &mut Vec<u8>,
    ) -> Result<(), u32> {
        let word = |at| u32_at(p, at).ok_or(EINVAL);
        match Command::from_u16(h.command) {
            Some(Command::RegionRead) => {
                let (offset, index, count) = (u64_at(p, 0).ok_or(EINVAL)?, word(8)?, word(12)?);
                tx.extend_from_slice(p.get(..16).ok_or(EINVAL)?);
                let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
                self.regions
                    .read(&mut dev, index, offset, count as usize, tx)
            }
            _ => {
                let body = self.answer(h, p, fds)?;
                tx.extend_from_slice(&body);
                Ok(())
            }
        }
    }

    /// Answers a request whose reply is small.
    fn answer(&mut self, h: &Header, p: &[u8], mut fds: Vec<OwnedFd>) -> Result<Vec<u8>, u32> {
        let word = |at| u32_at(p, at).ok_or(EINVAL);
        let long = |at| u64_at(p, at).ok_or(EINVAL);
        match Command::from_u16(h.command) {
            Some(Command::Version) => Ok(self.version(p)),
            Some(Command::DmaMap) => {
                if fds.len() > 1 {
                    return Err(EINVAL);
                }
                self.dma
                    .map(long(16)?, long(24)?, long(8)?, word(4)?, fds.pop())?;
                Ok(Vec::new())
            }
            Some(Command::DmaUnmap) => {
                let all = word(4)? & 2 != 0;
                self.dma.unmap(long(8)?, long(16)?, all)?;
                Ok(p.get(..24).ok_or(EINVAL)?.to_vec())
            }
            Some(Command::DeviceGetInfo) => {
                // PCI and RESET, 9 regions, no interrupts.
                Ok([16u32, 3, 9, 0]
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .collect())
            }
            Some(Command::DeviceGetRegionInfo) => self.regions.info(word(8)?),
            Some(Command::DeviceGetIrqInfo) => Err(EINVAL),
            Some(Command::RegionWrite) => {
                let (offset, index, count) = (long(0)?, word(8)?, word(12)?);
                let data = p.get(16..).ok_or(EINVAL)?;
                if data.len() != count as usize {
                    return Err(EINVAL);
                }
                self.regions.count_write();
                self.write(index, offset, data)?;
                Ok(p[..16].to_vec())
            }
            Some(Command::RegionWriteMulti) if self.options.write_multiple => self.write_multi(p),
            Some(Command::DeviceReset) => {
                self.device().reset();
                self.regions.reset();
                Ok(Vec::new())
            }
            Some(Command::DeviceFeature) => self.feature(p),
            _ => Err(ENOTSUP),
        }
    }

    fn version(&self, p: &[u8]) -> Vec<u8> {
        let minor = u16::from_ne_bytes([
            p.get(2).copied().unwrap_or(0),
            p.get(3).copied().unwrap_or(0),
        ]);
        let json = format!(
            r#"{{"capabilities":{{"max_msg_fds":8,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":{},"write_multiple":{}}}}}"#,
            crate::dma::MAX_MAPS,
            self.options.write_multiple
        );
        let mut out = 0u16.to_ne_bytes().to_vec();
        out.extend_from_slice(&minor.min(2).to_ne_bytes());
        out.extend_from_slice(json.as_bytes());
        out.push(0);
        out
    }

    /// A region write: the state region, the control registers, or config space.
    fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), u32> {
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let go = self.regions.write(&mut dev, index, offset, data)?;
        drop(dev);
        if let Some((iova, len, fill)) = go {
            self.dma.device_write(iova, len, fill)?;
        }
        Ok(())
    }

    /// REGION_WRITE_MULTI: `wr_cnt` entries of (offset, region, count, 8 bytes of data),
    /// applied in order; the reply says how many were.
    fn write_multi(&mut self, p: &[u8]) -> Result<Vec<u8>, u32> {
        let writes = decode_write_multi(p).map_err(|_| EINVAL)?;
        self.regions.count_multi(writes.len() as u64);
        for w in &writes {
            self.write(w.region, w.offset, w.data)?;
        }
        Ok((writes.len() as u64).to_ne_bytes().to_vec())
    }

    /// DEVICE_FEATURE: MIGRATION, MIG_DEVICE_STATE and dirty logging (protocol.md 3.12).
    fn feature(&mut self, p: &[u8]) -> Result<Vec<u8>, u32> {
        let argsz = u32_at(p, 0).ok_or(EINVAL)?;
        let flags = u32_at(p, 4).ok_or(EINVAL)?;
        let (feature, ops) = (flags & 0xffff, flags & !0xffff);
        let data = &p[8..];
        let supported = match feature {
            1 | 8 => FEATURE_GET,
            2 => FEATURE_GET | FEATURE_SET,
            6 | 7 => FEATURE_SET,
            _ => 0,
        };
        let methods = ops & !FEATURE_PROBE;
        if methods == 0 && ops & FEATURE_PROBE == 0 || methods & !supported != 0 {
            return Err(ENOTSUP);
        }
        if ops & FEATURE_PROBE != 0 {
            return Ok(p.to_vec());
        }
        let mut out = p[..8].to_vec();
        let append = |out: &mut Vec<u8>, d: &[u8]| {
            out.extend_from_slice(d);
            let len = out.len() as u32;
            out[0..4].copy_from_slice(&len.to_ne_bytes());
        };
        match (feature, ops) {
            // STOP_COPY and PRE_COPY.
            (1, FEATURE_GET) => append(&mut out, &5u64.to_ne_bytes()),
            (2, FEATURE_GET) => {
                let state = self.device().state as u32;
                append(
                    &mut out,
                    &[state.to_ne_bytes(), u32::MAX.to_ne_bytes()].concat(),
                )
            }
            (2, FEATURE_SET) => {
                let to = u32_at(data, 0).and_then(MigState::from_u32).ok_or(EINVAL)?;
                self.device().set_state(to)?;
                out.extend_from_slice(data);
            }
            (6, FEATURE_SET) => {
                let page = u64_at(data, 0).ok_or(EINVAL)?;
                let n = u32_at(data, 8).ok_or(EINVAL)? as usize;
                let ranges = (0..n)
                    .map(|i| Some((u64_at(data, 16 + 16 * i)?, u64_at(data, 24 + 16 * i)?)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or(EINVAL)?;
                let page = self.dma.start_logging(page, ranges)?;
                out.extend_from_slice(data);
                out[8..16].copy_from_slice(&page.to_ne_bytes());
            }
            (7, FEATURE_SET) => self.dma.stop_logging()?,
            (8, FEATURE_GET) => {
                let (iova, length, page) = (
                    u64_at(data, 0).ok_or(EINVAL)?,
                    u64_at(data, 8).ok_or(EINVAL)?,
                    u64_at(data, 16).ok_or(EINVAL)?,
                );
                // The bitmap must fit what the client asked for, and a message.
                let room = (argsz as usize).min(MAX_MESSAGE).saturating_sub(8 + 24);
                let bitmap = self.dma.report(iova, length, page, room)?;
                out.extend_from_slice(&data[..24]);
                append(&mut out, &bitmap);
            }
            _ => return Err(ENOTSUP),
        }
        Ok(out)
    }
}
