//! Lazy restore (`page_pipe::lazy`): random chains restored lazily from a local image
//! and from a page server, byte for byte as `Image::read` restores them; several threads
//! faulting at once; a pages file truncated and a page server dying under the restore
//! (a clear error, no thread left waiting); what an unprivileged process gets; and no
//! thread or descriptor left behind.
//!
//! Every test that touches restored memory does it on threads it waits for with a
//! timeout, so a restore that leaves a thread hanging fails the test instead of hanging
//! it.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use memmap2::MmapMut;
use page_pipe::image::{Image, ImageError, ImageWriter, PageFlags, PagemapEntry};
use page_pipe::lazy::{
    LazyError, LazyOptions, LazyReport, LazyRestore, LazySource, Privilege, runs_held,
};
use page_pipe::page_server::{PageServer, PageServerClient, RunningServer, ServerConfig};
use page_pipe_sys::{Errno, probe_userfaultfd};
use page_pipe_tests::{TempDir, Unprivileged, alone, open_fds, unprivileged};
use proptest::prelude::*;

mod attacks;

/// Where the test images live in the snapshot's address space.
const BASE: u64 = 0x7f00_0000_0000;

/// The longest any wait of these tests may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(30);

fn ps() -> usize {
    page_pipe::page_size()
}

fn tasks() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A fresh anonymous mapping of `pages` pages.
fn fresh(pages: usize) -> MmapMut {
    memmap2::MmapOptions::new()
        .len(pages * ps())
        .map_anon()
        .expect("map anonymous memory")
}

/// Whether this process may have a userfaultfd at all; else says why the test skips.
fn have_uffd(test: &str) -> bool {
    let p = probe_userfaultfd();
    if p.kernel_faults() || p.user_mode_only.is_ok() {
        return true;
    }
    eprintln!("SKIPPED {test}: no userfaultfd here: {p}");
    false
}

/// Starts a lazy restore of `mem` from `vaddr`.
fn start(
    source: LazySource,
    vaddr: u64,
    mem: &mut MmapMut,
    opts: &LazyOptions,
) -> Result<LazyRestore, LazyError> {
    // SAFETY:
    // - `mem` is a fresh anonymous mapping owned by the test; no reference into it is
    //   alive across the call, and the tests keep it mapped until the restore ended;
    // - the threads that touch it only read or write it and hold no lock meanwhile;
    //   nothing the restore's threads use lives there, and nothing forks;
    // - the tests that make system calls into it check the user-mode-only case.
    unsafe { LazyRestore::start(source, vaddr, mem.as_mut_ptr(), mem.len(), opts) }
}

/// The memory at `host` (`len` bytes) read on `threads` threads, each taking every
/// `threads`-th page (in a shuffled order), or `None` when they did not finish in time
/// (a hang).
fn touch_all(host: usize, len: usize, threads: usize, seed: u64) -> Option<Vec<u8>> {
    let ps = ps();
    let pages = len / ps;
    let (tx, rx) = mpsc::channel();
    for t in 0..threads {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut mine: Vec<usize> = (t..pages).step_by(threads).collect();
            let mut x = seed | 1;
            for i in (1..mine.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                mine.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut out = Vec::with_capacity(mine.len());
            for p in mine {
                let mut page = vec![0u8; ps];
                // SAFETY: `host..host + len` is the test's mapping, kept mapped until
                // this thread is done or the test has failed; a read of a page not in
                // yet waits for it.
                let src = unsafe { std::slice::from_raw_parts((host + p * ps) as *const u8, ps) };
                page.copy_from_slice(src);
                out.push((p, page));
            }
            let _ = tx.send(out);
        });
    }
    drop(tx);
    let mut mem = vec![0u8; len];
    for _ in 0..threads {
        let got = rx.recv_timeout(HANG).ok()?;
        for (p, page) in got {
            mem[p * ps..(p + 1) * ps].copy_from_slice(&page);
        }
    }
    Some(mem)
}

/// Waits for the restore, failing on a hang.
fn finish(r: LazyRestore) -> Result<LazyReport, LazyError> {
    assert!(
        r.wait_timeout(HANG),
        "the restore did not end: {:?}",
        r.report()
    );
    r.wait()
}

/// What one image of a chain holds for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    None,
    Present,
    LazyPresent,
    Lazy,
    Parent,
}

