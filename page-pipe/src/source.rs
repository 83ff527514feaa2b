//! Memory to capture from: regions that map page pipe addresses to memory.
//!
//! This is the module of the crate that holds `unsafe` for memory to capture from. (The
//! others that opt in each keep one promise of their own: the live snapshot's, for
//! tracked memory it reads while the program writes it; the restore by mapping's, for
//! image files; with the `vm-memory` feature, `vm`'s guest module, which makes
//! vm-memory's guest memory a volatile region here.) The promise that memory stays
//! readable (and, but for volatile regions, unchanged) is made here, where a region comes
//! in, and kept here: the iovecs a capture hands to the kernel, and the slices a dump
//! reads, are made only by a [`Source`] for pages it checked (a private token type,
//! `Iovs`), so the functions that `vmsplice` them or read them are sound by
//! construction.
//!
//! # Rules
//!
//! - A region starts at a page-aligned page pipe address and covers a whole, non-zero
//!   number of pages; its memory starts on a page boundary (so each page is one pipe
//!   slot).
//! - Regions do not overlap, in address or in memory.
//! - Memory comes in one of three ways, which decide how its pages may leave the crate
//!   (DESIGN.md, "When page references may leave the crate"):
//!   - borrowed for `'m` ([`with_slice`](Source::with_slice)), or known only by pointer
//!     ([`with_raw`](Source::with_raw), `unsafe`, whose caller promises the memory stays
//!     mapped and unmodified for `'m`): a capture may reference it from the crate's own
//!     pipes while `'m` lasts ([`Captured`](crate::Captured) carries `'m`), but its pages
//!     leave the crate only as copies, since the memory may change once `'m` ends;
//!   - owned, anonymous and private ([`with_mmap`](Source::with_mmap) of
//!     `MmapOptions::map_anon`): once the source has it nobody can write it any more, so
//!     its pages may be referenced anywhere, given to the kernel (`SPLICE_F_GIFT`), and
//!     outlive the source;
//!   - owned but backed by a file or shared ([`with_mmap`](Source::with_mmap) of a file
//!     mapping): others may still write it, so a capture copies it.
#![allow(unsafe_code)]

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use memmap2::Mmap;
use page_pipe_sys::{Partial, RawIov, SpliceFlags};

