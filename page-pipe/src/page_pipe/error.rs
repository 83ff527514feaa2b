//! Why an add or a release failed.

use std::fmt;

use page_pipe_sys::Errno;

use super::BufId;
use crate::addr::RangeError;

/// Why an add did not take all its pages.
///
/// Address errors leave the page pipe unchanged. The others can stop a bulk add half way:
/// `added` pages went in (and stay), the rest did not, starting at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddError {
    /// `addr` is not a multiple of the page size.
    Unaligned {
        /// The address.
        addr: u64,
        /// The page size.
        page_size: usize,
    },
    /// `addr` lies below the end of the last page or hole added.
    OutOfOrder {
        /// The address.
        addr: u64,
        /// The lowest address the next add may start at.
        min: u64,
    },
    /// `pages` pages from `addr` pass the end of the address space.
    Overflow {
        /// The address.
        addr: u64,
        /// The pages asked for.
        pages: u64,
    },
    /// Recording the page at `addr` needs a new run and all `budget` runs are used.
    IovBudget {
        /// The first page not added.
        addr: u64,
        /// The iov budget.
        budget: usize,
        /// Pages of this call that went in.
        added: u64,
    },
    /// The kernel refused to make a pipe (`EMFILE`, `ENFILE`, ...).
    MakePipe {
        /// The first page not added.
        addr: u64,
        /// The refusal.
        errno: Errno,
        /// Pages of this call that went in.
        added: u64,
    },
    /// A new pipe got less than a new pipe should (`capacity` pages instead of
    /// `expected`): this user is past `/proc/sys/fs/pipe-user-pages-soft`, and going on
    /// would crawl through tiny pipes that cannot grow.
    PipeLimit {
        /// The first page not added.
        addr: u64,
        /// Capacity of the new pipe, in pages.
        capacity: u64,
        /// Capacity a new pipe has below the limit.
        expected: u64,
        /// Pages of this call that went in.
        added: u64,
    },
}

impl AddError {
    /// Pages of the failed call that went in before it stopped.
    pub fn added(&self) -> u64 {
        match self {
            AddError::Unaligned { .. }
            | AddError::OutOfOrder { .. }
            | AddError::Overflow { .. } => 0,
            AddError::IovBudget { added, .. }
            | AddError::MakePipe { added, .. }
            | AddError::PipeLimit { added, .. } => *added,
        }
    }

    /// The address the error is about: the first page not added.
    pub fn addr(&self) -> u64 {
        match self {
            AddError::Unaligned { addr, .. }
            | AddError::OutOfOrder { addr, .. }
            | AddError::Overflow { addr, .. }
            | AddError::IovBudget { addr, .. }
            | AddError::MakePipe { addr, .. }
            | AddError::PipeLimit { addr, .. } => *addr,
        }
    }
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddError::Unaligned { addr, page_size } => {
                write!(
                    f,
                    "address {addr:#x} is not aligned to the page size ({page_size})"
                )
            }
            AddError::OutOfOrder { addr, min } => write!(
                f,
                "address {addr:#x} is out of order: addresses must ascend, the next may start at {min:#x}"
            ),
            AddError::Overflow { addr, pages } => {
                write!(
                    f,
                    "{pages} pages from {addr:#x} pass the end of the address space"
                )
            }
            AddError::IovBudget {
                addr,
                budget,
                added,
            } => write!(
                f,
                "page {addr:#x} needs a new run but all {budget} runs of the iov budget are used ({added} pages of this call went in)"
            ),
            AddError::MakePipe { addr, errno, added } => {
                write!(f, "cannot make a pipe for page {addr:#x}: {errno}")?;
                if matches!(*errno, Errno::MFILE | Errno::NFILE) {
                    f.write_str(
                        " (out of file descriptors, see RLIMIT_NOFILE and pipe-user-pages-hard; chunk mode needs at most 8 pipes)",
                    )?;
                }
                write!(f, " ({added} pages of this call went in)")
            }
            AddError::PipeLimit {
                addr,
                capacity,
                expected,
                added,
            } => write!(
                f,
                "a new pipe for page {addr:#x} got {capacity} pages instead of {expected}: this user is past /proc/sys/fs/pipe-user-pages-soft; \
                 close pipes or use chunk mode (PagePipe::builder().chunk_mode()), which needs at most 8 pipes ({added} pages of this call went in)"
            ),
        }
    }
}

impl std::error::Error for AddError {}

impl From<RangeError> for AddError {
    fn from(e: RangeError) -> Self {
        match e {
            RangeError::Unaligned { addr, page_size } => AddError::Unaligned { addr, page_size },
            RangeError::Overflow { addr, pages } => AddError::Overflow { addr, pages },
        }
    }
}

/// Why [`release_buf`](crate::PagePipe::release_buf) refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownBuf(pub BufId);

impl fmt::Display for UnknownBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "buf {} of epoch {} is not in this page pipe (released, or from before a re-init)",
            self.0.index, self.0.epoch
        )
    }
}

impl std::error::Error for UnknownBuf {}

/// Why making a pipe failed, before it is tied to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PipeFail {
    Make(Errno),
    Tiny { capacity: u64, expected: u64 },
}

impl PipeFail {
    pub(crate) fn at(self, addr: u64, added: u64) -> AddError {
        match self {
            PipeFail::Make(errno) => AddError::MakePipe { addr, errno, added },
            PipeFail::Tiny { capacity, expected } => AddError::PipeLimit {
                addr,
                capacity,
                expected,
                added,
            },
        }
    }
}
