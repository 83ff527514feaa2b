//! Why tracking could not start or go on.

use std::fmt;

use page_pipe_sys::{Errno, UffdFeatures};

/// How tracking was lost (synchronous mode; see the [module docs](super)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostBy {
    /// Pages were discarded (`MADV_DONTNEED`, `MADV_REMOVE`, `MADV_FREE`).
    Discard,
    /// The memory was unmapped.
    Unmap,
    /// The memory was moved (`mremap(2)`).
    Remap,
    /// Lifting a page's protection failed (the handler woke the writer anyway).
    Unprotect(Errno),
    /// The handler thread could not wait for or read events.
    Handler(Errno),
    /// The handler thread panicked (a bug: please report it).
    HandlerPanicked,
    /// An event the tracker did not ask for.
    Unexpected(u8),
    /// A background snapshot failed part way: the tracker was stopped with it, since the
    /// next incremental snapshot would have no whole parent.
    Snapshot,
}

/// Why tracking could not start or go on. Errors name the region by its snapshot address
/// and its host range.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackError {
    /// A region's snapshot address, host address or length is not a multiple of the page
    /// size (or of its granule), or is empty.
    Unaligned {
        /// Snapshot address.
        addr: u64,
        /// Host address.
        host: usize,
        /// Length in bytes.
        len: usize,
        /// The unit they must be multiples of.
        unit: usize,
    },
    /// Two regions overlap, in snapshot addresses or in memory.
    Overlap {
        /// One region's snapshot address.
        addr: u64,
        /// The other's.
        other: u64,
    },
    /// A region passes the end of the address space.
    Overflow {
        /// Snapshot address.
        addr: u64,
    },
    /// No userfaultfd could be made (`ENOSYS`: no userfaultfd in this kernel, or a seccomp
    /// filter).
    Open {
        /// The errno of `userfaultfd(2)`.
        errno: Errno,
    },
    /// A userfaultfd that sees kernel faults is refused to this process, and a
    /// user-mode-only one would not do (see [`Privilege`](super::Privilege)).
    Privilege {
        /// The errno of `userfaultfd(2)` (`EPERM`).
        syscall: Errno,
        /// The errno of `/dev/userfaultfd` (`EACCES`, `ENOENT`).
        device: Errno,
        /// `vm.unprivileged_userfaultfd`, if readable.
        unprivileged_userfaultfd: Option<u32>,
        /// Whether the tracking would have been synchronous (where user-mode-only faults
        /// make kernel writes fail).
        sync: bool,
    },
    /// The kernel lacks what tracking needs.
    Unsupported {
        /// What is missing.
        missing: &'static str,
        /// The userfaultfd features the kernel offers.
        offered: UffdFeatures,
    },
    /// `UFFDIO_REGISTER` refused a region.
    Register {
        /// Snapshot address.
        addr: u64,
        /// Host address.
        host: usize,
        /// Length in bytes.
        len: usize,
        /// The errno: `EINVAL` (memory that cannot be write-protected), `EBUSY`
        /// (registered with another userfaultfd), `EPERM`, `ENOMEM`.
        errno: Errno,
        /// The mappings there, from `/proc/self/maps`.
        mapping: String,
    },
    /// Write-protecting a region, or lifting a protection, failed.
    Protect {
        /// Snapshot address of the region.
        addr: u64,
        /// Host address of the range.
        host: usize,
        /// Length of the range.
        len: usize,
        /// The errno.
        errno: Errno,
    },
    /// `PAGEMAP_SCAN` (or a read of `/proc/self/pagemap`) failed (`EPERM`: part of the
    /// region is no longer registered with asynchronous write-protection, e.g. it was
    /// unmapped and mapped again).
    Scan {
        /// Snapshot address of the region.
        addr: u64,
        /// Host address where the scan was.
        host: usize,
        /// The errno; `None` when the kernel answered without an error but without
        /// progress either (nothing reported, nothing walked, or the end of
        /// `/proc/self/pagemap` inside the region).
        errno: Option<Errno>,
    },
    /// Tracking of part of the memory was lost (synchronous mode): take a full snapshot
    /// and start again.
    Lost {
        /// The host range's start.
        host: u64,
        /// Its end.
        end: u64,
        /// How.
        by: LostBy,
    },
    /// [`Tracker::mark_written`](super::Tracker::mark_written) named pages outside every region.
    NotTracked {
        /// The snapshot address.
        addr: u64,
        /// The pages.
        pages: u64,
    },
    /// A system call besides the tracking ones failed.
    System {
        /// What was being done.
        what: SystemOp,
        /// The errno.
        errno: Errno,
    },
}

