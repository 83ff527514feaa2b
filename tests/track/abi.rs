//! The userfaultfd and `PAGEMAP_SCAN` ABI declared by hand in `page-pipe-sys`, against
//! the bindgen output of `linux-raw-sys` (generated from the kernel's uapi headers) and
//! against the kernel: missing-mode faults served with `UFFDIO_COPY` and
//! `UFFDIO_ZEROPAGE`, `EEXIST`, events, and what `PAGEMAP_SCAN` reports.

use std::mem::{offset_of, size_of};

use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as io;
use page_pipe_sys::{
    CopyMode, Errno, PageCategories, PageRegion, PagefaultFlags, Pagemap, PmScanArg, RegisterMode,
    ScanFlags, Uffd, UffdEvent, UffdFeatures, UffdFlags, UffdIoctls, UffdMsg, UffdioApi,
    UffdioCopy, UffdioRange, UffdioRegister, UffdioWriteprotect, UffdioZeropage, WriteProtectMode,
    ZeropageMode,
};

use super::{anon, ps};

macro_rules! same_layout {
    ($ours:ty, $theirs:ty, $($f:ident),*) => {
        assert_eq!(size_of::<$ours>(), size_of::<$theirs>(), stringify!($ours));
        $(assert_eq!(offset_of!($ours, $f), offset_of!($theirs, $f), "{}.{}", stringify!($ours), stringify!($f));)*
    };
}

#[test]
fn structs_match_the_uapi_headers() {
    same_layout!(UffdioApi, g::uffdio_api, api, features, ioctls);
    same_layout!(UffdioRange, g::uffdio_range, start, len);
    same_layout!(UffdioRegister, g::uffdio_register, range, mode, ioctls);
    same_layout!(UffdioCopy, g::uffdio_copy, dst, src, len, mode, copy);
    same_layout!(UffdioZeropage, g::uffdio_zeropage, range, mode, zeropage);
    same_layout!(UffdioWriteprotect, g::uffdio_writeprotect, range, mode);
    same_layout!(
        UffdMsg,
        g::uffd_msg,
        event,
        reserved1,
        reserved2,
        reserved3,
        arg
    );
    same_layout!(PageRegion, g::page_region, start, end, categories);
    same_layout!(
        PmScanArg,
        g::pm_scan_arg,
        size,
        flags,
        start,
        end,
        walk_end,
        vec,
        vec_len,
        max_pages,
        category_inverted,
        category_mask,
        category_anyof_mask,
        return_mask
    );
}

