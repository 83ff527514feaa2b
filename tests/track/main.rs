//! Dirty tracking against the running kernel: plans hold the written pages (property
//! tests in `track_completeness`), never-touched pages, refusals with typed errors,
//! nothing left behind on error paths, the unprivileged paths, huge pages, memfd, and the
//! ABI declared by hand (`abi`).

mod abi;
mod track_completeness;

use std::collections::BTreeSet;
use std::process::Command;

use memmap2::{MmapMut, MmapOptions};
use page_pipe::image::ImageWriter;
use page_pipe::snapshot::{SnapshotOptions, Span, snapshot};
use page_pipe::track::{
    Avoid, LostBy, Method, Privilege, TrackError, TrackOptions, TrackRegion, Tracker,
};
use page_pipe::{BufFlags, HoleFlags, Source};
use page_pipe_sys::{Errno, RegisterMode, Uffd, UffdFeatures, UffdFlags, probe_userfaultfd};
use page_pipe_tests::{
    AS_NOBODY, TempDir, Unprivileged, alone, assert_restores, open_fds, snapshot_demo, unprivileged,
};

/// The snapshot address the tests put their first region at (not the host address).
const ADDR: u64 = 0x1_0000_0000;

fn ps() -> usize {
    page_pipe_sys::page_size().get()
}

pub(crate) fn anon(pages: usize) -> MmapMut {
    MmapOptions::new()
        .len(pages * ps())
        .map_anon()
        .expect("map anonymous memory")
}

/// The tracker's options for one mode.
pub(crate) fn options(sync: bool) -> TrackOptions {
    TrackOptions {
        avoid: if sync {
            Avoid::WP_ASYNC
        } else {
            Avoid::empty()
        },
        ..TrackOptions::default()
    }
}

/// Starts a tracker in the asked mode, or says why the kernel cannot and returns `None`.
pub(crate) fn start(test: &str, regions: &[TrackRegion], sync: bool) -> Option<Tracker> {
    start_with(test, regions, &options(sync))
}

