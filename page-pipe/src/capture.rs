//! Capture: the pages a page pipe recorded go into its pipes; dump: out of the pipes into a
//! sink, as pagemap entries and pages.
//!
//! # Rules
//!
//! - [`PagePipe::capture`] maps every run through a [`Source`] first; a page the source
//!   does not cover is [`CaptureError::NotCovered`], raised before any syscall.
//! - Each buf's runs go into its pipe with `vmsplice(SPLICE_F_GIFT | SPLICE_F_NONBLOCK)`,
//!   at most 1024 iovecs a call; the bytes moved must equal the buf's pages. If the kernel
//!   refuses `SPLICE_F_GIFT` (`EOPNOTSUPP`, `EINVAL`) the capture goes on without it; if it
//!   refuses `vmsplice` itself (`EPERM`, `ENOSYS`: a seccomp filter) it goes on with
//!   `write(2)`, which leaves the same bytes in the pipes. [`CaptureReport::path`] says
//!   which path ran.
//! - A [`Captured`] page pipe carries the lifetime `'m` of the memory: safe code cannot
//!   change borrowed memory until the captured page pipe is gone, so a dump writes what was
//!   there at capture.
//! - [`Captured::dump`] walks bufs and runs in order, writing before each run the holes
//!   that start below it (CRIU's `page_xfer_dump_pages`). A run is `PRESENT`; a lazy buf's
//!   run is `LAZY`, and also `PRESENT` unless lazy pages are on, in which case its pages
//!   stay in their pipe (which no transferred buf shares) to be served on demand. A hole
//!   with `PARENT` is a `PARENT` entry; a hole without flags is left out. Pages of
//!   released bufs that still sit in a shared pipe are discarded on the way.
//! - A dump runs once. When a sink fails part way, [`DumpError`] says what was done; an
//!   image sink that failed refuses to finish and commits nothing.

use std::fmt;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};

use page_pipe_sys::{Errno, RawIov, SpliceFlags, Stopped, splice_exact, write_exact};

use crate::backend::KernelPipes;
use crate::builder::{ChunkMode, IovStore, Mode, OwnIovs, SinglePass};
use crate::image::{ImageError, ImageWriter, PageFlags, PagemapEntry};
use crate::page_pipe::PagePipe;
use crate::source::{Source, vmsplice_pages};
use crate::types::{BufFlags, HoleFlags};

/// How to put pages into pipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureMode {
    /// `vmsplice` with `SPLICE_F_GIFT`, falling back as the [module rules](self) say.
    #[default]
    Auto,
    /// `write(2)`: copy the pages into the pipes.
    Copy,
}

/// Which path a capture took in the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePath {
    /// `vmsplice` with `SPLICE_F_GIFT`: the pipes reference the memory.
    VmspliceGift,
    /// `vmsplice` without `SPLICE_F_GIFT` (the kernel refused the flag).
    Vmsplice,
    /// `write(2)`: the pipes hold copies (asked for, or `vmsplice` was refused).
    Copy,
    /// No pipes: the sink was fed from memory, as it gains nothing from pipes
    /// ([`snapshot`](crate::snapshot::snapshot) only).
    Direct,
}

impl fmt::Display for CapturePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CapturePath::VmspliceGift => "vmsplice (gift)",
            CapturePath::Vmsplice => "vmsplice",
            CapturePath::Copy => "copy (write)",
            CapturePath::Direct => "direct from memory",
        })
    }
}

/// What a capture did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureReport {
    /// The path that ran (the last one, if it changed on the way).
    pub path: CapturePath,
    /// Pages captured.
    pub pages: u64,
    /// Bytes captured.
    pub bytes: u64,
}

/// Why a capture failed. The page pipe is dropped, closing its pipes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureError {
    /// The page at `addr` is in no region of the source; nothing was captured.
    NotCovered {
        /// The page.
        addr: u64,
    },
    /// The kernel refused to move the page at `addr` (`EFAULT`: the memory is not
    /// mapped).
    Kernel {
        /// The first page not captured.
        addr: u64,
        /// The refusal.
        errno: Errno,
        /// Pages captured before it.
        captured: u64,
    },
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::NotCovered { addr } => {
                write!(f, "page {addr:#x} is in no region of the source")
            }
            CaptureError::Kernel {
                addr,
                errno,
                captured,
            } => write!(
                f,
                "cannot capture page {addr:#x}: {errno} ({captured} pages were captured before it)"
            ),
        }
    }
}

