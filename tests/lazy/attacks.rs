//! Attacks on the lazy restore's promises, each test named for the promise it checks;
//! each failed before the fix committed with it, but for the ones that say they held.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use page_pipe::page_server::wire::{Limits, Message, get_reply};

use super::*;

/// How a [`fake_server`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Every `GET` as asked (page `q` from `BASE` holds `content(3, q)`); `CLOSE` with 0.
    Honest,
    /// One page for every `GET`, whatever was asked (allowed: its run may end there).
    OnePage,
    /// Answers for the next page's address.
    OtherAddress,
    /// One page more than asked.
    MorePages,
    /// The header for what was asked, half a page, then the end of the connection.
    CutShort,
    /// Answers `GET`s, never `CLOSE` (but reads on until the connection ends).
    SilentClose,
}

/// Plays a page server on `s`, answering as `how` says, until the connection ends;
/// returns the messages it read.
fn fake_server(mut s: UnixStream, how: Peer) -> std::thread::JoinHandle<Vec<Message>> {
    std::thread::spawn(move || {
        let ps = ps();
        let limits = Limits::default();
        let mut seen = Vec::new();
        loop {
            let mut h = [0u8; 32];
            if s.read_exact(&mut h).is_err() {
                return seen;
            }
            let Ok(m) = Message::decode(&h, &limits) else {
                return seen;
            };
            seen.push(m);
            match m {
                Message::Get { id, vaddr, pages } => {
                    let at = ((vaddr - BASE) / ps as u64) as usize;
                    let n = match how {
                        Peer::OnePage => 1,
                        Peer::MorePages => pages + 1,
                        _ => pages,
                    };
                    let reply_at = if how == Peer::OtherAddress {
                        vaddr + ps as u64
                    } else {
                        vaddr
                    };
                    let mut out = get_reply(id, reply_at, n).to_vec();
                    for q in at..at + n as usize {
                        out.extend(content(3, q));
                    }
                    if how == Peer::CutShort {
                        out.truncate(32 + ps / 2);
                        let _ = s.write_all(&out);
                        return seen;
                    }
                    if s.write_all(&out).is_err() {
                        return seen;
                    }
                }
                Message::Close | Message::ForceClose => {
                    if how != Peer::SilentClose {
                        let _ = s.write_all(&0i32.to_ne_bytes());
                    }
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                    return seen;
                }
                _ => return seen,
            }
        }
    })
}

/// A page server source over a socket pair whose other end `how` plays; `held` as for
/// [`LazySource::page_server`], image id 1.
fn fake_source(
    how: Peer,
    held: impl IntoIterator<Item = (u64, u64)>,
) -> (LazySource, std::thread::JoinHandle<Vec<Message>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let peer = fake_server(theirs, how);
    let client = PageServerClient::from_unix(ours).unwrap();
    (LazySource::page_server(client, 1, held), peer)
}

/// The pages `from..to` as the fake server and `full_image` hold them.
fn expected(from: usize, to: usize) -> Vec<u8> {
    (from..to).flat_map(|p| content(3, p)).collect()
}

/// `wait_timeout` with a timeout no `Instant` can hold waits as long as it takes (it
/// panicked adding the timeout to now).
#[test]
fn wait_timeout_for_ever_does_not_panic() {
    if !have_uffd("wait_timeout_for_ever_does_not_panic") {
        return;
    }
    let root = TempDir::new("lazy-wait-max");
    let all = full_image(root.path(), 16);
    let mut mem = fresh(16);
    let source = LazySource::image(Image::open(root.path()).unwrap());
    let r = start(source, BASE, &mut mem, &LazyOptions::default()).unwrap();
    assert!(
        r.wait_timeout(Duration::MAX),
        "the prefetch ends the restore"
    );
    assert!(r.wait_timeout(Duration::ZERO), "ended, so no wait at all");
    check_report(&r.wait().unwrap(), 16);
    assert!(mem[..] == all[..]);
}

