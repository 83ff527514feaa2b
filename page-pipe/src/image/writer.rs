//! [`ImageWriter`]: writes an image directory under temporary names and commits it
//! atomically.

use crate::source::Chunk;
use std::fs::{DirBuilder, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use page_pipe_sys::{SpliceFlags, Stopped};

use super::error::{FileOp, ImageError, io_err};
use super::files::{
    DIR_MODE, MAX_IO, create_temp, link_temp, read_exact_at, remove_if_there, sync_dir,
    write_all_at,
};
use super::format::{
    CountFields, MAX_ENTRY_PAGES, decode_pages_id, encode_entry_counts, encode_head,
};
mod appender;
pub use appender::PagesAppender;

use super::{
    MAX_PAGEMAP_BYTES, PageFlags, PagemapEntry, pagemap_name, pages_name, shmem_pagemap_name,
};

/// What an [`ImageWriter`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageSummary {
    /// Entries written.
    pub entries: u64,
    /// Pages in present entries (in the pages file).
    pub present_pages: u64,
    /// Pages in `PARENT` entries.
    pub parent_pages: u64,
    /// Pages in `LAZY` entries without `PRESENT`.
    pub lazy_pages: u64,
    /// Bytes of the pagemap image.
    pub pagemap_bytes: u64,
}

/// Writes an image directory: `pagemap-<id>.img` and `pages-<pages_id>.img`, and a
/// `parent` link for incremental snapshots.
///
/// `id` names the pagemap; in CRIU it is the id of the process whose memory the image
/// holds (its pid at dump time), so one directory can hold the images of several
/// processes. `pages_id` names the pages file, `pages-<pages_id>.img`, and is written in
/// the pagemap's head; CRIU numbers pages files from 1 as it dumps (its page server from
/// 65537), and [`create`](Self::create) takes 1.
///
/// Entries go in with [`push`](Self::push) (holes, lazy entries) or with their pages
/// ([`push_from_pipe`](Self::push_from_pipe), [`push_bytes`](Self::push_bytes)); a dump
/// does this for you. Nothing shows under the image's names until
/// [`finish`](Self::finish) commits it; a writer dropped without it, or one that failed,
/// leaves nothing behind. See the [module rules](super) for the files it makes.
///
/// ```
/// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
/// let dir = std::env::temp_dir().join(format!("pp-doc-writer-{}", std::process::id()));
/// let mut w = ImageWriter::create(&dir, 1)?;
/// w.push(PagemapEntry { vaddr: 0x10000, pages: 3, flags: PageFlags::PARENT })?;
/// w.push(PagemapEntry { vaddr: 0x13000, pages: 1, flags: PageFlags::PARENT })?;
/// assert!(!dir.join("pagemap-1.img").exists(), "not committed yet");
/// let summary = w.finish()?;
/// assert_eq!(summary.entries, 1, "contiguous entries with equal flags are joined");
/// assert!(dir.join("pagemap-1.img").exists());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), page_pipe::image::ImageError>(())
/// ```
#[derive(Debug)]
pub struct ImageWriter {
    dir: PathBuf,
    id: u64,
    pages_id: u32,
    pagemap_path: PathBuf,
    pages_path: PathBuf,
    page_size: usize,
    pagemap: File,
    pages: File,
    /// Temporary names not yet renamed into place (removed on drop).
    pagemap_tmp: Option<PathBuf>,
    pages_tmp: Option<PathBuf>,
    parent_tmp: Option<PathBuf>,
    /// Encoded messages not yet written.
    buf: Vec<u8>,
    /// Bytes of the pagemap file written.
    on_disk: u64,
    /// The largest pagemap it writes: what readers accept ([`MAX_PAGEMAP_BYTES`]).
    max_pagemap: u64,
    /// Whether [`prepare`](Self::prepare) ran: written out, synced, old pagemap gone.
    prepared: bool,
    pages_off: u64,
    /// The first error: the writer takes nothing more and refuses to commit.
    failed: Option<ImageError>,
    pending: Option<PagemapEntry>,
    last_end: Option<u64>,
    summary: ImageSummary,
    sync: bool,
    join: bool,
    counts: CountFields,
    /// Whether [`push_copy`](Self::push_copy) still tries `copy_file_range`.
    copy_range: bool,
    /// The buffer [`push_copy`](Self::push_copy) copies through where the kernel cannot
    /// copy between the files; at most [`COPY_BUF`] bytes, made when first needed.
    copy_buf: Vec<u8>,
}

