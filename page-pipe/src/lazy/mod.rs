//! Lazy restore (post-copy): memory that is usable at once and fills in on first touch.
//!
//! [`LazyRestore::start`] registers the destination with userfaultfd in missing mode and
//! returns at once; from then on each first touch of a page waits while the restore
//! brings that page in with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE` for a page no image
//! holds), from a local image chain or from a page server ([`LazySource`]), while
//! prefetch threads bring every other page in, in address order. When all are in, the
//! range is unregistered and the threads end; [`LazyRestore::wait`] says how it went
//! ([`LazyReport`]). This is CRIU's lazy-pages daemon and Firecracker's UFFD handler, in
//! one process.
//!
//! ```
//! use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
//! use page_pipe::lazy::{LazyOptions, LazyRestore, LazySource};
//! let dir = std::env::temp_dir().join(format!("pp-doc-lazy-{}", std::process::id()));
//! let ps = page_pipe::page_size();
//! let mut w = ImageWriter::create(&dir, 1)?;
//! let e = PagemapEntry { vaddr: 0x1000 * ps as u64, pages: 64, flags: PageFlags::PRESENT };
//! let pages: Vec<u8> = (0..64 * ps).map(|i| (i / ps) as u8).collect();
//! w.push_bytes(e, &pages)?;
//! w.finish()?;
//!
//! let mut mem = memmap2::MmapOptions::new().len(64 * ps).map_anon()?;
//! let source = LazySource::image(Image::open(&dir)?);
//! // SAFETY:
//! // - `mem` is this example's own fresh anonymous mapping; no reference into it is
//! //   alive across the call, and it stays mapped until the restore has ended (`wait`);
//! // - only this thread touches it, holding nothing the restore's threads need, and no
//! //   system call writes or reads it before the restore ends.
//! let restore = unsafe {
//!     LazyRestore::start(source, e.vaddr, mem.as_mut_ptr(), mem.len(), &LazyOptions::default())
//! };
//! let restore = match restore {
//!     Ok(r) => r,
//!     Err(err) => { println!("no lazy restore here: {err}"); return Ok(()); }
//! };
//! // Usable at once: this read waits for its page if the prefetch has not brought it.
//! assert_eq!(mem[40 * ps], 40);
//! let report = restore.wait()?;
//! assert!(report.complete && report.pages_in == 64);
//! assert!(mem[..] == pages[..]);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The contract
//!
//! [`LazyRestore::start`] is an `unsafe fn`. The kernel writes into the destination on
//! the restore's behalf, and threads that touch it wait for the restore's threads; the
//! caller promises, from the call until the restore has ended ([`wait`](LazyRestore::wait)
//! or [`stop`](LazyRestore::stop) returned, or the handle was dropped):
//!
//! - the range is fresh private anonymous memory (one mapping or several adjacent ones,
//!   whatever their protections) that is the caller's to fill: whatever it held is
//!   discarded at the start (`MADV_DONTNEED`), so no reference into it may be alive
//!   across the call; no one else registers it with a userfaultfd (that is `EBUSY`
//!   while the restore runs; once [`is_finished`](LazyRestore::is_finished) says it
//!   ended, its threads may still be finishing a fill, which the kernel lets into a
//!   range any userfaultfd of the process registers: not before `wait`, `stop` or the
//!   drop returned); it stays mapped, and is not discarded, moved or remapped meanwhile;
//!   and no thread touches it until `start` has returned;
//! - the threads that fault in it are not the restore's dependencies: nothing the
//!   restore's threads use lives there (the allocator's heap, a thread stack, a lock),
//!   no thread touches it while holding a lock those threads may take (the global
//!   allocator's, the standard streams'), and no signal handler touches it: otherwise
//!   the process deadlocks;
//! - the process does not `fork(2)` meanwhile (a child's copy of the range is not
//!   registered, so its pages not yet in read as zeros there);
//! - with a user-mode-only userfaultfd ([`LazyInfo::user_mode_only`], what an
//!   unprivileged process gets): the kernel's own accesses to pages not yet in (a
//!   `read(2)` into them, a `write(2)` from them, KVM running a guest there) fail with
//!   `EFAULT` instead of waiting, and the program copes with that.
//!
//! Reading or writing the memory through raw pointers or references made after `start`
//! returned is fine: every read of a page waits until the page is in, and a page, once
//! in, never changes under the program (the restore only fills pages not present).
//!
//! # How pages come in, and in which order
//!
//! The threads share a bitmap of the pages that are in:
//!
//! - **The fault thread** sleeps on the userfaultfd. For each fault it reads the
//!   faulting page alone and copies it in (`UFFDIO_COPY` wakes the faulting thread),
//!   then queues the rest of its run ([`LazyOptions::fault_pages`] around it, aligned,
//!   clamped to the image's run and the range) and serves queued runs only while no
//!   fault waits, newest first, the part ahead of the faulting page before the part
//!   behind it. Pages no image holds are mapped with `UFFDIO_ZEROPAGE`, from the
//!   faulting page to the end of its run at once.
//! - **The prefetch threads** ([`LazyOptions::prefetch`], on by default;
//!   [`LazyOptions::prefetch_threads`], one by default) claim the range 1 MiB at a time
//!   in address order, skip pages that are in, and bring the rest in
//!   [`LazyOptions::prefetch_pages`] at a time (positional reads into their own buffer,
//!   or `GET`, then one `UFFDIO_COPY`), zero pages in large `UFFDIO_ZEROPAGE` calls.
//!
//! Threads may go for the same page: the kernel fills a page once, and the others get
//! `EEXIST`, count nothing, mark the page in and wake its waiters. A fault on a page
//! that is in already (its thread was woken by another thread's fill) costs a
//! `UFFDIO_ZEROPAGE` that finds it there. Whichever thread puts the last page in ends
//! the restore: the range is unregistered, the fault thread is woken through its stop
//! pipe and returns, a page server session is closed (`CLOSE`, as CRIU's lazy-pages
//! daemon closes it), and [`wait`](LazyRestore::wait) returns the report. With prefetch
//! off, that happens once every page has been touched; `wait` waits until then.
//!
//! # Where the fault thread runs
//!
//! A fault round trip (fault, copy, wake) took 3.5 µs here with the handler on the
//! faulting thread's CPU and about 60 µs across CPUs (on this VM, mostly waking a
//! sleeping CPU). Measured with `cargo run --release -p page-pipe --example bench --
//! --lazy` (1 GiB and 256 MiB, 2-CPU VM shared with other work; medians of the first
//! touches that waited; the README has the table):
//!
//! - **Threads free to move** (the usual program): the scheduler brings the faulting
//!   thread and the thread that wakes it onto one CPU, and every design that answers at
//!   once measured 4.5–5.5 µs, this one included, prefetch on or off. The exception is
//!   a single thread that serves faults between prefetch steps: on a machine whose other
//!   CPU is idle it runs its steps there while the faulting thread waits for the step in
//!   progress (123 µs with steps of 64 pages, measured when the machine was quiet; 48 to
//!   260 µs for steps of 16 to 256 pages in a first prototype). Hence a fault thread of
//!   its own that sleeps on the userfaultfd, and prefetch on other threads.
//! - **The faulting thread pinned to a CPU** (a VMM's vCPU thread): the fault thread
//!   cannot follow it, and a round trip across CPUs costs 35–38 µs (49 µs for a baseline
//!   handler that sleeps, 124–210 µs for one that prefetches between faults). Pinning
//!   the fault thread to that CPU ([`LazyOptions::fault_cpu`]) brings it back to 5 µs,
//!   prefetch on or off: the prefetch threads stay free and run on the other CPUs.
//! - Busy-polling after each fault ([`LazyOptions::spin`]) measured no better than
//!   sleeping (it saves waking the handler, not waking the faulting thread), and costs
//!   a CPU: off by default.
//! - The faulting page is copied alone before the rest of its run: with the fault
//!   thread on the faulting thread's CPU, a 16-page run copied in one call made the
//!   faulting thread wait for all of it (20 µs median in the first prototype); the rest
//!   of the run comes while no fault waits.
//!
//! So the default is the separate fault thread, sleeping, unpinned, with prefetch on;
//! callers that pin the threads that will fault pin the fault thread with them
//! (`fault_cpu`). One fault thread serves one CPU well: threads pinned to several CPUs
//! share it.
//!
//! # When the source fails
//!
//! If a pages file cannot be read (truncated while the restore runs, an I/O error) or the
//! page server fails (it died, closed the session, timed out), the restore ends with a
//! [`LazyError`] naming the pages and the cause: the thread that met the error
//! unregisters the whole range and wakes every thread waiting on it, and the other
//! threads of the restore stop. A faulting thread then never hangs: it returns from its fault and sees
//! the memory as it is, the pages brought in so far with the image's bytes and every
//! other page as a never-touched anonymous page, zeros (its first write maps a fresh
//! page). [`wait`](LazyRestore::wait) returns the error; the program must not trust the
//! memory. [`stop`](LazyRestore::stop), and dropping the handle, end a restore the same
//! way (the report says how many pages were in), and also shut down the page server
//! connection so that a thread waiting on it returns at once (also one of a complete
//! restore waiting for the server's answer to `CLOSE`). A page server that ends a
//! session it finds idle fails a restore that asks for nothing for that long (prefetch
//! off; see [`LazyOptions::prefetch`]).
//!
//! Pages the source does not hold are zeros (`UFFDIO_ZEROPAGE`), as an eager restore makes
//! them, unless [`LazyOptions::strict`] refuses them before anything is registered. A
//! page the plan says a page server holds and the server does not send fails the
//! restore (see [`LazySource`]).
//!
//! # Privilege
//!
//! [`LazyOptions::privilege`] picks the userfaultfd, as for [`track`](crate::track):
//! [`Privilege::Auto`] takes one that also handles the kernel's faults
//! (`CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd = 1`, or access to
//! `/dev/userfaultfd`) and falls back to a user-mode-only one, which every process may
//! have. Missing-mode restores work with it for everything user code touches (checked by
//! `tests/lazy` as user nobody); the kernel's accesses to pages not yet in fail with
//! `EFAULT` (see the contract). [`LazyInfo`] says which one the restore got.

