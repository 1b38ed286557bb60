//! The tap between a scripted client and a scripted server, over real UNIX sockets: bytes and
//! fds pass unchanged, every message is described, garbage and a half message are relayed,
//! EOF is passed on, a side that stops reading stops the other, and no fd outlives a session.

mod common;

use common::*;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use vfio_user_client::proto::{Command, Header};
use vfio_user_client::Sender;
use vfio_user_client::{Tap, TapEvent, TapRecord};

struct Setup {
    _dir: TempDir,
    tap: Tap,
    server: UnixListener,
    listen: PathBuf,
    events: mpsc::Receiver<TapEvent>,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tests count this process's fds: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn setup(head: usize) -> Setup {
    let dir = std::env::temp_dir().join(format!("vfio-user-tap-{}-{}", std::process::id(), rand()));
    std::fs::create_dir(&dir).unwrap();
    let upstream = dir.join("server.sock");
    let listen = dir.join("tap.sock");
    let server = UnixListener::bind(&upstream).unwrap();
    let (tx, events) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let tap = Tap::listen(
        &listen,
        &upstream,
        head,
        Arc::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        }),
    )
    .unwrap();
    tap.observe(true);
    Setup {
        _dir: TempDir(dir),
        tap,
        server,
        listen,
        events,
    }
}

fn rand() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Connects a client through the tap, and takes the server's end of that session.
fn session(s: &Setup) -> (UnixStream, UnixStream) {
    let client = UnixStream::connect(&s.listen).unwrap();
    let (server, _) = s.server.accept().unwrap();
    (client, server)
}

fn next_record(s: &Setup) -> TapRecord {
    loop {
        match s
            .events
            .recv_timeout(Duration::from_secs(10))
            .expect("a tap event")
        {
            TapEvent::Record(r) => return *r,
            _ => continue,
        }
    }
}

fn closed(s: &Setup) -> Option<String> {
    loop {
        match s
            .events
            .recv_timeout(Duration::from_secs(10))
            .expect("a tap event")
        {
            TapEvent::Closed { reason, .. } => return reason,
            _ => continue,
        }
    }
}

/// Receives exactly `n` bytes and every fd that came with them.
fn recv_exact(s: &UnixStream, n: usize) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut out = vec![0u8; n];
    let mut got = 0;
    let mut fds = Vec::new();
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    while got < n {
        let mut iov = [IoSliceMut::new(&mut out[got..])];
        let m = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        assert!(m.bytes > 0, "EOF after {got} of {n} bytes");
        for c in m.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: just received; the test owns them.
                fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        got += m.bytes;
    }
    (out, fds)
}

#[test]
fn bytes_and_253_fds_pass_unchanged_and_every_message_is_described() {
    let _serial = serial();
    let s = setup(16);
    let base = open_fds();
    let (client, mut server) = session(&s);
    let mut c = Peer { s: client };
    // A DMA_MAP with 253 fds (the kernel's most per message), each a distinct eventfd.
    let made: Vec<OwnedFd> = (0..253)
        .map(|_| OwnedFd::from(nix::sys::eventfd::EventFd::new().unwrap()))
        .collect();
    let raw: Vec<RawFd> = made.iter().map(AsRawFd::as_raw_fd).collect();
    let map = vfio_user_client::proto::dma::dma_map_request(3, 0, 0x10_0000, 0x1000);
    let req = message(
        Header::command(5, Command::DmaMap as u16, map.len(), false),
        &map,
    );
    c.send_with_fds(&req, &raw);
    let (bytes, fds) = recv_exact(&server, req.len());
    assert_eq!(bytes, req);
    assert_eq!(fds.len(), 253);
    let r = next_record(&s);
    assert_eq!((r.sender, r.header.id, r.fds), (Sender::Client, 5, 253));
    assert_eq!(r.description.fields["iova"], "0x100000");
    // The reply, with data: a REGION_READ reply of 64 bytes, its first 16 shown.
    let read = vfio_user_client::proto::region::region_access(1, 0x40, 64, None);
    c.write(&message(
        Header::command(6, Command::RegionRead as u16, read.len(), false),
        &read,
    ));
    let (got, _) = recv_exact(&server, 16 + read.len());
    let h = Header::decode(got[..16].try_into().unwrap());
    let data: Vec<u8> = (0..64).collect();
    let body = vfio_user_client::proto::region::region_access(1, 0x40, 64, Some(&data));
    server
        .write_all(&message(Header::reply_to(&h, body.len()), &body))
        .unwrap();
    let mut back = vec![0u8; 16 + body.len()];
    c.s.read_exact(&mut back).unwrap();
    assert_eq!(&back[16..], &body[..]);
    let req_rec = next_record(&s);
    assert_eq!(req_rec.description.fields["count"], 64);
    let reply = next_record(&s);
    assert_eq!(
        (reply.sender, reply.description.data_len),
        (Sender::Server, 64)
    );
    assert_eq!(reply.data_head, (0..16).collect::<Vec<u8>>());
    assert!(reply.latency.is_some());
    // EOF from the client reaches the server, then the session ends; no fd of ours is left.
    drop(c);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(server);
    assert_eq!(closed(&s), None);
    drop(fds);
    drop(made);
    assert_eq!(open_fds(), base);
    assert_eq!(s.tap.sessions(), 0);
}

