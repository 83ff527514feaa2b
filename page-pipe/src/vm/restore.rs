//! Restoring an image chain into guest memory: every region planned with
//! [`Image::plan`], every page of the image checked to be in a region, and only then the
//! pages file read straight into the regions' `VolatileSlice`s in large positional reads,
//! on several threads when there is much to read.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::Path;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestRegionMmap,
    VolatileMemoryError, VolatileSlice,
};

use super::guest::{FdReader, prefault};
use super::{Access, ImageOp, Layout, VmError};
use crate::image::{
    FileOp, Image, ImageError, MAX_AUTO_THREADS, MIN_BYTES_PER_THREAD, ReadReport, RestoreOptions,
    Segment, SegmentKind,
};

/// How [`restore`] restores.
///
/// ```
/// use page_pipe::vm::GuestRestoreOptions;
/// // Into memory just made (anonymous, never written): pages the image lacks stay as
/// // they are, zeros, and are not faulted in.
/// let fresh = GuestRestoreOptions { fresh: true, ..GuestRestoreOptions::default() };
/// assert!(!fresh.strict && fresh.threads.is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestRestoreOptions {
    /// Refuse pages of the regions that the image chain does not hold (in no entry, or
    /// lazy), as [`RestoreOptions::strict`] does, instead of filling them with zeros.
    /// Default: off.
    pub strict: bool,
    /// Threads to read with, the calling thread included. Default (`None`): as
    /// [`RestoreOptions::threads`], one per [`MIN_BYTES_PER_THREAD`] of memory to fill, at
    /// most the available parallelism and [`MAX_AUTO_THREADS`].
    pub threads: Option<NonZeroUsize>,
    /// The memory is known to read as zeros (anonymous memory just mapped and never
    /// written): pages the image lacks are left as they are instead of written with zeros,
    /// which would fault them in. Default: off (they are written with zeros).
    pub fresh: bool,
}

