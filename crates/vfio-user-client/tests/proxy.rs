//! The transport against a scripted peer over a socketpair.

mod common;

use common::*;
use nix::sys::socket::{setsockopt, sockopt};
use std::os::fd::AsFd;
use std::time::Duration;
use vfio_user_client::proto::{Header, FLAG_NO_REPLY};
use vfio_user_client::{Client, Options, Request};

const GET_INFO: u16 = 4;
const REGION_WRITE: u16 = 10;
const DMA_READ: u16 = 11;

fn info_req() -> [u8; 16] {
    get_info()
}

fn ok_info(peer: &mut Peer, m: &Msg) {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(&16u32.to_ne_bytes());
    p[8..12].copy_from_slice(&9u32.to_ne_bytes());
    peer.reply(&m.header, &p);
}

/// Sends one GET_INFO.
fn info(client: &Client) -> vfio_user_client::Ticket {
    client
        .send_nowait(Request::new(GET_INFO, &info_req()))
        .unwrap()
}

/// Sends one GET_INFO with its own timeout.
fn info_within(client: &Client, timeout: Duration) -> vfio_user_client::Ticket {
    client
        .send_nowait(Request {
            timeout: Some(timeout),
            ..Request::new(GET_INFO, &info_req())
        })
        .unwrap()
}

/// Sends one GET_INFO whose result goes to `done` (on whichever thread reads the reply).
fn info_then(
    client: &Client,
    timeout: Option<Duration>,
    done: impl FnOnce(Result<vfio_user_client::Reply, vfio_user_client::Error>) + Send + 'static,
) {
    client
        .send_callback(
            Request {
                timeout,
                ..Request::new(GET_INFO, &info_req())
            },
            Box::new(done),
        )
        .unwrap();
}

/// Sends one GET_INFO and answers it: proves the stream is still in sync.
fn round_trip(client: &Client, peer: &mut Peer) {
    let t = info(client);
    let m = peer.read_msg();
    assert_eq!(m.header.command, GET_INFO);
    ok_info(peer, &m);
    let r = t.wait().unwrap();
    assert_eq!(r.payload.len(), 16);
}

#[test]
fn refuses_requests_before_version_and_sends_nothing() {
    let (client, mut peer) = pair(Options::default());
    let e = client
        .send_wait(Request::new(GET_INFO, &info_req()))
        .unwrap_err();
    assert_eq!(e.code(), "ENOTCONN");
    assert!(e.message.contains("version negotiation"));
    let t = std::thread::spawn(move || {
        // The first thing on the wire is VERSION: the refused request never went out.
        peer.accept_version(RUST_VMM_CAPS);
        peer
    });
    let v = client.negotiate().unwrap();
    assert_eq!(v.capabilities.max_msg_fds, 8);
    let mut peer = t.join().unwrap();
    round_trip(&client, &mut peer);
    assert_eq!(client.negotiate().unwrap_err().code(), "EALREADY");
}

#[test]
fn version_reply_is_validated() {
    for (payload, want) in [
        (version_payload(1, 0, "{}"), "major version 1"),
        (version_payload(0, 3, "{}"), "minor version 3"),
        (b"\0\0\0\0{}".to_vec(), "not NUL-terminated"),
        (vec![0, 0], "shorter than the 20"),
        (version_payload(0, 0, "[1]"), "must be an object"),
    ] {
        let (client, mut peer) = pair(Options::default());
        let t = std::thread::spawn(move || {
            let m = peer.read_msg();
            peer.reply(&m.header, &payload);
            peer
        });
        let e = client.negotiate().unwrap_err();
        assert_eq!(e.code(), "EPROTO", "{e}");
        assert!(e.message.contains(want), "{e}");
        let _peer = t.join().unwrap();
        // Still refused: negotiation did not succeed.
        assert_eq!(
            client
                .send_wait(Request::new(GET_INFO, &info_req()))
                .unwrap_err()
                .code(),
            "ENOTCONN"
        );
    }
}

