//! The typestate builder of a [`PagePipe`] and its state types.
//!
//! # Types
//!
//! A page pipe has two type parameters that CRIU keeps as flag bits:
//!
//! | parameter | types | CRIU flag | what it decides |
//! |-----------|-------|-----------|-----------------|
//! | mode `M`  | [`SinglePass`], [`ChunkMode`] | `PP_CHUNK_MODE` | whether the page pipe holds at most [`NR_PIPES_PER_CHUNK`](page_pipe_sys::NR_PIPES_PER_CHUNK) pipes, reports "full" ([`Progress::Full`](crate::Progress::Full)) and can be re-initialised after a drain |
//! | iov storage `I` | [`OwnIovs`], [`CallerIovs`] | `PP_OWN_IOVS` | whether the runs live in storage the page pipe allocates, or in a slice the caller lends for the page pipe's lifetime |
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
use crate::page_pipe::{PagePipe, PipeFail};
use crate::types::Run;

mod sealed {
    pub trait Sealed {}
}

/// The mode of a page pipe: [`SinglePass`] or [`ChunkMode`]. Sealed.
pub trait Mode: sealed::Sealed + 'static {
    /// Whether this is chunk mode (CRIU's `PP_CHUNK_MODE`).
    const CHUNK: bool;
}

/// Mode: all pages in one pass. Pipes grow and are shared by consecutive bufs of the same
/// type; the number of pipes is not bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SinglePass;

/// Mode: at most 8 pipes at a time, never shared. When a new buf would need a ninth pipe
/// the page pipe reports [`Progress::Full`](crate::Progress::Full); the caller captures and
/// dumps what it holds, calls [`PagePipe::reinit`], and goes on. Any amount of memory can
/// be captured this way within the pipe and file limits of an unprivileged user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkMode;

impl sealed::Sealed for SinglePass {}
impl sealed::Sealed for ChunkMode {}
impl Mode for SinglePass {
    const CHUNK: bool = false;
}
impl Mode for ChunkMode {
    const CHUNK: bool = true;
}

/// Where a page pipe keeps its runs: [`OwnIovs`] or [`CallerIovs`]. Sealed.
///
/// All runs of all bufs sit in one array in address order, as CRIU's `iovs`; each buf
/// owns a contiguous range of it.
pub trait IovStore: sealed::Sealed {
    /// The most runs the storage can hold: the iov budget.
    fn budget(&self) -> usize;
    /// The runs recorded so far.
    fn runs(&self) -> &[Run];
    #[doc(hidden)]
    fn runs_mut(&mut self) -> &mut [Run];
    #[doc(hidden)]
    fn push(&mut self, run: Run);
    #[doc(hidden)]
    fn clear(&mut self);
}

/// Storage the page pipe allocates itself (CRIU's `PP_OWN_IOVS`), up to a budget of runs.
/// Room for up to [`PREALLOCATED_RUNS`] runs is reserved at once (address space only, until
/// runs are recorded), so that recording never copies the runs to grow; past that it grows
/// as runs come.
pub const PREALLOCATED_RUNS: usize = 1 << 20;

/// See [`PREALLOCATED_RUNS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnIovs {
    runs: Vec<Run>,
    budget: usize,
}

/// Storage lent by the caller for the page pipe's lifetime: the budget is the slice's
/// length, and the runs can be read from the slice once the page pipe is gone.
#[derive(Debug, PartialEq, Eq)]
pub struct CallerIovs<'a> {
    slots: &'a mut [Run],
    len: usize,
}

impl sealed::Sealed for OwnIovs {}
impl sealed::Sealed for CallerIovs<'_> {}

impl IovStore for OwnIovs {
    fn budget(&self) -> usize {
        self.budget
    }
    #[inline]
    fn runs(&self) -> &[Run] {
        &self.runs
    }
    #[inline]
    fn runs_mut(&mut self) -> &mut [Run] {
        &mut self.runs
    }
    #[inline]
    fn push(&mut self, run: Run) {
        debug_assert!(self.runs.len() < self.budget);
        self.runs.push(run);
    }
    fn clear(&mut self) {
        self.runs.clear();
    }
}

impl IovStore for CallerIovs<'_> {
    fn budget(&self) -> usize {
        self.slots.len()
    }
    fn runs(&self) -> &[Run] {
        &self.slots[..self.len]
    }
    fn runs_mut(&mut self) -> &mut [Run] {
        &mut self.slots[..self.len]
    }
    fn push(&mut self, run: Run) {
        self.slots[self.len] = run;
        self.len += 1;
    }
    fn clear(&mut self) {
        self.len = 0;
    }
}

/// Builder state: no iov storage chosen yet; [`build`](Builder::build) is not available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoIovs;

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

/// How a page pipe sizes its pipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PipeSizing {
    /// The cap, if not the default.
    pub(crate) max: Option<u64>,
    /// The size to ask for as soon as a pipe is made, if any.
    pub(crate) initial: Option<u64>,
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
    /// use page_pipe::{FakeKernel, FakePipes, PagePipe};
    /// let pp = PagePipe::builder()
    ///     .iov_budget(8)
    ///     .initial_pipe_pages(256)
    ///     .build_with(FakePipes::new(FakeKernel::new(4096)))?;
    /// assert_eq!(pp.bufs().next().unwrap().capacity, 256);
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
            iovs: OwnIovs {
                runs: Vec::with_capacity(runs.min(PREALLOCATED_RUNS)),
                budget: runs,
            },
            lazy_pages: self.lazy_pages,
            sizing: self.sizing,
            _mode: PhantomData,
        }
    }

    /// Keeps the runs in `storage`, lent for the page pipe's lifetime; the budget is its
    /// length.
    pub fn iov_storage(self, storage: &mut [Run]) -> Builder<M, CallerIovs<'_>> {
        Builder {
            iovs: CallerIovs {
                slots: storage,
                len: 0,
            },
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

    /// Builds a page pipe over `backend`, e.g. [`FakePipes`](crate::FakePipes).
    ///
    /// ```
    /// use page_pipe::{FakeKernel, FakePipes, PagePipe};
    /// let pp = PagePipe::builder()
    ///     .iov_budget(8)
    ///     .build_with(FakePipes::new(FakeKernel::new(4096)))?;
    /// assert_eq!(pp.open_pipes(), 1);
    /// # Ok::<(), page_pipe::BuildError>(())
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
