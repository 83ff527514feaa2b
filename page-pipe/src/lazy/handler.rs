//! The restore's two threads and the state they share: the fault thread serves faults,
//! the prefetch thread brings the rest in, both fill pages with `UFFDIO_COPY` and
//! `UFFDIO_ZEROPAGE`, and whichever puts the last page in (or meets an error) ends the
//! restore.
//!
//! This module opts in to `unsafe` (the crate denies it elsewhere but in the few modules
//! DESIGN.md lists): it makes the kernel write into the destination. The promise it keeps:
//! it writes only pages of the range [`LazyRestore::start`](super::LazyRestore::start)
//! was handed (whose caller promised they are its to fill), only pages not yet present
//! (`UFFDIO_COPY` and `UFFDIO_ZEROPAGE` never replace a page: `EEXIST`), only while the
//! range is registered, and only from buffers this module owns. The kernel fills pages
//! only where *a* userfaultfd of the process registers them (`ENOENT` elsewhere); it
//! does not check that it is the one the fill goes through. So once the restore ends
//! and unregisters the range, a fill still under way fails, unless someone registered
//! the range again meanwhile, which the caller promised not to do before the restore's
//! threads are joined (`wait`, `stop`, drop). Discarding the range's old contents at the
//! start (`MADV_DONTNEED`) is the one write that replaces memory; the caller's contract
//! covers it.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use page_pipe_sys::{CopyMode, Errno, PartialFill, Uffd, UffdEvent, ZeropageMode};

use super::error::{FillOp, LazyThread};
use super::source::{From, Plan, Reader, Who};
use super::{LazyError, LazyReport};

/// Retries in a row of a fill the kernel answers with `EAGAIN` (the mappings changed
/// under it) or with nothing filled, before the restore gives up; progress starts the
/// count again.
const MAX_AGAIN: u32 = 1000;

/// The most runs left to bring in after faults that the fault thread keeps; older ones
/// are left to the prefetch thread (or to the next fault there).
const MAX_BACKLOG: usize = 4096;

/// Pages zero-filled at a time by a prefetch thread.
const ZERO_STEP: u64 = 512;

/// Pages a prefetch thread takes at a time (1 MiB of 4 KiB pages): the prefetch threads
/// share the range out in address order, as the eager restore's threads share chunks.
pub(super) const CLAIM: u64 = 256;

/// How a restore ended.
#[derive(Debug)]
pub(super) enum End {
    /// Every page is in.
    Complete,
    /// Stopped before every page was in.
    Stopped,
    /// Failed.
    Failed(LazyError),
}

#[derive(Debug, Default)]
struct Counts {
    faults: AtomicU64,
    woken: AtomicU64,
    fault_pages: AtomicU64,
    prefetch_pages: AtomicU64,
    zero_pages: AtomicU64,
}

#[derive(Debug)]
struct Ending {
    end: Option<End>,
    elapsed: Option<Duration>,
    /// Whether the end has been taken by `wait`/`stop`.
    taken: bool,
}

/// What the fault thread needs besides the shared state.
#[derive(Debug, Clone, Copy)]
pub(super) struct FaultConfig {
    pub run: u64,
    pub spin: Duration,
}

/// The state the restore's threads and its handle share.
#[derive(Debug)]
pub(super) struct Shared {
    uffd: Uffd,
    /// The destination's first byte and length.
    host: usize,
    len: usize,
    ps: usize,
    pages: u64,
    plan: Plan,
    reader: Reader,
    /// One bit per page: in (filled by a thread of the restore, or found present).
    bits: Vec<AtomicU64>,
    remaining: AtomicU64,
    /// The first page no prefetch thread has claimed yet.
    next_claim: AtomicU64,
    counts: Counts,
    ending: Mutex<Ending>,
    ended: Condvar,
    stopping: AtomicBool,
    /// The write end of the fault thread's stop pipe: closing it wakes the thread.
    stop: Mutex<Option<OwnedFd>>,
    /// Whether the range is registered (so that it is unregistered once).
    registered: AtomicBool,
    started: Mutex<Instant>,
}