fn held(parent: bool) -> BoxedStrategy<Held> {
    let mut v = vec![
        (1, Just(Held::None)),
        (3, Just(Held::Present)),
        (1, Just(Held::LazyPresent)),
        (1, Just(Held::Lazy)),
    ];
    if parent {
        v.push((3, Just(Held::Parent)));
    }
    proptest::strategy::Union::new_weighted(v.into_iter().map(|(w, s)| (w, s.boxed())).collect())
        .boxed()
}

/// A chain, base first: each level holds `pages` pages from `BASE`.
fn chain() -> impl Strategy<Value = Vec<Vec<Held>>> {
    (1usize..=3, 1usize..=48).prop_flat_map(|(depth, pages)| {
        let levels: Vec<_> = (0..depth)
            .map(|l| proptest::collection::vec(held(l > 0), pages))
            .collect();
        levels.prop_map(|mut levels| {
            // A PARENT page needs a parent entry for it.
            for l in 1..levels.len() {
                for p in 0..levels[l].len() {
                    if levels[l][p] == Held::Parent && levels[l - 1][p] == Held::None {
                        levels[l][p] = Held::Present;
                    }
                }
            }
            levels
        })
    })
}

/// Page `p` as level `l` captured it.
fn content(l: usize, p: usize) -> Vec<u8> {
    (0..ps())
        .map(|i| {
            (i as u8).wrapping_mul(31) ^ (p as u8).wrapping_mul(7) ^ (l as u8).wrapping_mul(85) ^ 1
        })
        .collect()
}

/// Writes the chain under `root` (`0`, `1`, ... each the parent of the next); returns
/// the directories.
fn write_chain(root: &Path, levels: &[Vec<Held>]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (l, level) in levels.iter().enumerate() {
        let dir = root.join(l.to_string());
        let mut w = ImageWriter::create(&dir, 1).unwrap().with_sync(false);
        if l > 0 {
            w = w.with_parent(&dirs[l - 1]).unwrap();
        }
        for (p, h) in level.iter().enumerate() {
            let e = |flags| PagemapEntry {
                vaddr: BASE + (p * ps()) as u64,
                pages: 1,
                flags,
            };
            match h {
                Held::None => {}
                Held::Present => w.push_bytes(e(PageFlags::PRESENT), &content(l, p)).unwrap(),
                Held::LazyPresent => w
                    .push_bytes(e(PageFlags::LAZY | PageFlags::PRESENT), &content(l, p))
                    .unwrap(),
                Held::Lazy => w.push(e(PageFlags::LAZY)).unwrap(),
                Held::Parent => w.push(e(PageFlags::PARENT)).unwrap(),
            }
        }
        w.finish().unwrap();
        dirs.push(dir);
    }
    dirs
}

fn options() -> impl Strategy<Value = LazyOptions> {
    (
        1u64..=20,
        any::<bool>(),
        1u64..=70,
        1usize..=3,
        prop_oneof![Just(0u64), Just(50)],
        proptest::option::of(Just(0usize)),
    )
        .prop_map(
            |(fault_pages, prefetch, prefetch_pages, prefetch_threads, spin, fault_cpu)| {
                LazyOptions {
                    fault_pages,
                    prefetch,
                    prefetch_pages,
                    prefetch_threads,
                    spin: Duration::from_micros(spin),
                    fault_cpu,
                    ..LazyOptions::default()
                }
            },
        )
}

/// Restores `pages` pages from `vaddr` lazily from `source` with `opts`, touching them
/// on `threads` threads; returns the memory and the report.
fn lazy_read(
    source: LazySource,
    vaddr: u64,
    pages: usize,
    opts: &LazyOptions,
    threads: usize,
) -> (Vec<u8>, LazyReport) {
    let mut mem = fresh(pages);
    let r = start(source, vaddr, &mut mem, opts).expect("start");
    let host = mem.as_ptr() as usize;
    let Some(got) = touch_all(host, mem.len(), threads, vaddr ^ pages as u64) else {
        let report = r.report();
        drop(r);
        panic!("touching the memory hung: {report:?}");
    };
    let report = finish(r).expect("lazy restore");
    assert!(got[..] == mem[..], "the memory changed after it was read");
    (got, report)
}

