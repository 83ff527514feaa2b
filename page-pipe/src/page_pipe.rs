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
//!   reference-counted, so no pipe is closed twice or leaked.
//! - **Re-init** (chunk mode): all bufs go to the free list, keeping their pipes (now
//!   drained), the holes are forgotten, and the first free buf becomes the last buf.
//!   *Ours*: the iov budget is available again in full, and the address order carries on
//!   across chunks.

use std::fmt;
use std::marker::PhantomData;

use page_pipe_sys::{Errno, NR_PIPES_PER_CHUNK, pipe_max_size_pages};

use crate::backend::{KernelPipes, PipeBackend};
use crate::builder::{ChunkMode, IovStore, Mode, OwnIovs, PipeSizing, SinglePass};
use crate::types::{BufFlags, Entry, Hole, HoleFlags, Run};

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

/// Why an add did not take all its pages.
///
/// Address errors leave the page pipe unchanged. The others can stop a bulk add half way:
/// `added` pages went in (and stay), the rest did not, starting at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddError {
    /// `addr` is not a multiple of the page size.
    Unaligned {
        /// The address.
        addr: u64,
        /// The page size.
        page_size: usize,
    },
    /// `addr` lies below the end of the last page or hole added.
    OutOfOrder {
        /// The address.
        addr: u64,
        /// The lowest address the next add may start at.
        min: u64,
    },
    /// `pages` pages from `addr` pass the end of the address space.
    Overflow {
        /// The address.
        addr: u64,
        /// The pages asked for.
        pages: u64,
    },
    /// Recording the page at `addr` needs a new run and all `budget` runs are used.
    IovBudget {
        /// The first page not added.
        addr: u64,
        /// The iov budget.
        budget: usize,
        /// Pages of this call that went in.
        added: u64,
    },
    /// The kernel refused to make a pipe (`EMFILE`, `ENFILE`, ...).
    MakePipe {
        /// The first page not added.
        addr: u64,
        /// The refusal.
        errno: Errno,
        /// Pages of this call that went in.
        added: u64,
    },
    /// A new pipe got less than a new pipe should (`capacity` pages instead of
    /// `expected`): this user is past `/proc/sys/fs/pipe-user-pages-soft`, and going on
    /// would crawl through tiny pipes that cannot grow.
    PipeLimit {
        /// The first page not added.
        addr: u64,
        /// Capacity of the new pipe, in pages.
        capacity: u64,
        /// Capacity a new pipe has below the limit.
        expected: u64,
        /// Pages of this call that went in.
        added: u64,
    },
}

impl AddError {
    /// Pages of the failed call that went in before it stopped.
    pub fn added(&self) -> u64 {
        match self {
            AddError::Unaligned { .. }
            | AddError::OutOfOrder { .. }
            | AddError::Overflow { .. } => 0,
            AddError::IovBudget { added, .. }
            | AddError::MakePipe { added, .. }
            | AddError::PipeLimit { added, .. } => *added,
        }
    }

    /// The address the error is about: the first page not added.
    pub fn addr(&self) -> u64 {
        match self {
            AddError::Unaligned { addr, .. }
            | AddError::OutOfOrder { addr, .. }
            | AddError::Overflow { addr, .. }
            | AddError::IovBudget { addr, .. }
            | AddError::MakePipe { addr, .. }
            | AddError::PipeLimit { addr, .. } => *addr,
        }
    }
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddError::Unaligned { addr, page_size } => {
                write!(
                    f,
                    "address {addr:#x} is not aligned to the page size ({page_size})"
                )
            }
            AddError::OutOfOrder { addr, min } => write!(
                f,
                "address {addr:#x} is out of order: addresses must ascend, the next may start at {min:#x}"
            ),
            AddError::Overflow { addr, pages } => {
                write!(
                    f,
                    "{pages} pages from {addr:#x} pass the end of the address space"
                )
            }
            AddError::IovBudget {
                addr,
                budget,
                added,
            } => write!(
                f,
                "page {addr:#x} needs a new run but all {budget} runs of the iov budget are used ({added} pages of this call went in)"
            ),
            AddError::MakePipe { addr, errno, added } => {
                write!(f, "cannot make a pipe for page {addr:#x}: {errno}")?;
                if matches!(*errno, Errno::MFILE | Errno::NFILE) {
                    f.write_str(
                        " (out of file descriptors, see RLIMIT_NOFILE and pipe-user-pages-hard; chunk mode needs at most 8 pipes)",
                    )?;
                }
                write!(f, " ({added} pages of this call went in)")
            }
            AddError::PipeLimit {
                addr,
                capacity,
                expected,
                added,
            } => write!(
                f,
                "a new pipe for page {addr:#x} got {capacity} pages instead of {expected}: this user is past /proc/sys/fs/pipe-user-pages-soft; \
                 close pipes or use chunk mode (PagePipe::builder().chunk_mode()), which needs at most 8 pipes ({added} pages of this call went in)"
            ),
        }
    }
}

