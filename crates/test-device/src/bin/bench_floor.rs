//! `vfio-user-bench-floor SOCKET COUNT [raw|msg|pipelined|client|client1m|client1m-into|client1m-callback|stream|relay|read1m] [DEPTH]`: the benchmark's floor
//! and ceiling, the least a client can do.
//!
//! - `raw` (default): one blocking write of DEVICE_GET_INFO, one blocking read of the reply
//!   into a fixed buffer (a reply arrives whole, so one read), on the same kind of socket to
//!   the same server; no threads, no queues, no checks, no allocation in the loop.
//! - `pipelined`: the same, keeping DEPTH (default 64) requests in flight and writing as many
//!   new requests in one write as a read brought replies: the device's own ceiling, since
//!   its single thread is then the limit.
//! - `msg`: `raw` with sendmsg and recvmsg (and a control buffer for fds), the calls any
//!   client that passes fds makes: what they cost beyond write and read.
//! - `read1m`: COUNT REGION_READs of 1 MiB from region 2 (the device's ceiling for them).
//! - `stream`: COUNT MiB through a socketpair between two threads (the throughput floor).
//! - `client1m`: `read1m` through `vfio-user-client`'s `region_read`.
//! - `client`: the same round trips with `vfio-user-client`'s blocking `send_wait` from Rust,
//!   to split our cost between the transport and the JS layers.
//!
//! Prints `{"roundTrips":N,"seconds":S,"userUs":U,"sysUs":Y}` (CPU of this process per round
//! trip, from getrusage).

#[path = "../rusage.rs"]
mod rusage;

use rusage::cpu_us;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vfio_user_proto::{
    version::{encode_version_request, VersionProposal},
    Capabilities, Header, HEADER_SIZE,
};

/// A fixed receive buffer that hands out whole messages.
struct Reader {
    buf: [u8; 64 * 1024],
    start: usize,
    end: usize,
}

impl Reader {
    /// Reads until one whole message is buffered and consumes it.
    fn message(&mut self, s: &mut UnixStream) -> std::io::Result<()> {
        loop {
            let have = self.end - self.start;
            if have >= HEADER_SIZE {
                let mut raw = [0u8; HEADER_SIZE];
                raw.copy_from_slice(&self.buf[self.start..self.start + HEADER_SIZE]);
                let size = Header::decode(&raw).size as usize;
                if have >= size {
                    self.start += size;
                    return Ok(());
                }
            }
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            let n = s.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
    }
}

impl Reader {
    /// Reads at least one whole message; consumes every whole message buffered and returns
    /// how many.
    fn messages(&mut self, s: &mut UnixStream) -> std::io::Result<u32> {
        self.message(s)?;
        let mut n = 1;
        while self.end - self.start >= HEADER_SIZE {
            let mut raw = [0u8; HEADER_SIZE];
            raw.copy_from_slice(&self.buf[self.start..self.start + HEADER_SIZE]);
            let size = Header::decode(&raw).size as usize;
            if self.end - self.start < size {
                break;
            }
            self.start += size;
            n += 1;
        }
        Ok(n)
    }
}

/// `pipelined`: keeps `depth` requests in flight, writing as many new ones, in one write, as
/// one read brought replies: the device's ceiling, with the least work per request here.
fn pipelined(
    s: &mut UnixStream,
    reader: &mut Reader,
    count: u32,
    depth: u32,
) -> std::io::Result<()> {
    let depth = depth.clamp(1, count.max(1));
    let mut batch = vec![0u8; 32 * depth as usize];
    for m in batch.chunks_exact_mut(32) {
        m[..HEADER_SIZE].copy_from_slice(&Header::command(0, 4, 16, false).encode());
        m[16..20].copy_from_slice(&16u32.to_ne_bytes());
    }
    let mut write = |s: &mut UnixStream, first: u32, n: u32| {
        for (i, m) in batch.chunks_exact_mut(32).take(n as usize).enumerate() {
            m[0..2].copy_from_slice(&((first + i as u32) as u16).to_ne_bytes());
        }
        s.write_all(&batch[..32 * n as usize])
    };
    write(s, 0, depth)?;
    let (mut sent, mut done) = (depth, 0);
    while done < count {
        let k = reader.messages(s)?;
        done += k;
        let n = k.min(count - sent);
        if n > 0 {
            write(s, sent, n)?;
            sent += n;
        }
    }
    Ok(())
}

/// Runs `body` and prints its round trips, time and CPU per round trip.
fn measure(count: u32, body: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    let (u0, s0) = cpu_us();
    let start = Instant::now();
    body()?;
    let seconds = start.elapsed().as_secs_f64();
    let (u1, s1) = cpu_us();
    let n = f64::from(count);
    println!(
        "{{\"roundTrips\":{count},\"seconds\":{seconds},\"userUs\":{},\"sysUs\":{}}}",
        (u1 - u0) / n,
        (s1 - s0) / n
    );
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(count)) = (args.get(1), args.get(2).and_then(|c| c.parse().ok())) else {
        eprintln!("usage: vfio-user-bench-floor SOCKET COUNT [raw|msg|pipelined|client|client1m|client1m-into|client1m-callback|stream|relay|read1m] [DEPTH]");
        std::process::exit(2);
    };
    let count: u32 = count;
    let mode = args.get(3).map_or("raw", String::as_str);
    if mode == "client" {
        return with_client(path, count);
    }
    if mode == "client1m" || mode == "client1m-into" || mode == "client1m-callback" {
        return with_client_1m(path, count, mode);
    }
    if mode == "stream" {
        return stream(count);
    }
    if mode == "relay" {
        return relay(count);
    }
    let depth: u32 = args.get(4).and_then(|d| d.parse().ok()).unwrap_or(64);
    let mut s = UnixStream::connect(path)?;
    let proposal = VersionProposal {
        major: 0,
        minor: 0,
        capabilities: Capabilities::default(),
    };
    s.write_all(&encode_version_request(0, &proposal))?;
    let mut reader = Reader {
        buf: [0; 64 * 1024],
        start: 0,
        end: 0,
    };
    reader.message(&mut s)?;

