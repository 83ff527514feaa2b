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
//! The crate's rule is that only the `source` module holds `unsafe` code. This module
//! holds none: the system calls go through `page-pipe-sys`, whose wrappers used here are
//! safe (they take a userfaultfd only that crate can make, and change protections, not
//! memory); `start` only *declares* a contract (`#[allow(unsafe_code)]` on that one
//! item, which has no `unsafe` block).
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
mod maps;
mod scan;

use std::fmt;
use std::sync::Arc;

use bitflags::bitflags;
use page_pipe_sys::{
    Errno, Pagemap, RegisterMode, Uffd, UffdFeatures, UffdFlags, UffdIoctls, WriteProtectMode,
};

use crate::snapshot::Span;
use crate::types::{BufFlags, HoleFlags};

pub use bitmap::{DirtyLogError, extend_plan_from_dirty_log, plan_from_dirty_log};
pub use error::{LostBy, TrackError};
pub use live::{Live, LiveError, LiveKind, LiveOptions, LiveReport};

use bitmap::{for_each_run, new_bitmap, push_plan, push_spans, set_range};
use error::io_errno;
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

fn check_regions(given: &[TrackRegion], ps: usize) -> Result<Vec<Region>, TrackError> {
    let mut regions = Vec::with_capacity(given.len());
    for r in given {
        let unit = if r.granule == 0 { ps } else { r.granule };
        let bad = TrackError::Unaligned {
            addr: r.addr,
            host: r.host,
            len: r.len,
            unit,
        };
        if !unit.is_power_of_two() || unit < ps {
            return Err(bad);
        }
        if r.len == 0 || r.addr % ps as u64 != 0 || r.host % unit != 0 || r.len % unit != 0 {
            return Err(bad);
        }
        if r.addr.checked_add(r.len as u64).is_none() || r.host.checked_add(r.len).is_none() {
            return Err(TrackError::Overflow { addr: r.addr });
        }
        regions.push(Region {
            addr: r.addr,
            host: r.host,
            len: r.len,
            pages: (r.len / ps) as u64,
            granule: (unit / ps) as u64,
            anon: false,
        });
    }
    regions.sort_by_key(|r| r.addr);
    for w in regions.windows(2) {
        if w[0].addr + w[0].len as u64 > w[1].addr {
            return Err(TrackError::Overlap {
                addr: w[1].addr,
                other: w[0].addr,
            });
        }
    }
    let mut by_host: Vec<&Region> = regions.iter().collect();
    by_host.sort_by_key(|r| r.host);
    for w in by_host.windows(2) {
        if w[0].end() > w[1].host {
            return Err(TrackError::Overlap {
                addr: w[1].addr,
                other: w[0].addr,
            });
        }
    }
    Ok(regions)
}

/// Opens a userfaultfd by the system call, or by the device when the call says `EPERM`.
fn open_full(flags: UffdFlags) -> Result<(Uffd, Via), (Errno, Errno)> {
    match Uffd::open(flags) {
        Ok(u) => Ok((u, Via::Syscall)),
        Err(Errno::PERM) => match Uffd::open_dev(flags) {
            Ok(u) => Ok((u, Via::Device)),
            Err(d) => Err((Errno::PERM, d)),
        },
        Err(e) => Err((e, e)),
    }
}

