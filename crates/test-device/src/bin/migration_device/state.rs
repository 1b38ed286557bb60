//! The device's state (BAR0, memory that changes while it runs) and migration v2 over it:
//! the state machine, the save stream with pre-copy rounds that resend only the pages written
//! since the last round, and the loader that rebuilds the state from that stream.
//!
//! The stream is a sequence of records, each a 16-byte head (u64 offset, u32 length, u32
//! reserved) and `length` bytes of state at `offset`; a head with offset `END` closes it.
//! A stream that does not close, or a record past the state, leaves the device in ERROR.

use std::io::Read;
use vfio_user_proto::feature::MigState;

pub const PAGE: usize = 4096;
const RECORD_HEAD: usize = 16;
const END: u64 = u64::MAX;
/// Most pages one record carries: bounds the save buffer held between reads.
const RECORD_PAGES: usize = 256;

/// Why a request about the state was refused: the errno the reply carries.
pub type Errno = u32;
pub const EINVAL: Errno = 22;
pub const EBUSY: Errno = 16;

/// A piece of a MIG_DATA_READ reply: bytes of the record heads, or of the state.
pub enum Piece {
    Head(std::ops::Range<usize>),
    State(std::ops::Range<usize>),
}

pub struct Device {
    pub memory: Vec<u8>,
    pub state: MigState,
    /// Pages written since the save began or since the last time they were sent (one bit
    /// each): what the next pre-copy round, or STOP_COPY, still has to send.
    unsent: Vec<u64>,
    /// Where the search for the next unsent page resumes within a round.
    scan: usize,
    /// The record being read out: its head's bytes not yet read, then the state bytes
    /// [at, end) it carries (copied from the state when read, never staged).
    head: [u8; RECORD_HEAD],
    head_at: usize,
    at: usize,
    end: usize,
    end_sent: bool,
    load: Loader,
}

#[derive(Default)]
struct Loader {
    head: Vec<u8>,
    /// The record being filled: where its next byte goes, and how many are still to come.
    at: usize,
    left: usize,
    complete: bool,
}

impl Device {
    pub fn new(size: usize) -> Device {
        Device {
            memory: vec![0; size],
            state: MigState::Running,
            unsent: Vec::new(),
            scan: 0,
            head: [0; RECORD_HEAD],
            head_at: RECORD_HEAD,
            at: 0,
            end: 0,
            end_sent: false,
            load: Loader::default(),
        }
    }

    fn pages(&self) -> usize {
        self.memory.len().div_ceil(PAGE)
    }

    /// True while the device runs: its state may change.
    pub fn running(&self) -> bool {
        matches!(self.state, MigState::Running | MigState::PreCopy)
    }