fn check_report(r: &LazyReport, pages: usize) {
    assert!(r.complete, "{r:?}");
    assert_eq!(r.pages, pages as u64);
    assert_eq!(r.pages_in, r.pages);
    // Every page came in through exactly one fill.
    assert_eq!(
        r.fault_pages + r.prefetch_pages + r.zero_pages,
        r.pages,
        "{r:?}"
    );
    assert!(r.woken <= r.faults, "{r:?}");
}

/// A page server serving the images under `dir` (GET), on loopback TCP.
fn server(dir: &Path) -> RunningServer {
    PageServer::bind("127.0.0.1:0", ServerConfig::new(dir))
        .unwrap()
        .spawn()
        .unwrap()
}

fn client(s: &RunningServer) -> PageServerClient {
    PageServerClient::connect_tcp(s.local_addr().unwrap()).unwrap()
}

proptest! {
    #![proptest_config(page_pipe_tests::proptest_config(40, "lazy"))]

    /// A random chain restored lazily from the local image gives what `Image::read`
    /// gives, page for page, whatever the run length, prefetch and threads.
    #[test]
    fn local_chains_restore_as_read_does(
        levels in chain(),
        cut in (0usize..=50, 0usize..=50),
        opts in options(),
        threads in 1usize..=4,
    ) {
        if !have_uffd("local_chains_restore_as_read_does") {
            return Ok(());
        }
        let root = TempDir::new("lazy-chains");
        let dirs = write_chain(root.path(), &levels);
        let img = Image::open(dirs.last().unwrap()).unwrap();
        let from = cut.0.min(cut.1);
        let to = cut.0.max(cut.1).max(from + 1);
        let vaddr = BASE + (from * ps()) as u64;
        let mut expect = vec![0u8; (to - from) * ps()];
        img.read(vaddr, &mut expect).unwrap();
        let (got, report) = lazy_read(LazySource::image(img), vaddr, to - from, &opts, threads);
        prop_assert!(got == expect, "lazy restore differs from Image::read");
        check_report(&report, to - from);
        if !opts.prefetch {
            prop_assert_eq!(report.prefetch_pages, 0);
            prop_assert!(report.faults > 0);
        }
    }

    /// The same chain served by our page server (`GET`), the runs it holds taken from
    /// the pagemap: the memory `Image::read` gives (pages the server lacks are zeros).
    #[test]
    fn remote_chains_restore_as_read_does(
        levels in chain(),
        cut in (0usize..=50, 0usize..=50),
        opts in options(),
        threads in 1usize..=3,
    ) {
        if !have_uffd("remote_chains_restore_as_read_does") {
            return Ok(());
        }
        let root = TempDir::new("lazy-remote");
        let dirs = write_chain(root.path(), &levels);
        let top = dirs.last().unwrap();
        let img = Image::open(top).unwrap();
        let from = cut.0.min(cut.1);
        let to = cut.0.max(cut.1).max(from + 1);
        let vaddr = BASE + (from * ps()) as u64;
        let mut expect = vec![0u8; (to - from) * ps()];
        img.read(vaddr, &mut expect).unwrap();
        let s = server(top);
        let source = LazySource::page_server(client(&s), img.id(), runs_held(&img).unwrap());
        let (got, report) = lazy_read(source, vaddr, to - from, &opts, threads);
        prop_assert!(got == expect, "remote lazy restore differs from Image::read");
        check_report(&report, to - from);
        s.stop();
    }
}

