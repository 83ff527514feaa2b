//! [`GuestWriter`]: entries and their pages written into guest memory, the receiving end
//! of a migration or a snapshot dumped straight into another guest's memory.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestRegionMmap, ReadVolatile,
    VolatileMemoryError,
};

use super::guest::FdReader;
use super::{Access, Layout, VmError};
use crate::dump::{DumpErrorKind, DumpReport, DumpSink, sealed};
use crate::image::{PageFlags, PagemapEntry};
use crate::source::Chunk;

/// Writes pagemap entries and their pages into guest memory: a stream of
/// `(PagemapEntry, bytes)` as a migration receiver gets it, bytes read straight from a
/// socket ([`read_from`](Self::read_from)), or a snapshot dumped into it (it is a
/// [`DumpSink`]: `snapshot(&source, plan, &mut writer, ..)` copies one guest's memory into
/// another's).
///
/// Every entry is checked before any of its bytes are written: page-aligned, and every
/// page in a region of the memory ([`VmError::OutsideMemory`] names the first that is
/// not, in a gap or outside all regions). Present entries' pages are written; entries
/// whose pages are elsewhere (`PARENT`: the receiver has them already; `LAZY`: to be
/// fetched on demand) are checked and recorded. The entries are kept, contiguous ones
/// with equal flags joined. Writes mark the regions' dirty bitmaps, as vm-memory's own
/// writes do.
///
/// ```
/// use page_pipe::image::{PageFlags, PagemapEntry};
/// use page_pipe::vm::{GuestWriter, VmError};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
/// let ps = page_pipe::page_size();
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * ps)])?;
/// let mut w = GuestWriter::new(&mem)?;
/// w.write(PagemapEntry { vaddr: ps as u64, pages: 1, flags: PageFlags::PRESENT }, &vec![3; ps])?;
/// assert_eq!(mem.read_obj::<u8>(GuestAddress(ps as u64))?, 3);
/// // The last page is the memory's; the one after it is not: refused whole.
/// let e = PagemapEntry { vaddr: 3 * ps as u64, pages: 2, flags: PageFlags::PRESENT };
/// assert!(matches!(w.write(e, &vec![4; 2 * ps]), Err(VmError::OutsideMemory { pages: 1, .. })));
/// assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * ps as u64))?, 0);
/// assert_eq!(w.entries().len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct GuestWriter<'m, M> {
    mem: &'m M,
    layout: Layout,
    entries: Vec<PagemapEntry>,
    report: DumpReport,
    buf: Vec<u8>,
}

impl<M> fmt::Debug for GuestWriter<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestWriter")
            .field("layout", &self.layout)
            .field("entries", &self.entries.len())
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// Bytes copied at a time out of memory others may write, on their way into guest memory.
const BOUNCE: usize = 1 << 20;