impl std::error::Error for CaptureError {}

/// A page pipe whose pages sit in its pipes, borrowed from memory that lives for `'m`.
///
/// Made by [`PagePipe::capture`]. It can be [dumped](Self::dump) once, serve pages on
/// demand ([`read`](Self::read)), [release bufs](Self::release_buf), and in chunk mode
/// turn back into a page pipe
/// ([`reinit`](Captured::reinit)). It is `Send`: it can move to a draining thread.
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::{BufFlags, FdSink, PagePipe, Source};
/// let ps = page_pipe_sys::page_size().get();
/// let mut mem = MmapOptions::new().len(8 * ps).map_anon()?;
/// mem.fill(0xab);
/// let source = Source::new().with_slice(0x10_0000, &mem[..])?;
/// let mut pp = PagePipe::builder().iov_budget(8).build()?;
/// pp.add_pages(0x10_0000, 8, BufFlags::empty())?;
/// let mut captured = pp.capture(&source)?;
/// let out = std::fs::File::create(std::env::temp_dir().join("pp-doc-captured"))?;
/// let mut sink = FdSink::new(out);
/// let report = captured.dump(&mut sink)?;
/// assert_eq!(report.present_pages, 8);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Captured<'m, M: Mode = SinglePass, I: IovStore = OwnIovs> {
    pub(crate) pp: PagePipe<M, I, KernelPipes>,
    report: CaptureReport,
    dumped: bool,
    devnull: Option<File>,
    pub(crate) index: Option<crate::read::ReadIndex>,
    _mem: PhantomData<&'m [u8]>,
}

impl<M: Mode, I: IovStore> PagePipe<M, I, KernelPipes> {
    /// Captures every page recorded, from `source`, with [`CaptureMode::Auto`].
    ///
    /// # Errors
    /// [`CaptureError`]; the page pipe is dropped.
    pub fn capture<'m>(self, source: &Source<'m>) -> Result<Captured<'m, M, I>, CaptureError> {
        self.capture_with(source, CaptureMode::Auto)
    }

    /// Captures every page recorded, from `source`, the way `mode` says.
    ///
    /// # Errors
    /// [`CaptureError`]; the page pipe is dropped.
    pub fn capture_with<'m>(
        self,
        source: &Source<'m>,
        mode: CaptureMode,
    ) -> Result<Captured<'m, M, I>, CaptureError> {
        let mut pp = self;
        // Released bufs never go in: the bufs after them on a pipe start earlier.
        let mut fill = vec![0u64; pp.pipes.len()];
        for b in pp.bufs.iter_mut().filter(|b| b.live) {
            b.pipe_pos = fill[b.slot];
            fill[b.slot] += b.pages;
        }
        for (slot, filled) in pp.pipes.iter_mut().zip(fill) {
            if let Some(slot) = slot {
                slot.filled = filled;
                slot.consumed = 0;
            }
        }
        let ps = pp.page_size() as u64;
        assert_eq!(
            source.page_size() as u64,
            ps,
            "source and page pipe page sizes differ"
        );
        // Map every run first, so that a page the source lacks stops the capture before
        // any syscall.
        let runs = pp.iovs.runs();
        let mut slices: Vec<RawIov> = Vec::with_capacity(runs.len());
        let mut spans = Vec::with_capacity(pp.bufs.len());
        for (bi, b) in pp.bufs.iter().enumerate() {
            if !b.live || b.pages == 0 {
                continue;
            }
            let first = slices.len();
            for r in &runs[b.first_run..b.first_run + b.nr_runs] {
                source
                    .iovs(r.vaddr(), r.pages(), &mut slices)
                    .map_err(|addr| CaptureError::NotCovered { addr })?;
            }
            spans.push((bi, first..slices.len()));
        }

        let mut path = match mode {
            CaptureMode::Auto => CapturePath::VmspliceGift,
            CaptureMode::Copy => CapturePath::Copy,
        };
        let mut captured = 0u64;
        for (bi, range) in spans {
            let b = &pp.bufs[bi];
            let pages = b.pages;
            let pipe = &pp.slot(b.slot).pipe;
            let bufs = &slices[range];
            let want = (pages * ps) as usize;
            let mut done = 0usize;
            while done < want {
                let rest = skip_bytes(bufs, done);
                let r = match path {
                    CapturePath::VmspliceGift => vmsplice_pages(&pipe.write, &rest, true),
                    CapturePath::Vmsplice => vmsplice_pages(&pipe.write, &rest, false),
                    CapturePath::Copy | CapturePath::Direct => source.copy_into(&pipe.write, &rest),
                };
                let partial = match r {
                    Ok(n) => {
                        done += n;
                        continue;
                    }
                    Err(partial) => partial,
                };
                done += partial.done;
                // Refusals of the flag or of vmsplice itself move on to the next path;
                // anything else stops the capture.
                path = match (partial.stopped, path) {
                    (
                        Stopped::Errno(Errno::OPNOTSUPP | Errno::INVAL),
                        CapturePath::VmspliceGift,
                    ) => CapturePath::Vmsplice,
                    (
                        Stopped::Errno(Errno::PERM | Errno::NOSYS | Errno::OPNOTSUPP),
                        CapturePath::VmspliceGift | CapturePath::Vmsplice,
                    ) => CapturePath::Copy,
                    (stopped, _) => {
                        let errno = match stopped {
                            Stopped::Errno(e) => e,
                            Stopped::EndOfData => Errno::IO,
                        };
                        let page = done as u64 / ps;
                        let runs = &runs[b.first_run..b.first_run + b.nr_runs];
                        return Err(CaptureError::Kernel {
                            addr: nth_page(runs, page, ps),
                            errno,
                            captured: captured + page,
                        });
                    }
                };
            }
            debug_assert_eq!(done, want);
            captured += pages;
        }
        Ok(Captured {
            pp,
            report: CaptureReport {
                path,
                pages: captured,
                bytes: captured * ps,
            },
            dumped: false,
            devnull: None,
            index: None,
            _mem: PhantomData,
        })
    }
}

