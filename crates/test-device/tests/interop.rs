//! The client crate against the real rust-vmm server, over a real UNIX socket.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use vfio_user_client::proto::Command;
use vfio_user_client::{Client, Options, Request};

struct Device {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Device {
    fn start() -> Device {
        let dir = std::env::temp_dir().join(format!(
            "vfio-user-interop-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("device.sock");
        let mut child = Process::new(env!("CARGO_BIN_EXE_vfio-user-test-device"))
            .arg(&socket)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The device says when it is listening: no sleeping.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening"), "device said {line:?}");
        Device { child, dir, socket }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn get_info_payload() -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(&16u32.to_ne_bytes());
    p
}

#[test]
fn negotiates_and_gets_device_info() {
    let dev = Device::start();
    let client = Client::connect(&dev.socket, Options::default()).unwrap();
    let v = client.negotiate().unwrap();
    assert_eq!((v.major, v.minor), (0, 0));
    assert_eq!(v.capabilities.max_msg_fds, 1);
    assert_eq!(v.capabilities.max_data_xfer_size, 1 << 20);
    let reply = client
        .send_wait(Request::new(
            Command::DeviceGetInfo as u16,
            &get_info_payload(),
        ))
        .unwrap();
    assert_eq!(reply.payload.len(), 16);
    let num_regions = u32::from_ne_bytes(reply.payload[8..12].try_into().unwrap());
    let num_irqs = u32::from_ne_bytes(reply.payload[12..16].try_into().unwrap());
    assert_eq!((num_regions, num_irqs), (9, 5));
}

#[test]
fn serves_clients_one_after_another() {
    let dev = Device::start();
    for _ in 0..3 {
        let client = negotiated(&dev);
        client
            .send_wait(Request::new(
                Command::DeviceGetInfo as u16,
                &get_info_payload(),
            ))
            .unwrap();
    }
}

#[test]
fn pipelined_requests_all_complete() {
    let dev = Device::start();
    let client = negotiated(&dev);
    let tickets: Vec<_> = (0..200)
        .map(|_| {
            client
                .send_nowait(Request::new(
                    Command::DeviceGetInfo as u16,
                    &get_info_payload(),
                ))
                .unwrap()
        })
        .collect();
    for t in tickets {
        assert_eq!(t.wait().unwrap().payload.len(), 16);
    }
}

#[test]
fn region_info_passes_the_bar_fd() {
    let dev = Device::start();
    let client = negotiated(&dev);
    let mut p = [0u8; 32];
    p[0..4].copy_from_slice(&32u32.to_ne_bytes());
    let first = client
        .send_wait(Request::new(Command::DeviceGetRegionInfo as u16, &p))
        .unwrap();
    assert!(first.fds.is_empty(), "no fd until argsz covers the caps");
    let needed = u32::from_ne_bytes(first.payload[0..4].try_into().unwrap());
    assert!(needed > 32);
    let mut p = vec![0u8; needed as usize];
    p[0..4].copy_from_slice(&needed.to_ne_bytes());
    let second = client
        .send_wait(Request::new(Command::DeviceGetRegionInfo as u16, &p))
        .unwrap();
    assert_eq!(second.fds.len(), 1);
    assert_eq!(second.payload.len(), needed as usize);
}

#[test]
fn server_error_reply_is_an_error() {
    let dev = Device::start();
    let client = negotiated(&dev);
    // Region index 99 does not exist: the crate answers EINVAL.
    let e = client
        .send_wait(Request::new(
            Command::RegionRead as u16,
            &access(99, 0, &[], 4),
        ))
        .unwrap_err();
    assert_eq!(e.code(), "EINVAL");
    // A backend error comes back with errno 0: EIO, never success.
    let e = client
        .send_wait(Request::new(
            Command::RegionRead as u16,
            &access(0, 8192, &[], 4),
        ))
        .unwrap_err();
    assert_eq!(e.code(), "EIO");
    // The stream is still in sync.
    client
        .send_wait(Request::new(
            Command::DeviceGetInfo as u16,
            &get_info_payload(),
        ))
        .unwrap();
}

fn access(region: u32, offset: u64, data: &[u8], count: u32) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend_from_slice(&region.to_ne_bytes());
    p.extend_from_slice(&count.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

fn negotiated(dev: &Device) -> Client {
    let client = Client::connect(&dev.socket, Options::default()).unwrap();
    client.negotiate().unwrap();
    client
}

#[test]
fn posted_write_is_ordered_before_the_next_read() {
    let dev = Device::start();
    let client = negotiated(&dev);
    client
        .post(Request::new(
            Command::RegionWrite as u16,
            &access(0, 128, b"posted!!", 8),
        ))
        .unwrap();
    let r = client
        .send_wait(Request::new(
            Command::RegionRead as u16,
            &access(0, 128, &[], 8),
        ))
        .unwrap();
    assert_eq!(&r.payload[16..], b"posted!!");
}

#[test]
fn msi_eventfd_fires_on_doorbell_and_reset_clears_bar0() {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::os::fd::AsFd;
    let dev = Device::start();
    let client = negotiated(&dev);
    // Wire MSI vector 2 to an eventfd (one fd per message: the server's max_msg_fds is 1).
    let efd =
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
    let mut set = Vec::new();
    set.extend_from_slice(&20u32.to_ne_bytes()); // argsz
    set.extend_from_slice(&(0x4u32 | 0x20).to_ne_bytes()); // DATA_EVENTFD | ACTION_TRIGGER
    set.extend_from_slice(&1u32.to_ne_bytes()); // MSI
    set.extend_from_slice(&2u32.to_ne_bytes()); // start
    set.extend_from_slice(&1u32.to_ne_bytes()); // count
    let fds = [efd.as_fd()];
    client
        .send_wait(Request {
            fds: &fds,
            ..Request::new(Command::DeviceSetIrqs as u16, &set)
        })
        .unwrap();
    client
        .send_wait(Request::new(
            Command::RegionWrite as u16,
            &access(0, 0xffc, &2u32.to_le_bytes(), 4),
        ))
        .unwrap();
    assert_eq!(efd.read().unwrap(), 1, "the device signalled vector 2");

    client
        .send_wait(Request::new(Command::DeviceReset as u16, &[]))
        .unwrap();
    let r = client
        .send_wait(Request::new(
            Command::RegionRead as u16,
            &access(0, 0xffc, &[], 4),
        ))
        .unwrap();
    assert_eq!(&r.payload[16..], &[0, 0, 0, 0], "reset cleared BAR0");
}