impl Shared {
    pub(super) fn new(
        uffd: Uffd,
        host: usize,
        len: usize,
        ps: usize,
        plan: Plan,
        reader: Reader,
        stop: OwnedFd,
    ) -> Self {
        let pages = (len / ps) as u64;
        Self {
            uffd,
            host,
            len,
            ps,
            pages,
            plan,
            reader,
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            remaining: AtomicU64::new(pages),
            next_claim: AtomicU64::new(0),
            counts: Counts::default(),
            ending: Mutex::new(Ending {
                end: None,
                elapsed: None,
                taken: false,
            }),
            ended: Condvar::new(),
            stopping: AtomicBool::new(false),
            stop: Mutex::new(Some(stop)),
            registered: AtomicBool::new(false),
            started: Mutex::new(Instant::now()),
        }
    }

    fn ending(&self) -> MutexGuard<'_, Ending> {
        self.ending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the destination in missing mode: from now on every first touch of a
    /// page waits for the restore. Returns the calls the range supports.
    pub(super) fn register(&self) -> Result<page_pipe_sys::UffdIoctls, LazyError> {
        let ioctls = self
            .uffd
            .register(self.host, self.len, page_pipe_sys::RegisterMode::MISSING)
            .map_err(|errno| LazyError::Register {
                host: self.host,
                len: self.len,
                errno,
            })?;
        self.registered.store(true, Ordering::Release);
        Ok(ioctls)
    }