/// The address of page `n` of a buf, counting through its runs.
fn nth_page(runs: &[crate::Run], mut n: u64, ps: u64) -> u64 {
    for r in runs {
        if n < r.pages() {
            return r.vaddr() + n * ps;
        }
        n -= r.pages();
    }
    runs.last().map_or(0, |r| r.end(ps as usize))
}

/// The iovecs of `bufs` after the first `skip` bytes.
fn skip_bytes(bufs: &[RawIov], mut skip: usize) -> Vec<RawIov> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        if skip >= b.len {
            skip -= b.len;
            continue;
        }
        out.push(RawIov {
            base: b.base.wrapping_add(skip),
            len: b.len - skip,
        });
        skip = 0;
    }
    out
}

/// What a dump did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpReport {
    /// Entries given to the sink.
    pub entries: u64,
    /// Pages written (present entries).
    pub present_pages: u64,
    /// Pages in `PARENT` entries.
    pub parent_pages: u64,
    /// Lazy pages left in their pipes to be served on demand.
    pub lazy_kept: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Why a dump stopped, with what it did before.
#[derive(Debug)]
pub struct DumpError {
    /// What went wrong.
    pub kind: DumpErrorKind,
    /// What the dump did before it stopped.
    pub done: DumpReport,
}

/// What went wrong in a dump.
#[derive(Debug)]
#[non_exhaustive]
pub enum DumpErrorKind {
    /// This captured page pipe was dumped already.
    AlreadyDumped,
    /// An image sink failed; the error names the file.
    Image(Box<ImageError>),
    /// A file descriptor or callback sink failed on this entry.
    Sink {
        /// The entry.
        entry: PagemapEntry,
        /// The error.
        error: io::Error,
    },
    /// Discarding pages of released bufs to `/dev/null` failed.
    Discard(io::Error),
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DumpErrorKind::AlreadyDumped => {
                f.write_str("this captured page pipe was dumped already")?
            }
            DumpErrorKind::Image(e) => write!(f, "{e}")?,
            DumpErrorKind::Sink { entry, error } => {
                write!(f, "sink failed on entry {entry}: {error}")?
            }
            DumpErrorKind::Discard(e) => write!(f, "cannot discard released pages: {e}")?,
        }
        write!(
            f,
            " (after {} entries, {} pages written)",
            self.done.entries, self.done.present_pages
        )
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            DumpErrorKind::Image(e) => Some(e.as_ref()),
            DumpErrorKind::Sink { error, .. } | DumpErrorKind::Discard(error) => Some(error),
            DumpErrorKind::AlreadyDumped => None,
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Where a dump goes: [`ImageWriter`] (an image directory), [`FdSink`] (pages to any file,
/// socket or pipe, entries kept in memory), or [`CallbackSink`] (your own format). Sealed.
pub trait DumpSink: sealed::Sealed {
    /// Takes a `PRESENT` entry and exactly its pages from the front of `pipe`.
    #[doc(hidden)]
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
    ) -> Result<(), DumpErrorKind>;
    /// Takes an entry without pages here (`PARENT`, or `LAZY` kept in its pipe).
    #[doc(hidden)]
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind>;
    /// Takes a `PRESENT` entry with its pages as bytes (one slice per memory region).
    #[doc(hidden)]
    fn present_bytes(&mut self, e: PagemapEntry, bytes: &[&[u8]]) -> Result<(), DumpErrorKind>;
    /// Whether this sink is faster fed from memory than from pipes (see
    /// [`snapshot`](crate::snapshot::snapshot)).
    #[doc(hidden)]
    fn prefers_copy(&self) -> bool;
}

