//! Dump: the entries of a page pipe and their pages, out to a sink.
//!
//! # Rules
//!
//! - A dump walks the page pipe's entries in address order (CRIU's
//!   `page_xfer_dump_pages`, see [`PagePipe::entries`]): `PRESENT` runs with their pages,
//!   `PARENT` holes, and lazy runs (`LAZY`, and `PRESENT` too unless lazy pages are on,
//!   in which case their pages stay in their pipe to be served on demand). Holes without
//!   flags are left out. Pages of released bufs that still sit in a shared pipe are
//!   discarded on the way.
//! - Pages come from the pipes after a capture ([`Captured::dump`]), or straight from the
//!   memory ([`snapshot`](crate::snapshot::snapshot) with [`Drain::Memory`]): both walk
//!   the same bookkeeping, so they give the same entries; only how bytes move differs.
//! - Page references leave the crate only from memory nobody can write any more (owned
//!   anonymous memory, see [`source`](crate::source)). Pages that reference borrowed
//!   memory reach sockets and pipes as copies: an [`FdSink`] on anything but a regular
//!   file reads them out of the pipe and writes them, unless made with the `unsafe`
//!   [`FdSink::new_zero_copy`], whose caller promises the memory stays unchanged until
//!   the reader has read. A regular file copies what it is given into its page cache, a
//!   [`CallbackSink`] gets the bytes, an [`ImageWriter`] writes files.
//! - A dump runs once. When a sink fails part way, [`DumpError`] says what was done; the
//!   pipe it was reading from is then lost: its pages are not served again. So is the
//!   pipe of a sink that panicked (a callback's panic, caught by the caller). An image sink
//!   that failed refuses to finish and commits nothing.
//!
//! [`Drain::Memory`]: crate::snapshot::Drain::Memory

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use page_pipe_sys::{FdKind, SpliceFlags, splice_exact, write_exact};

use crate::backend::PipeBackend;
use crate::capture::Captured;
use crate::image::{ImageError, ImageWriter, PageFlags, PagemapEntry};
use crate::mode::{IovStore, Mode};
use crate::page_pipe::{DumpCursor, DumpItem, PagePipe};
use crate::progress::Throttle;
use crate::source::{Chunk, Iovs, Source};

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

impl DumpReport {
    fn count(&mut self, e: &PagemapEntry, page_size: u64) {
        self.entries += 1;
        if e.is_present() {
            self.present_pages += e.pages;
            self.bytes += e.pages * page_size;
        } else if e.flags.contains(PageFlags::PARENT) {
            self.parent_pages += e.pages;
        } else {
            self.lazy_kept += e.pages;
        }
    }

    /// Adds up two reports (of two chunks, say).
    pub(crate) fn add(&mut self, o: &DumpReport) {
        self.entries += o.entries;
        self.present_pages += o.present_pages;
        self.parent_pages += o.parent_pages;
        self.lazy_kept += o.lazy_kept;
        self.bytes += o.bytes;
    }
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
            DumpErrorKind::Image(_) => f.write_str("the image sink failed")?,
            DumpErrorKind::Sink { entry, .. } => write!(f, "the sink failed on entry {entry}")?,
            DumpErrorKind::Discard(_) => f.write_str("cannot discard released pages")?,
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

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// Where a dump goes: [`ImageWriter`] (an image directory), [`FdSink`] (pages to any file,
/// socket or pipe, entries kept in memory), or [`CallbackSink`] (your own format). Sealed.
pub trait DumpSink: sealed::Sealed {
    /// Takes a `PRESENT` entry and exactly its `len` bytes of pages from the front of
    /// `pipe`; `pinned`: the pipe references memory that may change once the capture's
    /// borrow ends, so the pages must not leave the crate by reference.
    #[doc(hidden)]
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
        pinned: bool,
    ) -> Result<(), DumpErrorKind>;
    /// Takes an entry without pages here (`PARENT`, or `LAZY` kept in its pipe).
    #[doc(hidden)]
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind>;
    /// Takes a `PRESENT` entry with its pages from memory, one chunk per memory region.
    #[doc(hidden)]
    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind>;
    /// Whether this sink is better fed from memory than from pipes, for memory that is
    /// `sealed` (may leave by reference) or not (see
    /// [`snapshot`](crate::snapshot::snapshot)).
    #[doc(hidden)]
    fn prefers_memory(&self, sealed: bool) -> bool;
}