#[test]
fn version_error_reply_and_wrong_command() {
    let (client, mut peer) = pair(Options::default());
    let t = std::thread::spawn(move || {
        let m = peer.read_msg();
        peer.error_reply(&m.header, 95);
        peer
    });
    assert_eq!(client.negotiate().unwrap_err().code(), "EOPNOTSUPP");
    drop(t.join().unwrap());

    let (client, mut peer) = pair(Options::default());
    let t = std::thread::spawn(move || {
        let m = peer.read_msg();
        let mut h = Header::reply_to(&m.header, 4);
        h.command = 4;
        peer.write(&message(h, &[0, 0, 0, 0]));
        peer
    });
    let e = client.negotiate().unwrap_err();
    assert_eq!(e.code(), "EPROTO");
    assert!(e.message.contains("carries command DEVICE_GET_INFO"), "{e}");
    drop(t.join().unwrap());
}

#[test]
fn big_message_goes_out_in_partial_writes_and_order_is_kept() {
    // A tiny SO_SNDBUF on the client's socket: 1 MiB needs many partial writes.
    let (client, mut peer) = pair_with_sndbuf(Options::default(), Some(4096));
    // Negotiate first, then shrink the buffers so 1 MiB needs many writes.
    let t = std::thread::spawn(move || {
        peer.accept_version(RUST_VMM_CAPS);
        peer
    });
    client.negotiate().unwrap();
    let mut peer = t.join().unwrap();
    // Shrinking the peer's receive buffer makes the client's sends would-block.
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();

    let mut big = vec![0u8; 16 + (1 << 20)];
    big[12..16].copy_from_slice(&(1u32 << 20).to_ne_bytes());
    for (i, b) in big[16..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let first = client
        .send_nowait(Request::new(REGION_WRITE, &big))
        .unwrap();
    let second = info(&client);
    let m1 = peer.read_msg();
    assert_eq!(m1.header.command, REGION_WRITE);
    assert_eq!(m1.payload, big, "payload arrived intact and in order");
    let m2 = peer.read_msg();
    assert_eq!(m2.header.command, GET_INFO, "queued request follows");
    peer.reply(&m1.header, &m1.payload[..16]);
    ok_info(&mut peer, &m2);
    first.wait().unwrap();
    second.wait().unwrap();
    let s = client.stats();
    assert!(s.partial_writes > 0, "{s:?}");
    assert!(s.queued_sends >= 2, "{s:?}");
    round_trip(&client, &mut peer);
}

#[test]
fn queue_keeps_submission_order_under_would_block() {
    let (client, mut peer) = negotiated(Options::default());
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    let mut tickets = Vec::new();
    let mut sizes = Vec::new();
    for i in 0..40usize {
        let n = if i % 3 == 0 { 200_000 } else { 16 };
        let mut p = vec![i as u8; n];
        p[..4].copy_from_slice(&(n as u32).to_ne_bytes());
        sizes.push(n);
        tickets.push(client.send_nowait(Request::new(GET_INFO, &p)).unwrap());
    }
    let mut ids = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let m = peer.read_msg();
        assert_eq!(m.payload.len(), *n, "message {i} in order");
        assert_eq!(m.payload[4], i as u8);
        ids.push(m.header);
    }
    for h in &ids {
        peer.reply(h, &[16, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 5, 0, 0, 0]);
    }
    for t in tickets {
        t.wait().unwrap();
    }
}

#[test]
fn send_queued_goes_through_the_io_thread() {
    let (client, mut peer) = negotiated(Options {
        send_queued: true,
        ..Options::default()
    });
    let before = client.stats();
    let tickets: Vec<_> = (0..10).map(|_| info(&client)).collect();
    for _ in 0..10 {
        let m = peer.read_msg();
        ok_info(&mut peer, &m);
    }
    for t in tickets {
        t.wait().unwrap();
    }
    let after = client.stats();
    assert_eq!(after.inline_sends, before.inline_sends, "nothing inline");
    assert_eq!(after.queued_sends - before.queued_sends, 10);
}