impl std::error::Error for AddError {}

/// Why [`release_buf`](PagePipe::release_buf) refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownBuf(pub BufId);

impl fmt::Display for UnknownBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "buf {} of epoch {} is not in this page pipe (released, or from before a re-init)",
            self.0.index, self.0.epoch
        )
    }
}

impl std::error::Error for UnknownBuf {}

/// A buf: one segment of one pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buf {
    pub(crate) flags: BufFlags,
    pub(crate) slot: usize,
    /// The number of the pipe in `slot` (slots are reused once a pipe closes).
    pub(crate) serial: u64,
    /// Pages of the same pipe used by earlier bufs.
    pub(crate) pipe_off: u64,
    /// Where the buf's pages start in the pipe once captured: `pipe_off` less the pages
    /// of earlier bufs on the pipe that were released before the capture (and so never
    /// went in).
    pub(crate) pipe_pos: u64,
    pub(crate) pages: u64,
    pub(crate) first_run: usize,
    pub(crate) nr_runs: usize,
    pub(crate) live: bool,
}

/// A pipe with its capacity and the number of bufs (live or free) that use it.
#[derive(Debug)]
pub(crate) struct Slot<P> {
    pub(crate) pipe: P,
    pub(crate) capacity: u64,
    pub(crate) users: u32,
    pub(crate) serial: u64,
    /// Pages put into the pipe by the capture.
    pub(crate) filled: u64,
    /// Pages taken from the front of the pipe since the capture (by a dump).
    pub(crate) consumed: u64,
}

/// Why making a pipe failed, before it is tied to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PipeFail {
    Make(Errno),
    Tiny { capacity: u64, expected: u64 },
}

