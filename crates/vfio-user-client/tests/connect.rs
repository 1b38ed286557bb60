//! Connecting: errors carry the errno and the path; a full listen backlog is waited out.

use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;
use vfio_user_client::connect_unix;

fn listener(path: &std::path::Path) -> OwnedFd {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    fd
}

/// Fills the listener's backlog with connections nobody accepts.
fn fill_backlog(path: &std::path::Path) -> Vec<OwnedFd> {
    let addr = UnixAddr::new(path).unwrap();
    let mut held = Vec::new();
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => held.push(fd),
            Err(nix::errno::Errno::EAGAIN) => return held,
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

#[test]
fn errors_name_the_errno_and_the_path() {
    let e = connect_unix("/nonexistent/x.sock".as_ref(), Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.code(), "ENOENT");
    assert!(e.message.contains("/nonexistent/x.sock"));
    let dir = std::env::temp_dir().join(format!("vfio-user-connect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gone.sock");
    drop(listener(&path)); // the file stays, nobody listens
    let e = connect_unix(&path, Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.code(), "ECONNREFUSED");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_backlog_is_retried_until_the_deadline() {
    let dir = std::env::temp_dir().join(format!("vfio-user-backlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("busy.sock");
    let l = listener(&path);
    let held = fill_backlog(&path);
    assert!(!held.is_empty());
    let e = connect_unix(&path, Duration::from_millis(30)).unwrap_err();
    assert_eq!(e.code(), "ETIMEDOUT");
    // Room appears while we retry: the connection then succeeds.
    let p2 = path.clone();
    let waiter = std::thread::spawn(move || connect_unix(&p2, Duration::from_secs(30)));
    let accepted = nix::sys::socket::accept(l.as_raw_fd()).unwrap();
    let connected = waiter.join().unwrap();
    assert!(connected.is_ok(), "{connected:?}");
    nix::unistd::close(accepted).unwrap();
    drop(held);
    std::fs::remove_dir_all(&dir).unwrap();
}
