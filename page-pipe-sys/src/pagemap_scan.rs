//! `/proc/self/pagemap`: its `PAGEMAP_SCAN` ioctl (Linux 6.7), declared by hand, and its
//! 64-bit entries.
//!
//! The structures mirror `include/uapi/linux/fs.h` of Linux 6.18 (Debian's headers here
//! predate them) and are checked at compile time below each declaration.

use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bitflags::bitflags;
use rustix::io::{Errno, Result};
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};

bitflags! {
    /// `PAGE_IS_*`: the categories `PAGEMAP_SCAN` matches pages by and reports.
    ///
    /// As seen on Linux 6.18 in a range registered with a `WP_ASYNC` userfaultfd: a
    /// present page is `PRESENT` (and `WRITTEN` once written since its protection); a
    /// page never populated but protected (`WP_UNPOPULATED` leaves a marker) reads as
    /// `SWAPPED`; a page discarded after its protection (`MADV_DONTNEED`) reads as
    /// `WRITTEN`; a page only ever read is `PRESENT | PFNZERO`. Every page of such a range
    /// is `WPALLOWED`.
    ///
    /// ```
    /// use page_pipe_sys::PageCategories;
    /// assert_eq!(PageCategories::WRITTEN.bits(), 2);
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageCategories: u64 {
        /// `PAGE_IS_WPALLOWED`: in a range with asynchronous write-protection.
        const WPALLOWED = 1 << 0;
        /// `PAGE_IS_WRITTEN`: written since it was write-protected (or never protected).
        const WRITTEN = 1 << 1;
        /// `PAGE_IS_FILE`: backed by a file (shmem included).
        const FILE = 1 << 2;
        /// `PAGE_IS_PRESENT`: in memory.
        const PRESENT = 1 << 3;
        /// `PAGE_IS_SWAPPED`: swapped out (or a marker standing in for a page).
        const SWAPPED = 1 << 4;
        /// `PAGE_IS_PFNZERO`: the shared zero page.
        const PFNZERO = 1 << 5;
        /// `PAGE_IS_HUGE`: part of a transparent or hugetlb huge page.
        const HUGE = 1 << 6;
        /// `PAGE_IS_SOFT_DIRTY`: soft-dirty (kernels with `CONFIG_MEM_SOFT_DIRTY`).
        const SOFT_DIRTY = 1 << 7;
        /// `PAGE_IS_GUARD` (6.14): a guard region (`MADV_GUARD_INSTALL`).
        const GUARD = 1 << 8;
        /// Bits of later kernels.
        const _ = !0;
    }
}

bitflags! {
    /// `PM_SCAN_*`: what `PAGEMAP_SCAN` does besides reporting.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ScanFlags: u64 {
        /// `PM_SCAN_WP_MATCHING`: write-protect the matching pages in the same walk (for
        /// each page under its page-table lock, so no write falls between the report and
        /// the protection).
        const WP_MATCHING = 1 << 0;
        /// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` when part of the range is not
        /// registered with asynchronous write-protection.
        const CHECK_WPASYNC = 1 << 1;
    }
}

/// `struct page_region`: a run of pages with the same categories, as `PAGEMAP_SCAN`
/// reports it.
///
/// | field        | C type  | offset |
/// |--------------|---------|--------|
/// | `start`      | `__u64` | 0      |
/// | `end`        | `__u64` | 8      |
/// | `categories` | `__u64` | 16     |
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// The first byte.
    pub start: u64,
    /// Past the last byte.
    pub end: u64,
    /// `PAGE_IS_*`, masked by the scan's `return_mask`.
    pub categories: u64,
}

const _: () = {
    assert!(size_of::<PageRegion>() == 24);
    assert!(offset_of!(PageRegion, start) == 0);
    assert!(offset_of!(PageRegion, end) == 8);
    assert!(offset_of!(PageRegion, categories) == 16);
};

