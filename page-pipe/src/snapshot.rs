//! Snapshots end to end: a plan of spans (pages to capture, holes) goes through a page
//! pipe, in chunks or in one pass, into a sink.
//!
//! In chunk mode (the default) the driver adds spans until the page pipe is full (or its
//! iov budget is used up), captures, dumps, re-inits and goes on, so any amount of memory
//! passes through at most 8 pipes. With an [`ImageWriter`](crate::image::ImageWriter) as
//! the sink, the image is the same as one written in a single pass.
//!
//! Sinks that gain nothing from pipes (files, where `splice` was measured no faster than
//! `write` from the mapping; a callback, which can read the memory itself) are fed
//! straight from memory instead ([`Drain`]): the entries and bytes are the same, and the
//! memory is borrowed for the whole call either way. Sockets get the pipes.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{KernelPipes, PipePool};
use crate::builder::{BuildError, ChunkMode, Mode, OwnIovs, SinglePass};
use crate::capture::{
    CaptureError, CaptureMode, CapturePath, Captured, DumpError, DumpReport, DumpSink,
};
use crate::image::{PageFlags, PagemapEntry};
use crate::page_pipe::{AddError, PagePipe, Progress};
use crate::source::Source;
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
    /// As the sink does best: pipes (capture with `vmsplice`, then `splice`) for
    /// sockets and pipes, straight from memory for files and callbacks (measured; see
    /// the README). The default.
    #[default]
    Auto,
    /// Always through pipes.
    Pipes,
    /// Always straight from memory: no page pipe, no pipes.
    Memory,
}

/// How to take a snapshot.
#[derive(Debug, Clone)]
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
    /// Chunks (captures and dumps) it took.
    pub chunks: u64,
    /// Pipes made.
    pub pipes_made: u64,
    /// The capture path (of the last chunk).
    pub path: CapturePath,
    /// Time adding spans to the page pipe.
    pub add_time: Duration,
    /// Time capturing.
    pub capture_time: Duration,
    /// Time dumping.
    pub dump_time: Duration,
}

/// Why a snapshot failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The page pipe could not be built.
    Build(BuildError),
    /// A span could not be added.
    Add(AddError),
    /// The capture failed.
    Capture(CaptureError),
    /// The dump failed.
    Dump(DumpError),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Build(e) => write!(f, "{e}"),
            SnapshotError::Add(e) => write!(f, "{e}"),
            SnapshotError::Capture(e) => write!(f, "{e}"),
            SnapshotError::Dump(e) => write!(f, "{e}"),
        }
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
/// let ps = page_pipe_sys::page_size().get();
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
    let direct = match opts.drain {
        Drain::Auto => sink.prefers_copy(),
        Drain::Pipes => false,
        Drain::Memory => true,
    };
    if direct {
        let t = Instant::now();
        let mut report = direct_snapshot(source, plan, sink, opts)?;
        report.dump_time = t.elapsed();
        return Ok(report);
    }
    let mut backend =
        KernelPipes::new().map_err(|e| SnapshotError::Build(BuildError::Limits(e)))?;
    if let Some(pool) = &opts.pool {
        backend = backend.with_pool(Arc::clone(pool));
    }
    // Pipes fill up here, so each is sized to the cap at once rather than doubled.
    let mut b = PagePipe::builder()
        .lazy_pages(opts.lazy_pages)
        .initial_pipe_pages(u64::MAX);
    if let Some(m) = opts.max_pipe_pages {
        b = b.max_pipe_pages(m);
    }
    let mut run = Run {
        report: SnapshotReport {
            pages: 0,
            hole_pages: 0,
            chunks: 0,
            pipes_made: 0,
            path: match opts.capture {
                CaptureMode::Auto => CapturePath::VmspliceGift,
                CaptureMode::Copy => CapturePath::Copy,
            },
            add_time: Duration::ZERO,
            capture_time: Duration::ZERO,
            dump_time: Duration::ZERO,
        },
        mode: opts.capture,
    };
    if opts.chunk_mode {
        let pp = b
            .chunk_mode()
            .iov_budget(opts.iov_budget)
            .build_with(backend)
            .map_err(SnapshotError::Build)?;
        run.chunked(pp, source, plan, sink)?;
    } else {
        let pp = b
            .iov_budget(opts.iov_budget)
            .build_with(backend)
            .map_err(SnapshotError::Build)?;
        run.single(pp, source, plan, sink)?;
    }
    Ok(run.report)
}

