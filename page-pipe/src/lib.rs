//! Zero-copy page capture on Linux: CRIU's page-pipe as a Rust crate.
//!
//! A [`PagePipe`] records pages ("page at address A, with flags F") as runs in bufs, each
//! buf a segment of a pipe, and holes (pages left out, e.g. because a parent snapshot has
//! them) apart from them, using as few runs and pipes as CRIU does. The rules it follows
//! are listed in [`page_pipe`]; the builder and its type states in [`builder`].
//!
//! ```
//! use page_pipe::{BufFlags, HoleFlags, PagePipe};
//! let mut pp = PagePipe::builder().iov_budget(1024).build()?;
//! pp.add_pages(0x7f00_0000_0000, 300, BufFlags::empty())?;
//! pp.add_holes(0x7f00_0012_c000, 4, HoleFlags::PARENT)?;
//! pp.add_page(0x7f00_0013_0000, BufFlags::LAZY)?;
//! assert_eq!(pp.stats().pages, 301);
//! println!("{pp:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The bookkeeping makes and grows pipes only through a [`PipeBackend`]: [`KernelPipes`]
//! for real pipes, optionally reused through a [`PipePool`]. (The `testing` cargo feature
//! adds a pipe backend that fails on demand and a pure model of the same rules, which the
//! crate's own tests hold it to.)
//!
//! # The life of a snapshot
//!
//! 1. Record: [`PagePipe::add_pages`] / [`PagePipe::add_holes`] (in chunk mode until
//!    [`Progress::Full`]).
//! 2. Capture: [`PagePipe::capture`] puts the pages of a [`Source`] into the pipes and
//!    returns a [`Captured`] page pipe that keeps the memory borrowed.
//! 3. Dump: [`Captured::dump`] writes entries and pages to an
//!    [`ImageWriter`](image::ImageWriter), an [`FdSink`] or a [`CallbackSink`]; or serve
//!    pages on demand with [`Captured::serve`].
//! 4. In chunk mode, [`Captured::reinit`] gives the page pipe back for the next chunk.
//!
//! # Page references, and what the crate promises
//!
//! `vmsplice` puts references to memory into a pipe, not copies. A [`Captured`] page pipe
//! keeps borrowed memory borrowed, so nothing changes it while its pages sit in the
//! crate's pipes; but once the borrow ends, a socket or pipe that still held references
//! would show its reader later bytes. So pages leave the crate by reference only from
//! memory nobody can write any more (an anonymous mapping the [`Source`] owns), or under
//! an `unsafe` promise ([`FdSink::new_zero_copy`], [`Served::splice_refs_into`]);
//! otherwise they leave as copies. See [`source`] and [`dump`].
//!
//! [`snapshot::snapshot`] runs these steps for a plan of spans; [`image::Image`] reads an
//! image back through its parent chain. For incremental snapshots, a
//! [`track::Tracker`] finds the pages written since the last one (userfaultfd
//! write-protection), and [`track::plan_from_dirty_log`] turns a dirty bitmap from
//! elsewhere (KVM's dirty log) into a plan.
//!
//! With the `vm-memory` cargo feature, `vm` does all of this for rust-vmm's guest memory
//! (a `GuestMemoryMmap`): sources, plans from its dirty bitmaps and KVM's dirty logs,
//! restores and received pages, without `unsafe` in the VMM's code; `guide::vmm` walks
//! through it.
//!
//! [`page_server`] speaks CRIU's page-server
//! protocol, to stream a dump to another host and to receive one; [`migrate`] moves
//! memory to another process or host while the program runs (pre-copy rounds from an
//! asynchronous tracker, a final pause of milliseconds, the pages received straight into
//! memory), optionally over TLS ([`tls`], the `tls` feature).
//!
//! [`lazy`] restores an image lazily (post-copy): the memory is usable at once, and each
//! page comes in with userfaultfd on its first touch, from a local image chain or a page
//! server, while the rest is brought in the background.
//!
//! # Thread safety
//!
//! Every type is `Send` where its parts are: a [`PagePipe`] over [`KernelPipes`], a
//! [`Captured`] page pipe (so a capture can be dumped or served by
//! another thread; scoped threads let it keep borrowing its memory), a [`ServeDest`], an
//! [`ImageWriter`](image::ImageWriter) and an [`Image`](image::Image). None of them is
//! shared: methods that change them take `&mut self`. A [`Source`] and an
//! [`Image`](image::Image) are also `Sync`, as they are only read; a [`PipePool`] is
//! shared through an `Arc` and locks inside.
#![deny(missing_docs, missing_debug_implementations)]
#![deny(unsafe_code)]
// The docs link to the items of the optional features (`tls`, `vm-memory`); built without
// them, those links have nothing to point at. docs.rs and CI build the docs with every
// feature, where a broken link is an error.
#![cfg_attr(
    not(all(feature = "tls", feature = "vm-memory")),
    allow(rustdoc::broken_intra_doc_links)
)]

mod addr;
mod backend;
pub mod builder;
pub mod capture;
pub mod dump;
pub mod guide;
pub mod image;
pub mod lazy;
pub mod migrate;
pub mod mode;
pub mod page_pipe;
pub mod page_server;
mod progress;
pub mod serve;
mod serve_index;
pub mod snapshot;
pub mod source;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod track;
mod types;
#[cfg(feature = "vm-memory")]
pub mod vm;

pub use addr::{PageRange, RangeError};
pub use backend::{KernelPipes, PipeBackend, PipePool};
pub use builder::{BuildError, Builder};
pub use capture::{CaptureError, CaptureMode, CapturePath, CaptureReport, Captured};
pub use dump::{CallbackSink, DumpError, DumpErrorKind, DumpReport, DumpSink, FdSink};
pub use image::{PageFlags, PagemapEntry};
pub use mode::{CallerIovs, ChunkMode, IovStore, Mode, NoIovs, OwnIovs, SinglePass};
pub use page_pipe::{
    AddError, BufId, BufView, Entries, Notation, PagePipe, PipeId, Progress, Stats, UnknownBuf,
    notation,
};
pub use progress::{PROGRESS_INTERVAL, PagesDone, ProgressFn};
pub use serve::{Found, ServeDest, ServeDestError, ServeError, ServeOp, Served};
#[doc(hidden)]
pub use source::Chunk;
pub use source::{Source, SourceError};
pub use types::{BufFlags, Hole, HoleFlags, Run};

/// The page size of this machine, in bytes: what page counts and addresses are measured
/// in (`sysconf(_SC_PAGESIZE)`, read once).
///
/// ```
/// assert!(page_pipe::page_size().is_power_of_two());
/// ```
pub fn page_size() -> usize {
    page_pipe_sys::page_size().get()
}