impl sealed::Sealed for ImageWriter {}
impl DumpSink for ImageWriter {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        _len: usize,
        _pinned: bool,
    ) -> Result<(), DumpErrorKind> {
        // A file copies what it is given: references do not outlive the call.
        self.push_from_pipe(e, pipe)
            .map_err(|e| DumpErrorKind::Image(Box::new(e)))
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.push(e).map_err(|e| DumpErrorKind::Image(Box::new(e)))
    }
    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind> {
        self.push_chunks(e, chunks)
            .map_err(|e| DumpErrorKind::Image(Box::new(e)))
    }
    fn prefers_memory(&self, _sealed: bool) -> bool {
        IMAGE_PREFERS_MEMORY
    }
}

/// Whether image files are written from memory rather than spliced from pipes. Measured
/// (README, "Performance"): `splice` into a file is no faster than `write` from the
/// mapping, and the capture costs on top, so files are written from memory.
const IMAGE_PREFERS_MEMORY: bool = true;

/// A sink that writes pages into a file, socket or pipe, one entry after another, and
/// keeps the entries in memory (contiguous entries with equal flags joined).
///
/// Pages that reference memory that may change (borrowed memory) go into sockets and
/// pipes as copies; into a regular file they are spliced (a file copies what it is
/// given). [`new_zero_copy`](Self::new_zero_copy) lets references through, under a
/// promise.
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
    /// The descriptor `fd` gave when asked last, and its kind: `AsFd` may answer with
    /// another descriptor next time, so each transfer asks again and checks the kind of
    /// what it got (a descriptor's kind never changes while its owner keeps it open).
    raw: RawFd,
    kind: FdKind,
    zero_copy: bool,
    entries: Vec<PagemapEntry>,
    buf: Vec<u8>,
}

/// Bytes read out of a pipe at a time when pages go out as copies.
const BOUNCE: usize = 1 << 20;

