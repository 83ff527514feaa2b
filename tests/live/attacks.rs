//! Attacks on the promises of live snapshots: a `Live` dropped or a sink panicking before
//! the dump ends loses no written page for the next take; memory discarded during the
//! dump never yields an image that claims success; kernel writes (`read(2)`), `fork`,
//! `mprotect`, never-touched pages, transparent huge pages, memfd memory, many writers
//! with no room for saved copies, and takes right after a dump (exactly the pages written
//! since the instant).

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::Instant;

use page_pipe::snapshot::{SnapshotOptions, Span};
use page_pipe::track::LostBy;

use super::*;

/// Aborts the test process (a failure, not a hang) if it is not dropped within `secs`.
struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn new(what: &'static str, secs: u64) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs))
            {
                eprintln!("{what}: still running after {secs} s: a writer or the dump hangs");
                std::process::abort();
            }
        });
        Self {
            done: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits (bounded) until `cond` holds; false if it never did.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// The pages (relative to `BASE`) of the `Span::Pages` of `plan`.
fn pages_of(plan: &[Span]) -> BTreeSet<u64> {
    let ps = ps() as u64;
    plan.iter()
        .flat_map(|s| match *s {
            Span::Pages { addr, pages, .. } => (0..pages).map(|p| (addr - BASE) / ps + p).collect(),
            Span::Hole { .. } => Vec::new(),
        })
        .collect()
}

impl Shared {
    /// The pages written since the last call, cleared (call with the writers paused).
    fn marked(&self) -> BTreeSet<u64> {
        (0..self.pages)
            .filter(|&p| self.marks[p].swap(false, Ordering::Relaxed))
            .map(|p| p as u64)
            .collect()
    }

    /// Waits until the writers wrote `n` more times, or says they are stuck.
    fn assert_writers_go_on(&self, n: u64) {
        let before = self.writes.load(Ordering::Relaxed);
        assert!(
            eventually(|| self.writes.load(Ordering::Relaxed) >= before + n),
            "writers are stuck"
        );
    }
}

fn stop_writers(s: &Shared, w: Vec<std::thread::JoinHandle<()>>) {
    s.stop.store(true, Ordering::Relaxed);
    for t in w {
        t.join().unwrap();
    }
}

/// Writer threads, stopped and joined when dropped, so that a failing test unwinds with
/// its message rather than unmapping memory they still write.
struct Running {
    s: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn stop(mut self) {
        stop_writers(&self.s, std::mem::take(&mut self.threads));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.s.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn small_entries(max_saved_pages: u64) -> LiveOptions {
    LiveOptions {
        max_saved_pages,
        snapshot: SnapshotOptions {
            max_pipe_pages: Some(4),
            ..SnapshotOptions::default()
        },
    }
}

/// The kernel's name for what thread `tid` of this process waits in, if it waits.
fn wchan(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}

/// A `Live` dropped without its dump: the pages its take reported come back in the next
/// take (the previous snapshot is still the parent), for both kinds; a writer waiting for
/// room for its saved copy goes on.
#[test]
fn a_live_dropped_before_its_dump_loses_no_written_page() {
    let _w = Watchdog::new("a_live_dropped_before_its_dump_loses_no_written_page", 60);
    for kind in [LiveKind::Incremental, LiveKind::Full] {
        let pages = 64;
        let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
        mem.fill(1);
        let Some(mut tracker) = sync_tracker(&mem) else {
            return;
        };
        let s = Shared::new(&mut mem);
        assert!(pages_of(&tracker.take().unwrap()).is_empty());
        s.write(3, 7);
        s.write(10, 7);
        s.write(30, 7);
        // Room for one saved page: the writer's second write waits for the dump.
        // SAFETY: as for `sync_tracker`; the mapping outlives the snapshot.
        let live = unsafe { tracker.live(kind, &small_entries(1)) }.unwrap();
        if kind == LiveKind::Incremental {
            assert_eq!(pages_of(live.plan()), BTreeSet::from([3, 10, 30]));
        }
        let (tx, rx) = mpsc::channel();
        let s2 = Arc::clone(&s);
        let writer = std::thread::spawn(move || {
            s2.write(3, 8);
            tx.send(rustix::thread::gettid().as_raw_nonzero().get())
                .unwrap();
            s2.write(10, 8);
        });
        let tid = rx.recv().unwrap();
        assert!(
            eventually(|| wchan(tid) == "handle_userfault" || writer.is_finished()),
            "the writer neither waits for room nor finished"
        );
        assert!(!writer.is_finished(), "no room, yet the writer went on");
        drop(live);
        writer.join().unwrap();
        let next = pages_of(&tracker.take().unwrap());
        assert_eq!(
            next,
            BTreeSet::from([3, 10, 30]),
            "{kind:?}: the next take lost pages"
        );
        tracker.stop().unwrap();
    }
}

/// A sink that panics in the middle: the panic reaches the caller, writers go on, and the
/// pages of the interrupted snapshot come back in the next take.
#[test]
fn a_panicking_sink_releases_the_writers_and_loses_no_written_page() {
    let _w = Watchdog::new(
        "a_panicking_sink_releases_the_writers_and_loses_no_written_page",
        60,
    );
    let pages = 256;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 4);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let all = Shared::new(&mut mem);
    // The writers write the first half only, so that the second half's pages of the
    // plan are found again only if nothing lost them.
    let s = Arc::new(Shared {
        pages: pages / 2,
        ..Arc::into_inner(Shared::new(&mut mem)).unwrap()
    });
    assert!(pages_of(&tracker.take().unwrap()).is_empty());
    for p in (0..pages).step_by(3) {
        all.write(p, 1);
    }
    let before = all.marked();
    let opts = small_entries(2);
    // SAFETY: as for `sync_tracker`; the mapping outlives the snapshot.
    let live = unsafe { tracker.live(LiveKind::Incremental, &opts) }.unwrap();
    assert_eq!(pages_of(live.plan()), before);
    let w = Running {
        s: Arc::clone(&s),
        threads: writers(&s, 3, 17, Duration::ZERO),
    };
    let mut n = 0;
    let mut sink = CallbackSink::new(|_: &PagemapEntry, _: &[u8]| {
        n += 1;
        std::thread::sleep(Duration::from_millis(1));
        assert!(n < 5, "the sink gives up");
        Ok(())
    });
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| live.dump(&mut sink)));
    assert!(r.is_err(), "the sink's panic was swallowed");
    s.assert_writers_go_on(1000);
    let guard = s.pause.write().unwrap();
    let mut want = s.marked();
    want.extend(&before);
    let next = pages_of(&tracker.take().unwrap());
    drop(guard);
    w.stop();
    assert!(
        want.is_subset(&next),
        "the next take lost {:?}",
        want.difference(&next).collect::<Vec<_>>()
    );
    tracker.stop().unwrap();
}

