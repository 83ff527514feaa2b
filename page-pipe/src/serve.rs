//! Serving captured pages on demand, for a lazy-pages server (CRIU's `page_pipe_read`),
//! with O(log n) lookup.
//!
//! # Rules
//!
//! - [`Captured::find`] locates the buf and run holding an address by binary search over
//!   the runs (which ascend across all bufs) and the bufs (ordered by their first run):
//!   O(log n), where CRIU scans every buf and run.
//! - [`Captured::serve`] serves pages from an address: none (0 pages) if no buf holds it
//!   (the caller maps a zero page); an error if the buf's flags lack the flags asked for;
//!   else as many as asked, clamped to the end of the run. It `tee`s the buf's pipe from
//!   its front to the end of the request into a [`ServeDest`], then discards the prefix,
//!   so that the destination holds exactly the pages served. The source pipe keeps its
//!   pages: the same pages can be served again until their buf is released.
//! - A [`ServeDest`] is a pipe sized to what the kernel grants and at least as large as
//!   the largest pipe of the page pipe. The pages served wait there, behind a [`Served`]
//!   guard that borrows the captured page pipe (so they cannot outlive its memory) and
//!   hands them on, into memory or any file descriptor, or discards them when dropped.
//!   The destination itself counts what waits in it, so pages left behind (a guard
//!   forgotten with `mem::forget`) are discarded before the next serve, never served as
//!   the next request's.
//! - Pages that reference borrowed memory leave as copies: [`Served::splice_into`] a
//!   socket or pipe reads them out and writes them; only a regular file gets them by
//!   `splice`, or any descriptor through the `unsafe` [`Served::splice_refs_into`].
//! - Pages already dumped are gone from their pipe: serving them is an error; so is
//!   serving from a pipe a failed dump left in an unknown state.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use page_pipe_sys::{Errno, FdKind, Pipe, SpliceFlags, splice_exact, tee_exact};

use crate::capture::Captured;
use crate::mode::{IovStore, Mode};
use crate::page_pipe::BufId;
use crate::serve_index::ServeIndex;
use crate::types::{BufFlags, Run};

/// The system call that failed while serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeOp {
    /// `tee` from the buf's pipe into the destination.
    Tee,
    /// `splice` of the prefix out of the destination.
    Splice,
}

impl fmt::Display for ServeOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServeOp::Tee => "tee",
            ServeOp::Splice => "splice",
        })
    }
}

/// Why serving pages failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServeError {
    /// The address is not page-aligned.
    Unaligned {
        /// The address.
        addr: u64,
    },
    /// The buf holding the address lacks the flags asked for.
    Flags {
        /// The address.
        addr: u64,
        /// The buf's flags.
        have: BufFlags,
        /// The flags asked for.
        want: BufFlags,
    },
    /// The page was dumped: it is no longer in its pipe.
    Dumped {
        /// The address.
        addr: u64,
    },
    /// A dump failed part way through the pipe holding the page (or the pipe ended
    /// before the bytes recorded in it), so where its pages start is unknown: it serves
    /// nothing more.
    Lost {
        /// The address.
        addr: u64,
    },
    /// The destination pipe is smaller than the pipe the page is in.
    DestTooSmall {
        /// The address.
        addr: u64,
        /// Pages the `tee` needs.
        needed: u64,
        /// Pages the destination holds.
        capacity: u64,
    },
    /// Pages left in the destination by an earlier serve could not be discarded; make a
    /// new destination.
    DestNotEmpty {
        /// Bytes still waiting there.
        bytes: usize,
    },
    /// The kernel refused a `tee` or `splice`.
    Kernel {
        /// The address.
        addr: u64,
        /// The call.
        op: ServeOp,
        /// The refusal.
        errno: Errno,
    },
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Unaligned { addr } => write!(f, "address {addr:#x} is not page-aligned"),
            ServeError::Flags { addr, have, want } => write!(
                f,
                "page {addr:#x} is in a buf with flags {have:?}, not {want:?}"
            ),
            ServeError::Dumped { addr } => {
                write!(f, "page {addr:#x} was dumped and is no longer in its pipe")
            }
            ServeError::Lost { addr } => write!(
                f,
                "page {addr:#x} is in a pipe that a failed dump left in an unknown state"
            ),
            ServeError::DestTooSmall {
                addr,
                needed,
                capacity,
            } => write!(
                f,
                "serving page {addr:#x} needs a destination of {needed} pages, it has {capacity}"
            ),
            ServeError::DestNotEmpty { bytes } => write!(
                f,
                "the destination pipe still holds {bytes} bytes that could not be discarded"
            ),
            ServeError::Kernel { addr, op, errno } => {
                write!(f, "{op} for page {addr:#x} failed: {errno}")
            }
        }
    }
}

