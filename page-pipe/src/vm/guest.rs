//! Where the promise about guest memory is made: a [`Source`] from a `GuestMemoryMmap`'s
//! regions, and reads from a file or pipe into a `VolatileSlice`.
//!
//! This module opts in to `unsafe` code (the crate denies it elsewhere) for two things:
//!
//! - [`Source::with_guest_memory`] hands each region to
//!   [`Source::with_volatile`], whose contract is: the memory stays mapped and readable
//!   for `'m`, and no Rust code holds a reference to it that assumes it does not change.
//!   vm-memory keeps the first while the region is borrowed (a `GuestRegionMmap` owns its
//!   mapping through an `Arc<MmapRegion>` and unmaps it only when dropped; a mapping made
//!   elsewhere comes in through `MmapRegion::build_raw`, whose `unsafe` contract makes the
//!   same promise), and the second by design: it lends guest memory out only as
//!   `VolatileSlice`s and raw pointers, which its own safe `get_slice` relies on. The
//!   source borrows the guest memory for `'m`, so no region can be dropped while it lives.
//!   What vm-memory does not promise (a pointer that is not null, a mapping that allows
//!   reading, page alignment, regions that do not overlap) is checked here first
//!   ([`check_region`](super::check_region)) and again by the source.
//! - [`FdReader`] lets the kernel write guest memory: `read(2)`/`pread(2)` into the
//!   pointer of a `VolatileSlice`'s guard, as vm-memory's own `ReadVolatile` for `File`
//!   does, and marks the slice's dirty bitmap as that does. A `VolatileSlice` is valid for
//!   writes of its length for its lifetime (the contract of its `unsafe` constructors).

#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{
    GuestMemoryBackend, GuestRegionMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use super::{Access, VmError, check_region};
use crate::source::Source;

impl<'m> Source<'m> {
    /// Adds every region of the guest memory `mem` at its guest-physical address, as
    /// memory others may write at any time (the guest, device threads): see
    /// [`with_volatile`](Self::with_volatile) for how its pages are read (copies and system
    /// calls, never a `&[u8]`), and the [`vm`](crate::vm) module for what vm-memory
    /// promises and what is checked. The source borrows `mem` for `'m`, so the mappings
    /// cannot be dropped while it lives.
    ///
    /// A snapshot of this source is consistent only while the vCPUs and the device threads
    /// that write guest memory are paused.
    ///
    /// ```
    /// use page_pipe::Source;
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    /// let ps = page_pipe::page_size();
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[
    ///     (GuestAddress(0), 16 * ps),
    ///     (GuestAddress(64 * ps as u64), 16 * ps),
    /// ])?;
    /// let source = Source::new().with_guest_memory(&mem)?;
    /// assert!(!source.is_sealed());
    /// // Volatile memory is never lent out as a slice.
    /// assert!(source.get(0, 1).is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`VmError`] naming the region that breaks a rule of the [`vm`](crate::vm) module
    /// (unaligned, empty, overlapping, without a readable host mapping), or that the source
    /// refuses ([`VmError::Source`]: it overlaps a region added before).
    pub fn with_guest_memory<M, B>(mut self, mem: &'m M) -> Result<Self, VmError>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
        B: Bitmap,
    {
        let page_size = self.page_size();
        // Checked here first for the promises vm-memory does not make; overlaps with any
        // region of the source are checked by the source itself.
        super::Layout::of(mem, Some(Access::Read))?;
        for r in mem.iter() {
            // Each region is checked again where its pointer is taken: a guest memory is
            // a safe trait, whose answers are not trusted to repeat.
            let info = check_region(r, page_size, Some(Access::Read))?;
            let ptr = NonNull::new(r.as_ptr()).ok_or(VmError::NoHostAddress { addr: info.addr })?;
            let len = r.size();
            // SAFETY:
            // - `ptr..ptr + len` is the mapping of `r` (`as_ptr` and `size` of its
            //   `MmapRegion`, checked above to agree with `get_host_address` and not to be
            //   null), and `r` is borrowed for 'm through `mem`: a `GuestRegionMmap` keeps
            //   its mapping mapped while it lives (vm-memory's invariant; `build_raw`'s
            //   contract for mappings made elsewhere);
            // - the mapping allows reading (its protection, checked above);
            // - vm-memory lends this memory out only as volatile slices and raw pointers,
            //   never as references (the invariant its own `get_slice` relies on), so no
            //   Rust reference assumes it unchanged.
            self = unsafe { self.with_volatile(info.addr, ptr, len) }.map_err(|error| {
                VmError::Source {
                    addr: info.addr,
                    error,
                }
            })?;
        }
        Ok(self)
    }
}

/// Reads from a file (at an offset that moves on, as `pread` calls) or a pipe or socket
/// (at its position) into guest memory, as vm-memory's `ReadVolatile`: each call fills
/// the whole slice unless the source ends or fails first.
#[derive(Debug)]
pub(crate) struct FdReader<'f> {
    fd: BorrowedFd<'f>,
    /// The file offset of the next byte, for positional reads.
    offset: Option<u64>,
}

impl<'f> FdReader<'f> {
    /// Positional reads of `fd` from `offset` on.
    pub(crate) fn at(fd: BorrowedFd<'f>, offset: u64) -> Self {
        Self {
            fd,
            offset: Some(offset),
        }
    }