/// Pages discarded (`MADV_DONTNEED`) during the dump before it reads them would be
/// written as zeros: the dump must not succeed with that image; the tracker stops and
/// leaves no descriptor or thread behind.
#[test]
fn memory_discarded_during_the_dump_fails_it() {
    if !alone("attacks::memory_discarded_during_the_dump_fails_it") {
        return;
    }
    let _w = Watchdog::new("memory_discarded_during_the_dump_fails_it", 60);
    let (fds, threads) = (page_pipe_tests::open_fds(), threads_now());
    let pages = 64;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    mem.fill(0x5a);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let reference = mem.to_vec();
    let base = mem.as_mut_ptr() as usize;
    let opts = small_entries(16);
    // SAFETY: as for `sync_tracker`; the mapping outlives the snapshot.
    let live = unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap();
    let mut got = Vec::new();
    let mut first = true;
    let mut sink = CallbackSink::new(|_: &PagemapEntry, b: &[u8]| {
        if std::mem::take(&mut first) {
            // SAFETY: the last 8 pages of the test's own mapping; nothing holds a
            // reference into them.
            unsafe {
                rustix::mm::madvise(
                    (base + (pages - 8) * ps()) as *mut _,
                    8 * ps(),
                    rustix::mm::Advice::LinuxDontNeed,
                )
            }
            .unwrap();
        }
        got.extend_from_slice(b);
        Ok(())
    });
    let r = live.dump(&mut sink);
    drop(sink);
    match r {
        Ok(_) => assert!(
            got == reference,
            "the dump succeeded with pages that are not the memory at its instant"
        ),
        Err(LiveError::Lost(TrackError::Lost {
            by: LostBy::Discard,
            ..
        })) => {}
        Err(e) => panic!("not the error of a discard: {e:?}"),
    }
    assert!(tracker.take().is_err(), "tracking survived a discard");
    // The failed dump stopped the tracker: its handler thread is gone, nothing stays
    // registered (another tracker may have the memory).
    assert_eq!(threads_now(), threads, "the handler thread still runs");
    drop(sync_tracker(&mem).expect("the memory is free again"));
    drop(tracker);
    drop(mem);
    assert_eq!(page_pipe_tests::open_fds(), fds, "descriptors left open");
    assert_eq!(threads_now(), threads, "threads left running");
}