impl PipeFail {
    pub(crate) fn at(self, addr: u64, added: u64) -> AddError {
        match self {
            PipeFail::Make(errno) => AddError::MakePipe { addr, errno, added },
            PipeFail::Tiny { capacity, expected } => AddError::PipeLimit {
                addr,
                capacity,
                expected,
                added,
            },
        }
    }
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
/// The type parameters are explained in [`builder`](crate::builder#types): the mode `M`
/// ([`SinglePass`] or [`ChunkMode`]), the iov storage `I` ([`OwnIovs`] or
/// [`CallerIovs`](crate::CallerIovs)) and the pipe backend `B` ([`KernelPipes`] or
/// [`FakePipes`](crate::FakePipes)). The module docs of [`page_pipe`](self) list the
/// rules.
///
/// The seed's example: pages `05`, `0F`-`11` and `17`-`18` captured, the rest of the
/// touched memory in the parent snapshot:
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
    pub(crate) backend: B,
    pub(crate) page_shift: u32,
    pub(crate) iovs: I,
    pub(crate) bufs: Vec<Buf>,
    pub(crate) free: Vec<Buf>,
    pub(crate) holes: Vec<Hole>,
    pub(crate) pipes: Vec<Option<Slot<B::Pipe>>>,
    vacant: Vec<usize>,
    pub(crate) open_pipes: usize,
    prev: [Option<usize>; 2],
    lazy_pages: bool,
    initial: Option<u64>,
    grow_cap: u64,
    refused_from: u64,
    pub(crate) cursor: Option<u64>,
    epoch: u32,
    pub(crate) stats: Stats,
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
        let hole_room = iovs.budget().min(crate::builder::PREALLOCATED_RUNS);
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
            pipes: Vec::new(),
            vacant: Vec::new(),
            open_pipes: 0,
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
        self.open_pipes
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
        let slot = self.slot(b.slot);
        BufView {
            id: BufId {
                epoch: self.epoch,
                index: index as u32,
            },
            flags: b.flags,
            runs: &runs[b.first_run..b.first_run + b.nr_runs],
            pages: b.pages,
            pipe_off: b.pipe_off,
            capacity: slot.capacity,
            pipe: PipeId(slot.serial),
        }
    }

    /// The holes, in address order.
    pub fn holes(&self) -> &[Hole] {
        &self.holes
    }

    /// Runs and holes merged in address order: what a dump writes as pagemap entries.
    ///
    /// ```
    /// use page_pipe::{BufFlags, Entry, HoleFlags, PagePipe};
    /// let mut pp = PagePipe::builder().iov_budget(4).build()?;
    /// pp.add_holes(0x1000, 1, HoleFlags::PARENT)?;
    /// pp.add_page(0x2000, BufFlags::empty())?;
    /// let e: Vec<Entry> = pp.entries().collect();
    /// assert_eq!(e[1], Entry::Pages { vaddr: 0x2000, pages: 1, flags: BufFlags::empty() });
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn entries(&self) -> Entries<'_> {
        Entries {
            runs: self.iovs.runs(),
            bufs: &self.bufs,
            holes: &self.holes,
            buf: 0,
            run: 0,
            hole: 0,
        }
    }

    /// The seed's notation of [`entries`](Self::entries), with page numbers counted from
    /// `base`: `PAGE:COUNT` for a run, `:L` added for a lazy buf's run, `:P` for a hole
    /// in the parent, `:-` for a hole with no flags. Page numbers are hex (at least two
    /// digits), counts decimal. `Display` for a page pipe uses base 0.
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
        let ps = self.page_size();
        if addr & (ps as u64 - 1) != 0 {
            return Err(AddError::Unaligned {
                addr,
                page_size: ps,
            });
        }
        if let Some(min) = self.cursor
            && addr < min
        {
            return Err(AddError::OutOfOrder { addr, min });
        }
        pages
            .checked_mul(ps as u64)
            .and_then(|len| addr.checked_add(len))
            .ok_or(AddError::Overflow { addr, pages })
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
        let capacity = self.pipes[b.slot].as_ref().map_or(0, |s| s.capacity);
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

    pub(crate) fn slot(&self, slot: usize) -> &Slot<B::Pipe> {
        self.pipes[slot]
            .as_ref()
            .expect("a live buf's pipe is open")
    }

    /// Pages buf `bi`'s pipe has free after the buf, growing the pipe if it has none;
    /// `None` when it is full and cannot grow.
    fn room(&mut self, bi: usize) -> Option<u64> {
        let b = self.bufs[bi];
        let used = b.pipe_off + b.pages;
        let cap = self.slot(b.slot).capacity;
        if used < cap {
            return Some(cap - used);
        }
        self.grow_pipe(b.slot)
            .then(|| self.slot(b.slot).capacity - used)
    }

    /// Doubles the capacity of the pipe in `slot`, up to the cap.
    fn grow_pipe(&mut self, slot: usize) -> bool {
        let cap = self.slot(slot).capacity;
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
        let s = self.pipes[slot]
            .as_mut()
            .expect("a live buf's pipe is open");
        let cap = s.capacity;
        match self.backend.resize_pipe(&s.pipe, want) {
            Ok(granted) if granted > cap => {
                s.capacity = granted;
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
            self.bufs.push(b);
            self.stats.bufs += 1;
            return Ok(true);
        }
        if M::CHUNK && self.open_pipes >= NR_PIPES_PER_CHUNK {
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
                self.pipes[b.slot].as_mut().expect("open").users += 1;
                (b.slot, b.pipe_off + b.pages)
            }
            None => (self.make_pipe()?, 0),
        };
        self.bufs.push(Buf {
            flags,
            slot,
            serial: self.slot(slot).serial,
            pipe_off,
            pipe_pos: pipe_off,
            pages: 0,
            first_run,
            nr_runs: 0,
            live: true,
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
        let slot = Slot {
            pipe,
            capacity,
            users: 1,
            serial: self.stats.pipes_made,
            filled: 0,
            consumed: 0,
        };
        self.stats.pipes_made += 1;
        self.open_pipes += 1;
        let slot = match self.vacant.pop() {
            Some(i) => {
                self.pipes[i] = Some(slot);
                i
            }
            None => {
                self.pipes.push(Some(slot));
                self.pipes.len() - 1
            }
        };
        if let Some(initial) = self.initial {
            let want = initial.min(self.grow_cap);
            if want > capacity {
                self.resize(slot, want);
            }
        }
        Ok(slot)
    }

    /// One buf stops using the pipe in `slot`; the pipe closes with its last user.
    pub(crate) fn unuse(&mut self, slot: usize) {
        let s = self.pipes[slot].as_mut().expect("a used pipe is open");
        s.users -= 1;
        if s.users == 0 {
            let s = self.pipes[slot].take().expect("open");
            self.backend.release_pipe(s.pipe, s.capacity, s.filled == 0);
            self.vacant.push(slot);
            self.open_pipes -= 1;
        }
    }

    /// Re-init, for chunk mode only (the public [`PagePipe::reinit`]).
    pub(crate) fn reinit_inner(&mut self) {
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
            self.bufs.push(b);
            self.stats.bufs += 1;
        }
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
    /// use page_pipe::{BufFlags, FakeKernel, FakePipes, PagePipe, Progress};
    /// let mut pp = PagePipe::builder()
    ///     .chunk_mode()
    ///     .iov_budget(64)
    ///     .build_with(FakePipes::new(FakeKernel::new(4096)))?;
    /// // 8 pipes of at most 256 pages each.
    /// let p = pp.add_pages(0, 5000, BufFlags::empty())?;
    /// assert_eq!(p, Progress::Full { added: 8 * 256 });
    /// pp.reinit();
    /// assert_eq!(pp.add_pages(8 * 256 * 4096, 100, BufFlags::empty())?, Progress::Done);
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
        for s in self.pipes.iter_mut().filter_map(Option::take) {
            self.backend.release_pipe(s.pipe, s.capacity, s.filled == 0);
        }
    }
}

