//! Capture: the pages a page pipe recorded go into its pipes.
//!
//! # Rules
//!
//! - [`PagePipe::capture`] maps every run through a [`Source`] first; a page the source
//!   does not cover is [`CaptureError::NotCovered`], raised before any syscall.
//! - Each buf's pages go into its pipe, at most 1024 iovecs a call, the way their memory
//!   allows (see [`source`](crate::source)): borrowed memory with `vmsplice` (the pipe
//!   references it while the borrow lasts); owned memory nobody can write any more with
//!   `vmsplice(SPLICE_F_GIFT)`; owned memory others may write (a file mapping) with
//!   `write(2)`, as copies. The bytes moved must equal the buf's pages. If the kernel
//!   refuses `SPLICE_F_GIFT` (`EOPNOTSUPP`, `EINVAL`) the capture goes on without it; if
//!   it refuses `vmsplice` itself (`EPERM`, `ENOSYS`: a seccomp filter) it goes on with
//!   `write(2)`, which leaves the same bytes in the pipes. [`CaptureReport`] says which
//!   path ran and how many pages were copied.
//! - A [`Captured`] page pipe carries the lifetime `'m` of the memory: safe code cannot
//!   change borrowed memory until the captured page pipe is gone, so a dump writes what
//!   was there at capture. Pages that reference borrowed memory never leave the crate as
//!   references: sinks and [`Served`](crate::Served) hand them on as copies (see
//!   [`dump`](crate::dump)).

use std::fmt;
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsFd;

use page_pipe_sys::{Errno, Stopped};

use crate::backend::KernelPipes;
use crate::mode::{ChunkMode, IovStore, Mode, OwnIovs, SinglePass};
use crate::page_pipe::PagePipe;
use crate::source::{Hold, Iovs, Source};

/// How to put pages into pipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureMode {
    /// `vmsplice` where the memory allows it, falling back as the [module rules](self)
    /// say.
    #[default]
    Auto,
    /// `write(2)`: copy the pages into the pipes.
    Copy,
}

/// Which path a capture took in the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePath {
    /// `vmsplice`, with `SPLICE_F_GIFT` for memory nobody can write any more: the pipes
    /// reference the memory.
    VmspliceGift,
    /// `vmsplice` without `SPLICE_F_GIFT` (the kernel refused the flag, or the memory is
    /// borrowed).
    Vmsplice,
    /// `write(2)`: the pipes hold copies (asked for, or `vmsplice` was refused).
    Copy,
    /// No pipes: the sink was fed from memory, as it gains nothing from pipes
    /// ([`snapshot`](crate::snapshot::snapshot) only).
    Direct,
}

impl fmt::Display for CapturePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CapturePath::VmspliceGift => "vmsplice (gift)",
            CapturePath::Vmsplice => "vmsplice",
            CapturePath::Copy => "copy (write)",
            CapturePath::Direct => "direct from memory",
        })
    }
}

/// What a capture did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureReport {
    /// How the pages that went by reference went: [`CapturePath::VmspliceGift`] if all of
    /// them with the gift, [`CapturePath::Vmsplice`] if some without (borrowed memory, or
    /// the kernel refused the flag), [`CapturePath::Copy`] if every page was copied.
    pub path: CapturePath,
    /// Pages captured.
    pub pages: u64,
    /// Bytes captured.
    pub bytes: u64,
    /// Pages that went in as copies (`write(2)`), the rest by reference.
    pub copied: u64,
}

/// Why a capture failed. The page pipe is dropped, closing its pipes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureError {
    /// The page at `addr` is in no region of the source; nothing was captured.
    NotCovered {
        /// The page.
        addr: u64,
    },
    /// The kernel refused to move the page at `addr` (`EFAULT`: the memory is not
    /// mapped).
    Kernel {
        /// The first page not captured.
        addr: u64,
        /// The refusal.
        errno: Errno,
        /// Pages captured before it.
        captured: u64,
    },
    /// The kernel moved no byte of the page at `addr` into its pipe and reported no
    /// error (`vmsplice` or `write` returned 0).
    NoProgress {
        /// The first page not captured.
        addr: u64,
        /// Pages captured before it.
        captured: u64,
    },
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::NotCovered { addr } => {
                write!(f, "page {addr:#x} is in no region of the source")
            }
            CaptureError::Kernel {
                addr,
                errno,
                captured,
            } => write!(
                f,
                "cannot capture page {addr:#x}: {errno} ({captured} pages were captured before it)"
            ),
            CaptureError::NoProgress { addr, captured } => write!(
                f,
                "cannot capture page {addr:#x}: the kernel moved nothing and gave no error \
                 ({captured} pages were captured before it)"
            ),
        }
    }
}

impl std::error::Error for CaptureError {}

