//! A pure model of the page pipe's rules, and the checker that compares a real page pipe
//! with it.
//!
//! The [`Model`] keeps no file descriptors and adds pages strictly one at a time, as
//! CRIU's `page_pipe_add_page` does; pipe answers come from a [`FakeKernel`]. It is the
//! reference the property tests, the fuzz target and the integration tests hold the real
//! [`PagePipe`] to: [`run_ops`] applies the same [`Op`]s to both and compares every
//! observable after every step ([`compare`]), and [`check_invariants`] checks what must
//! hold of any page pipe.
//!
//! ```
//! use page_pipe::testing::{run_ops, Config, FakeKernel, FakePipes, Model, Op};
//! use page_pipe::PagePipe;
//! let cfg = Config { budget: 8, ..Config::new(FakeKernel::new(4096)) };
//! let mut model = Model::new(cfg.clone()).unwrap();
//! let mut pp = PagePipe::builder()
//!     .iov_budget(cfg.budget)
//!     .build_with(FakePipes::new(cfg.kernel.clone()))?;
//! let ops = [Op::Pages { gap: 0, n: 40, lazy: false }, Op::Holes { gap: 1, n: 2, parent: true }];
//! run_ops(&mut pp, &mut model, &ops, 0x10000).unwrap();
//! # Ok::<(), page_pipe::BuildError>(())
//! ```

use std::collections::BTreeMap;

use page_pipe_sys::{Errno, NR_PIPES_PER_CHUNK, pipe_max_size_pages};

use super::FakeKernel;
use crate::backend::PipeBackend;
use crate::image::{PageFlags, PagemapEntry};
use crate::mode::{IovStore, Mode};
use crate::page_pipe::{AddError, PagePipe, Progress, Stats};
use crate::types::{BufFlags, Hole, HoleFlags, Run};

/// How a page pipe (and its model) is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Chunk mode.
    pub chunk: bool,
    /// Lazy pages on.
    pub lazy_pages: bool,
    /// The iov budget.
    pub budget: usize,
    /// [`Builder::max_pipe_pages`](crate::Builder::max_pipe_pages), if set.
    pub max_pipe_pages: Option<u64>,
    /// [`Builder::initial_pipe_pages`](crate::Builder::initial_pipe_pages), if set.
    pub initial_pipe_pages: Option<u64>,
    /// Runs kept in caller-provided storage ([`CallerIovs`](crate::CallerIovs)) rather
    /// than [`OwnIovs`](crate::OwnIovs).
    pub caller_iovs: bool,
    /// The kernel's answers.
    pub kernel: FakeKernel,
}

impl Config {
    /// Single-pass mode, lazy pages off, a budget of 1024 runs, default pipe sizing.
    pub fn new(kernel: FakeKernel) -> Self {
        Self {
            chunk: false,
            lazy_pages: false,
            budget: 1024,
            max_pipe_pages: None,
            initial_pipe_pages: None,
            caller_iovs: false,
            kernel,
        }
    }

    /// Decodes a configuration from the front of `data`, consuming what it used. Every
    /// byte string decodes to some configuration, with a 4 KiB page size.
    pub fn decode(data: &mut &[u8]) -> Config {
        let mut byte = || {
            let (&b, rest) = data.split_first().unwrap_or((&0, &[]));
            *data = rest;
            b
        };
        let (mode, budget, max, def, limit) = (byte(), byte(), byte(), byte(), byte());
        let (fails, f1, f2) = (byte(), byte(), byte());
        let mut kernel = FakeKernel::new(4096);
        kernel.default_pages = u64::from(def % 16) + 1;
        kernel.max_pages = 1 << (limit % 9);
        kernel.tiny_after = (mode & 0x10 != 0).then_some(u64::from(limit >> 4));
        if fails & 1 != 0 {
            kernel.fail_make.insert(u64::from(f1 % 32));
        }
        if fails & 2 != 0 {
            kernel.fail_resize.insert(u64::from(f2 % 64));
        }
        Config {
            chunk: mode & 1 != 0,
            lazy_pages: mode & 2 != 0,
            caller_iovs: mode & 4 != 0,
            budget: usize::from(budget % 48) + 1,
            max_pipe_pages: (mode & 8 != 0).then_some(u64::from(max) + 1),
            initial_pipe_pages: (mode & 0x20 != 0).then_some(u64::from(max % 64) + 1),
            kernel,
        }
    }
}

