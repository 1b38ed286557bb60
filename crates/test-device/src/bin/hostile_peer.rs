//! `vfio-user-hostile-peer SOCKET SCENARIO`: a server that attacks its client through the
//! memory and the fds it is given or gives, for the cases that once killed the client's
//! process (issue 24). Built on our proto crate for the framing only. Each client that
//! connects is played the scenario on its own thread. Every scenario answers VERSION first.
//!
//! - `shrink-dma`: answers DMA_MAP and DMA_UNMAP, and truncates every fd a DMA_MAP brings to 0
//!   bytes. Before answering any other request it DMA_WRITEs "vfio" at the last map's iova,
//!   then DMA_READs 4 bytes there, and replies with 16 bytes: the errno of its ftruncate (0:
//!   it shrank the file), of the client's answer to the write, of its answer to the read,
//!   then the 4 bytes read. REGION_READ is answered with `count` bytes of 'x'.
//! - `regions`: DEVICE_GET_INFO says 4 regions and no IRQs; REGION_INFO offers each region as
//!   mmappable, with the fd: region 0 4 KiB over a 0-byte memfd, region 1 4 KiB over an unsealed
//!   4 KiB memfd, region 2 8 GiB over a sealed (sparse) memfd whose byte 2^32 + 5 is 0x5a,
//!   region 3 4 KiB over a sealed memfd.
//! - `fds:N`: answers every other request with a 16-byte payload and N fds (duplicates of
//!   one memfd): more than a client's fd limit lets it take.

#[path = "../lifetime.rs"]
mod lifetime;
#[path = "../peer_main.rs"]
mod peer_main;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use vfio_user_proto::{Header, HEADER_SIZE};

const CAPS: &str = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#;
const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const DEVICE_GET_INFO: u16 = 4;
const REGION_INFO: u16 = 5;
const REGION_READ: u16 = 9;
const DMA_READ: u16 = 11;
const DMA_WRITE: u16 = 12;

/// Reads exactly `buf.len()` bytes, keeping every fd that comes with them.
fn read_exact(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Option<()> {
    let mut at = 0;
    while at < buf.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; 253]);
        let mut iov = [IoSliceMut::new(&mut buf[at..])];
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        if msg.bytes == 0 {
            return None;
        }
        at += msg.bytes;
        for c in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds for us; nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
    }
    Some(())
}

/// One message: its header, payload and fds.
fn read_msg(s: &UnixStream) -> Option<(Header, Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let mut raw = [0u8; HEADER_SIZE];
    read_exact(s, &mut raw, &mut fds)?;
    let h = Header::decode(&raw);
    let mut payload = vec![0u8; h.payload_len()];
    read_exact(s, &mut payload, &mut fds)?;
    Some((h, payload, fds))
}

fn send(s: &UnixStream, h: Header, payload: &[u8], fds: &[RawFd]) {
    let head = h.encode();
    let iov = [IoSlice::new(&head), IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let _ = sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None);
}

fn reply(s: &UnixStream, to: &Header, payload: &[u8], fds: &[RawFd]) {
    send(s, Header::reply_to(to, payload.len()), payload, fds);
}

