//! Flattening an image chain into one full image, streamed.

use std::path::Path;

use super::{Image, ImageError, ImageSummary, ImageWriter, PageFlags, PagemapEntry};
use super::{Segment, SegmentKind};

/// How [`Image::flatten`] writes the new image.
///
/// ```
/// use page_pipe::image::FlattenOptions;
/// assert!(FlattenOptions::default().sync);
/// let fast = FlattenOptions { sync: false, ..FlattenOptions::default() };
/// # let _ = fast;
/// ```
#[derive(Clone)]
pub struct FlattenOptions {
    /// Sync the new image's data before committing it
    /// ([`ImageWriter::with_sync`]). Default: on.
    pub sync: bool,
    /// Called with the pages of the image written so far and the pages in all, at a
    /// bounded rate (see [`ProgressFn`](crate::ProgressFn)).
    pub progress: Option<crate::ProgressFn>,
}

impl Default for FlattenOptions {
    fn default() -> Self {
        Self {
            sync: true,
            progress: None,
        }
    }
}

impl std::fmt::Debug for FlattenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlattenOptions")
            .field("sync", &self.sync)
            .field("progress", &self.progress.as_ref().map(|_| "callback"))
            .finish()
    }
}

/// Flattens the image chain in `src` into one full image in `dst`: opens it
/// ([`Image::open`]) and calls [`Image::flatten`].
///
/// ```
/// use page_pipe::image::{self, FlattenOptions, Image, ImageWriter, PageFlags, PagemapEntry};
/// let root = std::env::temp_dir().join(format!("pp-doc-flatten-fn-{}", std::process::id()));
/// let ps = page_pipe_sys::page_size().get();
/// let mut w = ImageWriter::create(root.join("1"), 1)?;
/// w.push_bytes(PagemapEntry { vaddr: 0x10 * ps as u64, pages: 2, flags: PageFlags::PRESENT }, &vec![1; 2 * ps])?;
/// w.finish()?;
/// let mut w = ImageWriter::create(root.join("2"), 1)?.with_parent(root.join("1"))?;
/// w.push_bytes(PagemapEntry { vaddr: 0x10 * ps as u64, pages: 1, flags: PageFlags::PRESENT }, &vec![2; ps])?;
/// w.push(PagemapEntry { vaddr: 0x11 * ps as u64, pages: 1, flags: PageFlags::PARENT })?;
/// w.finish()?;
///
/// let summary = image::flatten(root.join("2"), root.join("flat"), &FlattenOptions::default())?;
/// assert_eq!((summary.entries, summary.present_pages), (1, 2));
/// let flat = Image::open(root.join("flat"))?;
/// assert_eq!(flat.depth(), 1);
/// # std::fs::remove_dir_all(&root).unwrap();
/// # Ok::<(), page_pipe::image::ImageError>(())
/// ```
///
/// # Errors
/// As [`Image::open`] and [`Image::flatten`].
pub fn flatten(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    opts: &FlattenOptions,
) -> Result<ImageSummary, ImageError> {
    Image::open(src)?.flatten(dst, opts)
}

