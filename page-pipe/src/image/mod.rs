//! CRIU-compatible images: write them, read them back, restore memory through the parent
//! chain.
//!
//! An image directory holds `pagemap-<id>.img` (the image magic `0x54564319`, the pagemap
//! magic `0x56084025`, then u32-length-prefixed protobuf messages: one `pagemap_head`,
//! then `pagemap_entry`s in address order) and `pages-<pages_id>.img` (the present pages,
//! raw, in entry order). An incremental snapshot has a `parent` symlink to its parent's
//! directory; its `PARENT` entries are found there.
//!
//! # Rules
//!
//! - Entries are page-aligned, non-empty, ascending and do not overlap; their flags are
//!   `PRESENT`, `LAZY`, `LAZY | PRESENT` or `PARENT`.
//! - The pages file holds exactly the present pages of the entries.
//! - [`ImageWriter`] writes each entry's page count in both `compat_nr_pages` (field 2,
//!   which older CRIU and `crit` read) and `nr_pages` (field 5, which CRIU 4.x reads),
//!   splitting entries of more than `u32::MAX` pages. It joins contiguous entries with
//!   equal flags, so a capture made in chunks writes the same image as one made in one
//!   pass. A pages write that fails is cut back, so the files on disk always hold a
//!   valid prefix: every entry written can be read back with its pages.
//! - [`Image::open`] checks all of the above and follows the parent chain, refusing a
//!   chain that loops or a `PARENT` entry without a parent.

mod format;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use page_pipe_sys::{SpliceFlags, Stopped};

pub use format::{
    FormatAt, FormatError, IMG_COMMON_MAGIC, PAGEMAP_MAGIC, PageFlags, Pagemap, PagemapEntry,
};
use format::{MAX_ENTRY_PAGES, encode_entry, encode_head};

/// The deepest parent chain [`Image::open`] follows.
pub const MAX_PARENT_DEPTH: usize = 64;

/// What went wrong with an image, and in which file.
#[derive(Debug)]
#[non_exhaustive]
pub enum ImageError {
    /// A file could not be opened, read, written or made.
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        error: io::Error,
    },
    /// The pagemap image is malformed.
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        at: FormatAt,
    },
    /// The directory holds no `pagemap-*.img`, or several when no id was given.
    NoPagemap {
        /// The directory.
        dir: PathBuf,
        /// How many pagemap images it holds.
        found: usize,
    },
    /// The pages file does not hold exactly the pages the entries need.
    PagesSize {
        /// The pages file.
        path: PathBuf,
        /// Bytes the present entries need.
        needed: u64,
        /// Bytes the file holds.
        actual: u64,
    },
    /// An entry's pages are in the parent, and there is no parent.
    MissingParent {
        /// The pagemap image.
        path: PathBuf,
        /// The first `PARENT` entry.
        entry: PagemapEntry,
        /// What was wrong with the parent link, if there is one.
        link: Option<io::Error>,
    },
    /// The parent chain comes back to a directory it passed, or is deeper than
    /// [`MAX_PARENT_DEPTH`].
    ParentLoop {
        /// The directory met again (or the deepest one).
        dir: PathBuf,
    },
    /// A `PARENT` page is in no entry of the parent.
    NotInParent {
        /// The parent's pagemap image.
        path: PathBuf,
        /// The page.
        vaddr: u64,
    },
    /// Entries must be added in ascending, non-overlapping, aligned order.
    Order {
        /// The pagemap image being written.
        path: PathBuf,
        /// The entry refused.
        entry: PagemapEntry,
    },
    /// A read asked for a range that is not page-aligned or passes the end of the
    /// address space.
    BadRange {
        /// The address.
        vaddr: u64,
        /// The length in bytes.
        len: usize,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Io { path, op, error } => {
                write!(f, "{}: cannot {op}: {error}", path.display())
            }
            ImageError::Format { path, at } => write!(f, "{}: {at}", path.display()),
            ImageError::NoPagemap { dir, found } => write!(
                f,
                "{}: expected one pagemap-*.img, found {found}",
                dir.display()
            ),
            ImageError::PagesSize {
                path,
                needed,
                actual,
            } => write!(
                f,
                "{}: holds {actual} bytes, the entries need {needed}",
                path.display()
            ),
            ImageError::MissingParent { path, entry, link } => {
                write!(
                    f,
                    "{}: entry {entry} is in the parent, but there is no parent",
                    path.display()
                )?;
                match link {
                    Some(e) => write!(f, " (parent link: {e})"),
                    None => f.write_str(" (no parent link)"),
                }
            }
            ImageError::ParentLoop { dir } => write!(
                f,
                "{}: the parent chain loops or is deeper than {MAX_PARENT_DEPTH}",
                dir.display()
            ),
            ImageError::NotInParent { path, vaddr } => write!(
                f,
                "{}: page {vaddr:#x} is marked in the parent, but the parent has no entry for it",
                path.display()
            ),
            ImageError::Order { path, entry } => write!(
                f,
                "{}: entry {entry} is out of order, overlapping or unaligned",
                path.display()
            ),
            ImageError::BadRange { vaddr, len } => write!(
                f,
                "range of {len} bytes at {vaddr:#x} is not whole pages in the address space"
            ),
        }
    }
}