/// The direct path: spans go to the sink straight from memory, with the same checks and
/// entries a page pipe would give.
fn direct_snapshot<S: DumpSink + ?Sized>(
    source: &Source<'_>,
    plan: impl IntoIterator<Item = Span>,
    sink: &mut S,
    opts: &SnapshotOptions,
) -> Result<SnapshotReport, SnapshotError> {
    let ps = source.page_size() as u64;
    let mut report = SnapshotReport {
        pages: 0,
        hole_pages: 0,
        chunks: 1,
        pipes_made: 0,
        path: CapturePath::Direct,
        add_time: Duration::ZERO,
        capture_time: Duration::ZERO,
        dump_time: Duration::ZERO,
    };
    let mut done = DumpReport::default();
    let mut cursor: Option<u64> = None;
    let mut slices = Vec::new();
    for span in plan {
        let (addr, pages) = match span {
            Span::Pages { addr, pages, .. } | Span::Hole { addr, pages, .. } => (addr, pages),
        };
        if addr % ps != 0 {
            return Err(SnapshotError::Add(AddError::Unaligned {
                addr,
                page_size: ps as usize,
            }));
        }
        if let Some(min) = cursor.filter(|&min| addr < min) {
            return Err(SnapshotError::Add(AddError::OutOfOrder { addr, min }));
        }
        let end = pages
            .checked_mul(ps)
            .and_then(|len| addr.checked_add(len))
            .ok_or(SnapshotError::Add(AddError::Overflow { addr, pages }))?;
        if pages == 0 {
            continue;
        }
        cursor = Some(end);
        let fail = |kind, done: &DumpReport| SnapshotError::Dump(DumpError { kind, done: *done });
        match span {
            Span::Pages { flags, .. } => {
                report.pages += pages;
                let lazy = flags.contains(BufFlags::LAZY);
                let e = PagemapEntry {
                    vaddr: addr,
                    pages,
                    flags: match (lazy, opts.lazy_pages) {
                        (false, _) => PageFlags::PRESENT,
                        (true, false) => PageFlags::LAZY | PageFlags::PRESENT,
                        (true, true) => PageFlags::LAZY,
                    },
                };
                if e.is_present() {
                    slices.clear();
                    source.slices(addr, pages, &mut slices).map_err(|addr| {
                        SnapshotError::Capture(CaptureError::NotCovered { addr })
                    })?;
                    sink.present_bytes(e, &slices).map_err(|k| fail(k, &done))?;
                    done.present_pages += pages;
                    done.bytes += pages * ps;
                } else {
                    sink.absent(e).map_err(|k| fail(k, &done))?;
                    done.lazy_kept += pages;
                }
                done.entries += 1;
            }
            Span::Hole { flags, .. } => {
                report.hole_pages += pages;
                if flags.contains(HoleFlags::PARENT) {
                    let e = PagemapEntry {
                        vaddr: addr,
                        pages,
                        flags: PageFlags::PARENT,
                    };
                    sink.absent(e).map_err(|k| fail(k, &done))?;
                    done.entries += 1;
                    done.parent_pages += pages;
                }
            }
        }
    }
    Ok(report)
}

struct Run {
    report: SnapshotReport,
    mode: CaptureMode,
}

