//! Progress of long operations, reported to a callback at a bounded rate.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far an operation got: `done` pages of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesDone {
    /// Pages done so far.
    pub done: u64,
    /// Pages in all.
    pub total: u64,
}

/// A progress callback: called with [`PagesDone`] at most every
/// [`PROGRESS_INTERVAL`], and once more when the operation ends with all of it done. It
/// runs on the thread doing the work, so it should return quickly.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use page_pipe::{PagesDone, ProgressFn};
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = Arc::clone(&seen);
/// let progress: ProgressFn = Arc::new(move |p: PagesDone| log.lock().unwrap().push(p));
/// progress(PagesDone { done: 1, total: 2 });
/// assert_eq!(seen.lock().unwrap().len(), 1);
/// ```
pub type ProgressFn = Arc<dyn Fn(PagesDone) + Send + Sync>;

/// The least time between two calls of a [`ProgressFn`] (the last call excepted).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// Calls a [`ProgressFn`] as pages get done, at most every [`PROGRESS_INTERVAL`].
pub(crate) struct Throttle {
    f: Option<ProgressFn>,
    done: u64,
    total: u64,
    last: Option<Instant>,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("done", &self.done)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    pub(crate) fn new(f: Option<ProgressFn>, total: u64) -> Self {
        Self {
            f,
            done: 0,
            total,
            last: None,
        }
    }

    /// `pages` more pages are done.
    pub(crate) fn advance(&mut self, pages: u64) {
        self.done = (self.done + pages).min(self.total);
        let Some(f) = &self.f else { return };
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL)
        {
            self.last = Some(now);
            f(PagesDone {
                done: self.done,
                total: self.total,
            });
        }
    }

    /// The operation ended well: one last call with everything done.
    pub(crate) fn finish(&mut self) {
        if let Some(f) = &self.f {
            f(PagesDone {
                done: self.total,
                total: self.total,
            });
        }
    }
}