/// A destination made of several mappings (here split by `mprotect`): the kernel
/// fills within one mapping a call, and a fill that crossed into the next got `ENOENT`,
/// which failed the restore as if the memory had been unmapped. Pages 20..40 are
/// read-only, the image holds pages 0..30 and 45..64: a run of file pages crosses page
/// 20, a run of zero pages crosses page 40.
#[test]
fn a_destination_of_several_mappings_restores() {
    if !have_uffd("a_destination_of_several_mappings_restores") {
        return;
    }
    let ps = ps();
    let root = TempDir::new("lazy-vmas");
    let dir = root.path().join("1");
    let mut w = ImageWriter::create(&dir, 1).unwrap().with_sync(false);
    for (from, to) in [(0usize, 30usize), (45, 64)] {
        let e = PagemapEntry {
            vaddr: BASE + (from * ps) as u64,
            pages: (to - from) as u64,
            flags: PageFlags::PRESENT,
        };
        w.push_bytes(e, &expected(from, to)).unwrap();
    }
    w.finish().unwrap();
    let img = Arc::new(Image::open(&dir).unwrap());
    let mut want = vec![0u8; 64 * ps];
    img.read(BASE, &mut want).unwrap();
    let split = |mem: &mut MmapMut| {
        // SAFETY: pages 20..40 of the test's own mapping, which only reads them from now
        // on (through `mem` and `touch_all`).
        unsafe {
            rustix::mm::mprotect(
                mem.as_mut_ptr().add(20 * ps).cast(),
                20 * ps,
                rustix::mm::MprotectFlags::READ,
            )
        }
        .unwrap();
    };
    // Faults alone, in a set order: page 16 (its run, 17..30, crosses page 20), then
    // page 33 (zeros to 45, across page 40).
    let faults = LazyOptions {
        prefetch: false,
        fault_pages: 16,
        ..LazyOptions::default()
    };
    for opts in [faults, LazyOptions::default()] {
        let mut mem = fresh(64);
        split(&mut mem);
        let r = start(LazySource::image(Arc::clone(&img)), BASE, &mut mem, &opts).unwrap();
        let host = mem.as_ptr() as usize;
        for p in [16, 33] {
            let got = touch_all(host + p * ps, ps, 1, 1).expect("a faulting thread hung");
            assert!(got[..] == want[p * ps..(p + 1) * ps], "page {p} ({opts:?})");
        }
        let got = touch_all(host, 64 * ps, 2, 7).expect("a faulting thread hung");
        let report = finish(r).unwrap_or_else(|e| panic!("{opts:?}: {e}"));
        check_report(&report, 64);
        assert!(got == want, "{opts:?}");
        assert!(mem[..] == want[..], "{opts:?}");
    }
}

/// A page server's snapshot range that passes the end of the address space, or does
/// not start on a page, is refused as a bad range before anything is registered (the
/// plan overflowed, or subtracted past zero, and panicked); a run claiming more pages
/// than the address space holds means every page from its start (it overflowed too).
#[test]
fn page_server_ranges_are_checked_not_overflowed() {
    if !have_uffd("page_server_ranges_are_checked_not_overflowed") {
        return;
    }
    let ps = ps() as u64;
    let d = LazyOptions::default();
    for (vaddr, what) in [
        (
            0u64.wrapping_sub(2 * ps),
            "past the end of the address space",
        ),
        (BASE + 1, "not page-aligned"),
        (u64::MAX, "both"),
    ] {
        let (source, peer) = fake_source(Peer::Honest, [(BASE, 8)]);
        let mut mem = fresh(4);
        let e = start(source, vaddr, &mut mem, &d).unwrap_err();
        assert!(
            matches!(
                e,
                LazyError::Plan(ImageError::BadRange { vaddr: v, len })
                    if v == vaddr && len == 4 * ps
            ),
            "{what}: {e:?}"
        );
        assert!(peer.join().unwrap().is_empty(), "{what}: nothing asked");
        assert!(mem.iter().all(|&b| b == 0), "{what}: memory left alone");
    }
    // A run of u64::MAX pages: everything from BASE on.
    let (source, peer) = fake_source(Peer::Honest, [(BASE, u64::MAX)]);
    let mut mem = fresh(8);
    let r = start(source, BASE, &mut mem, &d).unwrap();
    let report = finish(r).unwrap();
    check_report(&report, 8);
    assert_eq!(report.zero_pages, 0, "{report:?}");
    assert!(mem[..] == expected(0, 8)[..]);
    peer.join().unwrap();
}

