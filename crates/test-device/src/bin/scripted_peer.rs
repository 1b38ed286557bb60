//! `vfio-user-scripted-peer SOCKET SCENARIO`: a deliberately misbehaving vfio-user server for
//! the failure cases the real device cannot produce. Built on our proto crate. It plays the
//! scenario to every client that connects, each on its own thread, until it is killed.
//! Scenarios:
//!
//! - `version:major|minor|no-nul|short|error0|enotsup|bad-caps|wrong-command|silent|eof`:
//!   a broken VERSION reply (or none).
//! - `version:warnings`: a valid reply with unknown capabilities, then `serve`.
//! - `serve`: answers every request with a 16-byte DEVICE_GET_INFO-like payload.
//! - `late`: leaves the first request unanswered; once a second arrives, sends the late
//!   reply to the first, then answers the second. Every reply echoes its request's payload.
//! - `eof-pending`: reads three requests, then closes the connection.
//! - `errno0`: answers every request with an error reply whose errno is 0.
//! - `flood`: sends requests (16 bytes, an unknown command) as fast as it can and never
//!   reads the replies.
//! - `hold`: reads every request and answers none (replies that never come).
//! - `echo`: answers REGION_READ (offset, region, count) with `count` bytes, byte i being
//!   `(offset + i) & 0xff`, after sleeping `region` ms (so a client's timeout meets a late
//!   reply); answers everything else like `serve`. For soaks: every reply proves whose it is.
//! - `liar`: a server that lies in its typed replies: REGION_INFO for region 0 has a capability
//!   chain that loops, for region 1 a sparse area past the region, for region 2 a chain that
//!   points outside the reply; REGION_READ echoes another offset; REGION_WRITE echoes a short
//!   header; DEVICE_GET_IRQ_INFO answers for another index; before answering DEVICE_GET_INFO
//!   it asks for a 4 GiB DMA_READ and reports our errno in bytes 0..4 of the reply.
//! - `no-migration`: refuses every DEVICE_FEATURE with ENOTSUP.
//! - `migration`: a device with migration v2 (STOP_COPY and PRE_COPY) whose state machine
//!   takes only the spec's direct arcs (anything else: EINVAL); PROBE succeeds for features 1
//!   and 2 only. MIG_DATA_READ streams a 10000-byte state (byte i is i % 251) in PRE_COPY or
//!   STOP_COPY; MIG_DATA_WRITE appends to what is loaded in RESUMING, whose length and byte sum
//!   DEVICE_GET_INFO then reports in bytes 0..8. Dirty logging settles on pages of at least 4 KiB and reports pages 1, 2 and 5
//!   dirty. `migration-liar`: the same, but asked for RESUMING it stays in STOP, its dirty
//!   report marks the page past the range too, and MIG_DATA_READ returns a byte more than
//!   asked (while there is more). `migration-stall`: the same as `migration` until its first
//!   MIG_DATA_WRITE, after which it answers nothing.
//! - `io-fds`: REGION_INFO says every region is 4096 bytes; DEVICE_GET_REGION_IO_FDS for
//!   region 0 answers in libvfio-user's 48-byte layout (two records, two eventfds, the room
//!   needed first when asked with too little), region 1 in the spec's 40-byte one (one record),
//!   region 2 with a record past the region, region 3 with records that do not divide.
//! - `dma-write`: before answering a request, DMA_WRITEs "vfio" at address 16, then
//!   DMA_READs 4 bytes at 16, and replies with those bytes in 0..4 of the payload and the
//!   errno of the write in 4..8.
//! - `dma-flood`: before answering a request, sends 5000 DMA_READs of 8 bytes at 0 back to
//!   back, then reads the 5000 answers.
//! - `burst:N`: reads N requests, then answers them all in one write, and again. Each
//!   request's payload is (length u32, nonce u32); its reply's payload is `length` bytes, byte
//!   i being `(nonce + i) & 0xff`: a reply delivered to the wrong request, or cut from the
//!   wrong place, shows. For the client's batches of many replies at once.
//! - `dma-request`: before answering a request, sends the client a DMA_READ and reports the
//!   errno of the client's answer in bytes 0..4 of the reply payload.

