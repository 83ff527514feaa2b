//! The type states of a page pipe: its mode and where it keeps its runs.
//!
//! A page pipe has two type parameters that CRIU keeps as flag bits:
//!
//! | parameter | types | CRIU flag | what it decides |
//! |-----------|-------|-----------|-----------------|
//! | mode `M`  | [`SinglePass`], [`ChunkMode`] | `PP_CHUNK_MODE` | whether the page pipe holds at most [`NR_PIPES_PER_CHUNK`](page_pipe_sys::NR_PIPES_PER_CHUNK) pipes, reports "full" ([`Progress::Full`](crate::Progress::Full)) and can be re-initialised after a drain |
//! | run storage `I` | [`OwnIovs`], [`CallerIovs`] | `PP_OWN_IOVS` | whether the runs live in storage the page pipe allocates, or in a slice the caller lends for the page pipe's lifetime (and can read back once it is gone) |
//!
//! Both are sealed: no other types can stand in for them. This module depends on nothing
//! else in the crate but [`Run`].

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
/// dumps what it holds, re-inits ([`PagePipe::reinit`](crate::PagePipe::reinit) or
/// [`Captured::reinit`](crate::Captured::reinit)), and goes on. Any amount of memory can be
/// captured this way within the pipe and file limits of an unprivileged user.
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

impl OwnIovs {
    pub(crate) fn with_budget(budget: usize) -> Self {
        Self {
            runs: Vec::with_capacity(budget.min(PREALLOCATED_RUNS)),
            budget,
        }
    }
}

/// Storage lent by the caller for the page pipe's lifetime: the budget is the slice's
/// length, and the runs can be read from the slice once the page pipe is gone.
#[derive(Debug, PartialEq, Eq)]
pub struct CallerIovs<'a> {
    slots: &'a mut [Run],
    len: usize,
}

impl<'a> CallerIovs<'a> {
    pub(crate) fn new(slots: &'a mut [Run]) -> Self {
        Self { slots, len: 0 }
    }
}

/// Builder state: no run storage chosen yet, so [`build`](crate::Builder::build) is not
/// available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoIovs;

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
