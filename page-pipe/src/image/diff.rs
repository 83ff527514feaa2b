//! Which pages two image chains hold differently, compared in bounded pieces.

use std::path::Path;

use super::restore::WINDOW;
use super::{Image, ImageError, RestoreOptions, Segment, SegmentKind};

/// How two images differ over a [`DiffSpan`]. "Holds" means the page is in an entry of
/// the chain: in a pages file, or lazy (only a lazy-pages server has its bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiffKind {
    /// The first image holds the pages, the second has them in no entry.
    OnlyInA,
    /// The second image holds the pages, the first has them in no entry.
    OnlyInB,
    /// Both hold the pages' bytes, and they differ.
    Bytes,
    /// One holds the pages' bytes and the other holds them only lazily, so the images
    /// cannot tell whether they are equal. (Pages lazy in both count as equal.)
    Lazy,
}

/// A run of pages that two images hold differently, in the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiffSpan {
    /// The address of the first page.
    pub vaddr: u64,
    /// How many pages.
    pub pages: u64,
    /// How they differ.
    pub kind: DiffKind,
}

/// Compares the image chains in `a` and `b`: opens both ([`Image::open`]) and calls
/// [`Image::diff`].
///
/// ```
/// use page_pipe::image::{self, DiffKind, DiffSpan, ImageWriter, PageFlags, PagemapEntry};
/// let root = std::env::temp_dir().join(format!("pp-doc-diff-fn-{}", std::process::id()));
/// let ps = page_pipe_sys::page_size().get();
/// for (name, byte) in [("a", 1u8), ("b", 2)] {
///     let mut w = ImageWriter::create(root.join(name), 1)?;
///     w.push_bytes(PagemapEntry { vaddr: 0x10 * ps as u64, pages: 1, flags: PageFlags::PRESENT }, &vec![byte; ps])?;
///     w.finish()?;
/// }
/// let spans = image::diff(root.join("a"), root.join("b"))?;
/// assert_eq!(spans, [DiffSpan { vaddr: 0x10 * ps as u64, pages: 1, kind: DiffKind::Bytes }]);
/// # std::fs::remove_dir_all(&root).unwrap();
/// # Ok::<(), page_pipe::image::ImageError>(())
/// ```
///
/// # Errors
/// As [`Image::open`] and [`Image::diff`].
pub fn diff(a: impl AsRef<Path>, b: impl AsRef<Path>) -> Result<Vec<DiffSpan>, ImageError> {
    Image::open(a)?.diff(&Image::open(b)?)
}

/// Whether a segment's pages are held, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    No,
    Lazy,
    Bytes,
}

fn held(kind: SegmentKind) -> Held {
    match kind {
        SegmentKind::Zero => Held::No,
        SegmentKind::Lazy => Held::Lazy,
        SegmentKind::Pages { .. } => Held::Bytes,
    }
}

