//! A test server dies with the process that started it, and takes its socket with it: a test
//! script that crashes must not leave devices running (re-parented to init) and temp folders
//! behind. Shared by every binary of this crate (`#[path]`-included: they are separate bins).
//!
//! The parent's death is delivered as SIGTERM (`PR_SET_PDEATHSIG`); SIGTERM and SIGINT, from
//! it or from `TestDevice.close()`, are taken by one thread, which removes the socket and its
//! folder (only a `vfio-user-*` folder `vfio-user/testing` made, and only once empty) and
//! exits 0.

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::getppid;
use std::path::{Path, PathBuf};

/// Call first in `main`, before any thread starts (they inherit the blocked signals).
pub fn die_with_parent(socket: &Path) {
    let parent = getppid();
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked here, so no thread but the one below takes them (and nothing dies mid-write
    // by the default action).
    let _ = set.thread_block();
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    let socket: PathBuf = socket.to_path_buf();
    // The parent may have died before the request above took effect: we were re-parented.
    if getppid() != parent {
        remove(&socket);
        std::process::exit(0);
    }
    std::thread::spawn(move || {
        let _ = set.wait();
        remove(&socket);
        std::process::exit(0);
    });
}

/// Removes the socket, and its folder if `vfio-user/testing` made it and it is now empty.
fn remove(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    if let Some(dir) = socket.parent() {
        let ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vfio-user-"));
        if ours {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