/// A buf of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelBuf {
    /// Flags.
    pub flags: BufFlags,
    /// The pipe's number.
    pub pipe: u64,
    /// Offset in the pipe, in pages.
    pub pipe_off: u64,
    /// Runs.
    pub runs: Vec<Run>,
    /// Not released.
    pub live: bool,
}

impl ModelBuf {
    /// Pages in the buf.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.pages).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelPipe {
    capacity: u64,
    users: u32,
}

/// The model: CRIU's rules, one page at a time, no file descriptors.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    kernel: FakeKernel,
    page_size: u64,
    cap: u64,
    /// Bufs in order, released ones included (marked not live).
    pub bufs: Vec<ModelBuf>,
    free: Vec<ModelBuf>,
    /// Holes in order.
    pub holes: Vec<Hole>,
    pipes: BTreeMap<u64, ModelPipe>,
    prev: [Option<usize>; 2],
    runs_used: usize,
    refused_from: u64,
    cursor: Option<u64>,
    /// Counters, as [`PagePipe::stats`].
    pub stats: Stats,
}

enum Step {
    Added,
    Full,
}

impl Model {
    /// A model set up as `cfg`; it makes its first buf and pipe at once, as a page pipe
    /// does.
    ///
    /// # Errors
    /// The error of the first pipe, with address 0.
    pub fn new(cfg: Config) -> Result<Self, AddError> {
        let ps = cfg.kernel.page_size.get() as u64;
        let cap = cfg
            .max_pipe_pages
            .unwrap_or(pipe_max_size_pages(ps as usize) as u64)
            .min(cfg.kernel.max_pages)
            .max(1);
        let mut m = Self {
            kernel: cfg.kernel.clone(),
            page_size: ps,
            cap,
            cfg,
            bufs: Vec::new(),
            free: Vec::new(),
            holes: Vec::new(),
            pipes: BTreeMap::new(),
            prev: [None; 2],
            runs_used: 0,
            refused_from: u64::MAX,
            cursor: None,
            stats: Stats::default(),
        };
        m.grow(BufFlags::empty()).map_err(|e| e(0, 0))?;
        Ok(m)
    }

    /// Pipes open now.
    pub fn open_pipes(&self) -> usize {
        self.pipes.len()
    }

    /// The kernel stand-in, with its call counters.
    pub fn kernel(&self) -> &FakeKernel {
        &self.kernel
    }

    fn check(&self, addr: u64, n: u64) -> Result<(), AddError> {
        if !addr.is_multiple_of(self.page_size) {
            return Err(AddError::Unaligned {
                addr,
                page_size: self.page_size as usize,
            });
        }
        if let Some(min) = self.cursor
            && addr < min
        {
            return Err(AddError::OutOfOrder { addr, min });
        }
        if (addr as u128) + (n as u128) * (self.page_size as u128) > u64::MAX as u128 {
            return Err(AddError::Overflow { addr, pages: n });
        }
        Ok(())
    }

    /// Adds `n` pages from `addr` one at a time.
    ///
    /// # Errors
    /// As [`PagePipe::add_pages`].
    pub fn add_pages(&mut self, addr: u64, n: u64, flags: BufFlags) -> Result<Progress, AddError> {
        self.check(addr, n)?;
        for i in 0..n {
            let a = addr + i * self.page_size;
            match self.add_page(a, flags) {
                Ok(Step::Added) => {}
                Ok(Step::Full) => return Ok(Progress::Full { added: i }),
                Err(e) => return Err(e(a, i)),
            }
        }
        Ok(Progress::Done)
    }

    /// CRIU's `page_pipe_add_page`.
    fn add_page(&mut self, a: u64, flags: BufFlags) -> Result<Step, ErrAt> {
        if self.try_add(a, flags)? {
            return Ok(Step::Added);
        }
        if self.runs_used >= self.cfg.budget {
            return Err(budget_err(self.cfg.budget));
        }
        if !self.grow(flags)? {
            return Ok(Step::Full);
        }
        assert!(self.try_add(a, flags)?, "a new buf takes the page");
        Ok(Step::Added)
    }

