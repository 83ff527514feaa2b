//! Memory to capture from: regions that map page pipe addresses to memory.
//!
//! This is the one module of the crate that uses `unsafe`: it holds regions as pointer and
//! length, whatever owns them, and hands out byte slices of them.
//!
//! # Rules
//!
//! - A region starts at a page-aligned page pipe address and covers a whole number of
//!   pages; its memory starts on a page boundary (so each page is one pipe slot).
//! - Regions do not overlap, in address or in memory.
//! - Memory is borrowed for `'m` ([`with_slice`](Source::with_slice)), owned
//!   ([`with_mmap`](Source::with_mmap)), or known only by pointer
//!   ([`with_raw`](Source::with_raw), `unsafe`, whose caller promises the memory stays
//!   mapped and unmodified for `'m`). A [`Captured`](crate::Captured) page pipe carries `'m`,
//!   so safe code cannot change borrowed memory while its pages sit in pipes.
#![allow(unsafe_code)]

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use memmap2::Mmap;
use page_pipe_sys::RawIov;

/// Why a region was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceError {
    /// The page pipe address is not page-aligned.
    UnalignedAddr {
        /// The address.
        addr: u64,
    },
    /// The memory does not start on a page boundary.
    UnalignedMemory {
        /// The page pipe address of the region.
        addr: u64,
        /// The memory's address.
        ptr: usize,
    },
    /// The length is not a whole number of pages.
    PartialPage {
        /// The page pipe address of the region.
        addr: u64,
        /// The length in bytes.
        len: usize,
    },
    /// The region overlaps one given before, in page pipe addresses or in memory.
    Overlap {
        /// The page pipe address of the new region.
        addr: u64,
        /// The page pipe address of the region it overlaps.
        other: u64,
    },
    /// The region passes the end of the address space.
    Overflow {
        /// The page pipe address of the region.
        addr: u64,
    },
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::UnalignedAddr { addr } => {
                write!(f, "region address {addr:#x} is not page-aligned")
            }
            SourceError::UnalignedMemory { addr, ptr } => write!(
                f,
                "memory of region {addr:#x} at {ptr:#x} does not start on a page boundary"
            ),
            SourceError::PartialPage { addr, len } => write!(
                f,
                "region {addr:#x} is {len} bytes, not a whole number of pages"
            ),
            SourceError::Overlap { addr, other } => {
                write!(f, "region {addr:#x} overlaps region {other:#x}")
            }
            SourceError::Overflow { addr } => {
                write!(f, "region {addr:#x} passes the end of the address space")
            }
        }
    }
}

impl std::error::Error for SourceError {}

#[derive(Debug)]
enum Owner {
    /// Borrowed for `'m`, or raw under the `with_raw` contract.
    Lent,
    /// Owned: unmapped when the source is dropped. Pages already in pipes survive that.
    Mmap(#[allow(dead_code)] Mmap),
}

#[derive(Debug)]
struct Region {
    addr: u64,
    ptr: NonNull<u8>,
    len: usize,
    _owner: Owner,
}

/// Memory a page pipe captures from: regions, each mapping a range of page pipe addresses
/// to memory. A region can sit at any address, so memory can be captured under the
/// addresses its owner knows it by (a VMM's guest-physical addresses, say).
///
/// See the [module docs](self) for the rules regions follow.
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::Source;
/// let ps = page_pipe_sys::page_size().get();
/// let mut ram = MmapOptions::new().len(4 * ps).map_anon()?;
/// ram.fill(7);
/// let source = Source::new().with_slice(0x10_0000, &ram[..])?;
/// assert_eq!(source.get(0x10_0000 + ps as u64, 1).unwrap()[0], 7);
/// assert!(source.get(0, 1).is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Source<'m> {
    /// Sorted by `addr`.
    regions: Vec<Region>,
    page_size: usize,
    _mem: PhantomData<&'m [u8]>,
}

// SAFETY: a `Source` only reads its memory. Borrowed regions are `&'m [u8]`, which are
// `Send` and `Sync`; owned regions are `Mmap`s, which are `Send` and `Sync`; raw regions
// come with the `with_raw` contract, which includes reads from any thread.
unsafe impl Send for Source<'_> {}
// SAFETY: as for `Send`: nothing is written through a `&Source`.
unsafe impl Sync for Source<'_> {}

