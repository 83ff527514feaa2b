//! [`ImageWriter`]: writes an image directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use page_pipe_sys::{SpliceFlags, Stopped};

use super::error::{ImageError, io_err};
use super::files::write_all_at;
use super::format::{MAX_ENTRY_PAGES, encode_entry, encode_head};
use super::{PageFlags, PagemapEntry, pagemap_name, pages_name};

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
/// Entries go in with [`push`](Self::push) (holes, lazy entries) or with their pages from
/// a pipe ([`push_from_pipe`](Self::push_from_pipe)); a dump does this for you. See the
/// [module rules](super) for what it guarantees when a write fails.
///
/// ```
/// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
/// let dir = std::env::temp_dir().join(format!("pp-doc-writer-{}", std::process::id()));
/// let mut w = ImageWriter::create(&dir, 1)?;
/// w.push(PagemapEntry { vaddr: 0x10000, pages: 3, flags: PageFlags::PARENT })?;
/// w.push(PagemapEntry { vaddr: 0x13000, pages: 1, flags: PageFlags::PARENT })?;
/// let summary = w.finish()?;
/// assert_eq!(summary.entries, 1, "contiguous entries with equal flags are joined");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), page_pipe::image::ImageError>(())
/// ```
#[derive(Debug)]
pub struct ImageWriter {
    dir: PathBuf,
    pagemap_path: PathBuf,
    pages_path: PathBuf,
    page_size: usize,
    pagemap: File,
    pages: File,
    buf: Vec<u8>,
    /// Bytes of the pagemap file on disk.
    on_disk: u64,
    pages_off: u64,
    /// End, in the pages file, of the pages of the entries encoded so far.
    encoded_pages: u64,
    /// End, in the pages file, of the pages of the entries on disk.
    disk_pages: u64,
    /// A pagemap write failed: the files were cut back to what is on disk, and the
    /// writer takes nothing more.
    failed: bool,
    pending: Option<PagemapEntry>,
    last_end: Option<u64>,
    summary: ImageSummary,
    finished: bool,
}

/// Bytes of encoded entries that make the writer write them out.
const FLUSH_AT: usize = 64 << 10;
/// Bytes of pages whose entries are not on disk yet that make the writer write them out.
const PAGES_FLUSH_AT: u64 = 1 << 20;