/// A page pipe whose pages sit in its pipes, taken from memory that lives for `'m`.
///
/// Made by [`PagePipe::capture`]. It can be [dumped](Self::dump) once, serve pages on
/// demand ([`serve`](Self::serve)), [release bufs](Self::release_buf), and in chunk mode
/// turn back into a page pipe ([`reinit`](Captured::reinit)). It is `Send`: it can move
/// to a draining thread.
///
/// ```
/// use memmap2::MmapOptions;
/// use page_pipe::{BufFlags, FdSink, PagePipe, Source};
/// let ps = page_pipe::page_size();
/// let mut mem = MmapOptions::new().len(8 * ps).map_anon()?;
/// mem.fill(0xab);
/// let source = Source::new().with_slice(0x10_0000, &mem[..])?;
/// let mut pp = PagePipe::builder().iov_budget(8).build()?;
/// pp.add_pages(0x10_0000, 8, BufFlags::empty())?;
/// let mut captured = pp.capture(&source)?;
/// let out = std::fs::File::create(std::env::temp_dir().join("pp-doc-captured"))?;
/// let mut sink = FdSink::new(out);
/// let report = captured.dump(&mut sink)?;
/// assert_eq!(report.present_pages, 8);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Borrowed memory cannot change while its pages sit in the pipes: this does not compile.
///
/// ```compile_fail,E0502
/// # use page_pipe::{BufFlags, PagePipe, Source};
/// # let ps = page_pipe::page_size();
/// let mut mem = memmap2::MmapOptions::new().len(ps).map_anon()?;
/// let source = Source::new().with_slice(0x1000, &mem[..])?;
/// let mut pp = PagePipe::builder().iov_budget(1).build()?;
/// pp.add_page(0x1000, BufFlags::empty())?;
/// let captured = pp.capture(&source)?;
/// mem[0] = 1; // the memory is still borrowed by the capture
/// drop(captured);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Captured<'m, M: Mode = SinglePass, I: IovStore = OwnIovs> {
    pp: PagePipe<M, I, KernelPipes>,
    report: CaptureReport,
    dumped: bool,
    devnull: Option<File>,
    index: Option<crate::serve_index::ServeIndex>,
    _mem: PhantomData<&'m [u8]>,
}

impl<M: Mode, I: IovStore> PagePipe<M, I, KernelPipes> {
    /// Captures every page recorded, from `source`, with [`CaptureMode::Auto`].
    ///
    /// # Errors
    /// [`CaptureError`]; the page pipe is dropped.
    pub fn capture<'m>(self, source: &Source<'m>) -> Result<Captured<'m, M, I>, CaptureError> {
        self.capture_with(source, CaptureMode::Auto)
    }

    /// Captures every page recorded, from `source`, the way `mode` says.
    ///
    /// # Panics
    /// If the source and the page pipe count in different page sizes.
    ///
    /// # Errors
    /// [`CaptureError`]; the page pipe is dropped.
    pub fn capture_with<'m>(
        self,
        source: &Source<'m>,
        mode: CaptureMode,
    ) -> Result<Captured<'m, M, I>, CaptureError> {
        let mut pp = self;
        let ps = pp.page_size() as u64;
        assert_eq!(
            source.page_size() as u64,
            ps,
            "source and page pipe page sizes differ"
        );
        pp.begin_drain();
        // Map every run first, so that a page the source lacks stops the capture before
        // any syscall.
        let mut iovs = Iovs::new();
        let mut spans = Vec::with_capacity(pp.buf_count());
        for bi in 0..pp.buf_count() {
            let b = pp.buf_info(bi);
            if !b.live || b.pages == 0 {
                continue;
            }
            let first = iovs.len();
            for r in &pp.runs()[b.first_run..b.first_run + b.nr_runs] {
                source
                    .iovs(r.vaddr(), r.pages(), &mut iovs)
                    .map_err(|addr| CaptureError::NotCovered { addr })?;
            }
            spans.push((bi, first..iovs.len()));
        }

        let mut path = match mode {
            CaptureMode::Auto => CapturePath::VmspliceGift,
            CaptureMode::Copy => CapturePath::Copy,
        };
        let (mut captured, mut copied) = (0u64, 0u64);
        // Whether pages went in by reference without the gift.
        let mut ungifted = false;
        for (bi, range) in spans {
            let b = pp.buf_info(bi);
            // Pieces go in groups of one kind: referenced (vmsplice) or copied (write).
            let mut start = range.start;
            while start < range.end {
                // Memory others may write goes in as copies, the rest by reference.
                let by_ref = |i: usize| matches!(iovs.hold(i), Hold::Lent | Hold::Sealed);
                let kind = by_ref(start);
                let end = (start..range.end)
                    .find(|&i| by_ref(i) != kind)
                    .unwrap_or(range.end);
                let group = start..end;
                let want = iovs.bytes(group.clone());
                let mut done = 0usize;
                // Whether any bytes of the group went in by reference (before a refusal
                // moved the rest to copies).
                let mut referenced = false;
                while done < want {
                    let pipe = pp.pipe(b.slot);
                    let referencing = kind && path != CapturePath::Copy;
                    let r = match (kind, path) {
                        (true, CapturePath::VmspliceGift) => {
                            iovs.vmsplice(pipe, group.clone(), done, true)
                        }
                        (true, CapturePath::Vmsplice) => {
                            iovs.vmsplice(pipe, group.clone(), done, false)
                        }
                        _ => iovs.write(pipe.write.as_fd(), group.clone(), done),
                    };
                    let partial = match r {
                        Ok(n) => {
                            referenced |= referencing && n > 0;
                            done += n;
                            continue;
                        }
                        Err(partial) => partial,
                    };
                    referenced |= referencing && partial.done > 0;
                    done += partial.done;
                    // Refusals of the flag or of vmsplice itself move on to the next path;
                    // anything else stops the capture.
                    path = match (partial.stopped, path, kind) {
                        (
                            Stopped::Errno(Errno::OPNOTSUPP | Errno::INVAL),
                            CapturePath::VmspliceGift,
                            true,
                        ) => CapturePath::Vmsplice,
                        (
                            Stopped::Errno(Errno::PERM | Errno::NOSYS | Errno::OPNOTSUPP),
                            CapturePath::VmspliceGift | CapturePath::Vmsplice,
                            true,
                        ) => CapturePath::Copy,
                        (stopped, _, _) => {
                            let before = iovs.bytes(range.start..start) + done;
                            let page = before as u64 / ps;
                            let runs = &pp.runs()[b.first_run..b.first_run + b.nr_runs];
                            let (addr, captured) = (nth_page(runs, page, ps), captured + page);
                            return Err(match stopped {
                                Stopped::Errno(errno) => CaptureError::Kernel {
                                    addr,
                                    errno,
                                    captured,
                                },
                                Stopped::EndOfData => CaptureError::NoProgress { addr, captured },
                            });
                        }
                    };
                }
                let by_reference = kind && (path != CapturePath::Copy || referenced);
                if !by_reference {
                    copied += (want as u64) / ps;
                } else if (start..end).any(|i| iovs.hold(i) == Hold::Lent) {
                    // Pages of borrowed memory: they may change once 'm ends. They went
                    // in without the gift.
                    pp.pin(bi);
                    ungifted = true;
                } else if path == CapturePath::Vmsplice {
                    ungifted = true;
                }
                start = end;
            }
            captured += b.pages;
        }
        // The path says how the pages that went by reference went: all with the gift,
        // some without, or none by reference at all.
        let path = if captured > 0 && copied == captured {
            CapturePath::Copy
        } else if ungifted {
            CapturePath::Vmsplice
        } else {
            path
        };
        Ok(Captured {
            pp,
            report: CaptureReport {
                path,
                pages: captured,
                bytes: captured * ps,
                copied,
            },
            dumped: false,
            devnull: None,
            index: None,
            _mem: PhantomData,
        })
    }
}

