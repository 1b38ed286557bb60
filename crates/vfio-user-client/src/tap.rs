//! A transparent relay between a VMM and its device that says what passes (`vfio-user tap`):
//! it listens on a socket; for each client that connects it connects to the server, and
//! relays both ways byte for byte, every fd forwarded with the bytes it came with and then
//! closed here. Beside the relay, each direction frames the stream to describe every message
//! (proto `describe.rs`) to a sink, and only while someone observes.
//!
//! Each session has two threads, one per direction, each with one buffer: a side that stops
//! reading blocks the thread writing to it, which stops reading the other side. A session
//! holds at most 2 x [`RELAY_BUFFER`] of relayed bytes (plus the kernel's socket buffers)
//! and 2 x (16 + `VERSION_PREFIX`) bytes of message prefix. A peer's EOF is passed on as a
//! shutdown of the other side's writing; the session ends once both directions have ended,
//! at once when either side fails, or once a side has hung up and the other has kept the
//! session open past the tap's linger ([`tap_io`](crate::tap_io)). No fd outlives its
//! session, and the tap removes only the socket it bound itself.

use crate::ids::IdMap;
use crate::socket::{cmsg_buffer, connect_unix};
use crate::tap_io::{self, Linger, Waited, TAP_LINGER};
use crate::Error;
use nix::errno::Errno;
use nix::sys::socket::{shutdown, Shutdown};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vfio_user_proto::describe::{describe, prefix_needed, Description};
use vfio_user_proto::{Header, HEADER_SIZE};

/// Bytes one direction of a session reads at a time (its only buffer).
pub const RELAY_BUFFER: usize = 256 << 10;

/// Which side of a session sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Server,
}

impl Sender {
    /// `"client"` or `"server"`.
    pub fn name(self) -> &'static str {
        match self {
            Sender::Client => "client",
            Sender::Server => "server",
        }
    }

    fn other(self) -> Sender {
        match self {
            Sender::Client => Sender::Server,
            Sender::Server => Sender::Client,
        }
    }
}

/// A message that passed, described.
#[derive(Debug, Clone)]
pub struct TapRecord {
    pub session: u64,
    /// When it passed (the first byte read), since the Unix epoch.
    pub at: Duration,
    pub sender: Sender,
    pub header: Header,
    /// Fds that came with it (forwarded with it, then closed here).
    pub fds: usize,
    pub description: Description,
    /// The first bytes of its data (at most the tap's `head`).
    pub data_head: Vec<u8>,
    /// For a reply: the time since its request passed.
    pub latency: Option<Duration>,
}

/// What a tap reports.
#[derive(Debug, Clone)]
pub enum TapEvent {
    /// A client connected and the tap connected it to the server.
    Opened {
        session: u64,
    },
    /// A session ended; `reason` is why when it was not a clean EOF.
    Closed {
        session: u64,
        reason: Option<String>,
    },
    /// A client connected but was closed at once: the server could not be reached, or
    /// (`full`) the tap already has as many sessions open as it takes.
    Refused {
        reason: String,
        full: bool,
    },
    Record(Box<TapRecord>),
}

/// Sessions a tap keeps open at once by default: two relay threads each.
pub const MAX_TAP_SESSIONS: usize = 256;

/// Where a tap's events go; called on the accept and relay threads. It may block to slow a
/// flooding peer down (the binding's sink does, once JavaScript has thousands of lines to
/// take): the session waits, nothing is dropped.
pub type TapSink = Arc<dyn Fn(TapEvent) + Send + Sync>;

/// A running tap. Dropping it (or [`Tap::close`]) ends every session and stops listening.
pub struct Tap {
    /// Taken (closed) by `close`, once the accept thread has let go of its clone.
    listener: Mutex<Option<Arc<UnixListener>>>,
    path: PathBuf,
    /// The device and inode of the socket bound at `path`: `close` removes the file there
    /// only if it is still that socket, never one somebody else put in its place.
    bound: Option<(u64, u64)>,
    accept: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<TapShared>,
}

struct TapShared {
    upstream: PathBuf,
    head: usize,
    sink: TapSink,
    observed: AtomicBool,
    closing: AtomicBool,
    next: AtomicU64,
    /// Sessions open at most ([`MAX_TAP_SESSIONS`] unless [`Tap::set_max_sessions`]).
    max_sessions: AtomicUsize,
    /// Milliseconds a session stays open once a side has hung up ([`TAP_LINGER`] unless
    /// [`Tap::set_linger`]); read as each session starts.
    linger_ms: AtomicU64,
    sessions: Mutex<HashMap<u64, Session>>,
    /// The threads of sessions that have ended, for `close` to join (so that no report can
    /// follow it); pruned of those already finished as sessions end.
    finished: Mutex<Vec<JoinHandle<()>>>,
}

