//! Serving captured pages on demand (CRIU's `page_pipe_read`), with O(log n) lookup.
//!
//! # Rules
//!
//! - [`Captured::find`] locates the buf and run holding an address by binary search over
//!   the runs (which ascend across all bufs) and the bufs (ordered by their first run):
//!   O(log n), where CRIU scans every buf and run.
//! - [`Captured::read`] serves pages from an address: none (0 pages) if no buf holds it
//!   (the caller maps a zero page); an error if the buf's flags lack the flags asked for;
//!   else as many as asked, clamped to the end of the run. It `tee`s the buf's pipe from
//!   its start to the end of the request into a [`ReadDest`], then discards the prefix,
//!   so that the destination holds exactly the pages served. The source pipe keeps its
//!   pages: the same pages can be served again until their buf is released.
//! - A [`ReadDest`] is a pipe sized to what the kernel grants and at least as large as
//!   the largest pipe of the page pipe (which never grows a pipe beyond what the kernel
//!   grants). The pages served wait there in a [`Served`] guard, which hands them on
//!   (into memory or any file descriptor) or discards them when dropped, so the
//!   destination is empty for the next read.
//! - Pages already dumped are gone from their pipe: reading them is an error.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use page_pipe_sys::{Errno, Pipe, SpliceFlags, splice_exact, tee_exact};

use crate::builder::{IovStore, Mode};
use crate::capture::{Captured, partial_to_io};
use crate::page_pipe::BufId;
use crate::types::{BufFlags, Run};

/// Why a read failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadError {
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
    /// The destination pipe is smaller than the pipe the page is in.
    DestTooSmall {
        /// The address.
        addr: u64,
        /// Pages the `tee` needs.
        needed: u64,
        /// Pages the destination holds.
        capacity: u64,
    },
    /// A previous [`Served`] could not discard its pages, so the destination is not
    /// empty; make a new one.
    DestNotEmpty,
    /// The kernel refused a `tee` or `splice`.
    Kernel {
        /// The address.
        addr: u64,
        /// `tee` or `splice`.
        op: &'static str,
        /// The refusal.
        errno: Errno,
    },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Unaligned { addr } => write!(f, "address {addr:#x} is not page-aligned"),
            ReadError::Flags { addr, have, want } => write!(
                f,
                "page {addr:#x} is in a buf with flags {have:?}, not {want:?}"
            ),
            ReadError::Dumped { addr } => {
                write!(f, "page {addr:#x} was dumped and is no longer in its pipe")
            }
            ReadError::DestTooSmall {
                addr,
                needed,
                capacity,
            } => write!(
                f,
                "serving page {addr:#x} needs a destination of {needed} pages, it has {capacity}"
            ),
            ReadError::DestNotEmpty => f.write_str("the destination pipe still holds pages"),
            ReadError::Kernel { addr, op, errno } => {
                write!(f, "{op} for page {addr:#x} failed: {errno}")
            }
        }
    }
}

impl std::error::Error for ReadError {}

/// A pipe that served pages land in, with a sink for the prefix `tee` brings along.
#[derive(Debug)]
pub struct ReadDest {
    pipe: Pipe,
    capacity: u64,
    null: File,
    dirty: bool,
}

impl ReadDest {
    /// A destination for reads from `captured`: a pipe grown to its largest pipe, or
    /// more if the kernel rounds up.
    ///
    /// # Errors
    /// The errno of `pipe`, `F_SETPIPE_SZ` or opening `/dev/null`; `EPERM` also when the
    /// kernel grants less than needed (past `pipe-user-pages-soft`).
    pub fn for_captured<M: Mode, I: IovStore>(
        captured: &Captured<'_, M, I>,
    ) -> Result<Self, Errno> {
        let pp = captured.page_pipe();
        let largest = pp
            .pipes
            .iter()
            .flatten()
            .map(|s| s.capacity)
            .max()
            .unwrap_or(1);
        Self::with_pages(largest)
    }

