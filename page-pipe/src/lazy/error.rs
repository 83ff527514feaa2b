//! [`LazyError`]: why a lazy restore could not start or could not finish.

use std::fmt;

use page_pipe_sys::{Errno, UffdIoctls};

use crate::image::ImageError;
use crate::page_server::ClientError;
use crate::track::ErrnoName as Name;

/// The userfaultfd call that filled (or tried to fill) pages of the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOp {
    /// `UFFDIO_COPY`: pages read from the source.
    Copy,
    /// `UFFDIO_ZEROPAGE`: pages no image holds.
    Zeropage,
}

impl fmt::Display for FillOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FillOp::Copy => "UFFDIO_COPY",
            FillOp::Zeropage => "UFFDIO_ZEROPAGE",
        })
    }
}

/// Why a lazy restore could not start, or could not bring every page in.
///
/// After an error of [`LazyRestore::start`](super::LazyRestore::start) nothing is
/// registered and the destination is as it was (but see [`LazyError::Discard`]). Errors of
/// [`wait`](super::LazyRestore::wait) come after the range was unregistered: pages
/// brought in hold the image's bytes, the others read as zeros (see the
/// [module docs](super#when-the-source-fails)).
///
/// ```
/// use page_pipe::lazy::LazyError;
/// let e = LazyError::BadDestination { ptr: 0x1001, len: 4096 };
/// assert!(e.to_string().contains("not page-aligned"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum LazyError {
    /// The destination is null, not page-aligned, empty, not whole pages, or passes the
    /// end of the address space.
    BadDestination {
        /// Its address.
        ptr: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// No userfaultfd could be made (`ENOSYS`: none in this kernel, or a seccomp filter).
    Open {
        /// The errno of `userfaultfd(2)`.
        errno: Errno,
    },
    /// A userfaultfd that sees kernel-mode faults is refused to this process, and the
    /// options ask for one ([`Privilege::Full`](crate::track::Privilege::Full)).
    Privilege {
        /// The errno of `userfaultfd(2)` (`EPERM`).
        syscall: Errno,
        /// The errno of `/dev/userfaultfd` (`EACCES`, `ENOENT`).
        device: Errno,
        /// `vm.unprivileged_userfaultfd`, if readable.
        unprivileged_userfaultfd: Option<u32>,
    },
    /// `UFFDIO_API` failed.
    Api {
        /// The errno.
        errno: Errno,
    },
    /// The destination is not (all) private anonymous memory, the only memory a lazy
    /// restore fills.
    NotAnonymous {
        /// Its address.
        host: usize,
        /// Its length in bytes.
        len: usize,
        /// The mappings there, from `/proc/self/maps`.
        mapping: String,
    },
    /// `UFFDIO_REGISTER` (missing mode) refused the destination.
    Register {
        /// Its address.
        host: usize,
        /// Its length in bytes.
        len: usize,
        /// The errno: `EBUSY` (registered with another userfaultfd: a tracker, another
        /// lazy restore), `EINVAL`, `ENOMEM`.
        errno: Errno,
    },
    /// The registered range does not support a call the restore needs.
    Unsupported {
        /// The call.
        missing: &'static str,
        /// The calls the range supports.
        ioctls: UffdIoctls,
    },
    /// The plan for the range failed: [`ImageError::BadRange`] for a range of the
    /// snapshot that is not whole pages in the address space (from any source),
    /// [`ImageError::NotInParent`] for a broken chain, or [`ImageError::NotInImage`] for
    /// a strict restore.
    Plan(ImageError),
    /// A strict restore from a page server: a page of the range is in none of the runs
    /// the server was said to hold.
    NotHeld {
        /// The first such page.
        vaddr: u64,
    },
    /// Reading pages from an image's pages file failed (it was truncated or could not be
    /// read while the restore ran).
    Read {
        /// The first page asked for.
        vaddr: u64,
        /// Pages asked for.
        pages: u64,
        /// The error, naming the file.
        error: ImageError,
    },
    /// Asking the page server for pages (`GET`) failed: the server died or closed the
    /// session (as it does for a page it does not hold), or timed out.
    Remote {
        /// The first page asked for.
        vaddr: u64,
        /// Pages asked for.
        pages: u64,
        /// The error, naming the peer.
        error: ClientError,
    },
    /// Filling pages of the destination failed (`ENOENT`: the range was unmapped or
    /// unregistered under the restore; `ENOMEM`).
    Fill {
        /// The call.
        op: FillOp,
        /// The first page.
        host: usize,
        /// Bytes asked for.
        len: usize,
        /// The errno; `None` when the kernel kept answering that it filled nothing,
        /// with no error, past the retries.
        errno: Option<Errno>,
    },
    /// Waiting for or reading the userfaultfd's events failed.
    Events {
        /// The errno.
        errno: Errno,
    },
    /// The userfaultfd reported an event the restore did not ask for.
    Unexpected {
        /// `UFFD_EVENT_*`.
        event: u8,
    },
    /// Pinning the fault thread to the CPU asked for
    /// ([`LazyOptions::fault_cpu`](super::LazyOptions::fault_cpu)) failed.
    Pin {
        /// The CPU.
        cpu: usize,
        /// The errno of `sched_setaffinity(2)` (`EINVAL`: no such CPU, or not allowed).
        errno: Errno,
    },
    /// Discarding the destination's old contents (`MADV_DONTNEED`) failed (`EINVAL`:
    /// locked memory, `mlock(2)`); the range was unregistered again, its contents as they
    /// were (on a destination of several mappings, those before the one that refused may
    /// have been discarded).
    Discard {
        /// The destination's address.
        host: usize,
        /// Its length in bytes.
        len: usize,
        /// The errno of `madvise(2)`.
        errno: Errno,
    },
    /// A system call besides the userfaultfd ones failed.
    System {
        /// What was being done.
        op: SystemOp,
        /// The errno.
        errno: Errno,
    },
    /// A thread of the restore panicked; the range was unregistered.
    Panicked {
        /// Which thread.
        thread: LazyThread,
    },
}

