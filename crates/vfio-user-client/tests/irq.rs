//! Interrupts: eventfds made by the client, wired in chunks of the server's max_msg_fds,
//! watched by the I/O thread, coalesced, and unwired by disable.

mod common;

use common::*;
use std::sync::mpsc;
use std::time::Duration;
use vfio_user_client::Client;

const SET_IRQS: u16 = 8;
const CAPS: &str = r#"{"capabilities":{"max_msg_fds":2}}"#;

fn client() -> (Client, Peer) {
    negotiated_with_caps(CAPS)
}

fn words(p: &[u8]) -> Vec<u32> {
    p.chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn vectors_are_wired_in_chunks_and_their_signals_reach_the_hook_coalesced() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let (client, mut peer) = client();
    let (irq_tx, irqs) = mpsc::channel();
    client.on_irq(Box::new(move |group, vector, count| {
        let _ = irq_tx.send((group, vector, count));
    }));
    let (tx, done) = mpsc::channel();
    let enabled = client
        .enable_irqs(
            1,
            4,
            3,
            None,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
        .unwrap();
    assert_eq!(enabled.fds.len(), 3);
    // Two messages: vectors 4-5 with two fds, vector 6 with one.
    let first = peer.read_msg();
    let second = peer.read_msg();
    for (m, start, count) in [(&first, 4, 2), (&second, 6, 1)] {
        assert_eq!(m.header.command, SET_IRQS);
        assert_eq!(words(&m.payload), vec![20, 0x24, 1, start, count]);
        assert_eq!(m.fds.len(), count as usize);
    }
    peer.reply(&first.header, &[]);
    peer.reply(&second.header, &[]);
    assert!(done.recv_timeout(Duration::from_secs(10)).unwrap());

    // The device signals vector 5 three times: the hook sees 3 in all.
    for _ in 0..3 {
        nix::unistd::write(&first.fds[1], &1u64.to_ne_bytes()).unwrap();
    }
    let mut total = 0;
    while total < 3 {
        let (group, vector, count) = irqs.recv_timeout(Duration::from_secs(10)).expect("an irq");
        assert_eq!((group, vector), (enabled.group, 5));
        total += count;
    }
    assert_eq!(total, 3);

    // Disabled: unwired with no fds, and our eventfds closed at once.
    let (tx, done) = mpsc::channel();
    client
        .disable_irqs(
            enabled.group,
            None,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
        .unwrap();
    let m = peer.read_msg();
    assert_eq!(words(&m.payload), vec![20, 0x24, 1, 4, 3]);
    assert!(m.fds.is_empty());
    peer.reply(&m.header, &[]);
    assert!(done.recv_timeout(Duration::from_secs(10)).unwrap());
    assert!(
        nix::sys::stat::fstat(borrow_number(enabled.fds[0])).is_err(),
        "the eventfd is still open"
    );
    assert!(client
        .disable_irqs(enabled.group, None, Box::new(|_| {}))
        .is_err());
}

/// Tests here run one at a time, so an fd number one of them closed is not reused meanwhile.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The raw number, to ask the kernel whether it still names an open file.
fn borrow_number(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for fstat, which fails with EBADF if `fd` was closed; tests hold
    // ALONE, so the number is not reused meanwhile.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

#[test]
fn a_refused_wiring_settles_once_with_the_servers_error() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let (client, mut peer) = client();
    let (tx, done) = mpsc::channel();
    let enabled = client
        .enable_irqs(
            0,
            0,
            3,
            None,
            Box::new(move |r| tx.send(r.map(|_| ())).unwrap()),
        )
        .unwrap();
    let a = peer.read_msg();
    let b = peer.read_msg();
    peer.error_reply(&a.header, nix::errno::Errno::EINVAL as u32);
    peer.reply(&b.header, &[]);
    let r = done.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(r.unwrap_err().errno, nix::errno::Errno::EINVAL);
    assert!(done.try_recv().is_err());
    assert!(client
        .disable_irqs(enabled.group, None, Box::new(|_| {}))
        .is_ok());
}
