//! DMA_MAP / DMA_UNMAP and serving the server's DMA_READ / DMA_WRITE, against a scripted
//! peer (rust-vmm's server never sends DMA requests).

mod common;

use common::*;
use nix::errno::Errno;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vfio_user_client::proto::Header;
use vfio_user_client::{Client, DmaMap, DmaMemory};

const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const DMA_READ: u16 = 11;
const DMA_WRITE: u16 = 12;
const CAPS: &str = r#"{"capabilities":{"max_msg_fds":8,"max_dma_maps":3,"pgsizes":4096}}"#;

fn client() -> (Client, Peer) {
    negotiated_with_caps(CAPS)
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(p[at..at + 8].try_into().unwrap())
}

/// Maps `memory` at `iova` (both directions unless `read_only`), answering on the peer;
/// returns the fd the peer received.
fn map(
    client: &Client,
    peer: &mut Peer,
    memory: &Arc<DmaMemory>,
    iova: u64,
    read_only: bool,
) -> File {
    let size = memory.len() as u64;
    let t = std::thread::scope(|s| {
        let h = s.spawn(|| {
            memory
                .with_fd(|fd| {
                    client.dma_map(&DmaMap {
                        iova,
                        size,
                        read: true,
                        write: !read_only,
                        fd: Some((fd, 0)),
                        local: Some(memory.clone()),
                        timeout: None,
                    })
                })
                .unwrap()
        });
        let msg = peer.read_msg();
        assert_eq!(msg.header.command, DMA_MAP);
        assert_eq!(
            (u64_at(&msg.payload, 16), u64_at(&msg.payload, 24)),
            (iova, size)
        );
        let flags = u32::from_ne_bytes(msg.payload[4..8].try_into().unwrap());
        assert_eq!(flags, if read_only { 1 } else { 3 });
        peer.reply(&msg.header, &[]);
        h.join().unwrap().expect("mapped");
        msg
    });
    assert_eq!(t.fds.len(), 1, "one fd with the map");
    File::from(t.fds.into_iter().next().unwrap())
}

fn dma(peer: &mut Peer, id: u16, command: u16, address: u64, count: u64, data: &[u8]) -> Msg {
    let mut p = address.to_ne_bytes().to_vec();
    p.extend_from_slice(&count.to_ne_bytes());
    p.extend_from_slice(data);
    peer.write(&message(Header::command(id, command, p.len(), false), &p));
    peer.read_msg()
}

#[test]
fn the_server_reads_and_writes_mapped_memory_through_dma_requests() {
    let (client, mut peer) = client();
    let memory = Arc::new(DmaMemory::allocate(8192).unwrap());
    let fd = map(&client, &mut peer, &memory, 0x10000, false);
    assert_eq!(client.dma_maps(), 1);

    let w = dma(&mut peer, 1, DMA_WRITE, 0x10008, 4, &[1, 2, 3, 4]);
    assert!(!w.header.is_error(), "{:?}", w.header);
    assert_eq!(
        (
            u64_at(&w.payload, 0),
            u64_at(&w.payload, 8),
            w.payload.len()
        ),
        (0x10008, 4, 16)
    );
    // The memory the server got an fd for holds what it wrote.
    let mut seen = [0u8; 4];
    fd.read_exact_at(&mut seen, 8).unwrap();
    assert_eq!(seen, [1, 2, 3, 4]);
    // And reading through the fd's pages comes back through DMA_READ.
    fd.write_all_at(&[9, 8, 7], 0x1ffd).unwrap();
    let r = dma(&mut peer, 2, DMA_READ, 0x11ffd, 3, &[]);
    assert_eq!(
        &r.payload[..16],
        &[&0x11ffdu64.to_ne_bytes()[..], &3u64.to_ne_bytes()[..]].concat()[..]
    );
    assert_eq!(&r.payload[16..], &[9, 8, 7]);
}

#[test]
fn dma_outside_any_map_or_against_its_permissions_is_refused() {
    let (client, mut peer) = client();
    let memory = Arc::new(DmaMemory::allocate(4096).unwrap());
    let _fd = map(&client, &mut peer, &memory, 0x4000, true);
    for (id, command, addr, count, errno) in [
        (1, DMA_READ, 0x3000, 4, Errno::EFAULT),
        (2, DMA_READ, 0x4ffe, 4, Errno::EFAULT),
        (3, DMA_READ, 0x5000, 1, Errno::EFAULT),
        (4, DMA_WRITE, 0x4000, 2, Errno::EACCES),
        (5, DMA_READ, u64::MAX - 1, 4, Errno::EINVAL),
    ] {
        let data = if command == DMA_WRITE {
            vec![0u8; count as usize]
        } else {
            Vec::new()
        };
        let m = dma(&mut peer, id, command, addr, count, &data);
        assert!(m.header.is_error(), "{id}: {:?}", m.header);
        assert_eq!(m.header.error, errno as u32, "{id}");
    }
    // Reads of the read-only map are served.
    assert!(!dma(&mut peer, 6, DMA_READ, 0x4000, 16, &[])
        .header
        .is_error());
}