impl sealed::Sealed for ImageWriter {}
impl DumpSink for ImageWriter {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        _len: usize,
    ) -> Result<(), DumpErrorKind> {
        self.push_from_pipe(e, pipe)
            .map_err(|e| DumpErrorKind::Image(Box::new(e)))
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.push(e).map_err(|e| DumpErrorKind::Image(Box::new(e)))
    }
    fn present_bytes(&mut self, e: PagemapEntry, bytes: &[&[u8]]) -> Result<(), DumpErrorKind> {
        self.push_slices(e, bytes)
            .map_err(|e| DumpErrorKind::Image(Box::new(e)))
    }
    fn prefers_copy(&self) -> bool {
        IMAGE_PREFERS_COPY
    }
}

/// Whether image files are written from memory rather than spliced from pipes. Measured
/// (README, "Performance"): `splice` into a file is no faster than `write` from the
/// mapping, and the capture costs on top, so files are written from memory.
const IMAGE_PREFERS_COPY: bool = true;

/// A sink that splices pages into a file, socket or pipe, one entry after another, and
/// keeps the entries in memory.
///
/// ```
/// use page_pipe::FdSink;
/// let (r, w) = std::os::unix::net::UnixStream::pair()?;
/// let sink = FdSink::new(w);
/// assert!(sink.entries().is_empty());
/// # drop(r);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct FdSink<F: AsFd> {
    fd: F,
    entries: Vec<PagemapEntry>,
}

impl<F: AsFd> FdSink<F> {
    /// A sink writing pages to `fd` (at its file position, if it is a file).
    pub fn new(fd: F) -> Self {
        Self {
            fd,
            entries: Vec::new(),
        }
    }

    /// The entries so far, in order.
    pub fn entries(&self) -> &[PagemapEntry] {
        &self.entries
    }

    /// The descriptor and the entries.
    pub fn into_parts(self) -> (F, Vec<PagemapEntry>) {
        (self.fd, self.entries)
    }
}

impl<F: AsFd> sealed::Sealed for FdSink<F> {}
impl<F: AsFd> DumpSink for FdSink<F> {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
    ) -> Result<(), DumpErrorKind> {
        splice_exact(pipe, None, self.fd.as_fd(), None, len, SpliceFlags::empty()).map_err(
            |p| DumpErrorKind::Sink {
                entry: e,
                error: partial_to_io(p, len),
            },
        )?;
        self.entries.push(e);
        Ok(())
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.entries.push(e);
        Ok(())
    }
    fn present_bytes(&mut self, e: PagemapEntry, bytes: &[&[u8]]) -> Result<(), DumpErrorKind> {
        for b in bytes {
            write_exact(self.fd.as_fd(), b).map_err(|p| DumpErrorKind::Sink {
                entry: e,
                error: partial_to_io(p, b.len()),
            })?;
        }
        self.entries.push(e);
        Ok(())
    }
    fn prefers_copy(&self) -> bool {
        let kind = page_pipe_sys::fd_kind(self.fd.as_fd());
        FD_PREFERS_COPY.contains(&kind)
    }
}

/// The kinds of file descriptor that are written from memory rather than spliced from
/// pipes. Measured (README, "Performance"): into Unix and TCP sockets `splice` from the
/// pipes beats `write` from the mapping; into files it does not.
const FD_PREFERS_COPY: &[page_pipe_sys::FdKind] = &[page_pipe_sys::FdKind::File];

