//! Restoring memory from an image chain: first a plan of segments (which bytes come from
//! which file, which are zeros), then large positional reads straight into the
//! destination, on several threads when the destination is large.
//!
//! The plan is the one place that decides *what* goes where; [`Image::restore`] is one
//! way of moving the bytes (eager, with `pread`).

use std::fs::File;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::files::read_exact_at;
use super::map::Residency;
use super::{Image, ImageError, PageFlags};
use crate::progress::{ProgressFn, Throttle};

/// How [`Image::restore`] restores.
///
/// ```
/// use std::num::NonZeroUsize;
/// use page_pipe::image::RestoreOptions;
/// let strict = RestoreOptions { strict: true, ..RestoreOptions::default() };
/// let two = RestoreOptions { threads: NonZeroUsize::new(2), ..RestoreOptions::default() };
/// assert!(!RestoreOptions::default().strict && strict.threads.is_none());
/// # let _ = two;
/// ```
#[derive(Clone, Default)]
pub struct RestoreOptions {
    /// Refuse pages the chain does not hold (in no entry, or lazy without `PRESENT`) with
    /// [`ImageError::NotInImage`], instead of filling them with zeros. Default: off (such
    /// pages are zeros, counted in [`ReadReport::zero`] and [`ReadReport::lazy`]).
    pub strict: bool,
    /// Threads to read with, the calling thread included. Default (`None`): one per
    /// [`MIN_BYTES_PER_THREAD`] of destination, at most the
    /// [available parallelism](std::thread::available_parallelism) and
    /// [`MAX_AUTO_THREADS`]. A number given is used as far as there are pages to share.
    pub threads: Option<NonZeroUsize>,
    /// Called with the pages restored so far and the pages asked for, at a bounded rate
    /// (see [`ProgressFn`]).
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("strict", &self.strict)
            .field("threads", &self.threads)
            .field("progress", &self.progress.as_ref().map(|_| "callback"))
            .finish()
    }
}

/// The least destination each thread of an automatic restore gets: below it, starting a
/// thread costs more than it saves. 16 MiB of fresh memory takes about 6 ms to fault in
/// on the machines measured (0.4 s per GiB); a thread starts in tens of microseconds.
pub const MIN_BYTES_PER_THREAD: usize = 16 << 20;

/// The most threads an automatic restore uses: faulting memory in and copying from the
/// page cache stop scaling before the core count of a large machine.
pub const MAX_AUTO_THREADS: usize = 8;

/// What a read found, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadReport {
    /// Pages read from this image's pages file.
    pub present: u64,
    /// Pages read from a parent's pages file.
    pub from_parents: u64,
    /// Pages in no entry, filled with zeros.
    pub zero: u64,
    /// Pages only a lazy-pages server has, filled with zeros.
    pub lazy: u64,
    /// Threads that restored (1: the calling thread alone; 0: there was nothing to
    /// read). Threads share the work as they come, so one may have found none left.
    pub threads: usize,
}

/// Where the bytes of a [`Segment`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// The pages file of the image `depth` parents up ([`Image::ancestor`]), from byte
    /// `offset`.
    Pages {
        /// How many parents up the chain.
        depth: usize,
        /// Byte offset in that image's pages file.
        offset: u64,
    },
    /// Pages in no entry: zeros.
    Zero,
    /// Pages in a `LAZY` entry without `PRESENT`: zeros here, a lazy-pages server holds
    /// them.
    Lazy,
}

/// A run of whole pages of a restore plan, and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The address of its first page.
    pub vaddr: u64,
    /// Its length in bytes (whole pages).
    pub len: u64,
    /// Where its bytes come from.
    pub kind: SegmentKind,
}

/// The segments that make up a range of an image chain's memory, in address order and
/// covering it without gaps; adjacent segments that read on from the same file offset
/// are one segment, so each byte is read once and files in as few calls as can be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// The segments.
    pub segments: Vec<Segment>,
    /// The pages the plan takes from each place (`threads` is 0: nothing ran).
    pub report: ReadReport,
}