/// Writes the kernel makes for the process: `read(2)` from a pipe into a page of the
/// tracked memory, or `process_vm_writev(2)` into it, by `n` threads, until stopped.
fn kernel_writers(s: &Arc<Shared>, n: usize, seed: u64) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|t| {
            let s = Arc::clone(s);
            std::thread::spawn(move || {
                let (r, w) = rustix::pipe::pipe().unwrap();
                let mut x = seed ^ 0xdead_beef ^ (t as u64 + 1) << 32;
                let mut data = vec![0u8; ps()];
                while !s.stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % s.pages as u64) as usize;
                    data.fill(x as u8);
                    let _g = s.pause.read().unwrap();
                    rustix::io::write(&w, &data).unwrap();
                    let at = s.base + page * ps();
                    let got = if x & 1 == 0 {
                        // SAFETY: `read(2)` into a page of the test's mapping, alive until
                        // the writers are joined; the kernel writes it, as writers do.
                        unsafe { libc::read(r.as_raw_fd(), at as *mut _, ps()) }
                    } else {
                        let mut sink = vec![0u8; ps()];
                        rustix::io::read(&r, &mut sink).unwrap();
                        let local = libc::iovec {
                            iov_base: data.as_mut_ptr().cast(),
                            iov_len: ps(),
                        };
                        let remote = libc::iovec {
                            iov_base: at as *mut _,
                            iov_len: ps(),
                        };
                        // SAFETY: the kernel copies `data` into a page of the test's
                        // mapping, alive until the writers are joined, through the
                        // process's memory as a debugger would (`process_vm_writev`).
                        unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) }
                    };
                    assert_eq!(got, ps() as isize, "a kernel write into tracked memory");
                    s.marks[page].store(true, Ordering::Relaxed);
                    s.writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// How a run of live snapshots in a row is set up.
struct Lives {
    kinds: &'static [LiveKind],
    threads: usize,
    kernel_threads: usize,
    max_saved: u64,
    /// Pages per tracking unit (a written page's whole unit is reported).
    granule_pages: u64,
    seed: u64,
}

/// Live snapshots in a row, with writers running during every dump: each image restores
/// to the memory at its instant, and each incremental plan holds exactly the units
/// written since the instant before (during the previous dump and after it).
fn lives_in_a_row(s: &Arc<Shared>, tracker: &mut Tracker, l: &Lives) {
    s.marked();
    let dir = TempDir::new("live-row");
    let opts = LiveOptions {
        max_saved_pages: l.max_saved,
        snapshot: SnapshotOptions {
            max_pipe_pages: Some(8),
            ..SnapshotOptions::default()
        },
    };
    s.stop.store(false, Ordering::Relaxed);
    let mut threads = writers(s, l.threads, l.seed, Duration::ZERO);
    threads.extend(kernel_writers(s, l.kernel_threads, l.seed));
    let w = Running {
        s: Arc::clone(s),
        threads,
    };
    s.assert_writers_go_on(100);
    let mut saved = 0;
    for (i, &kind) in l.kinds.iter().enumerate() {
        let (reference, live) = {
            let _paused = s.pause.write().unwrap();
            let reference = s.copy();
            let written: BTreeSet<u64> = s
                .marked()
                .iter()
                .map(|p| p / l.granule_pages * l.granule_pages)
                .flat_map(|u| u..(u + l.granule_pages).min(s.pages as u64))
                .collect();
            // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
            let live = unsafe { tracker.live(kind, &opts) }.unwrap();
            if kind == LiveKind::Incremental && i > 0 {
                assert_eq!(
                    pages_of(live.plan()),
                    written,
                    "snapshot {}: the plan is not the pages written since the last",
                    i + 1
                );
            }
            (reference, live)
        };
        let d = dir.path().join(format!("{}", i + 1));
        let mut wr = ImageWriter::create(&d, 1).unwrap().with_sync(false);
        if kind == LiveKind::Incremental {
            wr = wr.with_parent(dir.path().join(format!("{i}"))).unwrap();
        }
        let report = live.dump(&mut wr).unwrap();
        wr.finish().unwrap();
        saved += report.saved_pages;
        assert!(
            report.saved_peak_bytes <= l.max_saved.max(l.granule_pages) * ps() as u64,
            "{report:?}"
        );
        let back = restored(&d, s.pages * ps());
        if let Some(bad) = (0..s.pages)
            .find(|&p| back[p * ps()..(p + 1) * ps()] != reference[p * ps()..(p + 1) * ps()])
        {
            panic!(
                "snapshot {} differs from the memory at its instant, first at page {bad}",
                i + 1
            );
        }
        s.assert_writers_go_on(100);
    }
    w.stop();
    eprintln!(
        "{} writes, {saved} pages saved",
        s.writes.load(Ordering::Relaxed)
    );
}

