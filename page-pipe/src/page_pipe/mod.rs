//! The page pipe: bufs, runs, holes and pipes.
//!
//! # Rules
//!
//! These are CRIU's (`criu/page-pipe.c`), with the differences marked *ours*.
//!
//! - **Addresses** are page-aligned and strictly ascending across pages and holes
//!   together: each add starts at or after the end of the previous one. *Ours*: CRIU
//!   assumes this; a page pipe returns [`AddError::Unaligned`], [`AddError::OutOfOrder`]
//!   or [`AddError::Overflow`] and changes nothing.
//! - **Adding a page** goes to the last buf if its flags are the page's flags and its pipe
//!   has room; a full pipe first tries to grow (double, up to the cap). The page extends the
//!   buf's last run if that run ends exactly at it, else it starts a new run, which takes
//!   one unit of the iov budget ([`AddError::IovBudget`] when none is left).
//! - **A new buf** is taken from the free list if there is one; else, in chunk mode with 8
//!   pipes open, the page pipe is full ([`Progress::Full`]); else, in single-pass mode, it
//!   shares the pipe of the last buf of the same type (lazy when the flags have
//!   [`BufFlags::LAZY`] and lazy pages are on, plain otherwise) if that pipe has room or can
//!   grow, starting where that buf ends; else it gets a new pipe.
//! - **Growing a pipe** asks for twice its capacity, at most the cap (see
//!   [`Builder::max_pipe_pages`](crate::Builder::max_pipe_pages)); the capacity is what the
//!   kernel returns. *Ours*: a size refused once is not asked for again.
//! - **Adding a hole** extends the last hole if it has the same flags and ends at the
//!   address, else starts a new hole. Holes take no iov budget.
//! - **Bulk adds** ([`add_pages`](PagePipe::add_pages), [`add_holes`](PagePipe::add_holes))
//!   have the effect of adding their pages one by one, at a cost per run and per pipe.
//!   When they stop early the error (or [`Progress::Full`]) says how many pages went in.
//! - **Releasing a buf** drops it; its pipe closes once no buf uses it. *Ours*: pipes are
//!   reference-counted in a slab that owns them, so no pipe is closed twice or leaked.
//! - **Re-init** (chunk mode): all bufs go to the free list, keeping their pipes (now
//!   drained), the holes are forgotten, and the first free buf becomes the last buf.
//!   *Ours*: the iov budget is available again in full, and the address order carries on
//!   across chunks.

mod drain;
mod error;
#[cfg(any(test, feature = "testing"))]
mod invariants;
mod notation;
mod slab;

use std::marker::PhantomData;

use page_pipe_sys::{NR_PIPES_PER_CHUNK, pipe_max_size_pages};

pub(crate) use drain::{DumpCursor, DumpItem};
pub(crate) use error::PipeFail;
pub use error::{AddError, UnknownBuf};
pub use notation::{Entries, Notation, notation};
use slab::PipeSlab;

use crate::addr::PageRange;
use crate::backend::{KernelPipes, PipeBackend};
use crate::mode::{ChunkMode, IovStore, Mode, OwnIovs, PREALLOCATED_RUNS, SinglePass};
use crate::types::{BufFlags, Hole, HoleFlags, Run};

/// How a page pipe sizes its pipes (set by the [`Builder`](crate::Builder)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PipeSizing {
    /// The cap, if not the default.
    pub(crate) max: Option<u64>,
    /// The size to ask for as soon as a pipe is made, if any.
    pub(crate) initial: Option<u64>,
}

/// The outcome of an add in [`ChunkMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a full page pipe has not taken all pages; capture, dump, re-init and add the rest"]
pub enum Progress {
    /// All pages went in.
    Done,
    /// The page pipe holds 8 pipes and needs a new one: only the first `added` pages went
    /// in. Capture and dump what it holds, [`reinit`](PagePipe::reinit), and add the rest.
    Full {
        /// Pages that went in before the page pipe became full.
        added: u64,
    },
}

/// Identifies a pipe of a page pipe: pipes are numbered from 0 in the order they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PipeId(pub u64);

/// Identifies a buf: its position in the page pipe, and the re-init epoch it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BufId {
    epoch: u32,
    index: u32,
}