impl Image {
    /// The pages this chain (A) and `other` (B) hold differently, as spans in address
    /// order, adjacent pages that differ in the same way joined: pages one holds and the
    /// other does not, pages whose bytes differ, and pages one holds only lazily (see
    /// [`DiffKind`]). Empty when both restore the same pages to the same bytes, however
    /// their entries are cut and whatever their parents.
    ///
    /// Both chains are planned ([`plan`](Self::plan)) over the pages either image's
    /// entries cover, and only pages both hold as bytes are read, 1 MiB of each at a
    /// time: the pages it holds in memory do not grow with the images, and its work
    /// follows the bytes the pages files hold, not the address space entries claim (an
    /// entry of 2^36 lazy pages costs what one page does).
    ///
    /// ```
    /// use page_pipe::image::{DiffKind, DiffSpan, Image, ImageWriter, PageFlags, PagemapEntry};
    /// let root = std::env::temp_dir().join(format!("pp-doc-diff-{}", std::process::id()));
    /// let ps = page_pipe_sys::page_size().get();
    /// let at = |p: u64| p * ps as u64 + 0x100000;
    /// let mut w = ImageWriter::create(root.join("a"), 1)?;
    /// w.push_bytes(PagemapEntry { vaddr: at(0), pages: 2, flags: PageFlags::PRESENT }, &vec![1; 2 * ps])?;
    /// w.finish()?;
    /// let mut w = ImageWriter::create(root.join("b"), 1)?;
    /// w.push_bytes(PagemapEntry { vaddr: at(1), pages: 1, flags: PageFlags::PRESENT }, &vec![1; ps])?;
    /// w.push(PagemapEntry { vaddr: at(2), pages: 1, flags: PageFlags::LAZY })?;
    /// w.finish()?;
    ///
    /// let (a, b) = (Image::open(root.join("a"))?, Image::open(root.join("b"))?);
    /// assert_eq!(a.diff(&b)?, [
    ///     DiffSpan { vaddr: at(0), pages: 1, kind: DiffKind::OnlyInA },
    ///     DiffSpan { vaddr: at(2), pages: 1, kind: DiffKind::OnlyInB },
    /// ]);
    /// assert!(a.diff(&a)?.is_empty());
    /// # std::fs::remove_dir_all(&root).unwrap();
    /// # Ok::<(), page_pipe::image::ImageError>(())
    /// ```
    ///
    /// # Errors
    /// [`ImageError::NotInParent`] for a `PARENT` page a chain lacks;
    /// [`ImageError::ShortRead`] or [`ImageError::Io`] naming the file when a pages file
    /// cannot be read.
    pub fn diff(&self, other: &Image) -> Result<Vec<DiffSpan>, ImageError> {
        let ps = self.page_size();
        let mut spans: Vec<DiffSpan> = Vec::new();
        let mut push = |vaddr: u64, len: u64, kind: DiffKind| {
            let pages = len / ps as u64;
            if let Some(last) = spans.last_mut()
                && last.kind == kind
                && last.vaddr + last.pages * ps as u64 == vaddr
            {
                last.pages += pages;
            } else {
                spans.push(DiffSpan { vaddr, pages, kind });
            }
        };
        let (mut buf_a, mut buf_b) = (vec![0u8; WINDOW], vec![0u8; WINDOW]);
        let opts = RestoreOptions::default();
        for (lo, hi) in covered(self, other) {
            // The plans say where each side's pages are without reading any: only pages
            // both sides hold as bytes are read, so the work follows the bytes the files
            // hold, not the address space the entries claim.
            let plan_a = self.plan(lo, hi - lo, &opts)?;
            let plan_b = other.plan(lo, hi - lo, &opts)?;
            for (from, to, ka, kb) in overlaps(&plan_a.segments, &plan_b.segments) {
                let kind = match (held(ka), held(kb)) {
                    (Held::No, Held::No) | (Held::Lazy, Held::Lazy) => continue,
                    (_, Held::No) => DiffKind::OnlyInA,
                    (Held::No, _) => DiffKind::OnlyInB,
                    (Held::Lazy, _) | (_, Held::Lazy) => DiffKind::Lazy,
                    (Held::Bytes, Held::Bytes) => {
                        let mut at = from;
                        while at < to {
                            let len = (to - at).min(WINDOW as u64);
                            let (a, b) = (&mut buf_a[..len as usize], &mut buf_b[..len as usize]);
                            self.fill(&self.plan(at, len, &opts)?.segments, at, a, None)?;
                            other.fill(&other.plan(at, len, &opts)?.segments, at, b, None)?;
                            for o in (0..len as usize).step_by(ps) {
                                if a[o..o + ps] != b[o..o + ps] {
                                    push(at + o as u64, ps as u64, DiffKind::Bytes);
                                }
                            }
                            at += len;
                        }
                        continue;
                    }
                };
                push(from, to - from, kind);
            }
        }
        Ok(spans)
    }
}

/// The address ranges either image's own entries cover, merged, in address order.
fn covered(a: &Image, b: &Image) -> Vec<(u64, u64)> {
    let ps = a.page_size() as u64;
    let (ea, eb) = (a.entries(), b.entries());
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<(u64, u64)> = Vec::new();
    while i < ea.len() || j < eb.len() {
        let e = match (ea.get(i), eb.get(j)) {
            (Some(x), Some(y)) if x.vaddr <= y.vaddr => {
                i += 1;
                x
            }
            (Some(x), None) => {
                i += 1;
                x
            }
            (_, Some(y)) => {
                j += 1;
                y
            }
            (None, None) => break,
        };
        let end = e.vaddr + e.pages * ps;
        match out.last_mut() {
            Some(last) if e.vaddr <= last.1 => last.1 = last.1.max(end),
            _ => out.push((e.vaddr, end)),
        }
    }
    out
}

/// Two plans of the same range cut where either changes segment: each piece's range and
/// the kinds of A and B there.
fn overlaps<'p>(
    a: &'p [Segment],
    b: &'p [Segment],
) -> impl Iterator<Item = (u64, u64, SegmentKind, SegmentKind)> + 'p {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || {
        let (sa, sb) = (a.get(i)?, b.get(j)?);
        let from = sa.vaddr.max(sb.vaddr);
        let (ea, eb) = (sa.vaddr + sa.len, sb.vaddr + sb.len);
        let to = ea.min(eb);
        if ea == to {
            i += 1;
        }
        if eb == to {
            j += 1;
        }
        Some((from, to, sa.kind, sb.kind))
    })
}
