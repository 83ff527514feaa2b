//! Dirty tracking: which pages of memory changed since the last snapshot, as a snapshot
//! plan.
//!
//! A [`Tracker`] write-protects regions of memory with userfaultfd and, after each
//! snapshot, [`take`](Tracker::take)s the pages written since the previous one, as a
//! plan of [`Span`]s for [`snapshot`](crate::snapshot::snapshot): written pages as
//! [`Span::Pages`], the rest as [`Span::Hole`] with [`HoleFlags::PARENT`] (their contents
//! are in the parent snapshot). It re-protects the pages it reports in the same step, so
//! no write falls between two plans. [`plan_from_dirty_log`] does the same for a dirty
//! bitmap brought from outside (KVM's dirty log).
//!
//! ```
//! use memmap2::MmapOptions;
//! use page_pipe::track::{TrackOptions, TrackRegion, Tracker};
//! use page_pipe::snapshot::Span;
//! let ps = page_pipe_sys::page_size().get();
//! let mut mem = MmapOptions::new().len(64 * ps).map_anon()?;
//! mem.fill(1);
//! let region = TrackRegion::of(0x4000_0000, &mem[..]); // snapshot address, memory
//! let mut tracker = match Tracker::start_async(&[region], &TrackOptions::default()) {
//!     Ok(t) => t,
//!     Err(e) => { println!("no tracking here: {e}"); return Ok(()); }
//! };
//! // ... a full snapshot of `mem` here; then the program writes:
//! mem[5 * ps] = 2;
//! mem[6 * ps + 100] = 2;
//! let plan = tracker.take()?;
//! assert!(plan.contains(&Span::Pages {
//!     addr: 0x4000_0000 + 5 * ps as u64, pages: 2, flags: page_pipe::BufFlags::empty(),
//! }));
//! assert_eq!(tracker.take()?.len(), 1); // nothing written since: one PARENT hole
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Regions
//!
//! A [`TrackRegion`] has a snapshot address (what the image records, e.g. a guest-physical
//! address) and a host range (the memory, by address and length), both page-aligned, a
//! whole number of pages, not overlapping other regions in either space. Memory that can
//! be tracked: in the asynchronous mode any mapping but `MAP_DROPPABLE` memory (with
//! `WP_ASYNC` the kernel write-protects any memory type, files of any file system
//! included); in the synchronous mode private anonymous memory, memfd/shmem and hugetlb
//! memory, not files of other file systems. Other memory is refused with `EINVAL`
//! ([`TrackError::Register`]). hugetlb memory is protected and reported in whole huge
//! pages, which stay huge. A region belongs to one userfaultfd at a time: memory
//! registered elsewhere (another tracker, a lazy restore)
//! is refused with `EBUSY`.
//!
//! # Two ways to learn of writes
//!
//! - **Asynchronous** ([`Method::Async`]; `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN`,
//!   Linux 6.7): the kernel itself lifts the protection of a page at its first write,
//!   without waking anyone, and remembers it. [`take`](Tracker::take) is one
//!   `PAGEMAP_SCAN` per region with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` and the
//!   category `PAGE_IS_WRITTEN`: it lists the written pages and protects them again in
//!   the same walk, page by page under the page-table lock. Writers never wait; a first
//!   write costs a minor fault (0.6 µs). Measured here: about 0.4 ms for 1 GiB with 1% of
//!   it written, 1.2–1.3 times the bare `PAGEMAP_SCAN` (see the README).
//! - **Synchronous** ([`Method::Sync`], the fallback for kernels without `WP_ASYNC`, or
//!   forced with [`Avoid::WP_ASYNC`]): each first write to a protected page waits while a
//!   handler thread records the page in a bitmap and lifts its protection
//!   (`UFFDIO_WRITEPROTECT` without `MODE_WP`, which wakes the writer: 3.5 µs with writer
//!   and handler on one CPU, 60–70 µs across CPUs, measured here). `take` reads the
//!   events still queued, swaps the bitmap for an empty one and protects the recorded
//!   pages again, holding the lock the handler holds while it handles events, so a fault
//!   is handled either before the swap (and its page protected again) or after (and
//!   reported next time).
//!
//! Both protect never-populated anonymous pages too (`UFFD_FEATURE_WP_UNPOPULATED`; on
//! kernels without it, anonymous regions are first populated for reading with
//! `MADV_POPULATE_READ`, mapping the shared zero page, as QEMU does).
//!
//! # The first plan: never-touched pages
//!
//! [`Tracker::full_plan`] is the plan of a full snapshot taken right after
//! [`start`](Tracker::start): with [`TrackOptions::leave_out_untouched`] (the default),
//! pages of private anonymous memory that were never populated (or only read: the
//! shared zero page) are [`Span::Hole`]s with empty [`HoleFlags`], which the image leaves
//! out and a restore reads as zeros, as CRIU and Firecracker's sparse files do. Found with
//! `PAGEMAP_SCAN` (`PAGE_IS_PRESENT`, `PAGE_IS_SWAPPED`), or `/proc/self/pagemap` bits
//! 63/62 where `PAGEMAP_SCAN` is missing, before the protection, and again after it for
//! pages populated meanwhile. Shared and file-backed memory is always planned whole: a
//! page it has not mapped may still hold data in its file.
//!
//! # What the tracker sees, and what it does not
//!
//! - It never reads, writes or borrows the memory: it names it by address. The program
//!   keeps writing it as before.
//! - Writes by the kernel for the process (`read(2)` into the memory, `KVM` for its guest,
//!   `O_DIRECT` reads) fault like user writes and are seen, in both modes, with a
//!   userfaultfd that handles kernel faults. An unprivileged process only gets
//!   user-mode faults (`UFFD_USER_MODE_ONLY`): with `WP_ASYNC` the kernel resolves its own
//!   writes anyway and they are still seen (checked by `tests/track` as user nobody); in
//!   the synchronous mode they would *fail* with `EFAULT`, so that combination is refused
//!   unless asked for ([`Privilege`]).
//! - Writes through pinned pages bypass page protection (DMA into memory registered
//!   with a device, `io_uring` fixed buffers): quiesce them before `take`.
//! - Discarded memory (`MADV_DONTNEED`, `MADV_REMOVE`) reads as zeros afterwards. With
//!   `WP_ASYNC` the kernel reports a discarded page as written (so the next plan captures
//!   its zeros) and protects it again. In the synchronous mode a discard drops the
//!   protection of anonymous pages for good, so the tracker asks for `UFFD_EVENT_REMOVE`,
//!   `UNMAP` and `REMAP` and, when one arrives, fails every later `take` with
//!   [`TrackError::Lost`]: take a full snapshot and start again.
//! - Writes through another mapping of a memfd, by another process, or with `write(2)` on
//!   its file descriptor change no page table of this mapping and are not seen.
//! - A transparent huge page stays huge under protection; its first write in the
//!   asynchronous mode splits its mapping (the kernel's choice). In the synchronous mode
//!   give the region a 2 MiB [granule](TrackRegion::with_granule) to keep it whole (the
//!   handler then lifts and reports whole huge pages). hugetlb pages always stay huge.
//! - A `take` that fails leaves the tracker failed: later calls return the same error,
//!   because it can no longer vouch that its plans are complete.
//!
//! # What is `unsafe`
//!
//! [`Tracker::start_async`] is safe: in the asynchronous mode no write ever waits, and
//! the tracker touches no memory. [`Tracker::start`] may fall back to the synchronous
//! mode, where every first write to a region waits for the handler thread: code that the
//! handler thread itself depends on (the allocator's heap, a lock, a thread stack) must
//! not live in or write the regions, or the process deadlocks; and under
//! user-mode-only faults, writes the kernel makes there fail, which libc code relying on
//! them cannot handle. Those are promises about code the tracker cannot see, so `start`
//! is an `unsafe fn` whose caller makes them ([`Tracker::start`]'s `# Safety`).
//!
//! The crate's rule is that a module holding `unsafe` code opts in and states the promise
//! it keeps. Tracking holds none: the system calls go through `page-pipe-sys`, whose
//! wrappers used here are safe (they take a userfaultfd only that crate can make, and
//! change protections, not memory); `start` only *declares* a contract
//! (`#[allow(unsafe_code)]` on that one item, which has no `unsafe` block). A live
//! snapshot reads the tracked memory (volatile copies of pages a writer came to first,
//! and chunks the kernel reads for the dump): that is in [`live`] and its state module,
//! which opt in, on the promise [`Tracker::live`] asks of its caller (the regions stay
//! mapped until the snapshot ends).
//!
//! # Handing over from a background snapshot (plan for the next step)
//!
//! A background snapshot (write-protect everything in a short pause, then dump while the
//! program runs, saving a page's old contents at its first write) needs synchronous
//! faults for the pages not yet dumped. Two facts constrain the handover to tracking: a
//! range belongs to one userfaultfd at a time (a second registration is `EBUSY`), and
//! `WP_ASYNC` is fixed for a whole userfaultfd when `UFFDIO_API` is called. The plan:
//!
//! 1. The background snapshot *is* a synchronous tracker with a richer fault handler:
//!    the same userfaultfd, registration and handler thread. In its pause it calls
//!    `take` (the dirty set of the incremental snapshot) and protects the whole range,
//!    which both starts the dump's copy-on-write and the next tracking epoch. During the
//!    dump, a fault on a page the plan still needs first copies the page aside, then does
//!    what the tracker does (record, lift, wake); any other fault only records. Pages
//!    the dump has passed are *not* lifted early, so every write after the instant of
//!    protection lands in the bitmap: the next `take` is complete. (An extra hook per
//!    fault in the synchronous engine; the engine's lock already orders it against
//!    `take`.)
//! 2. After the dump, either stay synchronous until the next snapshot (no second pause;
//!    each first write per page costs a fault round trip), or hand over to an
//!    asynchronous tracker in a second short pause: with writers paused, `take` the
//!    synchronous bitmap (pages written during the dump), drop the synchronous tracker
//!    (unregisters: the range is free), [`start_async`](Tracker::start_async) on the same
//!    regions (protects everything again: about 12 ms per GiB), then
//!    [`mark_written`](Tracker::mark_written) the pages of that bitmap so the next plan
//!    still holds them, and resume. Nothing is written while no userfaultfd watches.
//! 3. The next background snapshot starting from an asynchronous tracker does the
//!    reverse inside its pause: `take` (the dirty set), drop, start the synchronous
//!    engine, protect. The pause is the protection time either way.