#[test]
fn numbers_match_the_uapi_headers() {
    let op = |o: rustix::ioctl::Opcode| o as u64;
    assert_eq!(op(page_pipe_sys::UFFDIO_API), io::UFFDIO_API as u64);
    assert_eq!(
        op(page_pipe_sys::UFFDIO_REGISTER),
        io::UFFDIO_REGISTER as u64
    );
    assert_eq!(
        op(page_pipe_sys::UFFDIO_UNREGISTER),
        io::UFFDIO_UNREGISTER as u64
    );
    assert_eq!(op(page_pipe_sys::UFFDIO_WAKE), io::UFFDIO_WAKE as u64);
    assert_eq!(op(page_pipe_sys::UFFDIO_COPY), io::UFFDIO_COPY as u64);
    assert_eq!(
        op(page_pipe_sys::UFFDIO_ZEROPAGE),
        io::UFFDIO_ZEROPAGE as u64
    );
    assert_eq!(
        op(page_pipe_sys::UFFDIO_WRITEPROTECT),
        io::UFFDIO_WRITEPROTECT as u64
    );
    assert_eq!(page_pipe_sys::UFFD_API, g::UFFD_API as u64);

    let features = [
        (
            UffdFeatures::PAGEFAULT_FLAG_WP,
            g::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        ),
        (UffdFeatures::EVENT_FORK, g::UFFD_FEATURE_EVENT_FORK),
        (UffdFeatures::EVENT_REMAP, g::UFFD_FEATURE_EVENT_REMAP),
        (UffdFeatures::EVENT_REMOVE, g::UFFD_FEATURE_EVENT_REMOVE),
        (
            UffdFeatures::MISSING_HUGETLBFS,
            g::UFFD_FEATURE_MISSING_HUGETLBFS,
        ),
        (UffdFeatures::MISSING_SHMEM, g::UFFD_FEATURE_MISSING_SHMEM),
        (UffdFeatures::EVENT_UNMAP, g::UFFD_FEATURE_EVENT_UNMAP),
        (UffdFeatures::SIGBUS, g::UFFD_FEATURE_SIGBUS),
        (UffdFeatures::THREAD_ID, g::UFFD_FEATURE_THREAD_ID),
        (
            UffdFeatures::MINOR_HUGETLBFS,
            g::UFFD_FEATURE_MINOR_HUGETLBFS,
        ),
        (UffdFeatures::MINOR_SHMEM, g::UFFD_FEATURE_MINOR_SHMEM),
        (UffdFeatures::EXACT_ADDRESS, g::UFFD_FEATURE_EXACT_ADDRESS),
        (
            UffdFeatures::WP_HUGETLBFS_SHMEM,
            g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ),
        (UffdFeatures::WP_UNPOPULATED, g::UFFD_FEATURE_WP_UNPOPULATED),
        (UffdFeatures::POISON, g::UFFD_FEATURE_POISON),
        (UffdFeatures::WP_ASYNC, g::UFFD_FEATURE_WP_ASYNC),
        (UffdFeatures::MOVE, g::UFFD_FEATURE_MOVE),
    ];
    for (ours, theirs) in features {
        assert_eq!(ours.bits(), theirs as u64, "{ours:?}");
    }
    assert_eq!(UffdFlags::USER_MODE_ONLY.bits(), g::UFFD_USER_MODE_ONLY);
    assert_eq!(UffdFlags::NONBLOCK.bits(), g::O_NONBLOCK);
    assert_eq!(
        RegisterMode::MISSING.bits(),
        g::UFFDIO_REGISTER_MODE_MISSING as u64
    );
    assert_eq!(RegisterMode::WP.bits(), g::UFFDIO_REGISTER_MODE_WP as u64);
    assert_eq!(
        RegisterMode::MINOR.bits(),
        g::UFFDIO_REGISTER_MODE_MINOR as u64
    );
    assert_eq!(
        CopyMode::DONTWAKE.bits(),
        g::UFFDIO_COPY_MODE_DONTWAKE as u64
    );
    assert_eq!(CopyMode::WP.bits(), g::UFFDIO_COPY_MODE_WP as u64);
    assert_eq!(
        ZeropageMode::DONTWAKE.bits(),
        g::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64
    );
    // linux-raw-sys leaves these two out; userfaultfd.h: `((__u64)1<<0)`, `((__u64)1<<1)`.
    assert_eq!(WriteProtectMode::WP.bits(), 1 << 0);
    assert_eq!(WriteProtectMode::DONTWAKE.bits(), 1 << 1);
    assert_eq!(
        PagefaultFlags::WRITE.bits(),
        g::UFFD_PAGEFAULT_FLAG_WRITE as u64
    );
    assert_eq!(PagefaultFlags::WP.bits(), g::UFFD_PAGEFAULT_FLAG_WP as u64);
    assert_eq!(
        PagefaultFlags::MINOR.bits(),
        g::UFFD_PAGEFAULT_FLAG_MINOR as u64
    );
    let ioctls = [
        (UffdIoctls::REGISTER, g::_UFFDIO_REGISTER),
        (UffdIoctls::UNREGISTER, g::_UFFDIO_UNREGISTER),
        (UffdIoctls::WAKE, g::_UFFDIO_WAKE),
        (UffdIoctls::COPY, g::_UFFDIO_COPY),
        (UffdIoctls::ZEROPAGE, g::_UFFDIO_ZEROPAGE),
        (UffdIoctls::MOVE, g::_UFFDIO_MOVE),
        (UffdIoctls::WRITEPROTECT, g::_UFFDIO_WRITEPROTECT),
        (UffdIoctls::CONTINUE, g::_UFFDIO_CONTINUE),
        (UffdIoctls::POISON, g::_UFFDIO_POISON),
        (UffdIoctls::API, g::_UFFDIO_API),
    ];
    for (ours, nr) in ioctls {
        assert_eq!(ours.bits(), 1u64 << nr, "{ours:?}");
    }
    assert_eq!(
        page_pipe_sys::UFFD_EVENT_PAGEFAULT as u32,
        g::UFFD_EVENT_PAGEFAULT
    );
    assert_eq!(page_pipe_sys::UFFD_EVENT_FORK as u32, g::UFFD_EVENT_FORK);
    assert_eq!(page_pipe_sys::UFFD_EVENT_REMAP as u32, g::UFFD_EVENT_REMAP);
    assert_eq!(
        page_pipe_sys::UFFD_EVENT_REMOVE as u32,
        g::UFFD_EVENT_REMOVE
    );
    assert_eq!(page_pipe_sys::UFFD_EVENT_UNMAP as u32, g::UFFD_EVENT_UNMAP);

    let cats = [
        (PageCategories::WPALLOWED, g::PAGE_IS_WPALLOWED),
        (PageCategories::WRITTEN, g::PAGE_IS_WRITTEN),
        (PageCategories::FILE, g::PAGE_IS_FILE),
        (PageCategories::PRESENT, g::PAGE_IS_PRESENT),
        (PageCategories::SWAPPED, g::PAGE_IS_SWAPPED),
        (PageCategories::PFNZERO, g::PAGE_IS_PFNZERO),
        (PageCategories::HUGE, g::PAGE_IS_HUGE),
        (PageCategories::SOFT_DIRTY, g::PAGE_IS_SOFT_DIRTY),
        (PageCategories::GUARD, g::PAGE_IS_GUARD),
    ];
    for (ours, theirs) in cats {
        assert_eq!(ours.bits(), theirs as u64, "{ours:?}");
    }
    assert_eq!(ScanFlags::WP_MATCHING.bits(), g::PM_SCAN_WP_MATCHING as u64);
    assert_eq!(
        ScanFlags::CHECK_WPASYNC.bits(),
        g::PM_SCAN_CHECK_WPASYNC as u64
    );
}