/// CRIU's lazy migration: a local image whose lazy pages (no `PRESENT`) come from a page
/// server serving the full image, the rest from the local pages file or zeros.
#[test]
fn lazy_pages_of_a_local_image_come_from_the_server() {
    if !have_uffd("lazy_pages_of_a_local_image_come_from_the_server") {
        return;
    }
    let root = TempDir::new("lazy-criu");
    let pages = 300;
    // The dumping host's image: every page, content level 9.
    let full = root.path().join("full");
    let mut w = ImageWriter::create(&full, 7).unwrap().with_sync(false);
    let mut all = Vec::new();
    for p in 0..pages {
        all.extend(content(9, p));
    }
    w.push_bytes(
        PagemapEntry {
            vaddr: BASE,
            pages: pages as u64,
            flags: PageFlags::PRESENT,
        },
        &all,
    )
    .unwrap();
    w.finish().unwrap();
    // The restoring host's image: pages present here (level 1), lazy ones, and holes.
    let local = root.path().join("local");
    let mut w = ImageWriter::create(&local, 7).unwrap().with_sync(false);
    let mut expect = vec![0u8; pages * ps()];
    for p in 0..pages {
        let e = |flags| PagemapEntry {
            vaddr: BASE + (p * ps()) as u64,
            pages: 1,
            flags,
        };
        let at = p * ps()..(p + 1) * ps();
        match p % 5 {
            0 | 1 => {
                w.push_bytes(e(PageFlags::PRESENT), &content(1, p)).unwrap();
                expect[at].copy_from_slice(&content(1, p));
            }
            2 | 3 => {
                w.push(e(PageFlags::LAZY)).unwrap();
                expect[at].copy_from_slice(&content(9, p));
            }
            _ => {}
        }
    }
    w.finish().unwrap();
    let s = server(&full);
    for opts in [
        LazyOptions::default(),
        LazyOptions {
            prefetch: false,
            fault_pages: 3,
            ..LazyOptions::default()
        },
    ] {
        let source = LazySource::image(Image::open(&local).unwrap()).with_page_server(client(&s));
        let (got, report) = lazy_read(source, BASE, pages, &opts, 3);
        assert!(got == expect, "lazy pages not from the server ({opts:?})");
        check_report(&report, pages);
        assert_eq!(report.zero_pages, (pages / 5) as u64, "{report:?}");
    }
    s.stop();
}

/// Eight threads fault on the same pages and on pages next to each other at once, with
/// and without prefetch: every thread sees the image's bytes, and no page is filled
/// twice.
#[test]
fn several_threads_faulting_at_once() {
    if !have_uffd("several_threads_faulting_at_once") {
        return;
    }
    let root = TempDir::new("lazy-threads");
    let pages = 4096;
    let dir = root.path().join("1");
    let mut w = ImageWriter::create(&dir, 1).unwrap().with_sync(false);
    let mut all = Vec::with_capacity(pages * ps());
    for p in 0..pages {
        all.extend(content(2, p));
    }
    w.push_bytes(
        PagemapEntry {
            vaddr: BASE,
            pages: pages as u64,
            flags: PageFlags::PRESENT,
        },
        &all,
    )
    .unwrap();
    w.finish().unwrap();
    let img = Arc::new(Image::open(&dir).unwrap());
    for opts in [
        LazyOptions {
            prefetch: false,
            ..LazyOptions::default()
        },
        LazyOptions {
            prefetch_pages: 8,
            prefetch_threads: 2,
            ..LazyOptions::default()
        },
    ] {
        let mut mem = fresh(pages);
        let r = start(LazySource::image(Arc::clone(&img)), BASE, &mut mem, &opts).unwrap();
        let host = mem.as_ptr() as usize;
        // Each thread reads every page, in an order of its own: the same pages fault
        // from several threads at once.
        let (tx, rx) = mpsc::channel();
        for t in 0..8u64 {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let ps = ps();
                let mut x = 0x2545_f491_4f6c_dd1d ^ t;
                let mut bad = 0;
                for _ in 0..pages {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x % pages as u64) as usize;
                    // SAFETY: the page is in the test's mapping, kept mapped until every
                    // thread reported or the test failed.
                    let page =
                        unsafe { std::slice::from_raw_parts((host + p * ps) as *const u8, ps) };
                    if page != content(2, p) {
                        bad += 1;
                    }
                }
                let _ = tx.send(bad);
            });
        }
        drop(tx);
        for _ in 0..8 {
            let bad = rx
                .recv_timeout(HANG)
                .unwrap_or_else(|_| panic!("a faulting thread hung ({opts:?})"));
            assert_eq!(bad, 0, "pages differ ({opts:?})");
        }
        if !opts.prefetch {
            // Not every page was touched: end the restore by touching the rest.
            touch_all(host, mem.len(), 2, 5).expect("touching hung");
        }
        let report = finish(r).unwrap();
        check_report(&report, pages);
        assert!(report.faults > 0, "{report:?}");
        assert!(mem[..] == all[..]);
    }
}