/// `struct pm_scan_arg`: the argument of `PAGEMAP_SCAN`.
///
/// A page matches when, with `c` its categories XOR `category_inverted`,
/// `c & category_mask == category_mask` and (`category_anyof_mask` is 0 or
/// `c & category_anyof_mask != 0`).
///
/// | field                 | C type  | offset |
/// |-----------------------|---------|--------|
/// | `size`                | `__u64` | 0      |
/// | `flags`               | `__u64` | 8      |
/// | `start`               | `__u64` | 16     |
/// | `end`                 | `__u64` | 24     |
/// | `walk_end`            | `__u64` | 32     |
/// | `vec`                 | `__u64` | 40     |
/// | `vec_len`             | `__u64` | 48     |
/// | `max_pages`           | `__u64` | 56     |
/// | `category_inverted`   | `__u64` | 64     |
/// | `category_mask`       | `__u64` | 72     |
/// | `category_anyof_mask` | `__u64` | 80     |
/// | `return_mask`         | `__u64` | 88     |
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PmScanArg {
    /// `sizeof(struct pm_scan_arg)`, 96.
    pub size: u64,
    /// `PM_SCAN_*`.
    pub flags: u64,
    /// First byte of the range (page-aligned).
    pub start: u64,
    /// Past the last byte.
    pub end: u64,
    /// Out: where the walk stopped (`end` when it finished; less when the output was
    /// full or `max_pages` was reached: scan again from there).
    pub walk_end: u64,
    /// The output array ([`Pagemap::scan`] sets it to its `out` slice).
    pub vec: u64,
    /// Its length in entries ([`Pagemap::scan`] sets it).
    pub vec_len: u64,
    /// At most this many pages reported (0: no limit). A limit that ends inside a
    /// transparent huge page splits it when the scan also protects.
    pub max_pages: u64,
    /// `PAGE_IS_*` that match when clear.
    pub category_inverted: u64,
    /// `PAGE_IS_*` that must all match.
    pub category_mask: u64,
    /// `PAGE_IS_*` of which one must match (0: no such condition).
    pub category_anyof_mask: u64,
    /// `PAGE_IS_*` reported in [`PageRegion::categories`].
    pub return_mask: u64,
}

const _: () = {
    assert!(size_of::<PmScanArg>() == 96);
    assert!(offset_of!(PmScanArg, size) == 0);
    assert!(offset_of!(PmScanArg, flags) == 8);
    assert!(offset_of!(PmScanArg, start) == 16);
    assert!(offset_of!(PmScanArg, end) == 24);
    assert!(offset_of!(PmScanArg, walk_end) == 32);
    assert!(offset_of!(PmScanArg, vec) == 40);
    assert!(offset_of!(PmScanArg, vec_len) == 48);
    assert!(offset_of!(PmScanArg, max_pages) == 56);
    assert!(offset_of!(PmScanArg, category_inverted) == 64);
    assert!(offset_of!(PmScanArg, category_mask) == 72);
    assert!(offset_of!(PmScanArg, category_anyof_mask) == 80);
    assert!(offset_of!(PmScanArg, return_mask) == 88);
};

impl PmScanArg {
    /// A scan of `[start, end)` that matches every page and reports no category; set the
    /// masks and flags on it.
    ///
    /// ```
    /// use page_pipe_sys::{PageCategories, PmScanArg};
    /// let mut arg = PmScanArg::new(0x7f00_0000_0000, 0x7f00_0010_0000);
    /// arg.category_mask = PageCategories::WRITTEN.bits();
    /// assert_eq!(arg.size, 96);
    /// ```
    pub fn new(start: u64, end: u64) -> Self {
        Self {
            size: size_of::<Self>() as u64,
            start,
            end,
            ..Self::default()
        }
    }
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: Opcode = opcode::read_write::<PmScanArg>(b'f', 16);

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const _: () = assert!(PAGEMAP_SCAN as u64 == 0xc060_6610);

struct ScanIoctl<'a> {
    arg: &'a mut PmScanArg,
}

// SAFETY: - PAGEMAP_SCAN takes a `struct pm_scan_arg` (opcode checked above);
// - the kernel updates it (`walk_end`) and writes at most `vec_len` page regions at
//   `vec`, which `Pagemap::scan` points at a live, exclusively borrowed slice of that
//   length;
// - the output is the call's return value (regions written).
unsafe impl Ioctl for ScanIoctl<'_> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        PAGEMAP_SCAN
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        (self.arg as *mut PmScanArg).cast()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut std::ffi::c_void) -> Result<IoctlOutput> {
        Ok(out)
    }
}

