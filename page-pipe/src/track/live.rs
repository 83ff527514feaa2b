//! Live (background) snapshots: a pause only as long as it takes to protect the memory,
//! then a dump while the program keeps writing, byte for byte the memory at the instant
//! of protection.
//!
//! A live snapshot is a synchronous [`Tracker`] whose fault handler does one thing more
//! (the plan in the [module docs](super#handing-over-from-a-background-snapshot-plan-for-the-next-step)):
//!
//! 1. **Pause** ([`Tracker::live`], writers stopped by the caller): take the dirty set
//!    (an incremental snapshot) or the full plan, with every page the plan needs
//!    write-protected (`take` protects the written pages again; the rest stayed
//!    protected). The pages the plan captures are *pending*. Return; the caller resumes
//!    the writers.
//! 2. **Dump** ([`Live::dump`]), while writers run. For each entry, in address order:
//!    under the lock, every pending page becomes *reading* (the dump will read it from
//!    memory, where it is still protected), every page saved aside is taken; without the
//!    lock, the pages go to the sink: the kernel reads protected memory (`write`/`pwrite`
//!    from its address; a callback gets a volatile copy), saved copies are written as
//!    they are; under the lock again, *reading* is cleared, the copies go back to the
//!    pool, and waiting faults are woken.
//! 3. **A first write** to a protected page faults; the handler thread, under the lock:
//!    if the page is *reading*, it waits until the dump is done with it (then it needs no
//!    copy); if it is *pending*, it copies the page aside (a volatile copy of protected
//!    memory: nobody can change it meanwhile), waiting first if the copies saved aside
//!    reached their bound ([`LiveOptions::max_saved_pages`]: the writer waits for the
//!    dump to write some); then, as a tracker always does, it records the page as
//!    written and lifts its protection, which wakes the writer.
//!
//! So the dump never reads a page whose protection the handler is lifting (a page is
//! lifted only once it is neither pending nor reading), and the handler never lifts a
//! page the dump is reading (it waits for *reading* to clear). Every page the plan needs
//! is written either from memory still protected since the instant of protection, or
//! from a copy made before its first write since: the image is the memory at that
//! instant.
//!
//! Pages the dump has passed stay protected: every write after the instant of
//! protection is recorded, and the next [`Tracker::take`] (or [`Tracker::live`] with
//! [`LiveKind::Incremental`]) is complete. A [`Live`] dropped without a dump that
//! succeeded gives the pages its take found back to the tracker, so they are not lost
//! to the next take either.
//!
//! Memory discarded during the dump (`MADV_DONTNEED`) changes without a write fault: the
//! kernel tells the handler (which records tracking lost) before it drops the pages, so
//! the dump checks, once it has read everything, that tracking was not lost meanwhile,
//! and fails with [`LiveError::Lost`] if it was.
//!
//! What it cannot see, as tracking cannot ([module docs](super#what-the-tracker-sees-and-what-it-does-not)):
//! changes made without a write fault on these mappings reach the dump unnoticed, so the
//! image is not the instant there. Writes through another mapping of shared memory
//! (another process, a vhost-user backend) or through its file descriptor (`write(2)`,
//! `fallocate(2)` punching a hole), and DMA into pinned pages: quiesce them until the
//! dump ends. Writes the kernel makes for this process (`read(2)` into the memory,
//! `process_vm_writev(2)`) fault and are saved like the program's own. After the dump the tracker goes on
//! synchronously; to go back to asynchronous tracking, see the module docs.
//!
//! The memory is never seen as a `&[u8]`: it is memory others write (DESIGN.md 7.1), read
//! only by the kernel or by volatile copies. This module holds the crate's `unsafe` for
//! that: the promise is [`Tracker::live`]'s (the regions stay mapped for the dump).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_pipe_sys::RawIov;

use super::faults::Shared;
use super::live_state::{LiveState, set};
use super::{Engine, Method, TrackError, Tracker};
use crate::dump::{DumpSink, PageBytes};
use crate::image::PagemapEntry;
use crate::snapshot::{Feed, SnapshotError, SnapshotOptions, SnapshotReport, Span, snapshot_feed};
use crate::source::Chunk;