/// An image of `pages` pages of content level 3, one entry.
fn full_image(dir: &Path, pages: usize) -> Vec<u8> {
    let mut w = ImageWriter::create(dir, 1).unwrap().with_sync(false);
    let mut all = Vec::with_capacity(pages * ps());
    for p in 0..pages {
        all.extend(content(3, p));
    }
    w.push_bytes(
        PagemapEntry {
            vaddr: BASE,
            pages: pages as u64,
            flags: PageFlags::PRESENT,
        },
        &all,
    )
    .unwrap();
    w.finish().unwrap();
    all
}

/// Checks memory after a failed restore: each page holds the image's bytes (it came in
/// before the failure) or zeros (it had not: a never-touched page), and pages from
/// `lost` on are zeros (their bytes were never readable).
fn image_or_zeros(mem: &[u8], all: &[u8], lost: usize) -> usize {
    let ps = ps();
    let mut zeros = 0;
    for (p, (got, want)) in mem.chunks(ps).zip(all.chunks(ps)).enumerate() {
        let zero = got.iter().all(|&b| b == 0);
        assert!(
            zero || got == want,
            "page {p} is neither the image's nor zeros"
        );
        assert!(zero || p < lost, "page {p} past the truncation holds data");
        zeros += usize::from(zero);
    }
    zeros
}

/// The pages file truncated half way, with and without prefetch: the restore fails with
/// `Read` naming the file (`ShortRead`), no faulting thread hangs, and the memory holds
/// the image's pages that came in and zeros elsewhere.
#[test]
fn pages_file_truncated_half_way() {
    if !have_uffd("pages_file_truncated_half_way") {
        return;
    }
    let root = TempDir::new("lazy-trunc");
    let pages = 2048;
    for prefetch in [false, true] {
        let dir = root.path().join(format!("{prefetch}"));
        let all = full_image(&dir, pages);
        let img = Image::open(&dir).unwrap();
        // Truncated after it was opened (and checked), as another process might.
        let half = pages / 2;
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("pages-1.img"))
            .unwrap()
            .set_len((half * ps()) as u64)
            .unwrap();
        let opts = LazyOptions {
            prefetch,
            ..LazyOptions::default()
        };
        let mut mem = fresh(pages);
        let r = start(LazySource::image(img), BASE, &mut mem, &opts).unwrap();
        let host = mem.as_ptr() as usize;
        // Threads touch every page, the lost half included: all of them return.
        let got = touch_all(host, mem.len(), 4, 11).expect("a faulting thread hung");
        let e = finish(r).unwrap_err();
        match &e {
            LazyError::Read {
                error: ImageError::ShortRead { path, offset },
                ..
            } => {
                assert!(path.ends_with("pages-1.img"), "{e}");
                assert!(*offset >= (half * ps()) as u64, "{e}");
            }
            _ => panic!("prefetch {prefetch}: {e:?}"),
        }
        let text = e.to_string();
        assert!(
            text.contains("unregistered") && text.contains("zeros"),
            "{text}"
        );
        let zeros = image_or_zeros(&got, &all, half);
        assert!(zeros >= pages - half, "{zeros} zero pages");
        assert!(mem[..] == got[..], "memory changed after the failure");
    }
}

/// Against our page server: a restore served until the server stops; the next faults
/// fail the restore with `Remote`, and no faulting thread hangs. With prefetch on, the
/// server stops at some point of the prefetch: the restore either finished first, or
/// failed the same way.
#[test]
fn page_server_dying_mid_restore() {
    if !have_uffd("page_server_dying_mid_restore") {
        return;
    }
    let root = TempDir::new("lazy-dying");
    let pages = 4096;
    let all = full_image(root.path(), pages);
    let img = Image::open(root.path()).unwrap();
    let held = runs_held(&img).unwrap();
    for prefetch in [false, true] {
        let s = server(root.path());
        let opts = LazyOptions {
            prefetch,
            prefetch_pages: 4,
            ..LazyOptions::default()
        };
        let source = LazySource::page_server(client(&s), 1, held.clone());
        let mut mem = fresh(pages);
        let r = start(source, BASE, &mut mem, &opts).unwrap();
        let host = mem.as_ptr() as usize;
        // Served while the server runs.
        let first = touch_all(host, 16 * ps(), 2, 3).expect("hung while the server ran");
        assert!(first[..] == all[..16 * ps()]);
        s.stop();
        let got = touch_all(host, mem.len(), 4, 13).expect("a faulting thread hung");
        match finish(r) {
            Err(LazyError::Remote { error, .. }) => {
                image_or_zeros(&got, &all, pages);
                assert!(got[16 * ps()..].contains(&0) || prefetch, "{error}");
            }
            Ok(report) if prefetch => {
                check_report(&report, pages);
                assert!(got[..] == all[..]);
            }
            other => panic!("prefetch {prefetch}: {other:?}"),
        }
    }
}

