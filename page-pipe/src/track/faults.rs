//! The synchronous engine: a handler thread receives each write fault on a protected
//! page, records the page and lifts its protection (which wakes the writer); a take swaps
//! the record for an empty one and protects the recorded pages again.
//!
//! Ordering: the handler holds the state's lock from reading events until it has handled
//! them (recorded each fault's page and lifted its protection), and a take holds it from
//! reading and handling the events still queued, through the swap, until the recorded
//! pages are protected again. So a fault is handled wholly before a take (its page is in
//! that take's set and protected again by it) or wholly after (its page is in the next
//! set), and no page ends up unprotected without being in a set. Likewise an event that
//! loses tracking (a discard lets its `madvise(2)` caller go once the event is *read*) is
//! handled before any take that starts after that call returned.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use page_pipe_sys::{Errno, PagefaultFlags, Uffd, UffdEvent, WriteProtectMode};

use super::bitmap::{for_each_run, new_bitmap, set_range};
use super::live_state::{LiveState, save_page};
use super::{LostBy, Region, SystemOp, TrackError};

#[derive(Debug, Clone, Copy)]
struct HostRegion {
    host: usize,
    len: usize,
    pages: u64,
    granule: u64,
    /// Its index among the tracker's regions.
    index: usize,
}

#[derive(Debug)]
pub(super) struct State {
    /// Pages written since the last take, per region (tracker order).
    dirty: Vec<Vec<u64>>,
    faults: u64,
    lost: Option<TrackError>,
    /// A background snapshot in progress: which pages it still needs, which it is
    /// reading, and the pages saved aside for it.
    pub(super) live: Option<LiveState>,
}

#[derive(Debug)]
pub(super) struct Shared {
    uffd: Arc<Uffd>,
    /// Sorted by host address.
    regions: Vec<HostRegion>,
    ps: usize,
    state: Mutex<State>,
    /// Signalled when a background snapshot has finished reading pages or freed saved
    /// copies, or ended: a fault waiting for either goes on.
    pub(super) changed: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // The lock guards plain data; a panic while holding it leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why tracking was lost, if it was.
    pub(super) fn lost(&self) -> Option<TrackError> {
        self.lock().lost.clone()
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(st).unwrap_or_else(|e| e.into_inner())
    }

    fn lose(st: &mut State, host: u64, end: u64, by: LostBy) {
        st.lost.get_or_insert(TrackError::Lost { host, end, by });
    }

    /// The region holding host address `addr`.
    fn region(&self, addr: usize) -> Option<&HostRegion> {
        let i = self
            .regions
            .partition_point(|r| r.host <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        (addr < r.host + r.len).then_some(r)
    }

    /// Reads the events queued (without waiting) and handles them, until none is left.
    fn drain<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        events: &mut Vec<UffdEvent>,
    ) -> (MutexGuard<'a, State>, Result<(), Errno>) {
        loop {
            events.clear();
            match self.uffd.read_events(events, 64) {
                Ok(_) => {}
                Err(Errno::AGAIN) => return (st, Ok(())),
                Err(Errno::INTR) => continue,
                Err(e) => return (st, Err(e)),
            }
            for ev in events.drain(..) {
                st = self.on_event(st, ev);
            }
        }
    }

    fn on_event<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        ev: UffdEvent,
    ) -> MutexGuard<'a, State> {
        match ev {
            UffdEvent::Pagefault { flags, address, .. } => {
                return self.on_fault(st, flags, address);
            }
            UffdEvent::Remove { start, end } => Self::lose(&mut st, start, end, LostBy::Discard),
            UffdEvent::Unmap { start, end } => Self::lose(&mut st, start, end, LostBy::Unmap),
            UffdEvent::Remap { from, len, .. } => {
                Self::lose(&mut st, from, from + len, LostBy::Remap)
            }
            UffdEvent::Fork { uffd } => {
                drop(uffd);
                Self::lose(
                    &mut st,
                    0,
                    0,
                    LostBy::Unexpected(page_pipe_sys::UFFD_EVENT_FORK),
                );
            }
            UffdEvent::Unknown(m) => Self::lose(&mut st, 0, 0, LostBy::Unexpected(m.event)),
        }
        st
    }

    fn on_fault<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        flags: PagefaultFlags,
        address: u64,
    ) -> MutexGuard<'a, State> {
        let ps = self.ps;
        let addr = address as usize;
        let page_start = addr / ps * ps;
        let Some(r) = self
            .region(addr)
            .filter(|_| flags.contains(PagefaultFlags::WP))
        else {
            // Not a write-protect fault of ours: nothing to record, but never leave the
            // faulting thread waiting.
            let _ = self.uffd.wake(page_start, ps);
            Self::lose(
                &mut st,
                page_start as u64,
                (page_start + ps) as u64,
                LostBy::Unexpected(page_pipe_sys::UFFD_EVENT_PAGEFAULT),
            );
            return st;
        };
        let page = ((addr - r.host) / ps) as u64;
        let first = page / r.granule * r.granule;
        let end = (first + r.granule).min(r.pages);
        let (host, len) = (r.host + first as usize * ps, (end - first) as usize * ps);
        // A background snapshot that still needs these pages gets their old contents
        // first; see the ordering in `live`'s module docs.
        while let Some(live) = st.live.as_mut() {
            if live.reading(r.index, first, end) {
                // The dump is reading them from memory: wait until it is done, then they
                // are dumped and need no copy.
                live.waits += 1;
                st = self.wait(st);
                continue;
            }
            let need = live.needed(r.index, first, end);
            if need > 0 && !live.room_for(need) {
                // The copies saved aside reached their bound: wait for the dump to
                // write some and free them.
                live.stalls += 1;
                st = self.wait(st);
                continue;
            }
            for p in first..end {
                if live.take_pending(r.index, p) {
                    let mut buf = live.buffer(ps);
                    save_page(r.host + p as usize * ps, &mut buf);
                    live.keep(r.index, p, buf);
                }
            }
            break;
        }
        set_range(&mut st.dirty[r.index], first, end);
        st.faults += 1;
        loop {
            match self.uffd.writeprotect(host, len, WriteProtectMode::empty()) {
                Ok(()) => break,
                Err(Errno::AGAIN) => continue,
                Err(e) => {
                    let _ = self.uffd.wake(host, len);
                    st.lost.get_or_insert(TrackError::Lost {
                        host: host as u64,
                        end: (host + len) as u64,
                        by: LostBy::Unprotect(e),
                    });
                    break;
                }
            }
        }
        st
    }

    /// When the handler can serve no more: unregister everything (lifting protection and
    /// waking every waiting writer), so no writer waits for a handler that is gone.
    fn release_all(&self) {
        for r in &self.regions {
            let _ = self.uffd.unregister(r.host, r.len);
            // Wake writers whose faults were queued before the range left the
            // userfaultfd: they fault again on memory no userfaultfd watches.
            let _ = self.uffd.wake(r.host, r.len);
        }
    }

    fn serve(&self, stop: OwnedFd) {
        let mut events = Vec::with_capacity(64);
        loop {
            let r = match self.uffd.wait(&stop) {
                Ok(true) => self.drain(self.lock(), &mut events).1,
                Ok(false) => return,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                Self::lose(&mut self.lock(), 0, 0, LostBy::Handler(e));
                self.release_all();
                return;
            }
        }
    }
}

