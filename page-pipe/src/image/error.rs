//! [`ImageError`]: what went wrong with an image, and in which file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::{FormatAt, MAX_PAGEMAP_BYTES, MAX_PARENT_DEPTH, PagemapEntry};

/// What a file found where an image file should be is, when it is not a regular file.
///
/// ```
/// use page_pipe::image::FileKind;
/// assert_eq!(FileKind::Fifo.to_string(), "a FIFO");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileKind {
    /// A directory.
    Directory,
    /// A named pipe: reading it would wait for a writer.
    Fifo,
    /// A character device, such as `/dev/zero`.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A Unix socket.
    Socket,
    /// A symbolic link.
    Symlink,
    /// Something else.
    Other,
}

impl FileKind {
    /// The kind of a file of type `t` (as `lstat` or `fstat` tells it).
    pub(crate) fn of(t: std::fs::FileType) -> Self {
        use std::os::unix::fs::FileTypeExt;
        if t.is_dir() {
            FileKind::Directory
        } else if t.is_fifo() {
            FileKind::Fifo
        } else if t.is_char_device() {
            FileKind::CharDevice
        } else if t.is_block_device() {
            FileKind::BlockDevice
        } else if t.is_socket() {
            FileKind::Socket
        } else if t.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::Other
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Directory => "a directory",
            FileKind::Fifo => "a FIFO",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Socket => "a socket",
            FileKind::Symlink => "a symbolic link",
            FileKind::Other => "not a regular file",
        })
    }
}

/// What was being done with a file when an [`ImageError::Io`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileOp {
    /// Opening it.
    Open,
    /// Reading it.
    Read,
    /// Reading its metadata.
    Stat,
    /// Creating it (under a temporary name).
    Create,
    /// Writing pages into it.
    WritePages,
    /// Writing the pagemap.
    WritePagemap,
    /// Copying pages from it.
    CopyFrom,
    /// Syncing it to disk.
    Sync,
    /// Syncing the directory.
    SyncDir,
    /// Giving it its final name (the commit).
    Commit,
    /// Removing it.
    Remove,
    /// Removing the old pagemap it replaces.
    RemoveOldPagemap,
    /// Removing the old `parent` link.
    RemoveOldLink,
    /// Making the `parent` link.
    MakeLink,
    /// Making the directory.
    MakeDir,
    /// Opening the directory.
    OpenDir,
    /// Listing the directory.
    ListDir,
    /// Finding the directory.
    FindDir,
    /// Finding the parent directory.
    FindParentDir,
    /// Mapping it.
    Map,
}

impl fmt::Display for FileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileOp::Open => "open",
            FileOp::Read => "read",
            FileOp::Stat => "stat",
            FileOp::Create => "create",
            FileOp::WritePages => "write pages",
            FileOp::WritePagemap => "write the pagemap",
            FileOp::CopyFrom => "copy pages from",
            FileOp::Sync => "sync",
            FileOp::SyncDir => "sync the directory",
            FileOp::Commit => "commit",
            FileOp::Remove => "remove",
            FileOp::RemoveOldPagemap => "remove the old pagemap",
            FileOp::RemoveOldLink => "remove the old link",
            FileOp::MakeLink => "make the link",
            FileOp::MakeDir => "make the directory",
            FileOp::OpenDir => "open the directory",
            FileOp::ListDir => "list the directory",
            FileOp::FindDir => "find the directory",
            FileOp::FindParentDir => "find the parent directory",
            FileOp::Map => "map",
        })
    }
}