/// What the tracker was doing when a [`TrackError::System`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SystemOp {
    /// Opening `/proc/self/pagemap`.
    OpenPagemap,
    /// Reading `/proc/self/smaps`.
    ReadSmaps,
    /// Asking `UFFDIO_API` what the kernel offers.
    AskApi,
    /// Asking `UFFDIO_API` for the features tracking needs.
    AskFeatures,
    /// Populating memory for reading (`MADV_POPULATE_READ`).
    PopulateRead,
    /// Making the handler thread's stop pipe.
    StopPipe,
    /// Starting the fault handler thread.
    SpawnHandler,
}

impl fmt::Display for SystemOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SystemOp::OpenPagemap => "open /proc/self/pagemap",
            SystemOp::ReadSmaps => "read /proc/self/smaps",
            SystemOp::AskApi => "ask UFFDIO_API",
            SystemOp::AskFeatures => "ask UFFDIO_API for the tracking features",
            SystemOp::PopulateRead => "populate memory for reading (MADV_POPULATE_READ)",
            SystemOp::StopPipe => "make the handler thread's stop pipe",
            SystemOp::SpawnHandler => "spawn the fault handler thread",
        })
    }
}

/// An errno as `EBUSY (Device or resource busy)`, for the errors' messages (this
/// module's and [`lazy`](crate::lazy)'s).
pub(crate) struct Name(pub(crate) Errno);

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            Errno::PERM => "EPERM",
            Errno::NOENT => "ENOENT",
            Errno::INTR => "EINTR",
            Errno::IO => "EIO",
            Errno::BADF => "EBADF",
            Errno::AGAIN => "EAGAIN",
            Errno::NOMEM => "ENOMEM",
            Errno::ACCESS => "EACCES",
            Errno::FAULT => "EFAULT",
            Errno::BUSY => "EBUSY",
            Errno::EXIST => "EEXIST",
            Errno::INVAL => "EINVAL",
            Errno::MFILE => "EMFILE",
            Errno::NFILE => "ENFILE",
            Errno::NOTTY => "ENOTTY",
            Errno::NOSYS => "ENOSYS",
            Errno::OPNOTSUPP => "EOPNOTSUPP",
            e => return write!(f, "errno {} ({e})", e.raw_os_error()),
        };
        let text = std::io::Error::from_raw_os_error(self.0.raw_os_error()).to_string();
        let text = text.split(" (os error").next().unwrap_or_default();
        write!(f, "{name} ({text})")
    }
}

/// The errno of an error from a system call (std makes those from the OS error, so the
/// fallback is never taken in practice).
pub(crate) fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