    fn last_live(&self) -> Option<usize> {
        self.bufs
            .last()
            .filter(|b| b.live)
            .map(|_| self.bufs.len() - 1)
    }

    /// CRIU's `try_add_page`: `Ok(false)` when a new buf is needed.
    fn try_add(&mut self, a: u64, flags: BufFlags) -> Result<bool, ErrAt> {
        let Some(i) = self.last_live() else {
            return Ok(false);
        };
        if self.bufs[i].flags != flags || !self.has_room(i) {
            return Ok(false);
        }
        let ps = self.page_size;
        let b = &mut self.bufs[i];
        match b.runs.last_mut() {
            Some(r) if r.vaddr + r.pages * ps == a => r.pages += 1,
            _ => {
                if self.runs_used >= self.cfg.budget {
                    return Err(budget_err(self.cfg.budget));
                }
                b.runs.push(Run::new(a, 1));
                self.runs_used += 1;
            }
        }
        self.stats.pages += 1;
        self.cursor = Some(a + ps);
        Ok(true)
    }

    /// CRIU's `ppb_resize_pipe`: whether buf `i`'s pipe has room after it, growing it if
    /// needed.
    fn has_room(&mut self, i: usize) -> bool {
        let b = &self.bufs[i];
        let used = b.pipe_off + b.pages();
        let pipe = b.pipe;
        let cap = self.pipes[&pipe].capacity;
        if used < cap {
            return true;
        }
        if cap >= self.cap {
            return false;
        }
        self.resize(pipe, (cap * 2).min(self.cap)) && self.pipes[&pipe].capacity > used
    }

    /// Asks the kernel for `want` pages for `pipe`, unless a size as large was refused.
    fn resize(&mut self, pipe: u64, want: u64) -> bool {
        if want >= self.refused_from {
            return false;
        }
        let cap = self.pipes[&pipe].capacity;
        match self.kernel.resize(cap, want) {
            Ok(g) if g > cap => {
                self.pipes.get_mut(&pipe).unwrap().capacity = g;
                self.stats.resizes += 1;
                true
            }
            _ => {
                self.refused_from = want;
                self.stats.resizes_refused += 1;
                false
            }
        }
    }

    /// CRIU's `page_pipe_grow`: `Ok(false)` when chunk mode is full.
    fn grow(&mut self, flags: BufFlags) -> Result<bool, ErrAt> {
        if let Some(mut b) = self.free.pop() {
            b.flags = flags;
            b.runs.clear();
            b.live = true;
            self.bufs.push(b);
            self.stats.bufs += 1;
            return Ok(true);
        }
        if self.cfg.chunk && self.pipes.len() == NR_PIPES_PER_CHUNK {
            return Ok(false);
        }
        let ty = usize::from(self.cfg.lazy_pages && flags.contains(BufFlags::LAZY));
        let mut shared = None;
        if !self.cfg.chunk
            && let Some(p) = self.prev[ty]
            && self.bufs[p].live
            && self.has_room(p)
        {
            shared = Some(p);
        }
        let (pipe, pipe_off) = match shared {
            Some(p) => {
                let prev = &self.bufs[p];
                self.pipes.get_mut(&prev.pipe).unwrap().users += 1;
                (prev.pipe, prev.pipe_off + prev.pages())
            }
            None => {
                let capacity = self.kernel.make().map_err(make_err)?;
                let expected = self.kernel.default_pages;
                if capacity < expected {
                    return Err(Box::new(move |addr, added| AddError::PipeLimit {
                        addr,
                        capacity,
                        expected,
                        added,
                    }));
                }
                let id = self.stats.pipes_made;
                self.stats.pipes_made += 1;
                self.pipes.insert(id, ModelPipe { capacity, users: 1 });
                if let Some(initial) = self.cfg.initial_pipe_pages {
                    let want = initial.min(self.cap);
                    if want > capacity {
                        self.resize(id, want);
                    }
                }
                (id, 0)
            }
        };
        self.bufs.push(ModelBuf {
            flags,
            pipe,
            pipe_off,
            runs: Vec::new(),
            live: true,
        });
        self.prev[ty] = Some(self.bufs.len() - 1);
        self.stats.bufs += 1;
        Ok(true)
    }

