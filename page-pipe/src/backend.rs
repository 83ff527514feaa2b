//! The seam between the bookkeeping and the pipes.
//!
//! A [`PagePipe`](crate::PagePipe) makes and grows pipes only through a [`PipeBackend`].
//! [`KernelPipes`] makes real pipes; [`FakePipes`] keeps no file descriptors and decides
//! every call with a [`FakeKernel`], which can be told to fail chosen calls. The pure
//! [`Model`](crate::model::Model) asks the same `FakeKernel`, so the page pipe and the
//! model see the same answers.

use std::collections::BTreeSet;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use page_pipe_sys::{Errno, Pipe, PipeLimits};

/// Makes pipes and sets their capacity, for a page pipe.
///
/// Implementations report capacities in pages and return what they granted; the page pipe
/// checks the answers (a capacity of zero, or a resize that grants no more than asked
/// before, counts as a refusal).
pub trait PipeBackend {
    /// A pipe, owned: dropping it closes the pipe.
    type Pipe: fmt::Debug;

    /// The page size that capacities are counted in.
    fn page_size(&self) -> NonZeroUsize;

    /// The largest capacity, in pages, a resize can grant.
    fn max_grant_pages(&self) -> u64;

    /// The capacity, in pages, that a new pipe has when no limit is in the way
    /// (`PIPE_DEF_BUFFERS`, 16 pages, unless `pipe-max-size` is smaller). A new pipe with
    /// less means a per-user limit was hit.
    fn default_pages(&self) -> u64;

    /// Makes a pipe and returns it with its capacity in pages.
    ///
    /// # Errors
    /// The errno of the refusal (`EMFILE`, `ENFILE`, ...).
    fn make_pipe(&mut self) -> Result<(Self::Pipe, u64), Errno>;

    /// Asks for a capacity of `pages` pages and returns the capacity granted.
    ///
    /// # Errors
    /// The errno of the refusal (`EPERM`, `ENOMEM`, `EBUSY`).
    fn resize_pipe(&mut self, pipe: &Self::Pipe, pages: u64) -> Result<u64, Errno>;

    /// Takes back a pipe that no buf uses any more, with its capacity in pages; `unused`
    /// says no page was ever put into it (the page pipe never captured into it). The
    /// default closes it; a backend with a pool may keep it for the next
    /// [`make_pipe`](Self::make_pipe).
    fn release_pipe(&mut self, pipe: Self::Pipe, capacity: u64, unused: bool) {
        let _ = (capacity, unused);
        drop(pipe);
    }
}

/// Real pipes, made with `pipe2` and sized with `F_GETPIPE_SZ`/`F_SETPIPE_SZ`.
///
/// ```
/// use page_pipe::{KernelPipes, PipeBackend};
/// let mut k = KernelPipes::new()?;
/// let (pipe, pages) = k.make_pipe()?;
/// assert_eq!(k.resize_pipe(&pipe, pages + 1)?, 2 * pages);
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
///
/// With a [`PipePool`] ([`with_pool`](Self::with_pool)) pipes that no buf uses any more go
/// back to the pool instead of closing, if they are empty, and new pipes come from the
/// pool when it has any: a loop that takes many snapshots makes its pipes once.
#[derive(Debug, Clone)]
pub struct KernelPipes {
    limits: PipeLimits,
    pool: Option<Arc<PipePool>>,
}

impl KernelPipes {
    /// Real pipes under the limits in force for this process ([`PipeLimits::get`]).
    ///
    /// # Errors
    /// If the limits cannot be read.
    pub fn new() -> Result<Self, Errno> {
        Ok(Self::with_limits(*PipeLimits::get()?))
    }

    /// Real pipes, sized as if these limits were in force.
    pub fn with_limits(limits: PipeLimits) -> Self {
        Self { limits, pool: None }
    }

    /// Takes pipes from `pool` and gives them back to it.
    pub fn with_pool(mut self, pool: Arc<PipePool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The limits these pipes are sized under.
    pub fn limits(&self) -> &PipeLimits {
        &self.limits
    }
}

impl PipeBackend for KernelPipes {
    type Pipe = Pipe;

    fn page_size(&self) -> NonZeroUsize {
        self.limits.page_size
    }

    fn max_grant_pages(&self) -> u64 {
        self.limits.max_grant_pages() as u64
    }

    fn default_pages(&self) -> u64 {
        (page_pipe_sys::PIPE_DEF_BUFFERS as u64).min(self.max_grant_pages())
    }