impl std::error::Error for ImageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ImageError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |error| ImageError::Io {
        path: path.to_path_buf(),
        op,
        error,
    }
}

/// The name of the pagemap image with id `id`.
pub fn pagemap_name(id: u64) -> String {
    format!("pagemap-{id}.img")
}

/// The name of the pages file with id `pages_id`.
pub fn pages_name(pages_id: u32) -> String {
    format!("pages-{pages_id}.img")
}

/// Finds the one `pagemap-<id>.img` in `dir` and returns its id.
fn find_pagemap(dir: &Path) -> Result<u64, ImageError> {
    let mut ids = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(io_err(dir, "list the directory"))? {
        let ent = ent.map_err(io_err(dir, "list the directory"))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name
            .strip_prefix("pagemap-")
            .and_then(|s| s.strip_suffix(".img"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            ids.push(id);
        }
    }
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => Err(ImageError::NoPagemap {
            dir: dir.to_path_buf(),
            found: ids.len(),
        }),
    }
}

/// Where a page is, as [`Image::page`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page<'a> {
    /// The page's bytes, from the image `depth` parents up (0: this image).
    Data {
        /// The bytes.
        bytes: &'a [u8],
        /// How many parents up the chain they were found.
        depth: usize,
    },
    /// In no entry: the page was never captured and reads as zeros.
    Zero,
    /// In a `LAZY` entry without `PRESENT`: a lazy-pages server holds it, not the image.
    Lazy,
}

/// What [`Image::read`] found, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadReport {
    /// Pages read from this image's pages file.
    pub present: u64,
    /// Pages read from a parent's pages file.
    pub from_parents: u64,
    /// Pages in no entry, filled with zeros.
    pub zero: u64,
    /// Pages only a lazy-pages server has, filled with zeros.
    pub lazy: u64,
}

/// An image directory opened for reading, with its parent chain.
///
/// The pages file is mapped, not read: opening costs what the pagemap costs. The files
/// must not be changed while the image is open.
///
/// ```no_run
/// use page_pipe::image::Image;
/// let img = Image::open("snapshots/2")?;
/// let mut buf = vec![0u8; 4096];
/// let report = img.read(0x7f00_0000_0000, &mut buf)?;
/// println!("{report:?}");
/// # Ok::<(), page_pipe::image::ImageError>(())
/// ```
#[derive(Debug)]
pub struct Image {
    dir: PathBuf,
    pagemap_path: PathBuf,
    pages_path: PathBuf,
    page_size: usize,
    pagemap: Pagemap,
    /// Byte offset in the pages file of each entry's first page (present entries).
    offsets: Vec<u64>,
    /// Entry ends, for lookups.
    ends: Vec<u64>,
    pages: Option<Mmap>,
    parent: Option<Box<Image>>,
}