/// One 64-bit entry of `/proc/<pid>/pagemap`, for one page.
///
/// ```
/// use page_pipe_sys::PagemapEntry;
/// let e = PagemapEntry(1 << 63 | 1 << 57);
/// assert!(e.present() && e.uffd_wp() && !e.swapped());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    /// Bit 63: the page is present in memory.
    pub fn present(self) -> bool {
        self.0 >> 63 & 1 == 1
    }

    /// Bit 62: the page is swapped out (or a marker stands in for it).
    pub fn swapped(self) -> bool {
        self.0 >> 62 & 1 == 1
    }

    /// Bit 61: a file page or shared anonymous page.
    pub fn file_or_shared(self) -> bool {
        self.0 >> 61 & 1 == 1
    }

    /// Bit 57 (5.19): the page is write-protected by userfaultfd.
    pub fn uffd_wp(self) -> bool {
        self.0 >> 57 & 1 == 1
    }

    /// Bit 56: the page is mapped exclusively.
    pub fn exclusive(self) -> bool {
        self.0 >> 56 & 1 == 1
    }

    /// Bit 55: soft-dirty.
    pub fn soft_dirty(self) -> bool {
        self.0 >> 55 & 1 == 1
    }

    /// Bits 0–54: the page frame number when present (0 without `CAP_SYS_ADMIN`).
    pub fn pfn(self) -> u64 {
        self.0 & ((1 << 55) - 1)
    }
}

/// `/proc/self/pagemap`, open for reading: its entries and its `PAGEMAP_SCAN` ioctl.
#[derive(Debug)]
pub struct Pagemap {
    fd: OwnedFd,
}

