//! A pure stand-in for the kernel's pipe calls, which fails chosen calls on demand.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use page_pipe_sys::{Errno, PipeLimits};

use crate::backend::PipeBackend;

/// A pure stand-in for the kernel's pipe calls: what a new pipe holds, what a resize
/// grants, and which calls fail. It keeps only call counters.
///
/// Resizes round up to a power of two pages and are refused with `EPERM` above
/// [`max_pages`](Self::max_pages), as `F_SETPIPE_SZ` does above `pipe-max-size`.
///
/// ```
/// use page_pipe::testing::FakeKernel;
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
    /// accounting: use it to predict [`KernelPipes`](crate::KernelPipes).
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
/// use page_pipe::PipeBackend;
/// use page_pipe::testing::{FakeKernel, FakePipes};
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