impl RestorePlan {
    /// Appends a segment, joining it to the last one when it continues it.
    fn push(&mut self, s: Segment, page_size: usize) {
        let pages = s.len / page_size as u64;
        match s.kind {
            SegmentKind::Pages { depth: 0, .. } => self.report.present += pages,
            SegmentKind::Pages { .. } => self.report.from_parents += pages,
            SegmentKind::Zero => self.report.zero += pages,
            SegmentKind::Lazy => self.report.lazy += pages,
        }
        if let Some(last) = self.segments.last_mut()
            && last.vaddr + last.len == s.vaddr
        {
            let joined = match (last.kind, s.kind) {
                (
                    SegmentKind::Pages { depth: a, offset },
                    SegmentKind::Pages {
                        depth: b,
                        offset: o,
                    },
                ) => a == b && offset + last.len == o,
                (SegmentKind::Zero, SegmentKind::Zero) | (SegmentKind::Lazy, SegmentKind::Lazy) => {
                    true
                }
                _ => false,
            };
            if joined {
                last.len += s.len;
                return;
            }
        }
        self.segments.push(s);
    }
}

impl Image {
    fn check_range(&self, vaddr: u64, len: u64) -> Result<(), ImageError> {
        crate::addr::PageRange::of_bytes(vaddr, len, self.page_size())
            .map(|_| ())
            .map_err(|_| ImageError::BadRange { vaddr, len })
    }

    /// The plan for restoring `len` bytes from `vaddr`: the chain's entries merged into
    /// segments, each page taken from the nearest image that holds it. Reads no pages.
    ///
    /// ```
    /// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry, RestoreOptions, SegmentKind};
    /// let dir = std::env::temp_dir().join(format!("pp-doc-plan-{}", std::process::id()));
    /// let ps = page_pipe_sys::page_size().get() as u64;
    /// let mut w = ImageWriter::create(&dir, 1)?;
    /// w.push_bytes(PagemapEntry { vaddr: 0x100 * ps, pages: 1, flags: PageFlags::PRESENT }, &vec![1; ps as usize])?;
    /// w.push_bytes(PagemapEntry { vaddr: 0x102 * ps, pages: 1, flags: PageFlags::PRESENT }, &vec![2; ps as usize])?;
    /// w.finish()?;
    /// let plan = Image::open(&dir)?.plan(0x100 * ps, 3 * ps, &RestoreOptions::default())?;
    /// let kinds: Vec<_> = plan.segments.iter().map(|s| s.kind).collect();
    /// assert_eq!(kinds, [
    ///     SegmentKind::Pages { depth: 0, offset: 0 },
    ///     SegmentKind::Zero,
    ///     SegmentKind::Pages { depth: 0, offset: ps },
    /// ]);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    ///
    /// # Errors
    /// [`ImageError::BadRange`] for a range that is not whole pages;
    /// [`ImageError::NotInParent`] for a `PARENT` page the parent lacks;
    /// [`ImageError::NotInImage`] in a strict plan.
    pub fn plan(
        &self,
        vaddr: u64,
        len: u64,
        opts: &RestoreOptions,
    ) -> Result<RestorePlan, ImageError> {
        self.check_range(vaddr, len)?;
        let mut plan = RestorePlan {
            segments: Vec::new(),
            report: ReadReport::default(),
        };
        let ps = self.page_size();
        self.walk(vaddr, vaddr + len, 0, opts.strict, &mut |s, _| {
            plan.push(s, ps);
            Ok(())
        })?;
        Ok(plan)
    }

    /// Walks the chain's entries over `start..end` (of the image `depth` parents up) and
    /// gives `sink` each segment in address order, unjoined, with whether its entry was
    /// `LAZY` (for [`SegmentKind::Lazy`] always). The one place that decides where each
    /// page comes from: plans, restores, flattening and diffs all go through it.
    pub(super) fn walk<F>(
        &self,
        start: u64,
        end: u64,
        depth: usize,
        strict: bool,
        sink: &mut F,
    ) -> Result<(), ImageError>
    where
        F: FnMut(Segment, bool) -> Result<(), ImageError>,
    {
        let ps = self.page_size() as u64;
        let mut at = start;
        let mut i = self.entry_at(at).unwrap_or_else(|i| i);
        while at < end {
            let entry = self.entries().get(i).filter(|e| e.vaddr < end);
            let Some(e) = entry.filter(|e| e.vaddr <= at) else {
                // A gap: pages in no entry.
                if depth > 0 {
                    return Err(ImageError::NotInParent {
                        path: self.pagemap_path().to_path_buf(),
                        vaddr: at,
                    });
                }
                if strict {
                    return Err(ImageError::NotInImage {
                        path: self.pagemap_path().to_path_buf(),
                        vaddr: at,
                        lazy: false,
                    });
                }
                let stop = entry.map_or(end, |e| e.vaddr);
                let s = Segment {
                    vaddr: at,
                    len: stop - at,
                    kind: SegmentKind::Zero,
                };
                sink(s, false)?;
                at = stop;
                continue;
            };
            let stop = (e.vaddr + e.pages * ps).min(end);
            let lazy = e.flags.contains(PageFlags::LAZY);
            if e.is_present() {
                let offset = self.offsets[i] + (at - e.vaddr);
                let s = Segment {
                    vaddr: at,
                    len: stop - at,
                    kind: SegmentKind::Pages { depth, offset },
                };
                sink(s, lazy)?;
            } else if e.flags.contains(PageFlags::PARENT) {
                let parent = self.parent().expect("checked at open");
                parent.walk(at, stop, depth + 1, strict, sink)?;
            } else if strict {
                return Err(ImageError::NotInImage {
                    path: self.pagemap_path().to_path_buf(),
                    vaddr: at,
                    lazy: true,
                });
            } else {
                let s = Segment {
                    vaddr: at,
                    len: stop - at,
                    kind: SegmentKind::Lazy,
                };
                sink(s, true)?;
            }
            at = stop;
            i += 1;
        }
        Ok(())
    }