impl AsFd for Pagemap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Pagemap {
    /// `open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)`.
    ///
    /// ```
    /// let pm = page_pipe_sys::Pagemap::open_self()?;
    /// # Ok::<(), page_pipe_sys::Errno>(())
    /// ```
    ///
    /// # Errors
    /// `ENOENT` without `/proc`; `EACCES` where it is not readable.
    ///
    /// # References
    /// - [`proc_pid_pagemap(5)`](https://man7.org/linux/man-pages/man5/proc_pid_pagemap.5.html)
    /// - [`admin-guide/mm/pagemap.rst`](https://docs.kernel.org/admin-guide/mm/pagemap.html)
    pub fn open_self() -> Result<Pagemap> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            "/proc/self/pagemap",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Pagemap { fd })
    }

    /// `ioctl(pagemap, PAGEMAP_SCAN, arg)` with `arg.vec`/`arg.vec_len` set to `out`:
    /// walks `[arg.start, arg.end)`, writes the runs of matching pages (adjacent pages
    /// with equal reported categories joined) into `out`, and returns how many.
    /// `arg.walk_end` says where the walk stopped: at `arg.end`, or earlier when `out`
    /// filled up (scan again from there).
    ///
    /// With [`ScanFlags::WP_MATCHING`] the matching pages are write-protected in the same
    /// walk. Pages not reported (past a full `out`) are not protected; a transparent huge
    /// page is protected whole or, when the output or `max_pages` ends inside it, split.
    ///
    /// Measured here: 0.5 ms for 1 GiB with 1% of its pages written, `WP_MATCHING`.
    ///
    /// ```
    /// use page_pipe_sys::{PageCategories, Pagemap, PageRegion, PmScanArg};
    /// let mem = vec![1u8; 1 << 20];
    /// let ps = page_pipe_sys::page_size().get() as u64;
    /// let start = (mem.as_ptr() as u64).next_multiple_of(ps);
    /// let pm = Pagemap::open_self()?;
    /// let mut arg = PmScanArg::new(start, start + 16 * ps);
    /// arg.category_mask = PageCategories::PRESENT.bits();
    /// arg.return_mask = PageCategories::PRESENT.bits();
    /// let mut out = [PageRegion::default(); 8];
    /// match pm.scan(&mut arg, &mut out) {
    ///     Ok(n) => assert_eq!((n, out[0].end - out[0].start), (1, 16 * ps)),
    ///     Err(e) => println!("no PAGEMAP_SCAN here ({e}); Linux 6.7 added it"),
    /// }
    /// # Ok::<(), page_pipe_sys::Errno>(())
    /// ```
    ///
    /// # Errors
    /// - `ENOTTY`: the kernel has no `PAGEMAP_SCAN` (before 6.7);
    /// - `EINVAL`: `size` wrong, unknown flags or categories, `start` not page-aligned;
    /// - `EFAULT`: the range is not a valid user range;
    /// - `EPERM`: [`ScanFlags::CHECK_WPASYNC`] and part of the range lacks asynchronous
    ///   write-protection (not registered with a `WP_ASYNC` userfaultfd);
    /// - `EINTR` (a fatal signal), `ENOMEM`.
    ///
    /// # References
    /// - [`ioctl_pagemap_scan(2)`](https://man7.org/linux/man-pages/man2/ioctl_pagemap_scan.2.html)
    /// - [`admin-guide/mm/pagemap.rst`](https://docs.kernel.org/admin-guide/mm/pagemap.html), "Pagemap Scan IOCTL"
    pub fn scan(&self, arg: &mut PmScanArg, out: &mut [PageRegion]) -> Result<usize> {
        arg.size = size_of::<PmScanArg>() as u64;
        arg.vec = out.as_mut_ptr() as u64;
        arg.vec_len = out.len() as u64;
        // SAFETY: `self` is /proc/self/pagemap, whose PAGEMAP_SCAN takes `arg`; the
        // kernel writes at most `out.len()` regions into `out`, just set in `arg`.
        let n = unsafe { rustix::ioctl::ioctl(self, ScanIoctl { arg }) }?;
        // A count above the slice would be a kernel bug; never trust it past `out`.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= out.len())
            .ok_or(Errno::IO)
    }

    /// `pread(pagemap, out, 8 * len, 8 * (start / page_size))`: the entries of the pages
    /// from the page-aligned address `start`, one per element of `out`. Returns how many
    /// were read (fewer at the end of the address space).
    ///
    /// ```
    /// use page_pipe_sys::{Pagemap, PagemapEntry};
    /// let mem = vec![1u8; 1 << 16];
    /// let ps = page_pipe_sys::page_size().get();
    /// let start = (mem.as_ptr() as usize).next_multiple_of(ps);
    /// let mut out = [PagemapEntry::default(); 4];
    /// Pagemap::open_self()?.read_entries(start, &mut out)?;
    /// assert!(out.iter().all(|e| e.present()));
    /// # Ok::<(), page_pipe_sys::Errno>(())
    /// ```
    ///
    /// # Errors
    /// `EINVAL` for an unaligned `start`; the errno of `pread(2)`.
    ///
    /// # References
    /// - [`admin-guide/mm/pagemap.rst`](https://docs.kernel.org/admin-guide/mm/pagemap.html)
    pub fn read_entries(&self, start: usize, out: &mut [PagemapEntry]) -> Result<usize> {
        let ps = crate::page_size().get();
        if !start.is_multiple_of(ps) {
            return Err(Errno::INVAL);
        }
        let mut bytes = vec![0u8; out.len() * 8];
        let offset = (start / ps) as u64 * 8;
        let mut got = 0;
        while got < bytes.len() {
            match rustix::io::pread(self, &mut bytes[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        let whole = got / 8;
        for (e, b) in out.iter_mut().zip(bytes[..whole * 8].chunks_exact(8)) {
            *e = PagemapEntry(u64::from_ne_bytes(b.try_into().expect("chunks of 8")));
        }
        Ok(whole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entry_bits() {
        let e = PagemapEntry(1 << 62 | 1 << 61 | 1 << 56 | 1 << 55 | 0x1234);
        assert!(!e.present() && e.swapped() && e.file_or_shared());
        assert!(e.exclusive() && e.soft_dirty() && !e.uffd_wp());
        assert_eq!(e.pfn(), 0x1234);
    }

    #[test]
    fn a_scan_of_present_pages_reports_them_and_sets_walk_end() {
        let ps = crate::page_size().get();
        let mem = vec![7u8; 9 * ps];
        let start = (mem.as_ptr() as u64).next_multiple_of(ps as u64);
        let pm = Pagemap::open_self().unwrap();
        let mut arg = PmScanArg::new(start, start + 8 * ps as u64);
        arg.category_mask = PageCategories::PRESENT.bits();
        arg.return_mask = PageCategories::PRESENT.bits();
        let mut out = [PageRegion::default(); 4];
        match pm.scan(&mut arg, &mut out) {
            Ok(n) => {
                assert_eq!(n, 1);
                assert_eq!((out[0].start, out[0].end), (start, arg.end));
                assert_eq!(out[0].categories, PageCategories::PRESENT.bits());
                assert_eq!(arg.walk_end, arg.end);
            }
            Err(Errno::NOTTY) => eprintln!("SKIPPED: no PAGEMAP_SCAN (Linux < 6.7)"),
            Err(e) => panic!("PAGEMAP_SCAN: {e}"),
        }
    }
}