    let mut msg = [0u8; 32];
    msg[..HEADER_SIZE].copy_from_slice(&Header::command(0, 4, 16, false).encode());
    msg[16..20].copy_from_slice(&16u32.to_ne_bytes());
    let mut send = |s: &mut UnixStream, i: u32| {
        msg[0..2].copy_from_slice(&(i as u16).to_ne_bytes());
        s.write_all(&msg)
    };
    if mode == "pipelined" {
        return measure(count, || pipelined(&mut s, &mut reader, count, depth));
    }
    if mode == "read1m" {
        return measure(count, || read_mib(&mut s, count));
    }
    if mode == "msg" {
        return measure(count, || msg_round_trips(&s, &mut msg, count));
    }
    measure(count, || {
        for i in 0..count {
            send(&mut s, i)?;
            reader.message(&mut s)?;
        }
        Ok(())
    })
}

/// `msg`: the raw loop with the calls a client that can pass fds must make: sendmsg, and
/// recvmsg with a control buffer big enough for the most fds one message may carry.
fn msg_round_trips(s: &UnixStream, msg: &mut [u8; 32], count: u32) -> std::io::Result<()> {
    use nix::sys::socket::{recvmsg, sendmsg, MsgFlags};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let mut cmsg = nix::cmsg_space!([i32; 253]);
    let mut buf = [0u8; 64 * 1024];
    for i in 0..count {
        msg[0..2].copy_from_slice(&(i as u16).to_ne_bytes());
        sendmsg::<()>(fd, &[IoSlice::new(msg)], &[], MsgFlags::MSG_NOSIGNAL, None)?;
        // The test device's reply is 32 bytes and arrives whole.
        let mut iov = [IoSliceMut::new(&mut buf)];
        recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    }
    Ok(())
}

/// `read1m`: COUNT REGION_READs of 1 MiB from region 2, each reply read into a fixed buffer:
/// the device's own ceiling for large reads.
fn read_mib(s: &mut UnixStream, count: u32) -> std::io::Result<()> {
    const MIB: usize = 1 << 20;
    let mut msg = [0u8; 32];
    msg[..HEADER_SIZE].copy_from_slice(&Header::command(0, 9, 16, false).encode());
    msg[24..28].copy_from_slice(&2u32.to_ne_bytes());
    msg[28..32].copy_from_slice(&(MIB as u32).to_ne_bytes());
    let mut buf = vec![0u8; HEADER_SIZE + 16 + MIB];
    for i in 0..count {
        msg[0..2].copy_from_slice(&(i as u16).to_ne_bytes());
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
    }
    Ok(())
}