impl fmt::Display for TrackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackError::Unaligned {
                addr,
                host,
                len,
                unit,
            } => write!(
                f,
                "region {addr:#x} (host {host:#x}, {len} bytes): address, host address and length \
                 must be non-zero multiples of {unit} bytes"
            ),
            TrackError::Overlap { addr, other } => {
                write!(f, "region {addr:#x} overlaps region {other:#x}")
            }
            TrackError::Overflow { addr } => {
                write!(f, "region {addr:#x} passes the end of the address space")
            }
            TrackError::Open { errno } => write!(
                f,
                "cannot make a userfaultfd: {}{}",
                Name(*errno),
                if *errno == Errno::NOSYS {
                    " (the kernel has no userfaultfd, or a seccomp filter refuses it)"
                } else {
                    ""
                }
            ),
            TrackError::Privilege {
                syscall,
                device,
                unprivileged_userfaultfd,
                sync,
            } => {
                write!(
                    f,
                    "a userfaultfd that sees kernel faults is refused to this process: \
                     userfaultfd(2): {}",
                    Name(*syscall)
                )?;
                if let Some(v) = unprivileged_userfaultfd {
                    write!(
                        f,
                        " (vm.unprivileged_userfaultfd is {v}, and the process lacks CAP_SYS_PTRACE)"
                    )?;
                }
                write!(
                    f,
                    ", /dev/userfaultfd: {}. An unprivileged process only gets user-mode \
                     faults (UFFD_USER_MODE_ONLY), which are not told of the faults the kernel takes \
                     on its behalf (read(2) into the memory, KVM's writes for a guest)",
                    Name(*device)
                )?;
                if *sync {
                    write!(
                        f,
                        ": with synchronous write-protection those writes would fail with EFAULT. \
                         Track asynchronously (UFFD_FEATURE_WP_ASYNC, Linux 6.7, where the kernel \
                         resolves its own writes), run with CAP_SYS_PTRACE or access to \
                         /dev/userfaultfd, or accept Privilege::UserModeOnly"
                    )
                } else {
                    write!(
                        f,
                        "; with asynchronous write-protection the kernel resolves those writes \
                         itself and they are still seen: use Privilege::Auto"
                    )
                }
            }
            TrackError::Unsupported { missing, offered } => write!(
                f,
                "this kernel cannot track writes: {missing} (userfaultfd features offered: {:#x})",
                offered.bits()
            ),
            TrackError::Register {
                addr,
                host,
                len,
                errno,
                mapping,
            } => {
                write!(
                    f,
                    "cannot register region {addr:#x} (host {host:#x}-{:#x}) with userfaultfd: \
                     {}: ",
                    host + len,
                    Name(*errno)
                )?;
                match *errno {
                    Errno::BUSY => f.write_str(
                        "the memory is already registered with another userfaultfd (a range \
                         belongs to one at a time: another tracker, a background snapshot or a \
                         lazy restore holds it)",
                    )?,
                    Errno::INVAL => f.write_str(
                        "this memory cannot be write-protected by userfaultfd (synchronous \
                         write-protection works on private anonymous memory, memfd/shmem and \
                         hugetlbfs, in whole huge pages for hugetlb, not on files of other \
                         file systems; asynchronous on any mapping but MAP_DROPPABLE memory)",
                    )?,
                    Errno::PERM => f.write_str(
                        "a shared mapping that may never be written (its file was opened \
                         read-only, or a write-sealed memfd)",
                    )?,
                    Errno::NOMEM => f.write_str("part of the range is not mapped")?,
                    _ => f.write_str("refused")?,
                }
                if !mapping.is_empty() {
                    write!(f, "; mapped there: {mapping}")?;
                }
                Ok(())
            }
            TrackError::Protect {
                addr,
                host,
                len,
                errno,
            } => write!(
                f,
                "cannot change the write-protection of region {addr:#x} at host {host:#x}-{:#x}: \
                 {}",
                host + len,
                Name(*errno)
            ),
            TrackError::Scan { addr, host, errno } => {
                write!(f, "PAGEMAP_SCAN of region {addr:#x} at host {host:#x}: ")?;
                match errno {
                    Some(e) => write!(f, "{}", Name(*e))?,
                    None => f.write_str("the kernel made no progress")?,
                }
                if *errno == Some(Errno::PERM) {
                    f.write_str(
                        " (part of it is no longer registered with asynchronous write-protection: \
                         unmapped and mapped again?)",
                    )?;
                }
                Ok(())
            }
            TrackError::Lost { host, end, by } => {
                write!(f, "tracking of host memory {host:#x}-{end:#x} was lost: ")?;
                match by {
                    LostBy::Discard => f.write_str(
                        "pages were discarded (madvise), which drops their write-protection",
                    )?,
                    LostBy::Unmap => f.write_str("the memory was unmapped")?,
                    LostBy::Remap => f.write_str("the memory was moved by mremap(2)")?,
                    LostBy::Unprotect(e) => {
                        write!(f, "lifting a page's protection failed: {}", Name(*e))?
                    }
                    LostBy::Handler(e) => {
                        write!(f, "the fault handler thread failed: {}", Name(*e))?
                    }
                    LostBy::HandlerPanicked => f.write_str("the fault handler thread panicked")?,
                    LostBy::Unexpected(ev) => write!(f, "unexpected userfaultfd event {ev:#x}")?,
                    LostBy::Snapshot => f.write_str("a background snapshot failed part way")?,
                }
                f.write_str("; take a full snapshot and start tracking again")
            }
            TrackError::NotTracked { addr, pages } => write!(
                f,
                "{pages} pages from {addr:#x} are not within one tracked region"
            ),
            TrackError::System { what, errno } => write!(f, "cannot {what}: {}", Name(*errno)),
        }
    }
}

impl std::error::Error for TrackError {}