pub(crate) fn start_with(
    test: &str,
    regions: &[TrackRegion],
    opts: &TrackOptions,
) -> Option<Tracker> {
    // SAFETY: the regions of these tests are their own anonymous or memfd mappings: no
    // heap, stack, lock or kernel-maintained word lives in them; the threads writing them
    // hold nothing the handler thread needs while they write, and no signal handler
    // writes them.
    match unsafe { Tracker::start(regions, opts) } {
        Ok(t) => {
            let want = if opts.avoid.contains(Avoid::WP_ASYNC) {
                Method::Sync
            } else {
                Method::Async
            };
            assert_eq!(t.info().method, want, "{test}");
            Some(t)
        }
        Err(e @ (TrackError::Unsupported { .. } | TrackError::Open { .. })) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The pages (relative to `addr`) of the `Span::Pages` of `plan` that lie in the
/// `pages` pages from `addr`.
pub(crate) fn pages_in(plan: &[Span], addr: u64, pages: u64) -> BTreeSet<u64> {
    let ps = ps() as u64;
    let mut out = BTreeSet::new();
    for s in plan {
        if let Span::Pages {
            addr: a,
            pages: n,
            flags,
        } = *s
        {
            assert_eq!(flags, BufFlags::empty());
            for p in 0..n {
                let at = a + p * ps;
                if at >= addr && at < addr + pages * ps {
                    out.insert((at - addr) / ps);
                }
            }
        }
    }
    out
}

/// Checks that `plan` covers `pages` pages from `addr` exactly, in order, without gaps;
/// its holes without flags exactly at the pages of `never` (relative to `addr`: pages no
/// snapshot of the chain has), the other holes `PARENT`.
pub(crate) fn assert_covers(plan: &[Span], addr: u64, pages: u64, never: &BTreeSet<u64>) {
    let ps = ps() as u64;
    let mut at = addr;
    for s in plan {
        let (a, n) = match *s {
            Span::Pages { addr, pages, .. } => (addr, pages),
            Span::Hole {
                addr: a,
                pages: n,
                flags,
            } => {
                let rel = (a - addr) / ps;
                for p in rel..rel + n {
                    let want = if never.contains(&p) {
                        HoleFlags::empty()
                    } else {
                        HoleFlags::PARENT
                    };
                    assert_eq!(flags, want, "page {p} in {s:?}");
                }
                (a, n)
            }
        };
        assert_eq!(a, at, "spans out of order or with a gap: {plan:?}");
        assert!(n > 0);
        at += n * ps;
    }
    assert_eq!(at, addr + pages * ps, "plan does not cover the region");
}

fn write_page(mem: &mut [u8], page: usize, v: u8) {
    mem[page * ps() + 17] = v;
}

/// The number of threads of this process.
fn tasks() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn plans_are_in_snapshot_addresses_over_several_regions() {
    let test = "plans_are_in_snapshot_addresses_over_several_regions";
    for sync in [false, true] {
        let mut a = anon(32);
        let mut b = anon(16);
        a.fill(1);
        b.fill(1);
        // Given out of order, with snapshot addresses unrelated to the host ones.
        let regions = [
            TrackRegion::of(ADDR + 0x10_0000, &b[..]),
            TrackRegion::of(ADDR, &a[..]),
        ];
        let Some(mut t) = start(test, &regions, sync) else {
            return;
        };
        write_page(&mut a, 3, 2);
        write_page(&mut a, 4, 2);
        write_page(&mut b, 15, 2);
        let plan = t.take().unwrap();
        let ps = ps() as u64;
        assert_eq!(
            plan,
            [
                Span::Hole {
                    addr: ADDR,
                    pages: 3,
                    flags: HoleFlags::PARENT
                },
                Span::Pages {
                    addr: ADDR + 3 * ps,
                    pages: 2,
                    flags: BufFlags::empty()
                },
                Span::Hole {
                    addr: ADDR + 5 * ps,
                    pages: 27,
                    flags: HoleFlags::PARENT
                },
                Span::Hole {
                    addr: ADDR + 0x10_0000,
                    pages: 15,
                    flags: HoleFlags::PARENT
                },
                Span::Pages {
                    addr: ADDR + 0x10_0000 + 15 * ps,
                    pages: 1,
                    flags: BufFlags::empty()
                },
            ],
            "sync: {sync}"
        );
        // Nothing written since: one PARENT hole per region.
        assert_eq!(t.take().unwrap().len(), 2);
        t.stop().unwrap();
    }
}

/// No region: nothing to protect, and plans are empty.
#[test]
fn a_tracker_of_no_region_has_empty_plans() {
    for sync in [false, true] {
        let Some(mut t) = start("a_tracker_of_no_region_has_empty_plans", &[], sync) else {
            return;
        };
        assert!(t.full_plan().is_empty());
        assert!(t.take().unwrap().is_empty());
        t.stop().unwrap();
    }
}

#[test]
fn a_tracker_can_move_to_another_thread() {
    fn send<T: Send>() {}
    send::<Tracker>();
    send::<TrackError>();
}

#[test]
fn bad_regions_are_refused_before_anything_is_registered() {
    let m = anon(8);
    let p = ps();
    let base = m.as_ptr();
    let one = |addr, off: usize, len| TrackRegion::new(addr, base.wrapping_add(off), len);
    let cases: [(&[TrackRegion], &str); 6] = [
        (&[one(ADDR + 1, 0, p)], "unaligned snapshot address"),
        (&[one(ADDR, 1, p)], "unaligned host address"),
        (&[one(ADDR, 0, p + 1)], "partial page"),
        (&[one(ADDR, 0, 0)], "empty"),
        (
            &[one(ADDR, 0, 2 * p), one(ADDR + p as u64, 4 * p, p)],
            "overlap in addresses",
        ),
        (
            &[one(ADDR, 0, 2 * p), one(ADDR + 0x10_0000, p, p)],
            "overlap in memory",
        ),
    ];
    for (regions, what) in cases {
        let e = Tracker::start_async(regions, &TrackOptions::default()).unwrap_err();
        assert!(
            matches!(e, TrackError::Unaligned { .. } | TrackError::Overlap { .. }),
            "{what}: {e}"
        );
    }
    // A granule that does not divide the region.
    let e = Tracker::start_async(
        &[one(ADDR, 0, 3 * p).with_granule(2 * p)],
        &TrackOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, TrackError::Unaligned { unit, .. } if unit == 2 * p),
        "{e}"
    );
}

#[test]
fn the_first_plan_leaves_out_never_touched_pages() {
    let test = "the_first_plan_leaves_out_never_touched_pages";
    for (sync, avoid_scan) in [(false, false), (true, false), (true, true)] {
        let mut m = anon(64);
        for p in 0..8 {
            write_page(&mut m, p, 1);
        }
        write_page(&mut m, 20, 1);
        // Page 30 is only read: the shared zero page.
        assert_eq!(std::hint::black_box(m[30 * ps()]), 0);
        let mut opts = options(sync);
        if avoid_scan {
            opts.avoid |= Avoid::PAGEMAP_SCAN;
        }
        let Some(mut t) = start_with(test, &[TrackRegion::of(ADDR, &m[..])], &opts) else {
            return;
        };
        let full = t.full_plan();
        let populated = pages_in(&full, ADDR, 64);
        let never: BTreeSet<u64> = (0..64).filter(|p| !populated.contains(p)).collect();
        assert_covers(&full, ADDR, 64, &never);
        let expect: BTreeSet<u64> = (0..8).chain([20]).collect();
        if avoid_scan {
            // /proc/self/pagemap hides the zero page's frame number from us: a read
            // page counts as populated there.
            let with_read: BTreeSet<u64> = expect.iter().copied().chain([30]).collect();
            assert_eq!(populated, with_read, "pagemap path");
        } else {
            assert_eq!(populated, expect, "sync: {sync}");
        }
        // A page never touched is still watched: its first write is in the next plan.
        write_page(&mut m, 40, 1);
        write_page(&mut m, 30, 1);
        let plan = t.take().unwrap();
        assert_eq!(pages_in(&plan, ADDR, 64), BTreeSet::from([30, 40]));
        // Pages still never written stay holes without flags: the full snapshot left
        // them out, so a PARENT hole would send a restore looking for them there.
        let mut never = never;
        never.remove(&30);
        never.remove(&40);
        assert_covers(&plan, ADDR, 64, &never);
        write_page(&mut m, 41, 1);
        let plan = t.take().unwrap();
        never.remove(&41);
        assert_covers(&plan, ADDR, 64, &never);
        // Without the option, the first plan is every page.
        drop(t);
        let opts = TrackOptions {
            leave_out_untouched: false,
            ..opts
        };
        let t = start_with(test, &[TrackRegion::of(ADDR, &m[..])], &opts).unwrap();
        assert_eq!(
            t.full_plan(),
            [Span::Pages {
                addr: ADDR,
                pages: 64,
                flags: BufFlags::empty()
            }]
        );
    }
}

/// As on kernels before 6.4 (no `WP_UNPOPULATED`): anonymous regions are populated for
/// reading before the protection, so the first write to a never-touched page is still
/// seen (and, asynchronously, never-touched pages are not reported as written); the first
/// plan still leaves such pages out.
#[test]
fn without_wp_unpopulated_untouched_pages_are_still_watched() {
    let test = "without_wp_unpopulated_untouched_pages_are_still_watched";
    for (sync, avoid_scan) in [(false, false), (true, false), (true, true)] {
        let mut m = anon(64);
        for p in 0..4 {
            write_page(&mut m, p, 1);
        }
        let mut opts = options(sync);
        opts.avoid |= Avoid::WP_UNPOPULATED;
        if avoid_scan {
            opts.avoid |= Avoid::PAGEMAP_SCAN;
        }
        let Some(mut t) = start_with(test, &[TrackRegion::of(ADDR, &m[..])], &opts) else {
            return;
        };
        assert!(!t.info().features.contains(UffdFeatures::WP_UNPOPULATED));
        assert_eq!(pages_in(&t.full_plan(), ADDR, 64), (0..4).collect());
        write_page(&mut m, 40, 1);
        let plan = t.take().unwrap();
        assert_eq!(
            pages_in(&plan, ADDR, 64),
            BTreeSet::from([40]),
            "sync: {sync}"
        );
        let never: BTreeSet<u64> = (4..64).filter(|&p| p != 40).collect();
        assert_covers(&plan, ADDR, 64, &never);
    }
}

/// Full snapshot from the first plan, incremental snapshot from `take`, restore through
/// the chain: byte for byte the memory.
#[test]
fn snapshots_from_tracked_plans_restore_the_memory() {
    let test = "snapshots_from_tracked_plans_restore_the_memory";
    for sync in [false, true] {
        let pages = 256;
        let mut m = anon(pages);
        for p in 0..pages / 2 {
            m[p * ps()..(p + 1) * ps()].fill(p as u8 | 1);
        }
        let Some(mut t) = start(test, &[TrackRegion::of(ADDR, &m[..])], sync) else {
            return;
        };
        let dir = TempDir::new("track-chain");
        let (d1, d2) = (dir.path().join("1"), dir.path().join("2"));
        let opts = SnapshotOptions::default();
        {
            let source = Source::new().with_slice(ADDR, &m[..]).unwrap();
            let mut w = ImageWriter::create(&d1, 1).unwrap();
            let full = t.full_plan();
            assert!(full.iter().any(|s| matches!(s, Span::Hole { .. })));
            snapshot(&source, full, &mut w, &opts).unwrap();
            w.finish().unwrap();
        }
        for p in (0..pages).step_by(7) {
            write_page(&mut m, p, 0xEE);
        }
        {
            let source = Source::new().with_slice(ADDR, &m[..]).unwrap();
            let mut w = ImageWriter::create(&d2, 1)
                .unwrap()
                .with_parent(&d1)
                .unwrap();
            let plan = t.take().unwrap();
            assert_eq!(
                pages_in(&plan, ADDR, pages as u64),
                (0..pages as u64).step_by(7).collect()
            );
            snapshot(&source, plan, &mut w, &opts).unwrap();
            w.finish().unwrap();
        }
        assert_restores(&d2, ADDR, &m[..]);
    }
}

#[test]
fn discarded_pages_are_written_in_async_mode_and_lose_sync_tracking() {
    let test = "discarded_pages_are_written_in_async_mode_and_lose_sync_tracking";
    for sync in [false, true] {
        let mut m = anon(32);
        m.fill(3);
        let Some(mut t) = start(test, &[TrackRegion::of(ADDR, &m[..])], sync) else {
            return;
        };
        let at = m[5 * ps()..].as_mut_ptr().cast();
        // SAFETY: pages 5 and 6 are this test's own mapping; no reference into them is
        // live; after MADV_DONTNEED they read as zeros, which is what the test checks.
        unsafe { rustix::mm::madvise(at, 2 * ps(), rustix::mm::Advice::LinuxDontNeed) }.unwrap();
        assert_eq!(m[5 * ps()], 0);
        let r = t.take();
        if sync {
            let e = r.unwrap_err();
            assert!(
                matches!(
                    e,
                    TrackError::Lost {
                        by: LostBy::Discard,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("full snapshot"), "{e}");
            // It stays failed.
            assert_eq!(t.take().unwrap_err(), e);
        } else {
            let plan = r.unwrap();
            assert_eq!(pages_in(&plan, ADDR, 32), BTreeSet::from([5, 6]));
            // Protected again: a later write is seen.
            write_page(&mut m, 6, 1);
            assert_eq!(pages_in(&t.take().unwrap(), ADDR, 32), BTreeSet::from([6]));
        }
        drop(t);
    }
}

#[test]
fn mark_written_puts_pages_in_the_next_plan() {
    let test = "mark_written_puts_pages_in_the_next_plan";
    let m = anon(16);
    let Some(mut t) = start(test, &[TrackRegion::of(ADDR, &m[..])], false) else {
        return;
    };
    let ps = ps() as u64;
    t.mark_written(ADDR + 2 * ps, 3).unwrap();
    assert_eq!(
        pages_in(&t.take().unwrap(), ADDR, 16),
        BTreeSet::from([2, 3, 4])
    );
    assert!(pages_in(&t.take().unwrap(), ADDR, 16).is_empty());
    for (addr, pages) in [(ADDR + 15 * ps, 2), (ADDR - ps, 1), (ADDR + 1, 1)] {
        assert_eq!(
            t.mark_written(addr, pages),
            Err(TrackError::NotTracked { addr, pages })
        );
    }
}

/// A raw userfaultfd that has registered `mem` in WP mode, as another tracker would.
fn hold(mem: &[u8]) -> Uffd {
    let u = Uffd::open(UffdFlags::NONBLOCK).unwrap();
    u.api(UffdFeatures::PAGEFAULT_FLAG_WP).unwrap();
    u.register(mem.as_ptr() as usize, mem.len(), RegisterMode::WP)
        .unwrap();
    u
}

/// Whether `mem` is free to register with a user-mode-only userfaultfd (what an
/// unprivileged process may make).
fn registrable_user_mode(mem: &[u8]) -> bool {
    let u = Uffd::open(UffdFlags::NONBLOCK | UffdFlags::USER_MODE_ONLY).unwrap();
    u.api(UffdFeatures::PAGEFAULT_FLAG_WP).unwrap();
    u.register(mem.as_ptr() as usize, mem.len(), RegisterMode::WP)
        .is_ok()
}

/// Whether `mem` is free to register (so no userfaultfd holds it any more).
fn registrable(mem: &[u8]) -> bool {
    let u = Uffd::open(UffdFlags::NONBLOCK).unwrap();
    u.api(UffdFeatures::PAGEFAULT_FLAG_WP).unwrap();
    u.register(mem.as_ptr() as usize, mem.len(), RegisterMode::WP)
        .is_ok()
}

#[test]
fn a_range_registered_elsewhere_is_ebusy_and_nothing_stays_registered() {
    if !probe_userfaultfd().kernel_faults() {
        eprintln!("SKIPPED: no userfaultfd here");
        return;
    }
    let free = anon(16);
    let busy = anon(16);
    let _other = hold(&busy);
    for sync in [false, true] {
        let regions = [
            TrackRegion::of(ADDR, &free[..]),
            TrackRegion::of(ADDR + 0x10_0000, &busy[..]),
        ];
        // SAFETY: as in `start_with`: the tests' own anonymous mappings.
        let e = unsafe { Tracker::start(&regions, &options(sync)) }.unwrap_err();
        match &e {
            TrackError::Register { addr, errno, .. } => {
                assert_eq!((*addr, *errno), (ADDR + 0x10_0000, Errno::BUSY), "{e}")
            }
            _ => panic!("{e}"),
        }
        assert!(e.to_string().contains("another userfaultfd"), "{e}");
        // The first region, registered before the refusal, was unregistered.
        assert!(
            registrable(&free),
            "sync: {sync}: the free region stayed registered"
        );
    }
}

/// Starts a tracker in the asked mode over `regions` and returns its error, or `None`
/// (having said why) when the kernel cannot track at all.
fn refusal(regions: &[TrackRegion], sync: bool) -> Option<TrackError> {
    // SAFETY: as in `start_with`: the tests' own mappings.
    match unsafe { Tracker::start(regions, &options(sync)) } {
        Ok(t) => panic!("tracking started: {t:?}"),
        Err(e @ (TrackError::Unsupported { .. } | TrackError::Open { .. })) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => Some(e),
    }
}

/// A shared mapping of a regular file on a disk file system: synchronous write-protection
/// refuses it (EINVAL); with WP_ASYNC the kernel write-protects any memory type, so the
/// asynchronous mode tracks it.
#[test]
fn a_file_mapping_is_einval_in_sync_mode_and_tracked_async() {
    let test = "a_file_mapping_is_einval_in_sync_mode_and_tracked_async";
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let st = rustix::fs::statfs(dir).unwrap();
    // TMPFS_MAGIC, RAMFS_MAGIC: shmem, which synchronous write-protection supports.
    if [0x0102_1994, 0x8584_58f6].contains(&(st.f_type as u64)) {
        eprintln!("SKIPPED {test}: {} is on tmpfs", dir.display());
        return;
    }
    let path = dir.join(format!("track-einval-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(16 * ps() as u64).unwrap();
    // SAFETY: the file is this test's own, in its own directory; nobody else changes it.
    let mut map = unsafe { memmap2::MmapOptions::new().map_mut(&file) }.unwrap();
    std::fs::remove_file(&path).unwrap();
    let first = anon(8);
    let regions = [
        TrackRegion::of(ADDR, &first[..]),
        TrackRegion::of(ADDR + 0x10_0000, &map[..]),
    ];
    let Some(e) = refusal(&regions, true) else {
        return;
    };
    assert!(
        matches!(e, TrackError::Register { addr, errno: Errno::INVAL, .. } if addr == ADDR + 0x10_0000),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains("cannot be write-protected"), "{text}");
    assert!(
        text.contains("track-einval"),
        "the error names the mapping: {text}"
    );
    assert!(
        registrable(&first),
        "the anonymous region stayed registered"
    );

    let Some(mut t) = start(test, &regions[1..], false) else {
        return;
    };
    write_page(&mut map, 9, 1);
    assert_eq!(
        pages_in(&t.take().unwrap(), ADDR + 0x10_0000, 16),
        BTreeSet::from([9])
    );
}

/// A new `MAP_DROPPABLE` mapping of `len` bytes (6.11), or `None` after saying why not.
fn droppable(len: usize) -> Option<(*const u8, usize)> {
    // SAFETY: a new mapping at an address the kernel picks; the caller unmaps it and never
    // reads it as a Rust reference.
    let at = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::DROPPABLE,
        )
    };
    let at = match at {
        Ok(at) => at,
        Err(e) => {
            eprintln!(
                "SKIPPED (droppable memory): no MAP_DROPPABLE here ({e}; Linux 6.11 added it)"
            );
            return None;
        }
    };
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let flags = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{:x}-", at as usize)))
        .find(|l| l.starts_with("VmFlags:"))
        .unwrap_or_default();
    if flags.split_whitespace().all(|f| f != "dp") {
        eprintln!("SKIPPED (droppable memory): the kernel ignored MAP_DROPPABLE ({flags})");
        // SAFETY: the mapping made above, not used after.
        unsafe { rustix::mm::munmap(at, len) }.unwrap();
        return None;
    }
    Some((at as *const u8, len))
}

/// `MAP_DROPPABLE` memory (6.11), which the kernel may drop at any time: no userfaultfd
/// registers it, in either mode.
#[test]
fn droppable_memory_is_einval_in_both_modes() {
    let Some((at, len)) = droppable(8 * ps()) else {
        return;
    };
    for sync in [false, true] {
        let region = [TrackRegion::new(ADDR, at, len)];
        let Some(e) = refusal(&region, sync) else {
            break;
        };
        assert!(
            matches!(
                e,
                TrackError::Register {
                    errno: Errno::INVAL,
                    ..
                }
            ),
            "sync: {sync}: {e}"
        );
    }
    // SAFETY: the mapping `droppable` made, not used after.
    unsafe { rustix::mm::munmap(at as *mut _, len) }.unwrap();
}

/// Every path, in a process of its own so the counts are stable: the descriptors and
/// threads after each start/take/drop, and after each refusal, are those before.
#[test]
fn descriptors_and_threads_are_released_on_every_path() {
    if !alone("descriptors_and_threads_are_released_on_every_path") {
        return;
    }
    if !probe_userfaultfd().kernel_faults() {
        eprintln!("SKIPPED: no userfaultfd here");
        return;
    }
    let (fds, threads) = (open_fds(), tasks());
    let check = |what: &str| {
        assert_eq!(open_fds(), fds, "descriptors after {what}");
        assert_eq!(tasks(), threads, "threads after {what}");
    };
    let mut m = anon(32);
    for sync in [false, true] {
        let t = start("descriptors", &[TrackRegion::of(ADDR, &m[..])], sync);
        let Some(mut t) = t else { return };
        if sync {
            assert_eq!(tasks(), threads + 1, "the handler thread runs");
        }
        write_page(&mut m, 1, 1);
        t.take().unwrap();
        drop(t);
        check(if sync {
            "a sync tracker"
        } else {
            "an async tracker"
        });
        assert!(registrable(&m));

        // EBUSY on the second region.
        let busy = anon(4);
        let other = hold(&busy);
        let regions = [
            TrackRegion::of(ADDR, &m[..]),
            TrackRegion::of(ADDR + 0x100_0000, &busy[..]),
        ];
        let fds_with_other = open_fds();
        // SAFETY: as in `start_with`.
        assert!(unsafe { Tracker::start(&regions, &options(sync)) }.is_err());
        assert_eq!(open_fds(), fds_with_other);
        assert_eq!(tasks(), threads);
        drop(other);
        check("EBUSY");

        // EINVAL: MAP_DROPPABLE memory (6.11) as the second region.
        if let Some((at, len)) = droppable(4 * ps()) {
            let regions = [
                TrackRegion::of(ADDR, &m[..]),
                TrackRegion::new(ADDR + 0x100_0000, at, len),
            ];
            // SAFETY: as in `start_with`.
            let e = unsafe { Tracker::start(&regions, &options(sync)) }.unwrap_err();
            assert!(
                matches!(
                    e,
                    TrackError::Register {
                        errno: Errno::INVAL,
                        ..
                    }
                ),
                "{e}"
            );
            // SAFETY: the mapping `droppable` made, not used after.
            unsafe { rustix::mm::munmap(at as *mut _, len) }.unwrap();
            check("EINVAL");
            assert!(registrable(&m));
        }

        // A bad region, refused before anything is opened.
        let bad = [TrackRegion::new(ADDR, m.as_ptr().wrapping_add(1), ps())];
        // SAFETY: as in `start_with`.
        assert!(unsafe { Tracker::start(&bad, &options(sync)) }.is_err());
        check("a bad region");

        // Lost tracking (sync) or a discard (async), then drop.
        let mut t = start("descriptors", &[TrackRegion::of(ADDR, &m[..])], sync).unwrap();
        // SAFETY: page 0 of this test's own mapping; no reference into it is live.
        unsafe {
            rustix::mm::madvise(
                m.as_mut_ptr().cast(),
                ps(),
                rustix::mm::Advice::LinuxDontNeed,
            )
        }
        .unwrap();
        let _ = t.take();
        drop(t);
        check("a discard");
    }
}

#[test]
fn memfd_memory_is_tracked_whole() {
    let test = "memfd_memory_is_tracked_whole";
    let pages = 64;
    let fd = rustix::fs::memfd_create("page-pipe-track", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, (pages * ps()) as u64).unwrap();
    let file = std::fs::File::from(fd);
    // SAFETY: the memfd is this test's own; only this mapping changes it.
    let mut m = unsafe { MmapOptions::new().map_mut(&file) }.unwrap();
    m[..8 * ps()].fill(1);
    for sync in [false, true] {
        let Some(mut t) = start(test, &[TrackRegion::of(ADDR, &m[..])], sync) else {
            return;
        };
        // Shared memory: a page this mapping never faulted in may hold data in the memfd,
        // so the first plan is every page.
        assert_eq!(
            t.full_plan(),
            [Span::Pages {
                addr: ADDR,
                pages: pages as u64,
                flags: BufFlags::empty()
            }]
        );
        write_page(&mut m, 2, 9);
        write_page(&mut m, 50, 9);
        assert_eq!(
            pages_in(&t.take().unwrap(), ADDR, pages as u64),
            BTreeSet::from([2, 50])
        );
        assert!(pages_in(&t.take().unwrap(), ADDR, pages as u64).is_empty());
    }
}

/// `AnonHugePages` of the mapping at `addr`, in KiB.
fn anon_huge_kb(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
        let bounds = range.and_then(|(s, e)| {
            Some((
                usize::from_str_radix(s, 16).ok()?,
                usize::from_str_radix(e, 16).ok()?,
            ))
        });
        if let Some((s, e)) = bounds {
            inside = s <= addr && addr < e;
            continue;
        }
        match line.strip_prefix("AnonHugePages:") {
            Some(v) if inside => return v.trim().trim_end_matches("kB").trim().parse().unwrap(),
            _ => {}
        }
    }
    0
}

/// Transparent huge pages: in the synchronous mode with a 2 MiB granule the handler lifts
/// whole huge pages, which stay huge, and reports their 512 pages.
#[test]
fn huge_pages_stay_huge_with_a_huge_granule() {
    let test = "huge_pages_stay_huge_with_a_huge_granule";
    const HUGE: usize = 2 << 20;
    let raw = anon(3 * HUGE / ps());
    let start_at = (raw.as_ptr() as usize).next_multiple_of(HUGE);
    let base = start_at as *mut u8;
    // SAFETY: 2 huge pages inside `raw`, this test's own mapping, which outlives `mem`.
    let mem = unsafe { std::slice::from_raw_parts_mut(base, 2 * HUGE) };
    // SAFETY: advice on this test's own mapping; it changes no contents.
    let advised =
        unsafe { rustix::mm::madvise(base.cast(), 2 * HUGE, rustix::mm::Advice::LinuxHugepage) };
    mem.fill(1);
    let huge = anon_huge_kb(start_at);
    if advised.is_err() || huge < 4096 {
        eprintln!(
            "SKIPPED {test}: no transparent huge pages here (madvise: {advised:?}, AnonHugePages {huge} kB)"
        );
        return;
    }
    let region = TrackRegion::of(ADDR, mem).with_granule(HUGE);
    let Some(mut t) = start(test, &[region], true) else {
        return;
    };
    assert_eq!(anon_huge_kb(start_at), 4096, "protection split a huge page");
    mem[HUGE + 5 * ps()] = 2;
    assert_eq!(anon_huge_kb(start_at), 4096, "the write split a huge page");
    let plan = t.take().unwrap();
    assert_eq!(pages_in(&plan, ADDR, 1024), (512..1024).collect());
    assert_eq!(
        anon_huge_kb(start_at),
        4096,
        "re-protecting split a huge page"
    );
    assert_eq!(t.faults(), 1);
    drop(t);
    drop(raw);
}

/// hugetlb memory, where this machine has huge pages reserved.
#[test]
fn hugetlb_memory_is_tracked_in_huge_pages() {
    let test = "hugetlb_memory_is_tracked_in_huge_pages";
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let free: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if free < 2 {
        eprintln!(
            "SKIPPED {test}: no hugetlb pages reserved (vm.nr_hugepages; the tests do not change /proc/sys)"
        );
        return;
    }
    const HUGE: usize = 2 << 20;
    for sync in [false, true] {
        let mut m = MmapOptions::new()
            .len(2 * HUGE)
            .huge(Some(21))
            .map_anon()
            .unwrap();
        m.fill(1);
        let Some(mut t) = start(test, &[TrackRegion::of(ADDR, &m[..])], sync) else {
            return;
        };
        m[HUGE + 3 * ps()] = 2;
        let plan = t.take().unwrap();
        assert_eq!(
            pages_in(&plan, ADDR, 1024),
            (512..1024).collect(),
            "sync: {sync}"
        );
    }
}

#[test]
fn privilege_full_works_for_root() {
    let probe = probe_userfaultfd();
    if !probe.kernel_faults() {
        eprintln!("SKIPPED: this process may not have kernel-mode userfaultfds: {probe}");
        return;
    }
    let m = anon(4);
    let opts = TrackOptions {
        privilege: Privilege::Full,
        ..TrackOptions::default()
    };
    let Some(t) = start_with(
        "privilege_full_works_for_root",
        &[TrackRegion::of(ADDR, &m[..])],
        &opts,
    ) else {
        return;
    };
    assert!(!t.info().user_mode_only);
}

/// Reads `data` from a pipe into `dst` with `read(2)`: a write the kernel makes.
fn kernel_write(dst: &mut [u8], data: &[u8]) -> Result<usize, Errno> {
    let p = page_pipe_sys::pipe().unwrap();
    page_pipe_sys::write_exact(&p.write, data).unwrap();
    rustix::io::read(&p.read, &mut dst[..data.len()])
}

/// As user nobody (`vm.unprivileged_userfaultfd` 0, `/dev/userfaultfd` root-only):
/// kernel-mode userfaultfds are refused with EPERM, and the error says why it matters.
#[test]
fn unprivileged_kernel_faults_are_refused_with_eperm() {
    match unprivileged("unprivileged_kernel_faults_are_refused_with_eperm") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    let probe = probe_userfaultfd();
    if probe.kernel_faults() {
        eprintln!("SKIPPED: user nobody may have kernel-mode userfaultfds here: {probe}");
        return;
    }
    // This re-run is a process of its own with one test: counts are stable.
    let (fds, threads) = (open_fds(), tasks());
    let m = anon(8);
    let region = [TrackRegion::of(ADDR, &m[..])];
    let full = TrackOptions {
        privilege: Privilege::Full,
        ..TrackOptions::default()
    };
    let e = Tracker::start_async(&region, &full).unwrap_err();
    assert_eq!((open_fds(), tasks()), (fds, threads), "after {e}");
    match &e {
        TrackError::Privilege {
            syscall,
            device,
            sync,
            ..
        } => {
            assert_eq!(*syscall, Errno::PERM);
            assert_eq!(*device, probe.dev.unwrap_err());
            assert!(!sync);
        }
        _ => panic!("{e}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("UFFD_USER_MODE_ONLY") && text.contains("read(2)"),
        "{text}"
    );
    assert!(text.contains("KVM"), "{text}");
    // The synchronous mode would make kernel writes fail: refused unless asked for.
    // SAFETY: as in `start_with`.
    let e = unsafe { Tracker::start(&region, &options(true)) }.unwrap_err();
    assert!(matches!(e, TrackError::Privilege { sync: true, .. }), "{e}");
    assert!(e.to_string().contains("EFAULT"), "{e}");
    assert_eq!((open_fds(), tasks()), (fds, threads), "after {e}");
    assert!(registrable_user_mode(&m), "the region stayed registered");
}

/// As user nobody: asynchronous tracking runs on a user-mode-only userfaultfd and still
/// sees the writes the kernel makes for the process.
#[test]
fn unprivileged_async_tracking_sees_kernel_writes() {
    match unprivileged("unprivileged_async_tracking_sees_kernel_writes") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    let test = "unprivileged_async_tracking_sees_kernel_writes";
    let mut m = anon(16);
    m.fill(1);
    let Some(mut t) = start(test, &[TrackRegion::of(ADDR, &m[..])], false) else {
        return;
    };
    assert_eq!(
        t.info().user_mode_only,
        !probe_userfaultfd().kernel_faults()
    );
    write_page(&mut m, 3, 2);
    assert_eq!(kernel_write(&mut m[7 * ps()..], b"kernel"), Ok(6));
    assert_eq!(&m[7 * ps()..7 * ps() + 6], b"kernel");
    assert_eq!(
        pages_in(&t.take().unwrap(), ADDR, 16),
        BTreeSet::from([3, 7])
    );
}

/// As user nobody: synchronous tracking needs `Privilege::UserModeOnly`, and then the
/// kernel's writes into protected pages fail with EFAULT while user writes are recorded.
#[test]
fn unprivileged_sync_tracking_makes_kernel_writes_fail() {
    match unprivileged("unprivileged_sync_tracking_makes_kernel_writes_fail") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    if probe_userfaultfd().kernel_faults() {
        eprintln!("SKIPPED: user nobody may have kernel-mode userfaultfds here");
        return;
    }
    let test = "unprivileged_sync_tracking_makes_kernel_writes_fail";
    let mut m = anon(16);
    m.fill(1);
    let opts = TrackOptions {
        privilege: Privilege::UserModeOnly,
        ..options(true)
    };
    let Some(mut t) = start_with(test, &[TrackRegion::of(ADDR, &m[..])], &opts) else {
        return;
    };
    assert!(t.info().user_mode_only);
    assert_eq!(
        kernel_write(&mut m[7 * ps()..], b"kernel"),
        Err(Errno::FAULT)
    );
    write_page(&mut m, 3, 2);
    assert_eq!(pages_in(&t.take().unwrap(), ADDR, 16), BTreeSet::from([3]));
}

/// The demo takes its incremental snapshot with the tracker, checks the set against what
/// it dirtied, and says how the set was found.
#[test]
fn the_demo_finds_its_dirty_set_with_the_tracker() {
    if std::env::var_os(AS_NOBODY).is_some() {
        return;
    }
    let probe = probe_userfaultfd();
    for (mode, want) in [("auto", "(async)"), ("sync", "(sync)")] {
        let dir = TempDir::new("track-demo");
        let out = Command::new(snapshot_demo())
            .args(["--size", "8M", "--dirty", "25", "--tracker", mode, "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("matches the region byte for byte"), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("dirty set:"))
            .unwrap_or_else(|| panic!("no dirty set line: {text}"));
        if probe.async_tracking() || (mode == "sync" && probe.any()) {
            assert!(line.contains(want), "{line}");
            assert!(line.contains("pages from userfaultfd"), "{line}");
        } else {
            assert!(line.contains("dirtying pattern"), "{line}");
        }
    }
}