impl std::error::Error for ServeError {}

/// Why a [`ServeDest`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServeDestError {
    /// Making the pipe, sizing it or opening `/dev/null` failed.
    Kernel(Errno),
    /// The kernel grants pipes of `granted` pages, less than the `wanted` (past
    /// `pipe-user-pages-soft`, or `pipe-max-size` is smaller).
    TooSmall {
        /// Pages asked for.
        wanted: u64,
        /// Pages the pipe holds.
        granted: u64,
    },
}

impl fmt::Display for ServeDestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeDestError::Kernel(e) => write!(f, "cannot make the destination pipe: {e}"),
            ServeDestError::TooSmall { wanted, granted } => write!(
                f,
                "the destination pipe holds {granted} pages, {wanted} are needed (see pipe-max-size and pipe-user-pages-soft)"
            ),
        }
    }
}

impl std::error::Error for ServeDestError {}

/// A pipe that served pages land in, with a sink for the prefix `tee` brings along. It
/// counts the bytes waiting in it.
#[derive(Debug)]
pub struct ServeDest {
    pipe: Pipe,
    capacity: u64,
    null: File,
    /// Bytes of the last serve still in the pipe.
    pending: usize,
    /// Those bytes reference memory that may change once its borrow ends.
    pinned: bool,
}

impl ServeDest {
    /// A destination for pages served from `captured`: a pipe grown to its largest pipe,
    /// or more if the kernel rounds up.
    ///
    /// # Errors
    /// [`ServeDestError`]: the kernel refused, or grants less than needed.
    pub fn for_captured<M: Mode, I: IovStore>(
        captured: &Captured<'_, M, I>,
    ) -> Result<Self, ServeDestError> {
        Self::with_pages(captured.pp().largest_pipe().max(1))
    }

    /// A destination holding at least `pages` pages.
    ///
    /// ```
    /// let dest = page_pipe::ServeDest::with_pages(10)?;
    /// assert!(dest.capacity() >= 10);
    /// # Ok::<(), page_pipe::ServeDestError>(())
    /// ```
    ///
    /// # Errors
    /// As [`for_captured`](Self::for_captured).
    pub fn with_pages(pages: u64) -> Result<Self, ServeDestError> {
        let ps = page_pipe_sys::page_size().get();
        let pipe = page_pipe_sys::pipe().map_err(ServeDestError::Kernel)?;
        let mut capacity =
            (page_pipe_sys::pipe_capacity(&pipe.read).map_err(ServeDestError::Kernel)? / ps) as u64;
        let too_small = |granted| ServeDestError::TooSmall {
            wanted: pages,
            granted,
        };
        if capacity < pages {
            let bytes = usize::try_from(pages)
                .ok()
                .and_then(|p| p.checked_mul(ps))
                .ok_or(too_small(capacity))?;
            capacity = match page_pipe_sys::set_pipe_capacity(&pipe.write, bytes) {
                Ok(b) => (b / ps) as u64,
                Err(Errno::PERM) => return Err(too_small(capacity)),
                Err(e) => return Err(ServeDestError::Kernel(e)),
            };
        }
        if capacity < pages {
            return Err(too_small(capacity));
        }
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| ServeDestError::Kernel(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
        Ok(Self {
            pipe,
            capacity,
            null,
            pending: 0,
            pinned: false,
        })
    }

    /// The capacity, in pages.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes waiting in the destination (0 but for a [`Served`] alive or forgotten).
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Discards what waits in the destination.
    fn discard(&mut self) -> Result<(), page_pipe_sys::Partial> {
        if self.pending == 0 {
            return Ok(());
        }
        let r = splice_exact(
            &self.pipe.read,
            None,
            &self.null,
            None,
            self.pending,
            SpliceFlags::empty(),
        );
        match r {
            Ok(()) => self.pending = 0,
            Err(p) => self.pending -= p.done,
        }
        r
    }
}

/// Pages served into a [`ServeDest`]: hand them on with [`read_into`](Self::read_into) or
/// [`splice_into`](Self::splice_into); dropping the guard discards what is left. It
/// borrows the captured page pipe, so it cannot outlive the memory it was served from:
/// this does not compile.
///
/// ```compile_fail,E0505
/// # use page_pipe::{BufFlags, PagePipe, ServeDest, Source};
/// # let ps = page_pipe::page_size();
/// let mem = memmap2::MmapOptions::new().len(ps).map_anon()?;
/// let source = Source::new().with_slice(0x1000, &mem[..])?;
/// let mut pp = PagePipe::builder().iov_budget(1).build()?;
/// pp.add_page(0x1000, BufFlags::empty())?;
/// let mut captured = pp.capture(&source)?;
/// let mut dest = ServeDest::for_captured(&captured)?;
/// let served = captured.serve(&mut dest, 0x1000, 1, BufFlags::empty())?;
/// drop(captured); // the guard still borrows it
/// drop(served);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[must_use = "served pages wait in the destination until read, spliced or dropped"]
pub struct Served<'a> {
    dest: &'a mut ServeDest,
    pages: u64,
    buf: Option<BufId>,
    buf_done: bool,
}