impl<F: AsFd> FdSink<F> {
    /// A sink writing pages to `fd` (at its file position, if it is a file).
    pub fn new(fd: F) -> Self {
        let borrowed = fd.as_fd();
        let (raw, kind) = (borrowed.as_raw_fd(), page_pipe_sys::fd_kind(borrowed));
        Self {
            fd,
            raw,
            kind,
            zero_copy: false,
            entries: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// A sink that splices pages into `fd` by reference even when they reference memory
    /// that may change: the reader at the other end reads the memory as it is when it
    /// reads, not as it was at capture, unless the promise below is kept.
    ///
    /// # Safety
    /// This is not about memory safety but about the consistency the crate promises: the
    /// memory of every page dumped into this sink stays unchanged until the reader at the
    /// other end of `fd` has read it (DESIGN.md, "When page references may leave the
    /// crate"). Breaking it does not cause undefined behaviour; the reader gets later
    /// bytes than the capture's.
    // The contract is the crate's consistency promise, not memory safety, so `unsafe` here
    // marks an opt-in rather than code that could cause undefined behaviour.
    #[allow(unsafe_code)]
    pub unsafe fn new_zero_copy(fd: F) -> Self {
        Self {
            zero_copy: true,
            ..Self::new(fd)
        }
    }

    /// The entries so far, in order, contiguous ones with equal flags joined.
    pub fn entries(&self) -> &[PagemapEntry] {
        &self.entries
    }

    /// The descriptor and the entries.
    pub fn into_parts(self) -> (F, Vec<PagemapEntry>) {
        (self.fd, self.entries)
    }

    fn record(&mut self, e: PagemapEntry) {
        if let Some(last) = self.entries.last_mut()
            && last.flags == e.flags
            && last.end(page_pipe_sys::page_size().get()) == Some(e.vaddr)
        {
            last.pages += e.pages;
            return;
        }
        self.entries.push(e);
    }

    /// The descriptor to write to now, and its kind.
    fn target(&mut self) -> (BorrowedFd<'_>, FdKind) {
        let fd = self.fd.as_fd();
        if fd.as_raw_fd() != self.raw {
            self.raw = fd.as_raw_fd();
            self.kind = page_pipe_sys::fd_kind(fd);
        }
        (fd, self.kind)
    }
}

impl<F: AsFd> sealed::Sealed for FdSink<F> {}
impl<F: AsFd> DumpSink for FdSink<F> {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
        pinned: bool,
    ) -> Result<(), DumpErrorKind> {
        let fail = |error| DumpErrorKind::Sink { entry: e, error };
        let zero_copy = self.zero_copy;
        let mut buf = std::mem::take(&mut self.buf);
        // The kind of the very descriptor the pages go to decides how they go.
        let (fd, kind) = self.target();
        let r = if pinned && !zero_copy && kind != FdKind::File {
            // Copies: read the pages out of the pipe and write them.
            buf.resize(len.min(BOUNCE), 0);
            let mut left = len;
            let mut r = Ok(());
            while left > 0 && r.is_ok() {
                let n = left.min(BOUNCE);
                r = page_pipe_sys::read_exact(pipe, &mut buf[..n])
                    .and_then(|()| write_exact(fd, &buf[..n]));
                left -= n;
            }
            r
        } else {
            splice_exact(pipe, None, fd, None, len, SpliceFlags::empty())
        };
        self.buf = buf;
        r.map_err(|p| fail(p.into()))?;
        self.record(e);
        Ok(())
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.record(e);
        Ok(())
    }
    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind> {
        for c in chunks {
            // Written from memory: the fd gets copies.
            c.write_to(self.fd.as_fd(), None)
                .map_err(|p| DumpErrorKind::Sink {
                    entry: e,
                    error: p.into(),
                })?;
        }
        self.record(e);
        Ok(())
    }
    fn prefers_memory(&self, sealed: bool) -> bool {
        // Measured (bench, "drain paths", three runs on a quiet machine, 1 GiB): into
        // files and sockets `splice` out of pipes buys nothing over `write` from memory,
        // even when the pages go by reference (Unix socket 0.58-0.62x of `write`, TCP
        // over loopback 0.43-0.47x; from memory 0.95-1.04x), so they are written from
        // memory. Pipes (and other descriptors) keep the pipes when the pages may go by
        // reference; copies are written from memory.
        matches!(
            self.kind,
            FdKind::File | FdKind::InetSocket | FdKind::UnixSocket
        ) || !(sealed || self.zero_copy)
    }
}

/// A sink that hands each entry and its pages (empty for entries without pages here) to
/// a function, for callers with a format of their own.
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::{BufFlags, CallbackSink, PagePipe, Source};
/// let ps = page_pipe::page_size();
/// let mut mem = MmapOptions::new().len(4 * ps).map_anon()?;
/// mem.fill(5);
/// let source = Source::new().with_slice(0x10_0000, &mem[..])?;
/// let mut pp = PagePipe::builder().iov_budget(4).build()?;
/// pp.add_pages(0x10_0000, 4, BufFlags::empty())?;
/// let mut captured = pp.capture(&source)?;
/// let (mut total, mut fives) = (0usize, 0usize);
/// let mut sink = CallbackSink::new(|_entry, pages: &[u8]| {
///     total += pages.len();
///     fives += pages.iter().filter(|&&b| b == 5).count();
///     Ok(())
/// });
/// captured.dump(&mut sink)?;
/// drop(sink);
/// assert_eq!((total, fives), (4 * ps, 4 * ps));
/// # Ok::<(), Box<dyn std::error::Error>>(())
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
        _pinned: bool,
    ) -> Result<(), DumpErrorKind> {
        // The function gets a copy of the pages in a buffer of ours.
        self.buf.resize(len, 0);
        page_pipe_sys::read_exact(pipe, &mut self.buf).map_err(|p| DumpErrorKind::Sink {
            entry: e,
            error: p.into(),
        })?;
        (self.f)(&e, &self.buf).map_err(|error| DumpErrorKind::Sink { entry: e, error })
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        (self.f)(&e, &[]).map_err(|error| DumpErrorKind::Sink { entry: e, error })
    }
    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind> {
        let r = match chunks.first().and_then(Chunk::as_slice) {
            Some(one) if chunks.len() == 1 => (self.f)(&e, one),
            _ => {
                // Several regions, or memory others may write: a copy of ours.
                let total = chunks.iter().map(Chunk::len).sum();
                self.buf.resize(total, 0);
                let mut at = 0;
                for c in chunks {
                    c.copy_to(&mut self.buf[at..at + c.len()]);
                    at += c.len();
                }
                (self.f)(&e, &self.buf)
            }
        };
        r.map_err(|error| DumpErrorKind::Sink { entry: e, error })
    }
    /// The function gets the memory itself: no pipe, no copy.
    fn prefers_memory(&self, _sealed: bool) -> bool {
        true
    }
}