/// What a lazy restore was doing when a system call failed ([`LazyError::System`]).
///
/// ```
/// use page_pipe::lazy::{LazyThread, SystemOp};
/// assert_eq!(SystemOp::Spawn(LazyThread::Prefetch).to_string(), "start the prefetch thread");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SystemOp {
    /// Reading `/proc/self/maps` to check the destination.
    ReadMaps,
    /// Making the fault thread's stop pipe.
    StopPipe,
    /// Starting a thread.
    Spawn(LazyThread),
}

impl fmt::Display for SystemOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SystemOp::ReadMaps => f.write_str("read /proc/self/maps"),
            SystemOp::StopPipe => f.write_str("make the fault thread's stop pipe"),
            SystemOp::Spawn(t) => write!(f, "start the {t} thread"),
        }
    }
}

/// A thread of a lazy restore.
///
/// ```
/// use page_pipe::lazy::{LazyError, LazyThread};
/// let e = LazyError::Panicked { thread: LazyThread::Fault };
/// assert!(e.to_string().contains("the fault thread panicked"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyThread {
    /// The thread that serves faults.
    Fault,
    /// A prefetch thread.
    Prefetch,
}

impl fmt::Display for LazyThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LazyThread::Fault => "fault",
            LazyThread::Prefetch => "prefetch",
        })
    }
}

