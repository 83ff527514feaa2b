//! [`CancelToken`]: stopping a migration from another thread.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::page_server::stream::Stream;

/// Cancels a migration, on either end, from any thread: clone it, give one clone to the
/// [`Sender`](super::Sender) or [`receive`](super::receive) (in their options), keep
/// the other, and call [`cancel`](Self::cancel).
///
/// - A sender stops at the next safe point: between two entries (never inside one) or
///   while it waits for its bandwidth cap. It then ends the stream with `FORCE_CLOSE`,
///   which the receiver reports as [`ReceiveErrorKind::Cancelled`](super::ReceiveErrorKind::Cancelled),
///   resumes the source if it paused it, and returns
///   [`MigrateErrorKind::Cancelled`](super::MigrateErrorKind::Cancelled).
/// - A receiver stops at once: a call waiting on the socket is woken (the socket is shut
///   down), and it returns [`ReceiveErrorKind::Cancelled`](super::ReceiveErrorKind::Cancelled);
///   its sender sees the connection closed.
///
/// Cancelling is for good: a cancelled token stays cancelled.
///
/// ```
/// use page_pipe::migrate::CancelToken;
/// let token = CancelToken::new();
/// let theirs = token.clone();
/// std::thread::spawn(move || theirs.cancel()).join().unwrap();
/// assert!(token.is_cancelled());
/// ```
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    cancelled: Mutex<bool>,
    wake: Condvar,
    /// Sockets to shut down on cancel (a receiver's), by registration number.
    sockets: Mutex<Vec<(u64, Stream)>>,
    next: AtomicU64,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels: every holder stops at its next safe point, and receivers waiting on a
    /// socket are woken.
    pub fn cancel(&self) {
        *self
            .inner
            .cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.inner.wake.notify_all();
        for (_, s) in self
            .inner
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            s.shutdown();
        }
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        *self
            .inner
            .cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `deadline` or until cancelled; whether it was cancelled.
    pub(crate) fn wait_until(&self, deadline: Instant) -> bool {
        let mut c = self
            .inner
            .cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if *c {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self
                .inner
                .wake
                .wait_timeout(c, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Shuts `s` down when cancelled (at once, if it is already), until the guard is
    /// dropped.
    pub(crate) fn watch(&self, s: &Stream) -> Watch<'_> {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = s.try_clone() {
            self.inner
                .sockets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((id, c));
        }
        if self.is_cancelled() {
            s.shutdown();
        }
        Watch { token: self, id }
    }
}

/// A socket registered with a [`CancelToken`]; unregistered (and its handle closed) when
/// dropped.
pub(crate) struct Watch<'a> {
    token: &'a CancelToken,
    id: u64,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.token
            .inner
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(i, _)| *i != self.id);
    }
}

/// Sleeps `d`, or until `token` (if any) is cancelled; whether it was.
pub(crate) fn sleep(token: Option<&CancelToken>, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    match token {
        Some(t) => t.wait_until(deadline),
        None => {
            std::thread::sleep(d);
            false
        }
    }
}