struct Session {
    client: Arc<OwnedFd>,
    server: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Tap {
    /// Listens on `listen` (which must not exist) and relays each client to `upstream`,
    /// showing `head` bytes of each message's data to `sink` while [`Tap::observe`] is on.
    /// Refuses a path longer than `sun_path` holds (ENAMETOOLONG), and an `upstream` that is
    /// the socket it would listen on (EINVAL: the tap would connect to itself).
    pub fn listen(
        listen: &Path,
        upstream: &Path,
        head: usize,
        sink: TapSink,
    ) -> Result<Tap, Error> {
        let shown = listen.display();
        // sun_path holds 108 bytes with the NUL; std says only "invalid argument".
        if listen.as_os_str().len() >= SUN_PATH {
            return Err(Error::new(
                Errno::ENAMETOOLONG,
                format!(
                    "cannot listen on {shown}: the path is {} bytes, longer than a UNIX socket address holds ({} bytes)",
                    listen.as_os_str().len(),
                    SUN_PATH - 1
                ),
            ));
        }
        let listener = UnixListener::bind(listen).map_err(|e| {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EINVAL as i32));
            Error::new(errno, format!("cannot listen on {shown}: {e}"))
        })?;
        let bound = identity(listen);
        if bound.is_some() && identity(upstream) == bound {
            drop(listener);
            let _ = std::fs::remove_file(listen);
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "{shown} and {} are the same socket: the tap would connect to itself",
                    upstream.display()
                ),
            ));
        }
        let listener = Arc::new(listener);
        let shared = Arc::new(TapShared {
            upstream: upstream.to_path_buf(),
            head,
            sink,
            observed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            next: AtomicU64::new(1),
            max_sessions: AtomicUsize::new(MAX_TAP_SESSIONS),
            linger_ms: AtomicU64::new(TAP_LINGER.as_millis() as u64),
            sessions: Mutex::new(HashMap::new()),
            finished: Mutex::new(Vec::new()),
        });
        let (l, s) = (listener.clone(), shared.clone());
        let accept = std::thread::Builder::new()
            .name("vfio-user-tap".into())
            .spawn(move || accept_loop(&l, &s))
            .map_err(|e| {
                Error::new(Errno::EAGAIN, format!("cannot start the tap's thread: {e}"))
            })?;
        Ok(Tap {
            listener: Mutex::new(Some(listener)),
            path: listen.to_path_buf(),
            bound,
            accept: Mutex::new(Some(accept)),
            shared,
        })
    }

    /// Describe messages to the sink (true) or only relay them (false, the default).
    pub fn observe(&self, on: bool) {
        self.shared.observed.store(on, Ordering::Relaxed);
    }

    /// Sessions open at most from now on; a client past them is closed (and reported
    /// `Refused`) until one ends.
    pub fn set_max_sessions(&self, n: usize) {
        self.shared.max_sessions.store(n, Ordering::Relaxed);
    }

    /// How long a session stays open once one of its sides has hung up (its EOF, or its
    /// socket closed) while the other neither closes nor moves data: a server that never
    /// reads, or keeps its socket after EOF, holds a session (two threads, two fds) no
    /// longer than this. For sessions that start from now on.
    pub fn set_linger(&self, linger: Duration) {
        let ms = u64::try_from(linger.as_millis()).unwrap_or(u64::MAX);
        self.shared.linger_ms.store(ms, Ordering::Relaxed);
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        lock(&self.shared.sessions).len()
    }

    /// Stops listening, ends every session (both sockets shut down, fds closed) and waits
    /// for every thread. Idempotent.
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // A listening socket shut down wakes its accept() with an error.
        let listener = lock(&self.listener).take();
        if let Some(l) = &listener {
            let _ = shutdown(l.as_raw_fd(), Shutdown::Both);
        }
        if let Some(t) = lock(&self.accept).take() {
            let _ = t.join();
        }
        // The accept thread's clone is gone with it: this closes the listening socket.
        drop(listener);
        let sessions: Vec<Session> = lock(&self.shared.sessions)
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in &sessions {
            let _ = shutdown(s.client.as_raw_fd(), Shutdown::Both);
            let _ = shutdown(s.server.as_raw_fd(), Shutdown::Both);
        }
        for s in sessions {
            for t in s.threads {
                let _ = t.join();
            }
        }
        // Threads of sessions that ended by themselves: once they are joined, nothing more
        // is reported.
        let finished: Vec<JoinHandle<()>> = lock(&self.shared.finished).drain(..).collect();
        for t in finished {
            let _ = t.join();
        }
        // Only the socket this tap bound: the path may since name another file (replaced
        // while it ran, or another tap's socket after this one's was removed).
        if self.bound.is_some() && identity(&self.path) == self.bound {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The longest socket path plus its NUL (`sizeof(sun_path)` on Linux).
const SUN_PATH: usize = 108;

/// The device and inode of the file at `path`, if there is one.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(listener: &UnixListener, shared: &Arc<TapShared>) {
    loop {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            // Shut down by close(): no more clients.
            Err(_) if shared.closing.load(Ordering::SeqCst) => return,
            Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
            // Out of fds, or a client gone before it was accepted: go on accepting, after a
            // pause so that a lasting shortage does not spin.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let open = lock(&shared.sessions).len();
        let max = shared.max_sessions.load(Ordering::Relaxed);
        if open >= max {
            // Each session is two threads and their buffers: a client that keeps connecting
            // must not exhaust them. It is closed, as when the server cannot be reached.
            drop(client);
            let reason = format!("{open} sessions are open, the most the tap takes");
            (shared.sink)(TapEvent::Refused { reason, full: true });
            continue;
        }
        start_session(shared, client);
    }
}

