//! Guest memory of rust-vmm VMMs (the `vm-memory` cargo feature): snapshots of a
//! `GuestMemoryMmap`, restores and received pages into one, and snapshot plans from its
//! dirty bitmaps and KVM's dirty logs, all without `unsafe` in the caller's code.
//!
//! ```
//! use page_pipe::image::{Image, ImageWriter};
//! use page_pipe::snapshot::{snapshot, SnapshotOptions};
//! use page_pipe::vm::{self, GuestRestoreOptions};
//! use page_pipe::Source;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // Two regions with a gap between them, as a VMM lays out guest RAM.
//! let layout = [(GuestAddress(0), 1 << 20), (GuestAddress(0x1_0000_0000), 1 << 20)];
//! let mem = GuestMemoryMmap::<()>::from_ranges(&layout)?;
//! mem.write_slice(b"hello", GuestAddress(0x1_0000_0100))?;
//!
//! // With the vCPUs paused: a full snapshot, every page of every region.
//! let dir = std::env::temp_dir().join(format!("pp-doc-vm-{}", std::process::id()));
//! let source = Source::new().with_guest_memory(&mem)?;
//! let mut image = ImageWriter::create(&dir, 1)?;
//! snapshot(&source, vm::full_plan(&mem)?, &mut image, &SnapshotOptions::default())?;
//! image.finish()?;
//!
//! // Restore into fresh guest memory of the same layout.
//! let fresh = GuestMemoryMmap::<()>::from_ranges(&layout)?;
//! let opts = GuestRestoreOptions { fresh: true, ..GuestRestoreOptions::default() };
//! vm::restore(&Image::open(&dir)?, &fresh, &opts)?;
//! let mut back = [0u8; 5];
//! fresh.read_slice(&mut back, GuestAddress(0x1_0000_0100))?;
//! assert_eq!(&back, b"hello");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The guide for VMM authors, with the whole cycle (full snapshot, dirty bitmap,
//! incremental snapshot, restore, migration), is [`guide::vmm`](crate::guide::vmm).
//!
//! # Which vm-memory
//!
//! vm-memory 0.18, re-exported as [`vm_memory`] so that a VMM can use the very version
//! this crate was built with (types of two versions of vm-memory are different types). In
//! 0.18 the collection of regions is the trait `GuestMemoryBackend` (called `GuestMemory`
//! before 0.18; 0.18's `GuestMemory` is memory behind an IOMMU, which every
//! `GuestMemoryBackend` also is). Everything here takes a `GuestMemoryBackend` whose
//! regions are `GuestRegionMmap`s, such as `GuestMemoryMmap<B>` for any bitmap `B`.
//!
//! # What vm-memory promises, and what it does not
//!
//! A `GuestRegionMmap` keeps its mapping alive as long as it lives (it unmaps it on drop,
//! or, for a mapping made elsewhere with `MmapRegion::build_raw`, under that `unsafe`
//! constructor's promise), and vm-memory lends its memory out only as `VolatileSlice`s and
//! raw pointers, never as `&[u8]`: it is valid for volatile access for as long as the
//! region is borrowed. That is the promise the one `unsafe` module here
//! ([`Source::with_guest_memory`](crate::Source::with_guest_memory) and the reads into
//! guest memory) builds on, and the crate checks what it relies on (below).
//!
//! vm-memory does *not* promise that the memory holds still: the guest writes it whenever
//! its vCPUs run, and so do device threads. So it is volatile memory:
//!
//! - a [`Source`](crate::Source) holds it as memory others may write at any time
//!   ([`Source::with_volatile`](crate::Source::with_volatile)): captures copy it into pipes
//!   with `write(2)`, dumps write it from its address, callbacks get a volatile copy; the
//!   crate never makes a `&[u8]` of it, and never hands it out by reference;
//! - restores and received pages go in through vm-memory's own accessors: the
//!   `VolatileSlice`s of `get_slices`, filled by `pread(2)`/`read(2)` into the slice
//!   (`ReadVolatile`) or by `VolatileSlice::copy_from`, which also mark vm-memory's dirty
//!   bitmap as its own writes do.
//!
//! **A snapshot of running guest memory is consistent only while the vCPUs (and any device
//! thread that writes guest memory) are paused**, from the first page read to the last.
//! Pause them for the whole snapshot, or use the live snapshot, which pauses them only to
//! write-protect the memory.
//!
//! # Rules
//!
//! - Each region is at its guest-physical address. Its address and length are whole pages
//!   ([`VmError::Unaligned`]), it is not empty, and no two regions overlap in guest
//!   addresses or in host memory ([`VmError::Overlap`]).
//! - A region read or written by address has a host mapping (`as_ptr` and
//!   `get_host_address` agree and are not null: [`VmError::NoHostAddress`]) that starts on
//!   a page boundary and whose protection allows the access ([`VmError::Protection`]).
//! - Gaps between regions are no memory: a page of an image, an entry, or a dirty log that
//!   falls in a gap or outside all regions is [`VmError::OutsideMemory`] naming its guest
//!   address, found before anything is written.
//! - Plans go region by region in address order, each region's spans in address order,
//!   none crossing a region's end; gaps are not in them. A plan says `PARENT` only for
//!   pages the parent image chain holds ([`DirtySet::plan`]); [`full_plan`] captures
//!   everything.