/// Which background snapshot to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveKind {
    /// Every page of the regions (but, as [`Tracker::full_plan`] says, pages never
    /// touched), the base of a chain.
    Full,
    /// The pages written since the last snapshot; the rest in the parent.
    Incremental,
}

/// How to take a background snapshot.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// The most pages saved aside for writers at a time (default 16384: 64 MiB of 4 KiB
    /// pages). When reached, a writer's first write to a page the dump still needs waits
    /// until the dump has written some saved pages; [`LiveReport::writer_stalls`] counts
    /// those waits. At least one tracking unit (a huge page, for hugetlb regions).
    pub max_saved_pages: u64,
    /// How to write the snapshot: chunk mode, iov budget, lazy pages, progress. Pages
    /// always go straight from memory (no pipes: memory others write is never referenced
    /// from a pipe).
    pub snapshot: SnapshotOptions,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            max_saved_pages: 16384,
            snapshot: SnapshotOptions::default(),
        }
    }
}

/// What a background snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveReport {
    /// How long [`Tracker::live`] took: the pause the writers needed.
    pub pause: Duration,
    /// The snapshot the dump wrote.
    pub snapshot: SnapshotReport,
    /// How long the dump took.
    pub dump_time: Duration,
    /// Pages copied aside because a writer came to them before the dump.
    pub saved_pages: u64,
    /// The most bytes of copies held at once.
    pub saved_peak_bytes: u64,
    /// Times a writer waited because the copies reached their bound.
    pub writer_stalls: u64,
    /// Times a writer waited for the dump to finish reading its page.
    pub writer_waits: u64,
    /// Write faults the handler served from the instant to the end of the dump: pages
    /// written meanwhile.
    pub faults: u64,
}

/// Why a background snapshot failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum LiveError {
    /// The tracker could not begin it (not synchronous, a take failed).
    Track(TrackError),
    /// The dump failed; the tracker was stopped (every writer released, the regions
    /// unregistered), since later incremental snapshots would have no whole parent.
    Dump(SnapshotError),
    /// Tracking was lost while the dump ran ([`TrackError::Lost`]: memory discarded with
    /// `madvise(2)`, unmapped or moved), so pages it read may not be the memory at the
    /// instant (a discarded page reads as zeros); the sink got such an image, which must
    /// not be kept. The tracker was stopped, as for [`Dump`](Self::Dump).
    Lost(TrackError),
}

impl fmt::Display for LiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LiveError::Track(_) => "cannot begin the background snapshot",
            LiveError::Dump(_) => {
                "the background snapshot failed; tracking stopped (take a full snapshot next)"
            }
            LiveError::Lost(_) => {
                "the memory changed under the background snapshot where it cannot see; its \
                 image is not the memory at its instant; tracking stopped (take a full \
                 snapshot next)"
            }
        })
    }
}

impl std::error::Error for LiveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LiveError::Track(e) => Some(e),
            LiveError::Dump(e) => Some(e),
            LiveError::Lost(e) => Some(e),
        }
    }
}

/// A region as the dump sees it.
#[derive(Debug, Clone, Copy)]
struct DumpRegion {
    addr: u64,
    host: usize,
    pages: u64,
}

/// The bytes of a live snapshot's pages: protected memory, or the copies saved aside.
struct LiveBytes {
    shared: Arc<Shared>,
    /// In snapshot-address order, as the tracker keeps them (index = tracker index).
    regions: Vec<DumpRegion>,
    ps: u64,
    /// Copies handed to the sink for the current entry, back to the pool at release.
    in_use: Vec<Box<[u8]>>,
}

/// One piece of an entry: a run of pages of memory, or a saved page.
enum Piece {
    Memory { host: usize, len: usize },
    Saved(usize),
}