/// A sink that counts the pages of the entries it passes on (present and lazy, not
/// those in the parent) as progress.
pub(crate) struct Counting<'a, S: ?Sized> {
    pub(crate) sink: &'a mut S,
    pub(crate) throttle: &'a mut Throttle,
}

impl<S: ?Sized> Counting<'_, S> {
    fn count(&mut self, e: &PagemapEntry) {
        if !e.flags.contains(PageFlags::PARENT) {
            self.throttle.advance(e.pages);
        }
    }
}

impl<S: DumpSink + ?Sized> sealed::Sealed for Counting<'_, S> {}
impl<S: DumpSink + ?Sized> DumpSink for Counting<'_, S> {
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
        pinned: bool,
    ) -> Result<(), DumpErrorKind> {
        self.sink.present(e, pipe, len, pinned)?;
        self.count(&e);
        Ok(())
    }
    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.sink.absent(e)?;
        self.count(&e);
        Ok(())
    }
    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind> {
        self.sink.present_chunks(e, chunks)?;
        self.count(&e);
        Ok(())
    }
    fn prefers_memory(&self, sealed: bool) -> bool {
        self.sink.prefers_memory(sealed)
    }
}

impl<M: Mode, I: IovStore> Captured<'_, M, I> {
    /// Writes the entries and pages to `sink` (see the [module rules](self)).
    ///
    /// # Errors
    /// [`DumpError`] with what was done: the sink failed part way, or this page pipe was
    /// dumped already.
    pub fn dump<S: DumpSink + ?Sized>(&mut self, sink: &mut S) -> Result<DumpReport, DumpError> {
        let mut done = DumpReport::default();
        if self.mark_dumped() {
            return Err(DumpError {
                kind: DumpErrorKind::AlreadyDumped,
                done,
            });
        }
        let (pp, devnull, _) = self.parts();
        let ps = pp.page_size() as u64;
        let mut cursor = DumpCursor::new();
        while let Some(item) = cursor.next(pp) {
            let e = match item {
                DumpItem::Absent(e) => {
                    sink.absent(e).map_err(|kind| DumpError { kind, done })?;
                    e
                }
                DumpItem::Present {
                    entry,
                    buf,
                    slot,
                    pos,
                } => {
                    // Until the sink returns, the pipe's front is unknown: a sink that
                    // panics (a caller's callback) unwinds past the books below, and the
                    // pipe must then serve nothing more.
                    pp.lose(slot);
                    let r = discard_to(pp, devnull, slot, pos).and_then(|()| {
                        let len = (entry.pages * ps) as usize;
                        let pinned = pp.buf_info(buf).pinned;
                        let pipe = pp.pipe(slot).read.as_fd();
                        sink.present(entry, pipe, len, pinned)
                    });
                    if let Err(kind) = r {
                        return Err(DumpError { kind, done });
                    }
                    pp.consume(slot, entry.pages);
                    pp.regain(slot);
                    entry
                }
            };
            done.count(&e, ps);
        }
        Ok(done)
    }
}

/// Discards the pages before page `pos` of the pipe in `slot` that are still in it (those
/// of bufs released after the capture).
fn discard_to<M: Mode, I: IovStore>(
    pp: &mut PagePipe<M, I, crate::KernelPipes>,
    devnull: &mut Option<std::fs::File>,
    slot: usize,
    pos: u64,
) -> Result<(), DumpErrorKind> {
    let consumed = pp.slot(slot).map_or(0, |s| s.consumed());
    if consumed >= pos {
        return Ok(());
    }
    if devnull.is_none() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(DumpErrorKind::Discard)?;
        *devnull = Some(f);
    }
    let null = devnull.as_ref().expect("opened above").as_fd();
    let len = ((pos - consumed) * pp.page_size() as u64) as usize;
    let pipe = pp.pipe(slot).read.as_fd();
    splice_exact(pipe, None, null, None, len, SpliceFlags::empty())
        .map_err(|p| DumpErrorKind::Discard(p.into()))?;
    pp.consume(slot, pos - consumed);
    Ok(())
}

