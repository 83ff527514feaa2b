//! The seam between the bookkeeping and the pipes.
//!
//! A [`PagePipe`](crate::PagePipe) makes and grows pipes only through a [`PipeBackend`].
//! [`KernelPipes`] makes real pipes, optionally reused through a [`PipePool`]. Inside the
//! crate, `VirtualPipes` answers as the kernel would but makes no pipe: the dump straight
//! from memory keeps the same books as a capture, so both give the same entries. (The
//! `testing` feature adds `FakePipes`, which fails chosen calls on demand.)

use std::fmt;
use std::num::NonZeroUsize;
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
/// // Sizes are powers of two pages (within pipe-max-size).
/// let want = (pages + 1).min(k.max_grant_pages());
/// assert_eq!(k.resize_pipe(&pipe, want)?, want.next_power_of_two());
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

/// Pipes that exist only in the books: each answer is what the kernel would give this
/// process (leaving out per-user accounting), and no file descriptor is made. The dump
/// straight from memory runs a page pipe over these, so that it records the same bufs and
/// runs, and writes the same entries, as a capture into real pipes.
#[derive(Debug, Clone)]
pub(crate) struct VirtualPipes {
    limits: PipeLimits,
}

/// A pipe of [`VirtualPipes`]: its capacity, in pages.
#[derive(Debug)]
pub(crate) struct VirtualPipe(std::sync::atomic::AtomicU64);

impl VirtualPipes {
    pub(crate) fn new(limits: PipeLimits) -> Self {
        Self { limits }
    }
}

impl PipeBackend for VirtualPipes {
    type Pipe = VirtualPipe;

    fn page_size(&self) -> NonZeroUsize {
        self.limits.page_size
    }

    fn max_grant_pages(&self) -> u64 {
        self.limits.max_grant_pages() as u64
    }

    fn default_pages(&self) -> u64 {
        (page_pipe_sys::PIPE_DEF_BUFFERS as u64).min(self.max_grant_pages())
    }

    fn make_pipe(&mut self) -> Result<(VirtualPipe, u64), Errno> {
        let pages = self.default_pages();
        Ok((VirtualPipe(pages.into()), pages))
    }

    fn resize_pipe(&mut self, pipe: &VirtualPipe, pages: u64) -> Result<u64, Errno> {
        use std::sync::atomic::Ordering::Relaxed;
        let current = usize::try_from(pipe.0.load(Relaxed)).map_err(|_| Errno::INVAL)?;
        let pages = usize::try_from(pages).map_err(|_| Errno::PERM)?;
        let granted = self.limits.predict_set_size(current, pages)? as u64;
        pipe.0.store(granted, Relaxed);
        Ok(granted)
    }
}
