//! CRIU's debug notation of a page pipe, and its entries in address order.
//!
//! CRIU's `page-pipe.h` explains page pipes with a short notation, which `Display` of a
//! page pipe and [`PagePipe::notation`] print: one item per entry in address order,
//! `PAGE:COUNT`, where `PAGE` is the page number from a base address in hex (at least two
//! digits) and `COUNT` is decimal; `:L` marks the run of a lazy buf, `:P` a hole whose
//! pages are in the parent snapshot, `:-` a hole without flags. For example
//! `03:2:P,05:1,0B:4:P` is two pages from page 3 in the parent, page 5 captured, and four
//! pages from page 11 in the parent.

use std::fmt;

use super::{Buf, PagePipe};
use crate::backend::PipeBackend;
use crate::image::{PageFlags, PagemapEntry};
use crate::mode::{IovStore, Mode};
use crate::types::{BufFlags, Hole, HoleFlags, Run};

impl<'a> Entries<'a> {
    pub(super) fn new(
        runs: &'a [Run],
        bufs: &'a [Buf],
        holes: &'a [Hole],
        lazy_pages: bool,
    ) -> Self {
        Self {
            runs,
            bufs,
            holes,
            lazy_pages,
            buf: 0,
            run: 0,
            hole: 0,
        }
    }
}

/// Runs and holes in address order; from [`PagePipe::entries`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    runs: &'a [Run],
    bufs: &'a [Buf],
    holes: &'a [Hole],
    lazy_pages: bool,
    buf: usize,
    run: usize,
    hole: usize,
}

impl Entries<'_> {
    fn next_run(&mut self) -> Option<(Run, BufFlags)> {
        while let Some(b) = self.bufs.get(self.buf) {
            if b.live && self.run < b.nr_runs {
                return Some((self.runs[b.first_run + self.run], b.flags));
            }
            self.buf += 1;
            self.run = 0;
        }
        None
    }
}

impl Iterator for Entries<'_> {
    type Item = PagemapEntry;

    fn next(&mut self) -> Option<PagemapEntry> {
        let run = self.next_run();
        let hole = self.holes.get(self.hole).copied();
        match (run, hole) {
            (Some((r, flags)), h) if h.is_none_or(|h| r.vaddr < h.vaddr) => {
                self.run += 1;
                Some(PagemapEntry {
                    vaddr: r.vaddr,
                    pages: r.pages,
                    flags: run_flags(flags, self.lazy_pages),
                })
            }
            (_, Some(h)) => {
                self.hole += 1;
                Some(PagemapEntry {
                    vaddr: h.vaddr,
                    pages: h.pages,
                    flags: hole_flags(h.flags),
                })
            }
            (None, None) => None,
            (Some(_), None) => unreachable!("the first arm takes a run when there is no hole"),
        }
    }
}

/// The entry flags of a run of a buf with `flags`: `PRESENT`; `LAZY` too for a lazy buf,
/// without `PRESENT` when lazy pages are on (its pages stay in their pipe).
pub(crate) fn run_flags(flags: BufFlags, lazy_pages: bool) -> PageFlags {
    match (flags.contains(BufFlags::LAZY), lazy_pages) {
        (false, _) => PageFlags::PRESENT,
        (true, false) => PageFlags::LAZY | PageFlags::PRESENT,
        (true, true) => PageFlags::LAZY,
    }
}

/// The entry flags of a hole with `flags`: `PARENT`, or none (a dump leaves it out).
pub(crate) fn hole_flags(flags: HoleFlags) -> PageFlags {
    if flags.contains(HoleFlags::PARENT) {
        PageFlags::PARENT
    } else {
        PageFlags::empty()
    }
}

/// A page pipe in CRIU's debug notation; from [`PagePipe::notation`].
#[derive(Debug)]
pub struct Notation<'a, M: Mode, I: IovStore, B: PipeBackend> {
    pub(super) pp: &'a PagePipe<M, I, B>,
    pub(super) base: u64,
}

impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Display for Notation<'_, M, I, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_notation(f, self.pp.entries(), self.base, self.pp.page_shift())
    }
}

/// Writes entries in CRIU's debug notation (see the [module docs](self)): `:P` in the
/// parent, `:L` lazy, `:L-` lazy and not in the pages file, `:-` no flags.
pub(crate) fn write_notation(
    f: &mut fmt::Formatter<'_>,
    entries: impl Iterator<Item = PagemapEntry>,
    base: u64,
    page_shift: u32,
) -> fmt::Result {
    for (i, e) in entries.enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        let page = e.vaddr.wrapping_sub(base) >> page_shift;
        write!(f, "{page:02X}:{}", e.pages)?;
        let lazy = e.flags.contains(PageFlags::LAZY);
        let present = e.flags.contains(PageFlags::PRESENT);
        if e.flags.contains(PageFlags::PARENT) {
            f.write_str(":P")?;
        } else if lazy && present {
            f.write_str(":L")?;
        } else if lazy {
            f.write_str(":L-")?;
        } else if !present {
            f.write_str(":-")?;
        }
    }
    Ok(())
}

/// Entries in CRIU's debug notation, counted from `base`, for pages of `page_size` bytes:
/// what `Display` of a page pipe prints, for any list of entries (an image's, say).
///
/// ```
/// use page_pipe::{PageFlags, PagemapEntry, notation};
/// let e = [
///     PagemapEntry { vaddr: 0x3000, pages: 2, flags: PageFlags::PARENT },
///     PagemapEntry { vaddr: 0x5000, pages: 1, flags: PageFlags::PRESENT },
/// ];
/// assert_eq!(notation(&e, 0, 4096).to_string(), "03:2:P,05:1");
/// ```
pub fn notation(entries: &[PagemapEntry], base: u64, page_size: usize) -> impl fmt::Display + '_ {
    struct N<'a>(&'a [PagemapEntry], u64, u32);
    impl fmt::Display for N<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write_notation(f, self.0.iter().copied(), self.1, self.2)
        }
    }
    N(entries, base, page_size.trailing_zeros())
}

impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Display for PagePipe<M, I, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_notation(f, self.entries(), 0, self.page_shift())
    }
}

impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Debug for PagePipe<M, I, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Bufs<'a, M: Mode, I: IovStore, B: PipeBackend>(&'a PagePipe<M, I, B>);
        impl<M: Mode, I: IovStore, B: PipeBackend> fmt::Debug for Bufs<'_, M, I, B> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.0.bufs()).finish()
            }
        }
        f.debug_struct("PagePipe")
            .field("chunk_mode", &M::CHUNK)
            .field("lazy_pages", &self.lazy_pages())
            .field("page_size", &self.page_size())
            .field("iov_budget", &self.iov_budget())
            .field("runs_used", &self.runs_used())
            .field("open_pipes", &self.open_pipes())
            .field("free_bufs", &self.free_bufs())
            .field("bufs", &Bufs(self))
            .field("holes", &self.holes())
            .field("stats", &self.stats())
            .finish()
    }
}