    /// Discards whatever the destination held (`MADV_DONTNEED`), so that every page is
    /// missing and comes from the image, and starts the clock.
    pub(super) fn discard(&self) -> Result<(), LazyError> {
        // SAFETY:
        // - `host..host + len` is the destination, page-aligned whole pages (checked by
        //   `start`);
        // - it is private anonymous memory (checked in /proc/self/maps by `start`), whose
        //   pages MADV_DONTNEED drops, so they are missing until filled;
        // - the caller of `start` gave the range to be filled and promised that no
        //   reference into it is used across the call (its `# Safety`).
        let r = unsafe {
            rustix::mm::madvise(
                std::ptr::without_provenance_mut(self.host),
                self.len,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
        r.map_err(|errno| LazyError::Discard {
            host: self.host,
            len: self.len,
            errno,
        })?;
        *self.started.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        Ok(())
    }

    /// Whether page `p` is in.
    fn is_in(&self, p: u64) -> bool {
        self.bits[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64) & 1 == 1
    }

    /// The first page from `p` on (below `limit`) that is not in, or `limit`.
    fn next_out(&self, mut p: u64, limit: u64) -> u64 {
        while p < limit {
            let w = !self.bits[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64);
            if w != 0 {
                return (p + u64::from(w.trailing_zeros())).min(limit);
            }
            p = (p / 64 + 1) * 64;
        }
        limit
    }

    /// The first page from `p` on (below `limit`) that is in, or `limit`.
    fn next_in(&self, mut p: u64, limit: u64) -> u64 {
        while p < limit {
            let w = self.bits[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64);
            if w != 0 {
                return (p + u64::from(w.trailing_zeros())).min(limit);
            }
            p = (p / 64 + 1) * 64;
        }
        limit
    }

    /// Marks pages `p..p + n` in; the thread that marks the last page ends the restore.
    fn mark(&self, p: u64, n: u64) {
        let mut newly = 0u64;
        let (mut at, end) = (p, p + n);
        while at < end {
            let bit = at % 64;
            let k = (64 - bit).min(end - at);
            let mask = if k == 64 {
                !0
            } else {
                ((1u64 << k) - 1) << bit
            };
            let old = self.bits[(at / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            newly += u64::from((mask & !old).count_ones());
            at += k;
        }
        if newly > 0 && self.remaining.fetch_sub(newly, Ordering::AcqRel) == newly {
            self.finish(End::Complete);
        }
    }

    fn host_of(&self, p: u64) -> usize {
        self.host + p as usize * self.ps
    }

    /// `UFFDIO_COPY` of `src` (whole pages) to pages `p..`, counted for `who`. Pages
    /// already there (`EEXIST`) are skipped, their waiters woken.
    fn copy_in(&self, p: u64, src: &[u8], who: Who) -> Result<(), LazyError> {
        let ps = self.ps;
        let mut off = 0usize;
        let mut again = 0;
        let mut cap = usize::MAX;
        while off < src.len() {
            let page = p + (off / ps) as u64;
            let dst = self.host_of(page);
            let len = (src.len() - off).min(cap);
            // SAFETY:
            // - `dst..dst + len` is within the destination: `p` and the pages of `src`
            //   are within the range (the callers take them from the plan);
            // - the destination is the caller's to fill (`start`'s contract), and the
            //   kernel fills only pages not present in a range a userfaultfd registers:
            //   ours until the restore ends, no other before its threads are joined
            //   (`start`'s contract), so no byte anyone could have read is replaced;
            // - `src[off..]` is this thread's buffer, mapped and readable for the call.
            let r = unsafe {
                self.uffd.copy(
                    std::ptr::without_provenance_mut(dst),
                    src[off..].as_ptr(),
                    len,
                    CopyMode::empty(),
                )
            };
            let (done, errno) = match r {
                Ok(done) => (done as usize, None),
                Err(PartialFill { done, errno }) => (done as usize, Some(errno)),
            };
            let done = done.min(len) / ps * ps;
            if done > 0 {
                self.count(who, (done / ps) as u64);
                self.mark(page, (done / ps) as u64);
                off += done;
                cap = usize::MAX;
                again = 0;
            }
            match errno {
                None if done > 0 => {}
                None | Some(Errno::AGAIN) if again < MAX_AGAIN => again += 1,
                Some(Errno::EXIST) => {
                    // Another thread of the restore got there first: in already.
                    let at = p + (off / ps) as u64;
                    let _ = self.uffd.wake(self.host_of(at), ps);
                    self.mark(at, 1);
                    off += ps;
                }
                // Perhaps the pages cross from one mapping into the next.
                Some(Errno::NOENT) if len > ps => cap = shorter(len, ps),
                e => {
                    return Err(LazyError::Fill {
                        op: FillOp::Copy,
                        host: self.host_of(p + (off / ps) as u64),
                        len: src.len() - off,
                        errno: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// `UFFDIO_ZEROPAGE` of pages `p..p + n`, as [`copy_in`](Self::copy_in).
    fn zero_in(&self, p: u64, n: u64) -> Result<(), LazyError> {
        let ps = self.ps;
        let (mut at, end) = (p, p + n);
        let mut again = 0;
        let mut cap = usize::MAX;
        while at < end {
            let len = ((end - at) as usize * ps).min(cap);
            // SAFETY:
            // - pages `at..end` are within the destination (the callers take them from
            //   the plan);
            // - the destination is the caller's to fill (`start`'s contract), and the
            //   kernel fills only pages not present in a range a userfaultfd registers:
            //   ours until the restore ends, no other before its threads are joined
            //   (`start`'s contract).
            let r = unsafe {
                self.uffd.zeropage(
                    std::ptr::without_provenance_mut(self.host_of(at)),
                    len,
                    ZeropageMode::empty(),
                )
            };
            let (done, errno) = match r {
                Ok(done) => (done as usize, None),
                Err(PartialFill { done, errno }) => (done as usize, Some(errno)),
            };
            let done = (done.min(len) / ps) as u64;
            if done > 0 {
                self.counts.zero_pages.fetch_add(done, Ordering::Relaxed);
                self.mark(at, done);
                at += done;
                cap = usize::MAX;
                again = 0;
            }
            match errno {
                None if done > 0 => {}
                None | Some(Errno::AGAIN) if again < MAX_AGAIN => again += 1,
                Some(Errno::EXIST) => {
                    let _ = self.uffd.wake(self.host_of(at), ps);
                    self.mark(at, 1);
                    at += 1;
                }
                Some(Errno::NOENT) if len > ps => cap = shorter(len, ps),
                e => {
                    return Err(LazyError::Fill {
                        op: FillOp::Zeropage,
                        host: self.host_of(at),
                        len: (end - at) as usize * ps,
                        errno: e,
                    });
                }
            }
        }
        Ok(())
    }

    fn count(&self, who: Who, pages: u64) {
        let c = match who {
            Who::Fault => &self.counts.fault_pages,
            Who::Prefetch => &self.counts.prefetch_pages,
        };
        c.fetch_add(pages, Ordering::Relaxed);
    }

    /// Brings pages `p..end` in, piece by piece, reading at most `buf.len()` bytes at a
    /// time, skipping pages in already.
    fn bring_in(&self, mut p: u64, end: u64, buf: &mut [u8], who: Who) -> Result<(), LazyError> {
        let ps = self.ps as u64;
        let step = (buf.len() as u64 / ps).max(1);
        let zero_step = if who == Who::Fault {
            end - p
        } else {
            ZERO_STEP
        };
        while p < end && !self.stopping.load(Ordering::Acquire) {
            p = self.next_out(p, end);
            if p >= end {
                break;
            }
            let piece = *self.plan.at(p);
            let limit = end.min(piece.end());
            match piece.from {
                From::Zero => {
                    let e = self.next_in(p, limit.min(p + zero_step));
                    self.zero_in(p, e - p)?;
                    p = e;
                }
                From::File { .. } | From::Remote => {
                    let e = self.next_in(p, limit.min(p + step));
                    let want = &mut buf[..((e - p) * ps) as usize];
                    let got = self.reader.read(&piece, p, want, who)?;
                    self.copy_in(p, &want[..(got * ps) as usize], who)?;
                    p += got;
                }
            }
        }
        Ok(())
    }

    /// Ends the restore (once; later calls do nothing): the range leaves the
    /// userfaultfd, every thread waiting on one of its faults is woken (it then sees the
    /// page as it is: filled, or an ordinary never-touched page, zeros), the threads are
    /// told to stop, and waiters on the handle are woken.
    pub(super) fn finish(&self, end: End) {
        let mut st = self.ending();
        if let Some(first) = &st.end {
            // A thread whose request found the page server connection broken by another
            // thread's failed request may get here first: the cause is the other's.
            let echo = matches!(first, End::Failed(e) if e.is_echo());
            if echo && matches!(&end, End::Failed(e) if !e.is_echo()) {
                st.end = Some(end);
            }
            return;
        }
        self.stopping.store(true, Ordering::Release);
        if self.registered.swap(false, Ordering::AcqRel) {
            let _ = self.uffd.unregister(self.host, self.len);
            // Threads whose faults were queued before the range left the userfaultfd:
            // they fault again on memory no userfaultfd watches.
            let _ = self.uffd.wake(self.host, self.len);
        }
        if !matches!(end, End::Complete) {
            self.reader.shut_down();
        }
        drop(
            self.stop
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let started = *self.started.lock().unwrap_or_else(PoisonError::into_inner);
        st.elapsed = Some(started.elapsed());
        let complete = matches!(end, End::Complete);
        st.end = Some(end);
        drop(st);
        self.ended.notify_all();
        if complete {
            self.reader.close();
        }
    }

    /// Shuts the page server connection down (if any), waking a thread blocked on it.
    pub(super) fn shut_down_source(&self) {
        self.reader.shut_down();
    }

    /// Whether the restore has ended.
    pub(super) fn is_finished(&self) -> bool {
        self.ending().end.is_some()
    }

    /// Waits until the restore has ended, at most `timeout` (`None`, or a timeout past
    /// what an `Instant` can hold: for ever). Returns whether it has.
    pub(super) fn wait_end(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.ending();
        while st.end.is_none() {
            st = match deadline {
                None => self.ended.wait(st).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    self.ended
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        true
    }

    /// Takes how the restore ended (once).
    pub(super) fn take_end(&self) -> Option<End> {
        let mut st = self.ending();
        if st.taken {
            return None;
        }
        st.taken = true;
        st.end.take()
    }

    /// What was done so far.
    pub(super) fn report(&self) -> LazyReport {
        let st = self.ending();
        let remaining = self.remaining.load(Ordering::Acquire);
        let elapsed = st.elapsed.unwrap_or_else(|| {
            self.started
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed()
        });
        drop(st);
        let c = &self.counts;
        LazyReport {
            pages: self.pages,
            pages_in: self.pages - remaining,
            faults: c.faults.load(Ordering::Relaxed),
            woken: c.woken.load(Ordering::Relaxed),
            fault_pages: c.fault_pages.load(Ordering::Relaxed),
            prefetch_pages: c.prefetch_pages.load(Ordering::Relaxed),
            zero_pages: c.zero_pages.load(Ordering::Relaxed),
            complete: remaining == 0,
            elapsed,
        }
    }

    /// The fault thread: waits for faults and serves each, the faulting page first, then
    /// the rest of its run when no other fault waits.
    pub(super) fn serve_faults(self: &Arc<Self>, stop: OwnedFd, cfg: FaultConfig) {
        let _guard = PanicGuard(self, LazyThread::Fault);
        let ps = self.ps;
        let mut buf = vec![0u8; cfg.run as usize * ps];
        let mut events = Vec::with_capacity(64);
        let mut backlog: VecDeque<(u64, u64)> = VecDeque::new();
        let mut last = Instant::now();
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            events.clear();
            match self.uffd.read_events(&mut events, 64) {
                Ok(_) => {
                    for ev in events.drain(..) {
                        if let Err(e) = self.on_event(ev, &mut buf, &mut backlog, cfg.run) {
                            self.finish(End::Failed(e));
                            return;
                        }
                    }
                    last = Instant::now();
                    continue;
                }
                Err(Errno::AGAIN) => {}
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    self.finish(End::Failed(LazyError::Events { errno }));
                    return;
                }
            }
            if let Some((s, e)) = backlog.pop_back() {
                if let Err(e) = self.bring_in(s, e, &mut buf, Who::Fault) {
                    self.finish(End::Failed(e));
                    return;
                }
                continue;
            }
            if !cfg.spin.is_zero() && last.elapsed() < cfg.spin {
                std::hint::spin_loop();
                continue;
            }
            match self.uffd.wait(&stop) {
                Ok(true) => {}
                Ok(false) => return,
                Err(errno) => {
                    self.finish(End::Failed(LazyError::Events { errno }));
                    return;
                }
            }
        }
    }

    fn on_event(
        &self,
        ev: UffdEvent,
        buf: &mut [u8],
        backlog: &mut VecDeque<(u64, u64)>,
        run: u64,
    ) -> Result<(), LazyError> {
        let address = match ev {
            UffdEvent::Pagefault { address, .. } => address as usize,
            UffdEvent::Fork { uffd } => {
                drop(uffd);
                return Err(LazyError::Unexpected {
                    event: page_pipe_sys::UFFD_EVENT_FORK,
                });
            }
            UffdEvent::Remap { .. } => return Err(unexpected(page_pipe_sys::UFFD_EVENT_REMAP)),
            UffdEvent::Remove { .. } => return Err(unexpected(page_pipe_sys::UFFD_EVENT_REMOVE)),
            UffdEvent::Unmap { .. } => return Err(unexpected(page_pipe_sys::UFFD_EVENT_UNMAP)),
            UffdEvent::Unknown(m) => return Err(unexpected(m.event)),
        };
        self.counts.faults.fetch_add(1, Ordering::Relaxed);
        let ps = self.ps;
        if address < self.host || address >= self.host + self.len {
            // Not ours (only our range is registered): never leave a thread waiting.
            let _ = self.uffd.wake(address / ps * ps, ps);
            return Ok(());
        }
        let p = ((address - self.host) / ps) as u64;
        if self.is_in(p) {
            // A fill by the other thread woke the faulting thread already; or the page
            // was discarded since it came in (the caller's contract forbids it), and
            // then it reads as zeros, as discarded memory does. Either way it must not
            // wait: a zero page where none is, a wake where one is.
            self.counts.woken.fetch_add(1, Ordering::Relaxed);
            // SAFETY:
            // - page `p` is within the destination (checked just above);
            // - the destination is the caller's to fill, and the kernel fills only a page
            //   not present (EEXIST otherwise, which changes nothing).
            let r = unsafe {
                self.uffd.zeropage(
                    std::ptr::without_provenance_mut(self.host_of(p)),
                    ps,
                    ZeropageMode::empty(),
                )
            };
            if r.is_err() {
                let _ = self.uffd.wake(self.host_of(p), ps);
            }
            return Ok(());
        }
        let piece = *self.plan.at(p);
        let block = p / run * run;
        let (start, end) = (
            block.max(piece.first),
            (block + run).min(piece.end()).min(self.pages),
        );
        match piece.from {
            From::Zero => {
                let e = self.next_in(p, end);
                self.zero_in(p, e - p)?;
                if start < p {
                    push(backlog, (start, p));
                }
            }
            From::File { .. } | From::Remote => {
                let one = &mut buf[..ps];
                let got = self.reader.read(&piece, p, one, Who::Fault)?;
                debug_assert_eq!(got, 1);
                self.copy_in(p, one, Who::Fault)?;
                // The rest of the run, after any fault waiting now: behind the page,
                // then (served first) ahead of it.
                if start < p {
                    push(backlog, (start, p));
                }
                if p + 1 < end {
                    push(backlog, (p + 1, end));
                }
            }
        }
        Ok(())
    }

    /// A prefetch thread: claims the next [`CLAIM`] pages of the range in address order
    /// until none is left, and brings those not yet in in, `step` pages at a time.
    pub(super) fn prefetch(self: &Arc<Self>, step: u64) {
        let _guard = PanicGuard(self, LazyThread::Prefetch);
        let mut buf = vec![0u8; step as usize * self.ps];
        loop {
            let first = self.next_claim.fetch_add(CLAIM, Ordering::AcqRel);
            if first >= self.pages || self.stopping.load(Ordering::Acquire) {
                return;
            }
            let end = (first + CLAIM).min(self.pages);
            if let Err(e) = self.bring_in(first, end, &mut buf, Who::Prefetch) {
                self.finish(End::Failed(e));
                return;
            }
        }
    }
}

/// The length to try next after a fill of `len` bytes (more than a page) met `ENOENT`:
/// half of it, whole pages. The kernel fills within one mapping a call and answers
/// `ENOENT` for a range that crosses into the next one, and the destination may be
/// several mappings (registered together); a range that is not registered any more
/// (the restore ended) or not mapped gives `ENOENT` down to a single page, and that is
/// the error.
fn shorter(len: usize, ps: usize) -> usize {
    (len / 2 / ps * ps).max(ps)
}

fn unexpected(event: u8) -> LazyError {
    LazyError::Unexpected { event }
}

fn push(backlog: &mut VecDeque<(u64, u64)>, run: (u64, u64)) {
    if backlog.len() >= MAX_BACKLOG {
        backlog.pop_front();
    }
    backlog.push_back(run);
}

/// Ends the restore if its thread panics, so that no faulting thread waits for a thread
/// that is gone.
struct PanicGuard<'a>(&'a Shared, LazyThread);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .finish(End::Failed(LazyError::Panicked { thread: self.1 }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy::LazySource;
    use crate::page_server::wire::Expected;
    use crate::page_server::{ClientError, PageServerClient, Peer};

    /// Two threads share the page server client: the one whose request failed breaks
    /// it, and the other, asking next, gets `Broken`. Whichever ends the restore first,
    /// its error is the cause, not the echo.
    #[test]
    fn the_cause_wins_over_the_broken_connection_it_left() {
        let flags = page_pipe_sys::UffdFlags::NONBLOCK | page_pipe_sys::UffdFlags::USER_MODE_ONLY;
        let Ok(uffd) = Uffd::open(flags) else {
            eprintln!("SKIPPED the_cause_wins_over_the_broken_connection_it_left: no userfaultfd");
            return;
        };
        let ps = crate::page_size();
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let client = PageServerClient::from_unix(ours).unwrap();
        let (plan, reader) = LazySource::page_server(client, 1, [(0, 1)])
            .prepare(0, 1, ps, false)
            .unwrap();
        let stop = page_pipe_sys::pipe().unwrap();
        // Never registered: `finish` unregisters nothing.
        let shared = Shared::new(uffd, ps, ps, ps, plan, reader, stop.write);
        let peer = || Peer::Unix(None);
        let echo = || LazyError::Remote {
            vaddr: 0,
            pages: 1,
            error: ClientError::Broken { peer: peer() },
        };
        shared.finish(End::Failed(echo()));
        shared.finish(End::Failed(LazyError::Remote {
            vaddr: 0,
            pages: 4,
            error: ClientError::Closed {
                peer: peer(),
                expected: Expected::GetReply,
                got: 0,
            },
        }));
        shared.finish(End::Failed(echo()));
        shared.finish(End::Stopped);
        let end = shared.take_end();
        assert!(
            matches!(
                end,
                Some(End::Failed(LazyError::Remote {
                    pages: 4,
                    error: ClientError::Closed { .. },
                    ..
                }))
            ),
            "{end:?}"
        );
    }
}