/// A page the plan says the server holds, which it does not: the server ends the
/// session (as CRIU's does) and the restore fails with `Remote`, the faulting thread
/// released.
#[test]
fn a_page_the_server_lacks_fails_the_restore() {
    if !have_uffd("a_page_the_server_lacks_fails_the_restore") {
        return;
    }
    let root = TempDir::new("lazy-lacks");
    let all = full_image(root.path(), 8);
    let s = server(root.path());
    // Says the server holds 16 pages; it holds 8.
    let opts = LazyOptions {
        prefetch: false,
        fault_pages: 1,
        ..LazyOptions::default()
    };
    let source = LazySource::page_server(client(&s), 1, [(BASE, 16)]);
    let mut mem = fresh(16);
    let r = start(source, BASE, &mut mem, &opts).unwrap();
    let host = mem.as_ptr() as usize;
    let held = touch_all(host, 8 * ps(), 2, 1).expect("hung");
    assert!(held == all, "the pages the server holds");
    let got = touch_all(host, mem.len(), 2, 1).expect("a faulting thread hung");
    let e = finish(r).unwrap_err();
    assert!(matches!(e, LazyError::Remote { .. }), "{e:?}");
    assert!(got[..8 * ps()] == all[..]);
    assert!(got[8 * ps()..].iter().all(|&b| b == 0));
    s.stop();
}

/// A page server that never answers: stopping (or dropping) the restore releases the
/// thread waiting for its page (it reads zeros) and returns at once; the report says
/// not all came in.
#[test]
fn stop_and_drop_release_waiting_threads() {
    if !have_uffd("stop_and_drop_release_waiting_threads") {
        return;
    }
    for by_drop in [false, true] {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let source =
            LazySource::page_server(PageServerClient::from_unix(ours).unwrap(), 1, [(BASE, 4)]);
        let opts = LazyOptions {
            prefetch: false,
            ..LazyOptions::default()
        };
        let mut mem = fresh(4);
        let r = start(source, BASE, &mut mem, &opts).unwrap();
        let host = mem.as_ptr() as usize;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: the test's mapping, kept mapped until this thread reported.
            let b = unsafe { std::ptr::read_volatile((host + ps()) as *const u8) };
            let _ = tx.send(b);
        });
        // The request reaches the silent server, and the thread waits.
        let mut head = [0u8; 32];
        let n = rustix::io::read(theirs.as_fd(), &mut head).unwrap();
        assert_eq!(n, 32, "a GET");
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(!r.is_finished() && !r.wait_timeout(Duration::from_millis(10)));
        let so_far = r.report();
        assert_eq!(
            (so_far.faults, so_far.pages_in, so_far.complete),
            (1, 0, false)
        );
        let report = if by_drop {
            drop(r);
            None
        } else {
            Some(r.stop().unwrap())
        };
        assert_eq!(rx.recv_timeout(HANG).expect("still waiting"), 0);
        if let Some(report) = report {
            assert!(!report.complete && report.pages_in == 0, "{report:?}");
        }
        drop(theirs);
    }
}

