//! The invariants of a page pipe, checked from its internals by the tests (through
//! `testing::check_invariants`).

use std::collections::BTreeMap;

use page_pipe_sys::NR_PIPES_PER_CHUNK;

use super::PagePipe;
use crate::backend::PipeBackend;
use crate::mode::{IovStore, Mode};
use crate::types::BufFlags;

impl<M: Mode, I: IovStore, B: PipeBackend> PagePipe<M, I, B> {
    /// Checks the invariants of DESIGN.md against the internals; see
    /// [`testing::check_invariants`](crate::testing::check_invariants).
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let pp = self;
        let ps = pp.page_size() as u64;
        let runs = pp.iovs.runs();
        if runs.len() > pp.iov_budget() {
            return Err(format!(
                "{} runs exceed the budget {}",
                runs.len(),
                pp.iov_budget()
            ));
        }
        // Spans of runs and holes, to check order and overlap together.
        let mut spans: Vec<(u64, u64, &str)> = Vec::new();
        let mut on_pipe: BTreeMap<u64, Vec<(u64, u64, bool, bool)>> = BTreeMap::new();
        for (i, b) in pp.bufs.iter().enumerate() {
            let mine = &runs[b.first_run..b.first_run + b.nr_runs];
            let sum: u64 = mine.iter().map(|r| r.pages).sum();
            if sum != b.pages {
                return Err(format!(
                    "buf {i}: {} pages but its runs hold {sum}",
                    b.pages
                ));
            }
            for w in mine.windows(2) {
                if w[0].vaddr + w[0].pages * ps == w[1].vaddr {
                    return Err(format!(
                        "buf {i}: runs {:?} and {:?} are contiguous",
                        w[0], w[1]
                    ));
                }
            }
            if mine.iter().any(|r| r.pages == 0) {
                return Err(format!("buf {i}: an empty run"));
            }
            if b.live {
                spans.extend(
                    mine.iter()
                        .map(|r| (r.vaddr, r.vaddr + r.pages * ps, "run")),
                );
            }
            let lazy = pp.lazy_pages() && b.flags.contains(BufFlags::LAZY);
            on_pipe
                .entry(b.serial)
                .or_default()
                .push((b.pipe_off, b.pages, lazy, b.live));
        }
        spans.extend(
            pp.holes()
                .iter()
                .map(|h| (h.vaddr, h.vaddr + h.pages * ps, "hole")),
        );
        spans.sort();
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!(
                    "{} {:#x}..{:#x} overlaps {} {:#x}..{:#x}",
                    w[0].2, w[0].0, w[0].1, w[1].2, w[1].0, w[1].1
                ));
            }
        }
        for w in pp.holes().windows(2) {
            if w[0].vaddr >= w[1].vaddr {
                return Err(format!("holes out of order: {:?} {:?}", w[0], w[1]));
            }
            if w[0].flags == w[1].flags && w[0].end(ps as usize) == w[1].vaddr {
                return Err(format!(
                    "holes {:?} and {:?} should have coalesced",
                    w[0], w[1]
                ));
            }
        }
        let mut open = 0;
        for (slot, s) in pp.pipes.iter() {
            open += 1;
            let bufs = on_pipe.get(&s.serial()).map(Vec::as_slice).unwrap_or(&[]);
            let free = pp.free.iter().filter(|b| b.slot == slot).count();
            let users = bufs.iter().filter(|b| b.3).count() + free;
            if users != s.users() as usize {
                return Err(format!(
                    "pipe {}: {} users counted, {users} bufs on it",
                    s.serial(),
                    s.users()
                ));
            }
            let mut end = 0;
            for &(off, pages, _, _) in bufs {
                if off != end {
                    return Err(format!(
                        "pipe {}: a buf starts at {off}, the previous ended at {end}",
                        s.serial()
                    ));
                }
                end = off + pages;
            }
            if end > s.capacity() {
                return Err(format!(
                    "pipe {}: {end} pages in a capacity of {}",
                    s.serial(),
                    s.capacity()
                ));
            }
            if M::CHUNK && bufs.len() > 1 {
                return Err(format!("pipe {} is shared in chunk mode", s.serial()));
            }
            if bufs.iter().any(|b| b.2) && bufs.iter().any(|b| !b.2) {
                return Err(format!(
                    "pipe {} holds lazy and plain bufs with lazy pages on",
                    s.serial()
                ));
            }
        }
        if open != pp.open_pipes() {
            return Err(format!("{open} pipes open, {} counted", pp.open_pipes()));
        }
        if M::CHUNK && open > NR_PIPES_PER_CHUNK {
            return Err(format!("{open} pipes open in chunk mode"));
        }
        for b in &pp.bufs {
            let open = pp.pipes.try_get(b.slot);
            if b.live && open.is_none_or(|s| s.serial() != b.serial) {
                return Err("a live buf's pipe is closed".into());
            }
        }
        Ok(())
    }
}

impl<M: Mode, I: IovStore, B: PipeBackend> PagePipe<M, I, B> {
    /// Re-init in chunk mode, nothing otherwise: for tests generic over the mode.
    pub(crate) fn reinit_for_tests(&mut self) {
        if M::CHUNK {
            self.reinit_inner();
        }
    }

    /// A drain without bytes, for tests generic over the backend: the books a capture and
    /// dump keep, through the same steps ([`begin_drain`](Self::begin_drain), the
    /// [`DumpCursor`](super::DumpCursor), `consume`/`lose`). The dump takes the first
    /// `ok` present entries and fails on the next (all of them if `ok` is `None`); in
    /// chunk mode the page pipe then re-inits as [`Captured::reinit`](crate::Captured)
    /// does. Returns the entries the dump wrote.
    pub(crate) fn drain_for_tests(&mut self, ok: Option<usize>) -> Vec<crate::PagemapEntry> {
        use super::DumpItem;
        self.begin_drain();
        let mut cursor = super::DumpCursor::new();
        let mut written = Vec::new();
        let mut present = 0;
        while let Some(item) = cursor.next(self) {
            match item {
                DumpItem::Absent(e) => written.push(e),
                DumpItem::Present { entry, slot, .. } => {
                    if ok.is_some_and(|ok| present >= ok) {
                        self.lose(slot);
                        break;
                    }
                    present += 1;
                    self.consume(slot, entry.pages);
                    written.push(entry);
                }
            }
        }
        if M::CHUNK {
            self.release_held();
            self.reinit_inner();
        }
        written
    }
}