/// A page server that never answers `CLOSE`: the restore is complete (every page in),
/// and `stop` or a drop returns at once (they waited for the client's timeout, 60 s,
/// while the thread that put the last page in waited for the answer).
#[test]
fn stop_does_not_wait_for_the_servers_answer_to_close() {
    if !have_uffd("stop_does_not_wait_for_the_servers_answer_to_close") {
        return;
    }
    for by_drop in [false, true] {
        let (source, peer) = fake_source(Peer::SilentClose, [(BASE, 8)]);
        let mut mem = fresh(8);
        let r = start(source, BASE, &mut mem, &LazyOptions::default()).unwrap();
        assert!(
            r.wait_timeout(HANG),
            "the prefetch did not bring every page in"
        );
        let t = Instant::now();
        let report = if by_drop {
            drop(r);
            None
        } else {
            Some(r.stop().unwrap())
        };
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "by_drop {by_drop}: took {took:?}"
        );
        if let Some(report) = report {
            check_report(&report, 8);
        }
        assert!(mem[..] == expected(0, 8)[..]);
        peer.join().unwrap();
    }
}

/// `with_page_server` on a source made by `page_server` keeps the image id and the
/// runs (it dropped the runs, and every page came out zeros).
#[test]
fn a_page_server_replacing_another_keeps_its_runs() {
    if !have_uffd("a_page_server_replacing_another_keeps_its_runs") {
        return;
    }
    let (unused, _theirs) = UnixStream::pair().unwrap();
    let first = PageServerClient::from_unix(unused).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let peer = fake_server(theirs, Peer::Honest);
    let source = LazySource::page_server(first, 1, [(BASE, 8)])
        .with_page_server(PageServerClient::from_unix(ours).unwrap());
    let mut mem = fresh(8);
    let r = start(source, BASE, &mut mem, &LazyOptions::default()).unwrap();
    let report = finish(r).unwrap();
    check_report(&report, 8);
    assert_eq!(report.zero_pages, 0, "{report:?}");
    assert!(
        mem[..] == expected(0, 8)[..],
        "pages from the second server"
    );
    let gets = peer.join().unwrap();
    assert!(
        gets.iter()
            .any(|m| matches!(m, Message::Get { id: 1, vaddr, .. } if *vaddr == BASE)),
        "{gets:?}"
    );
}

/// A page server that lies in its `GET` replies (pages for another address, more than
/// asked, a reply cut short): the restore fails with `Remote` naming the peer, every
/// faulting thread returns, and the memory holds the server's pages or zeros. One that
/// sends a page at a time (less than asked, which is allowed) restores every page.
/// (This held.)
#[test]
fn lying_page_servers_fail_the_restore_and_release_every_thread() {
    if !have_uffd("lying_page_servers_fail_the_restore_and_release_every_thread") {
        return;
    }
    let ps = ps();
    let faults = LazyOptions {
        prefetch: false,
        fault_pages: 4,
        ..LazyOptions::default()
    };
    for how in [Peer::OtherAddress, Peer::MorePages, Peer::CutShort] {
        for opts in [faults, LazyOptions::default()] {
            let (source, peer) = fake_source(how, [(BASE, 16)]);
            let mut mem = fresh(16);
            let r = start(source, BASE, &mut mem, &opts).unwrap();
            let got = touch_all(mem.as_ptr() as usize, mem.len(), 3, 5)
                .unwrap_or_else(|| panic!("{how:?}: a faulting thread hung"));
            let e = finish(r).unwrap_err();
            let LazyError::Remote { error, .. } = &e else {
                panic!("{how:?}: {e:?}");
            };
            assert!(
                error.to_string().contains("a Unix socket peer"),
                "{how:?}: {error}"
            );
            for (p, page) in got.chunks(ps).enumerate() {
                assert!(
                    page == &content(3, p)[..] || page.iter().all(|&b| b == 0),
                    "{how:?}: page {p} neither the server's nor zeros"
                );
            }
            assert!(
                mem[..] == got[..],
                "{how:?}: memory changed after the failure"
            );
            drop(mem);
            peer.join().unwrap();
        }
    }
    for opts in [faults, LazyOptions::default()] {
        let (source, peer) = fake_source(Peer::OnePage, [(BASE, 16)]);
        let mut mem = fresh(16);
        let r = start(source, BASE, &mut mem, &opts).unwrap();
        let got = touch_all(mem.as_ptr() as usize, mem.len(), 3, 5).expect("hung");
        let report = finish(r).unwrap();
        check_report(&report, 16);
        assert!(got == expected(0, 16), "{opts:?}");
        peer.join().unwrap();
    }
}