/// Refused before anything is registered: bad destinations, memory that is not private
/// anonymous, a strict restore of pages no source holds, a range registered elsewhere.
#[test]
fn refusals_leave_nothing_registered() {
    if !have_uffd("refusals_leave_nothing_registered") {
        return;
    }
    let root = TempDir::new("lazy-refuse");
    let dir = root.path().join("1");
    let mut w = ImageWriter::create(&dir, 1).unwrap().with_sync(false);
    w.push_bytes(
        PagemapEntry {
            vaddr: BASE,
            pages: 2,
            flags: PageFlags::PRESENT,
        },
        &[content(0, 0), content(0, 1)].concat(),
    )
    .unwrap();
    w.push(PagemapEntry {
        vaddr: BASE + 2 * ps() as u64,
        pages: 1,
        flags: PageFlags::LAZY,
    })
    .unwrap();
    w.finish().unwrap();
    let img = Arc::new(Image::open(&dir).unwrap());
    let src = || LazySource::image(Arc::clone(&img));
    let d = LazyOptions::default();
    let mut mem = fresh(4);
    let p = mem.as_mut_ptr();
    for (ptr, len) in [
        (p.wrapping_add(1), 4096),
        (p, 0),
        (p, ps() + 1),
        (std::ptr::null_mut(), ps()),
    ] {
        // SAFETY: refused before anything touches the memory (the test's mapping).
        let e = unsafe { LazyRestore::start(src(), BASE, ptr, len, &d) }.unwrap_err();
        assert!(matches!(e, LazyError::BadDestination { .. }), "{e:?}");
    }
    // Strict: page 2 is lazy (no server), page 3 in no entry.
    let strict = LazyOptions { strict: true, ..d };
    let e = start(src(), BASE, &mut mem, &strict).unwrap_err();
    assert!(
        matches!(
            e,
            LazyError::Plan(ImageError::NotInImage { lazy: true, .. })
        ),
        "{e:?}"
    );
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let source = LazySource::page_server(PageServerClient::from_unix(a).unwrap(), 1, [(BASE, 3)]);
    let e = start(source, BASE, &mut mem, &strict).unwrap_err();
    assert!(
        matches!(e, LazyError::NotHeld { vaddr } if vaddr == BASE + 3 * ps() as u64),
        "{e:?}"
    );
    // An unaligned image address: the plan refuses it.
    let e = start(src(), BASE + 1, &mut mem, &d).unwrap_err();
    assert!(
        matches!(e, LazyError::Plan(ImageError::BadRange { .. })),
        "{e:?}"
    );
    // A shared mapping is not private anonymous memory.
    let mut other = fresh(4);
    let file = tempfile_in(root.path());
    let mut mapped = unsafe_map(&file);
    let e = start(src(), BASE, &mut mapped, &d).unwrap_err();
    assert!(matches!(e, LazyError::NotAnonymous { .. }), "{e:?}");
    assert!(e.to_string().contains("private anonymous"), "{e}");
    // Registered by another restore: EBUSY, and the first goes on.
    let first = start(
        src(),
        BASE,
        &mut other,
        &LazyOptions {
            prefetch: false,
            ..d
        },
    )
    .unwrap();
    let e = start(src(), BASE, &mut other, &d).unwrap_err();
    assert!(
        matches!(
            e,
            LazyError::Register {
                errno: Errno::BUSY,
                ..
            }
        ),
        "{e:?}"
    );
    let report = first.stop().unwrap();
    assert!(!report.complete);
    // Unregistered by the stop: a new restore of the same memory runs to the end.
    let r = start(src(), BASE, &mut other, &d).unwrap();
    let report = finish(r).unwrap();
    check_report(&report, 4);
    assert_eq!(&other[..ps()], &content(0, 0)[..]);
    assert!(other[2 * ps()..].iter().all(|&b| b == 0));
}

/// A regular file of 4 pages, for a file mapping.
fn tempfile_in(dir: &Path) -> std::fs::File {
    let path = dir.join("mapped");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(4 * ps() as u64).unwrap();
    f
}

fn unsafe_map(f: &std::fs::File) -> MmapMut {
    // SAFETY: the file is the test's own, nobody else changes it while it is mapped.
    unsafe { memmap2::MmapOptions::new().map_mut(f) }.unwrap()
}