fn u32s(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// A memfd of `len` bytes, sealed against shrinking and growing when `sealed`.
fn memfd(len: u64, sealed: bool) -> OwnedFd {
    let fd = memfd_create(
        c"hostile",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .expect("memfd_create");
    nix::unistd::ftruncate(&fd, len as i64).expect("ftruncate");
    if sealed {
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).expect("seal");
    }
    fd
}

/// A DMA_READ or DMA_WRITE request's payload: address, count, then the data written.
fn dma_access(address: u64, data: &[u8], count: u64) -> Vec<u8> {
    let mut p = address.to_ne_bytes().to_vec();
    p.extend_from_slice(&count.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

fn shrink_dma(s: &UnixStream) {
    let (mut iova, mut truncated) = (0u64, 0u32);
    let mut id = 1000u16;
    while let Some((h, p, fds)) = read_msg(s) {
        match h.command {
            DMA_MAP => {
                iova = p
                    .get(16..24)
                    .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])));
                reply(s, &h, &[], &[]);
                for fd in &fds {
                    truncated = match nix::unistd::ftruncate(fd, 0) {
                        Ok(()) => 0,
                        Err(e) => e as u32,
                    };
                }
            }
            DMA_UNMAP => reply(s, &h, &p[..p.len().min(24)], &[]),
            REGION_READ => {
                let count = p
                    .get(12..16)
                    .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap_or([0; 4])));
                let mut data = p[..p.len().min(16)].to_vec();
                data.resize(16 + count as usize, b'x');
                reply(s, &h, &data, &[]);
            }
            _ => {
                id = id.wrapping_add(2);
                let write = dma_access(iova, b"vfio", 4);
                send(
                    s,
                    Header::command(id, DMA_WRITE, write.len(), false),
                    &write,
                    &[],
                );
                let Some((w, _, _)) = read_msg(s) else { return };
                let read = dma_access(iova, &[], 4);
                send(
                    s,
                    Header::command(id + 1, DMA_READ, read.len(), false),
                    &read,
                    &[],
                );
                let Some((r, data, _)) = read_msg(s) else {
                    return;
                };
                let mut out = u32s(&[truncated, w.error, r.error]);
                out.extend_from_slice(data.get(16..20).unwrap_or(&[0; 4]));
                reply(s, &h, &out, &[]);
            }
        }
    }
}

fn regions(s: &UnixStream) {
    let big = memfd(8 << 30, true);
    let _ = nix::sys::uio::pwrite(&big, &[0x5a], (1 << 32) + 5);
    let fds = [memfd(0, false), memfd(4096, false), big, memfd(4096, true)];
    while let Some((h, p, _)) = read_msg(s) {
        match h.command {
            DEVICE_GET_INFO => reply(s, &h, &u32s(&[16, 0, 4, 0]), &[]),
            REGION_INFO => {
                let index = p
                    .get(8..12)
                    .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap_or([0; 4])));
                let Some(fd) = fds.get(index as usize) else {
                    send(s, Header::error_reply_to(&h, 22), &[], &[]);
                    continue;
                };
                let size: u64 = if index == 2 { 8 << 30 } else { 4096 };
                // argsz, flags READ | WRITE | MMAP, index, cap_offset, size, offset.
                let mut info = u32s(&[32, 1 | 2 | 4, index, 0]);
                info.extend_from_slice(&size.to_ne_bytes());
                info.extend_from_slice(&0u64.to_ne_bytes());
                reply(s, &h, &info, &[fd.as_raw_fd()]);
            }
            _ => reply(s, &h, &u32s(&[16, 0, 4, 0]), &[]),
        }
    }
}

fn many_fds(s: &UnixStream, n: usize) {
    let one = memfd(4096, true);
    let raw = vec![one.as_raw_fd(); n];
    while let Some((h, _, _)) = read_msg(s) {
        reply(s, &h, &u32s(&[16, 0, 4, 0]), &raw);
    }
}

fn run(s: &UnixStream, scenario: &str) {
    let Some((h, _, _)) = read_msg(s) else { return };
    if h.command != VERSION {
        return;
    }
    let mut v = u32s(&[]);
    v.extend_from_slice(&0u16.to_ne_bytes());
    v.extend_from_slice(&0u16.to_ne_bytes());
    v.extend_from_slice(CAPS.as_bytes());
    v.push(0);
    reply(s, &h, &v, &[]);
    match scenario.split_once(':') {
        None if scenario == "shrink-dma" => shrink_dma(s),
        None if scenario == "regions" => regions(s),
        Some((_, n)) => many_fds(s, n.parse().unwrap_or(253)),
        None => {}
    }
}

/// Whether this peer plays `scenario`.
fn known(scenario: &str) -> bool {
    match scenario.split_once(':') {
        None => matches!(scenario, "shrink-dma" | "regions"),
        Some((kind, n)) => kind == "fds" && n.parse::<usize>().is_ok_and(|n| n > 0),
    }
}

fn main() {
    peer_main::serve("vfio-user-hostile-peer", known, |s, scenario| {
        run(&s, scenario)
    });
}