/// Bytes of encoded entries that make the writer write them out.
const FLUSH_AT: usize = 64 << 10;

/// The most bytes [`ImageWriter::push_copy`] copies through its buffer at a time.
pub(super) const COPY_BUF: usize = 8 << 20;

impl ImageWriter {
    /// Starts an image `pagemap-<id>.img` with pages file `pages-1.img` in `dir`, making
    /// `dir` (mode 0700) if needed. `id` names the image within the directory: CRIU uses
    /// the dumped process's pid (and `criu restore` looks for that name); any number that
    /// tells this image from others in `dir` will do. The pages file's number (the
    /// *pages id*, 1 here) is CRIU's counter of pages files, written into the pagemap's
    /// header so the reader finds the file. An image already there stays until
    /// [`finish`](Self::finish) replaces it. Another image in the same directory needs
    /// a pages id of its own ([`create_with_pages_id`](Self::create_with_pages_id)):
    /// `finish` refuses to replace the pages file another pagemap reads.
    ///
    /// # Errors
    /// [`ImageError::Io`] naming the directory or file.
    pub fn create(dir: impl AsRef<Path>, id: u64) -> Result<Self, ImageError> {
        Self::create_with_pages_id(dir, id, 1)
    }

    /// As [`create`](Self::create), with pages file `pages-<pages_id>.img`.
    ///
    /// # Errors
    /// [`ImageError::Io`] naming the directory or file.
    pub fn create_with_pages_id(
        dir: impl AsRef<Path>,
        id: u64,
        pages_id: u32,
    ) -> Result<Self, ImageError> {
        Self::create_named(dir.as_ref(), id, pagemap_name(id), pages_id)
    }

    /// As [`create_with_pages_id`](Self::create_with_pages_id), for the pagemap of a
    /// shared memory object: `pagemap-shmem-<id>.img` (CRIU dumps anonymous shared
    /// memory this way; its page server receives it as image type 2).
    ///
    /// ```
    /// # use page_pipe::image::ImageWriter;
    /// # let dir = std::env::temp_dir().join(format!("pp-doc-shmem-{}", std::process::id()));
    /// let w = ImageWriter::create_shmem_with_pages_id(&dir, 9, 65537)?;
    /// assert!(w.pagemap_path().ends_with("pagemap-shmem-9.img"));
    /// w.finish()?;
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    ///
    /// # Errors
    /// [`ImageError::Io`] naming the directory or file.
    pub fn create_shmem_with_pages_id(
        dir: impl AsRef<Path>,
        id: u64,
        pages_id: u32,
    ) -> Result<Self, ImageError> {
        Self::create_named(dir.as_ref(), id, shmem_pagemap_name(id), pages_id)
    }

