//! [`Image`]: an image directory opened for reading, with its parent chain.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::{FileOp, ImageError, io_err};
use super::files::{check_entry, open_regular, read_exact_at};
use super::{
    MAX_PAGEMAP_BYTES, MAX_PARENT_DEPTH, PageFlags, Pagemap, PagemapEntry, pagemap_name, pages_name,
};

/// Finds the one `pagemap-<id>.img` in `dir` and returns its id. Names are only listed,
/// never followed or opened: one that is not a regular file is an error.
fn find_pagemap(dir: &Path) -> Result<u64, ImageError> {
    let mut ids = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(io_err(dir, FileOp::ListDir))? {
        let ent = ent.map_err(io_err(dir, FileOp::ListDir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name
            .strip_prefix("pagemap-")
            .and_then(|s| s.strip_suffix(".img"))
            .and_then(|s| s.parse::<u64>().ok())
            // Only the name the id is written as: `pagemap-+1.img` or `pagemap-01.img`
            // would be taken for `pagemap-1.img`, a file that may not be there.
            .filter(|&id| name == pagemap_name(id))
        {
            let t = ent.file_type().map_err(io_err(&ent.path(), FileOp::Stat))?;
            check_entry(&ent.path(), t)?;
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

/// Which file a name held: its device and inode.
type FileId = (u64, u64);

/// Whether `path` (not followed) is the file `id`.
fn still_there(path: &Path, id: FileId) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// How many times [`Image::open`] tries an image that is replaced while it opens it.
const OPEN_TRIES: usize = 8;

/// Reads a whole pagemap image, bounded: a regular file of at most
/// [`MAX_PAGEMAP_BYTES`], read by its size, never past it. Returns its bytes and which
/// file it was.
fn read_pagemap(path: &Path) -> Result<(Vec<u8>, FileId), ImageError> {
    let (file, size) = open_regular(path)?;
    let meta = file.metadata().map_err(io_err(path, FileOp::Stat))?;
    let id = (meta.dev(), meta.ino());
    if size > MAX_PAGEMAP_BYTES {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    let mut bytes = vec![0u8; size as usize];
    read_exact_at(&file, path, &mut bytes, 0)?;
    Ok((bytes, id))
}

/// Where a page is, as [`Image::page`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// In a pages file: that of the image `depth` parents up (0: this image; see
    /// [`Image::ancestor`]), at byte `offset`.
    Data {
        /// How many parents up the chain it is.
        depth: usize,
        /// Its byte offset in that image's pages file.
        offset: u64,
    },
    /// In no entry: the page was never captured and reads as zeros.
    Zero,
    /// In a `LAZY` entry without `PRESENT`: a lazy-pages server holds it, not the image.
    Lazy,
}

/// An image directory opened for reading, with its parent chain.
///
/// Opening reads and checks each pagemap and keeps each pages file open; pages are read
/// with positional reads (`pread`) when asked for, never mapped, so another process that
/// truncates or rewrites a file while the image is open makes a read return an error
/// ([`ImageError::ShortRead`]) or the new bytes, nothing worse. See the
/// [module rules](super) for what it accepts.
///
/// ```
/// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
/// let dir = std::env::temp_dir().join(format!("pp-doc-image-{}", std::process::id()));
/// let ps = page_pipe_sys::page_size().get();
/// let mut w = ImageWriter::create(&dir, 1)?;
/// let e = PagemapEntry { vaddr: 0x10000 * ps as u64, pages: 2, flags: PageFlags::PRESENT };
/// w.push_bytes(e, &vec![7u8; 2 * ps])?;
/// w.finish()?;
///
/// let img = Image::open(&dir)?;
/// let mut buf = vec![0u8; 3 * ps];
/// let report = img.read(e.vaddr, &mut buf)?;
/// assert_eq!((report.present, report.zero), (2, 1));
/// assert!(buf[..2 * ps].iter().all(|&b| b == 7) && buf[2 * ps..].iter().all(|&b| b == 0));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), page_pipe::image::ImageError>(())
/// ```
#[derive(Debug)]
pub struct Image {
    dir: PathBuf,
    id: u64,
    pagemap_path: PathBuf,
    pages_path: PathBuf,
    page_size: usize,
    pagemap: Pagemap,
    /// Byte offset in the pages file of each entry's first page (present entries).
    pub(super) offsets: Vec<u64>,
    /// The pages file, kept open; `None` when no entry is present.
    pub(super) pages: Option<File>,
    parent: Option<Box<Image>>,
}

impl Image {
    /// Opens the image in `dir` (the one `pagemap-*.img` there) and its parents.
    ///
    /// # Errors
    /// [`ImageError`] naming the file and entry at fault.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ImageError> {
        let dir = dir.as_ref();
        Self::retried(|| Self::open_id_once(dir, find_pagemap(dir)?))
    }

    /// Runs `open` again while the image it opens is replaced under it (a writer
    /// committing over it), at most [`OPEN_TRIES`] times.
    fn retried(mut open: impl FnMut() -> Result<Self, ImageError>) -> Result<Self, ImageError> {
        let mut tries = 1;
        loop {
            match open() {
                Err(ImageError::Replaced { .. }) if tries < OPEN_TRIES => tries += 1,
                r => return r,
            }
        }
    }

    fn open_id_once(dir: &Path, id: u64) -> Result<Self, ImageError> {
        let page_size = page_pipe_sys::page_size().get();
        let mut seen = Vec::new();
        Self::open_chain(dir, Some(id), page_size, &mut seen)
    }

    /// Opens `pagemap-<id>.img` in `dir` and its parents.
    ///
    /// # Errors
    /// [`ImageError`] naming the file and entry at fault.
    pub fn open_id(dir: impl AsRef<Path>, id: u64) -> Result<Self, ImageError> {
        let dir = dir.as_ref();
        Self::retried(|| Self::open_id_once(dir, id))
    }

    fn open_chain(
        dir: &Path,
        id: Option<u64>,
        page_size: usize,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Self, ImageError> {
        let canon = dir.canonicalize().map_err(io_err(dir, FileOp::OpenDir))?;
        if seen.contains(&canon) || seen.len() >= MAX_PARENT_DEPTH {
            return Err(ImageError::ParentLoop {
                dir: dir.to_path_buf(),
            });
        }
        seen.push(canon.clone());
        // A parent holds the same id as its child when CRIU wrote both; else its one.
        let id = match id {
            Some(id)
                if seen.len() == 1
                    || std::fs::symlink_metadata(dir.join(pagemap_name(id))).is_ok() =>
            {
                id
            }
            _ => find_pagemap(dir)?,
        };
        let pagemap_path = dir.join(pagemap_name(id));
        let (bytes, pagemap_id) = read_pagemap(&pagemap_path)?;
        let pagemap = Pagemap::decode(&bytes, page_size).map_err(|at| ImageError::Format {
            path: pagemap_path.clone(),
            at,
        })?;
        drop(bytes);
        let opened = Self::open_rest(
            dir,
            &canon,
            id,
            pagemap_path.clone(),
            pagemap,
            page_size,
            seen,
        );
        // A writer committing over this image removes the old pagemap before it renames
        // anything else into place (`ImageWriter::finish`): if the pagemap read is still
        // under its name, the pages file and the parent link opened since are its own
        // (and an error met opening them is the image's); if not, they may be the new
        // image's, and the image is opened again.
        if still_there(&pagemap_path, pagemap_id) {
            return opened;
        }
        Err(ImageError::Replaced { path: pagemap_path })
    }

    /// The rest of [`open_chain`](Self::open_chain), once the pagemap is read: the pages
    /// file and the parent chain.
    #[allow(clippy::too_many_arguments)]
    fn open_rest(
        dir: &Path,
        canon: &Path,
        id: u64,
        pagemap_path: PathBuf,
        pagemap: Pagemap,
        page_size: usize,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Self, ImageError> {
        let pages_path = dir.join(pages_name(pagemap.pages_id));
        let needed = pagemap
            .present_bytes(page_size)
            .ok_or(ImageError::PagesSize {
                path: pages_path.clone(),
                needed: u64::MAX,
                actual: 0,
            })?;
        let (pages, actual) = match open_regular(&pages_path) {
            Ok((f, size)) => (Some(f), size),
            Err(ImageError::Io { error, .. })
                if error.kind() == io::ErrorKind::NotFound && needed == 0 =>
            {
                (None, 0)
            }
            Err(e) => return Err(e),
        };
        if actual != needed {
            return Err(ImageError::PagesSize {
                path: pages_path,
                needed,
                actual,
            });
        }
        let mut offsets = Vec::with_capacity(pagemap.entries.len());
        let mut off = 0u64;
        for e in &pagemap.entries {
            offsets.push(off);
            if e.is_present() {
                off += e.pages * page_size as u64;
            }
        }
        let first_parent = pagemap
            .entries
            .iter()
            .find(|e| e.flags.contains(PageFlags::PARENT))
            .copied();
        // `parent` is a link to a directory (CRIU makes it so): followed, the chain
        // bounded by `seen`.
        let link = dir.join("parent");
        // Followed from this directory's resolved path, so that each lookup passes one
        // link however deep the chain (the kernel follows at most 40 in one lookup).
        let parent = match std::fs::symlink_metadata(&link) {
            Ok(_) => match Self::open_chain(&canon.join("parent"), Some(id), page_size, seen) {
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
            id,
            pagemap_path,
            pages_path,
            page_size,
            pagemap,
            offsets,
            pages,
            parent,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pagemap's id: this image is `pagemap-<id>.img` (in CRIU, the id of the dumped
    /// process).
    ///
    /// ```
    /// # use page_pipe::image::{Image, ImageWriter};
    /// # let dir = std::env::temp_dir().join(format!("pp-doc-id-{}", std::process::id()));
    /// ImageWriter::create(&dir, 42)?.finish()?;
    /// assert_eq!(Image::open(&dir)?.id(), 42);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The pagemap image's path.
    pub fn pagemap_path(&self) -> &Path {
        &self.pagemap_path
    }

    /// The pages file's path.
    pub fn pages_path(&self) -> &Path {
        &self.pages_path
    }

    /// The pages file, kept open (`None` when no entry is present), for restores that
    /// move the bytes their own way (`vm`, `lazy`).
    pub(crate) fn pages_file(&self) -> Option<&File> {
        self.pages.as_ref()
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

    /// The image `depth` parents up the chain (0: this one), as [`Page::Data`] and
    /// [`SegmentKind::Pages`](super::SegmentKind::Pages) name it.
    pub fn ancestor(&self, depth: usize) -> Option<&Image> {
        let mut img = self;
        for _ in 0..depth {
            img = img.parent.as_deref()?;
        }
        Some(img)
    }

    /// The number of images in the chain, this one included.
    pub fn depth(&self) -> usize {
        1 + self.parent.as_ref().map_or(0, |p| p.depth())
    }

    /// The page size the image is read with.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The index of the entry holding `vaddr`, if one does.
    pub(super) fn entry_at(&self, vaddr: u64) -> Result<usize, usize> {
        let ps = self.page_size as u64;
        let i = self
            .entries()
            .partition_point(|e| e.vaddr + e.pages * ps <= vaddr);
        match self.entries().get(i) {
            Some(e) if e.vaddr <= vaddr => Ok(i),
            _ => Err(i),
        }
    }

    /// Where the page at `vaddr` is, through the parent chain. Reads nothing; see
    /// [`read_page`](Self::read_page) for the bytes.
    ///
    /// # Errors
    /// [`ImageError::NotInParent`] for a `PARENT` page the parent lacks;
    /// [`ImageError::BadRange`] for an unaligned address.
    pub fn page(&self, vaddr: u64) -> Result<Page, ImageError> {
        if crate::addr::PageRange::new(vaddr, 1, self.page_size).is_err() {
            return Err(ImageError::BadRange {
                vaddr,
                len: self.page_size as u64,
            });
        }
        let mut img = self;
        let mut depth = 0;
        loop {
            let Ok(i) = img.entry_at(vaddr) else {
                if depth == 0 {
                    return Ok(Page::Zero);
                }
                return Err(ImageError::NotInParent {
                    path: img.pagemap_path.clone(),
                    vaddr,
                });
            };
            let e = img.entries()[i];
            if e.is_present() {
                let offset = img.offsets[i] + (vaddr - e.vaddr);
                return Ok(Page::Data { depth, offset });
            }
            if !e.flags.contains(PageFlags::PARENT) {
                return Ok(Page::Lazy);
            }
            img = img.parent.as_deref().expect("checked at open");
            depth += 1;
        }
    }

    /// Reads the page at `vaddr` into `dst` (one page long) and says where it was: from
    /// a pages file, or zeros for a page in no entry or a lazy one.
    ///
    /// ```
    /// # use page_pipe::image::{Image, ImageWriter, Page, PageFlags, PagemapEntry};
    /// # let dir = std::env::temp_dir().join(format!("pp-doc-page-{}", std::process::id()));
    /// # let ps = page_pipe_sys::page_size().get();
    /// # let mut w = ImageWriter::create(&dir, 1)?;
    /// # let e = PagemapEntry { vaddr: 0x4000 * ps as u64, pages: 1, flags: PageFlags::PRESENT };
    /// # w.push_bytes(e, &vec![9u8; ps])?;
    /// # w.finish()?;
    /// let img = Image::open(&dir)?;
    /// let mut page = vec![0u8; img.page_size()];
    /// assert_eq!(img.read_page(e.vaddr, &mut page)?, Page::Data { depth: 0, offset: 0 });
    /// assert!(page.iter().all(|&b| b == 9));
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    ///
    /// # Errors
    /// As [`page`](Self::page); [`ImageError::BadRange`] when `dst` is not one page;
    /// [`ImageError::ShortRead`] or [`ImageError::Io`] when the pages file cannot be
    /// read.
    pub fn read_page(&self, vaddr: u64, dst: &mut [u8]) -> Result<Page, ImageError> {
        if dst.len() != self.page_size {
            return Err(ImageError::BadRange {
                vaddr,
                len: dst.len() as u64,
            });
        }
        let page = self.page(vaddr)?;
        match page {
            Page::Data { depth, offset } => {
                let img = self.ancestor(depth).expect("page() found it");
                let file = img.pages.as_ref().expect("present pages have a file");
                read_exact_at(file, &img.pages_path, dst, offset)?;
            }
            Page::Zero | Page::Lazy => dst.fill(0),
        }
        Ok(page)
    }
}