/// Many writers and no room for saved copies but one: every write to a page the dump
/// still needs waits for it, and still each image is its instant and each take exact.
#[test]
fn many_writers_with_room_for_no_copy_and_exact_takes() {
    let _w = Watchdog::new("many_writers_with_room_for_no_copy_and_exact_takes", 120);
    let pages = 512;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 9);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    for max_saved in [0, 1, 16384] {
        lives_in_a_row(
            &Shared::new(&mut mem),
            &mut tracker,
            &Lives {
                kinds: &[
                    LiveKind::Full,
                    LiveKind::Incremental,
                    LiveKind::Incremental,
                    LiveKind::Full,
                    LiveKind::Incremental,
                ],
                threads: 8,
                kernel_threads: 0,
                max_saved,
                granule_pages: 1,
                seed: max_saved + 1,
            },
        );
    }
    tracker.stop().unwrap();
}

/// Writes the kernel makes (`read(2)`, `process_vm_writev(2)` into the memory) during the
/// dump wait for the handler as user writes do: the images are the instant, the takes
/// hold those pages.
#[test]
fn kernel_writes_during_the_dump_are_saved_and_tracked() {
    let _w = Watchdog::new("kernel_writes_during_the_dump_are_saved_and_tracked", 120);
    let pages = 256;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 10);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    assert!(
        !tracker.info().user_mode_only,
        "root gets a userfaultfd that sees kernel faults"
    );
    lives_in_a_row(
        &Shared::new(&mut mem),
        &mut tracker,
        &Lives {
            kinds: &[LiveKind::Full, LiveKind::Incremental, LiveKind::Incremental],
            threads: 0,
            kernel_threads: 3,
            max_saved: 2,
            granule_pages: 1,
            seed: 10,
        },
    );
    tracker.stop().unwrap();
}

/// A synchronous tracker over `regions` avoiding `avoid` too, or `None` after saying why.
fn sync_tracker_over(regions: &[TrackRegion], avoid: Avoid) -> Option<Tracker> {
    let opts = TrackOptions {
        avoid: Avoid::WP_ASYNC | avoid,
        ..TrackOptions::default()
    };
    // SAFETY: the regions are the test's own mappings: no allocator heap, stack or lock
    // lives in them; their writers hold only the pause lock, which the fault handler
    // never takes; they stay mapped until the tracker is gone.
    match unsafe { Tracker::start(regions, &opts) } {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("SKIPPED: no synchronous userfaultfd tracking here: {e}");
            None
        }
    }
}

/// Pages never touched when tracking starts (left out of the full plan) and written
/// during the dumps, with and without `WP_UNPOPULATED`: the images read them as zeros at
/// the instants before their first write and as written after.
#[test]
fn never_touched_pages_written_during_dumps() {
    let _w = Watchdog::new("never_touched_pages_written_during_dumps", 120);
    for avoid in [Avoid::empty(), Avoid::WP_UNPOPULATED] {
        let pages = 256;
        let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
        for p in (0..pages).step_by(4) {
            mem[p * ps() + 1] = 3;
        }
        let Some(mut tracker) = sync_tracker_over(&[TrackRegion::of(BASE, &mem[..])], avoid) else {
            return;
        };
        let holes = tracker
            .full_plan()
            .iter()
            .filter(|s| matches!(s, Span::Hole { .. }))
            .count();
        assert!(holes > 0, "{avoid:?}: the full plan leaves nothing out");
        lives_in_a_row(
            &Shared::new(&mut mem),
            &mut tracker,
            &Lives {
                kinds: &[LiveKind::Full, LiveKind::Incremental, LiveKind::Incremental],
                threads: 2,
                kernel_threads: 1,
                max_saved: 4,
                granule_pages: 1,
                seed: 11,
            },
        );
        tracker.stop().unwrap();
    }
}