    /// Starts an image whose pagemap is called `name` (made by a `*_name` function of
    /// this crate from numbers, never from outside input).
    fn create_named(dir: &Path, id: u64, name: String, pages_id: u32) -> Result<Self, ImageError> {
        let dir = dir.to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(io_err(&dir, FileOp::MakeDir))?;
        let pagemap_path = dir.join(&name);
        let pages_path = dir.join(pages_name(pages_id));
        let (pagemap, pagemap_tmp) = create_temp(&dir, &name)?;
        let (pages, pages_tmp) = match create_temp(&dir, &pages_name(pages_id)) {
            Ok(p) => p,
            Err(e) => {
                let _ = remove_if_there(&pagemap_tmp);
                return Err(e);
            }
        };
        let mut buf = Vec::with_capacity(FLUSH_AT);
        encode_head(pages_id, &mut buf);
        Ok(Self {
            dir,
            id,
            pages_id,
            pagemap_path,
            pages_path,
            page_size: page_pipe_sys::page_size().get(),
            pagemap,
            pages,
            pagemap_tmp: Some(pagemap_tmp),
            pages_tmp: Some(pages_tmp),
            parent_tmp: None,
            buf,
            on_disk: 0,
            max_pagemap: MAX_PAGEMAP_BYTES,
            prepared: false,
            pages_off: 0,
            failed: None,
            pending: None,
            last_end: None,
            summary: ImageSummary::default(),
            sync: true,
            join: true,
            counts: CountFields::Both,
            copy_range: true,
            copy_buf: Vec::new(),
        })
    }

    /// Makes this image incremental: its `PARENT` entries are found in `parent_dir`. The
    /// link `parent` (relative when both directories share a parent directory) is made
    /// under a temporary name now and replaces any `parent` in the directory at
    /// [`finish`](Self::finish). Without it, `finish` removes an old `parent` link, so a
    /// full image never inherits one.
    ///
    /// # Errors
    /// [`ImageError::Io`] naming the parent directory or the link.
    pub fn with_parent(mut self, parent_dir: impl AsRef<Path>) -> Result<Self, ImageError> {
        let target = parent_dir.as_ref();
        let canon = target
            .canonicalize()
            .map_err(io_err(target, FileOp::FindParentDir))?;
        let here = self
            .dir
            .canonicalize()
            .map_err(io_err(&self.dir, FileOp::FindDir))?;
        let rel = match (canon.parent(), here.parent(), canon.file_name()) {
            (Some(a), Some(b), Some(name)) if a == b => Path::new("..").join(name),
            _ => canon,
        };
        if let Some(old) = self.parent_tmp.take() {
            remove_if_there(&old).map_err(io_err(&old, FileOp::Remove))?;
        }
        self.parent_tmp = Some(link_temp(&self.dir, "parent", &rel)?);
        Ok(self)
    }