    /// Reads `dst.len()` bytes (whole pages) from `vaddr` through the parent chain, as
    /// [`restore`](Self::restore) with the default options: pages in no entry, and lazy
    /// pages the image does not hold, read as zeros; the report counts them.
    ///
    /// # Errors
    /// As [`restore`](Self::restore).
    pub fn read(&self, vaddr: u64, dst: &mut [u8]) -> Result<ReadReport, ImageError> {
        self.restore(vaddr, dst, &RestoreOptions::default())
    }

    /// Restores `dst.len()` bytes (whole pages) from `vaddr` through the parent chain:
    /// plans the segments ([`plan`](Self::plan)), then reads the file segments straight
    /// into `dst` with `pread` and fills zeros, on as many threads as `opts` say. The
    /// threads take `dst` in chunks of up to 8 MiB, one at a time, and fill each 1 MiB
    /// at a time: prefaulted first unless its first page is in memory already
    /// (`madvise(MADV_POPULATE_WRITE)`, which changes no byte; `/proc/self/pagemap`
    /// tells), then read into while its pages are still in the cache.
    ///
    /// Into fresh memory most of the time goes to the kernel faulting each page in on
    /// first touch (about 0.4 s per GiB on the machines measured), which threads share
    /// out; a thread the scheduler holds back leaves its chunks to the others.
    ///
    /// ```
    /// # use page_pipe::image::{Image, ImageError, ImageWriter, PageFlags, PagemapEntry, RestoreOptions};
    /// # let dir = std::env::temp_dir().join(format!("pp-doc-restore-{}", std::process::id()));
    /// # let ps = page_pipe_sys::page_size().get();
    /// # let mut w = ImageWriter::create(&dir, 1)?;
    /// # w.push_bytes(PagemapEntry { vaddr: 0x40 * ps as u64, pages: 1, flags: PageFlags::PRESENT }, &vec![5; ps])?;
    /// # w.finish()?;
    /// let img = Image::open(&dir)?;
    /// let mut dst = vec![1u8; 2 * ps];
    /// let strict = RestoreOptions { strict: true, ..RestoreOptions::default() };
    /// // The second page is in no entry: a strict restore refuses it.
    /// let err = img.restore(0x40 * ps as u64, &mut dst, &strict).unwrap_err();
    /// assert!(matches!(err, ImageError::NotInImage { vaddr, lazy: false, .. } if vaddr == 0x41 * ps as u64));
    /// let report = img.restore(0x40 * ps as u64, &mut dst, &RestoreOptions::default())?;
    /// assert_eq!((report.present, report.zero), (1, 1));
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), ImageError>(())
    /// ```
    ///
    /// # Errors
    /// As [`plan`](Self::plan) (then `dst` is untouched); [`ImageError::ShortRead`]
    /// naming the file and offset when a pages file was truncated while open, or
    /// [`ImageError::Io`]; then `dst` holds some of the pages.
    pub fn restore(
        &self,
        vaddr: u64,
        dst: &mut [u8],
        opts: &RestoreOptions,
    ) -> Result<ReadReport, ImageError> {
        let plan = self.plan(vaddr, dst.len() as u64, opts)?;
        let mut report = plan.report;
        if dst.is_empty() {
            return Ok(report);
        }
        let threads = threads_for(dst.len(), self.page_size(), opts.threads);
        let chunk = chunk_for(dst.len(), threads, self.page_size());
        // The destination in chunks that the threads take one at a time, so that each
        // faults in and fills ranges of its own, and a thread the scheduler holds back
        // leaves its share to the others.
        let ps = self.page_size() as u64;
        let progress = Mutex::new(Throttle::new(opts.progress.clone(), dst.len() as u64 / ps));
        let chunks = Mutex::new(dst.chunks_mut(chunk).enumerate());
        let failed = AtomicBool::new(false);
        let resident = Residency::open();
        let work = || -> Result<(), ImageError> {
            while !failed.load(Ordering::Relaxed) {
                let next = chunks.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some((i, part)) = next else { break };
                let at = vaddr + (i * chunk) as u64;
                let pages = part.len() as u64 / ps;
                if let Err(e) = self.fill(&plan.segments, at, part, Some(&resident)) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .advance(pages);
            }
            Ok(())
        };
        std::thread::scope(|s| {
            // A thread that cannot be started (a thread limit) leaves its share to the
            // others; the calling thread always works.
            let others: Vec<_> = (1..threads)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("page-pipe-restore".into())
                        .spawn_scoped(s, work)
                        .ok()
                })
                .collect();
            report.threads = 1 + others.len();
            let mut result = work();
            for h in others {
                let r = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                result = result.and(r);
            }
            result
        })?;
        progress
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .finish();
        Ok(report)
    }

    /// Fills `dst`, the memory of `vaddr..`, from `segments` (a plan that covers it), one
    /// window of [`WINDOW`] bytes at a time: the window is prefaulted first (given
    /// `prefault`, unless it says the window's first page is in memory already), then
    /// its pieces are read with `pread` or zeroed.
    pub(super) fn fill(
        &self,
        segments: &[Segment],
        vaddr: u64,
        dst: &mut [u8],
        prefault: Option<&Residency>,
    ) -> Result<(), ImageError> {
        let files: Vec<(Option<&File>, &Path)> = (0..self.depth())
            .map(|d| {
                let img = self.ancestor(d).expect("within the chain");
                (img.pages.as_ref(), img.pages_path())
            })
            .collect();
        let mut prefault = prefault;
        let mut at = vaddr;
        for window in dst.chunks_mut(WINDOW) {
            // Memory already in (a restore into touched memory) needs no prefault.
            if let Some(resident) = prefault
                && !resident.is_in(window.as_ptr())
                && !super::map::prefault(window)
            {
                // The kernel refuses (before Linux 5.14, or memory it cannot populate):
                // the reads fault the pages in instead.
                prefault = None;
            }
            for (off, len, kind) in pieces(segments, at, window.len() as u64) {
                let piece = &mut window[off..off + len];
                match kind {
                    SegmentKind::Pages { depth, offset } => {
                        let (file, path) = files[depth];
                        let file = file.expect("present pages have a file");
                        read_exact_at(file, path, piece, offset)?;
                    }
                    SegmentKind::Zero | SegmentKind::Lazy => piece.fill(0),
                }
            }
            at += window.len() as u64;
        }
        Ok(())
    }
}