fn unprivileged_userfaultfd() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse().ok())
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
    /// Starts tracking writes to `regions` asynchronously (`UFFD_FEATURE_WP_ASYNC` and
    /// `PAGEMAP_SCAN`, Linux 6.7): registers them with a new userfaultfd and
    /// write-protects all their pages. No write to them will ever wait.
    ///
    /// Safe: see [What is `unsafe`](self#what-is-unsafe). See the
    /// [module docs](self) for an example.
    ///
    /// # Errors
    /// [`TrackError`]: bad regions; no userfaultfd ([`TrackError::Open`]) or one the
    /// options refuse ([`TrackError::Privilege`]); a kernel without `WP_ASYNC` or
    /// `PAGEMAP_SCAN`, or `opts.avoid` excluding them ([`TrackError::Unsupported`]);
    /// memory the kernel refuses to register ([`TrackError::Register`]: `EINVAL`,
    /// `EBUSY`, `EPERM`). Nothing stays registered after an error.
    pub fn start_async(
        regions: &[TrackRegion],
        opts: &TrackOptions,
    ) -> Result<Tracker, TrackError> {
        Self::start_inner(regions, opts, false)
    }

    /// Starts tracking writes to `regions`: asynchronously where the kernel offers it and
    /// `opts.avoid` allows it ([`start_async`](Self::start_async)), else with synchronous
    /// write faults recorded by a handler thread.
    ///
    /// ```
    /// use memmap2::MmapOptions;
    /// use page_pipe::track::{Avoid, Method, TrackOptions, TrackRegion, Tracker};
    /// let ps = page_pipe_sys::page_size().get();
    /// let mut mem = MmapOptions::new().len(16 * ps).map_anon()?;
    /// let opts = TrackOptions { avoid: Avoid::WP_ASYNC, ..TrackOptions::default() };
    /// // SAFETY: `mem` is this example's own anonymous mapping: no allocator heap, stack,
    /// // lock or kernel-maintained word lives in it, and its only writer is this thread,
    /// // which holds nothing the handler thread needs while it writes.
    /// let tracker = unsafe { Tracker::start(&[TrackRegion::of(0, &mem[..])], &opts) };
    /// let mut tracker = match tracker {
    ///     Ok(t) => t,
    ///     Err(e) => { println!("no tracking here: {e}"); return Ok(()); }
    /// };
    /// assert_eq!(tracker.info().method, Method::Sync);
    /// mem[3 * ps] = 1; // waits for the handler thread, a few microseconds
    /// let plan = tracker.take()?;
    /// assert_eq!(plan.len(), 3); // hole, page 3, hole
    /// assert_eq!(tracker.faults(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`start_async`](Self::start_async); [`TrackError::Unsupported`] only when the
    /// kernel has no userfaultfd write-protection at all.
    ///
    /// # Safety
    /// If tracking is synchronous ([`info`](Self::info) says [`Method::Sync`]), then from
    /// this call until the tracker is dropped, every first write to a page of the regions
    /// after a take, by any thread or by the kernel for the process, waits until the
    /// tracker's handler thread has recorded it. The caller promises, for that time:
    /// - nothing the handler thread needs lives in the regions: no memory the global
    ///   allocator hands out, no thread stack or thread-local storage, no lock or futex
    ///   word, no memory the kernel updates for the process (rseq areas, robust futex
    ///   lists, `clear_child_tid` words);
    /// - no thread writes the regions while holding something the handler thread may
    ///   wait for (the global allocator's lock), and no signal handler writes them;
    /// - with [`Privilege::UserModeOnly`]: nothing relies on the kernel's writes into
    ///   the regions succeeding (they fail with `EFAULT` instead of waiting).
    ///
    /// With asynchronous tracking nothing is promised: no write waits.
    #[allow(unsafe_code)] // declares the contract above; the body has no unsafe operation
    pub unsafe fn start(
        regions: &[TrackRegion],
        opts: &TrackOptions,
    ) -> Result<Tracker, TrackError> {
        Self::start_inner(regions, opts, true)
    }

    fn start_inner(
        given: &[TrackRegion],
        opts: &TrackOptions,
        allow_sync: bool,
    ) -> Result<Tracker, TrackError> {
        let ps = page_pipe_sys::page_size().get();
        let regions = check_regions(given, ps)?;

        // PAGEMAP_SCAN: there, and wanted?
        let pagemap = Pagemap::open_self().map_err(|errno| TrackError::System {
            what: "open /proc/self/pagemap",
            errno,
        });
        let scan_ok = !opts.avoid.contains(Avoid::PAGEMAP_SCAN)
            && pagemap.as_ref().is_ok_and(|pm| scan::probe(pm, ps).is_ok());

        // Which userfaultfd, and which method.
        let choose = |offered: UffdFeatures| -> Result<Method, TrackError> {
            if !offered.contains(UffdFeatures::PAGEFAULT_FLAG_WP) {
                return Err(TrackError::Unsupported {
                    missing: "userfaultfd write-protection (UFFD_FEATURE_PAGEFAULT_FLAG_WP, Linux 5.7)",
                    offered,
                });
            }
            let async_ok = offered.contains(UffdFeatures::WP_ASYNC)
                && !opts.avoid.contains(Avoid::WP_ASYNC)
                && scan_ok;
            match (async_ok, allow_sync) {
                (true, _) => Ok(Method::Async),
                (false, true) => Ok(Method::Sync),
                (false, false) => Err(TrackError::Unsupported {
                    missing: if opts.avoid.contains(Avoid::WP_ASYNC) {
                        "asynchronous write-protection, which the options avoid"
                    } else if !offered.contains(UffdFeatures::WP_ASYNC) {
                        "asynchronous write-protection (UFFD_FEATURE_WP_ASYNC, Linux 6.7)"
                    } else {
                        "PAGEMAP_SCAN on /proc/self/pagemap (Linux 6.7), or the options avoid it"
                    },
                    offered,
                }),
            }
        };
        let nb = UffdFlags::NONBLOCK;
        let umo = nb | UffdFlags::USER_MODE_ONLY;
        let sys = |what| move |errno| TrackError::System { what, errno };
        // What the kernel offers is asked on a descriptor made for that and closed: a
        // userfaultfd takes UFFDIO_API once.
        let open_umo = || Uffd::open(umo).map_err(|errno| TrackError::Open { errno });
        let (uffd, via, user_mode_only, method, offered) = match opts.privilege {
            Privilege::UserModeOnly => {
                let offered = open_umo()?
                    .api(UffdFeatures::empty())
                    .map_err(sys("ask UFFDIO_API"))?
                    .features;
                let method = choose(offered)?;
                (open_umo()?, Via::Syscall, true, method, offered)
            }
            Privilege::Full | Privilege::Auto => match open_full(nb) {
                Ok((probe, _)) => {
                    let offered = probe
                        .api(UffdFeatures::empty())
                        .map_err(sys("ask UFFDIO_API"))?
                        .features;
                    drop(probe);
                    let method = choose(offered)?;
                    let (u, via) =
                        open_full(nb).map_err(|(errno, _)| TrackError::Open { errno })?;
                    (u, via, false, method, offered)
                }
                Err((errno, _)) if errno != Errno::PERM => {
                    return Err(TrackError::Open { errno });
                }
                Err((syscall, device)) => {
                    let refused = |sync| TrackError::Privilege {
                        syscall,
                        device,
                        unprivileged_userfaultfd: unprivileged_userfaultfd(),
                        sync,
                    };
                    // No user-mode-only userfaultfd either (before 5.11): say why the
                    // full one was refused.
                    let offered = open_umo()
                        .map_err(|_| refused(!allow_sync))?
                        .api(UffdFeatures::empty())
                        .map_err(sys("ask UFFDIO_API"))?
                        .features;
                    let method = choose(offered)?;
                    if opts.privilege == Privilege::Full || method == Method::Sync {
                        return Err(refused(method == Method::Sync));
                    }
                    (open_umo()?, Via::Syscall, true, method, offered)
                }
            },
        };

        // Ask for the features the method needs.
        let mut want =
            UffdFeatures::PAGEFAULT_FLAG_WP | (offered & UffdFeatures::WP_HUGETLBFS_SHMEM);
        if !opts.avoid.contains(Avoid::WP_UNPOPULATED) {
            want |= offered & UffdFeatures::WP_UNPOPULATED;
        }
        match method {
            Method::Async => want |= UffdFeatures::WP_ASYNC,
            // Events that mean tracking is lost; the handler thread reads them at once, so
            // the munmap/madvise/mremap callers they hold are let go.
            Method::Sync => {
                want |= offered
                    & (UffdFeatures::EVENT_REMOVE
                        | UffdFeatures::EVENT_UNMAP
                        | UffdFeatures::EVENT_REMAP)
            }
        }
        // It grants all of `want` or fails (and reports every feature it offers).
        uffd.api(want)
            .map_err(sys("ask UFFDIO_API for the tracking features"))?;
        let uffd = Arc::new(uffd);
        let info = TrackInfo {
            method,
            user_mode_only,
            via,
            features: want,
        };

        let mut t = Tracker {
            uffd,
            registered: Vec::with_capacity(regions.len()),
            engine: Engine::None,
            pending: regions.iter().map(|r| new_bitmap(r.pages)).collect(),
            scratch: regions.iter().map(|r| new_bitmap(r.pages)).collect(),
            untouched: vec![None; regions.len()],
            regions,
            page_size: ps,
            info,
            failed: None,
        };
        // From here on, dropping `t` unwinds whatever was done.

        // Without /proc/self/maps no region counts as private anonymous memory: its first
        // plan is then every page, which is never wrong.
        let maps = maps::read_maps().unwrap_or_default();
        for r in &mut t.regions {
            r.anon = maps::all_anon_private(&maps, r.host, r.end());
        }
        let mut pagemap = pagemap.ok();

        // Never-touched pages, before any protection.
        let mut populated: Vec<Option<Vec<u64>>> = vec![None; t.regions.len()];
        if opts.leave_out_untouched {
            let presence = scan::Presence::new(pagemap.as_ref(), scan_ok);
            for (i, r) in t.regions.iter().enumerate() {
                if r.anon {
                    let mut bits = new_bitmap(r.pages);
                    presence
                        .populated(r, &mut bits, true)
                        .map_err(|errno| TrackError::Scan {
                            addr: r.addr,
                            host: r.host,
                            errno,
                        })?;
                    populated[i] = Some(bits);
                }
            }
        }

        // Register, learning each region's unit.
        for i in 0..t.regions.len() {
            let r = &t.regions[i];
            let ioctls = t
                .uffd
                .register(r.host, r.len, RegisterMode::WP)
                .map_err(|errno| TrackError::Register {
                    addr: r.addr,
                    host: r.host,
                    len: r.len,
                    errno,
                    mapping: maps::describe(r.host, r.end()),
                })?;
            t.registered.push(i);
            if !ioctls.contains(UffdIoctls::WRITEPROTECT) {
                return Err(TrackError::Unsupported {
                    missing: "UFFDIO_WRITEPROTECT on this memory",
                    offered,
                });
            }
            // hugetlb ranges support neither UFFDIO_ZEROPAGE nor UFFDIO_MOVE.
            if !ioctls.contains(UffdIoctls::ZEROPAGE) {
                let huge = maps::kernel_page_size(r.host)
                    .map_err(|e| TrackError::System {
                        what: "read /proc/self/smaps",
                        errno: io_errno(&e),
                    })?
                    .unwrap_or(ps);
                let unit = (huge / ps) as u64;
                let r = &mut t.regions[i];
                r.granule = r.granule.max(unit);
            }
        }

        // Before WP_UNPOPULATED, anonymous pages never populated cannot be protected:
        // map the zero page there first.
        if !want.contains(UffdFeatures::WP_UNPOPULATED) {
            for r in t.regions.iter().filter(|r| r.anon) {
                page_pipe_sys::populate_read(r.host, r.len).map_err(|errno| {
                    TrackError::System {
                        what: "populate memory for reading (MADV_POPULATE_READ)",
                        errno,
                    }
                })?;
            }
        }

        t.engine = match method {
            Method::Async => {
                let pm = pagemap.take().ok_or(TrackError::Unsupported {
                    missing: "/proc/self/pagemap",
                    offered,
                })?;
                Engine::Async(AsyncEngine::new(pm))
            }
            Method::Sync => Engine::Sync(SyncEngine::spawn(Arc::clone(&t.uffd), &t.regions, ps)?),
        };

        // Protect everything.
        for r in &t.regions {
            protect(&t.uffd, r, r.host, r.len, true)?;
        }

        // Pages populated while we registered and protected count as populated. (Not
        // where the regions were populated for reading and only /proc/self/pagemap can
        // tell: it hides the zero page's frame number, so every page would count. There,
        // pages first written while `start` runs count as never touched: the first plan
        // is exact only with the writers paused, as a snapshot needs anyway.)
        let zero_page_hidden = !want.contains(UffdFeatures::WP_UNPOPULATED)
            && matches!(t.engine, Engine::Sync(_))
            && !scan_ok;
        let presence = match &t.engine {
            Engine::Async(a) => scan::Presence::new(Some(a.pagemap()), true),
            _ => scan::Presence::new(pagemap.as_ref(), scan_ok),
        };
        for (i, r) in t.regions.iter().enumerate() {
            let Some(bits) = populated[i].as_mut() else {
                continue;
            };
            if !zero_page_hidden {
                presence
                    .populated(r, bits, false)
                    .map_err(|errno| TrackError::Scan {
                        addr: r.addr,
                        host: r.host,
                        errno,
                    })?;
            }
            let mut never = new_bitmap(r.pages);
            for_each_run(bits, r.pages, |s, e, set| {
                if !set {
                    set_range(&mut never, s, e);
                }
            });
            t.untouched[i] = Some(never);
        }
        Ok(t)
    }

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