/// Connects `client` to the server and starts its two relay threads.
fn start_session(shared: &Arc<TapShared>, client: UnixStream) {
    let server = match connect_unix(&shared.upstream, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            (shared.sink)(TapEvent::Refused {
                reason: e.message,
                full: false,
            });
            return;
        }
    };
    let id = shared.next.fetch_add(1, Ordering::Relaxed);
    let client = OwnedFd::from(client);
    // As for the server's side (connect_unix): a MiB-sized message leaves in one sendmsg.
    let _ = nix::sys::socket::setsockopt(
        &client,
        nix::sys::socket::sockopt::SndBuf,
        &crate::socket::SEND_BUFFER,
    );
    let client = Arc::new(client);
    let server = Arc::new(server);
    let pending = Arc::new(Mutex::new(Pending::default()));
    let linger = Duration::from_millis(shared.linger_ms.load(Ordering::Relaxed));
    let linger = Arc::new(Linger::new(linger));
    (shared.sink)(TapEvent::Opened { session: id });
    let mut sessions = lock(&shared.sessions);
    let mut threads = Vec::new();
    let mut failed = 0;
    let ended = Arc::new(Mutex::new(Ended::default()));
    for (sender, from, to) in [
        (Sender::Client, client.clone(), server.clone()),
        (Sender::Server, server.clone(), client.clone()),
    ] {
        let (s, p, e, l) = (
            shared.clone(),
            pending.clone(),
            ended.clone(),
            linger.clone(),
        );
        let t = std::thread::Builder::new()
            .name("vfio-user-tap".into())
            .spawn(move || {
                let result = relay(&s, id, sender, (&from, &to), &p, &l);
                // Let go of the sockets first: the last direction to end then closes them
                // (with the session's own handles) before the end is reported.
                drop((from, to));
                finish(&s, id, &e, result);
            });
        match t {
            Ok(t) => threads.push(t),
            Err(_) => {
                let _ = shutdown(client.as_raw_fd(), Shutdown::Both);
                let _ = shutdown(server.as_raw_fd(), Shutdown::Both);
                failed += 1;
            }
        }
    }
    sessions.insert(
        id,
        Session {
            client,
            server,
            threads,
        },
    );
    drop(sessions);
    // A direction whose thread could not start has ended too.
    for _ in 0..failed {
        finish(
            shared,
            id,
            &ended,
            Err("cannot start a relay thread".into()),
        );
    }
}

/// How the two directions of a session ended.
#[derive(Default)]
struct Ended {
    directions: usize,
    reason: Option<String>,
}

