//! `snapshot --live`: live snapshots of memory that writer threads keep changing during
//! every dump; each image restored and checked against the memory as it was at the
//! instant of its snapshot.
//!
//! The writers pause only at each snapshot's instant, while the tracker protects the
//! memory (the pause a VMM's guest would see) and while the demo records a checksum of
//! every page (the demo's own check, not part of the snapshot).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use memmap2::MmapOptions;
use page_pipe::image::{Image, ImageWriter};
use page_pipe::track::{Avoid, LiveKind, LiveOptions, TrackOptions, TrackRegion, Tracker};

use super::{Args, Fail, fail, fill_page, human, ms, parse_size};

/// The region, changed through its address only by the writers.
struct Region {
    base: usize,
    pages: usize,
    ps: usize,
    pause: RwLock<()>,
    stop: AtomicBool,
    writes: AtomicU64,
}

impl Region {
    /// One page's checksum, read with the writers paused.
    fn checksum(&self, page: usize) -> u64 {
        let mut buf = vec![0u8; self.ps];
        // SAFETY: the page is in the demo's mapping, alive while the region is; the caller
        // holds the pause lock for writing, so nothing writes it meanwhile.
        unsafe {
            page_pipe_sys::copy_from_raw(&mut buf, (self.base + page * self.ps) as *const u8)
        };
        hash(&buf)
    }
}

fn hash(page: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in page.chunks_exact(8) {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub fn run(args: &[String]) -> Result<(), Fail> {
    let mut a = Args { rest: args };
    a.check(
        &["--size", "--dir", "--writers", "--interval-us"],
        &["--live"],
        0,
    )?;
    let size = parse_size(a.value("--size")?.unwrap_or("256M"))?;
    let dir = PathBuf::from(a.value("--dir")?.unwrap_or("./snapshots-live"));
    let nwriters: usize = match a.value("--writers")?.unwrap_or("2").parse() {
        Ok(n) if n <= 64 => n,
        _ => return fail("--writers takes a number up to 64"),
    };
    let interval = match a.value("--interval-us")?.unwrap_or("10").parse::<u64>() {
        Ok(us) => Duration::from_micros(us),
        Err(_) => return fail("--interval-us takes a number of microseconds"),
    };
    let ps = page_pipe_sys::page_size().get();
    let pages = size.div_ceil(ps as u64) as usize;
    let mut mem = MmapOptions::new()
        .len(pages * ps)
        .map_anon()
        .map_err(|e| Fail(format!("cannot map {} bytes: {e}", pages * ps)))?;
    for (i, page) in mem.chunks_exact_mut(ps).enumerate() {
        fill_page(page, i as u64, 1);
    }
    let base = mem.as_ptr() as u64;
    for d in ["1", "2"] {
        match std::fs::remove_dir_all(dir.join(d)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return fail(format!("{}: cannot clear: {e}", dir.join(d).display())),
        }
    }
    let opts = TrackOptions {
        avoid: Avoid::WP_ASYNC,
        ..TrackOptions::default()
    };
    // SAFETY: the region is the demo's own anonymous mapping, alive until the tracker is
    // stopped: no allocator heap, stack or lock lives in it, and its writers hold only the
    // pause lock, which the tracker's handler thread never takes.
    let mut tracker = unsafe { Tracker::start(&[TrackRegion::of(base, &mem[..])], &opts) }
        .map_err(|e| {
            Fail(format!(
                "live snapshots need synchronous userfaultfd tracking: {e}"
            ))
        })?;
    let region = Arc::new(Region {
        base: mem.as_mut_ptr() as usize,
        pages,
        ps,
        pause: RwLock::new(()),
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
    });
    let writers: Vec<_> = (0..nwriters)
        .map(|t| {
            let r = Arc::clone(&region);
            std::thread::spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ (t as u64 + 1);
                while !r.stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % r.pages as u64) as usize;
                    {
                        let _g = r.pause.read().expect("the pause lock");
                        let at = (r.base + page * r.ps + (x as usize % (r.ps / 8)) * 8) as *mut u64;
                        // SAFETY: a word of the demo's mapping; only writers write it, with
                        // volatile stores; it is read only while they are paused (or by the
                        // kernel and volatile copies).
                        unsafe { at.write_volatile(x) };
                    }
                    r.writes.fetch_add(1, Ordering::Relaxed);
                    if !interval.is_zero() {
                        std::thread::sleep(interval);
                    }
                }
            })
        })
        .collect();
    println!(
        "region: {pages} pages ({}) at {base:#x}; {nwriters} writer threads, each writing a random page every {} us; tracking: {}",
        human((pages * ps) as u64),
        interval.as_micros(),
        tracker.info().method
    );
    let live_opts = LiveOptions::default();
    let mut sums = Vec::new();
    println!(
        "\n{:<12} {:>9} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "snapshot", "pages", "pause", "dump", "bytes", "saved pages", "written during"
    );
    for (i, kind) in [LiveKind::Full, LiveKind::Incremental]
        .into_iter()
        .enumerate()
    {
        let d = dir.join(format!("{}", i + 1));
        let (live, sum) = {
            let _paused = region.pause.write().expect("the pause lock");
            // SAFETY: as for `Tracker::start` above; the mapping outlives the dump.
            let live = unsafe { tracker.live(kind, &live_opts) }?;
            let sum: Vec<u64> = (0..pages).map(|p| region.checksum(p)).collect();
            (live, sum)
        };
        sums.push(sum);
        let mut w = ImageWriter::create(&d, 1)?;
        if i == 1 {
            w = w.with_parent(dir.join("1"))?;
        }
        let report = live.dump(&mut w)?;
        let summary = w.finish()?;
        println!(
            "{:<12} {:>9} {:>10} {:>10} {:>10} {:>12} {:>14}",
            format!("{kind:?}").to_lowercase(),
            report.snapshot.pages,
            ms(report.pause),
            ms(report.dump_time),
            human(summary.present_pages * ps as u64),
            report.saved_pages,
            report.faults,
        );
    }
    region.stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join()
            .map_err(|_| Fail("a writer thread panicked".into()))?;
    }
    let writes = region.writes.load(Ordering::Relaxed);
    tracker.stop()?;
    drop(mem);
    // Restore each image into fresh memory and compare every page with its checksum.
    let mut fresh = MmapOptions::new()
        .len(pages * ps)
        .map_anon()
        .map_err(|e| Fail(format!("cannot map {} bytes: {e}", pages * ps)))?;
    for (i, sum) in sums.iter().enumerate() {
        let d = dir.join(format!("{}", i + 1));
        Image::open(&d)?.read(base, &mut fresh[..])?;
        if let Some(p) = (0..pages).find(|&p| hash(&fresh[p * ps..(p + 1) * ps]) != sum[p]) {
            return fail(format!(
                "{}: page {p} differs from the memory at the snapshot's instant",
                d.display()
            ));
        }
    }
    println!(
        "\nverify: both live snapshots restore to the memory at their instants ({} each; {writes} writes while they ran)",
        human((pages * ps) as u64)
    );
    Ok(())
}