/// A destination partly unmapped, shared anonymous memory, or a private file mapping is
/// refused before anything is registered, naming what is there. Alone: the test unmaps
/// a page in the middle of its mapping, which nothing else in the process may take
/// meanwhile. (This held.)
#[test]
fn destinations_partly_unmapped_or_file_backed_are_refused() {
    if !alone("attacks::destinations_partly_unmapped_or_file_backed_are_refused") {
        return;
    }
    if !have_uffd("destinations_partly_unmapped_or_file_backed_are_refused") {
        return;
    }
    let ps = ps();
    let root = TempDir::new("lazy-holes");
    let dir = root.path().join("1");
    full_image(&dir, 8);
    let img = Arc::new(Image::open(&dir).unwrap());
    let d = LazyOptions::default();
    // SAFETY: a new mapping of 8 pages, this test's own.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            8 * ps,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap()
    .cast::<u8>();
    // SAFETY: page 3 of that mapping; nothing refers to it.
    unsafe { rustix::mm::munmap(base.add(3 * ps).cast(), ps) }.unwrap();
    // SAFETY: refused before anything touches the memory (the test's own mapping).
    let e =
        unsafe { LazyRestore::start(LazySource::image(Arc::clone(&img)), BASE, base, 8 * ps, &d) }
            .unwrap_err();
    assert!(
        matches!(e, LazyError::NotAnonymous { host, len, ref mapping }
            if host == base as usize && len == 8 * ps && mapping.contains("partly not mapped")),
        "{e:?}"
    );
    // SAFETY: the two parts of the test's mapping left; the hole is not touched.
    unsafe {
        rustix::mm::munmap(base.cast(), 3 * ps).unwrap();
        rustix::mm::munmap(base.add(4 * ps).cast(), 4 * ps).unwrap();
    }
    // Shared anonymous memory (shmem): a discard would not drop its pages.
    // SAFETY: a new mapping of 8 pages, this test's own.
    let shared = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            8 * ps,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
        )
    }
    .unwrap()
    .cast::<u8>();
    // SAFETY: refused before anything touches the memory (the test's own mapping).
    let e = unsafe {
        LazyRestore::start(
            LazySource::image(Arc::clone(&img)),
            BASE,
            shared,
            8 * ps,
            &d,
        )
    }
    .unwrap_err();
    assert!(
        matches!(&e, LazyError::NotAnonymous { mapping, .. } if mapping.contains("shared")),
        "{e:?}"
    );
    // SAFETY: the test's own mapping, unused from here on.
    unsafe { rustix::mm::munmap(shared.cast(), 8 * ps) }.unwrap();
    // A private mapping of a file: copy-on-write, but its pages come from the file.
    let path = root.path().join("file");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(8 * ps as u64).unwrap();
    // SAFETY: the test's own file, changed by nobody while mapped.
    let mut mapped = unsafe { memmap2::MmapOptions::new().map_copy(&f) }.unwrap();
    let e = start(LazySource::image(img), BASE, &mut mapped, &d).unwrap_err();
    assert!(
        matches!(&e, LazyError::NotAnonymous { mapping, .. } if mapping.contains("file")),
        "{e:?}"
    );
}