/// Runs and holes in address order; from [`PagePipe::entries`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    runs: &'a [Run],
    bufs: &'a [Buf],
    holes: &'a [Hole],
    buf: usize,
    run: usize,
    hole: usize,
}

impl Entries<'_> {
    fn next_run(&mut self) -> Option<(Run, BufFlags)> {
        while let Some(b) = self.bufs.get(self.buf) {
            if b.live && self.run < b.nr_runs {
                return Some((self.runs[b.first_run + self.run], b.flags));
            }
            self.buf += 1;
            self.run = 0;
        }
        None
    }
}

impl Iterator for Entries<'_> {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        let run = self.next_run();
        let hole = self.holes.get(self.hole).copied();
        match (run, hole) {
            (Some((r, flags)), h) if h.is_none_or(|h| r.vaddr < h.vaddr) => {
                self.run += 1;
                Some(Entry::Pages {
                    vaddr: r.vaddr,
                    pages: r.pages,
                    flags,
                })
            }
            (_, Some(h)) => {
                self.hole += 1;
                Some(Entry::Hole(h))
            }
            (None, None) => None,
            (Some(_), None) => unreachable!("the first arm takes a run when there is no hole"),
        }
    }
}

/// The seed's notation of a page pipe; from [`PagePipe::notation`].
#[derive(Debug)]
pub struct Notation<'a, M: Mode, I: IovStore, B: PipeBackend> {
    pp: &'a PagePipe<M, I, B>,
    base: u64,
}

impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Display for Notation<'_, M, I, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_notation(f, self.pp.entries(), self.base, self.pp.page_shift)
    }
}

/// Writes entries in the seed's notation.
pub(crate) fn write_notation(
    f: &mut fmt::Formatter<'_>,
    entries: impl Iterator<Item = Entry>,
    base: u64,
    page_shift: u32,
) -> fmt::Result {
    for (i, e) in entries.enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        let page = e.vaddr().wrapping_sub(base) >> page_shift;
        write!(f, "{page:02X}:{}", e.pages())?;
        match e {
            Entry::Pages { flags, .. } if flags.contains(BufFlags::LAZY) => f.write_str(":L")?,
            Entry::Pages { .. } => {}
            Entry::Hole(h) if h.flags.contains(HoleFlags::PARENT) => f.write_str(":P")?,
            Entry::Hole(_) => f.write_str(":-")?,
        }
    }
    Ok(())
}

impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Display for PagePipe<M, I, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_notation(f, self.entries(), 0, self.page_shift)
    }
}

impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Debug for PagePipe<M, I, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Bufs<'a, M: Mode, I: IovStore, B: PipeBackend>(&'a PagePipe<M, I, B>);
        impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Debug for Bufs<'_, M, I, B> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.0.bufs()).finish()
            }
        }
        f.debug_struct("PagePipe")
            .field("chunk_mode", &M::CHUNK)
            .field("lazy_pages", &self.lazy_pages)
            .field("page_size", &self.page_size())
            .field("iov_budget", &self.iov_budget())
            .field("runs_used", &self.runs_used())
            .field("open_pipes", &self.open_pipes)
            .field("free_bufs", &self.free.len())
            .field("bufs", &Bufs(self))
            .field("holes", &self.holes)
            .field("stats", &self.stats)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CallerIovs, FakeKernel, FakePipes, OwnIovs};

    const PS: u64 = 4096;

    fn fake() -> FakePipes {
        FakePipes::new(FakeKernel::new(PS as usize))
    }

    fn single(budget: usize) -> PagePipe<SinglePass, OwnIovs, FakePipes> {
        PagePipe::builder()
            .iov_budget(budget)
            .build_with(fake())
            .unwrap()
    }

    fn chunked(budget: usize) -> PagePipe<ChunkMode, OwnIovs, FakePipes> {
        PagePipe::builder()
            .chunk_mode()
            .iov_budget(budget)
            .build_with(fake())
            .unwrap()
    }

    fn runs(pp: &PagePipe<impl Mode, impl IovStore, impl PipeBackend>) -> Vec<Vec<(u64, u64)>> {
        pp.bufs()
            .map(|b| b.runs.iter().map(|r| (r.vaddr / PS, r.pages)).collect())
            .collect()
    }

    #[test]
    fn seed_layout_prints_in_seed_notation() {
        let mut pp = single(16);
        let base = 0x10_0000;
        let at = |n: u64| base + n * PS;
        // The seed's first example: 03:3, 0B:6, 18:4, all present.
        pp.add_pages(at(0x03), 3, BufFlags::empty()).unwrap();
        pp.add_pages(at(0x0B), 6, BufFlags::empty()).unwrap();
        pp.add_pages(at(0x18), 4, BufFlags::empty()).unwrap();
        assert_eq!(pp.notation(base).to_string(), "03:3,0B:6,18:4");
        assert_eq!(runs(&pp), vec![vec![(0x103, 3), (0x10B, 6), (0x118, 4)]]);
    }

    #[test]
    fn page_by_page_coalesces_into_the_last_run() {
        let mut pp = single(4);
        for p in 0..10 {
            pp.add_page(p * PS, BufFlags::empty()).unwrap();
        }
        pp.add_page(20 * PS, BufFlags::empty()).unwrap();
        assert_eq!(runs(&pp), vec![vec![(0, 10), (20, 1)]]);
        assert_eq!(pp.runs_used(), 2);
    }

    #[test]
    fn a_flag_change_starts_a_new_buf_sharing_the_pipe() {
        let mut pp = single(8);
        pp.add_pages(0, 3, BufFlags::empty()).unwrap();
        pp.add_pages(3 * PS, 2, BufFlags::LAZY).unwrap();
        pp.add_pages(5 * PS, 1, BufFlags::empty()).unwrap();
        let b: Vec<_> = pp
            .bufs()
            .map(|b| (b.flags, b.pipe, b.pipe_off, b.pages))
            .collect();
        // Lazy pages off: both kinds share pipe 0, back to back.
        assert_eq!(
            b,
            vec![
                (BufFlags::empty(), PipeId(0), 0, 3),
                (BufFlags::LAZY, PipeId(0), 3, 2),
                (BufFlags::empty(), PipeId(0), 5, 1),
            ]
        );
        assert_eq!(pp.notation(0).to_string(), "00:3,03:2:L,05:1");
    }

    #[test]
    fn lazy_pages_keep_lazy_bufs_on_pipes_of_their_own() {
        let mut pp = PagePipe::builder()
            .iov_budget(8)
            .lazy_pages(true)
            .build_with(fake())
            .unwrap();
        pp.add_pages(0, 3, BufFlags::empty()).unwrap();
        pp.add_pages(3 * PS, 2, BufFlags::LAZY).unwrap();
        pp.add_pages(5 * PS, 1, BufFlags::empty()).unwrap();
        pp.add_pages(6 * PS, 1, BufFlags::LAZY).unwrap();
        let b: Vec<_> = pp.bufs().map(|b| (b.pipe, b.pipe_off)).collect();
        assert_eq!(
            b,
            vec![
                (PipeId(0), 0),
                (PipeId(1), 0),
                (PipeId(0), 3),
                (PipeId(1), 2)
            ]
        );
    }

    #[test]
    fn pipes_grow_by_doubling_to_the_cap_then_a_new_pipe_is_made() {
        let mut pp = single(8);
        // The fake grants up to 256 pages (1 MiB), as pipe-max-size does here.
        pp.add_pages(0, 256, BufFlags::empty()).unwrap();
        assert_eq!(pp.stats().resizes, 4, "16 -> 32 -> 64 -> 128 -> 256");
        assert_eq!(pp.stats().pipes_made, 1);
        pp.add_page(256 * PS, BufFlags::empty()).unwrap();
        let b: Vec<_> = pp.bufs().map(|b| (b.pipe, b.capacity, b.pages)).collect();
        assert_eq!(b, vec![(PipeId(0), 256, 256), (PipeId(1), 16, 1)]);
        // The cap is min(PIPE_MAX_SIZE, what the kernel grants): no refused call was made.
        assert_eq!(pp.stats().resizes_refused, 0);
        assert_eq!(pp.backend().kernel().resizes(), 4);
        // The run continues across bufs: two runs, contiguous, in different bufs.
        assert_eq!(runs(&pp), vec![vec![(0, 256)], vec![(256, 1)]]);
    }

    #[test]
    fn a_refused_size_is_not_asked_for_again() {
        let mut k = FakeKernel::new(PS as usize);
        k.fail_resize.insert(1); // 32 -> 64 refused once
        let mut pp = PagePipe::builder()
            .iov_budget(8)
            .build_with(FakePipes::new(k))
            .unwrap();
        pp.add_pages(0, 100, BufFlags::empty()).unwrap();
        let caps: Vec<_> = pp.bufs().map(|b| (b.capacity, b.pages)).collect();
        // Every pipe stops at 32 pages; 64 is never asked for again.
        assert_eq!(caps, vec![(32, 32), (32, 32), (32, 32), (16, 4)]);
        assert_eq!(pp.stats().resizes_refused, 1);
        assert_eq!(pp.backend().kernel().resizes(), 2 + 2);
    }

    #[test]
    fn chunk_mode_is_full_at_eight_pipes_and_reuses_them_after_reinit() {
        let mut pp = chunked(64);
        let p = pp.add_pages(0, 10_000, BufFlags::empty()).unwrap();
        assert_eq!(p, Progress::Full { added: 8 * 256 });
        assert_eq!(pp.open_pipes(), 8);
        assert_eq!(pp.next_addr(), Some(8 * 256 * PS));
        // Adding more is still full, and changes nothing.
        assert_eq!(
            pp.add_page(8 * 256 * PS, BufFlags::empty()).unwrap(),
            Progress::Full { added: 0 }
        );
        pp.reinit();
        assert_eq!(pp.free_bufs(), 7);
        assert_eq!(pp.runs_used(), 0);
        // CRIU takes the most recently freed buf first: the last pipe of the chunk.
        assert_eq!(pp.bufs().next().unwrap().pipe, PipeId(7));
        let p = pp
            .add_pages(8 * 256 * PS, 10_000, BufFlags::empty())
            .unwrap();
        assert_eq!(p, Progress::Full { added: 8 * 256 });
        assert_eq!(pp.stats().pipes_made, 8, "no new pipe after re-init");
        let order: Vec<u64> = pp.bufs().map(|b| b.pipe.0).collect();
        assert_eq!(order, vec![7, 6, 5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn chunk_mode_never_shares_pipes() {
        let mut pp = chunked(64);
        assert_eq!(pp.add_pages(0, 2, BufFlags::empty()), Ok(Progress::Done));
        assert_eq!(pp.add_pages(2 * PS, 2, BufFlags::LAZY), Ok(Progress::Done));
        let pipes: Vec<_> = pp.bufs().map(|b| b.pipe).collect();
        assert_eq!(pipes, vec![PipeId(0), PipeId(1)]);
    }

    #[test]
    fn bad_addresses_are_errors_that_change_nothing() {
        let mut pp = single(8);
        pp.add_pages(10 * PS, 2, BufFlags::empty()).unwrap();
        let before = format!("{pp:?}");
        assert_eq!(
            pp.add_page(12 * PS + 1, BufFlags::empty()),
            Err(AddError::Unaligned {
                addr: 12 * PS + 1,
                page_size: PS as usize
            })
        );
        assert_eq!(
            pp.add_page(11 * PS, BufFlags::empty()),
            Err(AddError::OutOfOrder {
                addr: 11 * PS,
                min: 12 * PS
            })
        );
        assert_eq!(
            pp.add_hole(11 * PS, HoleFlags::PARENT),
            Err(AddError::OutOfOrder {
                addr: 11 * PS,
                min: 12 * PS
            })
        );
        let top = u64::MAX - PS + 1;
        assert_eq!(
            pp.add_pages(top, 2, BufFlags::empty()),
            Err(AddError::Overflow {
                addr: top,
                pages: 2
            })
        );
        assert_eq!(format!("{pp:?}"), before);
        let msg = AddError::OutOfOrder {
            addr: 0x1000,
            min: 0x3000,
        }
        .to_string();
        assert!(msg.contains("0x1000") && msg.contains("0x3000"), "{msg}");
    }

    #[test]
    fn the_fast_paths_check_the_end_of_the_address_space() {
        let mut pp = single(8);
        let top = u64::MAX - PS + 1; // the last page
        pp.add_page(top - 2 * PS, BufFlags::empty()).unwrap();
        // Extending the last run, then a new run, up to the last page: fine.
        pp.add_page(top - PS, BufFlags::empty()).unwrap();
        // A page whose end is 2^64 cannot be added, whichever path looks at it.
        assert_eq!(
            pp.add_page(top, BufFlags::empty()),
            Err(AddError::Overflow {
                addr: top,
                pages: 1
            })
        );
        let mut pp = single(8);
        pp.add_page(top - 4 * PS, BufFlags::empty()).unwrap();
        assert_eq!(
            pp.add_page(top, BufFlags::empty()),
            Err(AddError::Overflow {
                addr: top,
                pages: 1
            })
        );
        assert_eq!(pp.next_addr(), Some(top - 3 * PS));
    }

    #[test]
    fn an_exhausted_budget_stops_with_the_pages_that_went_in() {
        let mut pp = single(2);
        pp.add_page(0, BufFlags::empty()).unwrap();
        pp.add_page(2 * PS, BufFlags::empty()).unwrap();
        // Extending the last run needs no budget.
        pp.add_pages(3 * PS, 5, BufFlags::empty()).unwrap();
        let err = pp.add_pages(10 * PS, 1, BufFlags::empty()).unwrap_err();
        assert_eq!(
            err,
            AddError::IovBudget {
                addr: 10 * PS,
                budget: 2,
                added: 0
            }
        );
        // A flag change needs a new buf, hence a run: refused before any pipe is made.
        let made = pp.stats().pipes_made;
        let err = pp.add_pages(8 * PS, 3, BufFlags::LAZY).unwrap_err();
        assert_eq!(err.added(), 0);
        assert_eq!(pp.stats().pipes_made, made);
        assert_eq!(pp.stats().pages, 7);
        assert!(err.to_string().contains("budget"));
    }

    #[test]
    fn a_refused_pipe_is_an_error_with_progress_and_the_page_pipe_goes_on() {
        let mut k = FakeKernel::new(PS as usize);
        k.max_pages = 16;
        k.fail_make.insert(1);
        let counter;
        let mut pp = {
            let fake = FakePipes::new(k);
            counter = fake.open_counter();
            PagePipe::builder().iov_budget(8).build_with(fake).unwrap()
        };
        let err = pp.add_pages(0, 20, BufFlags::empty()).unwrap_err();
        assert_eq!(
            err,
            AddError::MakePipe {
                addr: 16 * PS,
                errno: Errno::MFILE,
                added: 16
            }
        );
        assert!(err.to_string().contains("RLIMIT_NOFILE"));
        // The next try gets a pipe and carries on where it stopped.
        pp.add_pages(16 * PS, 4, BufFlags::empty()).unwrap();
        assert_eq!(pp.stats().pages, 20);
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop(pp);
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn tiny_pipes_past_the_soft_limit_are_an_error_naming_it() {
        let mut k = FakeKernel::new(PS as usize);
        k.max_pages = 16;
        k.tiny_after = Some(2);
        let mut pp = PagePipe::builder()
            .iov_budget(8)
            .build_with(FakePipes::new(k))
            .unwrap();
        let err = pp.add_pages(0, 100, BufFlags::empty()).unwrap_err();
        assert_eq!(
            err,
            AddError::PipeLimit {
                addr: 32 * PS,
                capacity: 2,
                expected: 16,
                added: 32
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("pipe-user-pages-soft") && msg.contains("chunk mode"),
            "{msg}"
        );
        assert_eq!(pp.open_pipes(), 2);
    }

    #[test]
    fn holes_coalesce_only_with_equal_flags() {
        let mut pp = single(8);
        pp.add_holes(0, 2, HoleFlags::PARENT).unwrap();
        pp.add_hole(2 * PS, HoleFlags::PARENT).unwrap();
        pp.add_hole(3 * PS, HoleFlags::empty()).unwrap();
        pp.add_hole(5 * PS, HoleFlags::empty()).unwrap();
        let h: Vec<_> = pp
            .holes()
            .iter()
            .map(|h| (h.vaddr / PS, h.pages, h.flags))
            .collect();
        assert_eq!(
            h,
            vec![
                (0, 3, HoleFlags::PARENT),
                (3, 1, HoleFlags::empty()),
                (5, 1, HoleFlags::empty())
            ]
        );
        assert_eq!(pp.to_string(), "00:3:P,03:1:-,05:1:-");
        assert_eq!(pp.stats().holes, 3);
        assert_eq!(pp.stats().hole_pages, 5);
    }

    #[test]
    fn a_shared_pipe_closes_with_its_last_buf() {
        let fake = fake();
        let counter = fake.open_counter();
        let mut pp = PagePipe::builder().iov_budget(8).build_with(fake).unwrap();
        pp.add_pages(0, 2, BufFlags::empty()).unwrap();
        pp.add_pages(2 * PS, 2, BufFlags::LAZY).unwrap();
        let ids: Vec<_> = pp.bufs().map(|b| b.id).collect();
        pp.release_buf(ids[0]).unwrap();
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(pp.release_buf(ids[0]), Err(UnknownBuf(ids[0])));
        pp.release_buf(ids[1]).unwrap();
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(pp.open_pipes(), 0);
        // Adding after all bufs are gone makes a new buf and pipe.
        pp.add_page(10 * PS, BufFlags::empty()).unwrap();
        assert_eq!(pp.open_pipes(), 1);
        assert_eq!(pp.bufs().next().unwrap().pipe, PipeId(1));
    }

    #[test]
    fn caller_storage_holds_the_runs() {
        let mut storage = [Run::EMPTY; 3];
        {
            let mut pp: PagePipe<SinglePass, CallerIovs<'_>, FakePipes> = PagePipe::builder()
                .iov_storage(&mut storage)
                .build_with(fake())
                .unwrap();
            assert_eq!(pp.iov_budget(), 3);
            pp.add_pages(0, 2, BufFlags::empty()).unwrap();
            pp.add_pages(4 * PS, 2, BufFlags::empty()).unwrap();
            pp.add_pages(8 * PS, 2, BufFlags::empty()).unwrap();
            assert!(matches!(
                pp.add_page(11 * PS, BufFlags::empty()),
                Err(AddError::IovBudget { .. })
            ));
        }
        assert_eq!(storage[2], Run::new(8 * PS, 2));
    }

    #[test]
    fn zero_budget_is_a_build_error() {
        let r = PagePipe::builder().iov_budget(0).build_with(fake());
        assert_eq!(r.unwrap_err(), crate::BuildError::ZeroBudget);
        let mut k = FakeKernel::new(PS as usize);
        k.fail_make.insert(0);
        let r = PagePipe::builder()
            .iov_budget(1)
            .build_with(FakePipes::new(k));
        assert_eq!(r.unwrap_err(), crate::BuildError::MakePipe(Errno::MFILE));
    }

    #[test]
    fn entries_interleave_holes_and_runs_across_bufs() {
        let mut pp = single(16);
        pp.add_holes(0, 1, HoleFlags::PARENT).unwrap();
        pp.add_pages(PS, 2, BufFlags::empty()).unwrap();
        pp.add_holes(3 * PS, 1, HoleFlags::PARENT).unwrap();
        pp.add_pages(4 * PS, 1, BufFlags::LAZY).unwrap();
        pp.add_holes(5 * PS, 2, HoleFlags::empty()).unwrap();
        let kinds: Vec<_> = pp
            .entries()
            .map(|e| (e.vaddr() / PS, e.pages(), matches!(e, Entry::Hole(_))))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, 1, true),
                (1, 2, false),
                (3, 1, true),
                (4, 1, false),
                (5, 2, true)
            ]
        );
    }

    #[test]
    fn what_the_crate_docs_say_is_send_and_sync_is() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<PagePipe>();
        send::<PagePipe<ChunkMode, CallerIovs<'static>, FakePipes>>();
        send::<crate::Captured<'static>>();
        send::<crate::Captured<'static, ChunkMode, CallerIovs<'static>>>();
        send::<crate::ReadDest>();
        send::<crate::image::ImageWriter>();
        send::<crate::image::Image>();
        sync::<crate::image::Image>();
        send::<crate::Source<'static>>();
        sync::<crate::Source<'static>>();
        send::<std::sync::Arc<crate::PipePool>>();
    }
}