mod dirty;
mod error;
mod guest;
mod restore;
mod writer;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

use crate::snapshot::Span;
use crate::types::BufFlags;

pub use dirty::DirtySet;
pub use error::{Access, ImageOp, VmError};
pub(crate) use guest::FdReader;
pub use restore::{GuestRestoreOptions, restore};
pub use vm_memory;
pub use writer::GuestWriter;

/// The plan of a full snapshot of `mem`: every page of every region, region by region
/// (see the [module rules](self)).
///
/// ```
/// use page_pipe::snapshot::Span;
/// use page_pipe::vm;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// let ps = page_pipe::page_size() as u64;
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[
///     (GuestAddress(0), 4 * ps as usize),
///     (GuestAddress(16 * ps), 2 * ps as usize),
/// ])?;
/// let plan = vm::full_plan(&mem)?;
/// assert_eq!(plan.len(), 2);
/// assert!(matches!(plan[1], Span::Pages { addr, pages: 2, .. } if addr == 16 * ps));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`VmError`] when a region breaks a rule of the [module docs](self).
pub fn full_plan<M, B>(mem: &M) -> Result<Vec<Span>, VmError>
where
    M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
    B: Bitmap,
{
    let layout = Layout::of(mem, None)?;
    let ps = layout.page_size as u64;
    Ok(layout
        .regions
        .iter()
        .map(|r| Span::Pages {
            addr: r.addr,
            pages: r.len / ps,
            flags: BufFlags::empty(),
        })
        .collect())
}

/// One region as checked: guest address, length, host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegionInfo {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) host: usize,
}

/// Checks one region by the [module rules](self) that concern it alone: whole pages, not
/// empty, and, when the memory is to be accessed (`access`), a host mapping that agrees
/// with `get_host_address`, starts on a page boundary and allows the access.
pub(crate) fn check_region<B: Bitmap>(
    r: &GuestRegionMmap<B>,
    page_size: usize,
    access: Option<Access>,
) -> Result<RegionInfo, VmError> {
    let addr = r.start_addr().0;
    let len = GuestMemoryRegion::len(r);
    let ps = page_size as u64;
    if len == 0 {
        return Err(VmError::Empty { addr });
    }
    if !addr.is_multiple_of(ps) || !len.is_multiple_of(ps) || addr.checked_add(len).is_none() {
        return Err(VmError::Unaligned {
            addr,
            len,
            page_size,
        });
    }
    let host = r.as_ptr() as usize;
    let Some(access) = access else {
        return Ok(RegionInfo { addr, len, host });
    };
    let via_trait = r.get_host_address(MemoryRegionAddress(0)).ok();
    if host == 0 || via_trait.map(|p| p as usize) != Some(host) {
        return Err(VmError::NoHostAddress { addr });
    }
    if !host.is_multiple_of(page_size) {
        return Err(VmError::UnalignedHost { addr, host });
    }
    let prot = r.prot() as u32;
    let needed = match access {
        Access::Read => rustix::mm::ProtFlags::READ.bits(),
        Access::Write => rustix::mm::ProtFlags::WRITE.bits(),
    };
    if prot & needed == 0 {
        return Err(VmError::Protection {
            addr,
            needs: access,
        });
    }
    Ok(RegionInfo { addr, len, host })
}

/// The regions of a guest memory, checked, in guest address order.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) regions: Vec<RegionInfo>,
    pub(crate) page_size: usize,
}

