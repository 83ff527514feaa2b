//! Restoring by mapping the pages files over the destination, and prefaulting a
//! destination before it is read into.
//!
//! This is the image module's one opt-in to `unsafe` (the crate denies it elsewhere but
//! in [`source`](crate::source)). It keeps two promises:
//!
//! - [`Image::map_into`] is an `unsafe fn`: it replaces the caller's memory with private
//!   mappings of the image's pages files. Its caller promises that the destination is
//!   theirs to replace (no reference into it is used again) and that the image files stay
//!   unchanged, neither truncated nor written, for as long as the mappings last: a page
//!   not yet written shows the file's current bytes, and a page past a file's end raises
//!   `SIGBUS` when touched. Everything it checks, it checks before it maps anything.
//! - Prefaulting (crate-internal, safe) takes a `&mut [u8]` and asks the kernel to fault
//!   its whole pages in as writes would (`madvise(MADV_POPULATE_WRITE)`), which changes
//!   no byte of them. The exclusive borrow is the caller's proof that nobody else uses
//!   the memory meanwhile; the kernel checks the rest (a range it cannot populate is an
//!   error, which only turns prefaulting off). Memory already in needs none: whether a
//!   page is in is read from `/proc/self/pagemap` (safe code, a file read).
//!
//! # Rules
//!
//! - One mapping per segment of the chain's merged plan ([`Image::plan`]): a run of
//!   pages contiguous in memory and in one pages file is one
//!   `mmap(MAP_PRIVATE | MAP_FIXED)`, whatever entries it spans, and each page is mapped
//!   from the nearest image of the chain that holds it (the same plan the eager restore
//!   reads). Pages the chain lacks stay as they were, or become zeros with
//!   [`MapOptions::zero_holes`] (a private anonymous `MAP_FIXED` mapping, which replaces
//!   whatever was there; `madvise(MADV_DONTNEED)` would zero only private anonymous
//!   memory, and the destination may be anything).
//! - Before mapping, it counts: each mapped segment is a mapping of its own, each run of
//!   holes left between them is what remains of the mapping that was there, and the
//!   destination's ends may split the mappings around it; so scattered single pages
//!   need two mappings each (65530, the usual `vm.max_map_count`, is reached at about
//!   32,700 of them). If the count would leave fewer than
//!   [`MAP_COUNT_RESERVE`] below `vm.max_map_count` (counting the process's mappings
//!   now), it is [`ImageError::TooManyMappings`], with the advice to flatten the image or
//!   restore it eagerly, and nothing is mapped.
//! - Before mapping, it checks that each pages file still holds the bytes the plan maps
//!   ([`ImageError::ShortRead`] otherwise): a file truncated before the call is an
//!   error, not a `SIGBUS`. After the call it is the caller's promise.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;

use rustix::mm::{Advice, MapFlags, ProtFlags};

use super::error::{FileOp, io_err};
use super::{Image, ImageError, ReadReport, RestoreOptions, Segment, SegmentKind};

/// Mappings a restore by mapping leaves free below `vm.max_map_count` for the rest of
/// the process (its libraries, thread stacks, allocator arenas, later mappings).
pub const MAP_COUNT_RESERVE: usize = 1024;

/// Where the kernel's limit on a process's mappings is read.
const MAX_MAP_COUNT_PATH: &str = "/proc/sys/vm/max_map_count";

/// Where this process's mappings are listed, one a line.
const SELF_MAPS_PATH: &str = "/proc/self/maps";

/// How [`Image::map_into`] restores.
///
/// ```
/// use page_pipe::image::MapOptions;
/// let zeroed = MapOptions { zero_holes: true, ..MapOptions::default() };
/// assert!(!MapOptions::default().zero_holes && zeroed.max_mappings.is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapOptions {
    /// Make pages the chain lacks (in no entry, or lazy without `PRESENT`) zeros, with
    /// a private anonymous mapping over them. Default: off (they keep what the
    /// destination held).
    pub zero_holes: bool,
    /// Refuse pages the chain lacks, with [`ImageError::NotInImage`], before mapping
    /// anything (as [`RestoreOptions::strict`]).
    pub strict: bool,
    /// The most mappings the restore may add. Default (`None`): what
    /// `vm.max_map_count` leaves after the process's current mappings and
    /// [`MAP_COUNT_RESERVE`].
    pub max_mappings: Option<usize>,
}

