//! [`MemoryRegion`]: the memory a migration receiver writes pages into.
//!
//! This module opts in to `unsafe` code for one promise: **the kernel writes received
//! pages into the region only at addresses inside it.** Every write goes through
//! [`MemoryRegion::read_from`], which checks the run against the region first (the page
//! addresses of a stream are the peer's, untrusted), then lets `recv(2)` fill the memory
//! straight from the socket: no reference to the memory is made, so memory others could
//! observe is never seen as a `&mut [u8]`.
//!
//! The memory itself comes in two ways:
//! - a mapping the region owns ([`MemoryRegion::from_mmap`], safe): nobody else can
//!   reach it while the region has it, and it comes back with
//!   [`into_mmap`](MemoryRegion::into_mmap);
//! - raw memory ([`MemoryRegion::from_raw`], `unsafe`): a VMM's guest RAM, say, whose
//!   owner promises that it stays mapped and writable, and that nobody else uses it while
//!   the receiver writes it.
#![allow(unsafe_code)]

use std::fmt;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use memmap2::MmapMut;
use page_pipe_sys::Partial;

use crate::addr::{PageRange, RangeError};
use crate::source::SourceError;

/// A region of memory at a page-aligned address, to receive pages into: `len` bytes at
/// `ptr`, standing for the addresses `addr..addr + len` of the stream (the sender's
/// addresses: a guest-physical address, the address the memory had in the sender).
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::migrate::MemoryRegion;
/// let ps = page_pipe::page_size();
/// let region = MemoryRegion::from_mmap(0x4000_0000, MmapOptions::new().len(8 * ps).map_anon()?)?;
/// assert_eq!(region.first_outside(0x4000_0000, 8), None);
/// assert_eq!(region.first_outside(0x4000_0000 + 7 * ps as u64, 2), Some(0x4000_0000 + 8 * ps as u64));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MemoryRegion {
    addr: u64,
    ptr: NonNull<u8>,
    len: usize,
    page_size: usize,
    map: Option<MmapMut>,
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("owned", &self.map.is_some())
            .finish()
    }
}

// SAFETY:
// - an owned region is an `MmapMut`, which is `Send`;
// - a raw region comes with the `from_raw` contract, which includes writes from any
//   thread;
// - the region is written only through `&mut self`.
unsafe impl Send for MemoryRegion {}

impl MemoryRegion {
    /// A region that owns `map` (an anonymous mapping, or any mapping nobody else
    /// writes), standing for addresses `addr..addr + map.len()`.
    ///
    /// # Errors
    /// [`SourceError`] when `addr` is not page-aligned, the mapping is empty or not whole
    /// pages, or the range passes the end of the address space.
    pub fn from_mmap(addr: u64, mut map: MmapMut) -> Result<Self, SourceError> {
        let ptr = NonNull::from(&mut map[..]).cast::<u8>();
        let len = map.len();
        let mut r = Self::checked(addr, ptr, len)?;
        r.map = Some(map);
        Ok(r)
    }

    /// A region of `len` bytes of memory at `ptr`, known only by pointer, standing for
    /// addresses `addr..addr + len`.
    ///
    /// # Errors
    /// As [`from_mmap`](Self::from_mmap), and [`SourceError::UnalignedMemory`] when `ptr`
    /// is not page-aligned.
    ///
    /// # Safety
    /// While the region lives:
    /// - the `len` bytes at `ptr` stay mapped and writable (memory unmapped anyway gives
    ///   `EFAULT` errors, not undefined behaviour, but a mapping of something else put in
    ///   its place would be written);
    /// - nobody else reads or writes them while a receiver writes them (they hold no Rust
    ///   values: any bytes may be written there), and they may be written from any
    ///   thread.
    pub unsafe fn from_raw(addr: u64, ptr: NonNull<u8>, len: usize) -> Result<Self, SourceError> {
        Self::checked(addr, ptr, len)
    }