/// Counters of a page pipe's life (they survive [`reinit`](PagePipe::reinit)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Pipes made.
    pub pipes_made: u64,
    /// Bufs started (new or taken from the free list).
    pub bufs: u64,
    /// Resizes the kernel granted.
    pub resizes: u64,
    /// Resizes the kernel refused.
    pub resizes_refused: u64,
    /// Pages added.
    pub pages: u64,
    /// Holes started.
    pub holes: u64,
    /// Pages in holes added.
    pub hole_pages: u64,
}

/// A buf: one segment of one pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buf {
    flags: BufFlags,
    slot: usize,
    /// The number of the pipe in `slot` (slots are reused once a pipe closes).
    serial: u64,
    /// Pages of the same pipe used by earlier bufs.
    pipe_off: u64,
    /// Where the buf's pages start in the pipe once captured: `pipe_off` less the pages
    /// of earlier bufs on the pipe that were released before the capture (and so never
    /// went in).
    pipe_pos: u64,
    pages: u64,
    first_run: usize,
    nr_runs: usize,
    live: bool,
    /// Its pipe holds references to memory that may change once the capture's borrow
    /// ends: its pages must leave the crate as copies (DESIGN.md, "page references").
    pinned: bool,
}

/// The outcome of an add, whatever the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Full { added: u64 },
}

/// CRIU's page pipe: records pages as runs in bufs, each buf a segment of a pipe, and
/// holes apart from them; knows where in which pipe each page will sit once captured.
///
/// The type parameters are explained in [`mode`](crate::mode): the mode `M`
/// ([`SinglePass`] or [`ChunkMode`]), the run storage `I` ([`OwnIovs`] or
/// [`CallerIovs`](crate::CallerIovs)); and the pipe backend `B` ([`KernelPipes`], or
/// another [`PipeBackend`]). The module docs of [`page_pipe`](self) list the rules.
///
/// The example of CRIU's `page-pipe.h`, in [CRIU's debug notation](crate::notation):
/// pages `05`, `0F`-`11` and `17`-`18` captured, the rest of the touched memory in the
/// parent snapshot:
///
/// ```
/// use page_pipe::{BufFlags, HoleFlags, PagePipe};
/// let page = page_pipe_sys::page_size().get() as u64;
/// let base = 0x7f00_0000_0000u64;
/// let at = |n: u64| base + n * page;
/// let mut pp = PagePipe::builder().iov_budget(16).build()?;
/// pp.add_holes(at(0x03), 2, HoleFlags::PARENT)?;
/// pp.add_page(at(0x05), BufFlags::empty())?;
/// pp.add_holes(at(0x0B), 4, HoleFlags::PARENT)?;
/// pp.add_pages(at(0x0F), 3, BufFlags::empty())?;
/// pp.add_pages(at(0x17), 2, BufFlags::empty())?;
/// pp.add_holes(at(0x19), 3, HoleFlags::PARENT)?;
/// assert_eq!(pp.notation(base).to_string(), "03:2:P,05:1,0B:4:P,0F:3,17:2,19:3:P");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PagePipe<M: Mode = SinglePass, I: IovStore = OwnIovs, B: PipeBackend = KernelPipes> {
    backend: B,
    page_shift: u32,
    iovs: I,
    bufs: Vec<Buf>,
    free: Vec<Buf>,
    holes: Vec<Hole>,
    pipes: PipeSlab<B::Pipe>,
    prev: [Option<usize>; 2],
    lazy_pages: bool,
    initial: Option<u64>,
    grow_cap: u64,
    refused_from: u64,
    cursor: Option<u64>,
    epoch: u32,
    stats: Stats,
    /// The fast path of an add: pages at `fast.end` with flags `fast.flags` extend the
    /// last run of the last buf while its pipe has `fast.room` pages free.
    fast: Fast,
    _mode: PhantomData<M>,
}

/// What the fast path of [`PagePipe::add_run`] needs. `room > 0` means `buf` is the last
/// buf, not released, with `flags`, and its pipe has `room` pages free; with `extend`,
/// `end` is where its last run ends and nothing was added since.
#[derive(Debug, Clone, Copy, Default)]
struct Fast {
    extend: bool,
    end: u64,
    flags: BufFlags,
    room: u64,
    buf: usize,
    run: usize,
}