#[test]
fn timeout_then_late_reply_is_dropped_and_next_request_works() {
    let (client, mut peer) = negotiated(Options::default());
    let t = info_within(&client, Duration::from_millis(50));
    let late = peer.read_msg();
    let e = t.wait().unwrap_err();
    assert_eq!(e.code(), "ETIMEDOUT");
    assert_eq!(e.command, Some(GET_INFO));
    // The late reply arrives, big enough to need several reads, and must be drained whole.
    let mut p = vec![7u8; 100_000];
    p[0..4].copy_from_slice(&16u32.to_ne_bytes());
    let mut h = Header::reply_to(&late.header, 16);
    h.size = (16 + p.len()) as u32;
    peer.write(&message(h, &p));
    // A new request gets a different id and its own reply.
    let t2 = info(&client);
    let m = peer.read_msg();
    assert_ne!(m.header.id, late.header.id, "timed-out id is not reused");
    ok_info(&mut peer, &m);
    assert_eq!(t2.wait().unwrap().payload.len(), 16);
    assert!(client.stats().dropped_replies >= 1);
}

#[test]
fn timeout_of_a_queued_request_removes_it_from_the_queue() {
    let (client, mut peer) = negotiated(Options::default());
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    // A big message fills the socket; the small one behind it stays queued and times out.
    let mut big = vec![0u8; 1 << 20];
    big[0..4].copy_from_slice(&16u32.to_ne_bytes());
    let first = client.send_nowait(Request::new(GET_INFO, &big)).unwrap();
    let second = info_within(&client, Duration::from_millis(1));
    assert_eq!(second.wait().unwrap_err().code(), "ETIMEDOUT");
    let m = peer.read_msg();
    assert_eq!(m.payload.len(), 1 << 20);
    ok_info(&mut peer, &m);
    first.wait().unwrap();
    // The timed-out request was never written: the next message is a fresh one.
    round_trip(&client, &mut peer);
}

#[test]
fn eof_fails_every_pending_and_queued_request_at_once() {
    let (client, peer) = negotiated(Options {
        // If EOF did not fail them, they would wait this long and report ETIMEDOUT.
        timeout: Duration::from_secs(600),
        ..Options::default()
    });
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    let closed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let c2 = closed.clone();
    client.on_close(move |e| *c2.lock().unwrap() = Some(e.clone()));
    let mut tickets = vec![client
        .send_nowait(Request::new(GET_INFO, &vec![0u8; 1 << 20]))
        .unwrap()];
    for _ in 0..20 {
        tickets.push(info(&client));
    }
    drop(peer);
    for t in tickets {
        let e = t.wait().unwrap_err();
        assert_eq!(e.code(), "ECONNRESET", "{e}");
    }
    let e = client
        .send_wait(Request::new(GET_INFO, &info_req()))
        .unwrap_err();
    assert_eq!(e.code(), "ECONNRESET");
    client.close();
    let c = closed.lock().unwrap().clone().expect("close hook ran");
    assert_eq!(c.code(), "ECONNRESET");
}

#[test]
fn eof_in_the_middle_of_a_reply() {
    let (client, mut peer) = negotiated(Options::default());
    let t = info(&client);
    let m = peer.read_msg();
    let full = message(Header::reply_to(&m.header, 16), &[0; 16]);
    peer.write(&full[..20]);
    drop(peer);
    let e = t.wait().unwrap_err();
    assert_eq!(e.code(), "ECONNRESET");
    assert!(e.message.contains("middle of a message"), "{e}");
}

#[test]
fn close_fails_in_flight_with_econnaborted() {
    let (client, mut peer) = negotiated(Options::default());
    let t = info(&client);
    let _m = peer.read_msg();
    client.close();
    client.close();
    assert_eq!(t.wait().unwrap_err().code(), "ECONNABORTED");
}