/// What went wrong with an image, and in which file.
///
/// ```
/// use page_pipe::image::{FileKind, Image, ImageError};
/// let dir = std::env::temp_dir().join(format!("pp-doc-error-{}", std::process::id()));
/// // A directory where the pagemap image should be: refused, not read.
/// std::fs::create_dir_all(dir.join("pagemap-1.img"))?;
/// match Image::open(&dir) {
///     Err(ImageError::NotRegular { path, kind: FileKind::Directory }) => {
///         assert!(path.ends_with("pagemap-1.img"))
///     }
///     other => panic!("{other:?}"),
/// }
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum ImageError {
    /// A file could not be opened, read, written or made.
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: FileOp,
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
    /// An image file is a symbolic link. Image files are never followed through links
    /// (only the directory link `parent` is).
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// An image file is not a regular file (a FIFO, a device, a socket, a directory).
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: FileKind,
    },
    /// The pagemap image is larger than [`MAX_PAGEMAP_BYTES`]; it is not read.
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
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
    /// A file ended before a byte that was there when it was opened: it was truncated
    /// while open.
    ShortRead {
        /// The file.
        path: PathBuf,
        /// The byte offset where it ended.
        offset: u64,
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
    /// A strict restore ([`RestoreOptions::strict`](super::RestoreOptions::strict)) met
    /// a page the image chain does not hold: in no entry, or in a `LAZY` entry without
    /// `PRESENT` (only a lazy-pages server has it).
    NotInImage {
        /// The pagemap image that lacks it.
        path: PathBuf,
        /// The first such page.
        vaddr: u64,
        /// Whether the page is in a lazy entry (else in no entry).
        lazy: bool,
    },
    /// Entries must be added in ascending, non-overlapping, aligned order.
    Order {
        /// The pagemap image being written.
        path: PathBuf,
        /// The entry refused.
        entry: PagemapEntry,
    },
    /// Restoring by mapping ([`Image::map_into`](super::Image::map_into)) would add more
    /// mappings than the process has room for below `vm.max_map_count` (or than
    /// [`MapOptions::max_mappings`](super::MapOptions::max_mappings) allows). Nothing was
    /// mapped. Flatten the image (fewer, longer runs) or restore it eagerly.
    TooManyMappings {
        /// Mappings the restore could add.
        needed: usize,
        /// Mappings it may add.
        available: usize,
        /// The limit counted against: `vm.max_map_count`, or the option.
        limit: usize,
    },
    /// A mapping of a restore by mapping failed. The destination was replaced up to the
    /// first `replaced` bytes of the plan's mapped segments: it holds neither its old
    /// contents nor the image.
    Map {
        /// The pages file mapped, or `None` for zeros (an anonymous mapping).
        path: Option<PathBuf>,
        /// The byte offset in that file.
        offset: u64,
        /// The address of the first page of the mapping.
        vaddr: u64,
        /// Its length in bytes.
        len: u64,
        /// Bytes of the destination already replaced by earlier mappings.
        replaced: u64,
        /// The error of `mmap`.
        error: io::Error,
    },
    /// A restore by mapping was given destination memory that is null or does not
    /// start on a page boundary.
    BadDestination {
        /// The memory's address.
        ptr: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// A read asked for a range that is not page-aligned or passes the end of the
    /// address space.
    BadRange {
        /// The address.
        vaddr: u64,
        /// The length in bytes.
        len: u64,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The I/O error is the source: callers print the chain.
            ImageError::Io { path, op, .. } => write!(f, "{}: cannot {op}", path.display()),
            ImageError::Format { path, at } => write!(f, "{}: {at}", path.display()),
            ImageError::NoPagemap { dir, found } => write!(
                f,
                "{}: expected one pagemap-*.img, found {found}",
                dir.display()
            ),
            ImageError::Symlink { path } => write!(
                f,
                "{}: is a symbolic link; image files are not followed through links",
                path.display()
            ),
            ImageError::NotRegular { path, kind } => write!(
                f,
                "{}: is {kind}, not a regular file; image files must be regular files",
                path.display()
            ),
            ImageError::TooLarge { path, size } => write!(
                f,
                "{}: {size} bytes is more than the {MAX_PAGEMAP_BYTES} a pagemap image may hold",
                path.display()
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
            ImageError::ShortRead { path, offset } => write!(
                f,
                "{}: ends at byte {offset}, before the pages the entries need (was it truncated while open?)",
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
            ImageError::NotInImage { path, vaddr, lazy } => {
                let why = if *lazy {
                    "is lazy (only a lazy-pages server holds it)"
                } else {
                    "is in no entry"
                };
                write!(
                    f,
                    "{}: page {vaddr:#x} {why}, and the restore is strict",
                    path.display()
                )
            }
            ImageError::Order { path, entry } => write!(
                f,
                "{}: entry {entry} is out of order, overlapping, unaligned or the wrong size",
                path.display()
            ),
            ImageError::BadRange { vaddr, len } => write!(
                f,
                "range of {len} bytes at {vaddr:#x} is not whole pages in the address space"
            ),
            ImageError::TooManyMappings {
                needed,
                available,
                limit,
            } => write!(
                f,
                "restoring by mapping could add {needed} mappings, and only {available} are free below the limit of {limit} (vm.max_map_count); flatten the image or restore it eagerly"
            ),
            ImageError::Map {
                path,
                offset,
                vaddr,
                len,
                replaced,
                ..
            } => {
                match path {
                    Some(p) => write!(
                        f,
                        "{}: cannot map {len} bytes from offset {offset} at page {vaddr:#x}",
                        p.display()
                    )?,
                    None => write!(f, "cannot map {len} bytes of zeros at page {vaddr:#x}")?,
                }
                write!(f, " ({replaced} bytes of the destination already replaced)")
            }
            ImageError::BadDestination { ptr, len } => write!(
                f,
                "destination memory of {len} bytes at {ptr:#x} is null or not page-aligned"
            ),
        }
    }
}

impl std::error::Error for ImageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ImageError::Io { error, .. } | ImageError::Map { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl ImageError {
    /// The same error again: `io::Error` is not `Clone`, so an I/O error is rebuilt from
    /// its errno (or its kind and message), which keeps what callers match on.
    pub(crate) fn duplicate(&self) -> ImageError {
        let io = |e: &io::Error| match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        };
        match self {
            ImageError::Io { path, op, error } => ImageError::Io {
                path: path.clone(),
                op: *op,
                error: io(error),
            },
            ImageError::Format { path, at } => ImageError::Format {
                path: path.clone(),
                at: at.clone(),
            },
            ImageError::NoPagemap { dir, found } => ImageError::NoPagemap {
                dir: dir.clone(),
                found: *found,
            },
            ImageError::Symlink { path } => ImageError::Symlink { path: path.clone() },
            ImageError::NotRegular { path, kind } => ImageError::NotRegular {
                path: path.clone(),
                kind: *kind,
            },
            ImageError::TooLarge { path, size } => ImageError::TooLarge {
                path: path.clone(),
                size: *size,
            },
            ImageError::PagesSize {
                path,
                needed,
                actual,
            } => ImageError::PagesSize {
                path: path.clone(),
                needed: *needed,
                actual: *actual,
            },
            ImageError::ShortRead { path, offset } => ImageError::ShortRead {
                path: path.clone(),
                offset: *offset,
            },
            ImageError::MissingParent { path, entry, link } => ImageError::MissingParent {
                path: path.clone(),
                entry: *entry,
                link: link.as_ref().map(io),
            },
            ImageError::ParentLoop { dir } => ImageError::ParentLoop { dir: dir.clone() },
            ImageError::NotInParent { path, vaddr } => ImageError::NotInParent {
                path: path.clone(),
                vaddr: *vaddr,
            },
            ImageError::NotInImage { path, vaddr, lazy } => ImageError::NotInImage {
                path: path.clone(),
                vaddr: *vaddr,
                lazy: *lazy,
            },
            ImageError::Order { path, entry } => ImageError::Order {
                path: path.clone(),
                entry: *entry,
            },
            ImageError::BadRange { vaddr, len } => ImageError::BadRange {
                vaddr: *vaddr,
                len: *len,
            },
            ImageError::TooManyMappings {
                needed,
                available,
                limit,
            } => ImageError::TooManyMappings {
                needed: *needed,
                available: *available,
                limit: *limit,
            },
            ImageError::Map {
                path,
                offset,
                vaddr,
                len,
                replaced,
                error,
            } => ImageError::Map {
                path: path.clone(),
                offset: *offset,
                vaddr: *vaddr,
                len: *len,
                replaced: *replaced,
                error: io(error),
            },
            ImageError::BadDestination { ptr, len } => ImageError::BadDestination {
                ptr: *ptr,
                len: *len,
            },
        }
    }
}

/// Wraps an I/O error with the file and what was being done.
pub(crate) fn io_err<'a>(path: &'a Path, op: FileOp) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |error| ImageError::Io {
        path: path.to_path_buf(),
        op,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_keeps_the_errno_and_the_message() {
        let e = ImageError::Io {
            path: "d/pages-1.img".into(),
            op: FileOp::WritePages,
            error: io::Error::from_raw_os_error(28),
        };
        let d = e.duplicate();
        assert_eq!(d.to_string(), e.to_string());
        let ImageError::Io { error, .. } = d else {
            panic!("{d}")
        };
        assert_eq!(error.raw_os_error(), Some(28));
        let e = ImageError::Io {
            path: "d/pages-1.img".into(),
            op: FileOp::WritePages,
            error: io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe held 3 bytes"),
        };
        let d = e.duplicate();
        assert_eq!(d.to_string(), e.to_string());
        assert!(
            matches!(&d, ImageError::Io { error, .. } if error.kind() == io::ErrorKind::UnexpectedEof)
        );
    }
}