mod error;
mod handler;
mod source;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use page_pipe_sys::{Errno, Uffd, UffdFeatures, UffdFlags, UffdIoctls};

pub use crate::track::{Privilege, Via};
pub use error::{FillOp, LazyError, LazyThread, SystemOp};
pub use source::{LazySource, runs_held};

use handler::{End, FaultConfig, Shared};

/// How a lazy restore runs.
///
/// ```
/// use page_pipe::lazy::LazyOptions;
/// let o = LazyOptions::default();
/// assert_eq!((o.fault_pages, o.prefetch, o.prefetch_pages), (16, true, 64));
/// let pinned = LazyOptions { fault_cpu: Some(0), ..LazyOptions::default() };
/// # let _ = pinned;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyOptions {
    /// The run of pages brought in for each fault: the aligned block of this many pages
    /// that holds the faulting page, clamped to the image's run (a stretch of pages from
    /// one place) and to the range. The faulting page comes first, the rest when no other
    /// fault waits. Default 16 (64 KiB of 4 KiB pages); at least 1.
    pub fault_pages: u64,
    /// Bring every page in in the background, in address order (default true). Without
    /// it, pages come in only when touched, and the restore ends when every page has been.
    /// From a page server that ends idle sessions (this crate's does after
    /// [`ServerConfig::idle_timeout`](crate::page_server::ServerConfig::idle_timeout),
    /// 60 s by default), a restore without prefetch fails when the program touches no new
    /// page for that long: serve lazy restores without an idle timeout, or prefetch.
    pub prefetch: bool,
    /// Pages a prefetch thread reads and copies at a time (default 64: the median
    /// fault and the full pass measured the same from 16 to 256 here); at least 1.
    pub prefetch_pages: u64,
    /// Prefetch threads (default 1; at least 1, at most one per 1 MiB of the range).
    /// They share the range out 1 MiB at a time in address order, as the eager restore's
    /// threads do; more of them bring memory in sooner and take CPUs from the program
    /// meanwhile. Measured on 2 CPUs (`bench -- --lazy`, 1 GiB): on a full sequential
    /// first-touch pass two threads reached 0.76-0.83x the eager restore and one
    /// 0.33-0.53x (slower when the touching thread overtakes the prefetch), but with two
    /// the median fault waited 33 us instead of 5 us, both CPUs being busy: hence one.
    pub prefetch_threads: usize,
    /// Refuse a range with pages the source does not hold (in no entry, lazy pages
    /// without a page server, outside the runs a page server holds) before anything is
    /// registered, instead of zero-filling them. Default off.
    pub strict: bool,
    /// Which userfaultfd (default [`Privilege::Auto`]; see the
    /// [module docs](self#privilege)).
    pub privilege: Privilege,
    /// Pin the fault thread to this CPU (`sched_setaffinity(2)`): for callers that pin
    /// the threads that will fault (vCPU threads) to this CPU, whose faults are then
    /// served on their own CPU (5 µs here, against 35–38 µs across CPUs; see the
    /// [module docs](self#where-the-fault-thread-runs)). Default: not pinned.
    pub fault_cpu: Option<usize>,
    /// After each fault, keep polling the userfaultfd for this long before sleeping
    /// (costs a CPU for that time; measured no faster here). Default zero: sleep at
    /// once.
    pub spin: Duration,
}