/// The bytes [`Image::fill`] prefaults and then reads at a time. Into fresh memory on
/// two threads, prefaulting 1 MiB (`MADV_POPULATE_WRITE`) and then reading into it was
/// 1.9x a `pread` loop, against 1.7x without prefaulting (and 1.6x with 8 MiB windows:
/// the zeroed pages leave the cache before the copy reaches them); on one thread it
/// made no difference. Into memory already touched it cost 10% (a page-table walk
/// that faults nothing in), so a window whose first page is in memory is not
/// prefaulted.
pub(super) const WINDOW: usize = 1 << 20;

/// How many threads restore `len` bytes.
fn threads_for(len: usize, page_size: usize, asked: Option<NonZeroUsize>) -> usize {
    let pages = (len / page_size).max(1);
    match asked {
        Some(n) => n.get().min(pages),
        None if len < 2 * MIN_BYTES_PER_THREAD => 1,
        None => {
            let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
            (len / MIN_BYTES_PER_THREAD).min(cpus).min(MAX_AUTO_THREADS)
        }
    }
}

/// The most bytes a restore thread takes at a time.
const CHUNK: usize = 8 << 20;

/// The bytes a restore of `len` bytes on `threads` threads hands out at a time: all of it
/// to one thread; else about a quarter of each thread's share, in whole pages, at least
/// a page and at most [`CHUNK`].
fn chunk_for(len: usize, threads: usize, page_size: usize) -> usize {
    if threads <= 1 {
        return len.max(page_size);
    }
    (len / (4 * threads) / page_size * page_size).clamp(page_size, CHUNK)
}

