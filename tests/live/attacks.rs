//! Attacks on the promises of live snapshots: a `Live` dropped or a sink panicking before
//! the dump ends loses no written page for the next take; memory discarded during the
//! dump never yields an image that claims success; kernel writes (`read(2)`), `fork`,
//! `mprotect`, never-touched pages, transparent huge pages, memfd memory, many writers
//! with no room for saved copies, and takes right after a dump (exactly the pages written
//! since the instant).

use std::collections::BTreeSet;
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
    let w = writers(&s, 3, 17, Duration::ZERO);
    let mut n = 0;
    let mut sink = CallbackSink::new(|_: &PagemapEntry, _: &[u8]| {
        n += 1;
        std::thread::sleep(Duration::from_millis(1));
        assert!(n < 5, "the sink gives up");
        Ok(())
    });
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| live.dump(&mut sink, &opts)));
    assert!(r.is_err(), "the sink's panic was swallowed");
    s.assert_writers_go_on(1000);
    let guard = s.pause.write().unwrap();
    let mut want = s.marked();
    want.extend(&before);
    let next = pages_of(&tracker.take().unwrap());
    drop(guard);
    stop_writers(&s, w);
    assert!(
        want.is_subset(&next),
        "the next take lost {:?}",
        want.difference(&next).collect::<Vec<_>>()
    );
    tracker.stop().unwrap();
}

/// Pages discarded (`MADV_DONTNEED`) during the dump before it reads them would be
/// written as zeros: the dump must not succeed with that image.
#[test]
fn memory_discarded_during_the_dump_fails_it() {
    let _w = Watchdog::new("memory_discarded_during_the_dump_fails_it", 60);
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
    let r = live.dump(&mut sink, &opts);
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
    drop(tracker);
    // Nothing stays registered: another tracker may have the memory.
    drop(sync_tracker(&mem).expect("the memory is free again"));
}