impl Default for LazyOptions {
    fn default() -> Self {
        Self {
            fault_pages: 16,
            prefetch: true,
            prefetch_pages: 64,
            prefetch_threads: 1,
            strict: false,
            privilege: Privilege::Auto,
            fault_cpu: None,
            spin: Duration::ZERO,
        }
    }
}

/// What a lazy restore did (so far, from [`LazyRestore::report`]).
///
/// Every page is in through exactly one fill, so when the restore is complete,
/// `fault_pages + prefetch_pages + zero_pages == pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LazyReport {
    /// Pages of the destination.
    pub pages: u64,
    /// Pages in.
    pub pages_in: u64,
    /// Faults the fault thread read (each a thread's first touch of a page not in yet).
    pub faults: u64,
    /// Of those, faults on a page the prefetch thread had brought in meanwhile: the
    /// thread was woken by that fill.
    pub woken: u64,
    /// Pages copied by the fault thread (faulting pages and the rest of their runs).
    pub fault_pages: u64,
    /// Pages copied by the prefetch thread.
    pub prefetch_pages: u64,
    /// Pages no image holds, mapped with `UFFDIO_ZEROPAGE` (by either thread).
    pub zero_pages: u64,
    /// Whether every page is in.
    pub complete: bool,
    /// From the range's registration to the end of the restore (or to now, while it
    /// runs).
    pub elapsed: Duration,
}