/// Where the memory drain takes the bytes of each present entry from: a [`Source`], or
/// (for a live snapshot) memory whose pages may have been saved aside.
pub(crate) trait PageBytes {
    /// Checks that the pages of `entry` can be had; the first address that cannot.
    fn check(&mut self, entry: &PagemapEntry) -> Result<(), u64>;
    /// The chunks holding the pages of `entry`, in order, appended to `out`; they stay
    /// valid until [`release`](Self::release).
    fn get<'a>(&'a mut self, entry: &PagemapEntry, out: &mut Vec<Chunk<'a>>) -> Result<(), u64>;
    /// The dump is done with the pages of `entry` (written, or failed).
    fn release(&mut self, entry: &PagemapEntry);
}

/// The bytes of a source: its memory, as chunks.
pub(crate) struct SourceBytes<'s, 'm> {
    pub(crate) source: &'s Source<'m>,
    pub(crate) iovs: Iovs<'s>,
}

impl PageBytes for SourceBytes<'_, '_> {
    fn check(&mut self, entry: &PagemapEntry) -> Result<(), u64> {
        self.iovs.clear();
        self.source.iovs(entry.vaddr, entry.pages, &mut self.iovs)
    }
    fn get<'a>(&'a mut self, entry: &PagemapEntry, out: &mut Vec<Chunk<'a>>) -> Result<(), u64> {
        self.iovs.clear();
        self.source.iovs(entry.vaddr, entry.pages, &mut self.iovs)?;
        out.extend(self.iovs.chunks(0..self.iovs.len()));
        Ok(())
    }
    fn release(&mut self, _entry: &PagemapEntry) {}
}

impl<M: Mode, I: IovStore, B: PipeBackend> PagePipe<M, I, B> {
    /// Dumps what the page pipe recorded straight from memory into `sink`, taking each
    /// present entry's bytes from `bytes`: the same entries, in the same order, as a
    /// capture and [`Captured::dump`] would give, with the bytes taken from memory
    /// instead of pipes.
    pub(crate) fn dump_from<S: DumpSink + ?Sized>(
        &mut self,
        bytes: &mut dyn PageBytes,
        sink: &mut S,
    ) -> Result<DumpReport, MemoryDumpError> {
        let ps = self.page_size() as u64;
        self.begin_drain();
        // Every present page must be there before anything goes out, as a capture checks
        // before any syscall.
        let mut cursor = DumpCursor::new();
        while let Some(item) = cursor.next(self) {
            if let DumpItem::Present { entry, .. } = item {
                bytes.check(&entry).map_err(MemoryDumpError::NotCovered)?;
            }
        }
        let mut done = DumpReport::default();
        let mut cursor = DumpCursor::new();
        while let Some(item) = cursor.next(self) {
            let e = match item {
                DumpItem::Absent(e) => {
                    sink.absent(e)
                        .map_err(|kind| MemoryDumpError::Dump(DumpError { kind, done }))?;
                    e
                }
                DumpItem::Present { entry, slot, .. } => {
                    let mut chunks = Vec::new();
                    let r = bytes
                        .get(&entry, &mut chunks)
                        .map_err(MemoryDumpError::NotCovered)
                        .and_then(|()| {
                            sink.present_chunks(entry, &chunks)
                                .map_err(|kind| MemoryDumpError::Dump(DumpError { kind, done }))
                        });
                    drop(chunks);
                    bytes.release(&entry);
                    if let Err(e) = r {
                        self.lose(slot);
                        return Err(e);
                    }
                    self.consume(slot, entry.pages);
                    entry
                }
            };
            done.count(&e, ps);
        }
        Ok(done)
    }
}

/// Why a dump from memory stopped.
#[derive(Debug)]
pub(crate) enum MemoryDumpError {
    /// The page at this address is in no region of the source.
    NotCovered(u64),
    /// The sink failed.
    Dump(DumpError),
}