impl fmt::Display for LazyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LazyError::BadDestination { ptr, len } => write!(
                f,
                "lazy restore: destination of {len} bytes at {ptr:#x} is null, empty, not \
                 page-aligned, not whole pages or past the end of the address space"
            ),
            LazyError::Open { errno } => write!(
                f,
                "lazy restore: cannot make a userfaultfd: {}{}",
                Name(*errno),
                if *errno == Errno::NOSYS {
                    " (the kernel has no userfaultfd, or a seccomp filter refuses it)"
                } else {
                    ""
                }
            ),
            LazyError::Privilege {
                syscall,
                device,
                unprivileged_userfaultfd,
            } => {
                write!(
                    f,
                    "lazy restore: a userfaultfd that sees kernel faults is refused to this \
                     process: userfaultfd(2): {}",
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
                    ", /dev/userfaultfd: {}; a user-mode-only one (Privilege::Auto) restores \
                     what user code touches, but the kernel's own accesses to pages not yet in \
                     (read(2) into them, KVM) fail with EFAULT",
                    Name(*device)
                )
            }
            LazyError::Api { errno } => {
                write!(f, "lazy restore: UFFDIO_API failed: {}", Name(*errno))
            }
            LazyError::NotAnonymous { host, len, mapping } => write!(
                f,
                "lazy restore: the destination {host:#x}-{:#x} is not all private anonymous \
                 memory ({mapping})",
                host + len
            ),
            LazyError::Register { host, len, errno } => {
                write!(
                    f,
                    "lazy restore: cannot register {host:#x}-{:#x} with userfaultfd (missing \
                     mode): {}",
                    host + len,
                    Name(*errno)
                )?;
                if *errno == Errno::BUSY {
                    f.write_str(
                        " (the memory is registered with another userfaultfd: a tracker or \
                         another lazy restore holds it)",
                    )?;
                }
                Ok(())
            }
            LazyError::Unsupported { missing, ioctls } => write!(
                f,
                "lazy restore: the registered range does not support {missing} (it supports \
                 {:#x})",
                ioctls.bits()
            ),
            LazyError::Plan(_) => f.write_str("lazy restore: cannot plan the restore"),
            LazyError::NotHeld { vaddr } => write!(
                f,
                "lazy restore: page {vaddr:#x} is in none of the runs the page server holds, \
                 and the restore is strict"
            ),
            LazyError::Read { vaddr, pages, .. } => write!(
                f,
                "lazy restore: cannot read {pages} pages from {vaddr:#x} out of the image; the \
                 range was unregistered: pages not yet in read as zeros"
            ),
            LazyError::Remote { vaddr, pages, .. } => write!(
                f,
                "lazy restore: cannot get {pages} pages from {vaddr:#x} from the page server; \
                 the range was unregistered: pages not yet in read as zeros"
            ),
            LazyError::Fill {
                op,
                host,
                len,
                errno,
            } => match errno {
                Some(errno) => write!(
                    f,
                    "lazy restore: {op} of {len} bytes at {host:#x} failed: {}{}",
                    Name(*errno),
                    if *errno == Errno::NOENT {
                        " (the destination was unmapped or unregistered under the restore)"
                    } else {
                        ""
                    }
                ),
                None => write!(
                    f,
                    "lazy restore: {op} of {len} bytes at {host:#x} filled nothing, \
                     retry after retry"
                ),
            },
            LazyError::Events { errno } => write!(
                f,
                "lazy restore: cannot read the userfaultfd's events: {}",
                Name(*errno)
            ),
            LazyError::Unexpected { event } => {
                write!(f, "lazy restore: unexpected userfaultfd event {event:#x}")
            }
            LazyError::Pin { cpu, errno } => write!(
                f,
                "lazy restore: cannot pin the fault thread to CPU {cpu}: {}",
                Name(*errno)
            ),
            LazyError::Discard { host, len, errno } => write!(
                f,
                "lazy restore: cannot discard the old contents of the destination \
                 {host:#x}-{:#x} (madvise MADV_DONTNEED): {}{}; it was unregistered again",
                host + len,
                Name(*errno),
                if *errno == Errno::INVAL {
                    " (locked memory?)"
                } else {
                    ""
                }
            ),
            LazyError::System { op, errno } => {
                write!(f, "lazy restore: cannot {op}: {}", Name(*errno))
            }
            LazyError::Panicked { thread } => write!(
                f,
                "lazy restore: the {thread} thread panicked; the range was unregistered"
            ),
        }
    }
}

impl LazyError {
    /// Whether this is a page server request that found the connection broken by an
    /// earlier failed request: an echo of that request's error, not a cause.
    pub(super) fn is_echo(&self) -> bool {
        matches!(
            self,
            LazyError::Remote {
                error: ClientError::Broken { .. },
                ..
            }
        )
    }
}

impl std::error::Error for LazyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LazyError::Plan(e) | LazyError::Read { error: e, .. } => Some(e),
            LazyError::Remote { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_their_layer_and_sources_give_the_cause() {
        let e = LazyError::Read {
            vaddr: 0x1000,
            pages: 4,
            error: ImageError::ShortRead {
                path: "d/pages-1.img".into(),
                offset: 8192,
            },
        };
        let text = e.to_string();
        assert!(
            text.contains("0x1000") && !text.contains("pages-1.img"),
            "{text}"
        );
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(
            cause.contains("pages-1.img") && cause.contains("8192"),
            "{cause}"
        );
        let e = LazyError::Register {
            host: 0x10000,
            len: 0x2000,
            errno: Errno::BUSY,
        };
        assert!(e.to_string().contains("EBUSY") && e.to_string().contains("another"));
        assert!(std::error::Error::source(&e).is_none());
    }
}