/// A running handler thread and the state it shares with the tracker.
#[derive(Debug)]
pub(crate) struct SyncEngine {
    shared: Arc<Shared>,
    /// Dropping the write end wakes the handler (its read end hangs up) to end it.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl SyncEngine {
    pub fn spawn(uffd: Arc<Uffd>, regions: &[Region], ps: usize) -> Result<Self, TrackError> {
        let mut hr: Vec<HostRegion> = regions
            .iter()
            .enumerate()
            .map(|(index, r)| HostRegion {
                host: r.host,
                len: r.len,
                pages: r.pages,
                granule: r.granule,
                index,
            })
            .collect();
        hr.sort_by_key(|r| r.host);
        let shared = Arc::new(Shared {
            uffd,
            regions: hr,
            ps,
            state: Mutex::new(State {
                dirty: regions.iter().map(|r| new_bitmap(r.pages)).collect(),
                faults: 0,
                lost: None,
                live: None,
            }),
            changed: Condvar::new(),
        });
        let pipe = page_pipe_sys::pipe().map_err(|errno| TrackError::System {
            what: SystemOp::StopPipe,
            errno,
        })?;
        let s = Arc::clone(&shared);
        let read = pipe.read;
        let thread = std::thread::Builder::new()
            .name("page-pipe-uffd".into())
            .spawn(move || s.serve(read))
            .map_err(|e| TrackError::System {
                what: SystemOp::SpawnHandler,
                errno: super::error::io_errno(&e),
            })?;
        Ok(Self {
            shared,
            stop: Some(pipe.write),
            thread: Some(thread),
        })
    }

    pub fn faults(&self) -> u64 {
        self.shared.lock().faults
    }

    /// The state shared with the handler thread.
    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Moves the pages recorded since the last call into `bits` (all clear on entry), and
    /// protects them again, all under the lock the handler takes per fault.
    pub fn collect(
        &mut self,
        uffd: &Uffd,
        regions: &[Region],
        bits: &mut [Vec<u64>],
        ps: usize,
    ) -> Result<(), TrackError> {
        // Events queued but not read yet belong before this take.
        let mut events = Vec::new();
        let (mut st, r) = self.shared.drain(self.shared.lock(), &mut events);
        if let Err(e) = r {
            Shared::lose(&mut st, 0, 0, LostBy::Handler(e));
        }
        if let Some(e) = &st.lost {
            return Err(e.clone());
        }
        let mut runs = Vec::new();
        for (i, r) in regions.iter().enumerate() {
            std::mem::swap(&mut st.dirty[i], &mut bits[i]);
            runs.clear();
            for_each_run(&bits[i], r.pages, |s, e, set| {
                if set {
                    runs.push((s, e));
                }
            });
            // Many scattered runs: one call over the region costs less than one per run.
            // Measured here: about 1.2 us per call against 56 ns per present page for the
            // whole region, so the whole region wins past a run per 21 pages.
            if runs.len() as u64 > 64 && runs.len() as u64 > r.pages / 21 {
                super::protect(uffd, r, r.host, r.len, true)?;
                continue;
            }
            for &(s, e) in &runs {
                let (host, len) = (r.host + s as usize * ps, (e - s) as usize * ps);
                super::protect(uffd, r, host, len, true)?;
            }
        }
        Ok(())
    }

    /// Ends the handler thread and waits for it.
    pub fn stop(mut self) -> Result<(), TrackError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), TrackError> {
        drop(self.stop.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => Err(TrackError::Lost {
                host: 0,
                end: 0,
                by: LostBy::HandlerPanicked,
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        let _ = self.join();
    }
}