#[test]
fn header_split_across_reads_is_reassembled() {
    let (client, mut peer) = negotiated(Options::default());
    let t = info(&client);
    let m = peer.read_msg();
    let mut p = [0u8; 16];
    p[8..12].copy_from_slice(&9u32.to_ne_bytes());
    for b in message(Header::reply_to(&m.header, 16), &p) {
        peer.write(&[b]);
    }
    assert_eq!(t.wait().unwrap().payload, p);
}

#[test]
fn malformed_replies_fail_only_their_request() {
    let (client, mut peer) = negotiated(Options::default());
    // Wrong command.
    let t = info(&client);
    let m = peer.read_msg();
    let mut h = Header::reply_to(&m.header, 16);
    h.command = 5;
    peer.write(&message(h, &[0; 16]));
    assert!(t.wait().unwrap_err().message.contains("carries command"));
    round_trip(&client, &mut peer);
    // Bigger than the request's argsz allows.
    let t = info(&client);
    let m = peer.read_msg();
    peer.reply(&m.header, &[0; 4096]);
    let e = t.wait().unwrap_err();
    assert_eq!(e.code(), "EPROTO");
    assert!(e.message.contains("more than"), "{e}");
    round_trip(&client, &mut peer);
    // No_reply on a reply.
    let t = info(&client);
    let m = peer.read_msg();
    let mut h = Header::reply_to(&m.header, 0);
    h.flags |= FLAG_NO_REPLY;
    peer.write(&h.encode());
    assert!(t.wait().unwrap_err().message.contains("No_reply"));
    round_trip(&client, &mut peer);
    // Error reply with errno 0, and one carrying a payload.
    let t = info(&client);
    let m = peer.read_msg();
    peer.error_reply(&m.header, 0);
    assert_eq!(t.wait().unwrap_err().code(), "EIO");
    let t = info(&client);
    let m = peer.read_msg();
    let mut h = Header::error_reply_to(&m.header, 2);
    h.size = 16 + 8;
    peer.write(&message(h, &[1; 8]));
    assert_eq!(t.wait().unwrap_err().code(), "ENOENT");
    round_trip(&client, &mut peer);
}

#[test]
fn unknown_and_duplicate_replies_are_dropped() {
    let (client, mut peer) = negotiated(Options::default());
    let t = info(&client);
    let m = peer.read_msg();
    let mut stray = Header::reply_to(&m.header, 16);
    stray.id = m.header.id.wrapping_add(1000);
    peer.write(&message(stray, &[0; 16]));
    ok_info(&mut peer, &m);
    ok_info(&mut peer, &m); // duplicate
    t.wait().unwrap();
    round_trip(&client, &mut peer);
    assert!(client.stats().dropped_replies >= 2);
}

#[test]
fn framing_violations_close_the_connection() {
    for (size, flags) in [(8u32, 1u32), (0, 1), (u32::MAX, 1), (16, 2), (16, 15)] {
        let (client, mut peer) = negotiated(Options::default());
        let t = info(&client);
        let m = peer.read_msg();
        let mut h = Header::reply_to(&m.header, 0);
        h.size = size;
        h.flags = flags;
        peer.write(&h.encode());
        let e = t.wait().unwrap_err();
        assert_eq!(e.code(), "ECONNRESET", "size {size} flags {flags}");
        assert!(e.message.contains("protocol violation"), "{e}");
        assert!(client.is_closed());
    }
}

#[test]
fn server_requests_get_an_error_reply_and_the_stream_stays_in_sync() {
    let (client, mut peer) = negotiated(Options::default());
    // DMA_READ from the server while a request of ours is outstanding.
    let t = info(&client);
    let mine = peer.read_msg();
    let mut dma = [0u8; 16];
    dma[8..16].copy_from_slice(&64u64.to_ne_bytes());
    let req = Header::command(77, DMA_READ, 16, false);
    peer.write(&message(req, &dma));
    let r = peer.read_msg();
    assert_eq!((r.header.id, r.header.command), (77, DMA_READ));
    assert!(r.header.is_error());
    assert_eq!(r.header.error, nix::errno::Errno::EFAULT as u32);
    // With No_reply there is no answer; an unknown command gets one too.
    peer.write(&message(Header::command(78, DMA_READ, 16, true), &dma));
    peer.write(&message(Header::command(79, 200, 3, false), &[1, 2, 3]));
    let r = peer.read_msg();
    assert_eq!(r.header.id, 79, "the No_reply request was not answered");
    ok_info(&mut peer, &mine);
    t.wait().unwrap();
    round_trip(&client, &mut peer);
    assert_eq!(client.stats().server_requests, 3);
}