/// Which userfaultfd a lazy restore got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyInfo {
    /// Whether only user-mode faults are handled (`UFFD_USER_MODE_ONLY`): the kernel's
    /// accesses to pages not yet in fail with `EFAULT`.
    pub user_mode_only: bool,
    /// Where the userfaultfd came from.
    pub via: Via,
}

/// A lazy restore in progress; see the [module docs](self).
///
/// Dropping it stops the restore ([`stop`](Self::stop)) and joins its threads.
#[derive(Debug)]
pub struct LazyRestore {
    shared: Arc<Shared>,
    fault: Option<JoinHandle<()>>,
    prefetch: Vec<JoinHandle<()>>,
    info: LazyInfo,
}

fn read_unprivileged_userfaultfd() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A non-blocking userfaultfd as `privilege` allows: whether it is user-mode-only, and
/// where it came from.
fn open_uffd(privilege: Privilege) -> Result<(Uffd, Via, bool), LazyError> {
    let nb = UffdFlags::NONBLOCK;
    let user_mode_only = || {
        Uffd::open(nb | UffdFlags::USER_MODE_ONLY)
            .map(|u| (u, Via::Syscall, true))
            .map_err(|errno| LazyError::Open { errno })
    };
    match privilege {
        Privilege::UserModeOnly => user_mode_only(),
        Privilege::Auto | Privilege::Full => match Uffd::open(nb) {
            Ok(u) => Ok((u, Via::Syscall, false)),
            Err(Errno::PERM) => match Uffd::open_dev(nb) {
                Ok(u) => Ok((u, Via::Device, false)),
                Err(device) if privilege == Privilege::Full => Err(LazyError::Privilege {
                    syscall: Errno::PERM,
                    device,
                    unprivileged_userfaultfd: read_unprivileged_userfaultfd(),
                }),
                Err(_) => user_mode_only(),
            },
            Err(errno) => Err(LazyError::Open { errno }),
        },
    }
}

fn pin(cpu: usize) -> Result<(), Errno> {
    use rustix::thread::{CpuSet, sched_setaffinity};
    if cpu >= CpuSet::MAX_CPU {
        return Err(Errno::INVAL);
    }
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set)
}

fn spawn_error(thread: LazyThread) -> impl FnOnce(std::io::Error) -> LazyError {
    move |e| LazyError::System {
        op: SystemOp::Spawn(thread),
        errno: crate::track::io_errno(&e),
    }
}