impl<'m, M, B> GuestWriter<'m, M>
where
    M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
    B: Bitmap,
{
    /// A writer into `mem`, whose regions are checked by the rules of the
    /// [`vm`](super) module (mapped for writing).
    ///
    /// # Errors
    /// [`VmError`] naming a region that breaks a rule.
    pub fn new(mem: &'m M) -> Result<Self, VmError> {
        Ok(Self {
            mem,
            layout: Layout::of(mem, Some(Access::Write))?,
            entries: Vec::new(),
            report: DumpReport::default(),
            buf: Vec::new(),
        })
    }

    /// Checks that every page of `entry` is in a region of the memory.
    ///
    /// # Errors
    /// [`VmError::BadEntry`] for an unaligned entry or one past the end of the address
    /// space; [`VmError::OutsideMemory`] naming its first page in no region.
    pub fn check(&self, entry: &PagemapEntry) -> Result<(), VmError> {
        entry
            .range(self.layout.page_size)
            .map_err(|_| VmError::BadEntry { entry: *entry })?;
        self.layout.check_range(entry.vaddr, entry.pages)
    }

    /// The bytes a present entry's pages take.
    fn bytes_of(&self, entry: &PagemapEntry) -> usize {
        (entry.pages as usize) * self.layout.page_size
    }

    /// Writes `entry` and its pages, `bytes` (exactly its pages for a present entry,
    /// nothing for one whose pages are not here), after checking it.
    ///
    /// # Errors
    /// As [`check`](Self::check), and [`VmError::Length`] when `bytes` is not as long as
    /// the entry's pages; nothing was written then.
    pub fn write(&mut self, entry: PagemapEntry, bytes: &[u8]) -> Result<(), VmError> {
        self.check(&entry)?;
        let want = if entry.is_present() {
            self.bytes_of(&entry)
        } else {
            0
        };
        if bytes.len() != want {
            return Err(VmError::Length {
                entry,
                len: bytes.len(),
            });
        }
        if want > 0 {
            self.mem
                .write_slice(bytes, GuestAddress(entry.vaddr))
                .map_err(|error| VmError::Guest {
                    addr: entry.vaddr,
                    error,
                })?;
        }
        self.record(entry);
        Ok(())
    }

    /// Writes `entry`, reading its pages (a present entry's, nothing for others) from
    /// `src` straight into guest memory: a socket or pipe of the migration stream (vm-memory
    /// implements `ReadVolatile` for `UnixStream`, `TcpStream`, `File` with its `rawfd`
    /// feature), or any `ReadVolatile`. The entry is checked before anything is read.
    ///
    /// ```
    /// use std::io::Write;
    /// use page_pipe::image::{PageFlags, PagemapEntry};
    /// use page_pipe::vm::GuestWriter;
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    /// let ps = page_pipe::page_size();
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 2 * ps)])?;
    /// let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair()?;
    /// std::thread::spawn(move || tx.write_all(&vec![9u8; 2 * ps]));
    /// let mut w = GuestWriter::new(&mem)?;
    /// w.read_from(PagemapEntry { vaddr: 0x10_0000, pages: 2, flags: PageFlags::PRESENT }, &mut rx)?;
    /// assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000 + 2 * ps as u64 - 1))?, 9);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`check`](Self::check) (nothing read then); [`VmError::Stream`] when `src`
    /// fails or ends first, after which the entry's pages are partly written.
    pub fn read_from<R: ReadVolatile>(
        &mut self,
        entry: PagemapEntry,
        src: &mut R,
    ) -> Result<(), VmError> {
        self.check(&entry)?;
        if entry.is_present() {
            let len = self.bytes_of(&entry);
            read_into(self.mem, &entry, len, src)?;
        }
        self.record(entry);
        Ok(())
    }

    /// The entries written so far, in the order given, contiguous ones with equal flags
    /// joined.
    pub fn entries(&self) -> &[PagemapEntry] {
        &self.entries
    }

    /// The entries written.
    pub fn into_entries(self) -> Vec<PagemapEntry> {
        self.entries
    }

    /// What was written: entries, present pages and bytes, pages in the parent, lazy
    /// pages.
    pub fn report(&self) -> DumpReport {
        self.report
    }

    fn record(&mut self, e: PagemapEntry) {
        let ps = self.layout.page_size as u64;
        self.report.entries += 1;
        if e.is_present() {
            self.report.present_pages += e.pages;
            self.report.bytes += e.pages * ps;
        } else if e.flags.contains(PageFlags::PARENT) {
            self.report.parent_pages += e.pages;
        } else {
            self.report.lazy_kept += e.pages;
        }
        if let Some(last) = self.entries.last_mut()
            && last.flags == e.flags
            && last.end(ps as usize) == Some(e.vaddr)
        {
            last.pages += e.pages;
            return;
        }
        self.entries.push(e);
    }

    /// Copies `chunks` (the pages of `entry`, in order) into guest memory: slices as they
    /// are, memory others may write through a bounce buffer of volatile copies.
    fn write_chunks(&mut self, entry: &PagemapEntry, chunks: &[Chunk<'_>]) -> Result<(), VmError> {
        let mut at = entry.vaddr;
        for c in chunks {
            if let Some(bytes) = c.as_slice() {
                self.mem
                    .write_slice(bytes, GuestAddress(at))
                    .map_err(|error| VmError::Guest { addr: at, error })?;
            } else {
                self.buf.resize(c.len(), 0);
                c.copy_to(&mut self.buf);
                for (i, piece) in self.buf.chunks(BOUNCE).enumerate() {
                    let a = at + (i * BOUNCE) as u64;
                    self.mem
                        .write_slice(piece, GuestAddress(a))
                        .map_err(|error| VmError::Guest { addr: a, error })?;
                }
            }
            at += c.len() as u64;
        }
        Ok(())
    }
}