#[test]
fn ids_skip_those_in_flight_and_wrap() {
    let (client, mut peer) = negotiated(Options::default());
    // One request stays unanswered for the whole test.
    let stuck = info_within(&client, Duration::from_secs(600));
    let stuck_id = peer.read_msg().header.id;
    let mut seen_wrap = false;
    let mut last = stuck_id;
    for _ in 0..66_000 {
        let t = info(&client);
        let m = peer.read_msg();
        assert_ne!(m.header.id, stuck_id, "id in flight reused");
        if m.header.id < last {
            seen_wrap = true;
        }
        last = m.header.id;
        ok_info(&mut peer, &m);
        t.wait().unwrap();
    }
    assert!(seen_wrap, "ids wrapped around 65535");
    client.close();
    assert_eq!(stuck.wait().unwrap_err().code(), "ECONNABORTED");
}

#[test]
fn too_many_fds_for_the_server_is_refused_before_sending() {
    let (client, mut peer) = negotiated(Options::default());
    let files: Vec<_> = (0..9)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    let e = client
        .send_wait(Request {
            fds: &fds,
            ..Request::new(2, &[0; 32])
        })
        .unwrap_err();
    assert_eq!(e.code(), "EINVAL");
    assert!(e.message.contains("at most 8"), "{e}");
    round_trip(&client, &mut peer);
}

#[test]
fn send_callback_calls_back_once() {
    let (client, mut peer) = negotiated(Options::default());
    let (tx, rx) = std::sync::mpsc::channel();
    info_then(&client, None, move |r| {
        tx.send(r.map(|r| r.payload.len())).unwrap()
    });
    let m = peer.read_msg();
    ok_info(&mut peer, &m);
    assert_eq!(rx.recv().unwrap().unwrap(), 16);
    // The callback (and with it the only sender) is gone once called: the channel ends
    // after exactly one result, with no waiting on a clock.
    client.close();
    assert_eq!(rx.iter().count(), 0, "called exactly once");
}

#[test]
fn async_requests_time_out_on_the_io_thread() {
    let (client, mut peer) = negotiated(Options::default());
    let (tx, rx) = std::sync::mpsc::channel();
    // Idle first: the I/O thread is asleep with a far wakeup; a short deadline must wake it.
    // The other one's deadline is ten minutes away, so however slow the machine, only the
    // short one can fail before the close.
    for ms in [30u64, 600_000] {
        let tx = tx.clone();
        info_then(&client, Some(Duration::from_millis(ms)), move |r| {
            tx.send((ms, r.map(|_| ()))).unwrap()
        });
    }
    let a = peer.read_msg();
    let _b = peer.read_msg();
    let (ms, r) = rx.recv().unwrap();
    assert_eq!(ms, 30, "the short one fails first");
    assert_eq!(r.unwrap_err().code(), "ETIMEDOUT");
    ok_info(&mut peer, &a); // late: dropped
    client.close();
    let (ms, r) = rx.recv().unwrap();
    assert_eq!(ms, 600_000);
    assert_eq!(r.unwrap_err().code(), "ECONNABORTED");
}

