//! Snapshots end to end: a plan of spans (pages to capture, holes) goes through a page
//! pipe, in chunks or in one pass, into a sink.
//!
//! In chunk mode (the default) the driver adds spans until the page pipe is full (or its
//! iov budget is used up), drains it, re-inits and goes on, so any amount of memory
//! passes through at most 8 pipes. With an [`ImageWriter`](crate::image::ImageWriter) as
//! the sink, the image is the same as one written in a single pass.
//!
//! There is one pipeline whichever way the bytes go ([`Drain`]): the page pipe records
//! the plan and decides the entries, their order and flags; then either a capture puts
//! the pages into pipes and a dump splices them out, or the dump takes them straight from
//! the memory (a page pipe over pipes that exist only in its books, sized as the kernel
//! would size them). Both give the same entries. Sinks that gain nothing from pipes
//! (files and sockets, where `splice` was measured no faster than `write` from the
//! mapping; a callback, which can read the memory itself; pipes when the pages would
//! have to be copied anyway) are fed from memory by default. The memory is borrowed for
//! the whole call either way.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_pipe_sys::PipeLimits;

use crate::backend::{KernelPipes, PipeBackend, PipePool, VirtualPipes};
use crate::builder::BuildError;
use crate::capture::{CaptureError, CaptureMode, CapturePath};
use crate::dump::{
    Counting, DumpError, DumpReport, DumpSink, MemoryDumpError, PageBytes, SourceBytes,
};
use crate::mode::{Mode, OwnIovs};
use crate::page_pipe::{AddError, Outcome, PagePipe};
use crate::progress::{ProgressFn, Throttle};
use crate::source::{Iovs, Source};
use crate::types::{BufFlags, HoleFlags};

/// One span of a snapshot plan, in address order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Pages to capture.
    Pages {
        /// The first page.
        addr: u64,
        /// How many.
        pages: u64,
        /// Buf flags.
        flags: BufFlags,
    },
    /// Pages not captured (with `PARENT`: in the parent snapshot).
    Hole {
        /// The first page.
        addr: u64,
        /// How many.
        pages: u64,
        /// Hole flags.
        flags: HoleFlags,
    },
}

/// How the pages reach the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Drain {
    /// As the sink does best (measured; see the README): through pipes into pipes when
    /// the pages may leave by reference (memory nobody can write any more, or a sink made
    /// with [`FdSink::new_zero_copy`](crate::FdSink::new_zero_copy)); straight from memory
    /// otherwise, and always into files and sockets. The default.
    #[default]
    Auto,
    /// Always through pipes: capture with `vmsplice`, then a dump out of the pipes.
    Pipes,
    /// Always straight from memory: the same entries, no pipes.
    Memory,
}

/// How to take a snapshot.
#[derive(Clone)]
pub struct SnapshotOptions {
    /// How pages reach the sink (default [`Drain::Auto`]).
    pub drain: Drain,
    /// Chunk mode (default on): at most 8 pipes at a time.
    pub chunk_mode: bool,
    /// The iov budget of the page pipe (default 16384 runs).
    pub iov_budget: usize,
    /// Lazy pages (default off).
    pub lazy_pages: bool,
    /// How to capture (default [`CaptureMode::Auto`]).
    pub capture: CaptureMode,
    /// The largest pipe, in pages (default: the page pipe's default).
    pub max_pipe_pages: Option<u64>,
    /// A pool to take pipes from and give them back to.
    pub pool: Option<Arc<PipePool>>,
    /// Called with the pages written so far and the pages of the plan, at a bounded rate
    /// (see [`ProgressFn`]).
    pub progress: Option<ProgressFn>,
}

impl fmt::Debug for SnapshotOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotOptions")
            .field("drain", &self.drain)
            .field("chunk_mode", &self.chunk_mode)
            .field("iov_budget", &self.iov_budget)
            .field("lazy_pages", &self.lazy_pages)
            .field("capture", &self.capture)
            .field("max_pipe_pages", &self.max_pipe_pages)
            .field("pool", &self.pool)
            .field("progress", &self.progress.as_ref().map(|_| "callback"))
            .finish()
    }
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            drain: Drain::Auto,
            chunk_mode: true,
            iov_budget: 16384,
            lazy_pages: false,
            capture: CaptureMode::Auto,
            max_pipe_pages: None,
            pool: None,
            progress: None,
        }
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Pages captured.
    pub pages: u64,
    /// Pages in holes.
    pub hole_pages: u64,
    /// Chunks (drains) it took.
    pub chunks: u64,
    /// Pipes made (0 when fed from memory).
    pub pipes_made: u64,
    /// The capture path (of the last chunk), or [`CapturePath::Direct`] from memory.
    pub path: CapturePath,
    /// What the dumps wrote, over all chunks.
    pub dump: DumpReport,
    /// Time adding spans to the page pipe.
    pub add_time: Duration,
    /// Time capturing.
    pub capture_time: Duration,
    /// Time dumping.
    pub dump_time: Duration,
}

