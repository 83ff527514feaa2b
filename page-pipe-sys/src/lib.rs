//! Kernel-shaped facts and thin syscall wrappers for [`page-pipe`].
//!
//! This crate is the only one in the workspace that makes system calls. It owns:
//!
//! - [`PipeBuffer`], a `#[repr(C)]` mirror of the kernel's `struct pipe_buffer`, whose size
//!   decides how many slots a pipe may have before its slot array needs a costly
//!   allocation ([`pipe_max_size_pages`]);
//! - the pipe sizing math as `const fn`s that cite the kernel functions they mirror
//!   ([`round_pipe_size`], [`pipe_max_size_pages`]);
//! - the pipe limits in force on this machine, read once into [`PipeLimits`];
//! - wrappers over [`rustix::pipe`] that make a pipe, read and set its capacity, and move an
//!   exact number of bytes with `vmsplice`, `splice`, `tee` and `write`, looping on short
//!   transfers and `EINTR` and reporting how far they got when they stop early ([`Partial`]);
//! - socket calls for streaming pages ([`send_all`], [`send_vectored_all`], [`recv_some`],
//!   [`splice_some`], [`poll_readable`], [`poll_ready`]): sends never raise `SIGPIPE`;
//! - a run-time [`probe`](probe_vmsplice) that tells whether `vmsplice` references pages or
//!   copies them on this kernel, and whether `SPLICE_F_GIFT` is accepted;
//! - the userfaultfd ABI ([`Uffd`]: `UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_WRITEPROTECT`,
//!   `UFFDIO_COPY`, ..., and its events) and `/proc/self/pagemap` with its `PAGEMAP_SCAN`
//!   ioctl ([`Pagemap`]), declared by hand with compile-time layout checks, and a
//!   [`probe`](probe_userfaultfd) of what this kernel offers this process.
//!
//! Every wrapper returns [`rustix::io::Result`] or, where a transfer can stop half way,
//! [`Partial`]. Nothing here keeps state beyond the cached [`PipeLimits`].
//!
//! ```
//! use page_pipe_sys::{pipe_max_size_pages, PIPE_BUFFER_SIZE};
//!
//! // The slot array of a pipe must fit an order-3 allocation (32 KiB at 4 KiB pages).
//! assert_eq!(PIPE_BUFFER_SIZE, 40);
//! assert_eq!(pipe_max_size_pages(4096), 819);
//! ```
//!
//! [`page-pipe`]: https://docs.rs/page-pipe
#![cfg(target_os = "linux")]
#![deny(missing_docs, missing_debug_implementations)]

mod layout;
mod limits;
mod net;
mod pagemap_scan;
mod pipe;
mod probe;
mod probe_uffd;
mod raw;
mod sizing;
mod uffd;

pub use layout::{PIPE_BUFFER_SIZE, PipeBuffer};
pub use limits::{PipeLimits, page_size};
pub use net::{
    Interest, Ready, poll_readable, poll_ready, recv_some, send_all, send_vectored_all, splice_some,
};
pub use pagemap_scan::{
    PAGEMAP_SCAN, PageCategories, PageRegion, Pagemap, PagemapEntry, PmScanArg, ScanFlags,
};
pub use pipe::{
    FdKind, Partial, Pipe, RawIov, Stopped, fd_kind, pipe, pipe_bytes, pipe_capacity, read_exact,
    set_pipe_capacity, splice_exact, tee_exact, vmsplice_all, vmsplice_raw, write_exact,
};
pub use probe::{GiftSupport, VmspliceMode, VmspliceProbe, probe_vmsplice};
pub use probe_uffd::{UffdProbe, probe_userfaultfd};
pub use raw::{copy_from_raw, read_raw_exact, recv_raw_exact, send_raw_exact, write_raw_exact};
pub use sizing::{
    NR_PIPES_PER_CHUNK, PAGE_ALLOC_COSTLY_ORDER, PIPE_DEF_BUFFERS, PIPE_MIN_DEF_BUFFERS,
    PIPE_SIZE_LIMIT, UIO_MAXIOV, pipe_max_size_pages, round_pipe_size,
};

pub use uffd::{
    CopyMode, PagefaultFlags, PartialFill, RegisterMode, UFFD_API, UFFD_EVENT_FORK,
    UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFD_MSG_SIZE,
    UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_WRITEPROTECT,
    UFFDIO_ZEROPAGE, USERFAULTFD_IOC_NEW, Uffd, UffdApi, UffdEvent, UffdFeatures, UffdFlags,
    UffdIoctls, UffdMsg, UffdioApi, UffdioCopy, UffdioRange, UffdioRegister, UffdioWriteprotect,
    UffdioZeropage, WriteProtectMode, ZeropageMode, populate_read,
};

/// Re-exported from rustix: the error numbers every wrapper reports.
pub use rustix::io::{Errno, Result};
/// Re-exported from rustix: flags for `splice`, `vmsplice` and `tee`.
pub use rustix::pipe::SpliceFlags;
