//! Runs, holes and their flags.

use bitflags::bitflags;

bitflags! {
    /// Flags of a buf, given with each page added; a change of flags starts a new buf.
    ///
    /// ```
    /// use page_pipe::BufFlags;
    /// assert!(BufFlags::LAZY.contains(BufFlags::LAZY));
    /// assert_eq!(BufFlags::empty().bits(), 0);
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct BufFlags: u32 {
        /// The pages may be served on demand by a lazy-pages server instead of being
        /// written out (CRIU's `PPB_LAZY`).
        const LAZY = 1;
    }
}

bitflags! {
    /// Flags of a hole, a run of pages that is not captured.
    ///
    /// ```
    /// use page_pipe::HoleFlags;
    /// assert_eq!(HoleFlags::PARENT.bits(), 1);
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct HoleFlags: u32 {
        /// The pages are in the parent snapshot (CRIU's `PP_HOLE_PARENT`).
        const PARENT = 1;
    }
}

/// A run of contiguous pages: `pages` pages from the page-aligned address `vaddr`.
///
/// Runs are what a page pipe records for captured pages (CRIU keeps them as `struct
/// iovec`). A page pipe made with caller-provided storage
/// ([`Builder::iov_storage`](crate::Builder::iov_storage)) keeps its runs in a slice of
/// these, which [`Run::EMPTY`] fills.
///
/// ```
/// use page_pipe::Run;
/// let storage = [Run::EMPTY; 8];
/// assert_eq!(storage[0].pages(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct Run {
    pub(crate) vaddr: u64,
    pub(crate) pages: u64,
}

impl Run {
    /// A run of no pages, to fill storage with.
    pub const EMPTY: Run = Run { vaddr: 0, pages: 0 };

    pub(crate) fn new(vaddr: u64, pages: u64) -> Self {
        Self { vaddr, pages }
    }

    /// The address of the first page.
    pub fn vaddr(&self) -> u64 {
        self.vaddr
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The address just past the last page, for pages of `page_size` bytes.
    pub fn end(&self, page_size: usize) -> u64 {
        self.vaddr + self.pages * page_size as u64
    }
}

/// A hole: a run of pages that the page pipe does not capture, with its flags.
///
/// ```
/// use page_pipe::{Hole, HoleFlags};
/// # let h = Hole::new(0x3000, 2, HoleFlags::PARENT);
/// assert_eq!((h.vaddr(), h.pages(), h.flags()), (0x3000, 2, HoleFlags::PARENT));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hole {
    pub(crate) vaddr: u64,
    pub(crate) pages: u64,
    pub(crate) flags: HoleFlags,
}

impl Hole {
    /// A hole of `pages` pages from `vaddr`. Page pipes check addresses when holes are
    /// added; a `Hole` on its own is only a value.
    pub fn new(vaddr: u64, pages: u64, flags: HoleFlags) -> Self {
        Self {
            vaddr,
            pages,
            flags,
        }
    }

    /// The address of the first page.
    pub fn vaddr(&self) -> u64 {
        self.vaddr
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The hole's flags.
    pub fn flags(&self) -> HoleFlags {
        self.flags
    }

    /// The address just past the last page, for pages of `page_size` bytes.
    pub fn end(&self, page_size: usize) -> u64 {
        self.vaddr + self.pages * page_size as u64
    }
}