#[test]
fn external_reader_reads_and_the_io_thread_backs_it_up() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::BorrowedFd;
    let (client, mut peer) = negotiated(Options::default());
    let reader = client.external_reader();
    // An event loop that reads whenever the socket is readable.
    let (tx, rx) = std::sync::mpsc::channel();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let fd = reader.fd();
    let looper = std::thread::spawn(move || {
        while !d2.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: the client outlives this thread (joined below).
            let mut fds = [PollFd::new(
                unsafe { BorrowedFd::borrow_raw(fd) },
                PollFlags::POLLIN,
            )];
            if poll(&mut fds, PollTimeout::from(5u16)).unwrap_or(0) > 0 && !reader.on_readable() {
                break;
            }
        }
        reader
    });
    for _ in 0..20 {
        let tx = tx.clone();
        info_then(&client, None, move |r| {
            tx.send(r.map(|r| r.payload.len())).unwrap()
        });
        let m = peer.read_msg();
        ok_info(&mut peer, &m);
        assert_eq!(rx.recv().unwrap().unwrap(), 16);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let reader = looper.join().unwrap();

    // The loop is now "busy" (never calls on_readable): a server request and a reply still
    // get through, read by the I/O thread after its grace period.
    let t = info(&client);
    let mine = peer.read_msg();
    let mut dma = [0u8; 16];
    dma[8..16].copy_from_slice(&8u64.to_ne_bytes());
    peer.write(&message(Header::command(3, DMA_READ, 16, false), &dma));
    assert!(peer.read_msg().header.is_error(), "server request answered");
    ok_info(&mut peer, &mine);
    assert_eq!(t.wait().unwrap().payload.len(), 16);
    let (tx2, rx2) = std::sync::mpsc::channel();
    info_then(&client, None, move |r| tx2.send(r.is_ok()).unwrap());
    let m = peer.read_msg();
    ok_info(&mut peer, &m);
    assert!(
        rx2.recv().unwrap(),
        "async reply delivered by the backup read"
    );
    drop(reader);
    round_trip(&client, &mut peer);
}

#[test]
fn posted_requests_carry_no_reply_and_wait_for_nothing() {
    let (client, mut peer) = negotiated(Options::default());
    let mut w = [0u8; 20];
    w[12..16].copy_from_slice(&4u32.to_ne_bytes());
    client.post(Request::new(REGION_WRITE, &w)).unwrap();
    let m = peer.read_msg();
    assert!(m.header.no_reply());
    assert_eq!(m.header.command, REGION_WRITE);
    round_trip(&client, &mut peer);
}