/// memfd (shmem) memory, planned whole.
#[test]
fn memfd_memory_live() {
    let _w = Watchdog::new("memfd_memory_live", 120);
    let pages = 256;
    let fd = rustix::fs::memfd_create("page-pipe-live", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, (pages * ps()) as u64).unwrap();
    let file = std::fs::File::from(fd);
    // SAFETY: the memfd is this test's own; only this mapping changes it.
    let mut mem = unsafe { MmapOptions::new().map_mut(&file) }.unwrap();
    page_pipe_tests::fill_pattern(&mut mem[..pages / 2 * ps()], 12);
    let Some(mut tracker) = sync_tracker_over(&[TrackRegion::of(BASE, &mem[..])], Avoid::empty())
    else {
        return;
    };
    lives_in_a_row(
        &Shared::new(&mut mem),
        &mut tracker,
        &Lives {
            kinds: &[LiveKind::Full, LiveKind::Incremental, LiveKind::Incremental],
            threads: 3,
            kernel_threads: 1,
            max_saved: 3,
            granule_pages: 1,
            seed: 12,
        },
    );
    tracker.stop().unwrap();
}

/// Transparent huge pages tracked in 2 MiB units: a first write saves the unit's pages
/// the dump still needs (room for a unit at least, whatever the bound), and plans hold
/// whole units.
#[test]
fn transparent_huge_pages_in_huge_units() {
    let _w = Watchdog::new("transparent_huge_pages_in_huge_units", 120);
    const HUGE: usize = 2 << 20;
    let mut raw = MmapOptions::new().len(5 * HUGE).map_anon().unwrap();
    let base = (raw.as_mut_ptr() as usize).next_multiple_of(HUGE);
    // SAFETY: advice on this test's own mapping; it changes no contents.
    let advised =
        unsafe { rustix::mm::madvise(base as *mut _, 4 * HUGE, rustix::mm::Advice::LinuxHugepage) };
    if let Err(e) = advised {
        eprintln!("SKIPPED transparent_huge_pages_in_huge_units: MADV_HUGEPAGE: {e}");
        return;
    }
    let s = Shared::at(base, 4 * HUGE / ps());
    // Populate (as huge pages where the kernel can) with the writers' pattern.
    for p in 0..s.pages {
        s.write(p, p as u64 * 31 + 1);
    }
    let region = TrackRegion::new(BASE, base as *const u8, 4 * HUGE).with_granule(HUGE);
    let Some(mut tracker) = sync_tracker_over(&[region], Avoid::empty()) else {
        return;
    };
    lives_in_a_row(
        &s,
        &mut tracker,
        &Lives {
            kinds: &[LiveKind::Full, LiveKind::Incremental, LiveKind::Incremental],
            threads: 3,
            kernel_threads: 0,
            max_saved: 1,
            granule_pages: (HUGE / ps()) as u64,
            seed: 13,
        },
    );
    tracker.stop().unwrap();
    drop(raw);
}

/// `mprotect(2)` of tracked memory between the instant and the dump (read-only or no
/// access, then writable again) keeps its write protection: later writes are saved first
/// and seen by the next take.
#[test]
fn mprotect_keeps_the_protection() {
    let _w = Watchdog::new("mprotect_keeps_the_protection", 60);
    let pages = 64;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 14);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let toggle = |flags: rustix::mm::MprotectFlags| {
        // SAFETY: the test's own mapping; no thread uses it while it is not writable.
        unsafe { rustix::mm::mprotect(s.base as *mut _, pages * ps(), flags) }.unwrap();
    };
    let rw = rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE;
    for (i, off) in [
        rustix::mm::MprotectFlags::READ,
        rustix::mm::MprotectFlags::empty(),
    ]
    .into_iter()
    .enumerate()
    {
        let reference = s.copy();
        let opts = small_entries(16);
        // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
        let live = unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap();
        s.marked();
        toggle(off);
        toggle(rw);
        for p in [1, 5 + i, 40] {
            s.write(p, 0xfeed);
        }
        let mut got = Vec::new();
        let mut sink = CallbackSink::new(|_: &PagemapEntry, b: &[u8]| {
            got.extend_from_slice(b);
            Ok(())
        });
        let report = live.dump(&mut sink).unwrap();
        drop(sink);
        assert!(got == reference, "{off:?}: the image is not the instant");
        assert_eq!(report.saved_pages, 3, "{off:?}: {report:?}");
        toggle(off);
        toggle(rw);
        s.write(60, 1);
        let mut want = s.marked();
        want.insert(60);
        assert_eq!(pages_of(&tracker.take().unwrap()), want, "{off:?}");
    }
    tracker.stop().unwrap();
}