#[path = "../lifetime.rs"]
mod lifetime;
#[path = "../peer_main.rs"]
mod peer_main;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use vfio_user_proto::bytes::{u32_at, u64_at};
use vfio_user_proto::{Header, HEADER_SIZE};

const VALID_CAPS: &str = r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576}}"#;

fn read_msg(s: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut raw = [0u8; HEADER_SIZE];
    s.read_exact(&mut raw).ok()?;
    let h = Header::decode(&raw);
    let mut payload = vec![0u8; h.payload_len()];
    s.read_exact(&mut payload).ok()?;
    Some((h, payload))
}

fn send(s: &mut UnixStream, h: Header, payload: &[u8]) {
    let mut bytes = h.encode().to_vec();
    bytes.extend_from_slice(payload);
    let _ = s.write_all(&bytes);
}

fn version_payload(major: u16, minor: u16, json: &str, nul: bool) -> Vec<u8> {
    let mut p = major.to_ne_bytes().to_vec();
    p.extend_from_slice(&minor.to_ne_bytes());
    p.extend_from_slice(json.as_bytes());
    if nul {
        p.push(0);
    }
    p
}

fn info_payload(first_word: u32) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(&first_word.to_ne_bytes());
    p[8..12].copy_from_slice(&9u32.to_ne_bytes());
    p[12..16].copy_from_slice(&5u32.to_ne_bytes());
    p
}

/// A DEVICE_GET_REGION_IO_FDS record: offset, size, fd index, type, datamatch.
type IoFdRecord = (u64, u64, u32, u32, u64);

/// Answers DEVICE_GET_REGION_IO_FDS for `index` as `io-fds` describes.
fn io_fds(s: &mut UnixStream, h: &Header, index: u32, asked: u32) {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::os::fd::AsRawFd;
    // (stride, records, argsz override)
    let (stride, records, argsz): (usize, Vec<IoFdRecord>, Option<u32>) = match index {
        0 => (48, vec![(0, 4, 0, 0, 0xab), (8, 4, 1, 0, 0xcd)], None),
        1 => (40, vec![(16, 8, 0, 1, 0x77)], None),
        2 => (40, vec![(4090, 16, 0, 0, 0)], None),
        _ => (40, vec![(0, 4, 0, 0, 0), (8, 4, 0, 0, 0)], Some(16 + 81)),
    };
    let full = 16 + stride * records.len();
    let argsz = argsz.unwrap_or(full as u32);
    let mut p = vec![0u8; 16];
    p[0..4].copy_from_slice(&argsz.to_ne_bytes());
    p[8..12].copy_from_slice(&index.to_ne_bytes());
    p[12..16].copy_from_slice(&(records.len() as u32).to_ne_bytes());
    if (asked as usize) < full {
        reply(s, h, &p);
        return;
    }
    for (o, size, fd, kind, data) in &records {
        let mut r = vec![0u8; stride];
        r[0..8].copy_from_slice(&o.to_ne_bytes());
        r[8..16].copy_from_slice(&size.to_ne_bytes());
        r[16..20].copy_from_slice(&fd.to_ne_bytes());
        r[20..24].copy_from_slice(&kind.to_ne_bytes());
        let at = if stride == 48 { 40 } else { 32 };
        r[at..at + 8].copy_from_slice(&data.to_ne_bytes());
        p.extend_from_slice(&r);
    }
    if index == 3 {
        p.push(0);
    }
    let fds: Vec<EventFd> = (0..records.len().min(2))
        .filter_map(|_| EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).ok())
        .collect();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut bytes = Header::reply_to(h, p.len()).encode().to_vec();
    bytes.extend_from_slice(&p);
    let iov = [std::io::IoSlice::new(&bytes)];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
    let _ = nix::sys::socket::sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    );
}