impl Layout {
    /// The regions of `mem`, checked by the [module rules](self); with `access`, their host
    /// mappings too.
    pub(crate) fn of<M, B>(mem: &M, access: Option<Access>) -> Result<Self, VmError>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
        B: Bitmap,
    {
        let page_size = crate::page_size();
        let regions = mem
            .iter()
            .map(|r| check_region(r, page_size, access))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(regions, page_size, access.is_some())
    }

    /// Sorts `regions` by guest address and checks that none overlaps another, in guest
    /// addresses or (with `host`) in host memory.
    pub(crate) fn new(
        mut regions: Vec<RegionInfo>,
        page_size: usize,
        host: bool,
    ) -> Result<Self, VmError> {
        regions.sort_by_key(|r| r.addr);
        for w in regions.windows(2) {
            if w[0].addr + w[0].len > w[1].addr {
                return Err(VmError::Overlap {
                    addr: w[1].addr,
                    other: w[0].addr,
                });
            }
        }
        if host {
            let mut by_host: Vec<&RegionInfo> = regions.iter().collect();
            by_host.sort_by_key(|r| r.host);
            for w in by_host.windows(2) {
                if (w[0].host as u64).saturating_add(w[0].len) > w[1].host as u64 {
                    return Err(VmError::Overlap {
                        addr: w[1].addr,
                        other: w[0].addr,
                    });
                }
            }
        }
        Ok(Self { regions, page_size })
    }

    /// The index of the region holding guest address `addr`.
    pub(crate) fn find(&self, addr: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.addr <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        (addr - r.addr < r.len).then_some(i)
    }

    /// Checks that the `pages` pages from guest address `addr` are all in regions;
    /// [`VmError::OutsideMemory`] names the first that is not.
    pub(crate) fn check_range(&self, addr: u64, pages: u64) -> Result<(), VmError> {
        let ps = self.page_size as u64;
        let end = pages
            .checked_mul(ps)
            .and_then(|b| addr.checked_add(b))
            .unwrap_or(u64::MAX);
        let mut at = addr;
        while at < end {
            match self.find(at) {
                Some(i) => {
                    let r = &self.regions[i];
                    at = r.addr + r.len;
                }
                None => {
                    // Up to the next region, or the end of the range.
                    let next = self.regions.partition_point(|r| r.addr <= at);
                    let stop = self.regions.get(next).map_or(end, |r| r.addr.min(end));
                    return Err(VmError::OutsideMemory {
                        addr: at,
                        pages: (stop - at).div_ceil(ps),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(addr: u64, len: u64, host: usize) -> RegionInfo {
        RegionInfo { addr, len, host }
    }

    #[test]
    fn ranges_name_the_first_page_in_no_region() {
        let l = Layout::new(
            vec![
                info(0x10000, 0x4000, 0x1000_0000),
                info(0x0, 0x2000, 0x2000_0000),
            ],
            4096,
            true,
        )
        .unwrap();
        assert_eq!(l.regions[0].addr, 0);
        assert!(l.check_range(0, 2).is_ok());
        assert!(l.check_range(0x10000, 4).is_ok());
        match l.check_range(0x1000, 3) {
            Err(VmError::OutsideMemory { addr, pages }) => assert_eq!((addr, pages), (0x2000, 2)),
            other => panic!("{other:?}"),
        }
        match l.check_range(0x8000, 16) {
            Err(VmError::OutsideMemory { addr, pages }) => assert_eq!((addr, pages), (0x8000, 8)),
            other => panic!("{other:?}"),
        }
        match l.check_range(0x13000, 2) {
            Err(VmError::OutsideMemory { addr, pages }) => assert_eq!((addr, pages), (0x14000, 1)),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.find(0x13fff), Some(1));
        assert_eq!(l.find(0x14000), None);
    }

    #[test]
    fn overlaps_in_either_space_are_refused() {
        let e = Layout::new(
            vec![info(0, 0x2000, 0), info(0x1000, 0x1000, 0x9000)],
            4096,
            true,
        );
        assert!(matches!(
            e,
            Err(VmError::Overlap {
                addr: 0x1000,
                other: 0
            })
        ));
        let e = Layout::new(
            vec![info(0, 0x2000, 0x10000), info(0x8000, 0x1000, 0x11000)],
            4096,
            true,
        );
        assert!(matches!(e, Err(VmError::Overlap { .. })));
        // Host memory is not compared when it is not accessed.
        let ok = Layout::new(
            vec![info(0, 0x2000, 0x10000), info(0x8000, 0x1000, 0x11000)],
            4096,
            false,
        );
        assert!(ok.is_ok());
    }
}