/// Restores the image chain `image` into the guest memory `mem`: each region gets the
/// image's pages at its guest addresses, through the parent chain; pages of a region the
/// chain does not hold are zeros (left as they are with
/// [`fresh`](GuestRestoreOptions::fresh), refused with
/// [`strict`](GuestRestoreOptions::strict)).
///
/// Before anything is written it checks every region ([`vm`](super) module rules, mapped
/// for writing), that every page of the image (every entry of its pagemap: present,
/// lazy or in the parent) is in a region, and plans every region. Then it reads each run
/// of pages from its pages file straight into the region's `VolatileSlice` with
/// `pread(2)` (as `ReadVolatile` does, in calls of up to 2 GiB), and marks the region's
/// dirty bitmap as vm-memory's own writes do.
///
/// ```
/// use page_pipe::image::{Image, ImageWriter, PageFlags, PagemapEntry};
/// use page_pipe::vm::{self, GuestRestoreOptions, VmError};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
/// let ps = page_pipe::page_size();
/// let dir = std::env::temp_dir().join(format!("pp-doc-vm-restore-{}", std::process::id()));
/// let mut w = ImageWriter::create(&dir, 1)?;
/// w.push_bytes(PagemapEntry { vaddr: 0, pages: 1, flags: PageFlags::PRESENT }, &vec![7; ps])?;
/// w.push_bytes(PagemapEntry { vaddr: 8 * ps as u64, pages: 1, flags: PageFlags::PRESENT }, &vec![8; ps])?;
/// w.finish()?;
/// let image = Image::open(&dir)?;
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * ps)])?;
/// let report = vm::restore(&image, &mem, &GuestRestoreOptions::default())?;
/// assert_eq!((report.present, report.zero), (2, 14));
/// assert_eq!(mem.read_obj::<u8>(GuestAddress(8 * ps as u64))?, 8);
///
/// // A page of the image in no region: refused, and nothing written.
/// let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * ps)])?;
/// match vm::restore(&image, &small, &GuestRestoreOptions::default()) {
///     Err(VmError::OutsideMemory { addr, pages: 1 }) => assert_eq!(addr, 8 * ps as u64),
///     other => panic!("{other:?}"),
/// }
/// assert_eq!(small.read_obj::<u8>(GuestAddress(0))?, 0);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// Before anything is written: [`VmError`] for a region that breaks a rule,
/// [`VmError::OutsideMemory`] naming the first page of the image in no region,
/// [`VmError::PageSize`], [`VmError::Image`] with [`ImageOp::Plan`] (a `PARENT` page the
/// parent lacks, a strict restore's missing page). While writing: [`VmError::Image`] with
/// [`ImageOp::Read`] (the pages file was truncated or cannot be read), after which the
/// memory holds some of the pages.
pub fn restore<M, B>(
    image: &Image,
    mem: &M,
    opts: &GuestRestoreOptions,
) -> Result<ReadReport, VmError>
where
    M: GuestMemoryBackend<R = GuestRegionMmap<B>> + Sync,
    B: Bitmap,
{
    let layout = Layout::of(mem, Some(Access::Write))?;
    let ps = layout.page_size;
    if image.page_size() != ps {
        return Err(VmError::PageSize {
            image: image.page_size(),
            page_size: ps,
        });
    }
    for e in image.entries() {
        layout.check_range(e.vaddr, e.pages)?;
    }
    let ropts = RestoreOptions {
        strict: opts.strict,
        threads: None,
        progress: None,
    };
    let mut report = ReadReport::default();
    let mut pieces = Vec::new();
    for r in &layout.regions {
        let plan = image
            .plan(r.addr, r.len, &ropts)
            .map_err(|error| VmError::Image {
                op: ImageOp::Plan,
                error,
            })?;
        report.present += plan.report.present;
        report.from_parents += plan.report.from_parents;
        report.zero += plan.report.zero;
        report.lazy += plan.report.lazy;
        pieces.extend(
            plan.segments
                .into_iter()
                .filter(|s| !opts.fresh || matches!(s.kind, SegmentKind::Pages { .. })),
        );
    }
    let files: Vec<(Option<&File>, &Path)> = (0..image.depth())
        .map(|d| {
            let img = image.ancestor(d).expect("within the chain");
            (img.pages_file(), img.pages_path())
        })
        .collect();
    let total: u64 = pieces.iter().map(|s| s.len).sum();
    let parts = split(&pieces, threads_for(total, ps, opts.threads), ps as u64);
    report.threads = parts.len();
    let run = |part: &[Segment]| -> Result<(), VmError> {
        let zeros =
            vec![0u8; ZERO_CHUNK.min(part.iter().map(|s| s.len as usize).max().unwrap_or(0))];
        part.iter()
            .try_for_each(|s| fill(mem, s, &files, &zeros, opts.fresh))
    };
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut here = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if i == 0 {
                here.push(part);
                continue;
            }
            match std::thread::Builder::new()
                .name("page-pipe-vm-restore".into())
                .spawn_scoped(scope, move || run(part))
            {
                Ok(h) => handles.push(h),
                // A thread limit: this part runs on the calling thread instead.
                Err(_) => here.push(part),
            }
        }
        report.threads -= here.len().saturating_sub(1);
        let mut result = here.into_iter().try_for_each(|p| run(p));
        for h in handles {
            let r = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            result = result.and(r);
        }
        result
    })?;
    Ok(report)
}

/// Zeros written at a time into guest memory.
const ZERO_CHUNK: usize = 1 << 20;

/// The bytes read into guest memory at a time, prefaulted first into fresh memory:
/// measured (`bench -- --vm`, 1 GiB into a fresh `GuestMemoryMmap`, two threads), one
/// read per run without prefaulting was 0.85-0.86x `Image::restore`, which prefaults 1 MiB
/// windows.
const WINDOW: usize = 1 << 20;

/// Fills the guest memory of segment `s`: from its pages file, or with zeros. Pages are
/// read [`WINDOW`] bytes at a time, each window prefaulted first when the memory is
/// `fresh` (never touched), as [`Image::restore`](crate::image::Image::restore) does.
fn fill<M, B>(
    mem: &M,
    s: &Segment,
    files: &[(Option<&File>, &Path)],
    zeros: &[u8],
    fresh: bool,
) -> Result<(), VmError>
where
    M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
    B: Bitmap,
{
    let mut at = s.vaddr;
    let mut reader = match s.kind {
        SegmentKind::Pages { depth, offset } => {
            let (file, path) = files[depth];
            let file = file.expect("present pages have a file");
            Some((FdReader::at(file.as_fd(), offset), path))
        }
        SegmentKind::Zero | SegmentKind::Lazy => None,
    };
    let guest = |addr: u64| {
        move |error: VolatileMemoryError| VmError::Guest {
            addr,
            error: GuestMemoryError::from(error),
        }
    };
    for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(s.vaddr), s.len as usize) {
        let slice: VolatileSlice<'_, _> =
            slice.map_err(|error| VmError::Guest { addr: at, error })?;
        match &mut reader {
            Some((rd, path)) => {
                let mut o = 0;
                while o < slice.len() {
                    let n = WINDOW.min(slice.len() - o);
                    let window = slice.subslice(o, n).map_err(guest(at + o as u64))?;
                    if fresh {
                        // Refused (before Linux 5.14): the reads fault the pages in.
                        prefault(&window);
                    }
                    window.read_exact_volatile_from(0, rd, n).map_err(|e| {
                        read_error(e, path, rd.offset().unwrap_or(0), at + o as u64)
                    })?;
                    o += n;
                }
            }
            None => {
                let mut o = 0;
                while o < slice.len() {
                    let n = zeros.len().min(slice.len() - o);
                    slice
                        .subslice(o, n)
                        .map_err(guest(at + o as u64))?
                        .copy_from(&zeros[..n]);
                    o += n;
                }
            }
        }
        at += slice.len() as u64;
    }
    Ok(())
}