impl Default for Source<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m> Source<'m> {
    /// A source with no region, for pages of this machine's page size.
    pub fn new() -> Self {
        Self {
            regions: Vec::new(),
            page_size: page_pipe_sys::page_size().get(),
            _mem: PhantomData,
        }
    }

    /// The page size regions are counted in.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Adds `mem`, borrowed for `'m`, as the region at page pipe address `addr`.
    ///
    /// # Errors
    /// [`SourceError`] when the region breaks a rule of the [module docs](self).
    pub fn with_slice(self, addr: u64, mem: &'m [u8]) -> Result<Self, SourceError> {
        let ptr = NonNull::from(mem).cast::<u8>();
        self.insert(addr, ptr, mem.len(), Owner::Lent)
    }

    /// Adds a mapping the source takes ownership of, as the region at `addr`. Dropping
    /// the source unmaps it; pages already in pipes keep the contents they had.
    ///
    /// # Errors
    /// [`SourceError`] when the region breaks a rule of the [module docs](self).
    pub fn with_mmap(self, addr: u64, map: Mmap) -> Result<Self, SourceError> {
        let ptr = NonNull::from(&map[..]).cast::<u8>();
        let len = map.len();
        self.insert(addr, ptr, len, Owner::Mmap(map))
    }

    /// Adds `len` bytes of memory at `ptr`, known only by pointer (a VMM's guest RAM), as
    /// the region at `addr`.
    ///
    /// # Errors
    /// [`SourceError`] when the region breaks a rule of the [module docs](self).
    ///
    /// A capture hands the memory to the kernel by address, making no reference to it, so
    /// memory that is unmapped anyway makes `vmsplice` fail with `EFAULT`, reported as
    /// [`CaptureError::Kernel`](crate::CaptureError::Kernel) naming the page. The copying
    /// path (taken when the kernel refuses `vmsplice`) and [`get`](Self::get) do read
    /// through references, which is why the memory must stay mapped.
    ///
    /// # Safety
    /// For all of `'m`:
    /// - the `len` bytes at `ptr` stay mapped and readable;
    /// - nothing modifies them, in this process or elsewhere (a capture that reads
    ///   memory being written is a data race, and the snapshot would not be
    ///   consistent);
    /// - they may be read from any thread.
    pub unsafe fn with_raw(
        self,
        addr: u64,
        ptr: NonNull<u8>,
        len: usize,
    ) -> Result<Self, SourceError> {
        self.insert(addr, ptr, len, Owner::Lent)
    }

    fn insert(
        mut self,
        addr: u64,
        ptr: NonNull<u8>,
        len: usize,
        owner: Owner,
    ) -> Result<Self, SourceError> {
        let ps = self.page_size;
        if addr % ps as u64 != 0 {
            return Err(SourceError::UnalignedAddr { addr });
        }
        if ptr.as_ptr() as usize % ps != 0 {
            return Err(SourceError::UnalignedMemory {
                addr,
                ptr: ptr.as_ptr() as usize,
            });
        }
        if len % ps != 0 {
            return Err(SourceError::PartialPage { addr, len });
        }
        if addr.checked_add(len as u64).is_none() {
            return Err(SourceError::Overflow { addr });
        }
        let (start, end) = (ptr.as_ptr() as usize, ptr.as_ptr() as usize + len);
        for r in &self.regions {
            let (rs, re) = (r.ptr.as_ptr() as usize, r.ptr.as_ptr() as usize + r.len);
            let addr_overlap = addr < r.addr + r.len as u64 && r.addr < addr + len as u64;
            let mem_overlap = start < re && rs < end;
            if len > 0 && r.len > 0 && (addr_overlap || mem_overlap) {
                return Err(SourceError::Overlap {
                    addr,
                    other: r.addr,
                });
            }
        }
        let at = self.regions.partition_point(|r| r.addr < addr);
        self.regions.insert(
            at,
            Region {
                addr,
                ptr,
                len,
                _owner: owner,
            },
        );
        Ok(self)
    }

    /// The memory of `pages` pages from page pipe address `addr`, when one region covers
    /// them all. (For a raw region this makes a reference to the memory, under the
    /// contract of [`with_raw`](Self::with_raw).)
    pub fn get(&self, addr: u64, pages: u64) -> Option<&[u8]> {
        let len = usize::try_from(pages).ok()?.checked_mul(self.page_size)?;
        let i = self
            .regions
            .partition_point(|r| r.addr <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        let off = usize::try_from(addr - r.addr).ok()?;
        if off.checked_add(len)? > r.len {
            return None;
        }
        Some(self.slice(r, off, len))
    }

    /// The memory of `pages` pages from `addr` as iovecs, one per region they cross (for
    /// runs that span adjacent regions), appended to `out`; the first address not covered
    /// by any region when they are not all covered. No reference to the memory is made.
    pub(crate) fn iovs(&self, addr: u64, pages: u64, out: &mut Vec<RawIov>) -> Result<(), u64> {
        let ps = self.page_size as u64;
        let (mut at, end) = (addr, addr + pages * ps);
        let mut i = self.regions.partition_point(|r| r.addr <= at);
        while at < end {
            let r = match i.checked_sub(1).map(|j| &self.regions[j]) {
                Some(r) if at < r.addr + r.len as u64 => r,
                _ => match self.regions.get(i) {
                    Some(r) if r.addr == at && r.len > 0 => {
                        i += 1;
                        r
                    }
                    _ => return Err(at),
                },
            };
            let off = (at - r.addr) as usize;
            let take = (r.len - off).min((end - at) as usize);
            out.push(RawIov {
                base: r.ptr.as_ptr().wrapping_add(off),
                len: take,
            });
            at += take as u64;
        }
        Ok(())
    }

    /// The memory of `pages` pages from `addr` as slices, one per region crossed,
    /// appended to `out`; the first address not covered when they are not all covered.
    /// (For a raw region this makes references to the memory, under the contract of
    /// [`with_raw`](Self::with_raw).)
    pub(crate) fn slices<'s>(
        &'s self,
        addr: u64,
        pages: u64,
        out: &mut Vec<&'s [u8]>,
    ) -> Result<(), u64> {
        let mut iovs = Vec::new();
        self.iovs(addr, pages, &mut iovs)?;
        for iov in iovs {
            // SAFETY: `iov` was made by `Self::iovs` just above, so it lies within one
            // region, whose memory is valid for reads and unmodified while `&self` lives
            // (see `slice`).
            out.push(unsafe { std::slice::from_raw_parts(iov.base, iov.len) });
        }
        Ok(())
    }

    /// Copies the memory of `iovs` (from [`iovs`](Self::iovs) of this source) into the
    /// pipe whose write end is `write_end`, with `write(2)`.
    pub(crate) fn copy_into(
        &self,
        write_end: &std::os::fd::OwnedFd,
        iovs: &[RawIov],
    ) -> Result<usize, page_pipe_sys::Partial> {
        let mut done = 0;
        for iov in iovs {
            // SAFETY: `iov` was made by `Self::iovs` of this source (the caller's
            // obligation, kept by the capture), so it lies within one region, whose memory
            // is valid for reads and unmodified while `&self` lives (see `slice`).
            let bytes = unsafe { std::slice::from_raw_parts(iov.base, iov.len) };
            page_pipe_sys::write_exact(write_end, bytes).map_err(|p| page_pipe_sys::Partial {
                done: done + p.done,
                stopped: p.stopped,
            })?;
            done += iov.len;
        }
        Ok(done)
    }

    fn slice(&self, r: &Region, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= r.len);
        // SAFETY: - the range lies in the region (`off + len <= r.len`, both callers check);
        // - the region is readable and unmodified for 'm, which outlives `&self` (by lifetime,
        //   ownership, or the `with_raw` contract); - any initialised byte is a valid `u8`.
        unsafe { std::slice::from_raw_parts(r.ptr.as_ptr().add(off), len) }
    }
}

