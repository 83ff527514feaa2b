//! Adding 1,000,000 pages in three patterns, page by page and in bulk, over real pipes
//! (fresh pipes, and pipes reused from a warm pool), over the fake backend (the
//! bookkeeping alone), and beside the bare pipe syscalls the real runs make.
//!
//! ```text
//! cargo bench -p page-pipe --bench add
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use page_pipe::testing::{FakeKernel, FakePipes};
use page_pipe::{BufFlags, HoleFlags, KernelPipes, PagePipe, PipeBackend, PipePool};

const PAGES: u64 = 1_000_000;
const BASE: u64 = 0x7f00_0000_0000;

#[derive(Clone, Copy, Debug)]
enum Pattern {
    /// One run of PAGES pages.
    Contiguous,
    /// A page, then a hole page, PAGES times.
    Alternating,
    /// PAGES pages, each its own run (a one-page gap between them).
    OwnRuns,
}

fn run<B: PipeBackend>(backend: B, pattern: Pattern, bulk: bool) -> u64 {
    let ps = backend.page_size().get() as u64;
    let mut pp = PagePipe::builder()
        .iov_budget(PAGES as usize)
        .build_with(backend)
        .unwrap();
    let empty = BufFlags::empty();
    match (pattern, bulk) {
        (Pattern::Contiguous, true) => pp.add_pages(BASE, PAGES, empty).unwrap(),
        (Pattern::Contiguous, false) => {
            for i in 0..PAGES {
                pp.add_page(BASE + i * ps, empty).unwrap();
            }
        }
        (Pattern::Alternating, _) => {
            for i in 0..PAGES {
                let a = BASE + 2 * i * ps;
                if bulk {
                    pp.add_pages(a, 1, empty).unwrap();
                    pp.add_holes(a + ps, 1, HoleFlags::PARENT).unwrap();
                } else {
                    pp.add_page(a, empty).unwrap();
                    pp.add_hole(a + ps, HoleFlags::PARENT).unwrap();
                }
            }
        }
        (Pattern::OwnRuns, _) => {
            for i in 0..PAGES {
                let a = BASE + 2 * i * ps;
                if bulk {
                    pp.add_pages(a, 1, empty).unwrap();
                } else {
                    pp.add_page(a, empty).unwrap();
                }
            }
        }
    }
    black_box(pp.stats().pages)
}

/// The pipe syscalls alone: make a pipe, read its size, grow it by doubling to 256
/// pages, close it; as many pipes as 1,000,000 pages need.
fn bare_syscalls() {
    let ps = page_pipe_sys::page_size().get();
    let cap = (page_pipe_sys::PipeLimits::get().unwrap().max_grant_pages()).min(819);
    let mut pipes = Vec::with_capacity(PAGES as usize / cap + 1);
    for _ in 0..PAGES.div_ceil(cap as u64) {
        let p = page_pipe_sys::pipe().unwrap();
        let mut size = page_pipe_sys::pipe_capacity(&p.read).unwrap() / ps;
        while size < cap {
            size =
                page_pipe_sys::set_pipe_capacity(&p.write, (2 * size).min(cap) * ps).unwrap() / ps;
        }
        pipes.push(p);
    }
    black_box(pipes.len());
}

fn bench(c: &mut Criterion) {
    let pool = PipePool::new(8192);
    let patterns = [Pattern::Contiguous, Pattern::Alternating, Pattern::OwnRuns];
    let mut g = c.benchmark_group("add");
    g.throughput(Throughput::Elements(PAGES));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("bare-syscalls", |b| b.iter(bare_syscalls));
    for pattern in patterns {
        for bulk in [false, true] {
            let how = if bulk { "bulk" } else { "per-page" };
            let id = |backend: &str| {
                BenchmarkId::new(format!("{backend}/{how}"), format!("{pattern:?}"))
            };
            g.bench_function(id("fake"), |b| {
                b.iter(|| run(FakePipes::new(FakeKernel::new(4096)), pattern, bulk))
            });
            g.bench_function(id("real"), |b| {
                b.iter(|| run(KernelPipes::new().unwrap(), pattern, bulk))
            });
            g.bench_function(id("real-pooled"), |b| {
                b.iter(|| {
                    run(
                        KernelPipes::new().unwrap().with_pool(Arc::clone(&pool)),
                        pattern,
                        bulk,
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