/// One direction is done: the second one to finish ends the session (its fds close once
/// both threads have let go of them) and reports it.
fn finish(shared: &Arc<TapShared>, id: u64, ended: &Mutex<Ended>, result: Result<(), String>) {
    let mut e = lock(ended);
    e.directions += 1;
    if let Err(r) = result {
        e.reason.get_or_insert(r);
    }
    if e.directions < 2 {
        return;
    }
    let reason = e.reason.take();
    drop(e);
    // Taken out of the table (unless close() took it first), which closes its sockets. Its
    // threads (this one, and one that has ended) are left for close() to join.
    let gone = lock(&shared.sessions).remove(&id);
    if let Some(s) = gone {
        let mut finished = lock(&shared.finished);
        finished.retain(|t| !t.is_finished());
        finished.extend(s.threads);
    }
    (shared.sink)(TapEvent::Closed {
        session: id,
        reason,
    });
}

/// Requests in flight one way, by id, and when they passed: a reply's latency.
#[derive(Default)]
struct Pending {
    from_client: IdMap<Instant>,
    from_server: IdMap<Instant>,
}

/// Relays `from` to `to` until EOF (passed on as a shutdown of `to`'s writing, and the start
/// of the session's linger), a failure or the linger's end (both sockets shut down),
/// describing messages on the way.
fn relay(
    shared: &TapShared,
    session: u64,
    sender: Sender,
    (from, to): (&OwnedFd, &OwnedFd),
    pending: &Mutex<Pending>,
    linger: &Linger,
) -> Result<(), String> {
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut cmsg = cmsg_buffer();
    let mut framer = TapFramer::new(shared.head);
    let failed = |w: Waited, doing: String| match w {
        Waited::Lingered(why) => why,
        Waited::Failed(e) => format!("{doing}: {}", e.desc()),
    };
    let result = loop {
        let got = match tap_io::recv(from, to, &mut buf, &mut cmsg, linger) {
            Ok(g) => g,
            Err(w) => break Err(failed(w, format!("reading from the {}", sender.name()))),
        };
        if got.bytes == 0 {
            // EOF: passed on, and this direction is done; the other has the linger left.
            let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
            linger.start();
            break Ok(());
        }
        let raw: Vec<RawFd> = got.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let chunk = &buf[..got.bytes];
        let observed = shared.observed.load(Ordering::Relaxed);
        let walked = framer.walk(chunk, raw.len(), observed);
        for r in walked.complete {
            report(shared, session, sender, r, pending);
        }
        // The fds belong to the last message that begins in this read (a read ends right after
        // the segment that carried them). Should a kernel return the end of a message without
        // fds before it in the same read (the one here does not: tried with both queued
        // before the first read), the bytes before it go on without them.
        let split = if raw.is_empty() {
            0
        } else {
            walked.last_start.unwrap_or(0)
        };
        let sent = tap_io::send_all(to, from, &chunk[..split], &[], linger)
            .and_then(|()| tap_io::send_all(to, from, &chunk[split..], &raw, linger));
        if let Err(w) = sent {
            let doing = format!("writing to the {}", sender.other().name());
            break Err(failed(w, doing));
        }
        // `got.fds` drops here: forwarded, so closed on our side.
    };
    if result.is_err() {
        let _ = shutdown(from.as_raw_fd(), Shutdown::Both);
        let _ = shutdown(to.as_raw_fd(), Shutdown::Both);
    }
    result
}

/// A message the framer has seen whole: its header, its first payload bytes, its fds.
struct Framed {
    header: Header,
    prefix: Vec<u8>,
    fds: usize,
    at: Instant,
}

/// A message being framed.
struct Current {
    header: Header,
    prefix: Vec<u8>,
    want: usize,
    left: usize,
    fds: usize,
    at: Instant,
    /// Kept from its first byte (someone observed when it began): only those are reported.
    kept: bool,
}

/// What one read framed: the messages it completed (while observed) and where, in it, the
/// last message that begins there begins.
struct Walked {
    complete: Vec<Framed>,
    last_start: Option<usize>,
}

/// Frames one direction's bytes into messages, keeping only what a description needs.
struct TapFramer {
    head: usize,
    header: Vec<u8>,
    current: Option<Current>,
    /// Once the stream cannot be framed (a size below the header's), nothing more is.
    lost: bool,
}

impl TapFramer {
    fn new(head: usize) -> TapFramer {
        TapFramer {
            head,
            header: Vec::with_capacity(HEADER_SIZE),
            current: None,
            lost: false,
        }
    }

