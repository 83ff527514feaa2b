//! [`PagesAppender`]: the pages of one `PRESENT` entry of an [`ImageWriter`], added in
//! parts as they arrive (from a socket, a pipe) before the entry is recorded.

use std::os::fd::BorrowedFd;

use super::ImageWriter;
use crate::image::PagemapEntry;
use crate::image::error::{FileOp, ImageError, io_err};
use crate::image::files::write_all_at;

/// A `PRESENT` entry of an [`ImageWriter`] whose pages arrive in parts; made by
/// [`ImageWriter::begin_pages`]. Its pages go into the pages file as they come; the entry
/// is added by [`finish`](Self::finish) once all of them are in. Dropped before that, it
/// fails its writer.
#[derive(Debug)]
pub struct PagesAppender<'w> {
    w: &'w mut ImageWriter,
    e: PagemapEntry,
    left: u64,
    done: bool,
}

impl<'w> PagesAppender<'w> {
    /// The appender for `e`, an entry `w` has checked.
    pub(super) fn new(w: &'w mut ImageWriter, e: PagemapEntry) -> Self {
        let left = e.pages * w.page_size as u64;
        PagesAppender {
            w,
            e,
            left,
            done: false,
        }
    }

    /// The entry.
    pub fn entry(&self) -> PagemapEntry {
        self.e
    }

    /// Bytes of the entry's pages still to come.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Refuses a part that passes the end of the entry, and fails the writer.
    fn take(&mut self, len: usize) -> Result<(), ImageError> {
        if let Some(f) = &self.w.failed {
            return Err(f.duplicate());
        }
        if len as u64 > self.left {
            let err = ImageError::Order {
                path: self.w.pagemap_path.clone(),
                entry: self.e,
            };
            return Err(self.w.fail(err));
        }
        Ok(())
    }

    /// Moves the next `len` bytes of the entry's pages from the front of `pipe` into the
    /// pages file with `splice`.
    ///
    /// # Errors
    /// [`ImageError::Order`] when `len` passes the end of the entry; [`ImageError::Io`]
    /// naming the pages file when the pages cannot all be written (the pipe holds too
    /// few bytes, `ENOSPC`). The writer then refuses to finish.
    pub fn append_from_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> Result<(), ImageError> {
        self.take(len)?;
        self.w.splice_in(pipe, len)?;
        self.left -= len as u64;
        Ok(())
    }

    /// Writes the next `bytes.len()` bytes of the entry's pages into the pages file.
    ///
    /// # Errors
    /// As [`append_from_pipe`](Self::append_from_pipe).
    pub fn append_bytes(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.take(bytes.len())?;
        let w = &mut *self.w;
        if let Err(error) = write_all_at(&w.pages, bytes, w.pages_off) {
            let err = io_err(&w.pages_path, FileOp::WritePages)(error);
            return Err(w.fail(err));
        }
        w.pages_off += bytes.len() as u64;
        self.left -= bytes.len() as u64;
        Ok(())
    }

    /// Adds the entry, once all its pages are in.
    ///
    /// # Errors
    /// [`ImageError::Order`] when pages are missing (the writer then refuses to finish);
    /// the writer's first error if it failed.
    pub fn finish(mut self) -> Result<(), ImageError> {
        self.done = true;
        if let Some(f) = &self.w.failed {
            return Err(f.duplicate());
        }
        if self.left != 0 {
            let err = ImageError::Order {
                path: self.w.pagemap_path.clone(),
                entry: self.e,
            };
            return Err(self.w.fail(err));
        }
        self.w.record(self.e)
    }
}

impl Drop for PagesAppender<'_> {
    /// Fails the writer when the entry did not get all its pages.
    fn drop(&mut self) {
        if !self.done && self.w.failed.is_none() {
            let err = ImageError::Order {
                path: self.w.pagemap_path.clone(),
                entry: self.e,
            };
            self.w.fail(err);
        }
    }
}