/// A view of one buf, from [`PagePipe::bufs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufView<'a> {
    /// The buf's identity, for [`PagePipe::release_buf`].
    pub id: BufId,
    /// The buf's flags.
    pub flags: BufFlags,
    /// Its runs, in address order.
    pub runs: &'a [Run],
    /// Pages in it: the sum of its runs' pages.
    pub pages: u64,
    /// Pages of the same pipe used by earlier bufs; the buf's pages start there.
    pub pipe_off: u64,
    /// The pipe's capacity, in pages.
    pub capacity: u64,
    /// The pipe.
    pub pipe: PipeId,
}

impl<M: Mode, I: IovStore, B: PipeBackend> PagePipe<M, I, B> {
    pub(crate) fn create(
        backend: B,
        iovs: I,
        lazy_pages: bool,
        sizing: PipeSizing,
    ) -> Result<Self, PipeFail> {
        let ps = backend.page_size().get();
        assert!(ps.is_power_of_two(), "page size {ps} is not a power of two");
        let cap = sizing.max.unwrap_or(pipe_max_size_pages(ps) as u64);
        let hole_room = iovs.budget().min(PREALLOCATED_RUNS);
        let mut pp = Self {
            grow_cap: cap.min(backend.max_grant_pages()).max(1),
            backend,
            page_shift: ps.trailing_zeros(),
            iovs,
            bufs: Vec::new(),
            free: Vec::new(),
            // As many holes as runs is a fair guess; reserving address space is cheap, and
            // spares copying the holes to grow.
            holes: Vec::with_capacity(hole_room),
            pipes: PipeSlab::new(),
            prev: [None; 2],
            lazy_pages,
            initial: sizing.initial,
            refused_from: u64::MAX,
            cursor: None,
            epoch: 0,
            stats: Stats::default(),
            fast: Fast::default(),
            _mode: PhantomData,
        };
        pp.new_buf(BufFlags::empty())?;
        Ok(pp)
    }

    /// The page size, in bytes.
    pub fn page_size(&self) -> usize {
        1 << self.page_shift
    }

    pub(crate) fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// Whether lazy bufs get pipes of their own ([`Builder::lazy_pages`](crate::Builder::lazy_pages)).
    pub fn lazy_pages(&self) -> bool {
        self.lazy_pages
    }

    /// The largest capacity, in pages, this page pipe grows a pipe to.
    pub fn max_pipe_pages(&self) -> u64 {
        self.grow_cap
    }

    /// The iov budget: the most runs the page pipe may record.
    pub fn iov_budget(&self) -> usize {
        self.iovs.budget()
    }

    /// Runs recorded so far (since the last re-init), of all bufs including released ones.
    pub fn runs_used(&self) -> usize {
        self.iovs.runs().len()
    }

    /// Pipes open now.
    pub fn open_pipes(&self) -> usize {
        self.pipes.open()
    }

    /// Bufs waiting on the free list (chunk mode, after a re-init).
    pub fn free_bufs(&self) -> usize {
        self.free.len()
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The lowest address the next page or hole may start at: the end of the last one
    /// added (`None` before the first).
    pub fn next_addr(&self) -> Option<u64> {
        self.cursor
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The bufs that are not released, in order.
    pub fn bufs(&self) -> impl Iterator<Item = BufView<'_>> + '_ {
        let runs = self.iovs.runs();
        self.bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.live)
            .map(move |(i, b)| self.view(i, b, runs))
    }

    pub(crate) fn buf_id(&self, index: usize) -> BufId {
        BufId {
            epoch: self.epoch,
            index: index as u32,
        }
    }

    fn view<'a>(&'a self, index: usize, b: &Buf, runs: &'a [Run]) -> BufView<'a> {
        let slot = self.pipes.get(b.slot);
        BufView {
            id: BufId {
                epoch: self.epoch,
                index: index as u32,
            },
            flags: b.flags,
            runs: &runs[b.first_run..b.first_run + b.nr_runs],
            pages: b.pages,
            pipe_off: b.pipe_off,
            capacity: slot.capacity(),
            pipe: PipeId(slot.serial()),
        }
    }

    /// The holes, in address order.
    pub fn holes(&self) -> &[Hole] {
        &self.holes
    }

    /// Runs and holes merged in address order, as the pagemap entries a dump writes: a
    /// run is [`PRESENT`](crate::PageFlags::PRESENT); a lazy buf's run is
    /// [`LAZY`](crate::PageFlags::LAZY), and `PRESENT` too unless lazy pages are on; a hole is
    /// [`PARENT`](crate::PageFlags::PARENT) if it has [`HoleFlags::PARENT`], else it has no flags
    /// (a dump leaves such holes out).
    ///
    /// ```
    /// use page_pipe::{BufFlags, HoleFlags, PageFlags, PagemapEntry, PagePipe};
    /// let mut pp = PagePipe::builder().iov_budget(4).build()?;
    /// pp.add_holes(0x1000, 1, HoleFlags::PARENT)?;
    /// pp.add_page(0x2000, BufFlags::empty())?;
    /// let e: Vec<PagemapEntry> = pp.entries().collect();
    /// assert_eq!(e[0], PagemapEntry { vaddr: 0x1000, pages: 1, flags: PageFlags::PARENT });
    /// assert_eq!(e[1], PagemapEntry { vaddr: 0x2000, pages: 1, flags: PageFlags::PRESENT });
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn entries(&self) -> Entries<'_> {
        Entries::new(self.iovs.runs(), &self.bufs, &self.holes, self.lazy_pages)
    }