/// No thread or descriptor left after a restore failed by a lying server, and after a
/// stop while the session closes. (This held, but the stop took the client's timeout,
/// 60 s, before its fix.)
#[test]
fn lies_and_stops_leave_no_threads_or_descriptors() {
    if !alone("attacks::lies_and_stops_leave_no_threads_or_descriptors") {
        return;
    }
    if !have_uffd("lies_and_stops_leave_no_threads_or_descriptors") {
        return;
    }
    let (fds, threads) = (open_fds(), tasks());
    let check = |what: &str| {
        for _ in 0..100 {
            if (open_fds(), tasks()) == (fds, threads) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!((open_fds(), tasks()), (fds, threads), "after {what}");
    };
    for how in [Peer::CutShort, Peer::MorePages] {
        let (source, peer) = fake_source(how, [(BASE, 64)]);
        let mut mem = fresh(64);
        let r = start(source, BASE, &mut mem, &LazyOptions::default()).unwrap();
        touch_all(mem.as_ptr() as usize, mem.len(), 2, 3).expect("hung");
        finish(r).unwrap_err();
        peer.join().unwrap();
        check("a lying server");
    }
    let (source, peer) = fake_source(Peer::SilentClose, [(BASE, 64)]);
    let mut mem = fresh(64);
    let r = start(source, BASE, &mut mem, &LazyOptions::default()).unwrap();
    assert!(r.wait_timeout(HANG));
    r.stop().unwrap();
    peer.join().unwrap();
    check("a stop while the session closes");
}

/// A locked destination (`mlock`): `MADV_DONTNEED` refuses it, and `start` fails with
/// `Discard`, naming the destination and the errno (it was `System` with a sentence
/// and no address); nothing stays registered (a second start after `munlock` runs to
/// the end), and until then the memory holds what it held.
#[test]
fn a_locked_destination_is_refused_naming_it() {
    if !have_uffd("a_locked_destination_is_refused_naming_it") {
        return;
    }
    let ps = ps();
    let root = TempDir::new("lazy-locked");
    let all = full_image(root.path(), 8);
    let img = Arc::new(Image::open(root.path()).unwrap());
    let mut mem = fresh(8);
    mem.fill(0x5a);
    // SAFETY: the test's own mapping.
    if let Err(e) = unsafe { rustix::mm::mlock(mem.as_mut_ptr().cast(), mem.len()) } {
        eprintln!("SKIPPED a_locked_destination_is_refused_naming_it: mlock: {e}");
        return;
    }
    let host = mem.as_ptr() as usize;
    let d = LazyOptions::default();
    let e = start(LazySource::image(Arc::clone(&img)), BASE, &mut mem, &d).unwrap_err();
    assert!(
        matches!(e, LazyError::Discard { host: h, len, errno: Errno::INVAL }
            if h == host && len == 8 * ps),
        "{e:?}"
    );
    assert!(e.to_string().contains(&format!("{host:#x}")), "{e}");
    assert!(mem.iter().all(|&b| b == 0x5a), "the memory as it was");
    // SAFETY: the test's own mapping.
    unsafe { rustix::mm::munlock(mem.as_mut_ptr().cast(), mem.len()) }.unwrap();
    let r = start(LazySource::image(img), BASE, &mut mem, &d).unwrap();
    check_report(&finish(r).unwrap(), 8);
    assert!(mem[..] == all[..]);
}

/// The handle and the source may move to and be shared with other threads (a VMM
/// starts the restore on one thread and waits on another). (This held.)
#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<LazyRestore>();
    send_sync::<LazySource>();
    send_sync::<LazyError>();
}

/// Prefetch off, from a page server that ends idle sessions: a program that touches no
/// new page for that long finds the session gone at its next fault, which returns (the
/// page reads as zeros) and fails the restore with `Remote`, as the docs of
/// `LazyOptions::prefetch` now warn. (This held; the docs did not say it.)
#[test]
fn an_idle_session_ended_by_the_server_fails_the_restore() {
    if !have_uffd("an_idle_session_ended_by_the_server_fails_the_restore") {
        return;
    }
    let root = TempDir::new("lazy-idle");
    let all = full_image(root.path(), 8);
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_millis(500)),
        ..ServerConfig::new(root.path())
    };
    let s = PageServer::bind("127.0.0.1:0", config)
        .unwrap()
        .spawn()
        .unwrap();
    let opts = LazyOptions {
        prefetch: false,
        fault_pages: 1,
        ..LazyOptions::default()
    };
    let source = LazySource::page_server(client(&s), 1, [(BASE, 8)]);
    let mut mem = fresh(8);
    let r = start(source, BASE, &mut mem, &opts).unwrap();
    let host = mem.as_ptr() as usize;
    let first = touch_all(host, ps(), 1, 1).expect("hung");
    assert!(first[..] == all[..ps()]);
    std::thread::sleep(Duration::from_millis(2000));
    let second = touch_all(host + ps(), ps(), 1, 1).expect("a faulting thread hung");
    assert!(second.iter().all(|&b| b == 0), "the session was gone");
    let e = finish(r).unwrap_err();
    assert!(matches!(e, LazyError::Remote { .. }), "{e:?}");
    s.stop();
}