mod bitmap;
mod error;
mod faults;
pub mod live;
mod live_state;
pub(crate) mod maps;
mod scan;
mod start;

use std::fmt;
use std::sync::Arc;

use bitflags::bitflags;
use page_pipe_sys::{Errno, Uffd, UffdFeatures, WriteProtectMode};

use crate::snapshot::Span;
use crate::types::{BufFlags, HoleFlags};

pub use bitmap::{DirtyLogError, extend_plan_from_dirty_log, plan_from_dirty_log};
pub use error::{LostBy, SystemOp, TrackError};
pub(crate) use error::{Name as ErrnoName, io_errno};
pub use live::{Live, LiveError, LiveKind, LiveOptions, LiveReport};

use bitmap::{push_plan, push_spans, set_range};
use faults::SyncEngine;
use scan::AsyncEngine;

/// A region of memory to track: `len` bytes of memory at host address `host`, recorded in
/// snapshots under the address `addr`.
///
/// Making one checks nothing and keeps no borrow; [`Tracker::start`] checks the rules of
/// the [module docs](self#regions).
///
/// ```
/// use page_pipe::track::TrackRegion;
/// let ram = vec![0u8; 1 << 16];
/// let r = TrackRegion::of(0x1_0000_0000, &ram);
/// assert_eq!((r.addr(), r.len()), (0x1_0000_0000, 1 << 16));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackRegion {
    addr: u64,
    host: usize,
    len: usize,
    granule: usize,
}