/// Why a snapshot failed. The cause is its [`source`](std::error::Error::source).
#[derive(Debug)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The page pipe could not be built.
    Build(BuildError),
    /// A span could not be added.
    Add(AddError),
    /// The capture failed (or, from memory, a page is in no region of the source).
    Capture(CaptureError),
    /// The dump failed.
    Dump(DumpError),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnapshotError::Build(_) => "cannot set up the page pipe",
            SnapshotError::Add(_) => "cannot record the plan",
            SnapshotError::Capture(_) => "cannot capture",
            SnapshotError::Dump(_) => "cannot dump",
        })
    }
}

impl std::error::Error for SnapshotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SnapshotError::Build(e) => Some(e),
            SnapshotError::Add(e) => Some(e),
            SnapshotError::Capture(e) => Some(e),
            SnapshotError::Dump(e) => Some(e),
        }
    }
}

/// Takes a snapshot of `source` following `plan` into `sink`.
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::image::{Image, ImageWriter};
/// use page_pipe::snapshot::{snapshot, SnapshotOptions, Span};
/// use page_pipe::{BufFlags, Source};
/// let ps = page_pipe::page_size();
/// let mut mem = MmapOptions::new().len(64 * ps).map_anon()?;
/// mem.fill(3);
/// let base = 0x40_0000;
/// let source = Source::new().with_slice(base, &mem[..])?;
/// let dir = std::env::temp_dir().join(format!("pp-doc-snap-{}", std::process::id()));
/// let mut w = ImageWriter::create(&dir, 1)?;
/// let plan = [Span::Pages { addr: base, pages: 64, flags: BufFlags::empty() }];
/// let report = snapshot(&source, plan, &mut w, &SnapshotOptions::default())?;
/// w.finish()?;
/// assert_eq!(report.pages, 64);
/// let mut back = vec![0u8; 64 * ps];
/// Image::open(&dir)?.read(base, &mut back)?;
/// assert!(back == mem[..]);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`SnapshotError`]: what failed, naming the address, page or file.
pub fn snapshot<S: DumpSink + ?Sized>(
    source: &Source<'_>,
    plan: impl IntoIterator<Item = Span>,
    sink: &mut S,
    opts: &SnapshotOptions,
) -> Result<SnapshotReport, SnapshotError> {
    with_progress(&mut Feed::Source(source), plan, sink, opts)
}

/// [`snapshot`] from any feed; a feed of bytes always goes straight from memory.
pub(crate) fn snapshot_feed<S: DumpSink + ?Sized>(
    feed: &mut Feed<'_, '_>,
    plan: impl IntoIterator<Item = Span>,
    sink: &mut S,
    opts: &SnapshotOptions,
) -> Result<SnapshotReport, SnapshotError> {
    with_progress(feed, plan, sink, opts)
}

fn with_progress<S: DumpSink + ?Sized>(
    feed: &mut Feed<'_, '_>,
    plan: impl IntoIterator<Item = Span>,
    sink: &mut S,
    opts: &SnapshotOptions,
) -> Result<SnapshotReport, SnapshotError> {
    if opts.progress.is_none() {
        return snapshot_into(feed, plan, sink, opts);
    }
    // The plan's pages, for the total: spans are few, so collecting them is cheap.
    let plan: Vec<Span> = plan.into_iter().collect();
    let total = plan
        .iter()
        .map(|s| match s {
            Span::Pages { pages, .. } => *pages,
            Span::Hole { .. } => 0,
        })
        .sum();
    let mut throttle = Throttle::new(opts.progress.clone(), total);
    let mut counting = Counting {
        sink,
        throttle: &mut throttle,
    };
    let report = snapshot_into(feed, plan, &mut counting, opts)?;
    throttle.finish();
    Ok(report)
}

