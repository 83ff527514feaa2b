//! Live (background) snapshots: writer threads keep changing memory during every dump,
//! and the image restores to the memory as it was at the instant of protection; the
//! bound on saved copies makes writers wait and let go; a sink failing in the middle
//! releases the writers and leaves nothing registered.

mod attacks;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};
use page_pipe::image::{Image, ImageWriter};
use page_pipe::track::{
    Avoid, LiveError, LiveKind, LiveOptions, TrackError, TrackOptions, TrackRegion, Tracker,
};
use page_pipe::{CallbackSink, PagemapEntry};
use page_pipe_tests::{TempDir, alone, proptest_config};
use proptest::prelude::*;

const BASE: u64 = 0x40_0000_0000;

fn ps() -> usize {
    page_pipe_sys::page_size().get()
}

/// Memory that writer threads change, through its address only (the test never holds a
/// reference into it while writers run).
struct Shared {
    base: usize,
    pages: usize,
    /// Writers hold it for reading around each write; the test takes it for writing to
    /// pause them (the instant of a snapshot).
    pause: RwLock<()>,
    stop: AtomicBool,
    writes: AtomicU64,
    /// Pages written since the test last cleared them (with the writers paused).
    marks: Vec<AtomicBool>,
}

impl Shared {
    fn new(mem: &mut MmapMut) -> Arc<Shared> {
        Self::at(mem.as_mut_ptr() as usize, mem.len() / ps())
    }

    /// Over `pages` pages at `base`, which the caller keeps mapped while it is used.
    fn at(base: usize, pages: usize) -> Arc<Shared> {
        Arc::new(Shared {
            base,
            pages,
            pause: RwLock::new(()),
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            marks: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    fn write(&self, page: usize, value: u64) {
        let _g = self.pause.read().unwrap();
        let words = ps() / 8;
        for w in [0, words / 2, words - 1] {
            let at = (self.base + page * ps() + w * 8) as *mut u64;
            // SAFETY: `at` is a word of the test's mapping, alive until the writers are
            // joined; only writers write it, with volatile stores; readers copy it only
            // while the writers are paused.
            unsafe { at.write_volatile(value) };
        }
        self.marks[page].store(true, Ordering::Relaxed);
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the memory, taken with the writers paused by the caller.
    fn copy(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.pages * ps()];
        // SAFETY: the mapping is alive and the writers are paused (the caller holds the
        // pause lock for writing), so nothing changes it during the copy.
        unsafe { page_pipe_sys::copy_from_raw(&mut v, self.base as *const u8) };
        v
    }
}

fn writers(
    s: &Arc<Shared>,
    n: usize,
    seed: u64,
    gap: Duration,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|t| {
            let s = Arc::clone(s);
            std::thread::spawn(move || {
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (t as u64 + 1);
                while !s.stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    s.write((x % s.pages as u64) as usize, x);
                    if !gap.is_zero() {
                        std::thread::sleep(gap);
                    }
                }
            })
        })
        .collect()
}

fn sync_tracker(mem: &MmapMut) -> Option<Tracker> {
    let opts = TrackOptions {
        avoid: Avoid::WP_ASYNC,
        ..TrackOptions::default()
    };
    // SAFETY: the region is the test's own anonymous mapping: no allocator heap, stack
    // or lock lives in it; its writers hold only the pause lock, which the fault handler
    // never takes; it stays mapped until the tracker is gone.
    match unsafe { Tracker::start(&[TrackRegion::of(BASE, &mem[..])], &opts) } {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("SKIPPED: no synchronous userfaultfd tracking here: {e}");
            None
        }
    }
}

fn restored(dir: &std::path::Path, len: usize) -> Vec<u8> {
    let mut back = vec![0u8; len];
    Image::open(dir).unwrap().read(BASE, &mut back).unwrap();
    back
}