/// The pieces of `segments` (in address order, covering `vaddr..vaddr + len`) that fall
/// in that range: byte offset from `vaddr`, length, and kind with the file offset moved
/// to the piece's start.
pub(super) fn pieces(
    segments: &[Segment],
    vaddr: u64,
    len: u64,
) -> impl Iterator<Item = (usize, usize, SegmentKind)> + '_ {
    let end = vaddr + len;
    let first = segments.partition_point(|s| s.vaddr + s.len <= vaddr);
    segments[first..]
        .iter()
        .take_while(move |s| s.vaddr < end)
        .map(move |s| {
            let from = s.vaddr.max(vaddr);
            let to = (s.vaddr + s.len).min(end);
            let kind = match s.kind {
                SegmentKind::Pages { depth, offset } => SegmentKind::Pages {
                    depth,
                    offset: offset + (from - s.vaddr),
                },
                k => k,
            };
            ((from - vaddr) as usize, (to - from) as usize, kind)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(vaddr: u64, len: u64, kind: SegmentKind) -> Segment {
        Segment { vaddr, len, kind }
    }

    #[test]
    fn chunks_are_whole_pages_shared_between_threads() {
        let ps = 4096;
        assert_eq!(chunk_for(1 << 30, 1, ps), 1 << 30);
        assert_eq!(chunk_for(0, 1, ps), ps);
        assert_eq!(chunk_for(1 << 30, 2, ps), CHUNK);
        assert_eq!(chunk_for(40 * ps, 4, ps), 2 * ps);
        assert_eq!(chunk_for(3 * ps, 3, ps), ps);
        for len in [1, 7, 100, 5000].map(|p| p * ps) {
            for threads in 2..=8 {
                let c = chunk_for(len, threads, ps);
                assert!(
                    c.is_multiple_of(ps) && (ps..=CHUNK).contains(&c),
                    "{len} {threads}: {c}"
                );
            }
        }
    }

    #[test]
    fn pieces_clip_segments_and_move_their_file_offsets() {
        let ps = 4096;
        let segments = [
            seg(
                0,
                3 * ps,
                SegmentKind::Pages {
                    depth: 0,
                    offset: 0,
                },
            ),
            seg(3 * ps, ps, SegmentKind::Zero),
            seg(
                4 * ps,
                3 * ps,
                SegmentKind::Pages {
                    depth: 1,
                    offset: 10 * ps,
                },
            ),
        ];
        // Every window of the 7 pages: each page comes from where the segments say.
        let expect = |p: u64| match p {
            0..3 => Some((0, p)),
            3 => None,
            _ => Some((1, 10 + p - 4)),
        };
        for from in 0..7 {
            for to in from + 1..=7 {
                let mut next = 0;
                for (off, len, kind) in pieces(&segments, from * ps, (to - from) * ps) {
                    assert_eq!(off as u64, next);
                    assert_eq!(len as u64 % ps, 0);
                    for p in 0..len as u64 / ps {
                        let page = from + off as u64 / ps + p;
                        let got = match kind {
                            SegmentKind::Pages { depth, offset } => Some((depth, offset / ps + p)),
                            _ => None,
                        };
                        assert_eq!(got, expect(page), "page {page} of {from}..{to}");
                    }
                    next += len as u64;
                }
                assert_eq!(next, (to - from) * ps);
            }
        }
    }

    #[test]
    fn small_restores_stay_on_the_calling_thread() {
        assert_eq!(threads_for(1 << 20, 4096, None), 1);
        assert_eq!(threads_for(2 * MIN_BYTES_PER_THREAD - 4096, 4096, None), 1);
        let big = threads_for(1 << 34, 4096, None);
        assert!((1..=MAX_AUTO_THREADS).contains(&big));
        assert_eq!(threads_for(3 * 4096, 4096, NonZeroUsize::new(8)), 3);
        assert_eq!(threads_for(0, 4096, NonZeroUsize::new(8)), 1);
    }
}