impl TrackRegion {
    /// The `len` bytes at `host`, under snapshot address `addr`.
    pub fn new(addr: u64, host: *const u8, len: usize) -> Self {
        Self {
            addr,
            host: host as usize,
            len,
            granule: 0,
        }
    }

    /// The memory of `mem` (only its address and length are kept), under snapshot
    /// address `addr`.
    pub fn of(addr: u64, mem: &[u8]) -> Self {
        Self::new(addr, mem.as_ptr(), mem.len())
    }

    /// In the synchronous mode, lifts protection and records writes in units of `bytes`
    /// (a whole unit at its first write), a power of two multiple of the page size that
    /// divides the host address and the length: 2 MiB keeps transparent huge pages whole.
    /// The asynchronous mode records pages one by one whatever the unit (the kernel lifts
    /// the protection). hugetlb memory always uses its huge page size. 0: the page size.
    pub fn with_granule(mut self, bytes: usize) -> Self {
        self.granule = bytes;
        self
    }

    /// The snapshot address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The host address of the memory.
    pub fn host(&self) -> usize {
        self.host
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes (refused by [`Tracker::start`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which userfaultfd the tracker may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Privilege {
    /// One that also sees the faults the kernel takes for the process, where this process
    /// may have it (`CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd = 1`, or access to
    /// `/dev/userfaultfd`); else, in the asynchronous mode, a user-mode-only one, which
    /// loses nothing there; else (synchronous mode) [`TrackError::Privilege`]. The
    /// default.
    #[default]
    Auto,
    /// Only one that sees kernel faults; [`TrackError::Privilege`] where refused.
    Full,
    /// A user-mode-only one (`UFFD_USER_MODE_ONLY`, allowed to every process). In the
    /// synchronous mode, writes the kernel makes into tracked memory for the process
    /// (`read(2)` into it, `KVM`) then fail with `EFAULT`.
    UserModeOnly,
}

bitflags! {
    /// Kernel facilities the tracker must not use even where offered, to take the paths
    /// older kernels take (for tests, and to compare paths).
    ///
    /// ```
    /// use page_pipe::track::{Avoid, TrackOptions};
    /// // The synchronous fallback, as on a kernel before 6.7.
    /// let opts = TrackOptions { avoid: Avoid::WP_ASYNC, ..TrackOptions::default() };
    /// # let _ = opts;
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Avoid: u32 {
        /// `UFFD_FEATURE_WP_ASYNC`: track synchronously, with a handler thread.
        const WP_ASYNC = 1 << 0;
        /// `UFFD_FEATURE_WP_UNPOPULATED`: populate anonymous regions for reading before
        /// protecting them (`MADV_POPULATE_READ`), as before 6.4.
        const WP_UNPOPULATED = 1 << 1;
        /// `PAGEMAP_SCAN`: find populated pages by reading `/proc/self/pagemap` (and, as
        /// `PAGEMAP_SCAN` is needed for it, track synchronously).
        const PAGEMAP_SCAN = 1 << 2;
    }
}

/// How to track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackOptions {
    /// Which userfaultfd may be used (default [`Privilege::Auto`]).
    pub privilege: Privilege,
    /// Whether [`Tracker::full_plan`] leaves pages never populated out, as holes without
    /// flags (default true).
    pub leave_out_untouched: bool,
    /// Kernel facilities not to use (default none).
    pub avoid: Avoid,
}

impl Default for TrackOptions {
    fn default() -> Self {
        Self {
            privilege: Privilege::Auto,
            leave_out_untouched: true,
            avoid: Avoid::empty(),
        }
    }
}

/// How a tracker learns of writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN`: the kernel records writes; writers
    /// never wait.
    Async,
    /// Synchronous write-protect faults recorded by a handler thread.
    Sync,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Async => "userfaultfd write-protect + PAGEMAP_SCAN (async)",
            Method::Sync => "userfaultfd write-protect faults, recorded by a handler thread (sync)",
        })
    }
}