impl LiveBytes {
    /// The pages of `e` as (region, first page, end page) segments, or the first address
    /// in no region.
    fn segments(&self, e: &PagemapEntry) -> Result<Vec<(usize, u64, u64)>, u64> {
        let mut out = Vec::new();
        let end = e.vaddr + e.pages * self.ps;
        let mut at = e.vaddr;
        while at < end {
            let i = self
                .regions
                .partition_point(|r| r.addr <= at)
                .checked_sub(1)
                .ok_or(at)?;
            let r = self.regions[i];
            let first = (at - r.addr) / self.ps;
            if first >= r.pages {
                return Err(at);
            }
            let last = ((end - r.addr) / self.ps).min(r.pages);
            out.push((i, first, last));
            at = r.addr + last * self.ps;
        }
        Ok(out)
    }
}

impl PageBytes for LiveBytes {
    fn check(&mut self, entry: &PagemapEntry) -> Result<(), u64> {
        self.segments(entry).map(|_| ())
    }

    fn get<'a>(&'a mut self, entry: &PagemapEntry, out: &mut Vec<Chunk<'a>>) -> Result<(), u64> {
        let segs = self.segments(entry)?;
        let ps = self.ps;
        let mut pieces = Vec::new();
        {
            let mut st = self.shared.lock();
            let live = st.live.as_mut().expect("a live snapshot is running");
            for &(i, first, end) in &segs {
                let r = self.regions[i];
                for p in first..end {
                    let addr = r.addr + p * ps;
                    if live.take_pending(i, p) {
                        set(&mut live.reading[i], p, true);
                        let host = r.host + (p * ps) as usize;
                        match pieces.last_mut() {
                            Some(Piece::Memory { host: h, len }) if *h + *len == host => {
                                *len += ps as usize;
                            }
                            _ => pieces.push(Piece::Memory {
                                host,
                                len: ps as usize,
                            }),
                        }
                    } else if let Some(buf) = live.saved.remove(&(i, p)) {
                        self.in_use.push(buf);
                        pieces.push(Piece::Saved(self.in_use.len() - 1));
                    } else {
                        // Neither needed nor saved: not a page of the plan.
                        return Err(addr);
                    }
                }
            }
        }
        let in_use = &self.in_use;
        out.extend(pieces.into_iter().map(|p| match p {
            // SAFETY:
            // - the pages are in a tracked region, mapped until the snapshot ends
            //   (`Tracker::live`'s contract), which outlives this entry's chunks;
            // - no reference to the tracked memory is ever made: it is written by others.
            Piece::Memory { host, len } => unsafe {
                Chunk::raw(RawIov {
                    base: host as *const u8,
                    len,
                })
            },
            Piece::Saved(k) => Chunk::bytes(&in_use[k]),
        }));
        Ok(())
    }

    fn release(&mut self, entry: &PagemapEntry) {
        let segs = self.segments(entry).unwrap_or_default();
        let mut st = self.shared.lock();
        if let Some(live) = st.live.as_mut() {
            for (i, first, end) in segs {
                for p in first..end {
                    set(&mut live.reading[i], p, false);
                }
            }
            live.free.append(&mut self.in_use);
        }
        drop(st);
        self.shared.changed.notify_all();
    }
}

/// A background snapshot begun by [`Tracker::live`]: its plan is fixed and its pages
/// protected; [`dump`](Self::dump) writes it while the program runs. Dropping it without
/// a dump that succeeded (never dumped, or a sink that panicked) ends it: writers waiting
/// for it go on, and the pages its take found written come back in the tracker's next
/// take, whose parent is then the snapshot before this one.
pub struct Live<'t> {
    tracker: &'t mut Tracker,
    plan: Vec<Span>,
    /// What the take of [`Tracker::live`] returned, given back to the tracker unless the
    /// dump succeeds.
    taken: Vec<Span>,
    pause: Duration,
    /// The handler's fault count at the instant.
    faults_before: u64,
    /// How the dump writes (from the options given to [`Tracker::live`]).
    snapshot: SnapshotOptions,
    ended: bool,
}