/// Reads `len` bytes of `entry`'s pages from `src` into guest memory, region by region.
fn read_into<M, B, R>(mem: &M, entry: &PagemapEntry, len: usize, src: &mut R) -> Result<(), VmError>
where
    M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
    B: Bitmap,
    R: ReadVolatile,
{
    let mut at = entry.vaddr;
    for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(entry.vaddr), len) {
        let slice = slice.map_err(|error| VmError::Guest { addr: at, error })?;
        slice
            .read_exact_volatile_from(0, src, slice.len())
            .map_err(|e| match e {
                VolatileMemoryError::IOError(error) => VmError::Stream {
                    entry: *entry,
                    error,
                },
                other => VmError::Guest {
                    addr: at,
                    error: GuestMemoryError::from(other),
                },
            })?;
        at += slice.len() as u64;
    }
    Ok(())
}

/// The error a [`DumpSink`] reports for `error` on `entry`: an `io::Error` whose inner
/// error is the [`VmError`] (`get_ref` and `downcast_ref` give it back).
fn sink_error(entry: PagemapEntry, error: VmError) -> DumpErrorKind {
    DumpErrorKind::Sink {
        entry,
        error: io::Error::other(error),
    }
}

impl<M> sealed::Sealed for GuestWriter<'_, M> {}

/// A snapshot (or a captured page pipe) dumped into guest memory. A failure is
/// [`DumpErrorKind::Sink`] whose `io::Error` holds the [`VmError`].
impl<M, B> DumpSink for GuestWriter<'_, M>
where
    M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
    B: Bitmap,
{
    fn present(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
        len: usize,
        _pinned: bool,
    ) -> Result<(), DumpErrorKind> {
        // Pages read out of the pipe into guest memory: copies, whatever the pipe holds.
        self.check(&e).map_err(|err| sink_error(e, err))?;
        if len != self.bytes_of(&e) {
            return Err(sink_error(e, VmError::Length { entry: e, len }));
        }
        read_into(self.mem, &e, len, &mut FdReader::stream(pipe))
            .map_err(|err| sink_error(e, err))?;
        self.record(e);
        Ok(())
    }

    fn absent(&mut self, e: PagemapEntry) -> Result<(), DumpErrorKind> {
        self.check(&e).map_err(|err| sink_error(e, err))?;
        self.record(e);
        Ok(())
    }

    fn present_chunks(
        &mut self,
        e: PagemapEntry,
        chunks: &[Chunk<'_>],
    ) -> Result<(), DumpErrorKind> {
        self.check(&e).map_err(|err| sink_error(e, err))?;
        let len: usize = chunks.iter().map(Chunk::len).sum();
        if len != self.bytes_of(&e) {
            return Err(sink_error(e, VmError::Length { entry: e, len }));
        }
        self.write_chunks(&e, chunks)
            .map_err(|err| sink_error(e, err))?;
        self.record(e);
        Ok(())
    }

    /// Pages are copied into guest memory either way: from memory, no pipe.
    fn prefers_memory(&self, _sealed: bool) -> bool {
        true
    }
}