/// Where the userfaultfd came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `userfaultfd(2)`.
    Syscall,
    /// `/dev/userfaultfd`.
    Device,
}

/// What a tracker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackInfo {
    /// How writes are learnt of.
    pub method: Method,
    /// Whether only user-mode faults are handled (`UFFD_USER_MODE_ONLY`).
    pub user_mode_only: bool,
    /// Where the userfaultfd came from.
    pub via: Via,
    /// The userfaultfd features asked for (and granted).
    pub features: UffdFeatures,
}

/// What a [`Tracker::take_into`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TakeReport {
    /// Pages written (in [`Span::Pages`]).
    pub written: u64,
    /// Spans appended.
    pub spans: usize,
}

/// A region as tracked: checked, with its page counts.
#[derive(Debug, Clone)]
pub(crate) struct Region {
    /// Snapshot address.
    pub addr: u64,
    /// Host address.
    pub host: usize,
    /// Bytes.
    pub len: usize,
    /// Pages.
    pub pages: u64,
    /// Tracking unit in pages (1, or a huge page's pages).
    pub granule: u64,
    /// Private anonymous memory: a page never populated reads as zeros.
    pub anon: bool,
}

impl Region {
    fn end(&self) -> usize {
        self.host + self.len
    }
}

enum Engine {
    None,
    Async(AsyncEngine),
    Sync(SyncEngine),
}