fn snapshot_into<S: DumpSink + ?Sized>(
    feed: &mut Feed<'_, '_>,
    plan: impl IntoIterator<Item = Span>,
    sink: &mut S,
    opts: &SnapshotOptions,
) -> Result<SnapshotReport, SnapshotError> {
    let memory = match (feed as &Feed<'_, '_>, opts.drain) {
        (Feed::Bytes(_), _) => true,
        (Feed::Source(source), Drain::Auto) => sink.prefers_memory(source.is_sealed()),
        (Feed::Source(_), Drain::Pipes) => false,
        (Feed::Source(_), Drain::Memory) => true,
    };
    let limits = *PipeLimits::get().map_err(|e| SnapshotError::Build(BuildError::Limits(e)))?;
    let mut run = Run {
        report: SnapshotReport {
            pages: 0,
            hole_pages: 0,
            chunks: 0,
            pipes_made: 0,
            path: match (memory, opts.capture) {
                (true, _) => CapturePath::Direct,
                (false, CaptureMode::Auto) => CapturePath::VmspliceGift,
                (false, CaptureMode::Copy) => CapturePath::Copy,
            },
            dump: DumpReport::default(),
            add_time: Duration::ZERO,
            capture_time: Duration::ZERO,
            dump_time: Duration::ZERO,
        },
        mode: opts.capture,
    };
    if memory {
        run.start(VirtualPipes::new(limits), feed, plan, sink, opts)?;
        run.report.pipes_made = 0;
    } else {
        let mut backend = KernelPipes::with_limits(limits);
        if let Some(pool) = &opts.pool {
            backend = backend.with_pool(Arc::clone(pool));
        }
        run.start(backend, feed, plan, sink, opts)?;
    }
    Ok(run.report)
}

/// Where the pages of a snapshot come from.
pub(crate) enum Feed<'a, 'm> {
    /// A source's memory: captured into pipes, or read from memory.
    Source(&'a Source<'m>),
    /// A provider of bytes (a live snapshot's memory, pages saved aside): from memory only.
    Bytes(&'a mut dyn PageBytes),
}

/// How a drain moves bytes: through pipes or from memory. The page pipe decides the rest.
trait Mover: PipeBackend + Sized {
    /// Drains `pp` into `sink` and, in chunk mode, re-inits it for the next chunk.
    fn drain<M: Mode, S: DumpSink + ?Sized>(
        pp: PagePipe<M, OwnIovs, Self>,
        run: &mut Run,
        feed: &mut Feed<'_, '_>,
        sink: &mut S,
    ) -> Result<PagePipe<M, OwnIovs, Self>, SnapshotError>;
}

impl Mover for KernelPipes {
    fn drain<M: Mode, S: DumpSink + ?Sized>(
        pp: PagePipe<M, OwnIovs, Self>,
        run: &mut Run,
        feed: &mut Feed<'_, '_>,
        sink: &mut S,
    ) -> Result<PagePipe<M, OwnIovs, Self>, SnapshotError> {
        let Feed::Source(source) = feed else {
            unreachable!("only sources are captured into pipes")
        };
        let t = Instant::now();
        let mut captured = pp
            .capture_with(source, run.mode)
            .map_err(SnapshotError::Capture)?;
        run.report.capture_time += t.elapsed();
        run.report.path = captured.report().path;
        let t = Instant::now();
        let done = captured.dump(sink).map_err(SnapshotError::Dump)?;
        run.report.dump_time += t.elapsed();
        run.report.dump.add(&done);
        let mut pp = captured.into_page_pipe();
        pp.reinit_drained_if_chunked();
        Ok(pp)
    }
}

impl Mover for VirtualPipes {
    fn drain<M: Mode, S: DumpSink + ?Sized>(
        mut pp: PagePipe<M, OwnIovs, Self>,
        run: &mut Run,
        feed: &mut Feed<'_, '_>,
        sink: &mut S,
    ) -> Result<PagePipe<M, OwnIovs, Self>, SnapshotError> {
        let t = Instant::now();
        let mut from_source;
        let bytes: &mut dyn PageBytes = match feed {
            Feed::Source(source) => {
                from_source = SourceBytes {
                    source,
                    iovs: Iovs::new(),
                };
                &mut from_source
            }
            Feed::Bytes(b) => &mut **b,
        };
        let done = pp.dump_from(bytes, sink).map_err(|e| match e {
            MemoryDumpError::NotCovered(addr) => {
                SnapshotError::Capture(CaptureError::NotCovered { addr })
            }
            MemoryDumpError::Dump(e) => SnapshotError::Dump(e),
        })?;
        run.report.dump_time += t.elapsed();
        run.report.dump.add(&done);
        pp.reinit_drained_if_chunked();
        Ok(pp)
    }
}

struct Run {
    report: SnapshotReport,
    mode: CaptureMode,
}

impl Run {
    fn start<B: Mover, S: DumpSink + ?Sized>(
        &mut self,
        backend: B,
        feed: &mut Feed<'_, '_>,
        plan: impl IntoIterator<Item = Span>,
        sink: &mut S,
        opts: &SnapshotOptions,
    ) -> Result<(), SnapshotError> {
        // Pipes fill up here, so each is sized to the cap at once rather than doubled.
        let mut b = PagePipe::builder()
            .lazy_pages(opts.lazy_pages)
            .initial_pipe_pages(u64::MAX);
        if let Some(m) = opts.max_pipe_pages {
            b = b.max_pipe_pages(m);
        }
        if opts.chunk_mode {
            let pp = b
                .chunk_mode()
                .iov_budget(opts.iov_budget)
                .build_with(backend)
                .map_err(SnapshotError::Build)?;
            self.go(pp, feed, plan, sink)
        } else {
            let pp = b
                .iov_budget(opts.iov_budget)
                .build_with(backend)
                .map_err(SnapshotError::Build)?;
            self.go(pp, feed, plan, sink)
        }
    }