impl Run {
    fn single<S: DumpSink + ?Sized>(
        &mut self,
        mut pp: PagePipe<SinglePass, OwnIovs, KernelPipes>,
        source: &Source<'_>,
        plan: impl IntoIterator<Item = Span>,
        sink: &mut S,
    ) -> Result<(), SnapshotError> {
        let t = Instant::now();
        for span in plan {
            match span {
                Span::Pages { addr, pages, flags } => {
                    pp.add_pages(addr, pages, flags)
                        .map_err(SnapshotError::Add)?;
                    self.report.pages += pages;
                }
                Span::Hole { addr, pages, flags } => {
                    pp.add_holes(addr, pages, flags)
                        .map_err(SnapshotError::Add)?;
                    self.report.hole_pages += pages;
                }
            }
        }
        self.report.add_time += t.elapsed();
        self.report.pipes_made = pp.stats().pipes_made;
        self.capture_and_dump(pp, source, sink)?;
        Ok(())
    }

    /// Captures what `pp` holds and dumps it, counting the time of each.
    fn capture_and_dump<'m, M: Mode, S: DumpSink + ?Sized>(
        &mut self,
        pp: PagePipe<M, OwnIovs, KernelPipes>,
        source: &Source<'m>,
        sink: &mut S,
    ) -> Result<Captured<'m, M>, SnapshotError> {
        let t = Instant::now();
        let mut captured = pp
            .capture_with(source, self.mode)
            .map_err(SnapshotError::Capture)?;
        self.report.capture_time += t.elapsed();
        self.report.path = captured.report().path;
        let t = Instant::now();
        captured.dump(sink).map_err(SnapshotError::Dump)?;
        self.report.dump_time += t.elapsed();
        self.report.chunks += 1;
        Ok(captured)
    }

    /// Captures and dumps what `pp` holds, and re-inits it.
    fn flush<S: DumpSink + ?Sized>(
        &mut self,
        pp: PagePipe<ChunkMode, OwnIovs, KernelPipes>,
        source: &Source<'_>,
        sink: &mut S,
    ) -> Result<PagePipe<ChunkMode, OwnIovs, KernelPipes>, SnapshotError> {
        Ok(self.capture_and_dump(pp, source, sink)?.reinit())
    }

    fn chunked<S: DumpSink + ?Sized>(
        &mut self,
        mut pp: PagePipe<ChunkMode, OwnIovs, KernelPipes>,
        source: &Source<'_>,
        plan: impl IntoIterator<Item = Span>,
        sink: &mut S,
    ) -> Result<(), SnapshotError> {
        let mut t = Instant::now();
        for span in plan {
            match span {
                Span::Hole { addr, pages, flags } => {
                    pp.add_holes(addr, pages, flags)
                        .map_err(SnapshotError::Add)?;
                    self.report.hole_pages += pages;
                }
                Span::Pages { addr, pages, flags } => {
                    let ps = pp.page_size() as u64;
                    let (mut at, mut left) = (addr, pages);
                    // Whether the last flush made no progress, to stop a loop on a
                    // budget too small for one run.
                    let mut stuck = false;
                    while left > 0 {
                        let added = match pp.add_pages(at, left, flags) {
                            Ok(Progress::Done) => left,
                            Ok(Progress::Full { added }) => added,
                            Err(AddError::IovBudget { added, .. }) if !(stuck && added == 0) => {
                                added
                            }
                            Err(e) => return Err(SnapshotError::Add(e)),
                        };
                        self.report.pages += added;
                        at += added * ps;
                        left -= added;
                        if left > 0 {
                            self.report.add_time += t.elapsed();
                            self.report.pipes_made =
                                self.report.pipes_made.max(pp.stats().pipes_made);
                            pp = self.flush(pp, source, sink)?;
                            t = Instant::now();
                            stuck = added == 0;
                        }
                    }
                }
            }
        }
        self.report.add_time += t.elapsed();
        self.report.pipes_made = self.report.pipes_made.max(pp.stats().pipes_made);
        self.flush(pp, source, sink)?;
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