    fn make_pipe(&mut self) -> Result<(Pipe, u64), Errno> {
        if let Some(taken) = self.pool.as_ref().and_then(|p| p.take()) {
            return Ok(taken);
        }
        let pipe = page_pipe_sys::pipe()?;
        let bytes = page_pipe_sys::pipe_capacity(&pipe.read)?;
        Ok((pipe, (bytes / self.limits.page_size.get()) as u64))
    }

    fn resize_pipe(&mut self, pipe: &Pipe, pages: u64) -> Result<u64, Errno> {
        let ps = self.limits.page_size.get();
        let bytes = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(ps))
            .ok_or(Errno::PERM)?;
        let granted = page_pipe_sys::set_pipe_capacity(&pipe.write, bytes)?;
        Ok((granted / ps) as u64)
    }

    fn release_pipe(&mut self, pipe: Pipe, capacity: u64, unused: bool) {
        if let Some(pool) = &self.pool {
            pool.give(pipe, capacity, unused);
        }
    }
}

/// Empty pipes kept for reuse, shared by the [`KernelPipes`] of many page pipes.
///
/// A pipe is taken back only when it holds no data (checked with `FIONREAD`, unless no
/// page was ever put into it) and the pool has fewer than its maximum; otherwise it is
/// closed. Pooled pipes keep the capacity
/// they grew to. Each costs two file descriptors and its slot array in kernel memory until
/// it is taken again or the pool is dropped or [`clear`](Self::clear)ed.
///
/// ```
/// use page_pipe::{BufFlags, KernelPipes, PagePipe, PipePool};
/// let pool = PipePool::new(16);
/// for round in 0..3u64 {
///     let backend = KernelPipes::new()?.with_pool(pool.clone());
///     let mut pp = PagePipe::builder().iov_budget(8).build_with(backend)?;
///     pp.add_pages(round << 32, 10, BufFlags::empty())?;
/// }
/// assert_eq!(pool.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct PipePool {
    max: usize,
    pipes: Mutex<Vec<(Pipe, u64)>>,
}

impl PipePool {
    /// A pool that keeps at most `max` pipes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            pipes: Mutex::new(Vec::new()),
        })
    }

    /// Pipes in the pool now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the pool holds no pipe.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every pipe in the pool.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Pipe, u64)>> {
        // A panic while holding the lock leaves a valid Vec; go on with it.
        self.pipes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Option<(Pipe, u64)> {
        self.lock().pop()
    }

    fn give(&self, pipe: Pipe, capacity: u64, unused: bool) {
        if !unused && page_pipe_sys::pipe_bytes(&pipe.read) != Ok(0) {
            return;
        }
        let mut pipes = self.lock();
        if pipes.len() < self.max {
            pipes.push((pipe, capacity));
        }
    }
}

/// A pure stand-in for the kernel's pipe calls: what a new pipe holds, what a resize
/// grants, and which calls fail. It keeps only call counters.
///
/// Resizes round up to a power of two pages and are refused with `EPERM` above
/// [`max_pages`](Self::max_pages), as `F_SETPIPE_SZ` does above `pipe-max-size`.
///
/// ```
/// use page_pipe::FakeKernel;
/// use page_pipe_sys::Errno;
/// let mut k = FakeKernel::new(4096);
/// k.fail_make.insert(1);
/// assert_eq!(k.make(), Ok(16));
/// assert_eq!(k.make(), Err(Errno::MFILE));
/// assert_eq!(k.resize(16, 17), Ok(32));
/// assert_eq!(k.resize(16, 257), Err(Errno::PERM));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeKernel {
    /// The page size.
    pub page_size: NonZeroUsize,
    /// Capacity of a new pipe, in pages.
    pub default_pages: u64,
    /// The largest capacity a resize grants; larger requests get `EPERM`.
    pub max_pages: u64,
    /// After this many pipes have been made, new pipes get two pages and every resize is
    /// refused with `EPERM`, as for a user past `pipe-user-pages-soft`.
    pub tiny_after: Option<u64>,
    /// Indices (from 0) of `make` calls that fail with `EMFILE`.
    pub fail_make: BTreeSet<u64>,
    /// Indices (from 0) of `resize` calls that fail with `ENOMEM`.
    pub fail_resize: BTreeSet<u64>,
    makes: u64,
    resizes: u64,
}

impl FakeKernel {
    /// A kernel like the machines this crate is tested on: new pipes of 16 pages,
    /// resizes granted up to 1 MiB, no failures.
    pub fn new(page_size: usize) -> Self {
        let page_size = NonZeroUsize::new(page_size).expect("page size must not be zero");
        Self {
            page_size,
            default_pages: 16,
            max_pages: ((1 << 20) / page_size.get()).max(1) as u64,
            tiny_after: None,
            fail_make: BTreeSet::new(),
            fail_resize: BTreeSet::new(),
            makes: 0,
            resizes: 0,
        }
    }