/// `vmsplice` of memory slices of a [`Source`] into the pipe whose write end is
/// `write_end`, with `SPLICE_F_NONBLOCK`, and `SPLICE_F_GIFT` if `gift`.
///
/// For the capture only: `pages` must be slices handed out by a `Source<'m>` (whole,
/// page-aligned pages), and the caller must keep `'m` borrowed until the pages have left
/// the pipe, as a [`Captured`](crate::Captured) page pipe does.
pub(crate) fn vmsplice_pages(
    write_end: &std::os::fd::OwnedFd,
    pages: &[RawIov],
    gift: bool,
) -> Result<usize, page_pipe_sys::Partial> {
    use page_pipe_sys::SpliceFlags;
    let flags = if gift {
        SpliceFlags::GIFT | SpliceFlags::NONBLOCK
    } else {
        SpliceFlags::NONBLOCK
    };
    // SAFETY: - `write_end` is a pipe's write end (the capture passes only those);
    // - the iovecs are whole, aligned pages of a `Source` (unmapped memory gives EFAULT);
    // - the `Captured<'m>` keeps that memory unmodified while its pages sit in pipes.
    unsafe { page_pipe_sys::vmsplice_raw(write_end, pages, flags) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ps() -> usize {
        page_pipe_sys::page_size().get()
    }

    fn anon(pages: usize) -> memmap2::MmapMut {
        memmap2::MmapOptions::new()
            .len(pages * ps())
            .map_anon()
            .unwrap()
    }

    #[test]
    fn regions_are_checked_where_they_are_made() {
        let m = anon(4);
        let p = ps() as u64;
        assert_eq!(
            Source::new().with_slice(1, &m[..]).unwrap_err(),
            SourceError::UnalignedAddr { addr: 1 }
        );
        assert!(matches!(
            Source::new().with_slice(0, &m[1..ps() + 1]).unwrap_err(),
            SourceError::UnalignedMemory { .. }
        ));
        assert_eq!(
            Source::new().with_slice(0, &m[..100]).unwrap_err(),
            SourceError::PartialPage { addr: 0, len: 100 }
        );
        let s = Source::new().with_slice(0, &m[..2 * ps()]).unwrap();
        assert_eq!(
            s.with_slice(p, &m[2 * ps()..]).unwrap_err(),
            SourceError::Overlap { addr: p, other: 0 }
        );
        let s = Source::new().with_slice(0, &m[..ps()]).unwrap();
        assert_eq!(
            s.with_slice(10 * p, &m[..ps()]).unwrap_err(),
            SourceError::Overlap {
                addr: 10 * p,
                other: 0
            }
        );
        assert!(matches!(
            Source::new().with_slice(u64::MAX - p + 1, &m[..2 * ps()]),
            Err(SourceError::Overflow { .. })
        ));
    }

    #[test]
    fn iovecs_cross_adjacent_regions_and_name_the_first_gap() {
        let mut a = anon(2);
        let mut b = anon(2);
        a.fill(1);
        b.fill(2);
        let p = ps() as u64;
        let s = Source::new()
            .with_slice(10 * p, &b[..])
            .unwrap()
            .with_slice(8 * p, &a[..])
            .unwrap();
        let mut out = Vec::new();
        s.iovs(9 * p, 3, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].base, out[0].len), (a[ps()..].as_ptr(), ps()));
        assert_eq!((out[1].base, out[1].len), (b.as_ptr(), 2 * ps()));
        out.clear();
        assert_eq!(s.iovs(11 * p, 2, &mut out), Err(12 * p));
        assert_eq!(s.iovs(7 * p, 1, &mut out), Err(7 * p));
        assert!(s.get(9 * p, 2).is_none(), "get wants one region");
        assert_eq!(s.get(10 * p, 2).unwrap().len(), 2 * ps());
    }

    #[test]
    fn an_owned_map_lives_as_long_as_the_source() {
        let mut m = anon(1);
        m.fill(9);
        let s = Source::new()
            .with_mmap(0, m.make_read_only().unwrap())
            .unwrap();
        assert_eq!(s.get(0, 1).unwrap()[ps() - 1], 9);
    }
}