use crate::addr::{PageRange, RangeError};

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
    /// The region has no pages.
    Empty {
        /// The page pipe address of the region.
        addr: u64,
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
            SourceError::Empty { addr } => write!(f, "region {addr:#x} has no pages"),
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

/// How a region's memory is held, which decides how its pages may leave the crate.
#[derive(Debug)]
enum Owner {
    /// Borrowed for `'m`, or raw under the `with_raw` contract: unchanged while `'m`
    /// lasts, and no longer.
    Lent,
    /// Owned, anonymous and private: nobody can write it any more.
    Sealed(#[allow(dead_code)] Mmap),
    /// Owned, but others may write it (a file or shared mapping).
    Shared(#[allow(dead_code)] Mmap),
    /// Not owned, and others may write it at any time (the `with_volatile` contract).
    Volatile,
}

/// How one piece of memory goes into a pipe, by the way its region is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Referenced while `'m` lasts: `vmsplice` into the crate's pipes, no gift; such
    /// pages leave the crate as copies.
    Lent,
    /// Nobody can write it: `vmsplice` with `SPLICE_F_GIFT`; its pages may go anywhere.
    Sealed,
    /// Others may write it: copied into the pipe.
    Shared,
    /// Others may write it at any time, and Rust code must never see it as a slice: only
    /// the kernel reads it (copied into pipes with `write(2)`, written to sinks with
    /// `write`/`pwrite`), or a volatile copy.
    Volatile,
}

#[derive(Debug)]
struct Region {
    addr: u64,
    ptr: NonNull<u8>,
    len: usize,
    owner: Owner,
}

impl Region {
    fn hold(&self) -> Hold {
        match self.owner {
            Owner::Lent => Hold::Lent,
            Owner::Sealed(_) => Hold::Sealed,
            Owner::Shared(_) => Hold::Shared,
            Owner::Volatile => Hold::Volatile,
        }
    }
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
/// let ps = page_pipe::page_size();
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

// SAFETY:
// - a `Source` only reads its memory, through `&self`;
// - borrowed regions are `&'m [u8]`, which are `Send`;
// - owned regions are `Mmap`s, which are `Send`;
// - raw regions come with the `with_raw` contract, which includes reads from any thread.
unsafe impl Send for Source<'_> {}
// SAFETY:
// - as for `Send`: nothing is written through a `&Source`, and every region may be read
//   from any thread (`&[u8]` and `Mmap` are `Sync`; raw regions by contract).
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

    /// Adds `mem`, borrowed for `'m`, as the region at page pipe address `addr`. Its pages
    /// leave the crate as copies (see the [module docs](self)).
    ///
    /// # Errors
    /// [`SourceError`] when the region breaks a rule of the [module docs](self).
    pub fn with_slice(self, addr: u64, mem: &'m [u8]) -> Result<Self, SourceError> {
        let ptr = NonNull::from(mem).cast::<u8>();
        self.insert(addr, ptr, mem.len(), Owner::Lent)
    }

    /// Adds a mapping the source takes ownership of, as the region at `addr`. Dropping
    /// the source unmaps it.
    ///
    /// An anonymous private mapping (`MmapOptions::map_anon`) can be written by nobody
    /// once the source has it: its pages are given to the kernel and may leave the crate
    /// by reference, and pages already in pipes keep their contents after the unmap. A
    /// file or shared mapping can still be written by others (another handle of the file,
    /// another process), so a capture copies its pages. The kind is read from
    /// `/proc/self/maps`; when that cannot be read the mapping counts as shared.
    ///
    /// # Errors
    /// [`SourceError`] when the region breaks a rule of the [module docs](self).
    pub fn with_mmap(self, addr: u64, map: Mmap) -> Result<Self, SourceError> {
        let ptr = NonNull::from(&map[..]).cast::<u8>();
        let len = map.len();
        let owner = if private_anonymous(ptr.as_ptr() as usize, len) {
            Owner::Sealed(map)
        } else {
            Owner::Shared(map)
        };
        self.insert(addr, ptr, len, owner)
    }

    /// Adds `len` bytes of memory at `ptr`, known only by pointer (a VMM's guest RAM), as
    /// the region at `addr`. Its pages leave the crate as copies, as borrowed memory's do.
    ///
    /// A capture hands the memory to the kernel by address, making no reference to it, so
    /// memory that is unmapped anyway makes `vmsplice` fail with `EFAULT`, reported as
    /// [`CaptureError::Kernel`](crate::CaptureError::Kernel) naming the page. The copying
    /// path (taken when the kernel refuses `vmsplice`), the dump from memory and
    /// [`get`](Self::get) do read through references, which is why the memory must stay
    /// mapped.
    ///
    /// # Errors
    /// [`SourceError`] when the region breaks a rule of the [module docs](self).
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

    /// Adds `len` bytes of memory at `ptr` that others may write at any time (a guest's
    /// RAM while it runs, pages other threads keep changing), as the region at `addr`.
    ///
    /// The crate never makes a reference to this memory: captures copy it into pipes with
    /// `write(2)` (never `vmsplice`: references would show later writes to whoever reads
    /// the pipe), dumps from memory write it with `write`/`pwrite` from its address, and a
    /// callback gets a volatile copy; [`get`](Self::get) returns `None` for it. Each page
    /// is read once, as it is at that moment: the snapshot is consistent only if the
    /// writers are stopped, or the pages write-protected, while they are read.
    ///
    /// # Errors
    /// [`SourceError`] when the region breaks a rule of the [module docs](self).
    ///
    /// # Safety
    /// For all of `'m`:
    /// - the `len` bytes at `ptr` stay mapped and readable (unmapped memory gives an
    ///   `EFAULT` error from the kernel, but a volatile copy for a callback would fault);
    /// - no Rust code holds a reference to them that assumes they do not change (they are
    ///   memory shared with others, as vm-memory's `VolatileSlice` describes it).
    pub unsafe fn with_volatile(
        self,
        addr: u64,
        ptr: NonNull<u8>,
        len: usize,
    ) -> Result<Self, SourceError> {
        self.insert(addr, ptr, len, Owner::Volatile)
    }

    fn insert(
        mut self,
        addr: u64,
        ptr: NonNull<u8>,
        len: usize,
        owner: Owner,
    ) -> Result<Self, SourceError> {
        let ps = self.page_size;
        if !(ptr.as_ptr() as usize).is_multiple_of(ps) {
            return Err(SourceError::UnalignedMemory {
                addr,
                ptr: ptr.as_ptr() as usize,
            });
        }
        let range = PageRange::of_bytes(addr, len as u64, ps).map_err(|e| match e {
            RangeError::Unaligned { addr: a, .. } if a == addr => {
                SourceError::UnalignedAddr { addr }
            }
            RangeError::Unaligned { .. } => SourceError::PartialPage { addr, len },
            _ => SourceError::Overflow { addr },
        })?;
        if range.is_empty() {
            return Err(SourceError::Empty { addr });
        }
        let end = range.end();
        let start = ptr.as_ptr() as usize;
        let mem_end = start
            .checked_add(len)
            .ok_or(SourceError::Overflow { addr })?;
        for r in &self.regions {
            let rs = r.ptr.as_ptr() as usize;
            let addr_overlap = addr < r.addr + r.len as u64 && r.addr < end;
            let mem_overlap = start < rs + r.len && rs < mem_end;
            if addr_overlap || mem_overlap {
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
                owner,
            },
        );
        Ok(self)
    }

    /// Whether every region is owned memory nobody can write any more, so that pages of
    /// this source may leave the crate by reference.
    pub fn is_sealed(&self) -> bool {
        self.regions.iter().all(|r| r.hold() == Hold::Sealed)
    }

    /// The memory of `pages` pages from page pipe address `addr`, when one region covers
    /// them all and it is not volatile memory. (For a raw region this makes a reference
    /// to the memory, under the contract of [`with_raw`](Self::with_raw).)
    pub fn get(&self, addr: u64, pages: u64) -> Option<&[u8]> {
        let len = usize::try_from(pages).ok()?.checked_mul(self.page_size)?;
        let i = self
            .regions
            .partition_point(|r| r.addr <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        if r.hold() == Hold::Volatile {
            return None;
        }
        let off = usize::try_from(addr - r.addr).ok()?;
        if off.checked_add(len)? > r.len {
            return None;
        }
        // SAFETY:
        // - `off + len <= r.len` (checked above), so the range lies in the region;
        // - the region is readable and unmodified for 'm, which outlives `&self` (by the
        //   borrow, by ownership, or by the `with_raw` contract);
        // - any byte is a valid `u8`.
        Some(unsafe { std::slice::from_raw_parts(r.ptr.as_ptr().add(off), len) })
    }

    /// The memory of `pages` pages from `addr`, one piece per region they cross (for runs
    /// that span adjacent regions), appended to `out`; the first address not covered by
    /// any region when they are not all covered. No reference to the memory is made.
    pub(crate) fn iovs<'s>(&'s self, addr: u64, pages: u64, out: &mut Iovs<'s>) -> Result<(), u64> {
        let Ok(range) = PageRange::new(addr, pages, self.page_size) else {
            return Err(addr);
        };
        let end = range.end();
        let mut at = addr;
        let mut i = self.regions.partition_point(|r| r.addr <= at);
        while at < end {
            let r = match i.checked_sub(1).map(|j| &self.regions[j]) {
                Some(r) if at < r.addr + r.len as u64 => r,
                _ => match self.regions.get(i) {
                    Some(r) if r.addr == at => {
                        i += 1;
                        r
                    }
                    _ => return Err(at),
                },
            };
            let off = (at - r.addr) as usize;
            let take = (r.len - off).min((end - at) as usize);
            out.pieces.push(Piece {
                iov: RawIov {
                    base: r.ptr.as_ptr().wrapping_add(off),
                    len: take,
                },
                hold: r.hold(),
            });
            at += take as u64;
        }
        Ok(())
    }
}

/// One piece of a source's memory: within one region.
#[derive(Debug, Clone, Copy)]
struct Piece {
    iov: RawIov,
    hold: Hold,
}

/// Iovecs of a [`Source`]'s memory, made only by [`Source::iovs`] for pages it covers:
/// each lies within one region, whose memory stays mapped, readable and unmodified while
/// the borrow `'s` of the source lasts. That is what makes the functions below, which
/// read that memory or hand it to the kernel, sound.
#[derive(Debug)]
pub(crate) struct Iovs<'s> {
    pieces: Vec<Piece>,
    _source: PhantomData<&'s ()>,
}

impl<'s> Iovs<'s> {
    pub(crate) fn new() -> Self {
        Self {
            pieces: Vec::new(),
            _source: PhantomData,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.pieces.clear();
    }

    /// Pieces so far.
    pub(crate) fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Bytes of pieces `range`.
    pub(crate) fn bytes(&self, range: std::ops::Range<usize>) -> usize {
        self.pieces[range].iter().map(|p| p.iov.len).sum()
    }

    /// How piece `i` goes into a pipe.
    pub(crate) fn hold(&self, i: usize) -> Hold {
        self.pieces[i].hold
    }

    /// The memory of pieces `range`, as chunks: slices, but for volatile memory, which
    /// only the kernel or a volatile copy reads.
    pub(crate) fn chunks(&self, range: std::ops::Range<usize>) -> Vec<Chunk<'s>> {
        self.pieces[range]
            .iter()
            .map(|p| {
                if p.hold == Hold::Volatile {
                    return Chunk(ChunkKind::Raw(p.iov, PhantomData));
                }
                // SAFETY:
                // - `p.iov` was made by `Source::iovs`, so it lies within one region;
                // - that region is not volatile (checked above), so it is readable and
                //   unmodified while the borrow 's of the source lasts (the source's
                //   rules), and the slice lives no longer;
                // - any byte is a valid `u8`.
                Chunk::bytes(unsafe { std::slice::from_raw_parts(p.iov.base, p.iov.len) })
            })
            .collect()
    }

    /// `vmsplice` of pieces `range`, after their first `skip` bytes, into `pipe` with
    /// `SPLICE_F_NONBLOCK`, and `SPLICE_F_GIFT` if `gift` (honoured only when every piece
    /// is [`Hold::Sealed`]). Returns the bytes moved.
    pub(crate) fn vmsplice(
        &self,
        pipe: &page_pipe_sys::Pipe,
        range: std::ops::Range<usize>,
        skip: usize,
        gift: bool,
    ) -> Result<usize, Partial> {
        let gift = gift
            && self.pieces[range.clone()]
                .iter()
                .all(|p| p.hold == Hold::Sealed);
        let mut flags = SpliceFlags::NONBLOCK;
        if gift {
            flags |= SpliceFlags::GIFT;
        }
        let iovs = after(&self.pieces[range], skip);
        // SAFETY:
        // - `pipe` was made by `page_pipe_sys::pipe`, so `pipe.write` is a pipe's write
        //   end and the kernel only reads the memory;
        // - the iovecs lie within regions of the source, readable while 's lasts (a
        //   region unmapped anyway gives EFAULT, not undefined behaviour);
        // - with GIFT, every piece is sealed memory: whole, aligned pages that nobody can
        //   modify any more.
        unsafe { page_pipe_sys::vmsplice_raw(&pipe.write, &iovs, flags) }
    }

    /// Writes pieces `range`, after their first `skip` bytes, into `fd` with `write(2)`:
    /// the fd gets copies. Returns the bytes moved.
    pub(crate) fn write(
        &self,
        fd: BorrowedFd<'_>,
        range: std::ops::Range<usize>,
        skip: usize,
    ) -> Result<usize, Partial> {
        let mut done = 0;
        for iov in after(&self.pieces[range], skip) {
            // The kernel reads the memory (a copy into `fd`): no reference to it is made,
            // so this serves volatile memory as well.
            page_pipe_sys::write_raw_exact(fd, iov, None).map_err(|p| Partial {
                done: done + p.done,
                stopped: p.stopped,
            })?;
            done += iov.len;
        }
        Ok(done)
    }
}

/// Bytes of pages on their way to a sink: memory the crate may read as a slice, or memory
/// that others may write, which only the kernel (`write`/`pwrite` from its address) or a
/// volatile copy reads. Only a [`Source`] (through [`Iovs`]) or a slice makes one, so the
/// address of a raw chunk is always within a region that stays mapped while the chunk
/// lives (`'a`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a>(ChunkKind<'a>);

#[derive(Debug, Clone, Copy)]
enum ChunkKind<'a> {
    Bytes(&'a [u8]),
    Raw(RawIov, PhantomData<&'a ()>),
}

impl<'a> Chunk<'a> {
    /// A chunk of bytes nobody changes while the slice lives.
    pub(crate) fn bytes(b: &'a [u8]) -> Self {
        Chunk(ChunkKind::Bytes(b))
    }

    /// A chunk of `iov.len` bytes at `iov.base`, which others may write meanwhile: only
    /// the kernel or a volatile copy reads it.
    ///
    /// # Safety
    /// - the bytes stay mapped and readable while `'a` lasts;
    /// - no Rust code holds a reference to them that assumes they do not change.
    pub(crate) unsafe fn raw(iov: RawIov) -> Self {
        Chunk(ChunkKind::Raw(iov, PhantomData))
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        match self.0 {
            ChunkKind::Bytes(b) => b.len(),
            ChunkKind::Raw(r, _) => r.len,
        }
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes as a slice, when nobody can change them.
    pub(crate) fn as_slice(&self) -> Option<&'a [u8]> {
        match self.0 {
            ChunkKind::Bytes(b) => Some(b),
            ChunkKind::Raw(..) => None,
        }
    }

    /// Writes the chunk to `fd` (at `offset`, when given) with `write`/`pwrite`: the
    /// kernel reads the memory.
    pub(crate) fn write_to(&self, fd: BorrowedFd<'_>, offset: Option<u64>) -> Result<(), Partial> {
        match (self.0, offset) {
            (ChunkKind::Bytes(b), None) => page_pipe_sys::write_exact(fd, b),
            (ChunkKind::Bytes(b), Some(off)) => {
                page_pipe_sys::write_raw_exact(fd, RawIov::of(b), Some(off))
            }
            (ChunkKind::Raw(r, _), off) => page_pipe_sys::write_raw_exact(fd, r, off),
        }
    }

    /// Sends the chunk into the socket `fd` with `MSG_NOSIGNAL` (and `MSG_MORE` if `more`):
    /// the kernel reads the memory.
    pub(crate) fn send_to(&self, fd: BorrowedFd<'_>, more: bool) -> Result<(), Partial> {
        match self.0 {
            ChunkKind::Bytes(b) => page_pipe_sys::send_all(fd, b, more),
            ChunkKind::Raw(r, _) => page_pipe_sys::send_raw_exact(fd, r, more),
        }
    }

    /// Copies the chunk into `dst`, which must be as long: a raw chunk with volatile loads.
    pub(crate) fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len(),
            "a chunk copies into a buffer of its length"
        );
        match self.0 {
            ChunkKind::Bytes(b) => dst.copy_from_slice(b),
            // SAFETY:
            // - `r` was made by `Iovs::chunks` from a region of a source, which stays
            //   mapped and readable while `'a` lasts (the source's rules; `'a` is the
            //   borrow of the source);
            // - it is `dst.len()` bytes long (asserted above);
            // - `dst` is ours, so it does not overlap the source's memory, which the crate
            //   never lends out mutably.
            ChunkKind::Raw(r, _) => unsafe { page_pipe_sys::copy_from_raw(dst, r.base) },
        }
    }
}