/// The address of page `n` of a buf, counting through its runs.
fn nth_page(runs: &[crate::Run], mut n: u64, ps: u64) -> u64 {
    for r in runs {
        if n < r.pages() {
            return r.vaddr() + n * ps;
        }
        n -= r.pages();
    }
    runs.last().map_or(0, |r| r.end(ps as usize))
}

impl<'m, M: Mode, I: IovStore> Captured<'m, M, I> {
    /// What the capture did.
    pub fn report(&self) -> CaptureReport {
        self.report
    }

    /// The page pipe, for inspection.
    pub fn page_pipe(&self) -> &PagePipe<M, I, KernelPipes> {
        &self.pp
    }

    pub(crate) fn parts(
        &mut self,
    ) -> (
        &mut PagePipe<M, I, KernelPipes>,
        &mut Option<File>,
        &mut Option<crate::serve_index::ServeIndex>,
    ) {
        (&mut self.pp, &mut self.devnull, &mut self.index)
    }

    pub(crate) fn pp(&self) -> &PagePipe<M, I, KernelPipes> {
        &self.pp
    }

    /// The page pipe back, with its pipes as the dump left them.
    pub(crate) fn into_page_pipe(self) -> PagePipe<M, I, KernelPipes> {
        self.pp
    }

    /// Marks the dump as run; whether it had run before.
    pub(crate) fn mark_dumped(&mut self) -> bool {
        std::mem::replace(&mut self.dumped, true)
    }

    /// Releases a buf: its pipe closes once no buf uses it. Pages of a released buf that
    /// share a pipe with later bufs are discarded when those are dumped.
    ///
    /// # Errors
    /// [`UnknownBuf`](crate::UnknownBuf) for a buf already released.
    pub fn release_buf(&mut self, id: crate::BufId) -> Result<(), crate::UnknownBuf> {
        self.pp.release_buf(id)
    }

    /// Whether [`dump`](Self::dump) has run.
    pub fn is_dumped(&self) -> bool {
        self.dumped
    }
}

impl<I: IovStore> Captured<'_, ChunkMode, I> {
    /// Turns back into a page pipe for the next chunk: bufs whose pipes were drained go to
    /// the free list with their pipes; bufs whose pages are still in their pipes (not
    /// dumped, lazy, or behind a failed transfer) are released, closing those pipes.
    pub fn reinit(mut self) -> PagePipe<ChunkMode, I, KernelPipes> {
        self.pp.reinit_drained();
        self.pp
    }
}