/// A REGION_INFO reply for `index` with a lying capability chain (see `liar`).
fn lying_region_info(index: u32) -> Vec<u8> {
    let mut p = vec![0u8; 32 + 32];
    let put = |p: &mut Vec<u8>, at: usize, v: u32| p[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    put(&mut p, 0, 64);
    put(&mut p, 4, 1 | 2 | 4 | 8);
    put(&mut p, 8, index);
    put(&mut p, 12, if index == 2 { 4096 } else { 32 });
    p[16..24].copy_from_slice(&4096u64.to_ne_bytes());
    // SPARSE_MMAP, version 1, next: itself for region 0 (a loop), else the end.
    p[32..34].copy_from_slice(&1u16.to_ne_bytes());
    p[34..36].copy_from_slice(&1u16.to_ne_bytes());
    put(&mut p, 36, if index == 0 { 32 } else { 0 });
    put(&mut p, 40, 1);
    let (offset, size) = if index == 1 {
        (4000u64, 200u64)
    } else {
        (0, 4096)
    };
    p[48..56].copy_from_slice(&offset.to_ne_bytes());
    p[56..64].copy_from_slice(&size.to_ne_bytes());
    p
}

/// Answers requests `n` at a time, the `n` replies in one write (see `burst:N`).
fn burst(s: &mut UnixStream, n: usize) {
    loop {
        let mut out = Vec::new();
        for _ in 0..n.max(1) {
            let Some((h, p)) = read_msg(s) else {
                return;
            };
            let length = u32_at(&p, 0).unwrap_or(0);
            let nonce = u32_at(&p, 4).unwrap_or(0);
            let data: Vec<u8> = (0..length)
                .map(|i| (nonce.wrapping_add(i) & 0xff) as u8)
                .collect();
            out.extend_from_slice(&Header::reply_to(&h, data.len()).encode());
            out.extend_from_slice(&data);
        }
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

fn reply(s: &mut UnixStream, to: &Header, payload: &[u8]) {
    send(s, Header::reply_to(to, payload.len()), payload);
}

/// Answers VERSION per `kind`; returns false if the session should stop.
fn version(s: &mut UnixStream, kind: &str) -> bool {
    let Some((h, _)) = read_msg(s) else {
        return false;
    };
    match kind {
        "major" => reply(s, &h, &version_payload(1, 0, VALID_CAPS, true)),
        "minor" => reply(s, &h, &version_payload(0, 7, VALID_CAPS, true)),
        "no-nul" => reply(s, &h, &version_payload(0, 0, VALID_CAPS, false)),
        "short" => reply(s, &h, &[]),
        "error0" => send(s, Header::error_reply_to(&h, 0), &[]),
        "enotsup" => send(s, Header::error_reply_to(&h, 95), &[]),
        "bad-caps" => reply(
            s,
            &h,
            &version_payload(0, 0, r#"{"capabilities":{"max_msg_fds":"eight"}}"#, true),
        ),
        "wrong-command" => {
            let mut r = Header::reply_to(&h, 4 + VALID_CAPS.len() + 1);
            r.command = 4;
            send(s, r, &version_payload(0, 0, VALID_CAPS, true));
        }
        "silent" => {
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
            return false;
        }
        "eof" => return false,
        "warnings" => {
            reply(
                s,
                &h,
                &version_payload(
                    0,
                    0,
                    r#"{"capabilities":{"max_msg_fds":4,"frobnicate":true,"pgsizes":2097152}}"#,
                    true,
                ),
            );
            return true;
        }
        _ => {
            reply(s, &h, &version_payload(0, 0, VALID_CAPS, true));
            return true;
        }
    }
    // A broken reply: keep the connection open until the client leaves.
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    false
}

/// Whether `scenario` is one this peer plays (one it does not would behave like `serve`, and
/// a test meant to fail would pass).
fn known(scenario: &str) -> bool {
    const VERSIONS: &[&str] = &[
        "major",
        "minor",
        "no-nul",
        "short",
        "error0",
        "enotsup",
        "bad-caps",
        "wrong-command",
        "silent",
        "eof",
        "warnings",
    ];
    const PLAYS: &[&str] = &[
        "serve",
        "late",
        "eof-pending",
        "errno0",
        "flood",
        "hold",
        "echo",
        "liar",
        "no-migration",
        "migration",
        "migration-liar",
        "migration-stall",
        "io-fds",
        "dma-write",
        "dma-flood",
        "dma-request",
    ];
    if let Some(k) = scenario.strip_prefix("version:") {
        return VERSIONS.contains(&k);
    }
    if let Some(n) = scenario.strip_prefix("burst:") {
        return n.parse::<usize>().is_ok_and(|n| n > 0);
    }
    PLAYS.contains(&scenario)
}

fn run(s: &mut UnixStream, scenario: &str) {
    let (kind, after) = match scenario.strip_prefix("version:") {
        Some(k) => (k, "serve"),
        None => ("ok", scenario),
    };
    if !version(s, kind) {
        return;
    }
    if let Some(n) = after
        .strip_prefix("burst:")
        .and_then(|n| n.parse::<usize>().ok())
    {
        burst(s, n);
        return;
    }
    match after {
        "serve" => {
            while let Some((h, _)) = read_msg(s) {
                reply(s, &h, &info_payload(16));
            }
        }
        "late" => {
            // Every reply echoes its request's payload: a reply delivered to the wrong
            // request shows.
            let Some((first, first_payload)) = read_msg(s) else {
                return;
            };
            let Some((second, second_payload)) = read_msg(s) else {
                return;
            };
            reply(s, &first, &first_payload);
            reply(s, &second, &second_payload);
            while let Some((h, p)) = read_msg(s) {
                reply(s, &h, &p);
            }
        }
        "eof-pending" => {
            for _ in 0..3 {
                if read_msg(s).is_none() {
                    return;
                }
            }
        }
        "hold" => while read_msg(s).is_some() {},
        "flood" => {
            let one = Header::command(1, 99, 0, false).encode();
            let batch: Vec<u8> = one.iter().copied().cycle().take(16 * 4096).collect();
            while s.write_all(&batch).is_ok() {}
        }
        "echo" => {
            while let Some((h, p)) = read_msg(s) {
                if h.command != 9 || p.len() < 16 {
                    reply(s, &h, &info_payload(16));
                    continue;
                }
                let word = |at: usize| u32_at(&p, at).unwrap_or(0);
                let offset = u64_at(&p, 0).unwrap_or(0);
                let (delay, count) = (word(8), word(12));
                if delay > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(u64::from(delay)));
                }
                let mut data = p[..16].to_vec();
                data.extend((0..u64::from(count)).map(|i| (offset.wrapping_add(i) & 0xff) as u8));
                reply(s, &h, &data);
            }
        }
        "errno0" => {
            while let Some((h, _)) = read_msg(s) {
                send(s, Header::error_reply_to(&h, 0), &[]);
            }
        }
        "liar" => {
            while let Some((h, p)) = read_msg(s) {
                let word = |at: usize| u32_at(&p, at).unwrap_or(0);
                match h.command {
                    4 => {
                        let mut dma = [0u8; 16];
                        dma[8..16].copy_from_slice(&(4u64 << 30).to_ne_bytes());
                        send(s, Header::command(901, 11, 16, false), &dma);
                        let Some((answer, _)) = read_msg(s) else {
                            return;
                        };
                        reply(s, &h, &info_payload(answer.error));
                    }
                    5 => {
                        // Honest about size: a short argsz gets the fixed part and the room
                        // needed, as libvfio-user answers.
                        let mut r = lying_region_info(word(8));
                        r.truncate((word(0) as usize).clamp(32, r.len()));
                        reply(s, &h, &r);
                    }
                    7 => {
                        let mut r = p.clone();
                        r[8..12].copy_from_slice(&(word(8) + 1).to_ne_bytes());
                        reply(s, &h, &r);
                    }
                    9 => {
                        let mut r = p[..16].to_vec();
                        r[0] ^= 8;
                        r.resize(16 + word(12) as usize, 0);
                        reply(s, &h, &r);
                    }
                    10 => reply(s, &h, &p[..12]),
                    _ => reply(s, &h, &info_payload(0)),
                }
            }
        }
        "no-migration" => {
            while let Some((h, _)) = read_msg(s) {
                if h.command == 16 {
                    send(s, Header::error_reply_to(&h, 95), &[]);
                } else {
                    reply(s, &h, &info_payload(0));
                }
            }
        }
        "migration" | "migration-liar" | "migration-stall" => {
            let mut state = 2u32;
            // The device state it saves (10000 bytes, byte i is i % 251), how far it has been
            // read, and what was loaded into it.
            let saved: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
            let mut read_at = 0usize;
            let mut loaded: Vec<u8> = Vec::new();
            while let Some((h, p)) = read_msg(s) {
                match h.command {
                    17 if matches!(state, 3 | 6) => {
                        let asked = u32_at(&p, 4).unwrap_or(0) as usize;
                        let mut n = asked.min(saved.len() - read_at);
                        if scenario == "migration-liar" && n == asked && read_at + n < saved.len() {
                            n += 1;
                        }
                        let mut r = ((8 + n) as u32).to_ne_bytes().to_vec();
                        r.extend_from_slice(&(n as u32).to_ne_bytes());
                        r.extend_from_slice(&saved[read_at..read_at + n]);
                        read_at += n;
                        reply(s, &h, &r);
                        continue;
                    }
                    18 if state == 4 => {
                        if scenario == "migration-stall" {
                            // Takes the first write and never answers anything again.
                            while read_msg(s).is_some() {}
                            return;
                        }
                        loaded.extend_from_slice(&p[8..]);
                        reply(s, &h, &[]);
                        continue;
                    }
                    17 | 18 => {
                        send(s, Header::error_reply_to(&h, 22), &[]);
                        continue;
                    }
                    4 => {
                        // What was loaded: its length and byte sum.
                        let sum: u32 = loaded.iter().map(|b| u32::from(*b)).sum();
                        let mut r = info_payload(loaded.len() as u32);
                        r[4..8].copy_from_slice(&sum.to_ne_bytes());
                        reply(s, &h, &r);
                        continue;
                    }
                    16 => {}
                    _ => {
                        reply(s, &h, &info_payload(0));
                        continue;
                    }
                }
                let flags = u32_at(&p, 4).unwrap_or(0);
                let (feature, ops) = (flags & 0xffff, flags >> 16);
                let mut r = p[..8].to_vec();
                let errno = match (feature, ops) {
                    (1 | 2, o) if o & 4 != 0 => None,
                    (_, o) if o & 4 != 0 => Some(95),
                    (1, 1) => {
                        r.extend_from_slice(&5u64.to_ne_bytes());
                        None
                    }
                    (2, 1) => {
                        r.extend_from_slice(&state.to_ne_bytes());
                        r.extend_from_slice(&u32::MAX.to_ne_bytes());
                        None
                    }
                    (6, 2) => {
                        // Settles on at least 4 KiB pages.
                        let page = u64::from_ne_bytes(p[8..16].try_into().unwrap_or([0; 8]));
                        r.extend_from_slice(&page.max(4096).to_ne_bytes());
                        r.extend_from_slice(&p[16..]);
                        None
                    }
                    (7, 2) => None,
                    (8, 1) => {
                        let long = |at: usize| u64_at(&p, at).unwrap_or(0);
                        let (length, page) = (long(16), long(24).max(1));
                        let pages = length.div_ceil(page);
                        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
                        let mut dirty = vec![1u64, 2, 5];
                        if scenario == "migration-liar" {
                            dirty.push(pages);
                        }
                        let bits = bitmap.len() as u64 * 64;
                        for d in dirty.into_iter().filter(|d| *d < bits) {
                            bitmap[(d / 64) as usize] |= 1 << (d % 64);
                        }
                        r.extend_from_slice(&p[8..32]);
                        for w in bitmap {
                            r.extend_from_slice(&w.to_ne_bytes());
                        }
                        None
                    }
                    (2, 2) => {
                        let to = u32_at(&p, 8).unwrap_or(0);
                        let arc = matches!(
                            (state, to),
                            (2, 1)
                                | (1, 2)
                                | (3, 1)
                                | (4, 1)
                                | (6, 2)
                                | (2, 6)
                                | (1, 3)
                                | (6, 3)
                                | (1, 4)
                        );
                        if !arc {
                            Some(22)
                        } else {
                            if !(scenario == "migration-liar" && to == 4) {
                                state = to;
                            }
                            r.extend_from_slice(&p[8..]);
                            None
                        }
                    }
                    _ => Some(95),
                };
                match errno {
                    Some(e) => send(s, Header::error_reply_to(&h, e), &[]),
                    None => {
                        let len = r.len() as u32;
                        r[0..4].copy_from_slice(&len.to_ne_bytes());
                        reply(s, &h, &r);
                    }
                }
            }
        }
        "io-fds" => {
            while let Some((h, p)) = read_msg(s) {
                let word = |at: usize| u32_at(&p, at).unwrap_or(0);
                match h.command {
                    5 => {
                        let mut r = [0u8; 32];
                        r[0..4].copy_from_slice(&32u32.to_ne_bytes());
                        r[4..8].copy_from_slice(&3u32.to_ne_bytes());
                        r[8..12].copy_from_slice(&word(8).to_ne_bytes());
                        r[16..24].copy_from_slice(&4096u64.to_ne_bytes());
                        reply(s, &h, &r);
                    }
                    6 => io_fds(s, &h, word(8), word(0)),
                    _ => reply(s, &h, &info_payload(0)),
                }
            }
        }
        "dma-write" => {
            while let Some((h, _)) = read_msg(s) {
                let mut write = 16u64.to_ne_bytes().to_vec();
                write.extend_from_slice(&4u64.to_ne_bytes());
                write.extend_from_slice(b"vfio");
                send(s, Header::command(902, 12, write.len(), false), &write);
                let Some((w, _)) = read_msg(s) else {
                    return;
                };
                send(s, Header::command(903, 11, 16, false), &write[..16]);
                let Some((_, r)) = read_msg(s) else {
                    return;
                };
                let mut p = [0u8; 16];
                if let Some(data) = r.get(16..20) {
                    p[0..4].copy_from_slice(data);
                }
                p[4..8].copy_from_slice(&w.error.to_ne_bytes());
                reply(s, &h, &p);
            }
        }
        "dma-flood" => {
            while let Some((h, _)) = read_msg(s) {
                let mut dma = [0u8; 16];
                dma[8..16].copy_from_slice(&8u64.to_ne_bytes());
                let mut burst = Vec::with_capacity(5000 * 32);
                for i in 0..5000u16 {
                    burst.extend_from_slice(&Header::command(i, 11, 16, false).encode());
                    burst.extend_from_slice(&dma);
                }
                let _ = s.write_all(&burst);
                for _ in 0..5000 {
                    if read_msg(s).is_none() {
                        return;
                    }
                }
                reply(s, &h, &info_payload(0));
            }
        }
        "dma-request" => {
            while let Some((h, _)) = read_msg(s) {
                let mut dma = [0u8; 16];
                dma[8..16].copy_from_slice(&8u64.to_ne_bytes());
                send(s, Header::command(900, 11, 16, false), &dma);
                let Some((answer, _)) = read_msg(s) else {
                    return;
                };
                reply(s, &h, &info_payload(answer.error));
            }
        }
        other => eprintln!("unknown scenario {other}"),
    }
}

fn main() {
    peer_main::serve("vfio-user-scripted-peer", known, |mut s, scenario| {
        run(&mut s, scenario)
    });
}