/// The iovecs of `pieces` after their first `skip` bytes.
fn after(pieces: &[Piece], mut skip: usize) -> Vec<RawIov> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        if skip >= p.iov.len {
            skip -= p.iov.len;
            continue;
        }
        out.push(RawIov {
            base: p.iov.base.wrapping_add(skip),
            len: p.iov.len - skip,
        });
        skip = 0;
    }
    out
}

/// Whether `len` bytes at `start` are all in private anonymous mappings, by
/// `/proc/self/maps` (private: `p` in the permissions; anonymous: inode 0). Anything
/// unreadable or not covered counts as not.
fn private_anonymous(start: usize, len: usize) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let end = start.saturating_add(len);
    let mut at = start;
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            continue;
        };
        if hi <= at || lo > at {
            continue;
        }
        if !perms.ends_with('p') || inode != "0" {
            return false;
        }
        at = hi;
        if at >= end {
            return true;
        }
    }
    false
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
    fn an_empty_region_is_refused_and_cannot_hide_another() {
        let m = anon(2);
        let p = ps() as u64;
        // Before the fix an empty region at the address of a real one hid it from
        // lookups.
        let s = Source::new().with_slice(8 * p, &m[..]).unwrap();
        assert_eq!(
            s.with_slice(8 * p, &m[..0]).unwrap_err(),
            SourceError::Empty { addr: 8 * p }
        );
        let s = Source::new().with_slice(8 * p, &m[..]).unwrap();
        let mut out = Iovs::new();
        s.iovs(8 * p, 2, &mut out).unwrap();
        assert_eq!(out.len(), 1);
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
        let mut out = Iovs::new();
        s.iovs(9 * p, 3, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        let chunks = out.chunks(0..2);
        let slices: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice().unwrap()).collect();
        assert_eq!(
            (slices[0].as_ptr(), slices[0].len()),
            (a[ps()..].as_ptr(), ps())
        );
        assert_eq!(
            (slices[1].as_ptr(), slices[1].len()),
            (b.as_ptr(), 2 * ps())
        );
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

    #[test]
    fn anonymous_private_maps_are_sealed_and_file_maps_are_not() {
        let m = anon(2).make_read_only().unwrap();
        assert!(private_anonymous(m.as_ptr() as usize, m.len()));
        let s = Source::new().with_mmap(0, m).unwrap();
        assert!(s.is_sealed());
        let path = std::env::temp_dir().join(format!("pp-source-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 2 * ps()]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: the file is this test's own and nobody changes it while mapped.
        let fm = unsafe { Mmap::map(&f) }.unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!private_anonymous(fm.as_ptr() as usize, fm.len()));
        let s = Source::new().with_mmap(0, fm).unwrap();
        assert!(!s.is_sealed());
        let mine = anon(1);
        assert!(!Source::new().with_slice(0, &mine[..]).unwrap().is_sealed());
    }
}
