//! [`DirtySet`]: the pages of guest memory written since the last snapshot, gathered from
//! vm-memory's `AtomicBitmap`s and KVM's dirty logs, and the incremental plan made from
//! them.

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use super::{ImageOp, Layout, VmError};
use crate::image::{Image, RestoreOptions, SegmentKind};
use crate::snapshot::Span;
use crate::track::extend_plan_from_dirty_log;
use crate::types::{BufFlags, HoleFlags};

/// The pages of a guest memory written since its last snapshot: one bit per page (of this
/// machine's page size) per region, laid out as KVM's dirty log (`u64` words, least
/// significant bit first). Filled from the regions' `AtomicBitmap`s
/// ([`take_bitmaps`](Self::take_bitmaps)), from KVM's dirty logs
/// ([`add_dirty_log`](Self::add_dirty_log)), or page by page ([`mark`](Self::mark)); the
/// union of them all. [`plan`](Self::plan) turns it into the plan of an incremental
/// snapshot.
///
/// The two sources see different writers: vm-memory's bitmap records the writes made
/// through its own accessors (`Bytes`, `VolatileSlice`: the VMM's devices), KVM's dirty
/// log the guest's own writes. A VMM tracking both adds both (as Firecracker does).
///
/// ```
/// use page_pipe::vm::DirtySet;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// let ps = page_pipe::page_size() as u64;
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 128 * ps as usize)])?;
/// let mut dirty = DirtySet::new(&mem)?;
/// // KVM's dirty log of the memory slot at guest address 0: pages 1, 2 and 64.
/// dirty.add_dirty_log(GuestAddress(0), 128, &[0b110, 1])?;
/// assert_eq!(dirty.pages(), 3);
/// assert!(dirty.is_dirty(GuestAddress(64 * ps)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct DirtySet {
    layout: Layout,
    /// One bitmap per region of `layout`, in the same order.
    words: Vec<Vec<u64>>,
}

impl DirtySet {
    /// An empty dirty set over the regions of `mem`, checked by the rules of the
    /// [`vm`](super) module.
    ///
    /// # Errors
    /// [`VmError`] naming a region that breaks a rule.
    pub fn new<M, B>(mem: &M) -> Result<Self, VmError>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<B>>,
        B: Bitmap,
    {
        let layout = Layout::of(mem, None)?;
        let ps = layout.page_size as u64;
        let words = layout
            .regions
            .iter()
            .map(|r| vec![0u64; (r.len / ps).div_ceil(64) as usize])
            .collect();
        Ok(Self { layout, words })
    }