/// A chain whose parent changes after it was opened: replaced (a new image written over
/// its directory), the restore still reads the parent it opened, byte for byte as
/// `Image::read` read it then; truncated, the restore fails with `Read` naming the
/// parent's pages file. (This held.)
#[test]
fn a_parent_changed_after_open() {
    if !have_uffd("a_parent_changed_after_open") {
        return;
    }
    let root = TempDir::new("lazy-parent");
    let pages = 8;
    let levels = vec![vec![Held::Present; pages], vec![Held::Parent; pages]];
    for truncate in [false, true] {
        let dir = root.path().join(truncate.to_string());
        let dirs = write_chain(&dir, &levels);
        let img = Image::open(&dirs[1]).unwrap();
        let mut want = vec![0u8; pages * ps()];
        img.read(BASE, &mut want).unwrap();
        let parent_pages = dirs[0].join("pages-1.img");
        if truncate {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&parent_pages)
                .unwrap()
                .set_len(0)
                .unwrap();
        } else {
            // Another image committed where the parent was: other bytes, same names.
            std::fs::remove_dir_all(&dirs[0]).unwrap();
            let mut w = ImageWriter::create(&dirs[0], 1).unwrap().with_sync(false);
            let e = PagemapEntry {
                vaddr: BASE,
                pages: pages as u64,
                flags: PageFlags::PRESENT,
            };
            let bytes: Vec<u8> = (0..pages).flat_map(|p| content(7, p)).collect();
            w.push_bytes(e, &bytes).unwrap();
            w.finish().unwrap();
            let mut now = vec![0u8; pages * ps()];
            Image::open(&dirs[0]).unwrap().read(BASE, &mut now).unwrap();
            assert!(now != want, "the new parent holds other bytes");
        }
        let mut mem = fresh(pages);
        let r = start(
            LazySource::image(img),
            BASE,
            &mut mem,
            &LazyOptions::default(),
        )
        .unwrap();
        let got = touch_all(mem.as_ptr() as usize, mem.len(), 2, 1).expect("hung");
        match finish(r) {
            Ok(report) if !truncate => {
                check_report(&report, pages);
                assert!(got == want, "the parent as opened");
            }
            Err(LazyError::Read {
                error: ImageError::ShortRead { path, .. },
                ..
            }) if truncate => {
                // Named through the child's `parent` link.
                let real = std::fs::canonicalize(&path).unwrap();
                assert_eq!(real, std::fs::canonicalize(&parent_pages).unwrap());
                assert!(path.ends_with("parent/pages-1.img"), "{path:?}");
            }
            other => panic!("truncate {truncate}: {other:?}"),
        }
    }
}

/// `prefetch_threads` past what the range can share out (here `usize::MAX` for 16 pages)
/// runs one thread per claim instead of spawning until the system refuses.
#[test]
fn more_prefetch_threads_than_claims_are_not_spawned() {
    if !have_uffd("more_prefetch_threads_than_claims_are_not_spawned") {
        return;
    }
    let root = TempDir::new("lazy-many-threads");
    let all = full_image(root.path(), 16);
    let mut mem = fresh(16);
    let source = LazySource::image(Image::open(root.path()).unwrap());
    let opts = LazyOptions {
        prefetch_threads: usize::MAX,
        ..LazyOptions::default()
    };
    let r = start(source, BASE, &mut mem, &opts).unwrap();
    check_report(&r.wait().unwrap(), 16);
    assert!(mem[..] == all[..]);
}