/// What a failed read of a pages file into guest memory at `addr` was: the file ended
/// (it was truncated while open) at `offset`, the read failed, or vm-memory refused.
fn read_error(e: VolatileMemoryError, path: &Path, offset: u64, addr: u64) -> VmError {
    let error = match e {
        VolatileMemoryError::IOError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::ShortRead {
                path: path.to_path_buf(),
                offset,
            }
        }
        VolatileMemoryError::IOError(error) => ImageError::Io {
            path: path.to_path_buf(),
            op: FileOp::Read,
            error,
        },
        other => {
            return VmError::Guest {
                addr,
                error: GuestMemoryError::from(other),
            };
        }
    };
    VmError::Image {
        op: ImageOp::Read,
        error,
    }
}

/// How many threads fill `len` bytes (as [`Image::restore`] decides).
fn threads_for(len: u64, page_size: usize, asked: Option<NonZeroUsize>) -> usize {
    let pages = (len / page_size as u64).max(1);
    match asked {
        Some(n) => (n.get() as u64).min(pages) as usize,
        None if len < 2 * MIN_BYTES_PER_THREAD as u64 => 1,
        None => {
            let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
            ((len / MIN_BYTES_PER_THREAD as u64) as usize)
                .min(cpus)
                .min(MAX_AUTO_THREADS)
        }
    }
}

/// Cuts `segments` into `parts` runs of equal bytes give or take a page (fewer when there
/// are fewer pages), splitting segments at page boundaries.
fn split(segments: &[Segment], parts: usize, page_size: u64) -> Vec<Vec<Segment>> {
    let total: u64 = segments.iter().map(|s| s.len).sum();
    let pages = total / page_size;
    let parts = (parts as u64).clamp(1, pages.max(1));
    let room_of = |k: u64| (pages / parts + u64::from(k < pages % parts)) * page_size;
    let mut out: Vec<Vec<Segment>> = Vec::with_capacity(parts as usize);
    let mut current = Vec::new();
    let mut room = room_of(0);
    for s in segments {
        let mut done = 0;
        while done < s.len {
            let n = (s.len - done).min(room);
            let kind = match s.kind {
                SegmentKind::Pages { depth, offset } => SegmentKind::Pages {
                    depth,
                    offset: offset + done,
                },
                k => k,
            };
            current.push(Segment {
                vaddr: s.vaddr + done,
                len: n,
                kind,
            });
            done += n;
            room -= n;
            if room == 0 {
                out.push(std::mem::take(&mut current));
                room = room_of(out.len() as u64);
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_segments_in_order() {
        let ps = 4096;
        let segs = [
            Segment {
                vaddr: 0,
                len: 3 * ps,
                kind: SegmentKind::Pages {
                    depth: 0,
                    offset: 10 * ps,
                },
            },
            Segment {
                vaddr: 8 * ps,
                len: 2 * ps,
                kind: SegmentKind::Zero,
            },
        ];
        for parts in 1..=7 {
            let got = split(&segs, parts, ps);
            assert_eq!(got.len(), parts.min(5));
            let flat: Vec<Segment> = got.into_iter().flatten().collect();
            let mut pages = Vec::new();
            for s in &flat {
                for p in 0..s.len / ps {
                    let src = match s.kind {
                        SegmentKind::Pages { offset, .. } => Some(offset / ps + p),
                        _ => None,
                    };
                    pages.push((s.vaddr / ps + p, src));
                }
            }
            assert_eq!(
                pages,
                [
                    (0, Some(10)),
                    (1, Some(11)),
                    (2, Some(12)),
                    (8, None),
                    (9, None)
                ]
            );
        }
        assert!(split(&[], 3, ps).is_empty());
    }
}