    /// Adds a hole of `n` pages from `addr`, one page at a time.
    ///
    /// # Errors
    /// An address error.
    pub fn add_holes(&mut self, addr: u64, n: u64, flags: HoleFlags) -> Result<(), AddError> {
        self.check(addr, n)?;
        for i in 0..n {
            let a = addr + i * self.page_size;
            match self.holes.last_mut() {
                Some(h) if h.flags == flags && h.vaddr + h.pages * self.page_size == a => {
                    h.pages += 1
                }
                _ => {
                    self.holes.push(Hole::new(a, 1, flags));
                    self.stats.holes += 1;
                }
            }
            self.stats.hole_pages += 1;
            self.cursor = Some(a + self.page_size);
        }
        Ok(())
    }

    /// Releases the `nth` live buf (counting from 0, modulo the number of live bufs);
    /// returns its position, or `None` when no buf is live.
    pub fn release_nth(&mut self, nth: usize) -> Option<usize> {
        let live: Vec<usize> = (0..self.bufs.len())
            .filter(|&i| self.bufs[i].live)
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = live[nth % live.len()];
        self.release(i);
        Some(live.iter().position(|&x| x == i).unwrap())
    }

    /// CRIU's `page_pipe_reinit`.
    pub fn reinit(&mut self) {
        assert!(self.cfg.chunk, "re-init is for chunk mode");
        for b in std::mem::take(&mut self.bufs) {
            if b.live {
                self.free.push(b);
            }
        }
        self.holes.clear();
        self.runs_used = 0;
        self.prev = [None; 2];
        if let Some(mut b) = self.free.pop() {
            b.flags = BufFlags::empty();
            b.runs.clear();
            b.live = true;
            self.bufs.push(b);
            self.stats.bufs += 1;
        }
    }
}

impl Model {
    /// A capture and dump in the model (CRIU's `page_xfer_dump_pages`): bufs in order,
    /// runs in order, before each run the holes below it, the holes left at the end; a
    /// hole without `PARENT` is left out, a lazy run with lazy pages on stays in its pipe.
    /// The dump fails at the present entry after the first `ok`. In chunk mode the model
    /// then releases the bufs whose pages are still in their pipes (not all taken, lazy,
    /// or the failed one) and re-inits. Returns the entries written.
    pub fn drain(&mut self, ok: Option<usize>, chunk: bool) -> Vec<PagemapEntry> {
        let lazy_pages = self.cfg.lazy_pages;
        let mut out = Vec::new();
        let mut holes = self.holes.iter().peekable();
        let parent = |h: &Hole| PagemapEntry {
            vaddr: h.vaddr,
            pages: h.pages,
            flags: PageFlags::PARENT,
        };
        // Per buf: pages taken from its pipe, and whether a transfer failed on it.
        let mut taken = vec![0u64; self.bufs.len()];
        let mut failed = None;
        let mut present = 0;
        'dump: for (i, b) in self.bufs.iter().enumerate().filter(|(_, b)| b.live) {
            for r in &b.runs {
                while let Some(h) = holes.next_if(|h| h.vaddr < r.vaddr) {
                    if h.flags.contains(HoleFlags::PARENT) {
                        out.push(parent(h));
                    }
                }
                let lazy = b.flags.contains(BufFlags::LAZY);
                let flags = match (lazy, lazy_pages) {
                    (false, _) => PageFlags::PRESENT,
                    (true, false) => PageFlags::LAZY | PageFlags::PRESENT,
                    (true, true) => PageFlags::LAZY,
                };
                let e = PagemapEntry {
                    vaddr: r.vaddr,
                    pages: r.pages,
                    flags,
                };
                if flags.contains(PageFlags::PRESENT) {
                    if ok.is_some_and(|ok| present >= ok) {
                        failed = Some(i);
                        break 'dump;
                    }
                    present += 1;
                    taken[i] += r.pages;
                }
                out.push(e);
            }
        }
        if failed.is_none() {
            for h in holes.filter(|h| h.flags.contains(HoleFlags::PARENT)) {
                out.push(parent(h));
            }
        }
        if chunk {
            let held: Vec<usize> = (0..self.bufs.len())
                .filter(|&i| {
                    let b = &self.bufs[i];
                    b.live && (taken[i] < b.pages() || failed == Some(i))
                })
                .collect();
            for i in held {
                self.release(i);
            }
            self.reinit();
        }
        out
    }

    fn release(&mut self, i: usize) {
        self.bufs[i].live = false;
        for p in &mut self.prev {
            if *p == Some(i) {
                *p = None;
            }
        }
        let pipe = self.bufs[i].pipe;
        let e = self
            .pipes
            .get_mut(&pipe)
            .expect("a live buf's pipe is open");
        e.users -= 1;
        if e.users == 0 {
            self.pipes.remove(&pipe);
        }
    }
}