    /// A destination holding at least `pages` pages.
    ///
    /// ```
    /// let dest = page_pipe::ReadDest::with_pages(10)?;
    /// assert!(dest.capacity() >= 10);
    /// # Ok::<(), page_pipe_sys::Errno>(())
    /// ```
    ///
    /// # Errors
    /// As [`for_captured`](Self::for_captured).
    pub fn with_pages(pages: u64) -> Result<Self, Errno> {
        let ps = page_pipe_sys::page_size().get();
        let pipe = page_pipe_sys::pipe()?;
        let mut capacity = (page_pipe_sys::pipe_capacity(&pipe.read)? / ps) as u64;
        if capacity < pages {
            let bytes = usize::try_from(pages)
                .ok()
                .and_then(|p| p.checked_mul(ps))
                .ok_or(Errno::PERM)?;
            capacity = (page_pipe_sys::set_pipe_capacity(&pipe.write, bytes)? / ps) as u64;
        }
        if capacity < pages {
            return Err(Errno::PERM);
        }
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        Ok(Self {
            pipe,
            capacity,
            null,
            dirty: false,
        })
    }

    /// The capacity, in pages.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// Pages served into a [`ReadDest`]: hand them on with [`read_into`](Self::read_into) or
/// [`splice_into`](Self::splice_into); dropping the guard discards what is left.
#[derive(Debug)]
#[must_use = "served pages wait in the destination until read, spliced or dropped"]
pub struct Served<'d> {
    dest: &'d mut ReadDest,
    pages: u64,
    left: usize,
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
        self.left
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
        if out.len() != self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes wait, the buffer holds {}", self.left, out.len()),
            ));
        }
        let r = page_pipe_sys::read_exact(&self.dest.pipe.read, out);
        self.settle(r, out.len())
    }

    /// Moves the waiting bytes into `fd` (a socket, a file, a pipe) with `splice`.
    ///
    /// # Errors
    /// The error of `splice`.
    pub fn splice_into(&mut self, fd: impl AsFd) -> io::Result<()> {
        let len = self.left;
        let r = splice_exact(
            &self.dest.pipe.read,
            None,
            fd,
            None,
            len,
            SpliceFlags::empty(),
        );
        self.settle(r, len)
    }

    fn settle(&mut self, r: Result<(), page_pipe_sys::Partial>, len: usize) -> io::Result<()> {
        match r {
            Ok(()) => {
                self.left = 0;
                Ok(())
            }
            Err(p) => {
                self.left -= p.done;
                Err(partial_to_io(p, len))
            }
        }
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        if self.left == 0 {
            return;
        }
        let d = &mut *self.dest;
        let r = splice_exact(
            &d.pipe.read,
            None,
            &d.null,
            None,
            self.left,
            SpliceFlags::empty(),
        );
        d.dirty = r.is_err();
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

/// Per-run and per-buf facts for reads, made on the first read.
#[derive(Debug, Default)]
pub(crate) struct ReadIndex {
    /// Page offset of each run in its buf.
    run_off: Vec<u64>,
    /// Index, among all captured pages, of each buf's first page.
    buf_base: Vec<u64>,
    /// Pages of each buf not served yet.
    buf_left: Vec<u64>,
    /// One bit per captured page: served at least once.
    served: Vec<u64>,
}

impl<'m, M: Mode, I: IovStore> Captured<'m, M, I> {
    /// The buf and run holding `addr`, if a buf that is not released holds it; O(log n)
    /// in bufs and runs.
    pub fn find(&self, addr: u64) -> Option<Found> {
        let (bi, ri) = self.locate(addr)?;
        let b = &self.pp.bufs[bi];
        Some(Found {
            buf: self.pp.buf_id(bi),
            flags: b.flags,
            run: self.pp.iovs.runs()[ri],
        })
    }

    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        let runs = self.pp.iovs.runs();
        let shift = self.pp.page_shift;
        let ri = runs.partition_point(|r| r.vaddr + (r.pages << shift) <= addr);
        if runs.get(ri)?.vaddr > addr {
            return None;
        }
        let bufs = &self.pp.bufs;
        let bi = bufs.partition_point(|b| b.first_run + b.nr_runs <= ri);
        let b = bufs.get(bi)?;
        (b.live && b.first_run <= ri).then_some((bi, ri))
    }

    fn index(&mut self) -> &mut ReadIndex {
        if self.index.is_none() {
            let runs = self.pp.iovs.runs();
            let mut ix = ReadIndex {
                run_off: vec![0; runs.len()],
                buf_base: vec![0; self.pp.bufs.len()],
                buf_left: vec![0; self.pp.bufs.len()],
                served: Vec::new(),
            };
            let mut base = 0;
            for (bi, b) in self.pp.bufs.iter().enumerate() {
                ix.buf_base[bi] = base;
                ix.buf_left[bi] = b.pages;
                let mut off = 0;
                let range = b.first_run..b.first_run + b.nr_runs;
                for (slot, r) in ix.run_off[range.clone()].iter_mut().zip(&runs[range]) {
                    *slot = off;
                    off += r.pages;
                }
                base += b.pages;
            }
            ix.served = vec![0; base.div_ceil(64) as usize];
            self.index = Some(ix);
        }
        self.index.as_mut().expect("made above")
    }

    /// Serves up to `nr_pages` pages from `addr` into `dest` (see the [module
    /// rules](self)). The buf's flags must contain `flags`.
    ///
    /// ```
    /// use memmap2::MmapOptions;
    /// use page_pipe::{BufFlags, PagePipe, ReadDest, Source};
    /// let ps = page_pipe_sys::page_size().get();
    /// let mut mem = MmapOptions::new().len(16 * ps).map_anon()?;
    /// mem[5 * ps] = 42;
    /// let source = Source::new().with_slice(0x10_0000, &mem[..])?;
    /// let mut pp = PagePipe::builder().iov_budget(4).lazy_pages(true).build()?;
    /// pp.add_pages(0x10_0000, 16, BufFlags::LAZY)?;
    /// let mut captured = pp.capture(&source)?;
    /// let mut dest = ReadDest::for_captured(&captured)?;
    /// let at = 0x10_0000 + 5 * ps as u64;
    /// let mut served = captured.read(&mut dest, at, 100, BufFlags::LAZY)?;
    /// assert_eq!(served.pages(), 11, "clamped to the end of the run");
    /// let mut page = vec![0u8; 11 * ps];
    /// served.read_into(&mut page)?;
    /// assert_eq!(page[0], 42);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ReadError`], naming the address.
    pub fn read<'d>(
        &mut self,
        dest: &'d mut ReadDest,
        addr: u64,
        nr_pages: u64,
        flags: BufFlags,
    ) -> Result<Served<'d>, ReadError> {
        let ps = self.pp.page_size() as u64;
        if addr % ps != 0 {
            return Err(ReadError::Unaligned { addr });
        }
        if dest.dirty {
            return Err(ReadError::DestNotEmpty);
        }
        let none = |dest| Served {
            dest,
            pages: 0,
            left: 0,
            buf: None,
            buf_done: false,
        };
        let Some((bi, ri)) = self.locate(addr) else {
            return Ok(none(dest));
        };
        if nr_pages == 0 {
            return Ok(none(dest));
        }
        let b = self.pp.bufs[bi];
        if !b.flags.contains(flags) {
            return Err(ReadError::Flags {
                addr,
                have: b.flags,
                want: flags,
            });
        }
        let consumed = self.pp.slot(b.slot).consumed;
        if consumed > b.pipe_pos {
            return Err(ReadError::Dumped { addr });
        }
        let r = self.pp.iovs.runs()[ri];
        let in_run = (addr - r.vaddr) / ps;
        let pages = (r.pages - in_run).min(nr_pages);
        let ix = self.index();
        let page_in_buf = ix.run_off[ri] + in_run;
        let before = (b.pipe_pos - consumed) + page_in_buf;
        let needed = before + pages;
        if needed > dest.capacity {
            return Err(ReadError::DestTooSmall {
                addr,
                needed,
                capacity: dest.capacity,
            });
        }
        let kernel = |op, p: page_pipe_sys::Partial| ReadError::Kernel {
            addr,
            op,
            errno: p.errno().unwrap_or(Errno::IO),
        };
        let pipe = &self.pp.slot(b.slot).pipe;
        tee_exact(
            &pipe.read,
            &dest.pipe.write,
            (needed * ps) as usize,
            SpliceFlags::NONBLOCK,
        )
        .map_err(|p| {
            dest.dirty = p.done > 0;
            kernel("tee", p)
        })?;
        if before > 0 {
            splice_exact(
                &dest.pipe.read,
                None,
                &dest.null,
                None,
                (before * ps) as usize,
                SpliceFlags::empty(),
            )
            .map_err(|p| {
                dest.dirty = true;
                kernel("splice", p)
            })?;
        }
        // Count the pages served for the first time.
        let ix = self.index.as_mut().expect("made above");
        let first = ix.buf_base[bi] + page_in_buf;
        for p in first..first + pages {
            let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
            if ix.served[w] & bit == 0 {
                ix.served[w] |= bit;
                ix.buf_left[bi] -= 1;
            }
        }
        Ok(Served {
            dest,
            pages,
            left: (pages * ps) as usize,
            buf: Some(self.pp.buf_id(bi)),
            buf_done: ix.buf_left[bi] == 0,
        })
    }
}