impl Served<'_> {
    /// Pages served (0: the address is in no buf).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes still waiting in the destination.
    pub fn bytes_left(&self) -> usize {
        self.dest.pending
    }

    /// The buf the pages came from.
    pub fn buf(&self) -> Option<BufId> {
        self.buf
    }

    /// Whether every page of that buf has now been served at least once: the caller may
    /// [release](Captured::release_buf) it.
    pub fn buf_done(&self) -> bool {
        self.buf_done
    }

    /// Reads the waiting bytes into `out`, which must be exactly as long.
    ///
    /// # Errors
    /// `InvalidInput` for a buffer of the wrong length; the error of `read`.
    pub fn read_into(&mut self, out: &mut [u8]) -> io::Result<()> {
        if out.len() != self.dest.pending {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes wait, the buffer holds {}",
                    self.dest.pending,
                    out.len()
                ),
            ));
        }
        let r = page_pipe_sys::read_exact(&self.dest.pipe.read, out);
        self.settle(r)
    }

    /// Moves the waiting bytes into `fd` (a socket, a file, a pipe). A regular file gets
    /// them by `splice`; so does anything else when the pages are owned memory nobody
    /// can write any more. Pages of borrowed memory go into sockets and pipes as copies
    /// (read, then written), so that the reader gets them as they were at capture.
    ///
    /// # Errors
    /// The error of `splice`, `read` or `write`.
    pub fn splice_into(&mut self, fd: impl AsFd) -> io::Result<()> {
        // Asked once: `AsFd` may answer with another descriptor next time, and the kind
        // checked must be that of the descriptor the pages go to.
        let fd = fd.as_fd();
        let kind = page_pipe_sys::fd_kind(fd);
        if self.dest.pinned && kind != FdKind::File {
            let mut buf = vec![0u8; self.dest.pending.min(1 << 20)];
            while self.dest.pending > 0 {
                let n = self.dest.pending.min(buf.len());
                let r = page_pipe_sys::read_exact(&self.dest.pipe.read, &mut buf[..n]);
                let got = match &r {
                    Ok(()) => n,
                    Err(p) => p.done,
                };
                self.dest.pending -= got;
                r?;
                page_pipe_sys::write_exact(fd, &buf[..n])?;
            }
            return Ok(());
        }
        // The pages are owned memory nobody can write, or `fd` is a regular file, which
        // copies them: either way the reader gets the bytes of the capture.
        self.splice_all(fd)
    }

    /// Moves the waiting bytes into `fd` with `splice`, whatever they reference: a socket
    /// or pipe then holds references to the memory until its reader reads them.
    ///
    /// # Errors
    /// The error of `splice`.
    ///
    /// # Safety
    /// Not about memory safety but the consistency the crate promises: the memory the
    /// pages were served from stays unchanged until the reader at the other end of `fd`
    /// has read them (DESIGN.md, "When page references may leave the crate").
    // The contract is the crate's consistency promise, not memory safety, so `unsafe` here
    // marks an opt-in rather than code that could cause undefined behaviour.
    #[allow(unsafe_code)]
    pub unsafe fn splice_refs_into(&mut self, fd: impl AsFd) -> io::Result<()> {
        self.splice_all(fd)
    }

    fn splice_all(&mut self, fd: impl AsFd) -> io::Result<()> {
        let r = splice_exact(
            &self.dest.pipe.read,
            None,
            fd,
            None,
            self.dest.pending,
            SpliceFlags::empty(),
        );
        self.settle(r)
    }

    fn settle(&mut self, r: Result<(), page_pipe_sys::Partial>) -> io::Result<()> {
        match r {
            Ok(()) => {
                self.dest.pending = 0;
                Ok(())
            }
            Err(p) => {
                self.dest.pending -= p.done;
                Err(p.into())
            }
        }
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        // A failure leaves the count behind: the next serve tries again, or says so.
        let _ = self.dest.discard();
    }
}

/// What [`Captured::find`] finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The buf.
    pub buf: BufId,
    /// Its flags.
    pub flags: BufFlags,
    /// The run holding the address.
    pub run: Run,
}