    /// The number of dirty pages.
    pub fn pages(&self) -> u64 {
        self.words
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether the page holding guest address `addr` is dirty (false outside the memory).
    pub fn is_dirty(&self, addr: GuestAddress) -> bool {
        let Some(i) = self.layout.find(addr.0) else {
            return false;
        };
        let page = (addr.0 - self.layout.regions[i].addr) / self.layout.page_size as u64;
        self.words[i][(page / 64) as usize] >> (page % 64) & 1 == 1
    }

    /// Forgets every dirty page (for the next epoch, after a snapshot has been taken).
    pub fn clear(&mut self) {
        self.words.iter_mut().flatten().for_each(|w| *w = 0);
    }

    /// Marks the `pages` pages from guest address `addr` (page-aligned) dirty: pages the
    /// VMM wrote another way (a `write(2)` into guest memory by address, say).
    ///
    /// ```
    /// use page_pipe::vm::{DirtySet, VmError};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    /// let ps = page_pipe::page_size() as u64;
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * ps as usize)])?;
    /// let mut dirty = DirtySet::new(&mem)?;
    /// dirty.mark(GuestAddress(2 * ps), 2)?;
    /// assert_eq!(dirty.pages(), 2);
    /// // One page past the memory: refused, nothing marked.
    /// assert!(matches!(dirty.mark(GuestAddress(0), 5), Err(VmError::OutsideMemory { pages: 1, .. })));
    /// dirty.clear();
    /// assert_eq!(dirty.pages(), 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`VmError::Unaligned`] for an unaligned `addr`; [`VmError::OutsideMemory`] naming
    /// the first page in no region. Nothing is marked then.
    pub fn mark(&mut self, addr: GuestAddress, pages: u64) -> Result<(), VmError> {
        self.check(addr.0, pages)?;
        let ps = self.layout.page_size as u64;
        self.set(addr.0, addr.0 + pages * ps);
        Ok(())
    }

    /// Adds a dirty log of the `pages` pages from guest address `addr` (one KVM memory
    /// slot's `KVM_GET_DIRTY_LOG`: one bit per page, `u64` words, least significant bit
    /// first; bits past `pages` ignored). The pages may span adjacent regions but must all
    /// be in the memory. Returns the number of pages set in the log.
    ///
    /// # Errors
    /// [`VmError::ShortLog`] when the log has fewer than `pages` bits;
    /// [`VmError::Unaligned`] for an unaligned `addr`; [`VmError::OutsideMemory`] naming
    /// the first page in no region. Nothing is added then.
    pub fn add_dirty_log(
        &mut self,
        addr: GuestAddress,
        pages: u64,
        log: &[u64],
    ) -> Result<u64, VmError> {
        if (log.len() as u128) * 64 < pages as u128 {
            return Err(VmError::ShortLog {
                addr: addr.0,
                pages,
                words: log.len(),
            });
        }
        self.check(addr.0, pages)?;
        let ps = self.layout.page_size as u64;
        let mut set = 0;
        for_each_set_run(log, pages, |s, e| {
            set += e - s;
            self.set(addr.0 + s * ps, addr.0 + e * ps);
        });
        Ok(set)
    }

    /// Takes the dirty bits of every region's `AtomicBitmap` into the set and clears them
    /// (`get_and_reset`: bits set meanwhile are either taken now or left for next time),
    /// for the writes made through vm-memory's accessors since they were last taken.
    /// Returns the number of pages they marked.
    ///
    /// A bitmap may count in pages larger or smaller than this machine's (it does not
    /// say which; the size is found as the one power of two that gives it its number of
    /// bits for the region's bytes): a set bit marks every page it overlaps.
    ///
    /// ```
    /// use page_pipe::vm::DirtySet;
    /// use vm_memory::bitmap::AtomicBitmap;
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    /// let ps = page_pipe::page_size();
    /// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 64 * ps)])?;
    /// mem.write_slice(&[1, 2, 3], GuestAddress(5 * ps as u64 + 100))?; // a device writes
    /// let mut dirty = DirtySet::new(&mem)?;
    /// assert_eq!(dirty.take_bitmaps(&mem)?, 1);
    /// assert!(dirty.is_dirty(GuestAddress(5 * ps as u64)));
    /// assert_eq!(dirty.take_bitmaps(&mem)?, 0); // taken: the bitmaps are clear
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`VmError::LayoutChanged`] for a region the set was not made for;
    /// [`VmError::Bitmap`] for a bitmap that does not cover its region in pages of a
    /// power-of-two size. Every bitmap is checked before any is taken.
    pub fn take_bitmaps<M>(&mut self, mem: &M) -> Result<u64, VmError>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<AtomicBitmap>>,
    {
        let mut found = Vec::new();
        for r in mem.iter() {
            let addr = r.start_addr().0;
            let len = GuestMemoryRegion::len(r);
            let i = self
                .layout
                .find(addr)
                .filter(|&i| {
                    self.layout.regions[i].addr == addr && self.layout.regions[i].len == len
                })
                .ok_or(VmError::LayoutChanged { addr })?;
            let bitmap = MmapRegion::bitmap(r);
            let bad = VmError::Bitmap {
                addr,
                len,
                bytes: bitmap.byte_size(),
                bits: bitmap.len(),
            };
            if bitmap.byte_size() as u64 != len {
                return Err(bad);
            }
            let unit = granularity(bitmap.byte_size(), bitmap.len()).ok_or(bad)?;
            found.push((i, bitmap, unit));
        }
        let ps = self.layout.page_size as u64;
        let mut marked = 0;
        for (i, bitmap, unit) in found {
            let (addr, len) = (self.layout.regions[i].addr, self.layout.regions[i].len);
            let bits = bitmap.get_and_reset();
            for_each_set_run(&bits, bitmap.len() as u64, |s, e| {
                // The bytes the run covers, then every page they touch.
                let from = (s * unit).min(len) / ps * ps;
                let to = (e * unit).min(len).div_ceil(ps) * ps;
                marked += (to - from) / ps;
                self.set(addr + from, addr + to);
            });
        }
        Ok(marked)
    }

    /// The plan of an incremental snapshot on top of `parent` (the image chain of the last
    /// snapshot): region by region, dirty pages captured; of the others, those the parent
    /// chain holds are `PARENT` holes, and those it does not (a region it did not cover,
    /// pages it left out or holds only lazily) are captured too, so the new image never
    /// points to a parent that lacks the page. The dirty set must hold every page written
    /// since the parent was taken.
    ///
    /// ```
    /// use page_pipe::image::{Image, ImageWriter};
    /// use page_pipe::snapshot::{snapshot, SnapshotOptions, Span};
    /// use page_pipe::vm::{self, DirtySet};
    /// use page_pipe::{HoleFlags, Source};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    /// let ps = page_pipe::page_size() as u64;
    /// let dir = std::env::temp_dir().join(format!("pp-doc-dirty-{}", std::process::id()));
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 * ps as usize)])?;
    /// let source = Source::new().with_guest_memory(&mem)?;
    /// let mut full = ImageWriter::create(dir.join("1"), 1)?;
    /// snapshot(&source, vm::full_plan(&mem)?, &mut full, &SnapshotOptions::default())?;
    /// full.finish()?;
    ///
    /// let mut dirty = DirtySet::new(&mem)?;
    /// dirty.mark(GuestAddress(3 * ps), 1)?;
    /// let plan = dirty.plan(&Image::open(dir.join("1"))?)?;
    /// assert_eq!(plan.len(), 3);
    /// assert!(matches!(plan[0], Span::Hole { pages: 3, flags: HoleFlags::PARENT, .. }));
    /// assert!(matches!(plan[1], Span::Pages { addr, pages: 1, .. } if addr == 3 * ps));
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`VmError::PageSize`]; [`VmError::Image`] with [`ImageOp::Plan`] when the parent
    /// chain is broken (a `PARENT` page its own parent lacks).
    pub fn plan(&self, parent: &Image) -> Result<Vec<Span>, VmError> {
        let ps = self.layout.page_size;
        if parent.page_size() != ps {
            return Err(VmError::PageSize {
                image: parent.page_size(),
                page_size: ps,
            });
        }
        let mut out = Vec::new();
        let mut region_spans = Vec::new();
        for (r, words) in self.layout.regions.iter().zip(&self.words) {
            let pages = r.len / ps as u64;
            region_spans.clear();
            extend_plan_from_dirty_log(&mut region_spans, words, r.addr, pages, ps)
                .expect("a dirty set's bitmaps cover their regions, which are aligned");
            let held = parent
                .plan(r.addr, r.len, &RestoreOptions::default())
                .map_err(|error| VmError::Image {
                    op: ImageOp::Plan,
                    error,
                })?;
            // The parent's segments, as ranges it holds (true) or not.
            let mut segs = held
                .segments
                .iter()
                .map(|s| {
                    (
                        s.vaddr,
                        s.vaddr + s.len,
                        matches!(s.kind, SegmentKind::Pages { .. }),
                    )
                })
                .peekable();
            let mut push = |addr: u64, end: u64, capture: bool| {
                let n = (end - addr) / ps as u64;
                let joined = match (out.last_mut(), capture) {
                    (Some(Span::Pages { addr: a, pages, .. }), true)
                    | (Some(Span::Hole { addr: a, pages, .. }), false)
                        if *a + *pages * ps as u64 == addr && *a >= r.addr =>
                    {
                        *pages += n;
                        true
                    }
                    _ => false,
                };
                if !joined {
                    out.push(if capture {
                        Span::Pages {
                            addr,
                            pages: n,
                            flags: BufFlags::empty(),
                        }
                    } else {
                        Span::Hole {
                            addr,
                            pages: n,
                            flags: HoleFlags::PARENT,
                        }
                    });
                }
            };
            for span in &region_spans {
                let (addr, pages, dirty) = match *span {
                    Span::Pages { addr, pages, .. } => (addr, pages, true),
                    Span::Hole { addr, pages, .. } => (addr, pages, false),
                };
                let end = addr + pages * ps as u64;
                if dirty {
                    push(addr, end, true);
                    continue;
                }
                // Clean pages: PARENT where the parent holds them, captured elsewhere.
                let mut at = addr;
                while at < end {
                    while segs.next_if(|s| s.1 <= at).is_some() {}
                    let (_, seg_end, holds) =
                        *segs.peek().expect("the parent's plan covers the region");
                    let stop = seg_end.min(end);
                    push(at, stop, !holds);
                    at = stop;
                }
            }
        }
        Ok(out)
    }

    /// Checks that `pages` pages from `addr` are aligned and in the memory.
    fn check(&self, addr: u64, pages: u64) -> Result<(), VmError> {
        let ps = self.layout.page_size;
        if crate::addr::PageRange::new(addr, pages, ps).is_err() {
            return Err(VmError::Unaligned {
                addr,
                len: pages.saturating_mul(ps as u64),
                page_size: ps,
            });
        }
        self.layout.check_range(addr, pages)
    }

    /// Sets the pages of guest addresses `[from, to)`, all in regions.
    fn set(&mut self, from: u64, to: u64) {
        let ps = self.layout.page_size as u64;
        let mut at = from;
        while at < to {
            let i = self.layout.find(at).expect("checked to be in a region");
            let r = self.layout.regions[i];
            let stop = (r.addr + r.len).min(to);
            set_range(&mut self.words[i], (at - r.addr) / ps, (stop - r.addr) / ps);
            at = stop;
        }
    }
}

