//! Page-aligned ranges of addresses, checked once where they are made.
//!
//! A run, a hole, a region of a [`Source`](crate::Source), a pagemap entry and a restore
//! request all cover "`pages` pages from a page-aligned address". [`PageRange`] is that,
//! made only by [`PageRange::new`], which checks alignment and that the range ends
//! within the 64-bit address space; its arithmetic after that cannot overflow. (The
//! addresses are whatever space the snapshot records: a process's virtual addresses, a
//! guest's physical addresses, as vm-memory's `GuestAddress` would name them.)

use std::fmt;

/// Why a range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RangeError {
    /// The address is not a multiple of the page size.
    Unaligned {
        /// The address.
        addr: u64,
        /// The page size.
        page_size: usize,
    },
    /// `pages` pages from `addr` pass the end of the address space.
    Overflow {
        /// The address.
        addr: u64,
        /// The pages.
        pages: u64,
    },
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeError::Unaligned { addr, page_size } => write!(
                f,
                "address {addr:#x} is not aligned to the page size ({page_size})"
            ),
            RangeError::Overflow { addr, pages } => write!(
                f,
                "{pages} pages from {addr:#x} pass the end of the address space"
            ),
        }
    }
}

impl std::error::Error for RangeError {}

/// `pages` pages of `page_size` bytes from the page-aligned address `start`, ending at or
/// below 2^64.
///
/// ```
/// use page_pipe::{PageRange, RangeError};
/// let r = PageRange::new(0x10_0000, 4, 4096)?;
/// assert_eq!((r.start(), r.pages(), r.end(), r.bytes()), (0x10_0000, 4, 0x10_4000, 16384));
/// assert!(r.contains(0x10_3fff) && !r.contains(0x10_4000));
/// assert_eq!(
///     PageRange::new(0x10_0001, 1, 4096),
///     Err(RangeError::Unaligned { addr: 0x10_0001, page_size: 4096 })
/// );
/// assert!(matches!(PageRange::new(u64::MAX - 4095, 2, 4096), Err(RangeError::Overflow { .. })));
/// # Ok::<(), RangeError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    start: u64,
    pages: u64,
    /// `start + pages * page_size`, checked.
    end: u64,
}

impl PageRange {
    /// The range of `pages` pages from `start`.
    ///
    /// # Errors
    /// [`RangeError::Unaligned`] if `start` is not a multiple of `page_size` (a power of
    /// two); [`RangeError::Overflow`] if the range passes the end of the address space.
    #[inline]
    pub fn new(start: u64, pages: u64, page_size: usize) -> Result<Self, RangeError> {
        debug_assert!(page_size.is_power_of_two());
        if start & (page_size as u64 - 1) != 0 {
            return Err(RangeError::Unaligned {
                addr: start,
                page_size,
            });
        }
        let end = pages
            .checked_mul(page_size as u64)
            .and_then(|len| start.checked_add(len))
            .ok_or(RangeError::Overflow { addr: start, pages })?;
        Ok(Self { start, pages, end })
    }

    /// The range of whole pages in `len` bytes from `start`.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`RangeError::Unaligned`] naming `start + len` when `len`
    /// is not a whole number of pages.
    pub fn of_bytes(start: u64, len: u64, page_size: usize) -> Result<Self, RangeError> {
        if len & (page_size as u64 - 1) != 0 {
            return Err(RangeError::Unaligned {
                addr: start.wrapping_add(len),
                page_size,
            });
        }
        Self::new(start, len / page_size as u64, page_size)
    }

    /// The first address.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The address just past the last page.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The length in bytes.
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Whether `addr` is in the range.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &PageRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x}..{:#x} ({} pages)",
            self.start, self.end, self.pages
        )
    }
}