    /// Adds the plan's spans, draining whenever the page pipe is full (chunk mode) or its
    /// iov budget is used up, and once at the end.
    fn go<M: Mode, B: Mover, S: DumpSink + ?Sized>(
        &mut self,
        mut pp: PagePipe<M, OwnIovs, B>,
        feed: &mut Feed<'_, '_>,
        plan: impl IntoIterator<Item = Span>,
        sink: &mut S,
    ) -> Result<(), SnapshotError> {
        let ps = pp.page_size() as u64;
        let mut t = Instant::now();
        for span in plan {
            match span {
                Span::Hole { addr, pages, flags } => {
                    pp.add_holes(addr, pages, flags)
                        .map_err(SnapshotError::Add)?;
                    self.report.hole_pages += pages;
                }
                Span::Pages { addr, pages, flags } => {
                    let (mut at, mut left) = (addr, pages);
                    // Whether the last drain made no progress, to stop a loop on a budget
                    // too small for one run.
                    let mut stuck = false;
                    loop {
                        let added = match pp.add_run(at, left, flags) {
                            Ok(Outcome::Done) => left,
                            Ok(Outcome::Full { added }) => added,
                            Err(AddError::IovBudget { added, .. })
                                if M::CHUNK && !(stuck && added == 0) =>
                            {
                                added
                            }
                            Err(e) => return Err(SnapshotError::Add(e)),
                        };
                        self.report.pages += added;
                        at += added * ps;
                        left -= added;
                        if left == 0 {
                            break;
                        }
                        self.report.add_time += t.elapsed();
                        self.report.pipes_made = self.report.pipes_made.max(pp.stats().pipes_made);
                        pp = B::drain(pp, self, feed, sink)?;
                        self.report.chunks += 1;
                        t = Instant::now();
                        stuck = added == 0;
                    }
                }
            }
        }
        self.report.add_time += t.elapsed();
        self.report.pipes_made = self.report.pipes_made.max(pp.stats().pipes_made);
        B::drain(pp, self, feed, sink)?;
        self.report.chunks += 1;
        Ok(())
    }
}

/// Turns a per-page predicate into spans: runs of pages for which `capture(page index)`
/// is true become [`Span::Pages`] with `flags`, the others [`Span::Hole`] with
/// `hole_flags`. Pages are `pages` pages from `addr`, of `page_size` bytes.
///
/// ```
/// use page_pipe::snapshot::{spans_from, Span};
/// use page_pipe::{BufFlags, HoleFlags};
/// let spans: Vec<Span> = spans_from(0, 4, 4096, |i| i != 2, BufFlags::empty(), HoleFlags::PARENT).collect();
/// assert_eq!(spans.len(), 3);
/// assert_eq!(spans[1], Span::Hole { addr: 0x2000, pages: 1, flags: HoleFlags::PARENT });
/// ```
pub fn spans_from<F: FnMut(u64) -> bool>(
    addr: u64,
    pages: u64,
    page_size: usize,
    mut capture: F,
    flags: BufFlags,
    hole_flags: HoleFlags,
) -> impl Iterator<Item = Span> {
    let ps = page_size as u64;
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= pages {
            return None;
        }
        let start = i;
        let take = capture(i);
        i += 1;
        while i < pages && capture(i) == take {
            i += 1;
        }
        let (a, n) = (addr + start * ps, i - start);
        Some(if take {
            Span::Pages {
                addr: a,
                pages: n,
                flags,
            }
        } else {
            Span::Hole {
                addr: a,
                pages: n,
                flags: hole_flags,
            }
        })
    })
}
