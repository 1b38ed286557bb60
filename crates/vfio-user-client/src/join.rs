//! Several requests settled as one call: each part's completion updates a shared value, and
//! the last part to settle hands the caller that value, or the first failure, exactly once.
//! Region transfers split into pieces and interrupts wired in chunks both use it.

use crate::Error;
use std::sync::{Arc, Mutex, MutexGuard};

/// Called once with the joined value or the first failure.
pub type JoinDone<T> = Box<dyn FnOnce(Result<T, Error>) + Send>;

pub struct Join<T> {
    value: T,
    left: usize,
    failed: Option<Error>,
    done: Option<JoinDone<T>>,
}

/// A join shared by its parts' completions.
pub type SharedJoin<T> = Arc<Mutex<Join<T>>>;

impl<T: Default> Join<T> {
    /// A join of `parts` parts starting from `value`.
    pub fn new(value: T, parts: usize, done: JoinDone<T>) -> SharedJoin<T> {
        Arc::new(Mutex::new(Join {
            value,
            left: parts,
            failed: None,
            done: Some(done),
        }))
    }

    fn lock(this: &Mutex<Self>) -> MutexGuard<'_, Self> {
        this.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One part settled: `apply` gives its outcome, with the value to update. The last part
    /// calls `done` (outside the lock).
    pub fn settle(this: &Mutex<Self>, apply: impl FnOnce(&mut T) -> Result<(), Error>) {
        let fired = {
            let mut j = Self::lock(this);
            if let Err(e) = apply(&mut j.value) {
                j.failed.get_or_insert(e);
            }
            j.left -= 1;
            j.finish()
        };
        if let Some((done, result)) = fired {
            done(result);
        }
    }

    /// `unsent` parts will never be sent, because sending failed with `e`: the parts already
    /// sent settle the call, with `e` as its result.
    pub fn abandon(this: &Mutex<Self>, unsent: usize, e: Error) {
        let fired = {
            let mut j = Self::lock(this);
            j.failed.get_or_insert(e);
            j.left -= unsent;
            j.finish()
        };
        if let Some((done, result)) = fired {
            done(result);
        }
    }

    /// Sends the `parts` parts of `this` in order, `send(k)` sending part `k` (with a clone
    /// of `this` in its completion). If the first cannot be sent, nothing was: its error is
    /// returned and `done` is never called. If a later one cannot, none after it is sent, and
    /// the parts that were settle the call with that error.
    pub fn send_parts(
        this: &Mutex<Self>,
        parts: usize,
        mut send: impl FnMut(usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for k in 0..parts {
            if let Err(e) = send(k) {
                if k == 0 {
                    return Err(e);
                }
                Self::abandon(this, parts - k, e);
                break;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Option<(JoinDone<T>, Result<T, Error>)> {
        if self.left > 0 {
            return None;
        }
        let done = self.done.take()?;
        Some(match self.failed.take() {
            Some(e) => (done, Err(e)),
            None => (done, Ok(std::mem::take(&mut self.value))),
        })
    }
}