/// Tracks writes to regions of memory; see the [module docs](self).
///
/// Dropping it (or [`stop`](Self::stop)) unregisters the regions (lifting all
/// protection) and ends its handler thread, if any.
pub struct Tracker {
    uffd: Arc<Uffd>,
    regions: Vec<Region>,
    /// Indices into `regions` of those registered (unregistered on drop).
    registered: Vec<usize>,
    engine: Engine,
    /// Pages to report at the next take besides those written ([`Tracker::mark_written`],
    /// and what a failed scan found).
    pending: Vec<Vec<u64>>,
    /// One bitmap per region, swapped or filled at each take.
    scratch: Vec<Vec<u64>>,
    /// Pages no snapshot of the chain has (never populated when tracking started, not
    /// written since), per region; `None`: no such page. Plans keep them holes without
    /// flags (zeros), never `PARENT` holes, which a restore would look for in the parent.
    untouched: Vec<Option<Vec<u64>>>,
    page_size: usize,
    info: TrackInfo,
    failed: Option<TrackError>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("info", &self.info)
            .field("regions", &self.regions)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// What the tracker runs on.
    pub fn info(&self) -> TrackInfo {
        self.info
    }

    /// The write faults the handler thread served (synchronous mode; 0 otherwise).
    pub fn faults(&self) -> u64 {
        match &self.engine {
            Engine::Sync(s) => s.faults(),
            _ => 0,
        }
    }

    /// The plan of a full snapshot of the regions, the base of an incremental chain,
    /// taken right after tracking started: every page as [`Span::Pages`], except, with
    /// [`leave_out_untouched`](TrackOptions::leave_out_untouched), pages of private
    /// anonymous memory never populated then, which are [`Span::Hole`]s with empty flags
    /// (left out of the image, read back as zeros). Later [`take`](Self::take)s keep such
    /// pages holes without flags until they are written (a restore would look for a
    /// `PARENT` page in the parent, which lacks it). In snapshot-address order.
    pub fn full_plan(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for (r, never) in self.regions.iter().zip(&self.untouched) {
            match never {
                Some(never) => {
                    let bits: Vec<u64> = never.iter().map(|w| !w).collect();
                    push_spans(
                        &mut out,
                        &bits,
                        r.addr,
                        r.pages,
                        self.page_size as u64,
                        BufFlags::empty(),
                        HoleFlags::empty(),
                    );
                }
                None => out.push(Span::Pages {
                    addr: r.addr,
                    pages: r.pages,
                    flags: BufFlags::empty(),
                }),
            }
        }
        out
    }

    /// The plan of the pages written since tracking started or since the last take:
    /// written pages as [`Span::Pages`], the others as [`Span::Hole`] with
    /// [`HoleFlags::PARENT`], over all regions in snapshot-address order; the reported
    /// pages are protected again in the same step. Take it with the writers paused (as a
    /// consistent snapshot needs anyway): pages written while `take` runs are in this plan
    /// or the next.
    ///
    /// # Errors
    /// [`TrackError::Scan`], [`TrackError::Protect`] or [`TrackError::Lost`]; after an
    /// error every later take returns it again (see the [module docs](self)).
    pub fn take(&mut self) -> Result<Vec<Span>, TrackError> {
        let mut out = Vec::new();
        self.take_into(&mut out)?;
        Ok(out)
    }

