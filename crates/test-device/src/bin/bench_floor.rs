//! `vfio-user-bench-floor SOCKET COUNT [raw|client]`: the benchmark's floor. `raw` (default)
//! is the least a client can do for a round trip: one blocking write of DEVICE_GET_INFO, one
//! blocking read of the reply, on the same kind of socket to the same server, no threads, no
//! queues, no checks. `client` does the same round trips with `vfio-user-client`'s blocking
//! `send_wait` from Rust, to split our cost between the transport and the JS layers.
//! Prints `{"roundTrips":N,"seconds":S}`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vfio_user_proto::{
    version::{encode_version_request, VersionProposal},
    Capabilities, Header, HEADER_SIZE,
};

fn read_reply(s: &mut UnixStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut raw = [0u8; HEADER_SIZE];
    s.read_exact(&mut raw)?;
    let h = Header::decode(&raw);
    buf.resize(h.payload_len(), 0);
    s.read_exact(buf)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(count)) = (args.get(1), args.get(2).and_then(|c| c.parse().ok())) else {
        eprintln!("usage: vfio-user-bench-floor SOCKET COUNT");
        std::process::exit(2);
    };
    let count: u32 = count;
    if args.get(3).map(String::as_str) == Some("client") {
        return with_client(path, count);
    }
    let mut s = UnixStream::connect(path)?;
    let proposal = VersionProposal {
        major: 0,
        minor: 0,
        capabilities: Capabilities::default(),
    };
    s.write_all(&encode_version_request(0, &proposal))?;
    let mut buf = Vec::new();
    read_reply(&mut s, &mut buf)?;

    let mut msg = Header::command(0, 4, 16, false).encode().to_vec();
    msg.extend_from_slice(&16u32.to_ne_bytes());
    msg.extend_from_slice(&[0u8; 12]);
    let start = Instant::now();
    for i in 0..count {
        msg[0..2].copy_from_slice(&(i as u16).to_ne_bytes());
        s.write_all(&msg)?;
        read_reply(&mut s, &mut buf)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{{\"roundTrips\":{count},\"seconds\":{seconds}}}");
    Ok(())
}

fn with_client(path: &str, count: u32) -> std::io::Result<()> {
    use vfio_user_client::{Client, Options, Request};
    let fail = |e: vfio_user_client::Error| std::io::Error::other(e.to_string());
    let client = Client::connect(std::path::Path::new(path), Options::default()).map_err(fail)?;
    client.negotiate().map_err(fail)?;
    let mut payload = [0u8; 16];
    payload[0..4].copy_from_slice(&16u32.to_ne_bytes());
    let start = Instant::now();
    for _ in 0..count {
        client.send_wait(Request::new(4, &payload)).map_err(fail)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{{\"roundTrips\":{count},\"seconds\":{seconds}}}");
    Ok(())
}
