//! `vfio-user-bench-dma-floor SOCKET ROUNDS [MAPS]`: the ceiling of DMA maps for
//! `npm run bench`, the least a client can do to map memory: each round writes MAPS (default
//! 256) DMA_MAP requests, one sendmsg each carrying a memfd with SCM_RIGHTS (a message's fd
//! travels with its bytes), all in flight before the first reply is read, then reads the
//! MAPS replies. Only that is timed; each round then unmaps them (untimed), also pipelined.
//! No checks beyond counting replies, no queues, no threads.
//!
//! Prints `{"maps":N,"seconds":S,"userUs":U,"sysUs":Y}`: the maps timed, their time, and the
//! CPU of this process per map (getrusage), for the timed part only.

use nix::sys::memfd::{memfd_create, MFdFlags};
#[path = "../rusage.rs"]
mod rusage;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use rusage::cpu_us;
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vfio_user_proto::dma::{dma_map_request, dma_unmap_request, DMA_FLAG_READ, DMA_FLAG_WRITE};
use vfio_user_proto::version::{encode_version_request, VersionProposal};
use vfio_user_proto::{Capabilities, Header, HEADER_SIZE};

const PAGE: u64 = 4096;
/// Where the maps start, as the bench's own `dmaMapMany` places them.
const BASE: u64 = 1 << 32;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;

/// Reads one whole message (header and body) and returns its header.
fn message(s: &mut UnixStream) -> std::io::Result<Header> {
    let mut head = [0u8; HEADER_SIZE];
    s.read_exact(&mut head)?;
    let h = Header::decode(&head);
    let mut body = vec![0u8; h.payload_len()];
    s.read_exact(&mut body)?;
    Ok(h)
}

/// Reads `n` replies; fails on an error reply, so a refused map cannot pass for a fast one.
fn replies(s: &mut UnixStream, n: u32) -> std::io::Result<()> {
    for _ in 0..n {
        let h = message(s)?;
        if h.error != 0 {
            return Err(std::io::Error::other(format!(
                "the device refused a request: errno {}",
                h.error
            )));
        }
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(rounds)) = (args.get(1), args.get(2).and_then(|c| c.parse().ok())) else {
        eprintln!("usage: vfio-user-bench-dma-floor SOCKET ROUNDS [MAPS]");
        std::process::exit(2);
    };
    let rounds: u32 = rounds;
    let maps: u32 = args.get(3).and_then(|d| d.parse().ok()).unwrap_or(256);
    let memory = memfd_create("bench-dma", MFdFlags::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&memory, i64::from(maps) * PAGE as i64)?;
    let mut s = UnixStream::connect(path)?;
    let proposal = VersionProposal {
        major: 0,
        minor: 0,
        capabilities: Capabilities::default(),
    };
    s.write_all(&encode_version_request(0, &proposal))?;
    message(&mut s)?;
    let fds = [memory.as_raw_fd()];
    let (mut timed, mut user, mut sys) = (Duration::ZERO, 0.0, 0.0);
    let mut id = 1u16;
    for _ in 0..rounds {
        let (u0, s0) = cpu_us();
        let start = Instant::now();
        for i in 0..maps {
            let at = u64::from(i) * PAGE;
            let body = dma_map_request(DMA_FLAG_READ | DMA_FLAG_WRITE, at, BASE + at, PAGE);
            let head = Header::command(id, DMA_MAP, body.len(), false).encode();
            id = id.wrapping_add(1);
            let iov = [IoSlice::new(&head), IoSlice::new(&body)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let sent = sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
            if sent != head.len() + body.len() {
                return Err(std::io::Error::other("a DMA_MAP went out in part"));
            }
        }
        replies(&mut s, maps)?;
        timed += start.elapsed();
        let (u1, s1) = cpu_us();
        (user, sys) = (user + u1 - u0, sys + s1 - s0);
        let mut unmaps = Vec::new();
        for i in 0..maps {
            let body = dma_unmap_request(0, BASE + u64::from(i) * PAGE, PAGE);
            unmaps.extend_from_slice(&Header::command(id, DMA_UNMAP, body.len(), false).encode());
            unmaps.extend_from_slice(&body);
            id = id.wrapping_add(1);
        }
        s.write_all(&unmaps)?;
        replies(&mut s, maps)?;
    }
    let n = f64::from(rounds * maps);
    println!(
        "{{\"maps\":{},\"seconds\":{},\"userUs\":{},\"sysUs\":{}}}",
        rounds * maps,
        timed.as_secs_f64(),
        user / n,
        sys / n
    );
    Ok(())
}