    /// [`entries`](Self::entries) in [CRIU's debug notation](crate::notation), with page numbers
    /// counted from `base`. `Display` for a page pipe uses base 0.
    pub fn notation(&self, base: u64) -> Notation<'_, M, I, B> {
        Notation { pp: self, base }
    }

    /// Releases a buf: it is dropped, and its pipe is closed once no buf uses it.
    ///
    /// ```
    /// use page_pipe::{BufFlags, PagePipe};
    /// let mut pp = PagePipe::builder().iov_budget(4).build()?;
    /// pp.add_page(0x1000, BufFlags::empty())?;
    /// let id = pp.bufs().next().unwrap().id;
    /// pp.release_buf(id)?;
    /// assert_eq!((pp.bufs().count(), pp.open_pipes()), (0, 0));
    /// assert!(pp.release_buf(id).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`UnknownBuf`] for a buf already released or from before a re-init.
    pub fn release_buf(&mut self, id: BufId) -> Result<(), UnknownBuf> {
        let index = id.index as usize;
        if id.epoch != self.epoch || !self.bufs.get(index).is_some_and(|b| b.live) {
            return Err(UnknownBuf(id));
        }
        self.bufs[index].live = false;
        self.fast.room = 0;
        for p in &mut self.prev {
            if *p == Some(index) {
                *p = None;
            }
        }
        self.unuse(self.bufs[index].slot);
        Ok(())
    }

    /// Adds a hole of one page at `addr`.
    ///
    /// # Errors
    /// An address error ([`AddError::Unaligned`], [`AddError::OutOfOrder`]); the page pipe
    /// is unchanged.
    pub fn add_hole(&mut self, addr: u64, flags: HoleFlags) -> Result<(), AddError> {
        self.add_holes(addr, 1, flags)
    }

    /// Adds a hole of `pages` pages at `addr`, with the effect of adding them one by one.
    ///
    /// # Errors
    /// An address error; the page pipe is unchanged.
    pub fn add_holes(&mut self, addr: u64, pages: u64, flags: HoleFlags) -> Result<(), AddError> {
        let end = self.check_range(addr, pages)?;
        if pages == 0 {
            return Ok(());
        }
        let ps = self.page_size();
        // A page after this hole cannot extend the last run; it may still go into the
        // last buf.
        self.fast.extend = false;
        match self.holes.last_mut() {
            Some(h) if h.flags == flags && h.end(ps) == addr => h.pages += pages,
            _ => {
                self.holes.push(Hole::new(addr, pages, flags));
                self.stats.holes += 1;
            }
        }
        self.stats.hole_pages += pages;
        self.cursor = Some(end);
        Ok(())
    }

    /// Checks that `pages` pages from `addr` may be added; returns their end.
    fn check_range(&self, addr: u64, pages: u64) -> Result<u64, AddError> {
        let range = PageRange::new(addr, pages, self.page_size()).map_err(AddError::from)?;
        if let Some(min) = self.cursor
            && addr < min
        {
            return Err(AddError::OutOfOrder { addr, min });
        }
        Ok(range.end())
    }

    /// Adds `n` pages from `addr` with buf flags `flags`, following the rules one page at
    /// a time in effect, one run or pipe at a time in cost.
    #[inline(always)]
    pub(crate) fn add_run(
        &mut self,
        addr: u64,
        n: u64,
        flags: BufFlags,
    ) -> Result<Outcome, AddError> {
        let shift = self.page_shift;
        let f = &mut self.fast;
        if flags == f.flags && n <= f.room && n > 0 {
            let end = (n << shift).checked_add(addr);
            if f.extend
                && addr == f.end
                && let Some(end) = end
            {
                // The pages extend the last run of the last buf, whose pipe has room.
                f.end = end;
                f.room -= n;
                self.iovs.runs_mut()[f.run].pages += n;
                self.bufs[f.buf].pages += n;
                self.stats.pages += n;
                self.cursor = Some(end);
                return Ok(Outcome::Done);
            }
            if let (Some(end), Some(min)) = (end, self.cursor)
                && addr & ((1 << shift) - 1) == 0
                && addr >= min
                && self.iovs.runs().len() < self.iovs.budget()
            {
                // A new run in the last buf, whose pipe has room: the last run does not
                // end at `addr` (else the branch above took it), so it cannot extend.
                self.iovs.push(Run::new(addr, n));
                let b = &mut self.bufs[f.buf];
                b.nr_runs += 1;
                b.pages += n;
                f.run = b.first_run + b.nr_runs - 1;
                f.end = end;
                f.extend = true;
                f.room -= n;
                self.stats.pages += n;
                self.cursor = Some(end);
                return Ok(Outcome::Done);
            }
        }
        self.add_run_slow(addr, n, flags)
    }

    #[inline(never)]
    fn add_run_slow(&mut self, addr: u64, n: u64, flags: BufFlags) -> Result<Outcome, AddError> {
        self.check_range(addr, n)?;
        let mut added = 0;
        while added < n {
            let at = addr + (added << self.page_shift);
            let fits = if self.fast.room > 0 && self.fast.flags == flags {
                // The fast path's buf is the last buf, and its pipe has room.
                Some((self.fast.buf, self.fast.room))
            } else {
                match self.last_live() {
                    Some(bi) if self.bufs[bi].flags == flags => self.room(bi).map(|r| (bi, r)),
                    _ => None,
                }
            };
            if let Some((bi, room)) = fits {
                let k = room.min(n - added);
                self.put(bi, at, k).map_err(|()| AddError::IovBudget {
                    addr: at,
                    budget: self.iovs.budget(),
                    added,
                })?;
                added += k;
                continue;
            }
            // A new buf, which always starts a new run: check the budget first, so that
            // no pipe is made for a page that cannot be recorded.
            if self.iovs.runs().len() >= self.iovs.budget() {
                return Err(AddError::IovBudget {
                    addr: at,
                    budget: self.iovs.budget(),
                    added,
                });
            }
            match self.new_buf(flags) {
                Ok(true) => {}
                Ok(false) => return Ok(Outcome::Full { added }),
                Err(e) => return Err(e.at(at, added)),
            }
        }
        Ok(Outcome::Done)
    }

    /// Puts `k` pages from `at` into buf `bi`, whose pipe has room for them.
    fn put(&mut self, bi: usize, at: u64, k: u64) -> Result<(), ()> {
        let ps = self.page_size();
        let b = &mut self.bufs[bi];
        let extend = b.nr_runs > 0 && {
            let last = &self.iovs.runs()[b.first_run + b.nr_runs - 1];
            last.end(ps) == at
        };
        if extend {
            self.iovs.runs_mut()[b.first_run + b.nr_runs - 1].pages += k;
        } else {
            if self.iovs.runs().len() >= self.iovs.budget() {
                return Err(());
            }
            self.iovs.push(Run::new(at, k));
            b.nr_runs += 1;
        }
        b.pages += k;
        self.stats.pages += k;
        let end = at + (k << self.page_shift);
        self.cursor = Some(end);
        let used = b.pipe_off + b.pages;
        let capacity = self.pipes.get(b.slot).capacity();
        self.fast = Fast {
            extend: true,
            end,
            flags: b.flags,
            room: capacity.saturating_sub(used),
            buf: bi,
            run: b.first_run + b.nr_runs - 1,
        };
        Ok(())
    }

    fn last_live(&self) -> Option<usize> {
        match self.bufs.last() {
            Some(b) if b.live => Some(self.bufs.len() - 1),
            _ => None,
        }
    }

    /// Pages buf `bi`'s pipe has free after the buf, growing the pipe if it has none;
    /// `None` when it is full and cannot grow.
    fn room(&mut self, bi: usize) -> Option<u64> {
        let b = self.bufs[bi];
        let used = b.pipe_off + b.pages;
        let cap = self.pipes.get(b.slot).capacity();
        if used < cap {
            return Some(cap - used);
        }
        self.grow_pipe(b.slot)
            .then(|| self.pipes.get(b.slot).capacity() - used)
    }

    /// Doubles the capacity of the pipe in `slot`, up to the cap.
    fn grow_pipe(&mut self, slot: usize) -> bool {
        let cap = self.pipes.get(slot).capacity();
        if cap >= self.grow_cap {
            return false;
        }
        self.resize(slot, cap.saturating_mul(2).min(self.grow_cap))
    }

    /// Asks for `want` pages for the pipe in `slot`, unless a size as large was refused
    /// before; whether the kernel granted more than the pipe had.
    fn resize(&mut self, slot: usize, want: u64) -> bool {
        if want >= self.refused_from {
            return false;
        }
        let s = self.pipes.get(slot);
        let cap = s.capacity();
        match self.backend.resize_pipe(s.pipe(), want) {
            Ok(granted) if granted > cap => {
                self.pipes.set_capacity(slot, granted);
                self.stats.resizes += 1;
                true
            }
            Ok(_) | Err(_) => {
                self.refused_from = want;
                self.stats.resizes_refused += 1;
                false
            }
        }
    }

    fn pipe_type(&self, flags: BufFlags) -> usize {
        usize::from(self.lazy_pages && flags.contains(BufFlags::LAZY))
    }

    /// Starts a new buf with `flags` (CRIU's `page_pipe_grow`): `Ok(false)` when chunk
    /// mode is full.
    fn new_buf(&mut self, flags: BufFlags) -> Result<bool, PipeFail> {
        let first_run = self.iovs.runs().len();
        if let Some(mut b) = self.free.pop() {
            b.flags = flags;
            b.pages = 0;
            b.first_run = first_run;
            b.nr_runs = 0;
            b.live = true;
            b.pinned = false;
            self.bufs.push(b);
            self.stats.bufs += 1;
            return Ok(true);
        }
        if M::CHUNK && self.pipes.open() >= NR_PIPES_PER_CHUNK {
            return Ok(false);
        }
        let ty = self.pipe_type(flags);
        let share = match self.prev[ty] {
            Some(p) if !M::CHUNK && self.bufs[p].live => self.room(p).map(|_| p),
            _ => None,
        };
        let (slot, pipe_off) = match share {
            Some(p) => {
                let b = self.bufs[p];
                self.pipes.add_user(b.slot);
                (b.slot, b.pipe_off + b.pages)
            }
            None => (self.make_pipe()?, 0),
        };
        self.bufs.push(Buf {
            flags,
            slot,
            serial: self.pipes.get(slot).serial(),
            pipe_off,
            pipe_pos: pipe_off,
            pages: 0,
            first_run,
            nr_runs: 0,
            live: true,
            pinned: false,
        });
        self.prev[ty] = Some(self.bufs.len() - 1);
        self.stats.bufs += 1;
        Ok(true)
    }

    fn make_pipe(&mut self) -> Result<usize, PipeFail> {
        let (pipe, capacity) = self.backend.make_pipe().map_err(PipeFail::Make)?;
        let expected = self.backend.default_pages();
        if capacity == 0 || capacity < expected {
            return Err(PipeFail::Tiny { capacity, expected });
        }
        self.stats.pipes_made += 1;
        let slot = self.pipes.insert(pipe, capacity);
        if let Some(initial) = self.initial {
            let want = initial.min(self.grow_cap);
            if want > capacity {
                self.resize(slot, want);
            }
        }
        Ok(slot)
    }

    /// One buf stops using the pipe in `slot`; the pipe goes back to the backend with
    /// its last user.
    fn unuse(&mut self, slot: usize) {
        if let Some(s) = self.pipes.remove_user(slot) {
            let (pipe, capacity, unused) = s.into_parts();
            self.backend.release_pipe(pipe, capacity, unused);
        }
    }

    /// Re-init, for chunk mode only (the public [`PagePipe::reinit`]).
    fn reinit_inner(&mut self) {
        debug_assert!(M::CHUNK);
        for b in self.bufs.drain(..) {
            if b.live {
                self.free.push(b);
            }
        }
        self.iovs.clear();
        self.holes.clear();
        self.prev = [None; 2];
        self.fast.room = 0;
        self.epoch = self.epoch.wrapping_add(1);
        if let Some(mut b) = self.free.pop() {
            b.flags = BufFlags::empty();
            b.pages = 0;
            b.first_run = 0;
            b.nr_runs = 0;
            b.live = true;
            b.pinned = false;
            self.bufs.push(b);
            self.stats.bufs += 1;
        }
        self.pipes.reset();
    }
}