#[test]
fn garbage_and_a_half_message_are_relayed_untouched_and_said_undecodable() {
    let _serial = serial();
    let s = setup(16);
    let (client, server) = session(&s);
    let mut c = Peer { s: client };
    // An unknown command, then a header that says 3 bytes (less than a header).
    let junk = message(Header::command(1, 99, 4, false), &[1, 2, 3, 4]);
    c.write(&junk);
    let mut bad = Header::command(2, 4, 0, false).encode();
    bad[4..8].copy_from_slice(&3u32.to_le_bytes());
    c.write(&bad);
    c.write(b"trailing bytes nobody can frame");
    let (got, _) = recv_exact(&server, junk.len() + bad.len() + 31);
    assert_eq!(&got[..junk.len()], &junk[..]);
    assert_eq!(&got[junk.len() + 16..], b"trailing bytes nobody can frame");
    assert!(next_record(&s)
        .description
        .undecodable
        .unwrap()
        .contains("unknown command"));
    assert!(next_record(&s)
        .description
        .undecodable
        .unwrap()
        .contains("less than 16"));
    // Killed mid-message: half a message, then the client is gone.
    let (client2, server2) = session(&s);
    let mut c2 = Peer { s: client2 };
    let whole = message(Header::command(3, 4, 16, false), &get_info());
    c2.write(&whole[..20]);
    drop(c2);
    let mut seen = Vec::new();
    (&server2).read_to_end(&mut seen).unwrap();
    assert_eq!(seen, &whole[..20]);
    drop(server2);
    drop(c);
    drop(server);
}

#[test]
fn a_client_that_never_reads_stops_the_tap_reading_the_server() {
    let _serial = serial();
    let s = setup(16);
    let (_client, server) = session(&s);
    server.set_nonblocking(true).unwrap();
    // The server writes until its socket refuses more: the tap stopped taking it in once the
    // client's socket and the tap's one buffer were full, so what the server got rid of is
    // bounded by those buffers, not by what it wanted to send (64 MiB).
    let chunk = vec![0x5au8; 64 << 10];
    let mut sent = 0usize;
    let mut w = &server;
    while sent < 64 << 20 {
        match w.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Room again within a second means the tap still takes the server's bytes.
                // (A slow machine can only stop this early, never fail it.)
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                use std::os::fd::AsFd;
                let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLOUT)];
                if poll(&mut fds, PollTimeout::from(1000u16)).unwrap() == 0 {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        sent < 64 << 20,
        "the tap kept reading a server whose client never reads"
    );
    s.tap.close();
    assert_eq!(s.tap.sessions(), 0);
}

#[test]
fn a_server_that_cannot_be_reached_closes_the_client() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("vfio-user-tap-gone-{}", std::process::id()));
    let _ = std::fs::create_dir(&dir);
    let listen = dir.join("tap.sock");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let tap = Tap::listen(
        &listen,
        &dir.join("nobody.sock"),
        16,
        Arc::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        }),
    )
    .unwrap();
    let mut c = UnixStream::connect(&listen).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        TapEvent::Refused { reason, full } => {
            assert!(reason.contains("nobody.sock"), "{reason}");
            assert!(!full);
        }
        other => panic!("{other:?}"),
    }
    drop(tap);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_servers_eof_reaches_the_client_after_what_it_sent() {
    let _serial = serial();
    let s = setup(16);
    let (client, mut server) = session(&s);
    let reply = message(
        Header::command(9, Command::DeviceGetInfo as u16, 16, false),
        &get_info(),
    );
    server.write_all(&reply).unwrap();
    drop(server);
    let mut c = client;
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, reply);
    drop(c);
    assert_eq!(closed(&s), None);
}