    /// Writes `data` at `offset` of the state (checked by the caller), remembering the pages
    /// for the save in progress. Refused unless the device runs.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), Errno> {
        if !self.running() {
            return Err(EBUSY);
        }
        self.memory[offset..offset + data.len()].copy_from_slice(data);
        self.touched(offset, data.len());
        Ok(())
    }

    /// The device's own work: it rewrites `count` pages of its state (every `stride`-th
    /// page from `first`, wrapping), each filled with a byte that changes every time.
    pub fn work(&mut self, first: usize, stride: usize, count: usize) -> Result<(), Errno> {
        let pages = self.pages();
        if pages == 0 {
            return Ok(());
        }
        for k in 0..count {
            let page = (first + k * stride.max(1)) % pages;
            let at = page * PAGE;
            let end = (at + PAGE).min(self.memory.len());
            let fill = self.memory[at].wrapping_add((k as u8).wrapping_add(1));
            self.write(at, &vec![fill; end - at])?;
        }
        Ok(())
    }

    fn touched(&mut self, offset: usize, len: usize) {
        if self.state != MigState::PreCopy || len == 0 {
            return;
        }
        for page in offset / PAGE..=(offset + len - 1) / PAGE {
            self.unsent[page / 64] |= 1 << (page % 64);
        }
    }

    /// Moves to `to`, which must be one direct arc away (the client walks longer paths).
    pub fn set_state(&mut self, to: MigState) -> Result<(), Errno> {
        let from = self.state;
        if !from.has_arc_to(to) {
            return Err(EINVAL);
        }
        match (from, to) {
            (MigState::Running, MigState::PreCopy) | (MigState::Stop, MigState::StopCopy) => {
                self.begin_save()
            }
            // Pre-copy's leftovers (pages written since last sent, bytes not yet read) go
            // first in STOP_COPY.
            (MigState::PreCopy, MigState::StopCopy) => self.scan = 0,
            (MigState::Stop, MigState::Resuming) => self.load = Loader::default(),
            (MigState::Resuming, MigState::Stop) if !self.load.complete => {
                self.state = MigState::Error;
                return Err(EINVAL);
            }
            _ => {}
        }
        if !streaming(to) {
            self.end_save();
        }
        self.state = to;
        Ok(())
    }

    /// DEVICE_RESET: running again, state cleared, any migration abandoned.
    pub fn reset(&mut self) {
        self.memory.fill(0);
        self.end_save();
        self.load = Loader::default();
        self.state = MigState::Running;
    }

    fn begin_save(&mut self) {
        let pages = self.pages();
        self.unsent = vec![u64::MAX; pages.div_ceil(64)];
        if !pages.is_multiple_of(64) {
            if let Some(last) = self.unsent.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        self.scan = 0;
        self.head_at = RECORD_HEAD;
        self.at = 0;
        self.end = 0;
        self.end_sent = false;
    }

    fn end_save(&mut self) {
        self.unsent = Vec::new();
        self.head_at = RECORD_HEAD;
        self.at = 0;
        self.end = 0;
    }

    /// MIG_DATA_READ: the next `want` bytes of the stream at most, as pieces to send in order
    /// (record heads are appended to `heads`; state bytes are sent from the state itself).
    /// Fewer than `want` means this round (pre-copy) or the whole stream (STOP_COPY) ended.
    pub fn read(&mut self, want: usize, heads: &mut Vec<u8>) -> Result<Vec<Piece>, Errno> {
        if !matches!(self.state, MigState::PreCopy | MigState::StopCopy) {
            return Err(EINVAL);
        }
        let mut pieces = Vec::new();
        let mut left = want;
        while left > 0 {
            if self.head_at < RECORD_HEAD {
                let n = left.min(RECORD_HEAD - self.head_at);
                let at = heads.len();
                heads.extend_from_slice(&self.head[self.head_at..self.head_at + n]);
                pieces.push(Piece::Head(at..at + n));
                self.head_at += n;
                left -= n;
            } else if self.at < self.end {
                let n = left.min(self.end - self.at);
                pieces.push(Piece::State(self.at..self.at + n));
                self.at += n;
                left -= n;
            } else if !self.next_record() {
                // The round is over; the next one looks at every page again.
                self.scan = 0;
                break;
            }
        }
        Ok(pieces)
    }

    /// Starts the next record: the next run of unsent pages, or the end.
    fn next_record(&mut self) -> bool {
        if let Some((first, n)) = self.next_run() {
            self.at = first * PAGE;
            self.end = ((first + n) * PAGE).min(self.memory.len());
            self.head = head(self.at as u64, (self.end - self.at) as u32);
        } else if self.state == MigState::StopCopy && !self.end_sent {
            self.end_sent = true;
            self.head = head(END, 0);
        } else {
            return false;
        }
        self.head_at = 0;
        true
    }

    /// The next run of unsent pages from `scan`, marked sent.
    fn next_run(&mut self) -> Option<(usize, usize)> {
        let pages = self.pages();
        let is_unsent = |u: &[u64], p: usize| u[p / 64] & (1 << (p % 64)) != 0;
        let mut p = self.scan;
        while p < pages && !is_unsent(&self.unsent, p) {
            // Skip whole clean words.
            if p.is_multiple_of(64) && self.unsent[p / 64] == 0 {
                p += 64;
            } else {
                p += 1;
            }
        }
        if p >= pages {
            self.scan = pages;
            return None;
        }
        let first = p;
        while p < pages && p - first < RECORD_PAGES && is_unsent(&self.unsent, p) {
            self.unsent[p / 64] &= !(1 << (p % 64));
            p += 1;
        }
        self.scan = p;
        Some((first, p - first))
    }

    /// MIG_DATA_WRITE: the next `size` bytes of a stream, read from `src` straight into the
    /// state as they come (no staging). A stream that breaks the rules is refused (the device
    /// goes to ERROR) and the rest of its bytes are read and dropped, so the connection stays
    /// in step; the outer error is the connection's.
    pub fn load_from(
        &mut self,
        src: &mut impl Read,
        size: usize,
    ) -> std::io::Result<Result<(), Errno>> {
        let mut left = size;
        let outcome = self.load_some(src, &mut left)?;
        if left > 0 {
            std::io::copy(&mut src.take(left as u64), &mut std::io::sink())?;
        }
        Ok(outcome)
    }

    fn load_some(
        &mut self,
        src: &mut impl Read,
        left: &mut usize,
    ) -> std::io::Result<Result<(), Errno>> {
        if self.state != MigState::Resuming {
            return Ok(Err(EINVAL));
        }
        while *left > 0 {
            let l = &mut self.load;
            if l.complete {
                return Ok(self.fail());
            }
            if l.left > 0 {
                let n = l.left.min(*left);
                src.read_exact(&mut self.memory[l.at..l.at + n])?;
                l.at += n;
                l.left -= n;
                *left -= n;
                continue;
            }
            let have = l.head.len();
            let n = (RECORD_HEAD - have).min(*left);
            l.head.resize(have + n, 0);
            src.read_exact(&mut l.head[have..])?;
            *left -= n;
            if l.head.len() < RECORD_HEAD {
                break;
            }
            let offset = u64::from_ne_bytes(l.head[0..8].try_into().unwrap_or_default());
            let len = u32::from_ne_bytes(l.head[8..12].try_into().unwrap_or_default()) as usize;
            l.head.clear();
            if offset == END {
                l.complete = true;
                continue;
            }
            let size = self.memory.len() as u64;
            if offset > size || len as u64 > size - offset {
                return Ok(self.fail());
            }
            l.at = offset as usize;
            l.left = len;
        }
        Ok(Ok(()))
    }

    fn fail(&mut self) -> Result<(), Errno> {
        self.state = MigState::Error;
        Err(EINVAL)
    }
}

fn head(offset: u64, len: u32) -> [u8; RECORD_HEAD] {
    let mut h = [0u8; RECORD_HEAD];
    h[0..8].copy_from_slice(&offset.to_ne_bytes());
    h[8..12].copy_from_slice(&len.to_ne_bytes());
    h
}

/// A state in which the migration stream is open: being saved, or being loaded.
fn streaming(s: MigState) -> bool {
    matches!(
        s,
        MigState::PreCopy | MigState::StopCopy | MigState::Resuming
    )
}
