//! The asynchronous engine (`PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`), and finding which
//! pages are populated.

use page_pipe_sys::{
    Errno, PageCategories, PageRegion, Pagemap, PagemapEntry, PmScanArg, ScanFlags,
};

use super::bitmap::set_range;
use super::{Region, TrackError};

/// Page regions per `PAGEMAP_SCAN` call: 192 KiB, enough for 1 GiB with 1% of its pages
/// written at random in one call. When it fills, the scan stops at a page boundary
/// before a region it could not report, protecting nothing past it (a huge page is
/// never protected in part), and goes on from there.
const OUT_LEN: usize = 8192;

/// One `PAGEMAP_SCAN` of one page of this thread's stack: whether the call exists.
pub(crate) fn probe(pm: &Pagemap, ps: usize) -> Result<(), Errno> {
    let here = 0u8;
    let host = std::ptr::addr_of!(here) as usize / ps * ps;
    let mut arg = PmScanArg::new(host as u64, (host + ps) as u64);
    let mut out = [PageRegion::default(); 1];
    pm.scan(&mut arg, &mut out).map(drop)
}

/// Walks region `r` with the scan `arg` describes (its range is set here), calling `f`
/// with the first and last page (relative to the region) of each reported run.
fn walk(
    pm: &Pagemap,
    out: &mut [PageRegion],
    r: &Region,
    ps: usize,
    mut arg: PmScanArg,
    mut f: impl FnMut(u64, u64, PageCategories),
) -> Result<(), Option<Errno>> {
    let (start, end) = (r.host as u64, (r.host + r.len) as u64);
    arg.start = start;
    arg.end = end;
    loop {
        let n = pm.scan(&mut arg, out).map_err(Some)?;
        for reg in &out[..n] {
            // Never trust a range outside the one asked for.
            let (s, e) = (reg.start.max(start), reg.end.min(end));
            if s < e {
                f(
                    (s - start) / ps as u64,
                    (e - start).div_ceil(ps as u64),
                    PageCategories::from_bits_retain(reg.categories),
                );
            }
        }
        if arg.walk_end >= end {
            return Ok(());
        }
        if arg.walk_end <= arg.start && n == 0 {
            // No progress and nothing reported: a kernel answer we cannot go on from.
            return Err(None);
        }
        arg.start = arg.walk_end;
    }
}

/// Tracking with `UFFD_FEATURE_WP_ASYNC`: the kernel lifts a page's protection at its
/// first write; a scan reports those pages and protects them again.
#[derive(Debug)]
pub(crate) struct AsyncEngine {
    pm: Pagemap,
    out: Vec<PageRegion>,
}

impl AsyncEngine {
    pub fn new(pm: Pagemap) -> Self {
        Self {
            pm,
            out: vec![PageRegion::default(); OUT_LEN],
        }
    }

    pub fn pagemap(&self) -> &Pagemap {
        &self.pm
    }

    /// Sets in `bits[i]` the pages of region `i` written since the last call, and protects
    /// them again, in one walk per region.
    pub fn collect(
        &mut self,
        regions: &[Region],
        bits: &mut [Vec<u64>],
        ps: usize,
    ) -> Result<(), TrackError> {
        let mut arg = PmScanArg::new(0, 0);
        arg.flags = (ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC).bits();
        arg.category_mask = PageCategories::WRITTEN.bits();
        arg.return_mask = PageCategories::WRITTEN.bits();
        for (r, b) in regions.iter().zip(bits) {
            walk(&self.pm, &mut self.out, r, ps, arg, |s, e, _| {
                set_range(b, s, e)
            })
            .map_err(|errno| TrackError::Scan {
                addr: r.addr,
                host: r.host,
                errno,
            })?;
        }
        Ok(())
    }
}

/// Finds the populated pages of a region: with `PAGEMAP_SCAN`, or by reading
/// `/proc/self/pagemap`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Presence<'a> {
    pm: Option<&'a Pagemap>,
    use_scan: bool,
}

impl<'a> Presence<'a> {
    pub fn new(pm: Option<&'a Pagemap>, use_scan: bool) -> Self {
        Self { pm, use_scan }
    }

    /// Sets in `bits` the pages of `r` that hold data: present (not the shared zero page)
    /// or, `before_protect`, swapped out. After protection a never-populated page is a
    /// marker that reads as swapped, so only present pages count then. Without
    /// `/proc/self/pagemap` every page counts.
    pub fn populated(
        &self,
        r: &Region,
        bits: &mut [u64],
        before_protect: bool,
    ) -> Result<(), Option<Errno>> {
        let ps = page_pipe_sys::page_size().get();
        let Some(pm) = self.pm else {
            set_range(bits, 0, r.pages);
            return Ok(());
        };
        if self.use_scan {
            let mut arg = PmScanArg::new(0, 0);
            let mut any = PageCategories::PRESENT;
            if before_protect {
                any |= PageCategories::SWAPPED;
            }
            arg.category_anyof_mask = any.bits();
            arg.return_mask =
                (PageCategories::PRESENT | PageCategories::SWAPPED | PageCategories::PFNZERO)
                    .bits();
            let zero = PageCategories::PRESENT | PageCategories::PFNZERO;
            let mut out = vec![PageRegion::default(); OUT_LEN];
            return walk(pm, &mut out, r, ps, arg, |s, e, c| {
                if c != zero {
                    set_range(bits, s, e);
                }
            });
        }
        const CHUNK: usize = 4096;
        let mut entries = vec![PagemapEntry::default(); CHUNK];
        let mut page = 0u64;
        while page < r.pages {
            let n = (CHUNK as u64).min(r.pages - page) as usize;
            let got = pm
                .read_entries(r.host + page as usize * ps, &mut entries[..n])
                .map_err(Some)?;
            if got == 0 {
                // The end of /proc/self/pagemap inside the region: no answer to go on from.
                return Err(None);
            }
            for (k, e) in entries[..got].iter().enumerate() {
                if e.present() || (before_protect && e.swapped()) {
                    let p = page + k as u64;
                    set_range(bits, p, p + 1);
                }
            }
            page += got as u64;
        }
        Ok(())
    }
}