/// A userfaultfd that handles kernel faults, or `None` after saying why not.
fn uffd(test: &str) -> Option<Uffd> {
    match Uffd::open(UffdFlags::NONBLOCK) {
        Ok(u) => Some(u),
        Err(e) => {
            eprintln!("SKIPPED {test}: userfaultfd(2): {e}");
            None
        }
    }
}

/// Missing mode, as a lazy restore serves it: a thread reads a page not yet there and
/// waits; the event names the page; UFFDIO_COPY fills it and wakes the thread; a second
/// copy to it is EEXIST; UFFDIO_ZEROPAGE fills another.
#[test]
fn missing_faults_are_served_with_copy_and_zeropage() {
    let Some(u) = uffd("missing_faults_are_served_with_copy_and_zeropage") else {
        return;
    };
    let api = u.api(UffdFeatures::empty()).unwrap();
    assert!(
        api.ioctls
            .contains(UffdIoctls::REGISTER | UffdIoctls::UNREGISTER | UffdIoctls::API)
    );
    let ps = ps();
    let mem = anon(4);
    let base = mem.as_ptr() as usize;
    let ioctls = u.register(base, 4 * ps, RegisterMode::MISSING).unwrap();
    assert!(ioctls.contains(UffdIoctls::COPY | UffdIoctls::ZEROPAGE | UffdIoctls::WAKE));
    let mut events = Vec::new();
    assert_eq!(u.read_events(&mut events, 8), Err(Errno::AGAIN));

    let src = vec![0xABu8; ps];
    let reader = std::thread::spawn(move || {
        let at = (base + ps + 5) as *const u8;
        // SAFETY: page 1 of `mem`, which outlives this thread (joined below); nothing
        // writes it but the kernel's UFFDIO_COPY, which completes before the read does.
        unsafe { at.read_volatile() }
    });
    // Wait for the reader's fault.
    let stop = page_pipe_sys::pipe().unwrap();
    while events.is_empty() {
        assert!(u.wait(&stop.read).unwrap());
        let _ = u.read_events(&mut events, 8);
    }
    match events.as_slice() {
        [UffdEvent::Pagefault { flags, address, .. }] => {
            assert!(!flags.contains(PagefaultFlags::WRITE | PagefaultFlags::WP));
            assert_eq!(*address as usize, base + ps);
        }
        other => panic!("{other:?}"),
    }
    // SAFETY: page 1 of `mem` is not populated (the reader waits for it) and nothing holds
    // a reference to it; `src` is a live page-sized buffer.
    let done = unsafe { u.copy((base + ps) as *mut u8, src.as_ptr(), ps, CopyMode::empty()) };
    assert_eq!(done, Ok(ps as u64));
    assert_eq!(reader.join().unwrap(), 0xAB);
    // SAFETY: as above; the kernel refuses to overwrite the populated page.
    let again = unsafe { u.copy((base + ps) as *mut u8, src.as_ptr(), ps, CopyMode::empty()) };
    let e = again.unwrap_err();
    assert_eq!((e.done, e.errno), (0, Errno::EXIST));
    // SAFETY: page 2 of `mem` is not populated and nothing references it.
    let z = unsafe { u.zeropage((base + 2 * ps) as *mut u8, ps, ZeropageMode::empty()) };
    assert_eq!(z, Ok(ps as u64));
    u.wake(base, 4 * ps).unwrap();
    u.unregister(base, 4 * ps).unwrap();
    assert_eq!(mem[ps], 0xAB);
    assert_eq!(mem[2 * ps], 0);
}