/// What [`Image::map_into`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapReport {
    /// The pages mapped from each place, as the plan counts them (`threads` is 0).
    pub report: ReadReport,
    /// `mmap` calls made: file mappings, and anonymous ones for zeroed holes.
    pub mappings: usize,
}

/// The kernel's limit on the mappings of a process, `vm.max_map_count`, read from
/// `/proc/sys/vm/max_map_count`.
///
/// ```
/// let limit = page_pipe::image::max_map_count()?;
/// assert!(limit > 0);
/// # Ok::<(), page_pipe::image::ImageError>(())
/// ```
///
/// # Errors
/// [`ImageError::Io`] naming the file when it cannot be read or holds no number.
pub fn max_map_count() -> Result<usize, ImageError> {
    let path = std::path::Path::new(MAX_MAP_COUNT_PATH);
    let text = std::fs::read_to_string(path).map_err(io_err(path, FileOp::Read))?;
    text.trim().parse().map_err(|_| {
        io_err(path, FileOp::Read)(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a number: {:?}", text.trim()),
        ))
    })
}

/// The mappings this process has now: lines of `/proc/self/maps`.
fn mappings_in_use() -> Result<usize, ImageError> {
    let path = std::path::Path::new(SELF_MAPS_PATH);
    let text = std::fs::read(path).map_err(io_err(path, FileOp::Read))?;
    Ok(text.iter().filter(|&&b| b == b'\n').count())
}

/// Where this process's page table entries are listed, 8 bytes a page.
const SELF_PAGEMAP_PATH: &str = "/proc/self/pagemap";

/// Says whether a page of this process is in memory, from `/proc/self/pagemap` (which
/// gives any process its own pages' present and swapped bits): prefaulting memory that
/// is in already costs a page-table walk and saves nothing.
#[derive(Debug)]
pub(super) struct Residency(Option<std::fs::File>);

impl Residency {
    /// Opens `/proc/self/pagemap`; without it, every page counts as not in memory.
    pub(super) fn open() -> Self {
        Self(std::fs::File::open(SELF_PAGEMAP_PATH).ok())
    }

    /// Whether the page holding `ptr` is in memory or swapped out (`false` when it
    /// cannot be told).
    pub(super) fn is_in(&self, ptr: *const u8) -> bool {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.0 else { return false };
        let ps = page_pipe_sys::page_size().get() as u64;
        let mut entry = [0u8; 8];
        match f.read_at(&mut entry, ptr as u64 / ps * 8) {
            // Bit 63: present; bit 62: swapped (Documentation/admin-guide/mm/pagemap.rst).
            Ok(8) => u64::from_le_bytes(entry) >> 62 != 0,
            _ => false,
        }
    }
}

/// Prefaults the whole pages of `dst` for writing: `madvise(MADV_POPULATE_WRITE)`, which
/// faults each page in as a write would without changing a byte. Returns whether the
/// kernel did (false before Linux 5.14, or for memory it cannot populate; the caller's
/// writes then fault the pages in themselves).
pub(super) fn prefault(dst: &mut [u8]) -> bool {
    let ps = page_pipe_sys::page_size().get();
    let skip = dst.as_ptr().align_offset(ps);
    if skip >= dst.len() {
        return true;
    }
    let whole = (dst.len() - skip) / ps * ps;
    if whole == 0 {
        return true;
    }
    let pages = &mut dst[skip..skip + whole];
    // SAFETY:
    // - `pages` is page-aligned whole pages inside `dst` (computed just above);
    // - `dst` is borrowed exclusively (the borrow checker's invariant), so no one else
    //   reads or writes it during the call;
    // - MADV_POPULATE_WRITE changes no byte and no mapping, only fills page tables as a
    //   write fault would (the kernel's documented behaviour), so the slice still holds
    //   what it held.
    let r = unsafe {
        rustix::mm::madvise(
            pages.as_mut_ptr().cast::<c_void>(),
            pages.len(),
            Advice::LinuxPopulateWrite,
        )
    };
    r.is_ok()
}