    fn checked(addr: u64, ptr: NonNull<u8>, len: usize) -> Result<Self, SourceError> {
        let page_size = page_pipe_sys::page_size().get();
        if !(ptr.as_ptr() as usize).is_multiple_of(page_size) {
            return Err(SourceError::UnalignedMemory {
                addr,
                ptr: ptr.as_ptr() as usize,
            });
        }
        let range = PageRange::of_bytes(addr, len as u64, page_size).map_err(|e| match e {
            RangeError::Unaligned { addr: a, .. } if a == addr => {
                SourceError::UnalignedAddr { addr }
            }
            RangeError::Unaligned { .. } => SourceError::PartialPage { addr, len },
            _ => SourceError::Overflow { addr },
        })?;
        if range.is_empty() {
            return Err(SourceError::Empty { addr });
        }
        Ok(Self {
            addr,
            ptr,
            len,
            page_size,
            map: None,
        })
    }

    /// The first address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes (never: regions are checked).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address just past the region.
    pub fn end(&self) -> u64 {
        self.addr + self.len as u64
    }

    /// The first page of `pages` pages from `vaddr` that is not in the region, or `None`
    /// when all are.
    pub fn first_outside(&self, vaddr: u64, pages: u64) -> Option<u64> {
        let len = pages.checked_mul(self.page_size as u64);
        let end = len.and_then(|l| vaddr.checked_add(l));
        match end {
            _ if vaddr < self.addr => Some(vaddr),
            Some(end) if end <= self.end() => None,
            _ => Some(self.end().max(vaddr)),
        }
    }

    /// The owned mapping, to read what was received (`None` for raw memory).
    pub fn mmap(&self) -> Option<&MmapMut> {
        self.map.as_ref()
    }

    /// The owned mapping back (`None` for raw memory).
    pub fn into_mmap(self) -> Option<MmapMut> {
        self.map
    }

    /// Receives exactly `len` bytes from the socket `fd` into the region at address
    /// `vaddr` (`recv` with `MSG_WAITALL`: few calls per payload), after checking that
    /// they lie in it and faulting their pages in (measured: into fresh memory 1.5-1.6x a
    /// `read_exact` loop, against 0.92-0.98x when `recv` faulted them page by page);
    /// `Err(None)` when they do not lie in it (nothing read), else what the receive did.
    pub(crate) fn read_from(
        &mut self,
        fd: BorrowedFd<'_>,
        vaddr: u64,
        len: usize,
    ) -> Result<(), Option<Partial>> {
        let inside = vaddr.checked_sub(self.addr).filter(|off| {
            off.checked_add(len as u64)
                .is_some_and(|e| e <= self.len as u64)
        });
        let Some(off) = inside else {
            return Err(None);
        };
        let dst = self.ptr.as_ptr().wrapping_add(off as usize);
        populate(dst, len);
        // SAFETY:
        // - `off..off + len` lies within the region's `len` bytes (checked above);
        // - those bytes are mapped and writable and nobody else uses them while the
        //   region lives: an owned mapping (`from_mmap`, held in `self.map`, reached
        //   only through `&mut self`) or the `from_raw` caller's promise;
        // - no Rust reference to them exists during the call (the region hands none out
        //   while `&mut self` is borrowed here; `mmap()` needs `&self`).
        unsafe { page_pipe_sys::recv_raw_exact(fd, dst, len) }.map_err(Some)
    }
}

/// Faults the whole pages of `len` bytes at `dst` in for writing
/// (`madvise(MADV_POPULATE_WRITE)`, which changes no byte), so that the receive that
/// follows copies into memory that is there instead of faulting page by page. A refusal
/// (before Linux 5.14) only leaves the faults to the receive.
fn populate(dst: *mut u8, len: usize) {
    let ps = page_pipe_sys::page_size().get();
    let skip = dst.align_offset(ps);
    let whole = len.saturating_sub(skip) / ps * ps;
    if whole == 0 {
        return;
    }
    // SAFETY:
    // - `dst + skip .. + whole` is whole pages inside the `len` bytes at `dst`, which the
    //   caller checked lie in the region (mapped and writable for its life);
    // - MADV_POPULATE_WRITE changes no byte and no mapping, only fills page tables as a
    //   write fault would (the kernel's documented behaviour).
    let _ = unsafe {
        rustix::mm::madvise(
            dst.wrapping_add(skip).cast::<std::ffi::c_void>(),
            whole,
            rustix::mm::Advice::LinuxPopulateWrite,
        )
    };
}