/// Write-protection with WP_ASYNC, seen through PAGEMAP_SCAN, as the tracker relies on:
/// protected present pages, markers for pages never populated (reported as swapped), a
/// written page, a discarded page reported as written, and WP_MATCHING protecting again.
#[test]
fn pagemap_scan_sees_async_write_protection() {
    let test = "pagemap_scan_sees_async_write_protection";
    let Some(u) = uffd(test) else { return };
    let want =
        UffdFeatures::PAGEFAULT_FLAG_WP | UffdFeatures::WP_ASYNC | UffdFeatures::WP_UNPOPULATED;
    match u.api(want) {
        Ok(a) => assert!(a.features.contains(want)),
        Err(e) => {
            eprintln!("SKIPPED {test}: no WP_ASYNC ({e})");
            return;
        }
    }
    let ps = ps();
    let mut mem = anon(16);
    mem[..4 * ps].fill(1);
    let (base, len) = (mem.as_ptr() as usize, 16 * ps);
    u.register(base, len, RegisterMode::WP).unwrap();
    u.writeprotect(base, len, WriteProtectMode::WP).unwrap();
    let pm = Pagemap::open_self().unwrap();
    let scan = |flags: ScanFlags, mask: PageCategories| {
        let mut arg = PmScanArg::new(base as u64, (base + len) as u64);
        arg.flags = flags.bits();
        arg.category_mask = mask.bits();
        arg.return_mask =
            (PageCategories::WRITTEN | PageCategories::PRESENT | PageCategories::SWAPPED).bits();
        let mut out = [PageRegion::default(); 16];
        let n = pm.scan(&mut arg, &mut out).unwrap();
        assert_eq!(arg.walk_end, arg.end);
        out[..n]
            .iter()
            .map(|r| {
                (
                    ((r.start as usize - base) / ps),
                    ((r.end as usize - base) / ps),
                    PageCategories::from_bits_retain(r.categories),
                )
            })
            .collect::<Vec<_>>()
    };
    let (p, s, w) = (
        PageCategories::PRESENT,
        PageCategories::SWAPPED,
        PageCategories::WRITTEN,
    );
    assert_eq!(
        scan(ScanFlags::empty(), PageCategories::empty()),
        [(0, 4, p), (4, 16, s)]
    );
    mem[2 * ps] = 2;
    mem[9 * ps] = 2;
    // SAFETY: page 12 of this test's mapping; no reference into it is live.
    unsafe {
        rustix::mm::madvise(
            mem[12 * ps..].as_mut_ptr().cast(),
            ps,
            rustix::mm::Advice::LinuxDontNeed,
        )
    }
    .unwrap();
    assert_eq!(
        scan(ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC, w),
        [(2, 3, p | w), (9, 10, p | w), (12, 13, w)]
    );
    // Protected again: nothing written now.
    assert!(scan(ScanFlags::CHECK_WPASYNC, w).is_empty());
    u.unregister(base, len).unwrap();
    // No longer registered: CHECK_WPASYNC refuses.
    let mut arg = PmScanArg::new(base as u64, (base + len) as u64);
    arg.flags = ScanFlags::CHECK_WPASYNC.bits();
    assert_eq!(
        pm.scan(&mut arg, &mut [PageRegion::default(); 1]),
        Err(Errno::PERM)
    );
}

