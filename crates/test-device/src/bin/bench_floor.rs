//! `vfio-user-bench-floor SOCKET COUNT [raw|pipelined|client] [DEPTH]`: the benchmark's floor
//! and ceiling, the least a client can do.
//!
//! - `raw` (default): one blocking write of DEVICE_GET_INFO, one blocking read of the reply
//!   into a fixed buffer (a reply arrives whole, so one read), on the same kind of socket to
//!   the same server; no threads, no queues, no checks, no allocation in the loop.
//! - `pipelined`: the same, keeping DEPTH (default 64) requests in flight: the device's own
//!   ceiling, since its single thread is then the limit.
//! - `client`: the same round trips with `vfio-user-client`'s blocking `send_wait` from Rust,
//!   to split our cost between the transport and the JS layers.
//!
//! Prints `{"roundTrips":N,"seconds":S,"userUs":U,"sysUs":Y}` (CPU of this process per round
//! trip, from getrusage).

use nix::sys::resource::{getrusage, UsageWho};
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

fn cpu_us() -> (f64, f64) {
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(r) => (us(r.user_time()), us(r.system_time())),
        Err(_) => (0.0, 0.0),
    }
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
        eprintln!("usage: vfio-user-bench-floor SOCKET COUNT [raw|pipelined|client] [DEPTH]");
        std::process::exit(2);
    };
    let count: u32 = count;
    let mode = args.get(3).map_or("raw", String::as_str);
    if mode == "client" {
        return with_client(path, count);
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
        return measure(count, || {
            let first = depth.min(count);
            for i in 0..first {
                send(&mut s, i)?;
            }
            for i in first..count + first {
                reader.message(&mut s)?;
                if i < count {
                    send(&mut s, i)?;
                }
            }
            Ok(())
        });
    }
    measure(count, || {
        for i in 0..count {
            send(&mut s, i)?;
            reader.message(&mut s)?;
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