/// `stream`: COUNT MiB pushed through a socketpair from one thread to another, read into a
/// fixed buffer: what moving bytes over an AF_UNIX stream costs by itself (SOCKET unused).
fn stream(count: u32) -> std::io::Result<()> {
    const MIB: usize = 1 << 20;
    let (mut a, mut b) = UnixStream::pair()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![0x5au8; MIB];
        for _ in 0..count {
            a.write_all(&chunk)?;
        }
        Ok(())
    });
    let mut buf = vec![0u8; MIB];
    measure(count, || {
        let mut left = count as usize * MIB;
        while left > 0 {
            let n = b.read(&mut buf[..left.min(MIB)])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        Ok(())
    })?;
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))?
}

/// `relay`: COUNT MiB moved from one thread's memory to another's through this one, over two
/// socketpairs, a MiB per write: the raw copy a migration makes (the source device's state,
/// through the client, into the destination device's state), with nothing but the bytes.
/// Both ends keep COUNT MiB of distinct memory, as devices keep their state; every socket
/// has the send buffer the client and the migration device ask for.
fn relay(count: u32) -> std::io::Result<()> {
    const MIB: usize = 1 << 20;
    let total = count as usize * MIB;
    let (mut a, mut from) = UnixStream::pair()?;
    let (mut to, mut b) = UnixStream::pair()?;
    for s in [&a, &from, &to, &b] {
        let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &(4 << 20));
    }
    let state: Vec<u8> = (0..total).map(|i| i as u8).collect();
    let mut loaded = vec![1u8; total];
    let (go, started) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let _ = started.recv();
        for chunk in state.chunks(MIB) {
            a.write_all(chunk)?;
        }
        Ok(())
    });
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        b.read_exact(&mut loaded)?;
        Ok(())
    });
    let mut buf = vec![0u8; MIB];
    measure(count, || {
        let _ = go.send(());
        let mut left = total;
        while left > 0 {
            let n = from.read(&mut buf[..left.min(MIB)])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            to.write_all(&buf[..n])?;
            left -= n;
        }
        // Done when the last byte has landed, as a migration is when the last write is acked.
        joined(reader)
    })?;
    joined(writer)
}

fn joined(t: std::thread::JoinHandle<std::io::Result<()>>) -> std::io::Result<()> {
    t.join()
        .map_err(|_| std::io::Error::other("a relay thread panicked"))?
}

/// `client1m`: COUNT 1 MiB region reads with `vfio-user-client`'s blocking `region_read`;
/// `client1m-into`: with `region_read_into` (into one reused buffer); `client1m-callback`:
/// `region_read_into_callback`, read by the I/O thread (epoll), as an event loop reads.
fn with_client_1m(path: &str, count: u32, mode: &str) -> std::io::Result<()> {
    use vfio_user_client::{Client, Options, ReadInto};
    let fail = |e: vfio_user_client::Error| std::io::Error::other(e.to_string());
    let client = Client::connect(std::path::Path::new(path), Options::default()).map_err(fail)?;
    client.negotiate().map_err(fail)?;
    let mut mem = vec![0u8; 1 << 20];
    // SAFETY: `mem` outlives every read below, each of which settles before the next.
    let into = unsafe { ReadInto::new(mem.as_mut_ptr(), mem.len()) };
    measure(count, || {
        for _ in 0..count {
            match mode {
                "client1m-into" => client.region_read_into(2, 0, into, None).map_err(fail)?,
                "client1m-callback" => {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let done = Box::new(move |r| {
                        let _ = tx.send(r);
                    });
                    client
                        .region_read_into_callback(2, 0, into, None, done)
                        .map_err(fail)?;
                    rx.recv()
                        .map_err(|_| std::io::Error::other("no completion"))?
                        .map_err(fail)?
                }
                _ => drop(client.region_read(2, 0, 1 << 20, None).map_err(fail)?),
            }
        }
        Ok(())
    })
}

fn with_client(path: &str, count: u32) -> std::io::Result<()> {
    use vfio_user_client::{Client, Options, Request};
    let fail = |e: vfio_user_client::Error| std::io::Error::other(e.to_string());
    let client = Client::connect(std::path::Path::new(path), Options::default()).map_err(fail)?;
    client.negotiate().map_err(fail)?;
    let mut payload = [0u8; 16];
    payload[0..4].copy_from_slice(&16u32.to_ne_bytes());
    measure(count, || {
        for _ in 0..count {
            client.send_wait(Request::new(4, &payload)).map_err(fail)?;
        }
        Ok(())
    })
}