/// The mappings a restore by mapping may add for `segments`, of which `maps` says
/// which are mapped: one per mapped segment, one per run of segments left as they
/// were between them (what remains of the mapping that was there), and two for the
/// mappings around the destination, which its ends may split. None when nothing is
/// mapped.
fn mappings_needed(segments: &[Segment], maps: impl Fn(SegmentKind) -> bool) -> usize {
    let mapped = segments.iter().filter(|s| maps(s.kind)).count();
    if mapped == 0 {
        return 0;
    }
    let kept_runs = segments
        .iter()
        .enumerate()
        .filter(|(i, s)| !maps(s.kind) && (*i == 0 || maps(segments[i - 1].kind)))
        .count();
    mapped + kept_runs + 2
}

impl Image {
    /// Restores `len` bytes (whole pages) from `vaddr` through the parent chain by
    /// mapping the pages files over the memory at `dst`: one private fixed mapping
    /// (`mmap(MAP_PRIVATE | MAP_FIXED)`, readable and writable) per segment of the
    /// merged [plan](Self::plan), so the memory is ready in O(segments) system calls and
    /// each page is read from the page cache when first touched (a write copies it into
    /// anonymous memory; the files never change). Pages the chain lacks stay as they
    /// were, or become zeros ([`MapOptions::zero_holes`]). See the
    /// [module rules](super) for the counting and checks done first.
    ///
    /// ```
    /// use page_pipe::image::{Image, ImageWriter, MapOptions, PageFlags, PagemapEntry};
    /// let dir = std::env::temp_dir().join(format!("pp-doc-map-{}", std::process::id()));
    /// let ps = page_pipe_sys::page_size().get();
    /// let mut w = ImageWriter::create(&dir, 1)?;
    /// let e = PagemapEntry { vaddr: 0x40 * ps as u64, pages: 2, flags: PageFlags::PRESENT };
    /// w.push_bytes(e, &vec![3u8; 2 * ps])?;
    /// w.finish()?;
    ///
    /// let img = Image::open(&dir)?;
    /// let mut mem = memmap2::MmapOptions::new().len(3 * ps).map_anon()?;
    /// mem.fill(9);
    /// let opts = MapOptions { zero_holes: true, ..MapOptions::default() };
    /// // SAFETY:
    /// // - `mem` is ours, and no reference into it is alive across the call;
    /// // - nobody changes the image files while `mem` is mapped (the doctest owns them).
    /// let report = unsafe { img.map_into(e.vaddr, mem.as_mut_ptr(), mem.len(), &opts)? };
    /// assert_eq!((report.mappings, report.report.present, report.report.zero), (2, 2, 1));
    /// assert!(mem[..2 * ps].iter().all(|&b| b == 3) && mem[2 * ps..].iter().all(|&b| b == 0));
    /// drop(mem);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Safety
    ///
    /// - `dst..dst + len` is memory the caller may replace: no reference into it is
    ///   used after the call (the mappings replace the memory, so what such a reference
    ///   saw is gone), and no one else uses it;
    /// - the image files of the whole chain stay unchanged (not truncated, not written,
    ///   not replaced in place) for as long as the mappings last: a page not yet written
    ///   reads the file's current bytes, and a page past a file's end raises `SIGBUS`.
    ///
    /// # Errors
    /// Before anything is mapped: [`ImageError::BadDestination`] for a `dst` that is null
    /// or not page-aligned; as [`plan`](Self::plan) ([`ImageError::BadRange`],
    /// [`ImageError::NotInParent`], [`ImageError::NotInImage`] with
    /// [`MapOptions::strict`]); [`ImageError::TooManyMappings`]; [`ImageError::ShortRead`]
    /// for a pages file truncated since it was opened; [`ImageError::Io`] when
    /// `/proc/sys/vm/max_map_count` or `/proc/self/maps` cannot be read (give
    /// [`MapOptions::max_mappings`] to do without them). While mapping:
    /// [`ImageError::Map`], which says how much of the destination was already
    /// replaced; the destination then holds neither its old contents nor the image.
    pub unsafe fn map_into(
        &self,
        vaddr: u64,
        dst: *mut u8,
        len: usize,
        opts: &MapOptions,
    ) -> Result<MapReport, ImageError> {
        let ps = self.page_size();
        if dst.is_null() || !(dst as usize).is_multiple_of(ps) {
            return Err(ImageError::BadDestination {
                ptr: dst as usize,
                len,
            });
        }
        let restore = RestoreOptions {
            strict: opts.strict,
            threads: None,
            progress: None,
        };
        let plan = self.plan(vaddr, len as u64, &restore)?;
        let maps = |kind: SegmentKind| match kind {
            SegmentKind::Pages { .. } => true,
            SegmentKind::Zero | SegmentKind::Lazy => opts.zero_holes,
        };
        let needed = mappings_needed(&plan.segments, maps);
        let (available, limit) = match opts.max_mappings {
            Some(n) => (n, n),
            None => {
                let limit = max_map_count()?;
                let free = limit
                    .saturating_sub(mappings_in_use()?)
                    .saturating_sub(MAP_COUNT_RESERVE);
                (free, limit)
            }
        };
        if needed > available {
            return Err(ImageError::TooManyMappings {
                needed,
                available,
                limit,
            });
        }
        // Each pages file must still hold the bytes the plan maps from it.
        let mut ends = vec![0u64; self.depth()];
        for s in &plan.segments {
            if let SegmentKind::Pages { depth, offset } = s.kind {
                ends[depth] = ends[depth].max(offset + s.len);
            }
        }
        for (depth, &end) in ends.iter().enumerate().filter(|(_, e)| **e > 0) {
            let img = self.ancestor(depth).expect("within the chain");
            let file = img.pages.as_ref().expect("present pages have a file");
            let size = file
                .metadata()
                .map_err(io_err(img.pages_path(), FileOp::Stat))?
                .len();
            if size < end {
                return Err(ImageError::ShortRead {
                    path: img.pages_path().to_path_buf(),
                    offset: size,
                });
            }
        }
        let mut mappings = 0;
        let mut mapped = 0u64;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let flags = MapFlags::PRIVATE | MapFlags::FIXED;
        for s in plan.segments.iter().filter(|s| maps(s.kind)) {
            let at = (s.vaddr - vaddr) as usize;
            // In `dst..dst + len`: the plan covers `vaddr..vaddr + len` exactly.
            let ptr = dst.wrapping_add(at).cast::<c_void>();
            let (r, path, offset) = match s.kind {
                SegmentKind::Pages { depth, offset } => {
                    let img = self.ancestor(depth).expect("within the chain");
                    let file = img.pages.as_ref().expect("present pages have a file");
                    // SAFETY:
                    // - `ptr` is page-aligned: `dst` was checked, `at` is whole pages;
                    // - `ptr..ptr + s.len` lies in `dst..dst + len` (the plan's cover);
                    // - that range is the caller's to replace, no reference into it used
                    //   again (the caller's promise);
                    // - the file holds `offset..offset + s.len` (checked above), so no
                    //   page of the mapping is past its end;
                    // - the file stays unchanged while mapped (the caller's promise), so
                    //   no byte changes under a reference and no page leaves the file;
                    // - MAP_PRIVATE: writes to the mapping never reach the file.
                    let r =
                        unsafe { rustix::mm::mmap(ptr, s.len as usize, prot, flags, file, offset) };
                    (r, Some(img.pages_path().to_path_buf()), offset)
                }
                SegmentKind::Zero | SegmentKind::Lazy => {
                    // SAFETY:
                    // - `ptr` is page-aligned: `dst` was checked, `at` is whole pages;
                    // - `ptr..ptr + s.len` lies in `dst..dst + len` (the plan's cover);
                    // - that range is the caller's to replace (the caller's promise);
                    // - a private anonymous mapping is zeros, shared with no one.
                    let r = unsafe { rustix::mm::mmap_anonymous(ptr, s.len as usize, prot, flags) };
                    (r, None, 0)
                }
            };
            match r {
                // MAP_FIXED maps at the address asked, or fails.
                Ok(_) => {}
                Err(e) => {
                    return Err(ImageError::Map {
                        path,
                        offset,
                        vaddr: s.vaddr,
                        len: s.len,
                        replaced: mapped,
                        error: io::Error::from(e),
                    });
                }
            }
            mappings += 1;
            mapped += s.len;
        }
        Ok(MapReport {
            report: plan.report,
            mappings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefaulting_changes_no_byte() {
        let ps = page_pipe_sys::page_size().get();
        let mut v: Vec<u8> = (0..5 * ps + 100).map(|i| i as u8).collect();
        let copy = v.clone();
        // Unaligned on purpose: only the whole pages inside are prefaulted.
        let _ = prefault(&mut v[7..]);
        assert_eq!(v, copy);
        assert!(prefault(&mut []));
    }

    #[test]
    fn mappings_are_counted_with_what_remains_between_them() {
        let seg = |kind| Segment {
            vaddr: 0,
            len: 0,
            kind,
        };
        let page = seg(SegmentKind::Pages {
            depth: 0,
            offset: 0,
        });
        let (zero, lazy) = (seg(SegmentKind::Zero), seg(SegmentKind::Lazy));
        let keep = |k: SegmentKind| matches!(k, SegmentKind::Pages { .. });
        let all = |_: SegmentKind| true;
        assert_eq!(mappings_needed(&[], keep), 0);
        assert_eq!(mappings_needed(&[zero, lazy, zero], keep), 0);
        assert_eq!(mappings_needed(&[zero, lazy, zero], all), 5);
        assert_eq!(mappings_needed(&[page], keep), 3);
        // page, hole, page, hole, hole, page: 3 mappings, 2 runs kept, 2 ends.
        let scattered = [page, zero, page, zero, lazy, page];
        assert_eq!(mappings_needed(&scattered, keep), 7);
        assert_eq!(mappings_needed(&scattered, all), 8);
        assert_eq!(mappings_needed(&[lazy, page, zero], keep), 5);
    }

    #[test]
    fn residency_tells_touched_pages_from_fresh_ones() {
        let ps = page_pipe_sys::page_size().get();
        let mut m = memmap2::MmapOptions::new().len(4 * ps).map_anon().unwrap();
        let r = Residency::open();
        if r.0.is_none() {
            eprintln!(
                "SKIPPED residency_tells_touched_pages_from_fresh_ones: no /proc/self/pagemap"
            );
            return;
        }
        assert!(!r.is_in(m.as_ptr()));
        m[ps] = 1;
        assert!(r.is_in(m[ps..].as_ptr()));
        assert!(!r.is_in(m[2 * ps..].as_ptr()));
        assert!(prefault(&mut m[2 * ps..]) || !r.is_in(m[2 * ps..].as_ptr()));
        if prefault(&mut m[2 * ps..]) {
            assert!(
                r.is_in(m[3 * ps..].as_ptr()),
                "prefaulted, yet not in memory"
            );
        }
    }

    #[test]
    fn the_limit_is_the_kernels() {
        let text = std::fs::read_to_string(MAX_MAP_COUNT_PATH).unwrap();
        assert_eq!(
            max_map_count().unwrap(),
            text.trim().parse::<usize>().unwrap()
        );
        assert!(mappings_in_use().unwrap() > 0);
    }
}