    /// Whether [`finish`](Self::finish) syncs the data before it commits: `fsync` of both
    /// files before they are renamed into place, and of the directory after. Default:
    /// on. Off, a crash soon after `finish` may leave an image whose files are
    /// incomplete; it saves the time of writing the data out (as Firecracker lets its
    /// users choose).
    ///
    /// ```
    /// # use page_pipe::image::ImageWriter;
    /// # let dir = std::env::temp_dir().join(format!("pp-doc-sync-{}", std::process::id()));
    /// let w = ImageWriter::create(&dir, 1)?.with_sync(false);
    /// w.finish()?;
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    pub fn with_sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// Whether contiguous entries with equal flags are joined into one (default: on, so
    /// an image made in chunks equals one made in one pass). Off, every push is its own
    /// entry, as CRIU's page server writes them (one per message).
    ///
    /// ```
    /// # use page_pipe::image::{ImageWriter, PageFlags, PagemapEntry};
    /// # let dir = std::env::temp_dir().join(format!("pp-doc-join-{}", std::process::id()));
    /// let mut w = ImageWriter::create(&dir, 1)?.with_joining(false);
    /// w.push(PagemapEntry { vaddr: 0x10000, pages: 3, flags: PageFlags::PARENT })?;
    /// w.push(PagemapEntry { vaddr: 0x13000, pages: 1, flags: PageFlags::PARENT })?;
    /// assert_eq!(w.finish()?.entries, 2);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    pub fn with_joining(mut self, join: bool) -> Self {
        self.join = join;
        self
    }

    /// Which fields carry each entry's page count (default [`CountFields::Both`]).
    /// [`CountFields::Criu4`] writes the pagemap byte for byte as CRIU 4.x does: field 5
    /// only, field 2 zero, and no entry split however large.
    ///
    /// ```
    /// # use page_pipe::image::{CountFields, Image, ImageWriter, PageFlags, PagemapEntry};
    /// # let dir = std::env::temp_dir().join(format!("pp-doc-counts-{}", std::process::id()));
    /// let mut w = ImageWriter::create(&dir, 1)?.with_count_fields(CountFields::Criu4);
    /// w.push(PagemapEntry { vaddr: 0x10000, pages: 3, flags: PageFlags::LAZY })?;
    /// w.finish()?;
    /// // Readers take the count from field 5.
    /// assert_eq!(Image::open(&dir)?.entries()[0].pages, 3);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    pub fn with_count_fields(mut self, counts: CountFields) -> Self {
        self.counts = counts;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pagemap's id: the image is `pagemap-<id>.img`.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The pages file's id: it is `pages-<pages_id>.img`.
    pub fn pages_id(&self) -> u32 {
        self.pages_id
    }

    /// Where the pagemap image will be once committed.
    pub fn pagemap_path(&self) -> &Path {
        &self.pagemap_path
    }

    /// Where the pages file will be once committed.
    pub fn pages_path(&self) -> &Path {
        &self.pages_path
    }

    /// Remembers the first error, so that later calls and [`finish`](Self::finish)
    /// return it again, and returns it.
    fn fail(&mut self, e: ImageError) -> ImageError {
        if self.failed.is_none() {
            self.failed = Some(e.duplicate());
        }
        e
    }

    fn check(&mut self, e: &PagemapEntry) -> Result<(), ImageError> {
        if let Some(f) = &self.failed {
            return Err(f.duplicate());
        }
        let ok = e.pages > 0
            && e.range(self.page_size).is_ok()
            && self.last_end.is_none_or(|l| e.vaddr >= l);
        if ok {
            Ok(())
        } else {
            let err = ImageError::Order {
                path: self.pagemap_path.clone(),
                entry: *e,
            };
            Err(self.fail(err))
        }
    }

    /// Adds an entry whose pages are not in the pages file: `PARENT`, or `LAZY` without
    /// `PRESENT`. (A `PRESENT` entry comes with its pages:
    /// [`push_from_pipe`](Self::push_from_pipe), [`push_bytes`](Self::push_bytes).)
    ///
    /// # Errors
    /// [`ImageError::Order`] for an entry out of order or with `PRESENT`;
    /// [`ImageError::Io`] if writing the pagemap fails; the first error of an earlier
    /// call again. Any error makes the writer failed: it refuses to commit.
    pub fn push(&mut self, e: PagemapEntry) -> Result<(), ImageError> {
        if e.is_present() && self.failed.is_none() {
            let err = ImageError::Order {
                path: self.pagemap_path.clone(),
                entry: e,
            };
            return Err(self.fail(err));
        }
        self.check(&e)?;
        self.record(e)
    }

    /// Adds a `PRESENT` entry, moving its pages from the front of the pipe `pipe` into
    /// the pages file with `splice`.
    ///
    /// # Errors
    /// As [`push`](Self::push); [`ImageError::Io`] naming the pages file if the pages
    /// cannot all be written (`ENOSPC`, `EFBIG`, a pipe that holds too few bytes).
    pub fn push_from_pipe(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
    ) -> Result<(), ImageError> {
        let e = PagemapEntry {
            flags: e.flags | PageFlags::PRESENT,
            ..e
        };
        self.check(&e)?;
        let len = (e.pages * self.page_size as u64) as usize;
        self.splice_in(pipe, len)?;
        self.record(e)
    }

    /// Moves `len` bytes from the front of `pipe` to the pages file at `pages_off` with
    /// `splice`, and moves `pages_off` past them; fails the writer if they cannot all be
    /// written (a pipe that holds too few bytes, `ENOSPC`, `EFBIG`).
    pub(super) fn splice_in(&mut self, pipe: BorrowedFd<'_>, len: usize) -> Result<(), ImageError> {
        let mut off = self.pages_off;
        let r = page_pipe_sys::splice_exact(
            pipe,
            None,
            self.pages.as_fd(),
            Some(&mut off),
            len,
            SpliceFlags::empty(),
        );
        if let Err(partial) = r {
            let error = match partial.stopped {
                Stopped::Errno(e) => io::Error::from(e),
                Stopped::EndOfData => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the pipe held {} of {len} bytes", partial.done),
                ),
            };
            let err = io_err(&self.pages_path, FileOp::WritePages)(error);
            return Err(self.fail(err));
        }
        self.pages_off = off;
        Ok(())
    }

    /// Adds a `PRESENT` entry with its pages given as bytes (`e.pages` pages).
    ///
    /// # Errors
    /// As [`push_from_pipe`](Self::push_from_pipe); [`ImageError::Order`] also when
    /// `bytes` is not `e.pages` pages long.
    pub fn push_bytes(&mut self, e: PagemapEntry, bytes: &[u8]) -> Result<(), ImageError> {
        self.push_slices(e, &[bytes])
    }

    /// Adds a `PRESENT` entry with its pages given as slices that together are `e.pages`
    /// pages.
    pub(crate) fn push_slices(
        &mut self,
        e: PagemapEntry,
        bytes: &[&[u8]],
    ) -> Result<(), ImageError> {
        let chunks: Vec<Chunk<'_>> = bytes.iter().map(|b| Chunk::bytes(b)).collect();
        self.push_chunks(e, &chunks)
    }

    /// Adds a `PRESENT` entry with its pages given as chunks (slices, or memory others may
    /// write, which the kernel reads) that together are `e.pages` pages.
    pub(crate) fn push_chunks(
        &mut self,
        e: PagemapEntry,
        bytes: &[Chunk<'_>],
    ) -> Result<(), ImageError> {
        let e = PagemapEntry {
            flags: e.flags | PageFlags::PRESENT,
            ..e
        };
        self.check(&e)?;
        let total: usize = bytes.iter().map(|b| b.len()).sum();
        if e.pages.checked_mul(self.page_size as u64) != Some(total as u64) {
            let err = ImageError::Order {
                path: self.pagemap_path.clone(),
                entry: e,
            };
            return Err(self.fail(err));
        }
        let mut off = self.pages_off;
        for b in bytes {
            if let Err(p) = b.write_to(self.pages.as_fd(), Some(off)) {
                let err = io_err(&self.pages_path, FileOp::WritePages)(p.into());
                return Err(self.fail(err));
            }
            off += b.len() as u64;
        }
        self.pages_off = off;
        self.record(e)
    }

    /// Starts a `PRESENT` entry whose pages arrive in parts (from a socket, say): the
    /// returned [`PagesAppender`] takes them, from pipes or as bytes, and
    /// [`PagesAppender::finish`] adds the entry once all `e.pages` pages are in. An
    /// appender dropped before that fails the writer (it refuses to finish), since the
    /// pages file then holds part of an entry.
    ///
    /// ```
    /// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
    /// let dir = std::env::temp_dir().join(format!("pp-doc-appender-{}", std::process::id()));
    /// let ps = page_pipe::page_size();
    /// let mut w = ImageWriter::create(&dir, 1)?;
    /// let e = PagemapEntry { vaddr: 0x40 * ps as u64, pages: 2, flags: PageFlags::PRESENT };
    /// let mut a = w.begin_pages(e)?;
    /// a.append_bytes(&vec![1u8; ps])?;
    /// assert_eq!(a.left(), ps as u64);
    /// a.append_bytes(&vec![2u8; ps])?;
    /// a.finish()?;
    /// w.finish()?;
    /// let mut back = vec![0u8; 2 * ps];
    /// Image::open(&dir)?.read(e.vaddr, &mut back)?;
    /// assert!(back[..ps].iter().all(|&b| b == 1) && back[ps..].iter().all(|&b| b == 2));
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    ///
    /// # Errors
    /// As [`push`](Self::push).
    pub fn begin_pages(&mut self, e: PagemapEntry) -> Result<PagesAppender<'_>, ImageError> {
        let e = PagemapEntry {
            flags: e.flags | PageFlags::PRESENT,
            ..e
        };
        self.check(&e)?;
        Ok(PagesAppender::new(self, e))
    }

    /// Adds a `PRESENT` entry whose pages are copied from `src` (whose path is
    /// `src_path`), from byte `offset`: in the kernel with `copy_file_range` (no copy
    /// through user space; a reflink where the file system shares blocks), or, where the
    /// kernel refuses (`EXDEV`, `EINVAL`, `EOPNOTSUPP`, `ENOSYS`: other file systems, old
    /// kernels), through a buffer of at most [`COPY_BUF`] bytes.
    ///
    /// # Errors
    /// As [`push_bytes`](Self::push_bytes); [`ImageError::ShortRead`] naming `src_path`
    /// when it ends before the pages; [`ImageError::Io`] naming the pages file for
    /// `ENOSPC`, `EDQUOT` and `EFBIG`, else naming `src_path`.
    pub(super) fn push_copy(
        &mut self,
        e: PagemapEntry,
        src: &File,
        src_path: &Path,
        offset: u64,
    ) -> Result<(), ImageError> {
        let e = PagemapEntry {
            flags: e.flags | PageFlags::PRESENT,
            ..e
        };
        self.check(&e)?;
        let len = e.pages * self.page_size as u64;
        if let Err(err) = self.copy_in(src, src_path, offset, len) {
            return Err(self.fail(err));
        }
        self.pages_off += len;
        self.record(e)
    }

    /// Copies `len` bytes of `src` from `offset` to the pages file at `pages_off`.
    fn copy_in(
        &mut self,
        src: &File,
        src_path: &Path,
        mut offset: u64,
        len: u64,
    ) -> Result<(), ImageError> {
        let mut out = self.pages_off;
        let end = out + len;
        while out < end {
            let n = (end - out).min(MAX_IO as u64) as usize;
            if self.copy_range {
                let r = rustix::fs::copy_file_range(
                    src,
                    Some(&mut offset),
                    &self.pages,
                    Some(&mut out),
                    n,
                );
                match r {
                    Ok(0) => {
                        return Err(ImageError::ShortRead {
                            path: src_path.to_path_buf(),
                            offset,
                        });
                    }
                    // The kernel moved both offsets.
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(
                        rustix::io::Errno::XDEV
                        | rustix::io::Errno::INVAL
                        | rustix::io::Errno::OPNOTSUPP
                        | rustix::io::Errno::NOSYS,
                    ) => self.copy_range = false,
                    Err(
                        e @ (rustix::io::Errno::NOSPC
                        | rustix::io::Errno::DQUOT
                        | rustix::io::Errno::FBIG),
                    ) => {
                        return Err(io_err(&self.pages_path, FileOp::WritePages)(e.into()));
                    }
                    Err(e) => return Err(io_err(src_path, FileOp::CopyFrom)(e.into())),
                }
                continue;
            }
            let n = n.min(COPY_BUF);
            if self.copy_buf.len() < n {
                self.copy_buf.resize(n, 0);
            }
            let buf = &mut self.copy_buf[..n];
            read_exact_at(src, src_path, buf, offset)?;
            write_all_at(&self.pages, buf, out)
                .map_err(io_err(&self.pages_path, FileOp::WritePages))?;
            offset += n as u64;
            out += n as u64;
        }
        Ok(())
    }

    /// Counts `e` and joins it to the pending entry, or encodes the pending entry and
    /// keeps `e` pending.
    fn record(&mut self, e: PagemapEntry) -> Result<(), ImageError> {
        let ps = self.page_size as u64;
        let end = e.vaddr + e.pages * ps;
        self.last_end = Some(end);
        if e.flags.contains(PageFlags::PRESENT) {
            self.summary.present_pages += e.pages;
        } else if e.flags.contains(PageFlags::PARENT) {
            self.summary.parent_pages += e.pages;
        } else {
            self.summary.lazy_pages += e.pages;
        }
        if let Some(p) = &mut self.pending
            && self.join
            && p.flags == e.flags
            && p.vaddr + p.pages * ps == e.vaddr
        {
            p.pages += e.pages;
            return Ok(());
        }
        if let Some(p) = self.pending.replace(e) {
            self.encode(p);
            if self.buf.len() >= FLUSH_AT {
                self.flush_buf()?;
            }
        }
        Ok(())
    }

    /// Encodes `p`, split into entries of at most `u32::MAX` pages when field 2 carries
    /// the count.
    fn encode(&mut self, mut p: PagemapEntry) {
        let ps = self.page_size as u64;
        let most = match self.counts {
            CountFields::Both => MAX_ENTRY_PAGES,
            CountFields::Criu4 => u64::MAX,
        };
        while p.pages > 0 {
            let part = PagemapEntry {
                pages: p.pages.min(most),
                ..p
            };
            encode_entry_counts(&part, self.counts, &mut self.buf);
            self.summary.entries += 1;
            p.pages -= part.pages;
            p.vaddr += part.pages * ps;
        }
    }

    /// Writes the buffered messages to the temporary pagemap.
    fn flush_buf(&mut self) -> Result<(), ImageError> {
        // A pagemap readers would refuse is never written, let alone committed.
        let size = self.on_disk + self.buf.len() as u64;
        if size > self.max_pagemap {
            let err = ImageError::TooLarge {
                path: self.pagemap_path.clone(),
                size,
            };
            return Err(self.fail(err));
        }
        match write_all_at(&self.pagemap, &self.buf, self.on_disk) {
            Ok(()) => {
                self.on_disk += self.buf.len() as u64;
                self.buf.clear();
                Ok(())
            }
            Err(error) => {
                let err = io_err(&self.pagemap_path, FileOp::WritePagemap)(error);
                Err(self.fail(err))
            }
        }
    }

    /// Writes what is pending and commits the image: syncs the files (unless
    /// [`with_sync(false)`](Self::with_sync)), renames the pages file into place, puts
    /// the `parent` link in place (or removes an old one), and renames the pagemap into
    /// place last. An old pagemap of the same name is removed first, so the directory
    /// never pairs an old pagemap with new pages. Returns what the image holds.
    ///
    /// # Errors
    /// The first error the writer met, again (kind, errno and message), if one failed:
    /// then nothing is committed. [`ImageError::PagesInUse`] when another pagemap of the
    /// directory reads the pages file this one would replace; nothing is committed. [`ImageError::Io`] naming the file when writing,
    /// syncing or renaming fails; the pagemap is then not in place.
    pub fn finish(mut self) -> Result<ImageSummary, ImageError> {
        self.prepare()?;
        let tmp = self.pages_tmp.as_ref().expect("renamed only here");
        std::fs::rename(tmp, &self.pages_path).map_err(io_err(&self.pages_path, FileOp::Commit))?;
        self.pages_tmp = None;
        let link = self.dir.join("parent");
        match &self.parent_tmp {
            Some(tmp) => {
                std::fs::rename(tmp, &link).map_err(io_err(&link, FileOp::Commit))?;
                self.parent_tmp = None;
            }
            None => remove_if_there(&link).map_err(io_err(&link, FileOp::RemoveOldLink))?,
        }
        if self.sync {
            sync_dir(&self.dir)?;
        }
        let tmp = self.pagemap_tmp.as_ref().expect("renamed only here");
        std::fs::rename(tmp, &self.pagemap_path)
            .map_err(io_err(&self.pagemap_path, FileOp::Commit))?;
        self.pagemap_tmp = None;
        if self.sync {
            sync_dir(&self.dir)?;
        }
        self.summary.pagemap_bytes = self.on_disk;
        Ok(self.summary)
    }

    /// Refuses to replace a pages file that another pagemap image of the directory
    /// reads ([`ImageError::PagesInUse`]). Pagemaps are found by listing the directory
    /// (links and other non-files are not followed: they are no image of this writer's
    /// concern) and only their heads are read.
    fn check_pages_unshared(&self) -> Result<(), ImageError> {
        if std::fs::symlink_metadata(&self.pages_path).is_err() {
            return Ok(());
        }
        let ours = self.pagemap_path.file_name();
        let list = std::fs::read_dir(&self.dir).map_err(io_err(&self.dir, FileOp::ListDir))?;
        for ent in list {
            let ent = ent.map_err(io_err(&self.dir, FileOp::ListDir))?;
            let name = ent.file_name();
            let is_pagemap = name.to_str().is_some_and(|n| {
                n.starts_with("pagemap-") && n.ends_with(".img") && Some(name.as_os_str()) != ours
            });
            if !is_pagemap || !ent.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = ent.path();
            let Ok((file, _)) = super::files::open_regular(&path) else {
                continue;
            };
            let mut head = [0u8; 32];
            let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).unwrap_or(0);
            if decode_pages_id(&head[..n]) == Some(self.pages_id) {
                return Err(ImageError::PagesInUse {
                    path: self.pages_path.clone(),
                    by: path,
                });
            }
        }
        Ok(())
    }

    /// Fails, before anything of the old image is touched, when the `parent` step of the
    /// commit would fail: a directory (not a link) at `parent` can be neither removed nor
    /// replaced (`EISDIR`), and the old pagemap would be gone by then.
    fn check_parent_replaceable(&self) -> Result<(), ImageError> {
        let link = self.dir.join("parent");
        if !std::fs::symlink_metadata(&link).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        let op = match self.parent_tmp {
            Some(_) => FileOp::Commit,
            None => FileOp::RemoveOldLink,
        };
        let eisdir = io::Error::from_raw_os_error(rustix::io::Errno::ISDIR.raw_os_error());
        Err(io_err(&link, op)(eisdir))
    }

    /// The steps of [`finish`](Self::finish) that can fail for want of space or for
    /// what sits at the image's names, before anything new takes a name: writes what
    /// is pending, syncs both files (unless [`with_sync(false)`](Self::with_sync)), checks
    /// that the pages file may be replaced and the `parent` name taken, and removes an
    /// old pagemap of the same name. A page server runs it for every image
    /// of a session before it commits any, so that a session commits all its images or
    /// (nearly always) none. Running it again does nothing; a failure fails the writer.
    pub(crate) fn prepare(&mut self) -> Result<(), ImageError> {
        if let Some(f) = &self.failed {
            return Err(f.duplicate());
        }
        if self.prepared {
            return Ok(());
        }
        if let Some(p) = self.pending.take() {
            self.encode(p);
        }
        self.flush_buf()?;
        if self.sync {
            let r = self
                .pages
                .sync_all()
                .map_err(io_err(&self.pages_path, FileOp::Sync))
                .and_then(|()| {
                    self.pagemap
                        .sync_all()
                        .map_err(io_err(&self.pagemap_path, FileOp::Sync))
                });
            r.map_err(|e| self.fail(e))?;
        }
        self.check_pages_unshared()
            .and_then(|()| self.check_parent_replaceable())
            .map_err(|e| self.fail(e))?;
        remove_if_there(&self.pagemap_path)
            .map_err(io_err(&self.pagemap_path, FileOp::RemoveOldPagemap))
            .map_err(|e| self.fail(e))?;
        self.prepared = true;
        Ok(())
    }

    /// What has been written so far (entries still pending are not counted).
    pub fn summary(&self) -> ImageSummary {
        self.summary
    }
}

impl Drop for ImageWriter {
    /// Removes the temporary files of an image that was not committed.
    fn drop(&mut self) {
        for tmp in [&self.pagemap_tmp, &self.pages_tmp, &self.parent_tmp]
            .into_iter()
            .flatten()
        {
            let _ = remove_if_there(tmp);
        }
    }
}

#[cfg(test)]
mod tests;