impl<I: IovStore, B: PipeBackend> PagePipe<SinglePass, I, B> {
    /// Adds the page at `addr` with buf flags `flags`.
    ///
    /// # Errors
    /// [`AddError`]: an address error (nothing changes), an exhausted iov budget, or a
    /// pipe the kernel refused to make.
    #[inline]
    pub fn add_page(&mut self, addr: u64, flags: BufFlags) -> Result<(), AddError> {
        self.add_pages(addr, 1, flags)
    }

    /// Adds `pages` pages from `addr`, with the effect of adding them one by one at a cost
    /// per run and per pipe.
    ///
    /// ```
    /// use page_pipe::{BufFlags, PagePipe};
    /// let mut pp = PagePipe::builder().iov_budget(64).build()?;
    /// pp.add_pages(0x10000, 1000, BufFlags::empty())?;
    /// assert_eq!(pp.bufs().map(|b| b.pages).sum::<u64>(), 1000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`add_page`](Self::add_page); [`AddError::added`] says how many pages went in.
    #[inline]
    pub fn add_pages(&mut self, addr: u64, pages: u64, flags: BufFlags) -> Result<(), AddError> {
        match self.add_run(addr, pages, flags)? {
            Outcome::Done => Ok(()),
            Outcome::Full { .. } => unreachable!("only chunk mode becomes full"),
        }
    }
}