impl Image {
    /// Writes the chain as one full image in `dst`, with this image's pagemap id and
    /// pages id: every page the chain holds, from the nearest image that holds it (as a
    /// restore takes it), in entries with the flags of the entries it came from (`LAZY`
    /// kept, `PARENT` gone), lazy-only pages as lazy entries, and no page the chain
    /// lacks. Restoring the new image gives what restoring the chain gives, page for page
    /// ([`diff`](Self::diff) finds no difference).
    ///
    /// It streams: the chain's merged plan is walked one entry of this image at a time,
    /// and each run of pages contiguous in memory and in one pages file is copied with
    /// `copy_file_range` (through a buffer of at most 8 MiB where the kernel cannot copy
    /// between the files), so its memory does not grow with the image. The new image is
    /// written as every [`ImageWriter`] writes: private, under temporary names, and
    /// committed only when complete, so `dst` may even be this image's own directory
    /// (the chain is read through the files it opened).
    ///
    /// ```
    /// use page_pipe::image::{FlattenOptions, Image, ImageWriter, PageFlags, PagemapEntry};
    /// let root = std::env::temp_dir().join(format!("pp-doc-flatten-{}", std::process::id()));
    /// let ps = page_pipe_sys::page_size().get();
    /// let at = |p: u64| p * ps as u64 + 0x100000;
    /// let mut w = ImageWriter::create(root.join("1"), 7)?;
    /// w.push_bytes(PagemapEntry { vaddr: at(0), pages: 3, flags: PageFlags::PRESENT }, &vec![1; 3 * ps])?;
    /// w.push(PagemapEntry { vaddr: at(3), pages: 1, flags: PageFlags::LAZY })?;
    /// w.finish()?;
    /// let mut w = ImageWriter::create(root.join("2"), 7)?.with_parent(root.join("1"))?;
    /// w.push(PagemapEntry { vaddr: at(0), pages: 1, flags: PageFlags::PARENT })?;
    /// w.push_bytes(PagemapEntry { vaddr: at(1), pages: 1, flags: PageFlags::PRESENT }, &vec![2; ps])?;
    /// w.push(PagemapEntry { vaddr: at(2), pages: 2, flags: PageFlags::PARENT })?;
    /// w.finish()?;
    ///
    /// let chain = Image::open(root.join("2"))?;
    /// chain.flatten(root.join("flat"), &FlattenOptions::default())?;
    /// let flat = Image::open(root.join("flat"))?;
    /// assert_eq!((flat.depth(), flat.id()), (1, 7));
    /// let entries: Vec<_> = flat.entries().iter().map(|e| (e.pages, e.flags)).collect();
    /// assert_eq!(entries, [(3, PageFlags::PRESENT), (1, PageFlags::LAZY)]);
    /// assert!(flat.diff(&chain)?.is_empty());
    /// # std::fs::remove_dir_all(&root).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    ///
    /// # Errors
    /// [`ImageError::NotInParent`] for a `PARENT` page the chain lacks;
    /// [`ImageError::ShortRead`] or [`ImageError::Io`] naming the file when a pages file
    /// cannot be read (truncated since it was opened) or the new image cannot be written.
    /// On error nothing is committed in `dst`.
    pub fn flatten(
        &self,
        dst: impl AsRef<Path>,
        opts: &FlattenOptions,
    ) -> Result<ImageSummary, ImageError> {
        let mut w = ImageWriter::create_with_pages_id(dst, self.id(), self.pagemap().pages_id)?
            .with_sync(opts.sync);
        let ps = self.page_size() as u64;
        let total = self.entries().iter().map(|e| e.pages).sum();
        let mut progress = crate::progress::Throttle::new(opts.progress.clone(), total);
        // The run being gathered: a segment and whether its pages are lazy.
        let mut run: Option<(Segment, bool)> = None;
        {
            let mut sink = |s: Segment, lazy: bool| -> Result<(), ImageError> {
                progress.advance(s.len / ps);
                if let Some((r, l)) = &mut run
                    && *l == lazy
                    && r.vaddr + r.len == s.vaddr
                    && continues(r, &s)
                {
                    r.len += s.len;
                    return Ok(());
                }
                match run.replace((s, lazy)) {
                    Some((r, l)) => self.write_run(&mut w, r, l),
                    None => Ok(()),
                }
            };
            for e in self.entries() {
                self.walk(e.vaddr, e.vaddr + e.pages * ps, 0, false, &mut sink)?;
            }
        }
        if let Some((r, l)) = run {
            self.write_run(&mut w, r, l)?;
        }
        let summary = w.finish()?;
        progress.finish();
        Ok(summary)
    }

    /// Writes one run of the flattened image: its pages copied from the pages file it
    /// is in, or a lazy entry.
    fn write_run(&self, w: &mut ImageWriter, s: Segment, lazy: bool) -> Result<(), ImageError> {
        let pages = s.len / self.page_size() as u64;
        let lazy = if lazy {
            PageFlags::LAZY
        } else {
            PageFlags::empty()
        };
        match s.kind {
            SegmentKind::Pages { depth, offset } => {
                let img = self.ancestor(depth).expect("within the chain");
                let file = img.pages.as_ref().expect("present pages have a file");
                let e = PagemapEntry {
                    vaddr: s.vaddr,
                    pages,
                    flags: PageFlags::PRESENT | lazy,
                };
                w.push_copy(e, file, img.pages_path(), offset)
            }
            SegmentKind::Lazy => w.push(PagemapEntry {
                vaddr: s.vaddr,
                pages,
                flags: PageFlags::LAZY,
            }),
            // Walking this image's own entries meets no page in none.
            SegmentKind::Zero => Ok(()),
        }
    }
}

/// Whether `s` reads on where `r` ends: the same pages file at the next byte, or both
/// lazy.
fn continues(r: &Segment, s: &Segment) -> bool {
    match (r.kind, s.kind) {
        (
            SegmentKind::Pages { depth, offset },
            SegmentKind::Pages {
                depth: d,
                offset: o,
            },
        ) => depth == d && offset + r.len == o,
        (SegmentKind::Lazy, SegmentKind::Lazy) => true,
        _ => false,
    }
}