impl fmt::Debug for Live<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("spans", &self.plan.len())
            .field("pause", &self.pause)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// Begins a background snapshot of the tracked regions; call it with the writers
    /// paused, resume them when it returns, then [`dump`](Live::dump) (see the
    /// [ordering](crate::track::live)). The tracker must be synchronous ([`Method::Sync`]).
    ///
    /// ```no_run
    /// use page_pipe::image::ImageWriter;
    /// use page_pipe::track::{Avoid, LiveKind, LiveOptions, TrackOptions, TrackRegion, Tracker};
    /// # let mem = vec![0u8; 1 << 20];
    /// let opts = TrackOptions { avoid: Avoid::WP_ASYNC, ..TrackOptions::default() };
    /// // SAFETY: (see Tracker::start and Tracker::live) the region is the program's data,
    /// // stays mapped, and no allocator, stack or lock lives in it.
    /// let mut tracker = unsafe { Tracker::start(&[TrackRegion::of(0, &mem)], &opts) }?;
    /// // ... writers paused here ...
    /// let live = unsafe { tracker.live(LiveKind::Full, &LiveOptions::default()) }?;
    /// // ... writers resumed here ...
    /// let mut w = ImageWriter::create("snap/1", 1)?;
    /// let report = live.dump(&mut w)?;
    /// w.finish()?;
    /// println!("paused {:?}, saved {} pages", report.pause, report.saved_pages);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`LiveError::Track`]: the tracker is asynchronous ([`TrackError::Unsupported`]), or
    /// a take failed.
    ///
    /// # Safety
    /// Those of [`Tracker::start`] in the synchronous mode, and, until the background
    /// snapshot ends (its dump returns or it is dropped):
    /// - the regions stay mapped and readable (no `munmap`, no `mprotect(PROT_NONE)`):
    ///   the snapshot reads them, with the kernel and with volatile copies, while the
    ///   program writes them;
    /// - the thread that will dump (its sink and progress callbacks included) does not
    ///   write the regions, and the [`Live`] is not leaked (`mem::forget`): a write to a
    ///   page the dump still needs may wait for the dump (while it reads that page, or
    ///   when the saved copies reached [`LiveOptions::max_saved_pages`]), so the process
    ///   would deadlock.
    #[allow(unsafe_code)] // declares the contract above
    pub unsafe fn live(
        &mut self,
        kind: LiveKind,
        opts: &LiveOptions,
    ) -> Result<Live<'_>, LiveError> {
        let t = Instant::now();
        if self.info.method != Method::Sync {
            return Err(LiveError::Track(TrackError::Unsupported {
                missing: "synchronous tracking (a background snapshot saves pages at their \
                          first write; start the tracker with Tracker::start and \
                          Avoid::WP_ASYNC)",
                offered: self.info.features,
            }));
        }
        // Every page the plan needs is protected after a take: the written ones again,
        // the others since the last take.
        let taken = self.take().map_err(LiveError::Track)?;
        let plan = match kind {
            LiveKind::Incremental => taken.clone(),
            LiveKind::Full => self.full_plan(),
        };
        let ps = self.page_size as u64;
        let mut pending: Vec<Vec<u64>> = self
            .regions
            .iter()
            .map(|r| vec![0u64; r.pages.div_ceil(64) as usize])
            .collect();
        for s in &plan {
            if let Span::Pages { addr, pages, .. } = *s {
                let i = self.regions.partition_point(|r| r.addr <= addr) - 1;
                let r = &self.regions[i];
                let first = (addr - r.addr) / ps;
                for p in first..first + pages {
                    set(&mut pending[i], p, true);
                }
            }
        }
        let unit = self.regions.iter().map(|r| r.granule).max().unwrap_or(1);
        let state = LiveState {
            reading: pending.iter().map(|b| vec![0; b.len()]).collect(),
            pending,
            saved: HashMap::new(),
            free: Vec::new(),
            allocated: 0,
            max: opts.max_saved_pages.max(unit),
            waits: 0,
            stalls: 0,
            saved_total: 0,
            peak: 0,
        };
        let Engine::Sync(engine) = &self.engine else {
            unreachable!("checked synchronous above")
        };
        engine.shared().lock().live = Some(state);
        let faults_before = self.faults();
        Ok(Live {
            tracker: self,
            plan,
            taken,
            pause: t.elapsed(),
            faults_before,
            snapshot: opts.snapshot.clone(),
            ended: false,
        })
    }
}

