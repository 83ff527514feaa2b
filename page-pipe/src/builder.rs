//! The typestate builder of a [`PagePipe`].
//!
//! # Types
//!
//! A page pipe has two type parameters that CRIU keeps as flag bits, explained in
//! [`mode`](crate::mode): the mode ([`SinglePass`], [`ChunkMode`]) and where runs live
//! ([`OwnIovs`], [`CallerIovs`]).
//!
//! [`Builder`] moves between states by consuming itself: [`PagePipe::builder`] starts
//! in `Builder<SinglePass, NoIovs>`; [`chunk_mode`](Builder::chunk_mode) turns the mode to
//! [`ChunkMode`]; [`iov_budget`](Builder::iov_budget) or [`iov_storage`](Builder::iov_storage)
//! choose the storage, and only then can [`build`](Builder::build) be called, which still
//! returns a `Result` for what only run time can check (a zero budget, a pipe the kernel
//! refuses to make).

use std::marker::PhantomData;

use page_pipe_sys::Errno;

use crate::backend::{KernelPipes, PipeBackend};
use crate::mode::{CallerIovs, ChunkMode, IovStore, Mode, NoIovs, OwnIovs, SinglePass};
use crate::page_pipe::{PagePipe, PipeFail, PipeSizing};
use crate::types::Run;

/// Builds a [`PagePipe`]; see the [module docs](self) for its states.
///
/// ```
/// use page_pipe::{BufFlags, PagePipe};
/// let mut pp = PagePipe::builder().iov_budget(64).build()?;
/// pp.add_pages(0x10000, 4, BufFlags::empty())?;
/// assert_eq!(pp.stats().pages, 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Chunk mode with runs kept in the caller's storage:
///
/// ```
/// use page_pipe::{BufFlags, ChunkMode, PagePipe, Progress, Run};
/// let mut storage = [Run::EMPTY; 16];
/// let mut pp = PagePipe::builder().chunk_mode().iov_storage(&mut storage).build()?;
/// assert_eq!(pp.add_page(0x1000, BufFlags::empty())?, Progress::Done);
/// drop(pp);
/// assert_eq!(storage[0].vaddr(), 0x1000);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder<M, I> {
    iovs: I,
    lazy_pages: bool,
    sizing: PipeSizing,
    _mode: PhantomData<M>,
}

impl PagePipe {
    /// Starts building a page pipe: single-pass mode, no iov storage chosen yet.
    pub fn builder() -> Builder<SinglePass, NoIovs> {
        Builder {
            iovs: NoIovs,
            lazy_pages: false,
            sizing: PipeSizing::default(),
            _mode: PhantomData,
        }
    }
}

impl<M, I> Builder<M, I> {
    /// Switches to [`ChunkMode`].
    pub fn chunk_mode(self) -> Builder<ChunkMode, I> {
        Builder {
            iovs: self.iovs,
            lazy_pages: self.lazy_pages,
            sizing: self.sizing,
            _mode: PhantomData,
        }
    }

    /// Lazy pages (default off): bufs with [`BufFlags::LAZY`](crate::BufFlags::LAZY) get
    /// pipes of their own, never shared with other bufs, and a dump leaves their pages in
    /// those pipes to be served on demand. Off, lazy bufs are dumped like the others
    /// (marked lazy and present) and may share pipes with them.
    pub fn lazy_pages(mut self, on: bool) -> Self {
        self.lazy_pages = on;
        self
    }

    /// The largest capacity, in pages, to grow a pipe to. The default is CRIU's
    /// `PIPE_MAX_SIZE` ([`pipe_max_size_pages`](page_pipe_sys::pipe_max_size_pages), 819
    /// pages at 4 KiB) or what the kernel grants this process, whichever is less. Pipes
    /// grow by doubling, and a size the kernel refused once is not asked for again.
    pub fn max_pipe_pages(mut self, pages: u64) -> Self {
        self.sizing.max = Some(pages);
        self
    }

