//! What a drain does to a page pipe's bookkeeping: the order a dump writes entries in,
//! and what each pipe holds before, during and after.
//!
//! Both ways pages leave a page pipe share this: a capture followed by a dump (bytes
//! through pipes), and a dump straight from memory (bytes from the source, no pipes). They
//! decide *what* goes out here, in the same order and with the same flags, and differ only
//! in *how* bytes move (see `crate::dump`).
//!
//! 1. [`PagePipe::begin_drain`]: each live buf gets its place in its pipe (`pipe_pos`,
//!    its `pipe_off` less the pages of released bufs before it, which never go in) and
//!    each pipe the number of pages that go in.
//! 2. A [`DumpCursor`] walks the entries in address order (CRIU's
//!    `page_xfer_dump_pages`: before each run, the holes below it): holes with `PARENT`
//!    and lazy runs left in their pipes come out as [`DumpItem::Absent`], present runs as
//!    [`DumpItem::Present`] with where their pages sit; holes without flags are left out.
//!    The mover takes each present run's pages from the front of its pipe and says so
//!    with [`PagePipe::consume`], or [`PagePipe::lose`] when a transfer failed part way.
//! 3. Chunk mode: [`PagePipe::reinit_drained`] releases the bufs whose pages are still in
//!    their pipes (not dumped, or lazy) and re-inits.

use super::PagePipe;
use super::notation::run_flags;
use crate::backend::PipeBackend;
use crate::image::{PageFlags, PagemapEntry};
use crate::mode::{ChunkMode, IovStore, Mode};
use crate::types::Run;

/// One step of a dump, from a [`DumpCursor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DumpItem {
    /// An entry whose pages do not move: `PARENT`, or `LAZY` left in its pipe.
    Absent(PagemapEntry),
    /// A `PRESENT` entry: its pages are pages `pos..pos + entry.pages` (counted from the
    /// start of the capture) of the pipe in `slot`, which holds buf `buf`.
    Present {
        entry: PagemapEntry,
        buf: usize,
        slot: usize,
        pos: u64,
    },
}

/// Walks a page pipe's entries in dump order. It holds indices only, so the page pipe can
/// be changed (its accounting) between steps.
#[derive(Debug, Default)]
pub(crate) struct DumpCursor {
    buf: usize,
    run: usize,
    hole: usize,
    /// Pages of the current buf before the current run.
    off: u64,
}

impl DumpCursor {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The next step, or `None` after the last.
    pub(crate) fn next<M: Mode, I: IovStore, B: PipeBackend>(
        &mut self,
        pp: &PagePipe<M, I, B>,
    ) -> Option<DumpItem> {
        let runs = pp.iovs.runs();
        let run = loop {
            match pp.bufs.get(self.buf) {
                Some(b) if b.live && self.run < b.nr_runs => {
                    break Some((runs[b.first_run + self.run], self.buf));
                }
                Some(_) => {
                    self.buf += 1;
                    self.run = 0;
                    self.off = 0;
                }
                None => break None,
            }
        };
        // Holes below the next run (or all that are left), skipping those without flags.
        while let Some(h) = pp.holes.get(self.hole) {
            if run.is_some_and(|(r, _)| r.vaddr < h.vaddr) {
                break;
            }
            self.hole += 1;
            let flags = super::notation::hole_flags(h.flags);
            if !flags.is_empty() {
                return Some(DumpItem::Absent(PagemapEntry {
                    vaddr: h.vaddr,
                    pages: h.pages,
                    flags,
                }));
            }
        }
        let (r, bi) = run?;
        let b = &pp.bufs[bi];
        let entry = PagemapEntry {
            vaddr: r.vaddr,
            pages: r.pages,
            flags: run_flags(b.flags, pp.lazy_pages),
        };
        let pos = b.pipe_pos + self.off;
        self.run += 1;
        self.off += r.pages;
        Some(if entry.flags.contains(PageFlags::PRESENT) {
            DumpItem::Present {
                entry,
                buf: bi,
                slot: b.slot,
                pos,
            }
        } else {
            DumpItem::Absent(entry)
        })
    }
}

/// A live buf as a capture or a server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufInfo {
    pub(crate) flags: crate::types::BufFlags,
    pub(crate) slot: usize,
    pub(crate) pipe_pos: u64,
    pub(crate) pages: u64,
    pub(crate) first_run: usize,
    pub(crate) nr_runs: usize,
    pub(crate) live: bool,
    pub(crate) pinned: bool,
}