/// The probe agrees with what the calls do here.
#[test]
fn the_probe_agrees_with_the_kernel() {
    let p = page_pipe_sys::probe_userfaultfd();
    assert_eq!(p.syscall.is_ok(), Uffd::open(UffdFlags::empty()).is_ok());
    assert_eq!(p.dev.is_ok(), Uffd::open_dev(UffdFlags::empty()).is_ok());
    if let Ok(f) = p.features {
        assert_eq!(
            Uffd::query_features(UffdFlags::USER_MODE_ONLY).map(|a| a.features),
            Ok(f)
        );
    }
    let text = p.to_string();
    assert!(text.contains("write tracking:"), "{text}");
    if p.async_tracking() {
        assert!(text.contains("asynchronous"), "{text}");
    }
}

/// The message decoder reads what the kernel wrote: a write-protect fault, synchronous
/// mode, decoded with its flags and address.
#[test]
fn write_protect_faults_decode_with_their_flags() {
    let test = "write_protect_faults_decode_with_their_flags";
    let Some(u) = uffd(test) else { return };
    u.api(UffdFeatures::PAGEFAULT_FLAG_WP).unwrap();
    let ps = ps();
    let mut mem = anon(2);
    mem.fill(1);
    let base = mem.as_ptr() as usize;
    u.register(base, 2 * ps, RegisterMode::WP).unwrap();
    u.writeprotect(base, 2 * ps, WriteProtectMode::WP).unwrap();
    let writer = std::thread::spawn(move || {
        let at = (base + ps + 3) as *mut u8;
        // SAFETY: page 1 of `mem`, alive until the thread is joined; only this thread
        // writes it and the main thread reads it only after the join.
        unsafe { at.write_volatile(9) };
    });
    let mut events = Vec::new();
    let stop = page_pipe_sys::pipe().unwrap();
    while events.is_empty() {
        assert!(u.wait(&stop.read).unwrap());
        let _ = u.read_events(&mut events, 8);
    }
    match events.as_slice() {
        [UffdEvent::Pagefault { flags, address, .. }] => {
            assert!(
                flags.contains(PagefaultFlags::WRITE | PagefaultFlags::WP),
                "{flags:?}"
            );
            assert_eq!(*address as usize, base + ps);
        }
        other => panic!("{other:?}"),
    }
    u.writeprotect(base + ps, ps, WriteProtectMode::empty())
        .unwrap();
    writer.join().unwrap();
    assert_eq!(mem[ps + 3], 9);
    // `wait` ends when the stop pipe's writer goes.
    drop(stop.write);
    assert!(!u.wait(&stop.read).unwrap());
}

/// `Uffd::wait` invents no errno: a userfaultfd before its `UFFDIO_API` handshake polls
/// as in error, and `wait` hands over to the read, which gets the kernel's own `EINVAL`;
/// a stop pipe whose writer is gone ends the wait (`Ok(false)`).
#[test]
fn waiting_on_a_userfaultfd_in_error_leaves_the_errno_to_the_kernel() {
    let Some(u) = uffd("waiting_on_a_userfaultfd_in_error_leaves_the_errno_to_the_kernel") else {
        return;
    };
    let stop = page_pipe_sys::pipe().unwrap();
    assert_eq!(
        u.wait(&stop.read),
        Ok(true),
        "no handshake yet: read to learn why"
    );
    let mut events = Vec::new();
    assert_eq!(u.read_events(&mut events, 4), Err(Errno::INVAL));
    u.api(UffdFeatures::empty()).unwrap();
    drop(stop.write);
    assert_eq!(u.wait(&stop.read), Ok(false), "the stop pipe hung up");
}