/// The page size of a bitmap of `bits` bits over `bytes` bytes: the power of two `p` with
/// `bytes.div_ceil(p) == bits` (unique when `bits > 1`; one bit covers everything).
fn granularity(bytes: usize, bits: usize) -> Option<u64> {
    match bits {
        0 => None,
        1 => Some((bytes as u64).max(1).next_power_of_two()),
        _ => (0..usize::BITS)
            .map(|s| 1usize << s)
            .find(|p| bytes.div_ceil(*p) == bits)
            .map(|p| p as u64),
    }
}

/// Calls `f(start, end)` for each maximal run of set bits among the first `bits` bits of
/// `words` (least significant bit first), in order.
fn for_each_set_run(words: &[u64], bits: u64, mut f: impl FnMut(u64, u64)) {
    let mut run: Option<u64> = None;
    for (wi, &w) in words.iter().enumerate() {
        let base = wi as u64 * 64;
        if base >= bits {
            break;
        }
        let valid = (bits - base).min(64) as u32;
        let w = if valid == 64 {
            w
        } else {
            w & ((1u64 << valid) - 1)
        };
        let mut off = 0u32;
        while off < valid {
            let rest = w >> off;
            match run {
                Some(start) => {
                    // Ones continue the run.
                    let ones = (!rest).trailing_zeros().min(valid - off);
                    off += ones;
                    if off < valid {
                        f(start, base + off as u64);
                        run = None;
                    }
                }
                None => {
                    if rest == 0 {
                        break;
                    }
                    off += rest.trailing_zeros();
                    run = Some(base + off as u64);
                }
            }
        }
    }
    if let Some(start) = run {
        f(start, bits);
    }
}

