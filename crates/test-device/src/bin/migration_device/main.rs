//! `vfio-user-migration-device SOCKET [--state-mib N] [--no-write-multiple] [--pad-reads]`: a vfio-user
//! device with migration v2, written on our proto crate because rust-vmm's server has none.
//!
//! - Its state is BAR0 (region 0, `--state-mib` MiB, default 1): memory the client reads and
//!   writes, and the device rewrites itself when told to work (see `regions.rs`).
//! - Migration v2 with STOP_COPY and PRE_COPY: pre-copy rounds resend only the pages written
//!   since they were last sent; the stream loads into a fresh process (see `state.rs`).
//! - DMA maps are mmapped from their fds; the device writes through them on command, and
//!   dirty logging reports the pages it wrote (see `dma.rs`).
//! - REGION_WRITE_MULTI is offered (unless `--no-write-multiple`) and counted in BAR1.
//! - `--pad-reads` pads every MIG_DATA_READ reply to the size asked, as libvfio-user does.
//!
//! The device's state outlives connections; DMA maps and logging end with theirs. Each client
//! is served on its own thread.

mod conn;
mod dma;
#[path = "../../lifetime.rs"]
mod lifetime;
mod regions;
mod state;

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

fn usage() -> ! {
    eprintln!(
        "usage: vfio-user-migration-device SOCKET [--state-mib N] [--no-write-multiple] [--pad-reads]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else { usage() };
    lifetime::die_with_parent(std::path::Path::new(path));
    let mut state_mib = 1usize;
    let mut write_multiple = true;
    let mut pad_reads = false;
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--state-mib" => {
                state_mib = match rest.next().and_then(|n| n.parse().ok()) {
                    Some(n) if n <= 4096 => n,
                    _ => usage(),
                }
            }
            "--no-write-multiple" => write_multiple = false,
            "--pad-reads" => pad_reads = true,
            _ => usage(),
        }
    }
    let size = state_mib << 20;
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {path}: {e}");
            std::process::exit(1);
        }
    };
    let device = Arc::new(Mutex::new(state::Device::new(size)));
    let regions = Arc::new(regions::Regions::new(size as u64));
    let options = Arc::new(conn::Options {
        write_multiple,
        pad_reads,
    });
    println!("listening {path}");
    for sock in listener.incoming() {
        let Ok(sock) = sock else { break };
        let (d, r, o) = (device.clone(), regions.clone(), options.clone());
        std::thread::spawn(move || conn::Conn::new(sock, d, r, o).serve());
    }
    let _ = std::fs::remove_file(path);
}