#[test]
fn bad_maps_are_refused_before_anything_is_sent() {
    let (client, mut peer) = client();
    let memory = Arc::new(DmaMemory::allocate(4096).unwrap());
    let _a = map(&client, &mut peer, &memory, 0x1000, false);
    let fd = memory
        .with_fd(|fd| fd.try_clone_to_owned())
        .unwrap()
        .unwrap();
    let base = || DmaMap {
        iova: 0x8000,
        size: 4096,
        read: true,
        write: true,
        fd: Some((fd.as_fd(), 0)),
        local: Some(memory.clone()),
        timeout: None,
    };
    let code = |m: DmaMap<'_>| client.dma_map(&m).unwrap_err().errno;
    assert_eq!(
        code(DmaMap {
            iova: 0x8001,
            ..base()
        }),
        Errno::EINVAL,
        "unaligned iova"
    );
    assert_eq!(
        code(DmaMap {
            size: 100,
            ..base()
        }),
        Errno::EINVAL,
        "unaligned size"
    );
    assert_eq!(code(DmaMap { size: 0, ..base() }), Errno::EINVAL, "empty");
    assert_eq!(
        code(DmaMap {
            size: 8192,
            ..base()
        }),
        Errno::EINVAL,
        "memory smaller than the map"
    );
    assert_eq!(
        code(DmaMap {
            iova: 0,
            size: 8192,
            local: None,
            ..base()
        }),
        Errno::EEXIST,
        "overlap"
    );
    assert_eq!(
        code(DmaMap {
            fd: None,
            local: None,
            ..base()
        }),
        Errno::EINVAL,
        "no memory"
    );
    assert_eq!(
        code(DmaMap {
            iova: u64::MAX - 4095,
            ..base()
        }),
        Errno::EINVAL,
        "wraps"
    );
    let _b = map(&client, &mut peer, &memory, 0x2000, false);
    let _c = map(&client, &mut peer, &memory, 0x3000, false);
    assert_eq!(code(base()), Errno::ENOSPC, "max_dma_maps");
    assert_eq!(
        client.dma_unmap(0x1000, 8192, None).unwrap_err().errno,
        Errno::EINVAL,
        "not exact"
    );
    // Nothing of the above reached the peer: the next message is this one.
    let t = std::thread::scope(|s| {
        let h = s.spawn(|| client.dma_unmap(0x2000, 4096, None));
        let m = peer.read_msg();
        assert_eq!(m.header.command, DMA_UNMAP);
        assert_eq!(
            (u64_at(&m.payload, 8), u64_at(&m.payload, 16)),
            (0x2000, 4096)
        );
        // The spec's server echoes the request.
        peer.reply(&m.header, &m.payload);
        h.join().unwrap()
    });
    t.expect("unmapped");
    assert_eq!(client.dma_maps(), 2);
    assert_eq!(
        dma(&mut peer, 9, DMA_READ, 0x2000, 4, &[]).header.error,
        Errno::EFAULT as u32
    );
}

#[test]
fn a_refused_map_is_forgotten_and_unmap_all_forgets_everything() {
    let (client, mut peer) = client();
    let memory = Arc::new(DmaMemory::allocate(4096).unwrap());
    let fd = memory
        .with_fd(|fd| fd.try_clone_to_owned())
        .unwrap()
        .unwrap();
    let m = DmaMap {
        iova: 0x1000,
        size: 4096,
        read: true,
        write: true,
        fd: Some((fd.as_fd(), 0)),
        local: Some(memory.clone()),
        timeout: None,
    };
    let refused = std::thread::scope(|s| {
        let h = s.spawn(|| client.dma_map(&m));
        let msg = peer.read_msg();
        peer.error_reply(&msg.header, Errno::ENOMEM as u32);
        h.join().unwrap()
    });
    assert_eq!(refused.unwrap_err().errno, Errno::ENOMEM);
    assert_eq!(client.dma_maps(), 0);
    let _fd = map(&client, &mut peer, &memory, 0x1000, false);
    let (tx, rx) = std::sync::mpsc::channel();
    client
        .dma_unmap_all_callback(None, Box::new(move |r| tx.send(r.is_ok()).unwrap()))
        .unwrap();
    let msg = peer.read_msg();
    assert_eq!(
        u32::from_ne_bytes(msg.payload[4..8].try_into().unwrap()),
        2,
        "the ALL flag"
    );
    peer.reply(&msg.header, &msg.payload);
    assert!(rx.recv().unwrap());
    assert_eq!(client.dma_maps(), 0);
}