impl<M: Mode, I: IovStore, B: PipeBackend> PagePipe<M, I, B> {
    /// Step 1 of a drain: places the live bufs in their pipes and counts what each pipe
    /// will hold. Earlier accounting is forgotten.
    pub(crate) fn begin_drain(&mut self) {
        let mut fill = vec![0u64; self.bufs.iter().map(|b| b.slot + 1).max().unwrap_or(0)];
        for b in self.bufs.iter_mut().filter(|b| b.live) {
            b.pipe_pos = fill[b.slot];
            b.pinned = false;
            fill[b.slot] += b.pages;
        }
        self.pipes.begin_capture(&fill);
    }

    /// All runs recorded, of live and released bufs.
    pub(crate) fn runs(&self) -> &[Run] {
        self.iovs.runs()
    }

    /// How many bufs there are, released ones included (their indices stay valid until a
    /// re-init).
    pub(crate) fn buf_count(&self) -> usize {
        self.bufs.len()
    }

    /// Buf `i`.
    pub(crate) fn buf_info(&self, i: usize) -> BufInfo {
        let b = &self.bufs[i];
        BufInfo {
            flags: b.flags,
            slot: b.slot,
            pipe_pos: b.pipe_pos,
            pages: b.pages,
            first_run: b.first_run,
            nr_runs: b.nr_runs,
            live: b.live,
            pinned: b.pinned,
        }
    }

    /// Buf `i`'s pages reference memory that may change once the capture's borrow ends.
    pub(crate) fn pin(&mut self, i: usize) {
        self.bufs[i].pinned = true;
    }

    /// The pipe in `slot`, which a live buf uses.
    pub(crate) fn pipe(&self, slot: usize) -> &B::Pipe {
        self.pipes.get(slot).pipe()
    }

    /// The pipe in `slot`, if it is open.
    pub(crate) fn slot(&self, slot: usize) -> Option<&super::slab::Slot<B::Pipe>> {
        self.pipes.try_get(slot)
    }

    /// The largest capacity of the open pipes, in pages.
    pub(crate) fn largest_pipe(&self) -> u64 {
        self.pipes
            .iter()
            .map(|(_, s)| s.capacity())
            .max()
            .unwrap_or(0)
    }

    /// `pages` pages were taken from the front of the pipe in `slot`.
    pub(crate) fn consume(&mut self, slot: usize, pages: u64) {
        self.pipes.consume(slot, pages);
    }

    /// A transfer from the pipe in `slot` failed part way: nothing more comes from it.
    pub(crate) fn lose(&mut self, slot: usize) {
        self.pipes.lose(slot);
    }

    /// A transfer from the pipe in `slot`, marked lost before it started, ended well.
    pub(crate) fn regain(&mut self, slot: usize) {
        self.pipes.regain(slot);
    }

    /// The buf and run holding `addr`, if a live buf holds it: binary search over the
    /// runs (which ascend across all bufs), then over the bufs (ordered by first run).
    pub(crate) fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        let runs = self.iovs.runs();
        let shift = self.page_shift;
        let ri = runs.partition_point(|r| r.vaddr + (r.pages << shift) <= addr);
        if runs.get(ri)?.vaddr > addr {
            return None;
        }
        let bi = self.bufs.partition_point(|b| b.first_run + b.nr_runs <= ri);
        let b = self.bufs.get(bi)?;
        (b.live && b.first_run <= ri).then_some((bi, ri))
    }
}

impl<I: IovStore, B: PipeBackend> PagePipe<ChunkMode, I, B> {
    /// Step 3 of a drain in chunk mode: bufs whose pages are still in their pipes (not
    /// dumped, lazy, or behind a failed transfer) are released, closing those pipes; the
    /// rest go to the free list with their drained pipes; then the page pipe re-inits.
    pub(crate) fn reinit_drained(&mut self) {
        self.release_held();
        self.reinit_inner();
    }
}

impl<M: Mode, I: IovStore, B: PipeBackend> PagePipe<M, I, B> {
    /// [`reinit_drained`](PagePipe::reinit_drained) in chunk mode; nothing in single-pass
    /// mode, where a drain is the last thing a page pipe does.
    pub(crate) fn reinit_drained_if_chunked(&mut self) {
        if M::CHUNK {
            self.release_held();
            self.reinit_inner();
        }
    }

    /// Releases the live bufs whose pages are still in their pipes (not dumped, lazy, or
    /// behind a failed transfer).
    pub(super) fn release_held(&mut self) {
        for i in 0..self.bufs.len() {
            let b = self.bufs[i];
            if !b.live {
                continue;
            }
            let s = self.pipes.get(b.slot);
            if s.holds_pages() || s.is_lost() {
                self.bufs[i].live = false;
                self.fast.room = 0;
                self.unuse(b.slot);
            }
        }
    }
}