    /// Frames `chunk`, one read that came with `fds` fds, keeping what a description needs
    /// when `keep`. The fds go with the last message that begins in the read (a sender
    /// puts them on the first byte of the message that carries them, and the kernel ends a
    /// read right after them); with none beginning there, with the message in progress.
    fn walk(&mut self, chunk: &[u8], fds: usize, keep: bool) -> Walked {
        /// The last message begun in this read, as far as the walk has got.
        enum Last {
            None,
            Gathering,
            Current,
            Completed(Option<usize>),
        }
        let mut complete = Vec::new();
        let mut last_start = None;
        let mut last = Last::None;
        let mut bytes = chunk;
        while !bytes.is_empty() && !self.lost {
            let at = chunk.len() - bytes.len();
            if let Some(c) = &mut self.current {
                let n = c.left.min(bytes.len());
                if c.kept && c.prefix.len() < c.want {
                    let take = (c.want - c.prefix.len()).min(n);
                    c.prefix.extend_from_slice(&bytes[..take]);
                }
                c.left -= n;
                bytes = &bytes[n..];
                if c.left == 0 {
                    let done = self.current.take().filter(|c| c.kept);
                    let index = done.map(|c| {
                        complete.push(Framed {
                            header: c.header,
                            prefix: c.prefix,
                            fds: c.fds,
                            at: c.at,
                        });
                        complete.len() - 1
                    });
                    if matches!(last, Last::Current) {
                        last = Last::Completed(index);
                    }
                }
                continue;
            }
            if self.header.is_empty() {
                last_start = Some(at);
                last = Last::Gathering;
            }
            let take = (HEADER_SIZE - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.header.len() < HEADER_SIZE {
                break;
            }
            let mut raw = [0u8; HEADER_SIZE];
            raw.copy_from_slice(&self.header);
            self.header.clear();
            let begun_here = matches!(last, Last::Gathering);
            let header = Header::decode(&raw);
            let now = Instant::now();
            let left = header.payload_len();
            let broken = (header.size as usize) < HEADER_SIZE;
            if broken || left == 0 {
                self.lost = broken;
                let index = keep.then(|| {
                    complete.push(Framed {
                        header,
                        prefix: Vec::new(),
                        fds: 0,
                        at: now,
                    });
                    complete.len() - 1
                });
                if begun_here {
                    last = Last::Completed(index);
                }
                continue;
            }
            let want = prefix_needed(&header, self.head);
            self.current = Some(Current {
                header,
                prefix: Vec::with_capacity(if keep { want } else { 0 }),
                want,
                left,
                fds: 0,
                at: now,
                kept: keep,
            });
            if begun_here {
                last = Last::Current;
            }
        }
        if fds > 0 {
            match last {
                Last::Completed(Some(i)) => {
                    if let Some(m) = complete.get_mut(i) {
                        m.fds += fds;
                    }
                }
                // Begun here but not reported (nobody observed when it began): nothing to count.
                Last::Completed(None) => {}
                // In progress (begun here, or before this read with none begun since).
                Last::Current | Last::None | Last::Gathering => {
                    if let Some(c) = &mut self.current {
                        c.fds += fds;
                    }
                }
            }
        }
        Walked {
            complete,
            last_start: if self.lost { None } else { last_start },
        }
    }
}

/// Describes a framed message and hands it to the sink, pairing replies with requests.
fn report(shared: &TapShared, session: u64, sender: Sender, m: Framed, pending: &Mutex<Pending>) {
    let h = m.header;
    let reply = h.is_reply();
    let latency = {
        let mut guard = lock(pending);
        let p = &mut *guard;
        let (mine, theirs) = match sender {
            Sender::Client => (&mut p.from_client, &mut p.from_server),
            Sender::Server => (&mut p.from_server, &mut p.from_client),
        };
        if reply {
            theirs
                .remove(&h.id)
                .map(|t| m.at.saturating_duration_since(t))
        } else {
            if !h.no_reply() {
                mine.insert(h.id, m.at);
            }
            None
        }
    };
    let description = describe(&h, &m.prefix);
    let data_head = match description.data_at {
        Some(at) => {
            let end = (at + shared.head)
                .min(m.prefix.len())
                .min(at + description.data_len as usize);
            m.prefix.get(at..end).unwrap_or_default().to_vec()
        }
        None => Vec::new(),
    };
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(m.at.elapsed());
    (shared.sink)(TapEvent::Record(Box::new(TapRecord {
        session,
        at,
        sender,
        header: h,
        fds: m.fds,
        description,
        data_head,
        latency,
    })));
}