    /// [`take`](Self::take), appending to `out`.
    ///
    /// # Errors
    /// As [`take`](Self::take); `out` is unchanged then.
    pub fn take_into(&mut self, out: &mut Vec<Span>) -> Result<TakeReport, TrackError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        for s in &mut self.scratch {
            s.fill(0);
        }
        let r = match &mut self.engine {
            Engine::Async(a) => a.collect(&self.regions, &mut self.scratch, self.page_size),
            Engine::Sync(s) => {
                s.collect(&self.uffd, &self.regions, &mut self.scratch, self.page_size)
            }
            Engine::None => Ok(()),
        };
        if let Err(e) = r {
            // Keep what was found for nobody to lose it, and fail from now on.
            for (p, s) in self.pending.iter_mut().zip(&self.scratch) {
                for (a, b) in p.iter_mut().zip(s) {
                    *a |= b;
                }
            }
            self.failed = Some(e.clone());
            return Err(e);
        }
        let mut report = TakeReport::default();
        let before = out.len();
        for (i, r) in self.regions.iter().enumerate() {
            let bits = &mut self.scratch[i];
            for (b, p) in bits.iter_mut().zip(self.pending[i].iter_mut()) {
                *b |= *p;
                *p = 0;
            }
            if let Some(never) = self.untouched[i].as_mut() {
                for (n, b) in never.iter_mut().zip(bits.iter()) {
                    *n &= !b;
                }
            }
            report.written += push_plan(
                out,
                bits,
                self.untouched[i].as_deref(),
                r.addr,
                r.pages,
                self.page_size as u64,
            );
        }
        report.spans = out.len() - before;
        Ok(report)
    }

    /// Adds `pages` pages from snapshot address `addr` to the next plan, as if written:
    /// for pages the caller knows changed without a write the tracker could see (pages
    /// written while no tracker watched, during a handover; see the
    /// [module docs](self#handing-over-from-a-background-snapshot-plan-for-the-next-step)).
    ///
    /// # Errors
    /// [`TrackError::NotTracked`] when the pages are not all within one region.
    pub fn mark_written(&mut self, addr: u64, pages: u64) -> Result<(), TrackError> {
        let ps = self.page_size as u64;
        let not = TrackError::NotTracked { addr, pages };
        let i = self
            .regions
            .partition_point(|r| r.addr <= addr)
            .checked_sub(1)
            .ok_or(not.clone())?;
        let r = &self.regions[i];
        let first = (addr - r.addr) / ps;
        if !addr.is_multiple_of(ps) || first.checked_add(pages).is_none_or(|end| end > r.pages) {
            return Err(not);
        }
        set_range(&mut self.pending[i], first, first + pages);
        Ok(())
    }

    /// Stops tracking: unregisters the regions (lifting all protection, waking any
    /// waiting writer) and ends the handler thread, if any.
    ///
    /// # Errors
    /// The first error of unregistering ([`TrackError::Protect`]) or of the handler thread
    /// ([`TrackError::Lost`]); everything is released anyway.
    pub fn stop(mut self) -> Result<(), TrackError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), TrackError> {
        let mut first = None;
        for &i in &self.registered {
            let r = &self.regions[i];
            if let Err(errno) = self.uffd.unregister(r.host, r.len) {
                first.get_or_insert(TrackError::Protect {
                    addr: r.addr,
                    host: r.host,
                    len: r.len,
                    errno,
                });
            }
            // A writer whose fault was queued but not handled when the range left the
            // userfaultfd waits on it still: wake it, so that it faults again, now on
            // memory no userfaultfd watches.
            let _ = self.uffd.wake(r.host, r.len);
        }
        self.registered.clear();
        if let Engine::Sync(s) = std::mem::replace(&mut self.engine, Engine::None)
            && let Err(e) = s.stop()
        {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Write-protects (or lifts the protection of) `len` bytes at `host` in region `r`,
/// retrying while the kernel says the mappings changed under it.
fn protect(uffd: &Uffd, r: &Region, host: usize, len: usize, on: bool) -> Result<(), TrackError> {
    let mode = if on {
        WriteProtectMode::WP
    } else {
        WriteProtectMode::empty()
    };
    loop {
        match uffd.writeprotect(host, len, mode) {
            Ok(()) => return Ok(()),
            Err(Errno::AGAIN) => continue,
            Err(errno) => {
                return Err(TrackError::Protect {
                    addr: r.addr,
                    host,
                    len,
                    errno,
                });
            }
        }
    }
}