impl Live<'_> {
    /// The plan being written.
    pub fn plan(&self) -> &[Span] {
        &self.plan
    }

    /// How long [`Tracker::live`] took.
    pub fn pause(&self) -> Duration {
        self.pause
    }

    fn shared(&self) -> Arc<Shared> {
        let Engine::Sync(engine) = &self.tracker.engine else {
            unreachable!("a live snapshot runs on a synchronous tracker")
        };
        Arc::clone(engine.shared())
    }

    /// Ends the snapshot: the handler stops saving pages, and waiting writers go on.
    fn end(&mut self) -> Option<LiveState> {
        if self.ended {
            return None;
        }
        self.ended = true;
        let shared = self.shared();
        let state = shared.lock().live.take();
        shared.changed.notify_all();
        state
    }

    /// Writes the snapshot into `sink` while the program runs (see the
    /// [ordering](crate::track::live)), as [`LiveOptions::snapshot`] given to
    /// [`Tracker::live`] says (pages always straight from memory).
    ///
    /// # Errors
    /// [`LiveError::Dump`]: the sink failed, and so on; [`LiveError::Lost`]: memory was
    /// discarded, unmapped or moved during the dump, so the sink's image may not be the
    /// memory at the instant. The tracker is then stopped.
    pub fn dump<S: DumpSink + ?Sized>(mut self, sink: &mut S) -> Result<LiveReport, LiveError> {
        let regions = self
            .tracker
            .regions
            .iter()
            .map(|r| DumpRegion {
                addr: r.addr,
                host: r.host,
                pages: r.pages,
            })
            .collect();
        let mut bytes = LiveBytes {
            shared: self.shared(),
            regions,
            ps: self.tracker.page_size as u64,
            in_use: Vec::new(),
        };
        let t = Instant::now();
        let r = snapshot_feed(
            &mut Feed::Bytes(&mut bytes),
            self.plan.iter().copied(),
            sink,
            &self.snapshot,
        );
        let dump_time = t.elapsed();
        // A discard lets its `madvise` caller go only once the handler has read its event
        // (and recorded the loss), so a page the dump read after the discard was recorded
        // lost before this check.
        let lost = bytes.shared.lost();
        let state = self.end();
        let r = match (r, lost) {
            (Ok(_), Some(e)) => Err(LiveError::Lost(e)),
            (r, _) => r.map_err(LiveError::Dump),
        };
        match r {
            Ok(snapshot) => {
                self.taken.clear();
                let st = state.expect("ended here");
                Ok(LiveReport {
                    pause: self.pause,
                    snapshot,
                    dump_time,
                    saved_pages: st.saved_total,
                    saved_peak_bytes: st.peak * self.tracker.page_size as u64,
                    writer_stalls: st.stalls,
                    writer_waits: st.waits,
                    faults: self.tracker.faults() - self.faults_before,
                })
            }
            Err(e) => {
                // Release every writer and everything registered: the next incremental
                // snapshot would have no whole parent.
                let _ = self.tracker.shutdown();
                self.taken.clear();
                self.tracker.failed = Some(match &e {
                    LiveError::Lost(lost) => lost.clone(),
                    _ => TrackError::Lost {
                        host: 0,
                        end: 0,
                        by: super::LostBy::Snapshot,
                    },
                });
                Err(e)
            }
        }
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.end();
        // Not dumped: the pages the take found written are still to be snapshotted.
        for s in std::mem::take(&mut self.taken) {
            if let Span::Pages { addr, pages, .. } = s {
                // Each span lies in one region (plans are made region by region).
                let _ = self.tracker.mark_written(addr, pages);
            }
        }
    }
}