impl ImageWriter {
    /// Creates (or truncates) `pagemap-<id>.img` and `pages-1.img` in `dir`, making
    /// `dir` if needed.
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
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir, "make the directory"))?;
        let pagemap_path = dir.join(pagemap_name(id));
        let pages_path = dir.join(pages_name(pages_id));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(io_err(p, "create"))
        };
        let pagemap = open(&pagemap_path)?;
        let pages = open(&pages_path)?;
        // The head goes to disk at once: from here on the files are a valid image.
        let mut buf = Vec::with_capacity(FLUSH_AT);
        encode_head(pages_id, &mut buf);
        write_all_at(&pagemap, &buf, 0).map_err(io_err(&pagemap_path, "write the pagemap"))?;
        let on_disk = buf.len() as u64;
        buf.clear();
        Ok(Self {
            dir,
            pagemap_path,
            pages_path,
            page_size: page_pipe_sys::page_size().get(),
            pagemap,
            pages,
            buf,
            on_disk,
            pages_off: 0,
            encoded_pages: 0,
            disk_pages: 0,
            failed: false,
            pending: None,
            last_end: None,
            summary: ImageSummary::default(),
            finished: false,
        })
    }

    /// Links `parent` in this directory to `parent_dir`, making this image incremental:
    /// its `PARENT` entries are found there. The link is relative when both directories
    /// share a parent directory.
    ///
    /// # Errors
    /// [`ImageError::Io`] naming the link.
    pub fn with_parent(self, parent_dir: impl AsRef<Path>) -> Result<Self, ImageError> {
        let link = self.dir.join("parent");
        let target = parent_dir.as_ref();
        let canon = target
            .canonicalize()
            .map_err(io_err(target, "find the parent directory"))?;
        let here = self
            .dir
            .canonicalize()
            .map_err(io_err(&self.dir, "find the directory"))?;
        let rel = match (canon.parent(), here.parent(), canon.file_name()) {
            (Some(a), Some(b), Some(name)) if a == b => Path::new("..").join(name),
            _ => canon,
        };
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&link, "replace")(e)),
        }
        std::os::unix::fs::symlink(&rel, &link).map_err(io_err(&link, "make the link"))?;
        Ok(self)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pagemap image's path.
    pub fn pagemap_path(&self) -> &Path {
        &self.pagemap_path
    }

    /// The pages file's path.
    pub fn pages_path(&self) -> &Path {
        &self.pages_path
    }

    fn check_order(&mut self, e: &PagemapEntry) -> Result<u64, ImageError> {
        if self.failed {
            return Err(ImageError::Io {
                path: self.pagemap_path.clone(),
                op: "go on after an earlier write failed",
                error: io::Error::other("the image was cut back to its last whole entry"),
            });
        }
        let end = e
            .end(self.page_size)
            .filter(|_| e.pages > 0 && e.vaddr % self.page_size as u64 == 0)
            .filter(|_| self.last_end.is_none_or(|l| e.vaddr >= l));
        end.ok_or_else(|| ImageError::Order {
            path: self.pagemap_path.clone(),
            entry: *e,
        })
    }

    /// Adds an entry whose pages are not in the pages file: `PARENT`, or `LAZY` without
    /// `PRESENT`. (A `PRESENT` entry comes with its pages:
    /// [`push_from_pipe`](Self::push_from_pipe), [`push_bytes`](Self::push_bytes).)
    ///
    /// # Errors
    /// [`ImageError::Order`] for an entry out of order or with `PRESENT`;
    /// [`ImageError::Io`] if writing the pagemap fails.
    pub fn push(&mut self, e: PagemapEntry) -> Result<(), ImageError> {
        if e.is_present() {
            return Err(ImageError::Order {
                path: self.pagemap_path.clone(),
                entry: e,
            });
        }
        self.check_order(&e)?;
        self.record(e)
    }

    /// Adds a `PRESENT` entry, moving its pages from the front of the pipe `pipe` into
    /// the pages file with `splice`.
    ///
    /// # Errors
    /// [`ImageError::Order`]; [`ImageError::Io`] naming the pages file if the pages
    /// cannot all be written (`ENOSPC`, `EFBIG`, ...). Then the pages file is cut back to
    /// the entries before this one, which stay readable.
    pub fn push_from_pipe(
        &mut self,
        e: PagemapEntry,
        pipe: BorrowedFd<'_>,
    ) -> Result<(), ImageError> {
        let e = PagemapEntry {
            flags: e.flags | PageFlags::PRESENT,
            ..e
        };
        self.check_order(&e)?;
        let len = (e.pages * self.page_size as u64) as usize;
        let start = self.pages_off;
        let mut off = start;
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
            return Err(self.fail_pages(start, "write pages", error));
        }
        self.pages_off = off;
        self.record(e)
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
        let e = PagemapEntry {
            flags: e.flags | PageFlags::PRESENT,
            ..e
        };
        self.check_order(&e)?;
        let total: usize = bytes.iter().map(|b| b.len()).sum();
        if total as u64 != e.pages * self.page_size as u64 {
            return Err(ImageError::Order {
                path: self.pagemap_path.clone(),
                entry: e,
            });
        }
        let start = self.pages_off;
        let mut off = start;
        for b in bytes {
            if let Err(error) = write_all_at(&self.pages, b, off) {
                return Err(self.fail_pages(start, "write pages", error));
            }
            off += b.len() as u64;
        }
        self.pages_off = off;
        self.record(e)
    }

    /// A pages write failed: cut the pages file back to `start`, put what came before on
    /// disk, and return the error.
    fn fail_pages(&mut self, start: u64, op: &'static str, error: io::Error) -> ImageError {
        let _ = self.pages.set_len(start);
        let _ = self.flush_all();
        ImageError::Io {
            path: self.pages_path.clone(),
            op,
            error,
        }
    }

    /// Counts `e` and joins it to the pending entry, or writes the pending entry out and
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
            && p.flags == e.flags
            && p.vaddr + p.pages * ps == e.vaddr
        {
            p.pages += e.pages;
            return Ok(());
        }
        if let Some(p) = self.pending.replace(e) {
            self.encode(p);
            // Keep the entries on disk close behind their pages: a write that fails later
            // (a full disk) cuts the pages back to what the entries on disk cover.
            if self.buf.len() >= FLUSH_AT || self.encoded_pages - self.disk_pages >= PAGES_FLUSH_AT
            {
                self.flush_buf()?;
            }
        }
        Ok(())
    }

    fn encode(&mut self, mut p: PagemapEntry) {
        let ps = self.page_size as u64;
        while p.pages > 0 {
            let part = PagemapEntry {
                pages: p.pages.min(MAX_ENTRY_PAGES),
                ..p
            };
            encode_entry(&part, &mut self.buf);
            self.summary.entries += 1;
            if part.flags.contains(PageFlags::PRESENT) {
                self.encoded_pages += part.pages * ps;
            }
            p.pages -= part.pages;
            p.vaddr += part.pages * ps;
        }
    }

    /// Writes the buffered messages; on failure, cuts the pagemap back to what was on
    /// disk, so that it still ends on a whole message, and the pages file back to the
    /// pages of those entries.
    fn flush_buf(&mut self) -> Result<(), ImageError> {
        if self.buf.is_empty() || self.failed {
            return Ok(());
        }
        match write_all_at(&self.pagemap, &self.buf, self.on_disk) {
            Ok(()) => {
                self.on_disk += self.buf.len() as u64;
                self.disk_pages = self.encoded_pages;
                self.buf.clear();
                Ok(())
            }
            Err(error) => {
                let _ = self.pagemap.set_len(self.on_disk);
                let _ = self.pages.set_len(self.disk_pages);
                self.buf.clear();
                self.failed = true;
                Err(ImageError::Io {
                    path: self.pagemap_path.clone(),
                    op: "write the pagemap",
                    error,
                })
            }
        }
    }

    fn flush_all(&mut self) -> Result<(), ImageError> {
        if let Some(p) = self.pending.take() {
            self.encode(p);
        }
        self.flush_buf()
    }

    /// Writes what is pending and returns what the image holds.
    ///
    /// # Errors
    /// [`ImageError::Io`] naming the pagemap image.
    pub fn finish(mut self) -> Result<ImageSummary, ImageError> {
        self.finished = true;
        self.flush_all()?;
        if self.failed {
            return Err(ImageError::Io {
                path: self.pagemap_path.clone(),
                op: "finish",
                error: io::Error::other(
                    "an earlier write failed; the image holds its entries up to it",
                ),
            });
        }
        self.summary.pagemap_bytes = self.on_disk;
        Ok(self.summary)
    }

    /// What has been written so far (entries still pending are not counted).
    pub fn summary(&self) -> ImageSummary {
        self.summary
    }
}

impl Drop for ImageWriter {
    /// Writes what is pending, so that an image whose writer is dropped without
    /// [`finish`](ImageWriter::finish) (after an error, say) is still a valid prefix.
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.flush_all();
        }
    }
}