#[test]
fn close_hook_runs_once_whenever_it_is_registered() {
    for early in [true, false] {
        let (client, peer) = negotiated(Options::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let hook = move |e: &vfio_user_client::Error| tx.send(e.code()).unwrap();
        if early {
            client.on_close(hook);
            drop(peer);
        } else {
            drop(peer);
            // Possibly before, possibly after the I/O thread announced the end.
            client.on_close(hook);
        }
        let codes: Vec<String> = rx.iter().collect();
        assert_eq!(codes, vec!["ECONNRESET".to_string()], "early={early}");
    }
}

#[test]
fn early_error_reply_to_a_partly_written_request() {
    let (client, mut peer) = negotiated(Options::default());
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    let mut big = vec![0u8; 1 << 20];
    big[12..16].copy_from_slice(&((1u32 << 20) - 16).to_ne_bytes());
    let t = client
        .send_nowait(Request::new(REGION_WRITE, &big))
        .unwrap();
    // The server refuses after reading only the header, as rust-vmm does.
    let mut raw = [0u8; 16];
    std::io::Read::read_exact(&mut peer.s, &mut raw).unwrap();
    let h = Header::decode(&raw);
    peer.error_reply(&h, 22);
    assert_eq!(t.wait().unwrap_err().code(), "EINVAL");
    // The rest of the request still goes out whole, and the stream stays in sync.
    let mut rest = vec![0u8; h.payload_len()];
    std::io::Read::read_exact(&mut peer.s, &mut rest).unwrap();
    assert_eq!(rest, big);
    round_trip(&client, &mut peer);
}

#[test]
fn a_panicking_callback_does_not_stop_the_client() {
    let (client, mut peer) = negotiated(Options::default());
    info_then(&client, None, |_| {
        panic!("callback bug (expected in this test)")
    });
    let m = peer.read_msg();
    ok_info(&mut peer, &m);
    let (tx, rx) = std::sync::mpsc::channel();
    info_then(&client, None, move |r| tx.send(r.is_ok()).unwrap());
    let m = peer.read_msg();
    ok_info(&mut peer, &m);
    assert!(rx.recv().unwrap());
    round_trip(&client, &mut peer);
}

#[test]
fn anything_but_the_version_reply_fails_negotiation() {
    for (as_command, want) in [
        (false, "matches no request"),
        (true, "instead of the VERSION reply"),
    ] {
        let (client, mut peer) = pair(Options::default());
        let t = std::thread::spawn(move || {
            let m = peer.read_msg();
            let payload = version_payload(0, 0, RUST_VMM_CAPS);
            let h = if as_command {
                Header::command(m.header.id, 1, payload.len(), false)
            } else {
                let mut h = Header::reply_to(&m.header, payload.len());
                h.id = m.header.id.wrapping_add(1);
                h
            };
            peer.write(&message(h, &payload));
            peer
        });
        let e = client.negotiate().unwrap_err();
        assert_eq!(e.code(), "EPROTO", "{e}");
        assert!(e.message.contains(want), "{e}");
        drop(t.join().unwrap());
    }
}

#[test]
fn a_full_outgoing_queue_refuses_new_requests() {
    let (client, mut peer) = negotiated(Options {
        max_queued_bytes: 64 * 1024,
        ..Options::default()
    });
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    // The server does not read: the first big request fills the socket and the queue.
    let big = vec![0u8; 1 << 20];
    let first = client.send_nowait(Request::new(GET_INFO, &big)).unwrap();
    let e = client
        .send_nowait(Request::new(GET_INFO, &info_req()))
        .err()
        .expect("refused");
    assert_eq!(e.code(), "ENOBUFS");
    // Nothing was lost: once the server reads, the first completes and the next works.
    let m = peer.read_msg();
    assert_eq!(m.payload.len(), 1 << 20);
    ok_info(&mut peer, &m);
    first.wait().unwrap();
    round_trip(&client, &mut peer);
}

#[test]
fn a_server_request_too_big_to_store_gets_e2big_and_is_drained() {
    let (client, mut peer) = negotiated(Options::default());
    // A DMA_WRITE carrying more than our advertised max_data_xfer_size (1 MiB).
    let mut payload = vec![0u8; 16 + (1 << 20) + 1];
    payload[8..16].copy_from_slice(&(((1u64 << 20) + 1).to_ne_bytes()));
    let writer = std::thread::spawn({
        let mut s = peer.s.try_clone().unwrap();
        move || {
            let h = Header::command(9, 12, payload.len(), false);
            std::io::Write::write_all(&mut s, &message(h, &payload)).unwrap();
        }
    });
    let r = peer.read_msg();
    writer.join().unwrap();
    assert_eq!((r.header.id, r.header.command), (9, 12));
    assert!(r.header.is_error());
    assert_eq!(r.header.error, nix::errno::Errno::E2BIG as u32);
    round_trip(&client, &mut peer);
}

#[test]
fn an_fd_that_is_not_open_fails_only_its_request() {
    use std::os::fd::BorrowedFd;
    for send_queued in [false, true] {
        let (client, mut peer) = negotiated(Options {
            send_queued,
            ..Options::default()
        });
        // SAFETY: never used as a file: the client only passes the number to the kernel,
        // which refuses it (no process has a million fds open here).
        let bad = [unsafe { BorrowedFd::borrow_raw(1_000_000) }];
        let e = client
            .send_nowait(Request {
                fds: &bad,
                ..Request::new(GET_INFO, &info_req())
            })
            .err()
            .expect("refused");
        assert_eq!(e.code(), "EBADF", "{}", e.message);
        assert_eq!(e.command, Some(GET_INFO));
        // Nothing was sent, and the connection goes on.
        round_trip(&client, &mut peer);
        assert!(!client.is_closed());
    }
}