    /// A fake that answers as the real kernel does for this process, leaving out per-user
    /// accounting: use it to predict [`KernelPipes`].
    pub fn like(limits: &PipeLimits) -> Self {
        let max = limits.max_grant_pages() as u64;
        Self {
            default_pages: (page_pipe_sys::PIPE_DEF_BUFFERS as u64).min(max),
            max_pages: max,
            ..Self::new(limits.page_size.get())
        }
    }

    /// Decides a `make_pipe` call: the new pipe's capacity, or the errno.
    ///
    /// # Errors
    /// `EMFILE` for the calls listed in [`fail_make`](Self::fail_make).
    pub fn make(&mut self) -> Result<u64, Errno> {
        let n = self.makes;
        self.makes += 1;
        if self.fail_make.contains(&n) {
            return Err(Errno::MFILE);
        }
        Ok(match self.tiny_after {
            Some(t) if n >= t => 2.min(self.default_pages).max(1),
            _ => self.default_pages.max(1),
        })
    }

    /// Decides a `resize_pipe` call on a pipe of `current` pages asking for `pages`.
    ///
    /// # Errors
    /// `ENOMEM` for the calls listed in [`fail_resize`](Self::fail_resize); `EPERM` above
    /// [`max_pages`](Self::max_pages) or past [`tiny_after`](Self::tiny_after).
    pub fn resize(&mut self, current: u64, pages: u64) -> Result<u64, Errno> {
        let n = self.resizes;
        self.resizes += 1;
        if self.fail_resize.contains(&n) {
            return Err(Errno::NOMEM);
        }
        let want = pages
            .max(1)
            .checked_next_power_of_two()
            .ok_or(Errno::PERM)?;
        if want > current
            && (want > self.max_pages || self.tiny_after.is_some_and(|t| self.makes > t))
        {
            return Err(Errno::PERM);
        }
        Ok(want)
    }

    /// How many `make` calls were decided.
    pub fn makes(&self) -> u64 {
        self.makes
    }

    /// How many `resize` calls were decided.
    pub fn resizes(&self) -> u64 {
        self.resizes
    }
}

/// An in-memory pipe backend: no file descriptors, every answer from a [`FakeKernel`].
///
/// ```
/// use page_pipe::{FakeKernel, FakePipes, PipeBackend};
/// let mut fake = FakePipes::new(FakeKernel::new(4096));
/// let (pipe, pages) = fake.make_pipe()?;
/// assert_eq!((pages, fake.open_pipes()), (16, 1));
/// drop(pipe);
/// assert_eq!(fake.open_pipes(), 0);
/// # Ok::<(), page_pipe_sys::Errno>(())
/// ```
#[derive(Debug)]
pub struct FakePipes {
    kernel: FakeKernel,
    open: Arc<AtomicUsize>,
}

/// A pipe of [`FakePipes`]; dropping it counts as closing it.
#[derive(Debug)]
pub struct FakePipe {
    capacity: AtomicUsize,
    open: Arc<AtomicUsize>,
}

impl Drop for FakePipe {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FakePipes {
    /// Fake pipes that follow `kernel`.
    pub fn new(kernel: FakeKernel) -> Self {
        Self {
            kernel,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many pipes made by this backend are still open (not dropped).
    pub fn open_pipes(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A counter of open pipes that stays readable after the backend has moved into a
    /// page pipe.
    pub fn open_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.open)
    }

    /// The kernel stand-in, with its call counters.
    pub fn kernel(&self) -> &FakeKernel {
        &self.kernel
    }
}

impl PipeBackend for FakePipes {
    type Pipe = FakePipe;

    fn page_size(&self) -> NonZeroUsize {
        self.kernel.page_size
    }

    fn max_grant_pages(&self) -> u64 {
        self.kernel.max_pages
    }

    fn default_pages(&self) -> u64 {
        self.kernel.default_pages
    }

    fn make_pipe(&mut self) -> Result<(FakePipe, u64), Errno> {
        let pages = self.kernel.make()?;
        self.open.fetch_add(1, Ordering::Relaxed);
        let pipe = FakePipe {
            capacity: AtomicUsize::new(pages as usize),
            open: Arc::clone(&self.open),
        };
        Ok((pipe, pages))
    }

    fn resize_pipe(&mut self, pipe: &FakePipe, pages: u64) -> Result<u64, Errno> {
        let current = pipe.capacity.load(Ordering::Relaxed) as u64;
        let granted = self.kernel.resize(current, pages)?;
        pipe.capacity.store(granted as usize, Ordering::Relaxed);
        Ok(granted)
    }
}
