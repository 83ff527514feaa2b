//! How image files are opened, read and written: regular files only, never through a
//! symbolic link, with positional reads and writes that loop over short transfers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::OFlags;

use super::error::{FileKind, ImageError, io_err};

/// The most bytes one `pread`/`pwrite` moves on Linux (`MAX_RW_COUNT`, `INT_MAX` rounded
/// down to a page); larger requests come back short.
pub(crate) const MAX_IO: usize = 0x7fff_f000;

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
                _ => io_err(path, "open")(error),
            });
        }
    };
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
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
            Err(e) => return Err(io_err(path, "read")(e)),
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