/// A sink that hands each entry and its pages (empty for entries without pages here) to
/// a function, for callers with a format of their own.
///
/// ```
/// use page_pipe::CallbackSink;
/// let mut total = 0usize;
/// let sink = CallbackSink::new(|_entry, pages: &[u8]| {
///     total += pages.len();
///     Ok(())
/// });
/// # drop(sink);
/// ```
pub struct CallbackSink<F> {
    f: F,
    buf: Vec<u8>,
}

impl<F> fmt::Debug for CallbackSink<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackSink").finish_non_exhaustive()
    }
}

impl<F: FnMut(&PagemapEntry, &[u8]) -> io::Result<()>> CallbackSink<F> {
    /// A sink calling `f(entry, pages)`.
    pub fn new(f: F) -> Self {
        Self { f, buf: Vec::new() }
    }
}

impl<F> sealed::Sealed for CallbackSink<F> {}
impl<F: FnMut(&PagemapEntry, &[u8]) -> io::Result<()>> DumpSink for CallbackSink<F> {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
    ) -> Result<(), DumpErrorKind> {
        self.buf.resize(len, 0);
        page_pipe_sys::read_exact(pipe, &mut self.buf).map_err(|p| DumpErrorKind::Sink {
            entry: e,
            error: partial_to_io(p, len),
        })?;
        (self.f)(&e, &self.buf).map_err(|error| DumpErrorKind::Sink { entry: e, error })
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        (self.f)(&e, &[]).map_err(|error| DumpErrorKind::Sink { entry: e, error })
    }
    fn present_bytes(&mut self, e: PagemapEntry, bytes: &[&[u8]]) -> Result<(), DumpErrorKind> {
        let r = match bytes {
            [one] => (self.f)(&e, one),
            many => {
                self.buf.clear();
                for b in many {
                    self.buf.extend_from_slice(b);
                }
                (self.f)(&e, &self.buf)
            }
        };
        r.map_err(|error| DumpErrorKind::Sink { entry: e, error })
    }
    /// The function gets the memory itself: no pipe, no copy.
    fn prefers_copy(&self) -> bool {
        true
    }
}

pub(crate) fn partial_to_io(p: page_pipe_sys::Partial, len: usize) -> io::Error {
    match p.stopped {
        Stopped::Errno(e) => io::Error::from(e),
        Stopped::EndOfData => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the pipe held {} of {len} bytes", p.done),
        ),
    }
}

impl<'m, M: Mode, I: IovStore> Captured<'m, M, I> {
    /// What the capture did.
    pub fn report(&self) -> CaptureReport {
        self.report
    }

    /// The page pipe, for inspection.
    pub fn page_pipe(&self) -> &PagePipe<M, I, KernelPipes> {
        &self.pp
    }

    /// Releases a buf: its pipe closes once no buf uses it. Pages of a released buf that
    /// share a pipe with later bufs are discarded when those are dumped.
    ///
    /// # Errors
    /// [`UnknownBuf`](crate::UnknownBuf) for a buf already released.
    pub fn release_buf(&mut self, id: crate::BufId) -> Result<(), crate::UnknownBuf> {
        self.pp.release_buf(id)
    }

    /// Whether [`dump`](Self::dump) has run.
    pub fn is_dumped(&self) -> bool {
        self.dumped
    }

    /// Writes the entries and pages to `sink` (see the [module rules](self)).
    ///
    /// # Errors
    /// [`DumpError`] with what was done: the sink failed part way, or this page pipe was
    /// dumped already.
    pub fn dump<S: DumpSink + ?Sized>(&mut self, sink: &mut S) -> Result<DumpReport, DumpError> {
        let mut done = DumpReport::default();
        if self.dumped {
            return Err(DumpError {
                kind: DumpErrorKind::AlreadyDumped,
                done,
            });
        }
        self.dumped = true;
        match self.dump_inner(sink, &mut done) {
            Ok(()) => Ok(done),
            Err(kind) => Err(DumpError { kind, done }),
        }
    }