impl Image {
    /// Opens the image in `dir` (the one `pagemap-*.img` there) and its parents.
    ///
    /// # Errors
    /// [`ImageError`] naming the file and entry at fault.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ImageError> {
        let dir = dir.as_ref();
        let id = find_pagemap(dir)?;
        Self::open_id(dir, id)
    }

    /// Opens `pagemap-<id>.img` in `dir` and its parents.
    ///
    /// # Errors
    /// [`ImageError`] naming the file and entry at fault.
    pub fn open_id(dir: impl AsRef<Path>, id: u64) -> Result<Self, ImageError> {
        let page_size = page_pipe_sys::page_size().get();
        let mut seen = Vec::new();
        Self::open_chain(dir.as_ref(), Some(id), page_size, &mut seen)
    }

    fn open_chain(
        dir: &Path,
        id: Option<u64>,
        page_size: usize,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Self, ImageError> {
        let canon = dir
            .canonicalize()
            .map_err(io_err(dir, "open the directory"))?;
        if seen.contains(&canon) || seen.len() >= MAX_PARENT_DEPTH {
            return Err(ImageError::ParentLoop {
                dir: dir.to_path_buf(),
            });
        }
        seen.push(canon);
        let id = match id {
            Some(id) if dir.join(pagemap_name(id)).exists() || seen.len() == 1 => id,
            _ => find_pagemap(dir)?,
        };
        let pagemap_path = dir.join(pagemap_name(id));
        let bytes = std::fs::read(&pagemap_path).map_err(io_err(&pagemap_path, "read"))?;
        let pagemap = Pagemap::decode(&bytes, page_size).map_err(|at| ImageError::Format {
            path: pagemap_path.clone(),
            at,
        })?;
        drop(bytes);
        let pages_path = dir.join(pages_name(pagemap.pages_id));
        let needed = pagemap
            .present_bytes(page_size)
            .ok_or(ImageError::PagesSize {
                path: pages_path.clone(),
                needed: u64::MAX,
                actual: 0,
            })?;
        let pages = match File::open(&pages_path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && needed == 0 => None,
            Err(e) => return Err(io_err(&pages_path, "open")(e)),
        };
        let actual = match &pages {
            Some(f) => f.metadata().map_err(io_err(&pages_path, "stat"))?.len(),
            None => 0,
        };
        if actual != needed {
            return Err(ImageError::PagesSize {
                path: pages_path,
                needed,
                actual,
            });
        }
        let pages = match pages {
            Some(f) if actual > 0 => {
                Some(crate::source::map_readonly(&f).map_err(io_err(&pages_path, "map"))?)
            }
            _ => None,
        };
        let mut offsets = Vec::with_capacity(pagemap.entries.len());
        let mut ends = Vec::with_capacity(pagemap.entries.len());
        let mut off = 0u64;
        for e in &pagemap.entries {
            offsets.push(off);
            ends.push(e.end(page_size).expect("checked by decode"));
            if e.is_present() {
                off += e.pages * page_size as u64;
            }
        }
        let first_parent = pagemap
            .entries
            .iter()
            .find(|e| e.flags.contains(PageFlags::PARENT))
            .copied();
        let link = dir.join("parent");
        let parent = match std::fs::symlink_metadata(&link) {
            Ok(_) => match Self::open_chain(&link, Some(id), page_size, seen) {
                Ok(p) => Some(Box::new(p)),
                Err(ImageError::Io { error, .. }) if first_parent.is_some() => {
                    return Err(ImageError::MissingParent {
                        path: pagemap_path,
                        entry: first_parent.expect("checked"),
                        link: Some(error),
                    });
                }
                Err(ImageError::Io { .. }) => None,
                Err(e) => return Err(e),
            },
            Err(_) => match first_parent {
                Some(entry) => {
                    return Err(ImageError::MissingParent {
                        path: pagemap_path,
                        entry,
                        link: None,
                    });
                }
                None => None,
            },
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            pagemap_path,
            pages_path,
            page_size,
            pagemap,
            offsets,
            ends,
            pages,
            parent,
        })
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

    /// The decoded pagemap.
    pub fn pagemap(&self) -> &Pagemap {
        &self.pagemap
    }

    /// The entries, in address order.
    pub fn entries(&self) -> &[PagemapEntry] {
        &self.pagemap.entries
    }

    /// The parent image, if this one is incremental.
    pub fn parent(&self) -> Option<&Image> {
        self.parent.as_deref()
    }

    /// The number of images in the chain, this one included.
    pub fn depth(&self) -> usize {
        1 + self.parent.as_ref().map_or(0, |p| p.depth())
    }

    /// The page size the image is read with.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Where the page at `vaddr` is, through the parent chain.
    ///
    /// # Errors
    /// [`ImageError::NotInParent`] for a `PARENT` page the parent lacks;
    /// [`ImageError::BadRange`] for an unaligned address.
    pub fn page(&self, vaddr: u64) -> Result<Page<'_>, ImageError> {
        if vaddr % self.page_size as u64 != 0 {
            return Err(ImageError::BadRange {
                vaddr,
                len: self.page_size,
            });
        }
        self.page_at(vaddr, 0)
    }

    fn page_at(&self, vaddr: u64, depth: usize) -> Result<Page<'_>, ImageError> {
        let i = self.ends.partition_point(|&end| end <= vaddr);
        let Some(e) = self.entries().get(i).filter(|e| e.vaddr <= vaddr) else {
            return Ok(if depth == 0 {
                Page::Zero
            } else {
                return Err(ImageError::NotInParent {
                    path: self.pagemap_path.clone(),
                    vaddr,
                });
            });
        };
        if e.is_present() {
            let off = (self.offsets[i] + (vaddr - e.vaddr)) as usize;
            let bytes =
                &self.pages.as_ref().expect("present pages are mapped")[off..off + self.page_size];
            Ok(Page::Data { bytes, depth })
        } else if e.flags.contains(PageFlags::PARENT) {
            self.parent
                .as_ref()
                .expect("checked at open")
                .page_at(vaddr, depth + 1)
        } else {
            Ok(Page::Lazy)
        }
    }

    /// Reads `dst.len()` bytes (whole pages) from `vaddr` through the parent chain. Pages
    /// in no entry, and lazy pages the image does not hold, read as zeros; the report
    /// counts them.
    ///
    /// # Errors
    /// [`ImageError::BadRange`] for an unaligned range; [`ImageError::NotInParent`].
    pub fn read(&self, vaddr: u64, dst: &mut [u8]) -> Result<ReadReport, ImageError> {
        let ps = self.page_size;
        let bad = ImageError::BadRange {
            vaddr,
            len: dst.len(),
        };
        if vaddr % ps as u64 != 0 || dst.len() % ps != 0 {
            return Err(bad);
        }
        if vaddr.checked_add(dst.len() as u64).is_none() {
            return Err(bad);
        }
        let mut report = ReadReport::default();
        self.read_at(vaddr, dst, 0, &mut report)?;
        Ok(report)
    }

    fn read_at(
        &self,
        vaddr: u64,
        dst: &mut [u8],
        depth: usize,
        report: &mut ReadReport,
    ) -> Result<(), ImageError> {
        let ps = self.page_size as u64;
        let end = vaddr + dst.len() as u64;
        let mut at = vaddr;
        let mut i = self.ends.partition_point(|&e| e <= at);
        while at < end {
            let out = &mut dst[(at - vaddr) as usize..];
            let entry = self.entries().get(i).filter(|e| e.vaddr < end);
            match entry {
                Some(e) if e.vaddr <= at => {
                    let span = (self.ends[i].min(end) - at) as usize;
                    let out = &mut out[..span];
                    if e.is_present() {
                        let off = (self.offsets[i] + (at - e.vaddr)) as usize;
                        let src = self.pages.as_ref().expect("present pages are mapped");
                        out.copy_from_slice(&src[off..off + span]);
                        if depth == 0 {
                            report.present += span as u64 / ps;
                        } else {
                            report.from_parents += span as u64 / ps;
                        }
                    } else if e.flags.contains(PageFlags::PARENT) {
                        let parent = self.parent.as_ref().expect("checked at open");
                        parent.read_at(at, out, depth + 1, report)?;
                    } else {
                        out.fill(0);
                        report.lazy += span as u64 / ps;
                    }
                    at += span as u64;
                    i += 1;
                }
                _ => {
                    if depth > 0 {
                        return Err(ImageError::NotInParent {
                            path: self.pagemap_path.clone(),
                            vaddr: at,
                        });
                    }
                    let stop = entry.map_or(end, |e| e.vaddr);
                    let span = (stop - at) as usize;
                    out[..span].fill(0);
                    report.zero += span as u64 / ps;
                    at = stop;
                }
            }
        }
        Ok(())
    }
}

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
/// [module rules](self) for what it guarantees when a write fails.
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

fn write_all_at(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while !buf.is_empty() {
        match file.write_at(buf, off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