/// `fork(2)` during the dump: the child writes its copy of the memory freely (its
/// mapping has no userfaultfd), the parent's image is its instant, and the child's
/// writes are neither in the parent's memory nor in its next take.
#[test]
fn fork_during_the_dump() {
    let _w = Watchdog::new("fork_during_the_dump", 60);
    let pages = 64;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 15);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let reference = s.copy();
    let opts = small_entries(16);
    // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
    let live = unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap();
    let (base, child_value) = (s.base, 0xc41d_c41d_c41d_c41du64);
    let mut got = Vec::new();
    let mut forked = false;
    let mut sink = CallbackSink::new(|_: &PagemapEntry, b: &[u8]| {
        if !std::mem::replace(&mut forked, true) {
            // SAFETY: the child only stores to its copy of the mapping and exits, both
            // async-signal-safe.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork");
            if pid == 0 {
                for p in 0..pages {
                    // SAFETY: the child's own copy of the test's mapping.
                    unsafe { ((base + p * ps()) as *mut u64).write_volatile(child_value) };
                }
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waits for the child made above.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the child failed: {status:#x}"
            );
        }
        got.extend_from_slice(b);
        Ok(())
    });
    live.dump(&mut sink).unwrap();
    drop(sink);
    assert!(forked);
    assert!(got == reference, "the image is not the instant");
    assert!(
        s.copy() == reference,
        "the child's writes reached the parent"
    );
    assert!(pages_of(&tracker.take().unwrap()).is_empty());
    s.write(7, 1);
    assert_eq!(pages_of(&tracker.take().unwrap()), BTreeSet::from([7]));
    tracker.stop().unwrap();
}

/// Stopping (or dropping) the tracker right after a dump while writers hammer the
/// memory: they go on, and the memory is free to register again.
#[test]
fn stopping_with_writers_running_releases_them() {
    let _w = Watchdog::new("stopping_with_writers_running_releases_them", 60);
    let pages = 128;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    mem.fill(2);
    for stop in [true, false] {
        let Some(mut tracker) = sync_tracker(&mem) else {
            return;
        };
        let s = Shared::new(&mut mem);
        let w = Running {
            s: Arc::clone(&s),
            threads: writers(&s, 4, 16, Duration::ZERO),
        };
        let opts = small_entries(1);
        let live = {
            let _p = s.pause.write().unwrap();
            // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
            unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap()
        };
        let mut sink = CallbackSink::new(|_: &PagemapEntry, _: &[u8]| Ok(()));
        live.dump(&mut sink).unwrap();
        drop(sink);
        s.assert_writers_go_on(1000);
        if stop {
            tracker.stop().unwrap();
        } else {
            drop(tracker);
        }
        s.assert_writers_go_on(1000);
        w.stop();
        drop(sync_tracker(&mem).expect("the memory is free again"));
    }
}