    /// Asks for `pages` pages (at most the cap) as soon as a pipe is made, in one call,
    /// instead of growing it by doubling as pages come (the default, as CRIU does). For
    /// captures that fill their pipes anyway this saves the intermediate resizes; it costs
    /// kernel memory for pipes that stay small.
    ///
    /// ```
    /// use page_pipe::PagePipe;
    /// let pp = PagePipe::builder().iov_budget(8).initial_pipe_pages(32).build()?;
    /// // The pipe was sized at once (unless this machine grants less than 32 pages).
    /// assert_eq!(pp.bufs().next().unwrap().capacity, 32.min(pp.max_pipe_pages()));
    /// # Ok::<(), page_pipe::BuildError>(())
    /// ```
    pub fn initial_pipe_pages(mut self, pages: u64) -> Self {
        self.sizing.initial = Some(pages);
        self
    }
}

impl<M> Builder<M, NoIovs> {
    /// Lets the page pipe allocate its own storage for up to `runs` runs (CRIU's
    /// `nr_segs`). Recording more runs than this is an error
    /// ([`AddError::IovBudget`](crate::AddError::IovBudget)).
    pub fn iov_budget(self, runs: usize) -> Builder<M, OwnIovs> {
        Builder {
            iovs: OwnIovs::with_budget(runs),
            lazy_pages: self.lazy_pages,
            sizing: self.sizing,
            _mode: PhantomData,
        }
    }

    /// Keeps the runs in `storage`, lent for the page pipe's lifetime; the budget is its
    /// length.
    pub fn iov_storage(self, storage: &mut [Run]) -> Builder<M, CallerIovs<'_>> {
        Builder {
            iovs: CallerIovs::new(storage),
            lazy_pages: self.lazy_pages,
            sizing: self.sizing,
            _mode: PhantomData,
        }
    }
}

/// Why a page pipe could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// The iov budget is zero: the page pipe could record no page.
    ZeroBudget,
    /// The pipe limits of this process could not be read.
    Limits(Errno),
    /// The kernel refused to make the first pipe.
    MakePipe(Errno),
    /// The first pipe got `capacity` pages instead of `expected`: this user is past
    /// `/proc/sys/fs/pipe-user-pages-soft`.
    PipeLimit {
        /// Capacity of the pipe, in pages.
        capacity: u64,
        /// Capacity a new pipe has below the limit.
        expected: u64,
    },
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::ZeroBudget => f.write_str("the iov budget is zero"),
            BuildError::Limits(e) => write!(f, "cannot read the pipe limits: {e}"),
            BuildError::MakePipe(e) => write!(f, "cannot make the first pipe: {e}"),
            BuildError::PipeLimit { capacity, expected } => write!(
                f,
                "the first pipe got {capacity} pages instead of {expected}: this user is past /proc/sys/fs/pipe-user-pages-soft"
            ),
        }
    }
}

impl std::error::Error for BuildError {}

impl<M: Mode, I: IovStore> Builder<M, I> {
    /// Builds a page pipe over real pipes, under the limits in force for this process.
    /// Like CRIU, it makes its first buf and pipe at once.
    ///
    /// # Errors
    /// [`BuildError`]: a zero budget, unreadable limits, or a refused first pipe.
    pub fn build(self) -> Result<PagePipe<M, I, KernelPipes>, BuildError> {
        let backend = KernelPipes::new().map_err(BuildError::Limits)?;
        self.build_with(backend)
    }

    /// Builds a page pipe over `backend`: real pipes from a [`PipePool`](crate::PipePool),
    /// say.
    ///
    /// ```
    /// use page_pipe::{KernelPipes, PagePipe, PipePool};
    /// let pool = PipePool::new(8);
    /// let pp = PagePipe::builder()
    ///     .iov_budget(8)
    ///     .build_with(KernelPipes::new()?.with_pool(pool))?;
    /// assert_eq!(pp.open_pipes(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`build`](Self::build).
    pub fn build_with<B: PipeBackend>(self, backend: B) -> Result<PagePipe<M, I, B>, BuildError> {
        if self.iovs.budget() == 0 {
            return Err(BuildError::ZeroBudget);
        }
        PagePipe::create(backend, self.iovs, self.lazy_pages, self.sizing).map_err(|e| match e {
            PipeFail::Make(errno) => BuildError::MakePipe(errno),
            PipeFail::Tiny { capacity, expected } => BuildError::PipeLimit { capacity, expected },
        })
    }
}