/// A full and then an incremental live snapshot with writers running during both dumps:
/// each image restores to the memory at its instant.
fn full_then_incremental(pages: usize, threads: usize, seed: u64, gap: Duration, max_saved: u64) {
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, seed as u8);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let dir = TempDir::new("live");
    let opts = LiveOptions {
        max_saved_pages: max_saved,
        ..LiveOptions::default()
    };
    let w = writers(&s, threads, seed, gap);
    let mut saved = 0;
    for (i, kind) in [LiveKind::Full, LiveKind::Incremental]
        .into_iter()
        .enumerate()
    {
        let (reference, live) = {
            let _paused = s.pause.write().unwrap();
            let reference = s.copy();
            // SAFETY: as for `sync_tracker`; the mapping outlives the dump.
            let live = unsafe { tracker.live(kind, &opts) }.unwrap();
            (reference, live)
        };
        let d = dir.path().join(format!("{}", i + 1));
        let mut wr = ImageWriter::create(&d, 1).unwrap().with_sync(false);
        if i == 1 {
            wr = wr.with_parent(dir.path().join("1")).unwrap();
        }
        let report = live.dump(&mut wr).unwrap();
        wr.finish().unwrap();
        saved += report.saved_pages;
        if max_saved < 4 {
            assert!(report.saved_pages > 0 || report.writer_stalls == 0);
        }
        let back = restored(&d, pages * ps());
        if back != reference {
            let bad = (0..pages)
                .find(|&p| back[p * ps()..(p + 1) * ps()] != reference[p * ps()..(p + 1) * ps()])
                .unwrap();
            panic!(
                "snapshot {} differs from the memory at its instant, first at page {bad}",
                i + 1
            );
        }
    }
    s.stop.store(true, Ordering::Relaxed);
    for t in w {
        t.join().unwrap();
    }
    assert!(s.writes.load(Ordering::Relaxed) > 0);
    let _ = saved;
    tracker.stop().unwrap();
}

proptest! {
    #![proptest_config(proptest_config(12, "live"))]

    #[test]
    fn images_equal_the_memory_at_the_instant_of_protection(
        pages in 64usize..1024,
        threads in 1usize..4,
        seed in any::<u64>(),
        gap_us in prop_oneof![Just(0u64), 1u64..50],
        max_saved in prop_oneof![Just(16384u64), 1u64..8],
    ) {
        full_then_incremental(pages, threads, seed, Duration::from_micros(gap_us), max_saved);
    }
}

/// With room for one saved page, writers that come to pages the dump still needs wait
/// for it and are let go as it writes: the snapshot is still exact.
#[test]
fn the_bound_on_saved_copies_makes_writers_wait_and_let_go() {
    let pages = 512;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 3);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let opts = LiveOptions {
        max_saved_pages: 1,
        snapshot: page_pipe::snapshot::SnapshotOptions {
            max_pipe_pages: Some(16),
            ..Default::default()
        },
    };
    let (reference, live) = {
        let _p = s.pause.write().unwrap();
        let r = s.copy();
        // SAFETY: as for `sync_tracker`.
        (r, unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap())
    };
    let w = writers(&s, 2, 99, Duration::ZERO);
    // A slow sink, so that writers come to pages before the dump does.
    let mut got = Vec::new();
    let mut sink = CallbackSink::new(|e: &PagemapEntry, b: &[u8]| {
        std::thread::sleep(Duration::from_millis(2));
        got.push((e.vaddr, b.to_vec()));
        Ok(())
    });
    let report = live.dump(&mut sink).unwrap();
    drop(sink);
    s.stop.store(true, Ordering::Relaxed);
    for t in w {
        t.join().unwrap();
    }
    assert!(report.saved_peak_bytes <= ps() as u64, "{report:?}");
    assert!(report.writer_stalls > 0, "writers never waited: {report:?}");
    let mut back = vec![0u8; pages * ps()];
    for (vaddr, bytes) in got {
        let off = (vaddr - BASE) as usize;
        back[off..off + bytes.len()].copy_from_slice(&bytes);
    }
    assert!(
        back == reference,
        "the snapshot differs from the memory at its instant"
    );
}

fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A sink failing in the middle: the error says so, every writer goes on, and nothing
/// stays registered or running.
#[test]
fn a_failing_sink_releases_the_writers_and_leaves_nothing_behind() {
    if !alone("a_failing_sink_releases_the_writers_and_leaves_nothing_behind") {
        return;
    }
    let (fds, threads) = (page_pipe_tests::open_fds(), threads_now());
    let pages = 256;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    mem.fill(7);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let opts = LiveOptions {
        snapshot: page_pipe::snapshot::SnapshotOptions {
            max_pipe_pages: Some(16),
            ..Default::default()
        },
        ..LiveOptions::default()
    };
    // SAFETY: as for `sync_tracker`.
    let live = unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap();
    let w = writers(&s, 2, 5, Duration::ZERO);
    let mut n = 0;
    let mut sink = CallbackSink::new(|_: &PagemapEntry, _: &[u8]| {
        n += 1;
        std::thread::sleep(Duration::from_millis(1));
        if n > 3 {
            Err(std::io::Error::other("disk full"))
        } else {
            Ok(())
        }
    });
    let err = live.dump(&mut sink).unwrap_err();
    drop(sink);
    assert!(matches!(err, LiveError::Dump(_)), "{err}");
    // The writers go on: every page can be written now.
    let before = s.writes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        s.writes.load(Ordering::Relaxed) > before,
        "writers are stuck"
    );
    s.stop.store(true, Ordering::Relaxed);
    for t in w {
        t.join().unwrap();
    }
    // The tracker is stopped: takes fail, and the range is free to register again.
    assert!(matches!(tracker.take(), Err(TrackError::Lost { .. })));
    drop(tracker);
    let again = TrackOptions::default();
    Tracker::start_async(&[TrackRegion::of(BASE, &mem[..])], &again)
        .map(drop)
        .or_else(|e| match e {
            TrackError::Unsupported { .. } => Ok(()),
            e => Err(e),
        })
        .unwrap();
    mem.fill(1);
    drop(mem);
    assert_eq!(page_pipe_tests::open_fds(), fds);
    assert_eq!(threads_now(), threads);
}

/// An asynchronous tracker cannot run a live snapshot (no faults to save pages at): a
/// typed error, and the tracker goes on.
#[test]
fn an_asynchronous_tracker_is_refused() {
    let mem = MmapOptions::new().len(16 * ps()).map_anon().unwrap();
    let Ok(mut tracker) =
        Tracker::start_async(&[TrackRegion::of(BASE, &mem[..])], &TrackOptions::default())
    else {
        eprintln!("SKIPPED an_asynchronous_tracker_is_refused: no asynchronous tracking here");
        return;
    };
    // SAFETY: nothing is registered synchronously; the call is refused.
    let err = unsafe { tracker.live(LiveKind::Full, &LiveOptions::default()) }.unwrap_err();
    assert!(
        matches!(err, LiveError::Track(TrackError::Unsupported { .. })),
        "{err}"
    );
    assert!(tracker.take().is_ok());
}

/// Into every sink kind, chunked or not: a socket (the bytes as the capture's instant),
/// a callback, in single-pass mode, with writers running.
#[test]
fn every_sink_kind_gets_the_memory_at_the_instant() {
    use std::io::Read;
    let pages = 256;
    let mut mem = MmapOptions::new().len(pages * ps()).map_anon().unwrap();
    page_pipe_tests::fill_pattern(&mut mem, 21);
    let Some(mut tracker) = sync_tracker(&mem) else {
        return;
    };
    let s = Shared::new(&mut mem);
    let w = writers(&s, 2, 21, Duration::from_micros(5));
    for chunk_mode in [true, false] {
        let opts = LiveOptions {
            snapshot: page_pipe::snapshot::SnapshotOptions {
                chunk_mode,
                max_pipe_pages: Some(16),
                ..Default::default()
            },
            ..LiveOptions::default()
        };
        // A Unix socket, read after the dump.
        let (reference, live) = {
            let _p = s.pause.write().unwrap();
            // SAFETY: as for `sync_tracker`.
            (
                s.copy(),
                unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap(),
            )
        };
        let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            rx.read_to_end(&mut v).unwrap();
            v
        });
        let mut sink = page_pipe::FdSink::new(tx);
        live.dump(&mut sink).unwrap();
        drop(sink);
        assert!(
            reader.join().unwrap() == reference,
            "socket, chunk mode {chunk_mode}"
        );
        // A callback.
        let (reference, live) = {
            let _p = s.pause.write().unwrap();
            // SAFETY: as for `sync_tracker`.
            (
                s.copy(),
                unsafe { tracker.live(LiveKind::Full, &opts) }.unwrap(),
            )
        };
        let mut got = Vec::new();
        let mut cb = CallbackSink::new(|_: &PagemapEntry, b: &[u8]| {
            got.extend_from_slice(b);
            Ok(())
        });
        live.dump(&mut cb).unwrap();
        drop(cb);
        assert!(got == reference, "callback, chunk mode {chunk_mode}");
    }
    s.stop.store(true, Ordering::Relaxed);
    for t in w {
        t.join().unwrap();
    }
    tracker.stop().unwrap();
}
