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
//! for real pipes, [`FakePipes`] for an in-memory stand-in that fails on demand. The
//! [`model`] module holds a pure model of the same rules that the tests compare against.
//!
//! # The life of a snapshot
//!
//! 1. Record: [`PagePipe::add_pages`] / [`PagePipe::add_holes`] (in chunk mode until
//!    [`Progress::Full`]).
//! 2. Capture: [`PagePipe::capture`] puts the pages of a [`Source`] into the pipes and
//!    returns a [`Captured`] page pipe that keeps the memory borrowed.
//! 3. Dump: [`Captured::dump`] writes entries and pages to an
//!    [`ImageWriter`](image::ImageWriter), an [`FdSink`] or a [`CallbackSink`]; or serve
//!    pages on demand with [`Captured::read`].
//! 4. In chunk mode, [`Captured::reinit`] gives the page pipe back for the next chunk.
//!
//! [`snapshot::snapshot`] runs these steps for a plan of spans; [`image::Image`] reads an
//! image back through its parent chain. For incremental snapshots, a
//! [`track::Tracker`] finds the pages written since the last one (userfaultfd
//! write-protection), and [`track::plan_from_dirty_log`] turns a dirty bitmap from
//! elsewhere (KVM's dirty log) into a plan.
//!
//! # Thread safety
//!
//! Every type is `Send` where its parts are: a [`PagePipe`] over [`KernelPipes`] or
//! [`FakePipes`], a [`Captured`] page pipe (so a capture can be dumped or served by
//! another thread; scoped threads let it keep borrowing its memory), a [`ReadDest`], an
//! [`ImageWriter`](image::ImageWriter) and an [`Image`](image::Image). None of them is
//! shared: methods that change them take `&mut self`. A [`Source`] and an
//! [`Image`](image::Image) are also `Sync`, as they are only read; a [`PipePool`] is
//! shared through an `Arc` and locks inside.
#![deny(missing_docs, missing_debug_implementations)]
#![deny(unsafe_code)]

mod backend;
pub mod builder;
pub mod capture;
pub mod image;
pub mod model;
pub mod page_pipe;
pub mod read;
pub mod snapshot;
pub mod source;
pub mod track;
mod types;

pub use backend::{FakeKernel, FakePipe, FakePipes, KernelPipes, PipeBackend, PipePool};
pub use builder::{
    BuildError, Builder, CallerIovs, ChunkMode, IovStore, Mode, NoIovs, OwnIovs, SinglePass,
};
pub use capture::{
    CallbackSink, CaptureError, CaptureMode, CapturePath, CaptureReport, Captured, DumpError,
    DumpErrorKind, DumpReport, DumpSink, FdSink,
};
pub use page_pipe::{
    AddError, BufId, BufView, Entries, Notation, PagePipe, PipeId, Progress, Stats, UnknownBuf,
};
pub use read::{Found, ReadDest, ReadError, Served};
pub use source::{Source, SourceError};
pub use types::{BufFlags, Entry, Hole, HoleFlags, Run};