/// No thread or descriptor is left behind by a restore that completes, one stopped half
/// way, one whose source fails, one that is refused, and a remote one.
#[test]
fn no_threads_or_descriptors_left() {
    if !alone("no_threads_or_descriptors_left") {
        return;
    }
    if !have_uffd("no_threads_or_descriptors_left") {
        return;
    }
    let root = TempDir::new("lazy-alone");
    let pages = 1024;
    let all = full_image(root.path(), pages);
    let img = Arc::new(Image::open(root.path()).unwrap());
    let s = server(root.path());
    let (fds, threads) = (open_fds(), tasks());
    // Threads that end (a server's session) may take a moment to be gone.
    let check = |what: &str| {
        for _ in 0..100 {
            if (open_fds(), tasks()) == (fds, threads) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!((open_fds(), tasks()), (fds, threads), "after {what}");
    };
    let d = LazyOptions::default();
    let off = LazyOptions {
        prefetch: false,
        ..d
    };
    for opts in [d, off] {
        let mut mem = fresh(pages);
        let r = start(LazySource::image(Arc::clone(&img)), BASE, &mut mem, &opts).unwrap();
        assert!(tasks() > threads, "the restore's threads run");
        touch_all(mem.as_ptr() as usize, mem.len(), 2, 2).unwrap();
        finish(r).unwrap();
        assert!(mem[..] == all[..]);
        check("a complete restore");
    }
    let mut mem = fresh(pages);
    let r = start(LazySource::image(Arc::clone(&img)), BASE, &mut mem, &off).unwrap();
    touch_all(mem.as_ptr() as usize, 8 * ps(), 1, 1).unwrap();
    drop(r);
    check("a restore dropped half way");
    let e = start(
        LazySource::image(Arc::clone(&img)),
        BASE,
        &mut mem,
        &LazyOptions {
            fault_cpu: Some(100_000),
            ..d
        },
    )
    .unwrap_err();
    assert!(matches!(e, LazyError::Pin { .. }), "{e:?}");
    check("a refused restore");
    {
        let source = LazySource::page_server(client(&s), 1, runs_held(&img).unwrap());
        let mut mem = fresh(pages);
        let r = start(source, BASE, &mut mem, &d).unwrap();
        finish(r).unwrap();
        assert!(mem[..] == all[..]);
    }
    // The server's session ends when the client's connection closes.
    check("a remote restore");
    // A failing source.
    let dir = root.path().join("trunc");
    full_image(&dir, pages);
    let trunc = Image::open(&dir).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("pages-1.img"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let mut mem = fresh(pages);
    let r = start(LazySource::image(trunc), BASE, &mut mem, &d).unwrap();
    finish(r).unwrap_err();
    check("a failed restore");
    s.stop();
}

/// As user nobody (whose userfaultfd is user-mode-only here): a lazy restore works for
/// what user code touches; the kernel's own access to a page not yet in fails with
/// `EFAULT` instead of waiting, as the module docs say; `Privilege::Full` is refused.
#[test]
fn unprivileged_restore_is_user_mode_only() {
    match unprivileged("unprivileged_restore_is_user_mode_only") {
        Unprivileged::RunBody => {}
        Unprivileged::Passed | Unprivileged::Skipped => return,
    }
    let test = "unprivileged_restore_is_user_mode_only";
    if !have_uffd(test) {
        return;
    }
    let probe = probe_userfaultfd();
    let root = TempDir::new("lazy-nobody");
    let pages = 64;
    let all = full_image(root.path(), pages);
    let img = Arc::new(Image::open(root.path()).unwrap());
    let off = LazyOptions {
        prefetch: false,
        ..LazyOptions::default()
    };
    let mut mem = fresh(pages);
    let r = start(LazySource::image(Arc::clone(&img)), BASE, &mut mem, &off).unwrap();
    assert_eq!(r.info().user_mode_only, !probe.kernel_faults());
    if r.info().user_mode_only {
        // The kernel reads page 40 for write(2): not handled, EFAULT.
        let (rd, wr) = rustix::pipe::pipe().unwrap();
        // SAFETY: the test's mapping; the kernel reads it (or fails).
        let page = unsafe { std::slice::from_raw_parts(mem.as_ptr().add(40 * ps()), ps()) };
        assert_eq!(rustix::io::write(&wr, page), Err(Errno::FAULT));
        drop((rd, wr));
    } else {
        eprintln!("{test}: user nobody has kernel-mode userfaultfds here; EFAULT not checked");
    }
    let got = touch_all(mem.as_ptr() as usize, mem.len(), 2, 9).expect("hung");
    assert!(got == all);
    check_report(&finish(r).unwrap(), pages);
    if !probe.kernel_faults() {
        let e = start(
            LazySource::image(img),
            BASE,
            &mut fresh(pages),
            &LazyOptions {
                privilege: Privilege::Full,
                ..LazyOptions::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, LazyError::Privilege { .. }), "{e:?}");
        assert!(e.to_string().contains("EFAULT"), "{e}");
    }
}