/// Sets bits `[from, to)`.
fn set_range(words: &mut [u64], from: u64, to: u64) {
    let mut i = from;
    while i < to {
        let w = (i / 64) as usize;
        let off = i % 64;
        let n = (64 - off).min(to - i);
        let mask = if n == 64 {
            !0
        } else {
            ((1u64 << n) - 1) << off
        };
        words[w] |= mask;
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn runs_are_the_set_bits(words in proptest::collection::vec(
            prop_oneof![Just(0u64), Just(!0u64), any::<u64>()], 0..5), cut in 0u64..320) {
            let bits = cut.min(words.len() as u64 * 64);
            let mut got = Vec::new();
            for_each_set_run(&words, bits, |s, e| got.push((s, e)));
            let mut want: Vec<(u64, u64)> = Vec::new();
            for i in 0..bits {
                if words[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                    match want.last_mut() {
                        Some(last) if last.1 == i => last.1 = i + 1,
                        _ => want.push((i, i + 1)),
                    }
                }
            }
            prop_assert_eq!(got, want);
        }

        #[test]
        fn set_range_sets_exactly_the_range(a in 0u64..300, b in 0u64..300) {
            let (from, to) = (a.min(b), a.max(b));
            let mut w = vec![0u64; 5];
            set_range(&mut w, from, to);
            for i in 0..320 {
                prop_assert_eq!(w[(i / 64) as usize] >> (i % 64) & 1 == 1, (from..to).contains(&i));
            }
        }
    }

    #[test]
    fn granularity_is_the_power_of_two_that_fits() {
        assert_eq!(granularity(1 << 20, 256), Some(4096));
        assert_eq!(granularity(1 << 20, 1024), Some(1024));
        assert_eq!(granularity(12 << 10, 2), Some(8192));
        assert_eq!(granularity(1 << 20, 1), Some(1 << 20));
        assert_eq!(granularity(1 << 20, 0), None);
        assert_eq!(granularity(1 << 20, 3), None);
    }
}