    /// Reads of `fd` at its position (a pipe, a socket).
    pub(crate) fn stream(fd: BorrowedFd<'f>) -> Self {
        Self { fd, offset: None }
    }

    /// The file offset of the next byte to read, for positional reads.
    pub(crate) fn offset(&self) -> Option<u64> {
        self.offset
    }
}

impl ReadVolatile for FdReader<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        let r = {
            // The guard keeps the memory mapped for the call (under Xen it maps it).
            let guard = buf.ptr_guard_mut();
            // SAFETY:
            // - `guard.as_ptr()` is valid for writes of `len` bytes while `guard` lives (the
            //   contract of `VolatileSlice`'s constructors, which vm-memory's own reader
            //   of files relies on); the kernel writes only there;
            // - it is guest memory, which is only ever accessed volatilely or by system
            //   calls: no Rust reference assumes it unchanged.
            unsafe { page_pipe_sys::read_raw_exact(self.fd, guard.as_ptr(), len, self.offset) }
        };
        let done = match r {
            Ok(()) => len,
            Err(p) => p.done,
        };
        if let Some(off) = &mut self.offset {
            *off += done as u64;
        }
        match r {
            Ok(()) => {
                buf.bitmap().mark_dirty(0, len);
                Ok(len)
            }
            // The source ended: what was read, and 0 from the next call.
            Err(p) if p.errno().is_none() => {
                buf.bitmap().mark_dirty(0, p.done);
                Ok(p.done)
            }
            Err(p) => {
                // As vm-memory does after a failed read: whatever was written is dirty.
                buf.bitmap().mark_dirty(0, len);
                Err(VolatileMemoryError::IOError(p.into()))
            }
        }
    }
}

/// Prefaults the whole pages of `slice` for writing: `madvise(MADV_POPULATE_WRITE)`,
/// which faults each page in as a write would without changing a byte. Returns whether
/// the kernel did (false before Linux 5.14, or for memory it cannot populate; the reads
/// then fault the pages in themselves).
pub(crate) fn prefault<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> bool {
    let ps = page_pipe_sys::page_size().get();
    // The guard keeps the memory mapped for the call (under Xen it maps it).
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    let skip = ptr.align_offset(ps);
    if skip >= slice.len() {
        return true;
    }
    let whole = (slice.len() - skip) / ps * ps;
    if whole == 0 {
        return true;
    }
    // SAFETY:
    // - `ptr + skip .. + whole` is whole, page-aligned pages inside the slice, which is
    //   mapped for its length while `guard` lives (the contract of `VolatileSlice`'s
    //   constructors);
    // - MADV_POPULATE_WRITE changes no byte and no mapping, only fills page tables as a
    //   write fault would (the kernel's documented behaviour), so nothing that reads or
    //   writes the memory meanwhile, volatilely or by system calls, sees a difference.
    let r = unsafe {
        rustix::mm::madvise(
            ptr.add(skip).cast::<std::ffi::c_void>(),
            whole,
            rustix::mm::Advice::LinuxPopulateWrite,
        )
    };
    r.is_ok()
}