    fn dump_inner<S: DumpSink + ?Sized>(
        &mut self,
        sink: &mut S,
        done: &mut DumpReport,
    ) -> Result<(), DumpErrorKind> {
        let ps = self.pp.page_size() as u64;
        let transfer_lazy = !self.pp.lazy_pages();
        let mut hole = 0;
        for bi in 0..self.pp.bufs.len() {
            let b = self.pp.bufs[bi];
            if !b.live {
                continue;
            }
            let mut off = 0u64;
            for ri in b.first_run..b.first_run + b.nr_runs {
                let r = self.pp.iovs.runs()[ri];
                while let Some(h) = self.pp.holes.get(hole).filter(|h| h.vaddr < r.vaddr) {
                    let h = *h;
                    hole += 1;
                    emit_hole(sink, h.vaddr, h.pages, h.flags, done)?;
                }
                let lazy = b.flags.contains(BufFlags::LAZY);
                let flags = match (lazy, transfer_lazy) {
                    (false, _) => PageFlags::PRESENT,
                    (true, true) => PageFlags::LAZY | PageFlags::PRESENT,
                    (true, false) => PageFlags::LAZY,
                };
                let e = PagemapEntry {
                    vaddr: r.vaddr,
                    pages: r.pages,
                    flags,
                };
                if flags.contains(PageFlags::PRESENT) {
                    self.discard_to(b.slot, b.pipe_pos + off)?;
                    let len = (r.pages * ps) as usize;
                    let pipe = self.pp.slot(b.slot).pipe.read.as_fd();
                    sink.present(e, pipe, len)?;
                    self.pp.pipes[b.slot].as_mut().expect("open").consumed += r.pages;
                    done.present_pages += r.pages;
                    done.bytes += len as u64;
                } else {
                    sink.absent(e)?;
                    done.lazy_kept += r.pages;
                }
                done.entries += 1;
                off += r.pages;
            }
        }
        while let Some(h) = self.pp.holes.get(hole).copied() {
            hole += 1;
            emit_hole(sink, h.vaddr, h.pages, h.flags, done)?;
        }
        Ok(())
    }

    /// Discards the pages before page `pos` of the pipe in `slot` that are still in it
    /// (those of released bufs).
    fn discard_to(&mut self, slot: usize, pos: u64) -> Result<(), DumpErrorKind> {
        let ps = self.pp.page_size() as u64;
        let consumed = self.pp.slot(slot).consumed;
        if consumed >= pos {
            return Ok(());
        }
        if self.devnull.is_none() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .map_err(DumpErrorKind::Discard)?;
            self.devnull = Some(f);
        }
        let null = self.devnull.as_ref().expect("opened").as_fd();
        let len = ((pos - consumed) * ps) as usize;
        let pipe = self.pp.slot(slot).pipe.read.as_fd();
        splice_exact(pipe, None, null, None, len, SpliceFlags::empty())
            .map_err(|p| DumpErrorKind::Discard(partial_to_io(p, len)))?;
        self.pp.pipes[slot].as_mut().expect("open").consumed = pos;
        Ok(())
    }
}

fn emit_hole<S: DumpSink + ?Sized>(
    sink: &mut S,
    vaddr: u64,
    pages: u64,
    flags: HoleFlags,
    done: &mut DumpReport,
) -> Result<(), DumpErrorKind> {
    if !flags.contains(HoleFlags::PARENT) {
        return Ok(());
    }
    sink.absent(PagemapEntry {
        vaddr,
        pages,
        flags: PageFlags::PARENT,
    })?;
    done.entries += 1;
    done.parent_pages += pages;
    Ok(())
}

impl<'m, I: IovStore> Captured<'m, ChunkMode, I> {
    /// Turns back into a page pipe for the next chunk: bufs whose pipes were drained go to
    /// the free list with their pipes; bufs whose pages are still in their pipes (not
    /// dumped, or lazy) are released, closing those pipes.
    pub fn reinit(mut self) -> PagePipe<ChunkMode, I, KernelPipes> {
        let dirty: Vec<usize> = (0..self.pp.bufs.len())
            .filter(|&i| {
                let b = &self.pp.bufs[i];
                let s = self.pp.slot(b.slot);
                b.live && s.consumed < s.filled
            })
            .collect();
        for i in dirty {
            let b = self.pp.bufs[i];
            self.pp.bufs[i].live = false;
            self.pp.unuse(b.slot);
        }
        self.pp.reinit_inner();
        for s in self.pp.pipes.iter_mut().flatten() {
            s.filled = 0;
            s.consumed = 0;
        }
        self.pp
    }
}
