//! Dirty sets to plans: a KVM-style dirty log of a 1 GiB region (262,144 pages, 32 KiB of
//! bitmap) turned into a plan at 0%, 1%, 50% and 100% of pages dirty (random pages), and,
//! where the kernel allows, a tracker's `take` of 1 GiB with 1% written beside
//! `PAGEMAP_SCAN` called bare. Goals (issue 12): ≤ 50 µs at 1%, ≤ 1 ms at 50%; `take`
//! ≤ 2× the bare scan.
//!
//! ```text
//! cargo bench -p page-pipe --bench track
//! ```

#[path = "workloads/track.rs"]
mod track_workloads;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use memmap2::MmapOptions;
use page_pipe::track::{TrackOptions, TrackRegion, Tracker, plan_from_dirty_log};
use page_pipe_sys::{PageRegion, Pagemap};
use track_workloads::{bare_scan, dirty_log, random_pages, write_pages};

const GIB: usize = 1 << 30;

fn bench(c: &mut Criterion) {
    let ps = page_pipe_sys::page_size().get();
    let pages = (GIB / ps) as u64;
    let mut g = c.benchmark_group("dirty-log-to-plan");
    g.sample_size(50);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for percent in [0.0, 1.0, 50.0, 100.0] {
        let idx = random_pages(pages, percent / 100.0, 1);
        let log = dirty_log(pages, &idx);
        g.bench_with_input(BenchmarkId::new("1GiB", percent), &log, |b, log| {
            b.iter(|| plan_from_dirty_log(black_box(log), 0x1_0000_0000, pages, ps).unwrap())
        });
    }
    g.finish();

    // The tracker's scan against the bare ioctl, 1 GiB with 1% written.
    let mut mem = MmapOptions::new().len(GIB).map_anon().unwrap();
    mem.fill(1);
    let region = [TrackRegion::of(0x1_0000_0000, &mem[..])];
    let mut t = match Tracker::start_async(&region, &TrackOptions::default()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIPPED take: {e}");
            return;
        }
    };
    let idx = random_pages(pages, 0.01, 2);
    let pm = Pagemap::open_self().unwrap();
    let mut out = vec![PageRegion::default(); 8192];
    let base = mem.as_ptr() as usize;
    let mut g = c.benchmark_group("scan-1GiB-1pct");
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(3));
    let mut round = 0u8;
    g.bench_function("take", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round = round.wrapping_add(1);
                write_pages(&mut mem, ps, &idx, round);
                let s = Instant::now();
                black_box(t.take().unwrap());
                total += s.elapsed();
            }
            total
        })
    });
    g.bench_function("bare PAGEMAP_SCAN", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round = round.wrapping_add(1);
                write_pages(&mut mem, ps, &idx, round);
                let s = Instant::now();
                black_box(bare_scan(&pm, base, GIB, &mut out));
                total += s.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