#[test]
fn clients_past_the_most_sessions_are_closed_until_one_ends() {
    let _serial = serial();
    let s = setup(16);
    s.tap.set_max_sessions(2);
    let (a, a_server) = session(&s);
    let (_b, _b_server) = session(&s);
    // The third is closed at once, reported refused; the server never sees it.
    let mut c = UnixStream::connect(&s.listen).unwrap();
    // Bounded: a client given a session would wait here for bytes that never come.
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    loop {
        match s
            .events
            .recv_timeout(Duration::from_secs(10))
            .expect("a tap event")
        {
            TapEvent::Refused { reason, full } => {
                assert!(reason.contains("2 sessions are open"), "{reason}");
                assert!(full);
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(s.tap.sessions(), 2);
    // Once one ends (both sides gone), a new client gets a session again.
    drop((a, a_server));
    assert_eq!(closed(&s), None);
    let (mut d, mut d_server) = session(&s);
    d.write_all(b"relayed").unwrap();
    let mut got = [0u8; 7];
    d_server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"relayed");
}

#[test]
fn a_server_that_never_reads_nor_closes_holds_a_session_no_longer_than_the_linger() {
    let _serial = serial();
    let s = setup(16);
    s.tap.set_linger(Duration::from_millis(200));
    let (mut client, server) = session(&s);
    // Until the sockets and the relay's buffer are full (a write waits a second in vain):
    // the relay is then stuck writing to a server that never reads when the client hangs
    // up. (Should the relay merely be slow, it reads the client's EOF later instead, and the
    // session must end by the linger all the same.)
    client
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    while client.write(&chunk).is_ok() {}
    drop(client);
    let reason = closed(&s).expect("a reason");
    assert!(reason.contains("linger (200 ms)"), "{reason}");
    assert_eq!(s.tap.sessions(), 0);
    drop(server);
}

#[test]
fn a_server_that_keeps_its_socket_after_eof_holds_a_session_no_longer_than_the_linger() {
    let _serial = serial();
    let s = setup(16);
    s.tap.set_linger(Duration::from_millis(200));
    let (client, mut server) = session(&s);
    drop(client);
    // The server sees the client's EOF, and keeps its socket open.
    let mut buf = [0u8; 1];
    assert_eq!(server.read(&mut buf).unwrap(), 0);
    let reason = closed(&s).expect("a reason");
    assert!(reason.contains("linger"), "{reason}");
    assert_eq!(s.tap.sessions(), 0);
}

#[test]
fn close_removes_only_the_socket_the_tap_bound() {
    let _serial = serial();
    // Replaced by a regular file while the tap runs: the file stays.
    let s = setup(16);
    std::fs::remove_file(&s.listen).unwrap();
    std::fs::write(&s.listen, b"not the tap's").unwrap();
    s.tap.close();
    assert_eq!(std::fs::read(&s.listen).unwrap(), b"not the tap's");
    // Another tap's socket at the path after this one's was removed: it stays.
    let t = setup(16);
    std::fs::remove_file(&t.listen).unwrap();
    let other = UnixListener::bind(&t.listen).unwrap();
    t.tap.close();
    assert!(UnixStream::connect(&t.listen).is_ok());
    drop(other);
    // Its own socket: removed.
    let u = setup(16);
    u.tap.close();
    assert!(!u.listen.exists());
}

#[test]
fn a_listen_path_that_is_the_server_or_too_long_is_refused() {
    let _serial = serial();
    let s = setup(16);
    let sink: vfio_user_client::TapSink = Arc::new(|_| {});
    let dir = s.listen.parent().unwrap().to_path_buf();
    let path = dir.join("self.sock");
    let e = Tap::listen(&path, &path, 16, sink.clone())
        .err()
        .expect("refused");
    assert_eq!(e.errno, nix::errno::Errno::EINVAL, "{}", e.message);
    assert!(e.message.contains("same socket"), "{}", e.message);
    assert!(!path.exists());
    let long = dir.join("x".repeat(200));
    let e = Tap::listen(&long, &path, 16, sink).err().expect("refused");
    assert_eq!(e.errno, nix::errno::Errno::ENAMETOOLONG, "{}", e.message);
    assert!(e.message.contains("107 bytes"), "{}", e.message);
}
