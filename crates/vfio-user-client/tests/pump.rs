//! The state pump: MIG_DATA_READ replies from one connection sent on as MIG_DATA_WRITE
//! requests on another, in order, with writes pipelined, stopping at the end of the stream, a
//! limit, or the first failure; the peers here are scripted.

mod common;

use common::*;
use std::sync::mpsc;
use vfio_user_client::proto::migration::MIG_DATA_HEADER;
use vfio_user_client::{Client, Error, Options, Pumped, WRITES_IN_FLIGHT};

const MIG_DATA_READ: u16 = 17;
/// How long a step may take before the test calls the pump stuck.
const WATCHDOG: std::time::Duration = std::time::Duration::from_secs(20);
const MIG_DATA_WRITE: u16 = 18;

/// A MIG_DATA_READ reply payload carrying `data` (argsz, size, data).
fn read_reply(data: &[u8]) -> Vec<u8> {
    let mut p = ((MIG_DATA_HEADER + data.len()) as u32)
        .to_ne_bytes()
        .to_vec();
    p.extend_from_slice(&(data.len() as u32).to_ne_bytes());
    p.extend_from_slice(data);
    p
}

/// True when nothing more has been written to `peer` (a peek finds nothing).
fn nothing_more(peer: &Peer) -> bool {
    let mut probe = [0u8; 1];
    let r = nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(&peer.s),
        &mut probe,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    );
    r == Err(nix::errno::Errno::EAGAIN)
}

/// Chunk `i` of a stream: `len` bytes, each `i` plus its position.
fn chunk(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i + k) as u8).collect()
}

fn pump(
    source: &Client,
    dest: &Client,
    chunk: u32,
    limit: u64,
) -> mpsc::Receiver<Result<Pumped, Error>> {
    let (tx, rx) = mpsc::channel();
    source
        .pump_state_to(
            dest,
            chunk,
            limit,
            None,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
    rx
}

#[test]
fn a_stream_moves_in_order_with_writes_pipelined_and_ends_on_a_short_read() {
    let (source, mut src) = negotiated(Options::default());
    let (dest, mut dst) = negotiated(Options::default());
    let done = pump(&source, &dest, 1000, u64::MAX);
    let reads = std::thread::spawn(move || {
        // 9 full chunks, then 300 bytes: the end.
        for i in 0..10 {
            let m = src.read_msg();
            assert_eq!(m.header.command, MIG_DATA_READ);
            assert_eq!(m.payload[4..8], 1000u32.to_ne_bytes());
            src.reply(
                &m.header,
                &read_reply(&chunk(i, if i < 9 { 1000 } else { 300 })),
            );
        }
        src
    });
    // The destination acknowledges nothing until four writes have arrived: a pump that kept
    // fewer in flight would wait here (and the watchdog fail the test); one that kept more
    // would have sent a fifth by then.
    dst.s.set_read_timeout(Some(WATCHDOG)).unwrap();
    let mut held = Vec::new();
    for i in 0..10 {
        let m = dst.try_read_msg().expect("a write never came");
        assert_eq!(m.header.command, MIG_DATA_WRITE);
        let len = if i < 9 { 1000 } else { 300 };
        assert_eq!(m.payload, read_reply(&chunk(i, len)), "write {i}");
        held.push(m.header);
        if held.len() == WRITES_IN_FLIGHT || i == 9 {
            if i < 9 {
                assert!(nothing_more(&dst), "a fifth write was in flight");
            }
            for h in held.drain(..) {
                dst.reply(&h, &[]);
            }
        }
    }
    let moved = done
        .recv_timeout(WATCHDOG)
        .expect("the pump never finished");
    assert_eq!(
        moved.unwrap(),
        Pumped {
            bytes: 9300,
            ended: true
        }
    );
    let _src = reads.join().unwrap();
}

#[test]
fn a_limit_stops_after_the_chunk_that_reaches_it() {
    let (source, mut src) = negotiated(Options::default());
    let (dest, mut dst) = negotiated(Options::default());
    let done = pump(&source, &dest, 1000, 2500);
    for i in 0..3 {
        let m = src.read_msg();
        src.reply(&m.header, &read_reply(&chunk(i, 1000)));
        let w = dst.read_msg();
        dst.reply(&w.header, &[]);
    }
    assert_eq!(
        done.recv_timeout(WATCHDOG)
            .expect("the pump never finished")
            .unwrap(),
        Pumped {
            bytes: 3000,
            ended: false
        }
    );
}

#[test]
fn a_refused_write_fails_the_pump_once_nothing_is_in_flight() {
    let (source, mut src) = negotiated(Options::default());
    let (dest, mut dst) = negotiated(Options::default());
    let done = pump(&source, &dest, 100, u64::MAX);
    // The destination refuses the first write and acknowledges anything after it.
    let writes = std::thread::spawn(move || {
        let mut n = 0;
        while let Some(w) = dst.try_read_msg() {
            if n == 0 {
                dst.error_reply(&w.header, 22);
            } else {
                dst.reply(&w.header, &[]);
            }
            n += 1;
        }
        n
    });
    // The source answers every read with a full chunk, for ever: only the refusal stops the
    // pump. Until it lands, up to four writes and one read may be in flight.
    let reads = std::thread::spawn(move || {
        let mut n = 0;
        while let Some(m) = src.try_read_msg() {
            src.reply(&m.header, &read_reply(&chunk(n, 100)));
            n += 1;
        }
        n
    });
    let e = done
        .recv_timeout(WATCHDOG)
        .expect("the pump went on after the refusal")
        .unwrap_err();
    assert_eq!(e.errno, nix::errno::Errno::EINVAL);
    drop(source);
    drop(dest);
    assert!(reads.join().unwrap() <= WRITES_IN_FLIGHT + 1);
    assert!(writes.join().unwrap() <= WRITES_IN_FLIGHT);
}

#[test]
fn a_reply_with_more_than_asked_is_eproto_and_nothing_is_written() {
    let (source, mut src) = negotiated(Options::default());
    let (dest, dst) = negotiated(Options::default());
    let done = pump(&source, &dest, 100, u64::MAX);
    let m = src.read_msg();
    src.reply(&m.header, &read_reply(&chunk(0, 101)));
    let e = done
        .recv_timeout(WATCHDOG)
        .expect("the pump never finished")
        .unwrap_err();
    assert_eq!(e.errno, nix::errno::Errno::EPROTO);
    assert_eq!(e.command, Some(MIG_DATA_READ));
    drop(dest);
    let mut dst = dst;
    assert!(dst.try_read_msg().is_none(), "a write went out");
}