type ErrAt = Box<dyn FnOnce(u64, u64) -> AddError>;

fn budget_err(budget: usize) -> ErrAt {
    Box::new(move |addr, added| AddError::IovBudget {
        addr,
        budget,
        added,
    })
}

fn make_err(errno: Errno) -> ErrAt {
    Box::new(move |addr, added| AddError::MakePipe { addr, errno, added })
}

/// Compares every observable of a page pipe with the model: its live bufs (flags, runs,
/// pages, pipe offset, capacity, pipe), holes, counters, open pipes, free list, runs used
/// and next address.
///
/// # Errors
/// A description of the first difference.
pub fn compare<M: Mode, I: IovStore, B: PipeBackend>(
    pp: &PagePipe<M, I, B>,
    model: &Model,
) -> Result<(), String> {
    let real: Vec<_> = pp
        .bufs()
        .map(|b| {
            (
                b.flags,
                b.runs.to_vec(),
                b.pages,
                b.pipe_off,
                b.capacity,
                b.pipe.0,
            )
        })
        .collect();
    let want: Vec<_> = model
        .bufs
        .iter()
        .filter(|b| b.live)
        .map(|b| {
            let cap = model.pipes[&b.pipe].capacity;
            (b.flags, b.runs.clone(), b.pages(), b.pipe_off, cap, b.pipe)
        })
        .collect();
    if real != want {
        return Err(format!("bufs differ:\n real  {real:?}\n model {want:?}"));
    }
    if pp.holes() != model.holes.as_slice() {
        return Err(format!(
            "holes differ:\n real  {:?}\n model {:?}",
            pp.holes(),
            model.holes
        ));
    }
    let pairs = [
        (
            "stats",
            format!("{:?}", pp.stats()),
            format!("{:?}", model.stats),
        ),
        (
            "open pipes",
            pp.open_pipes().to_string(),
            model.open_pipes().to_string(),
        ),
        (
            "free bufs",
            pp.free_bufs().to_string(),
            model.free.len().to_string(),
        ),
        (
            "runs used",
            pp.runs_used().to_string(),
            model.runs_used.to_string(),
        ),
        (
            "next address",
            format!("{:?}", pp.next_addr()),
            format!("{:?}", model.cursor),
        ),
    ];
    for (what, r, m) in pairs {
        if r != m {
            return Err(format!("{what} differ: real {r}, model {m}"));
        }
    }
    Ok(())
}

/// Checks the invariants of a page pipe (see `PagePipe`'s invariants in DESIGN.md):
///
/// - each buf's page count is the sum of its runs; no two consecutive runs of a buf are
///   contiguous; all runs ascend and do not overlap;
/// - holes ascend, do not overlap runs or each other, and two contiguous holes differ in
///   flags;
/// - bufs that share a pipe sit back to back from offset 0, within its capacity;
/// - the runs used are within the iov budget; chunk mode has at most 8 pipes open and no
///   shared pipe; with lazy pages, lazy and plain bufs never share a pipe;
/// - each open pipe's user count is the number of bufs (live or free) on it.
///
/// # Errors
/// A description of the first broken invariant.
pub fn check_invariants<M: Mode, I: IovStore, B: PipeBackend>(
    pp: &PagePipe<M, I, B>,
) -> Result<(), String> {
    pp.check_invariants()
}