impl<M: Mode, I: IovStore> Captured<'_, M, I> {
    /// The buf and run holding `addr`, if a buf that is not released holds it; O(log n)
    /// in bufs and runs.
    pub fn find(&self, addr: u64) -> Option<Found> {
        let pp = self.pp();
        let (bi, ri) = pp.locate(addr)?;
        Some(Found {
            buf: pp.buf_id(bi),
            flags: pp.buf_info(bi).flags,
            run: pp.runs()[ri],
        })
    }

    /// Serves up to `nr_pages` pages from `addr` into `dest` (see the [module
    /// rules](self)). The buf's flags must contain `flags`.
    ///
    /// ```
    /// use memmap2::MmapOptions;
    /// use page_pipe::{BufFlags, PagePipe, ServeDest, Source};
    /// let ps = page_pipe::page_size();
    /// let mut mem = MmapOptions::new().len(16 * ps).map_anon()?;
    /// mem[5 * ps] = 42;
    /// let source = Source::new().with_slice(0x10_0000, &mem[..])?;
    /// let mut pp = PagePipe::builder().iov_budget(4).lazy_pages(true).build()?;
    /// pp.add_pages(0x10_0000, 16, BufFlags::LAZY)?;
    /// let mut captured = pp.capture(&source)?;
    /// let mut dest = ServeDest::for_captured(&captured)?;
    /// let at = 0x10_0000 + 5 * ps as u64;
    /// let mut served = captured.serve(&mut dest, at, 100, BufFlags::LAZY)?;
    /// assert_eq!(served.pages(), 11, "clamped to the end of the run");
    /// let mut page = vec![0u8; 11 * ps];
    /// served.read_into(&mut page)?;
    /// assert_eq!(page[0], 42);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ServeError`], naming the address.
    pub fn serve<'a>(
        &'a mut self,
        dest: &'a mut ServeDest,
        addr: u64,
        nr_pages: u64,
        flags: BufFlags,
    ) -> Result<Served<'a>, ServeError> {
        let (pp, _, index) = self.parts();
        let ps = pp.page_size() as u64;
        if !addr.is_multiple_of(ps) {
            return Err(ServeError::Unaligned { addr });
        }
        // Whatever an earlier guard left behind goes first.
        if dest.discard().is_err() {
            return Err(ServeError::DestNotEmpty {
                bytes: dest.pending,
            });
        }
        let none = |dest| Served {
            dest,
            pages: 0,
            buf: None,
            buf_done: false,
        };
        let Some((bi, ri)) = pp.locate(addr) else {
            return Ok(none(dest));
        };
        if nr_pages == 0 {
            return Ok(none(dest));
        }
        let b = pp.buf_info(bi);
        if !b.flags.contains(flags) {
            return Err(ServeError::Flags {
                addr,
                have: b.flags,
                want: flags,
            });
        }
        let slot = pp.slot(b.slot).expect("a live buf's pipe is open");
        if slot.is_lost() {
            return Err(ServeError::Lost { addr });
        }
        let consumed = slot.consumed();
        if consumed > b.pipe_pos {
            return Err(ServeError::Dumped { addr });
        }
        let r = pp.runs()[ri];
        let in_run = (addr - r.vaddr()) / ps;
        let pages = (r.pages() - in_run).min(nr_pages);
        let ix = index.get_or_insert_with(|| ServeIndex::new(pp));
        let page_in_buf = ix.run_off[ri] + in_run;
        let before = (b.pipe_pos - consumed) + page_in_buf;
        let needed = before + pages;
        if needed > dest.capacity {
            return Err(ServeError::DestTooSmall {
                addr,
                needed,
                capacity: dest.capacity,
            });
        }
        // A pipe that ends before the books say it does has lost its pages.
        let kernel = |op, p: page_pipe_sys::Partial| match p.errno() {
            Some(errno) => ServeError::Kernel { addr, op, errno },
            None => ServeError::Lost { addr },
        };
        let pipe = pp.pipe(b.slot);
        dest.pinned = b.pinned;
        tee_exact(
            &pipe.read,
            &dest.pipe.write,
            (needed * ps) as usize,
            SpliceFlags::NONBLOCK,
        )
        .map_err(|p| {
            dest.pending = p.done;
            kernel(ServeOp::Tee, p)
        })?;
        dest.pending = (needed * ps) as usize;
        if before > 0 {
            let prefix = (before * ps) as usize;
            splice_exact(
                &dest.pipe.read,
                None,
                &dest.null,
                None,
                prefix,
                SpliceFlags::empty(),
            )
            .map_err(|p| {
                dest.pending -= p.done;
                kernel(ServeOp::Splice, p)
            })?;
            dest.pending -= prefix;
        }
        // Count the pages served for the first time.
        let first = ix.buf_base[bi] + page_in_buf;
        for p in first..first + pages {
            let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
            if ix.served[w] & bit == 0 {
                ix.served[w] |= bit;
                ix.buf_left[bi] -= 1;
            }
        }
        let buf_done = ix.buf_left[bi] == 0;
        Ok(Served {
            dest,
            pages,
            buf: Some(pp.buf_id(bi)),
            buf_done,
        })
    }
}