impl<I: IovStore, B: PipeBackend> PagePipe<ChunkMode, I, B> {
    /// Adds the page at `addr` with buf flags `flags`; [`Progress::Full`] when it needs a
    /// ninth pipe.
    ///
    /// # Errors
    /// As [`PagePipe::<SinglePass>::add_page`](PagePipe::add_page).
    #[inline]
    pub fn add_page(&mut self, addr: u64, flags: BufFlags) -> Result<Progress, AddError> {
        self.add_pages(addr, 1, flags)
    }

    /// Adds `pages` pages from `addr`; [`Progress::Full`] says how many went in when it
    /// needs a ninth pipe.
    ///
    /// ```
    /// use page_pipe::{BufFlags, PagePipe, Progress};
    /// let ps = page_pipe::page_size() as u64;
    /// // Pipes of at most 32 pages, so 8 of them hold 256 pages.
    /// let mut pp = PagePipe::builder()
    ///     .chunk_mode()
    ///     .max_pipe_pages(32)
    ///     .iov_budget(64)
    ///     .build()?;
    /// let p = pp.add_pages(0, 5000, BufFlags::empty())?;
    /// assert_eq!(p, Progress::Full { added: 8 * 32 });
    /// // (Capture and dump what it holds here.) Then re-init and go on.
    /// pp.reinit();
    /// assert_eq!(pp.add_pages(8 * 32 * ps, 100, BufFlags::empty())?, Progress::Done);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`PagePipe::<SinglePass>::add_pages`](PagePipe::add_pages).
    #[inline]
    pub fn add_pages(
        &mut self,
        addr: u64,
        pages: u64,
        flags: BufFlags,
    ) -> Result<Progress, AddError> {
        Ok(match self.add_run(addr, pages, flags)? {
            Outcome::Done => Progress::Done,
            Outcome::Full { added } => Progress::Full { added },
        })
    }

    /// Re-init after the pipes have been drained: all bufs go to the free list with their
    /// pipes, the runs and holes are forgotten, and the first free buf starts again.
    pub fn reinit(&mut self) {
        self.reinit_inner();
    }
}

impl<M: Mode, I: IovStore, B: PipeBackend> Drop for PagePipe<M, I, B> {
    fn drop(&mut self) {
        for (pipe, capacity, unused) in self.pipes.take_all() {
            self.backend.release_pipe(pipe, capacity, unused);
        }
    }
}
