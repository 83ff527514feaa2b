//! Dirty-tracking workloads that `benches/track.rs` (criterion) and `examples/bench.rs`
//! (the table of ratios) measure: ours and what a user would otherwise do.
#![allow(dead_code)]

use page_pipe_sys::{PageCategories, PageRegion, Pagemap, PmScanArg, ScanFlags};

/// The pages of `pages` chosen with probability `density`, in order (a fixed
/// pseudo-random pattern per `seed`).
pub fn random_pages(pages: u64, density: f64, seed: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let cut = (density * u64::MAX as f64) as u64;
    (0..pages)
        .filter(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d) < cut
        })
        .collect()
}

/// A KVM-style dirty log (one bit per page, least significant first) with `idx` set.
pub fn dirty_log(pages: u64, idx: &[u64]) -> Vec<u64> {
    let mut log = vec![0u64; pages.div_ceil(64) as usize];
    for &i in idx {
        log[(i / 64) as usize] |= 1 << (i % 64);
    }
    log
}

/// Writes one byte into each page of `idx`, with a value that changes its contents.
pub fn write_pages(mem: &mut [u8], ps: usize, idx: &[u64], round: u8) {
    for &i in idx {
        let b = &mut mem[i as usize * ps + 7];
        *b = b.wrapping_add(round | 1);
    }
}

/// `PAGEMAP_SCAN` called bare over `len` bytes at `start`, as the tracker calls it (written
/// pages, protected again in the same walk), looping while the output fills. Returns the
/// page regions reported.
pub fn bare_scan(pm: &Pagemap, start: usize, len: usize, out: &mut [PageRegion]) -> usize {
    let mut arg = PmScanArg::new(start as u64, (start + len) as u64);
    arg.flags = (ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC).bits();
    arg.category_mask = PageCategories::WRITTEN.bits();
    arg.return_mask = PageCategories::WRITTEN.bits();
    let mut regions = 0;
    loop {
        regions += pm.scan(&mut arg, out).expect("PAGEMAP_SCAN");
        if arg.walk_end >= arg.end {
            return regions;
        }
        arg.start = arg.walk_end;
    }
}

/// What a user without tracking does: compares the memory with a copy kept from the last
/// snapshot, page by page, and counts the pages that differ.
pub fn memcmp_pages(mem: &[u8], copy: &[u8], ps: usize) -> u64 {
    mem.chunks_exact(ps)
        .zip(copy.chunks_exact(ps))
        .filter(|(a, b)| a != b)
        .count() as u64
}
