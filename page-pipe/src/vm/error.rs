//! [`VmError`]: what went wrong with guest memory, naming the guest address.

use std::fmt;
use std::io;

use vm_memory::GuestMemoryError;

use crate::image::{ImageError, PagemapEntry};
use crate::source::SourceError;

/// What the crate needs of a region's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reading it (a snapshot): the mapping must allow `PROT_READ`.
    Read,
    /// Writing it (a restore, a receive): the mapping must allow `PROT_WRITE`.
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "reading",
            Access::Write => "writing",
        })
    }
}

/// What was being done with an image when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageOp {
    /// Planning which bytes come from where ([`Image::plan`](crate::image::Image::plan)).
    Plan,
    /// Reading pages from a pages file into guest memory.
    Read,
}

/// What went wrong with guest memory. Every variant names the guest-physical address at
/// fault; the cause, where there is one, is the [`source`](std::error::Error::source).
///
/// ```
/// use page_pipe::vm::VmError;
/// let e = VmError::OutsideMemory { addr: 0x8000_0000, pages: 16 };
/// assert_eq!(e.to_string(), "16 pages from guest address 0x80000000 are in no region of the guest memory");
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum VmError {
    /// A region's guest address or length is not a whole number of pages.
    Unaligned {
        /// The region's guest address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// The page size.
        page_size: usize,
    },
    /// A region has no pages.
    Empty {
        /// The region's guest address.
        addr: u64,
    },
    /// A region's host memory does not start on a page boundary.
    UnalignedHost {
        /// The region's guest address.
        addr: u64,
        /// The host address of its memory.
        host: usize,
    },
    /// Two regions overlap, in guest addresses or in host memory.
    Overlap {
        /// The guest address of one region.
        addr: u64,
        /// The guest address of the region it overlaps.
        other: u64,
    },
    /// A region has no host mapping to read or write by address (a Xen grant mapping,
    /// which vm-memory maps only for the duration of each access).
    NoHostAddress {
        /// The region's guest address.
        addr: u64,
    },
    /// A region's mapping does not allow what the operation needs (its `mmap`
    /// protection).
    Protection {
        /// The region's guest address.
        addr: u64,
        /// What was needed.
        needs: Access,
    },
    /// A [`Source`](crate::Source) refused a region.
    Source {
        /// The region's guest address.
        addr: u64,
        /// Why.
        error: SourceError,
    },
    /// Pages at this guest address are in no region: they fall in a gap between regions or
    /// outside all of them. Nothing was written.
    OutsideMemory {
        /// The first such page.
        addr: u64,
        /// How many pages from there are in no region (up to the next region or the end
        /// of what was asked).
        pages: u64,
    },
    /// An entry is not page-aligned or passes the end of the address space.
    BadEntry {
        /// The entry.
        entry: PagemapEntry,
    },
    /// An entry came with a number of bytes other than its pages' (none for an entry
    /// whose pages are not here).
    Length {
        /// The entry.
        entry: PagemapEntry,
        /// The bytes that came with it.
        len: usize,
    },
    /// An image could not be planned or read.
    Image {
        /// What was being done.
        op: ImageOp,
        /// The error, which names the file.
        error: ImageError,
    },
    /// vm-memory refused an access to guest memory.
    Guest {
        /// The guest address of the access.
        addr: u64,
        /// The error.
        error: GuestMemoryError,
    },
    /// Reading an entry's pages from a stream into guest memory failed.
    Stream {
        /// The entry.
        entry: PagemapEntry,
        /// The error (`UnexpectedEof` when the stream ended first).
        error: io::Error,
    },
    /// A dirty log has fewer bits than the pages it is for.
    ShortLog {
        /// The guest address of its first page.
        addr: u64,
        /// The pages it is for.
        pages: u64,
        /// Its words.
        words: usize,
    },
    /// A region's `AtomicBitmap` does not cover the region, or no power-of-two page size
    /// gives it its number of bits.
    Bitmap {
        /// The region's guest address.
        addr: u64,
        /// The region's length in bytes.
        len: u64,
        /// The bytes the bitmap covers.
        bytes: usize,
        /// Its bits.
        bits: usize,
    },
    /// The guest memory has a region the dirty set was not made for (another layout).
    LayoutChanged {
        /// The region's guest address.
        addr: u64,
    },
    /// An image's pages are of another size than this machine's.
    PageSize {
        /// The image's page size.
        image: usize,
        /// This machine's.
        page_size: usize,
    },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Unaligned {
                addr,
                len,
                page_size,
            } => write!(
                f,
                "region at guest address {addr:#x} ({len:#x} bytes) is not whole {page_size}-byte pages"
            ),
            VmError::Empty { addr } => {
                write!(f, "region at guest address {addr:#x} has no pages")
            }
            VmError::UnalignedHost { addr, host } => write!(
                f,
                "memory of the region at guest address {addr:#x} (host {host:#x}) does not start on a page boundary"
            ),
            VmError::Overlap { addr, other } => write!(
                f,
                "region at guest address {addr:#x} overlaps the region at {other:#x}"
            ),
            VmError::NoHostAddress { addr } => write!(
                f,
                "region at guest address {addr:#x} has no host mapping to read or write by address"
            ),
            VmError::Protection { addr, needs } => write!(
                f,
                "region at guest address {addr:#x} is not mapped for {needs}"
            ),
            VmError::Source { addr, .. } => write!(
                f,
                "the source refused the region at guest address {addr:#x}"
            ),
            VmError::OutsideMemory { addr, pages } => write!(
                f,
                "{pages} pages from guest address {addr:#x} are in no region of the guest memory"
            ),
            VmError::BadEntry { entry } => write!(
                f,
                "entry {entry} is not page-aligned or passes the end of the address space"
            ),
            VmError::Length { entry, len } => {
                write!(f, "entry {entry} came with {len} bytes, not its pages'")
            }
            VmError::Image { op, .. } => f.write_str(match op {
                ImageOp::Plan => "cannot plan the restore from the image",
                ImageOp::Read => "cannot read the image's pages into guest memory",
            }),
            VmError::Guest { addr, .. } => {
                write!(f, "guest memory refused an access at {addr:#x}")
            }
            VmError::Stream { entry, .. } => write!(
                f,
                "cannot read the pages of entry {entry} from the stream into guest memory"
            ),
            VmError::ShortLog { addr, pages, words } => write!(
                f,
                "dirty log of {pages} pages from guest address {addr:#x} has only {words} words"
            ),
            VmError::Bitmap {
                addr,
                len,
                bytes,
                bits,
            } => write!(
                f,
                "dirty bitmap of the region at guest address {addr:#x} ({len:#x} bytes) covers {bytes:#x} bytes in {bits} bits: not the region in pages of a power-of-two size"
            ),
            VmError::LayoutChanged { addr } => write!(
                f,
                "region at guest address {addr:#x} is not one the dirty set was made for"
            ),
            VmError::PageSize { image, page_size } => write!(
                f,
                "the image has {image}-byte pages, this machine {page_size}-byte pages"
            ),
        }
    }
}

impl std::error::Error for VmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VmError::Source { error, .. } => Some(error),
            VmError::Image { error, .. } => Some(error),
            VmError::Guest { error, .. } => Some(error),
            VmError::Stream { error, .. } => Some(error),
            _ => None,
        }
    }
}
