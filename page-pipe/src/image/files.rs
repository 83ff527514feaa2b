//! How image files are opened, read and written: regular files only, never through a
//! symbolic link, with positional reads and writes that loop over short transfers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::OFlags;

use super::error::{FileKind, FileOp, ImageError, io_err};

/// The most bytes one `pread`/`pwrite` moves on Linux (`MAX_RW_COUNT`, `INT_MAX` rounded
/// down to a page); larger requests come back short.
pub(crate) const MAX_IO: usize = 0x7fff_f000;

/// Mode of the files an [`ImageWriter`](super::ImageWriter) creates: the owner's only.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of the directories an [`ImageWriter`](super::ImageWriter) makes.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Opens `path` for reading as an image file: `O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`, so a
/// symlink fails and a FIFO opens without waiting, then `fstat` and accept only a regular
/// file. Returns the file and its size.
///
/// # Errors
/// [`ImageError::Symlink`], [`ImageError::NotRegular`], or [`ImageError::Io`] (with
/// `NotFound` for a missing file).
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64), ImageError> {
    let flags = OFlags::NOFOLLOW | OFlags::NONBLOCK;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        // `O_NOFOLLOW` gives ELOOP for a link, and opening a socket gives ENXIO: say what
        // the name holds when it is not a plain missing or unreadable file.
        Err(error) => {
            return Err(match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => ImageError::Symlink {
                    path: path.to_path_buf(),
                },
                Ok(m) if !m.is_file() => ImageError::NotRegular {
                    path: path.to_path_buf(),
                    kind: FileKind::of(m.file_type()),
                },
                _ => io_err(path, FileOp::Open)(error),
            });
        }
    };
    let meta = file.metadata().map_err(io_err(path, FileOp::Stat))?;
    if !meta.is_file() {
        return Err(ImageError::NotRegular {
            path: path.to_path_buf(),
            kind: FileKind::of(meta.file_type()),
        });
    }
    Ok((file, meta.len()))
}

/// Checks that the directory entry `path` (not followed) is a regular file, for names
/// found by listing a directory.
pub(crate) fn check_entry(path: &Path, t: std::fs::FileType) -> Result<(), ImageError> {
    if t.is_file() {
        Ok(())
    } else if t.is_symlink() {
        Err(ImageError::Symlink {
            path: path.to_path_buf(),
        })
    } else {
        Err(ImageError::NotRegular {
            path: path.to_path_buf(),
            kind: FileKind::of(t),
        })
    }
}

/// `pread` into all of `buf` from `offset`, in calls of at most [`MAX_IO`] bytes,
/// retrying on `EINTR`. A file that ends early is [`ImageError::ShortRead`] naming where.
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    mut buf: &mut [u8],
    mut offset: u64,
) -> Result<(), ImageError> {
    while !buf.is_empty() {
        let n = buf.len().min(MAX_IO);
        match file.read_at(&mut buf[..n], offset) {
            Ok(0) => {
                return Err(ImageError::ShortRead {
                    path: path.to_path_buf(),
                    offset,
                });
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path, FileOp::Read)(e)),
        }
    }
    Ok(())
}

/// `pwrite` all of `buf` at `offset`, in calls of at most [`MAX_IO`] bytes, retrying on
/// `EINTR`.
pub(crate) fn write_all_at(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = buf.len().min(MAX_IO);
        match file.write_at(&buf[..n], off) {
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

/// A name in `dir` for a temporary file standing in for `name` until the commit:
/// `.<name>.<pid>.<n>.tmp`, unique in this process.
pub(crate) fn temp_name(dir: &Path, name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// How many fresh names [`create_temp`] tries when one is taken.
const TEMP_TRIES: usize = 16;

/// Creates a temporary file for `name` in `dir`: `O_CREAT | O_EXCL | O_NOFOLLOW |
/// O_CLOEXEC`, mode [`FILE_MODE`], so it is always a new file of ours, never a file or
/// link that was there. Returns the file and its path.
pub(crate) fn create_temp(dir: &Path, name: &str) -> Result<(File, PathBuf), ImageError> {
    let mut tries = 0;
    loop {
        let path = temp_name(dir, name);
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(&path);
        match r {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < TEMP_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(io_err(&path, FileOp::Create)(e)),
        }
    }
}

/// Makes a symbolic link `target` under a temporary name for `name` in `dir`. Returns
/// its path.
pub(crate) fn link_temp(dir: &Path, name: &str, target: &Path) -> Result<PathBuf, ImageError> {
    let mut tries = 0;
    loop {
        let path = temp_name(dir, name);
        match std::os::unix::fs::symlink(target, &path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < TEMP_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(io_err(&path, FileOp::MakeLink)(e)),
        }
    }
}

/// Removes `path`; a missing file is fine.
pub(crate) fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `fsync` of the directory `dir`, so that names made or changed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, FileOp::SyncDir))
}