impl LazyRestore {
    /// Starts restoring `len` bytes (whole pages) from `vaddr` of `source` into the
    /// memory at `dst`: plans where each page comes from, checks that the destination is
    /// private anonymous memory, starts the fault thread, registers the destination with
    /// a new userfaultfd (missing mode), discards what it held (`MADV_DONTNEED`) and
    /// starts the prefetch threads (unless [`LazyOptions::prefetch`] is off). Returns at
    /// once; the memory is usable from then on. See the [module docs](self) for an example.
    ///
    /// # Safety
    /// See [the contract](self#the-contract): from this call until the restore has
    /// ended, the range is the restore's to fill (fresh private anonymous memory, no
    /// reference into it alive across the call, not touched before this returns, kept
    /// mapped and not discarded or moved, registered nowhere else, no `fork(2)`); the
    /// threads that touch it hold nothing the restore's threads may wait for, and no
    /// thread stack, heap or lock lives in it; with a user-mode-only userfaultfd, the
    /// program copes with the kernel's accesses to pages not yet in failing with
    /// `EFAULT`.
    ///
    /// # Errors
    /// Nothing stays registered after an error, and the destination is as it was (but
    /// for [`LazyError::Discard`] on a destination of several mappings, where the
    /// mappings before the one that refused may have been discarded).
    /// [`LazyError::BadDestination`];
    /// [`LazyError::Plan`] or [`LazyError::NotHeld`] (a bad range, a broken chain, or a
    /// strict restore with pages no source holds); [`LazyError::NotAnonymous`];
    /// [`LazyError::Open`], [`LazyError::Privilege`], [`LazyError::Api`]: no suitable
    /// userfaultfd; [`LazyError::Register`], [`LazyError::Unsupported`];
    /// [`LazyError::Discard`] (locked memory); [`LazyError::Pin`]; [`LazyError::System`]
    /// (a pipe or a thread could not be made).
    #[allow(unsafe_code)] // declares the contract above; `handler` keeps its side of it
    pub unsafe fn start(
        source: LazySource,
        vaddr: u64,
        dst: *mut u8,
        len: usize,
        opts: &LazyOptions,
    ) -> Result<LazyRestore, LazyError> {
        let ps = crate::page_size();
        let host = dst as usize;
        let bad = || LazyError::BadDestination { ptr: host, len };
        if dst.is_null() || len == 0 || !host.is_multiple_of(ps) || !len.is_multiple_of(ps) {
            return Err(bad());
        }
        let end = host.checked_add(len).ok_or_else(bad)?;
        let pages = (len / ps) as u64;
        let (plan, reader) = source.prepare(vaddr, pages, ps, opts.strict)?;

        let maps = crate::track::maps::read_maps().map_err(|e| LazyError::System {
            op: SystemOp::ReadMaps,
            errno: crate::track::io_errno(&e),
        })?;
        if !crate::track::maps::all_anon_private(&maps, host, end) {
            return Err(LazyError::NotAnonymous {
                host,
                len,
                mapping: crate::track::maps::describe(host, end),
            });
        }

        let (uffd, via, user_mode_only) = open_uffd(opts.privilege)?;
        uffd.api(UffdFeatures::empty())
            .map_err(|errno| LazyError::Api { errno })?;
        let stop = page_pipe_sys::pipe().map_err(|errno| LazyError::System {
            op: SystemOp::StopPipe,
            errno,
        })?;
        let shared = Arc::new(Shared::new(uffd, host, len, ps, plan, reader, stop.write));

        // The fault thread first (pinned if asked), waiting before anything faults.
        let cfg = FaultConfig {
            run: opts.fault_pages.clamp(1, 1 << 16),
            spin: opts.spin,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let s = Arc::clone(&shared);
        let cpu = opts.fault_cpu;
        let read = stop.read;
        let fault = std::thread::Builder::new()
            .name("pp-lazy-fault".into())
            .spawn(move || {
                let pinned = cpu.map_or(Ok(()), pin);
                let ok = pinned.is_ok();
                let _ = tx.send(pinned);
                if ok {
                    s.serve_faults(read, cfg);
                }
            })
            .map_err(spawn_error(LazyThread::Fault))?;
        let mut restore = LazyRestore {
            shared,
            fault: Some(fault),
            prefetch: Vec::new(),
            info: LazyInfo {
                user_mode_only,
                via,
            },
        };
        // From here on, dropping `restore` ends whatever was started.
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(errno)) => {
                return Err(LazyError::Pin {
                    cpu: cpu.unwrap_or(0),
                    errno,
                });
            }
            Err(_) => {
                return Err(LazyError::Panicked {
                    thread: LazyThread::Fault,
                });
            }
        }
        let ioctls = restore.shared.register()?;
        let needed = [
            (UffdIoctls::COPY, "UFFDIO_COPY"),
            (UffdIoctls::ZEROPAGE, "UFFDIO_ZEROPAGE"),
            (UffdIoctls::WAKE, "UFFDIO_WAKE"),
        ];
        if let Some((_, missing)) = needed.iter().find(|(c, _)| !ioctls.contains(*c)) {
            return Err(LazyError::Unsupported { missing, ioctls });
        }
        restore.shared.discard()?;
        if opts.prefetch {
            let step = opts.prefetch_pages.clamp(1, 1 << 16);
            // No more threads than claims to share out: the others would have nothing to
            // do (and `usize::MAX` would spawn until the system refused).
            let claims = (len / ps).div_ceil(handler::CLAIM as usize).max(1);
            for _ in 0..opts.prefetch_threads.clamp(1, claims) {
                let s = Arc::clone(&restore.shared);
                let t = std::thread::Builder::new()
                    .name("pp-lazy-fetch".into())
                    .spawn(move || s.prefetch(step))
                    .map_err(spawn_error(LazyThread::Prefetch))?;
                restore.prefetch.push(t);
            }
        }
        Ok(restore)
    }

    /// Which userfaultfd the restore got.
    pub fn info(&self) -> LazyInfo {
        self.info
    }

    /// What the restore has done so far.
    pub fn report(&self) -> LazyReport {
        self.shared.report()
    }

    /// Whether the restore has ended (every page in, failed, or stopped).
    pub fn is_finished(&self) -> bool {
        self.shared.is_finished()
    }

    /// Waits at most `timeout` for the restore to end; returns whether it has. A
    /// timeout too long to reach (`Duration::MAX`) waits as long as it takes.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.shared.wait_end(Some(timeout))
    }

    /// Waits until every page is in (or the restore failed), joins its threads and
    /// says what it did. With [`LazyOptions::prefetch`] off this waits until every page
    /// has been touched. With a page server, a complete restore also waits for the
    /// server's answer to `CLOSE` (at most the client's timeout); [`stop`](Self::stop)
    /// does not.
    ///
    /// # Errors
    /// [`LazyError`] when the source or the userfaultfd failed; the range was
    /// unregistered then (see [When the source fails](self#when-the-source-fails)).
    pub fn wait(mut self) -> Result<LazyReport, LazyError> {
        self.end(false)
    }

    /// Stops the restore now (if it has not ended): the range is unregistered, threads
    /// waiting on its faults are woken (pages not yet in read as zeros), the page server
    /// connection (if any) is shut down, even while a complete restore closes its
    /// session, and the threads are joined. Returns the report (`complete` says whether
    /// every page was in).
    ///
    /// # Errors
    /// The restore's error, if it had failed before.
    pub fn stop(mut self) -> Result<LazyReport, LazyError> {
        self.end(true)
    }

    fn end(&mut self, stop: bool) -> Result<LazyReport, LazyError> {
        if stop {
            self.shared.finish(End::Stopped);
            // A restore that completed may be closing its page server session (`CLOSE`,
            // waiting for the answer): a stop does not wait for the server either.
            self.shared.shut_down_source();
        }
        self.shared.wait_end(None);
        let mut panicked = None;
        let threads = self
            .fault
            .take()
            .into_iter()
            .map(|t| (t, LazyThread::Fault));
        let prefetch = self.prefetch.drain(..).map(|t| (t, LazyThread::Prefetch));
        for (t, name) in threads.chain(prefetch).collect::<Vec<_>>() {
            if t.join().is_err() {
                panicked = Some(name);
            }
        }
        let report = self.shared.report();
        match (self.shared.take_end(), panicked) {
            (Some(End::Failed(e)), _) => Err(e),
            (_, Some(thread)) => Err(LazyError::Panicked { thread }),
            _ => Ok(report),
        }
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        if self.fault.is_some() || !self.prefetch.is_empty() {
            let _ = self.end(true);
        }
    }
}