/// The peak of saved copies counts those the dump is writing too: 4 copies taken by the
/// dump's first entry and 12 saved meanwhile are 16 held at once; the faults counted are
/// all those since the instant, before the dump began too.
#[test]
fn the_saved_peak_counts_copies_being_written() {
    let _w = Watchdog::new("the_saved_peak_counts_copies_being_written", 60);
    let pages = 64;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 18);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let reference = s.copy();
    let opts = small_entries(16);
    // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
    let live = unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap();
    for p in 0..4 {
        s.write(p, 1);
    }
    let mut got = Vec::new();
    let mut sink = CallbackSink::new(|e: &PagemapEntry, b: &[u8]| {
        if e.vaddr == BASE {
            assert!(e.pages <= 40, "{e:?}");
            // While the dump holds the first entry's 4 copies, 12 more are saved.
            let s = Arc::clone(&s);
            std::thread::spawn(move || (40..52).for_each(|p| s.write(p, 2)))
                .join()
                .unwrap();
        }
        got.extend_from_slice(b);
        Ok(())
    });
    let report = live.dump(&mut sink).unwrap();
    drop(sink);
    assert!(got == reference, "the image is not the instant");
    assert_eq!(report.saved_pages, 16, "{report:?}");
    assert_eq!(report.writer_stalls, 0, "{report:?}");
    assert_eq!(report.saved_peak_bytes, 16 * ps() as u64, "{report:?}");
    assert_eq!(report.faults, 16, "{report:?}");
    tracker.stop().unwrap();
}

/// Two regions next to each other in snapshot addresses but the other way round in
/// memory: the dump's entries span both, and still hold each page of the instant.
#[test]
fn regions_in_the_other_order_in_memory() {
    let _w = Watchdog::new("regions_in_the_other_order_in_memory", 60);
    let half = 120;
    let mut mem = MmapOptions::new().len(2 * half * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 19);
    let (lo, hi) = mem.split_at(half * ps());
    let regions = [
        TrackRegion::of(BASE, hi),
        TrackRegion::of(BASE + (half * ps()) as u64, lo),
    ];
    let Some(mut tracker) = sync_tracker_over(&regions, Avoid::empty()) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let w = Running {
        s: Arc::clone(&s),
        threads: writers(&s, 3, 19, Duration::ZERO),
    };
    let opts = small_entries(2);
    let dir = TempDir::new("live-order");
    for (i, kind) in [LiveKind::Full, LiveKind::Incremental]
        .into_iter()
        .enumerate()
    {
        let (reference, live) = {
            let _p = s.pause.write().unwrap();
            let mut r = s.copy();
            // The image holds the upper half first.
            r.rotate_left(half * ps());
            // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
            (r, unsafe { tracker.live(kind, &opts) }.unwrap())
        };
        let d = dir.path().join(format!("{}", i + 1));
        let mut wr = ImageWriter::create(&d, 1).unwrap().with_sync(false);
        if i > 0 {
            wr = wr.with_parent(dir.path().join("1")).unwrap();
        }
        live.dump(&mut wr).unwrap();
        wr.finish().unwrap();
        assert!(
            restored(&d, 2 * half * ps()) == reference,
            "snapshot {} is not its instant",
            i + 1
        );
        s.assert_writers_go_on(100);
    }
    w.stop();
    tracker.stop().unwrap();
}

/// Part of the memory unmapped between snapshots: the next live snapshot is refused with
/// the loss, and nothing stays registered.
#[test]
fn unmapped_memory_refuses_the_next_live_snapshot() {
    let _w = Watchdog::new("unmapped_memory_refuses_the_next_live_snapshot", 60);
    let pages = 64;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    mem.fill(3);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let opts = LiveOptions::default();
    // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
    let live = unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap();
    live.dump(&mut CallbackSink::new(|_: &PagemapEntry, _: &[u8]| Ok(())))
        .unwrap();
    let tail = mem.as_mut_ptr() as usize + (pages - 4) * ps();
    // SAFETY: the last 4 pages of the test's own mapping, which nothing uses any more;
    // `mem` is dropped only after the tracker and never touches them again.
    unsafe { rustix::mm::munmap(tail as *mut _, 4 * ps()) }.unwrap();
    // SAFETY: as above; the part still mapped stays mapped.
    let err = unsafe { tracker.live(LiveKind::Incremental, &opts) }.unwrap_err();
    assert!(
        matches!(
            err,
            LiveError::Track(TrackError::Lost {
                by: LostBy::Unmap,
                ..
            })
        ),
        "{err:?}"
    );
    drop(tracker);
    drop(
        sync_tracker_over(
            &[TrackRegion::of(BASE, &mem[..(pages - 4) * ps()])],
            Avoid::empty(),
        )
        .expect("the memory is free again"),
    );
    // Map the hole again so that dropping `mem` unmaps what it mapped.
    // SAFETY: maps fresh anonymous memory exactly where the test unmapped its own.
    unsafe {
        rustix::mm::mmap_anonymous(
            tail as *mut _,
            4 * ps(),
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED,
        )
    }
    .unwrap();
}
