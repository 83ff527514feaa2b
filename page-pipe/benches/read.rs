//! Serving pages on demand: lookup alone, and a full read (tee, discard, drain), at
//! 1,000, 10,000 and 100,000 single-page runs, beside CRIU's linear scan and the bare
//! `tee` + `splice` + `read` calls, in the same run.
//!
//! ```text
//! cargo bench -p page-pipe --bench read
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use memmap2::MmapOptions;
use page_pipe::{BufFlags, Captured, PagePipe, ServeDest, Source};
use page_pipe_sys::{SpliceFlags, pipe, read_exact, splice_exact, tee_exact, vmsplice_all};

const BASE: u64 = 0x7f00_0000_0000;

/// Addresses of the runs in a shuffled order (xorshift, fixed seed).
fn shuffled(n: u64, ps: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).map(|i| BASE + 2 * i * ps).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// CRIU's `get_ppb`: scan every buf and run for the one holding `addr`.
fn linear_find(c: &Captured<'_>, addr: u64, ps: usize) -> Option<(u64, u64)> {
    for b in c.page_pipe().bufs() {
        let mut before = b.pipe_off;
        for r in b.runs {
            if r.vaddr() <= addr && addr < r.end(ps) {
                return Some((b.pipe.0, before + (addr - r.vaddr()) / ps as u64));
            }
            before += r.pages();
        }
    }
    None
}

fn bench(c: &mut Criterion) {
    let ps = page_pipe_sys::page_size().get();
    let mut g = c.benchmark_group("read");
    g.sample_size(30);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for n in [1_000u64, 10_000, 100_000] {
        let mut mem = MmapOptions::new()
            .len(2 * n as usize * ps)
            .map_anon()
            .unwrap();
        for (i, page) in mem.chunks_exact_mut(2 * ps).enumerate() {
            page[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        let source = Source::new().with_slice(BASE, &mem[..]).unwrap();
        let mut pp = PagePipe::builder()
            .iov_budget(n as usize)
            .lazy_pages(true)
            .build()
            .unwrap();
        for i in 0..n {
            pp.add_page(BASE + 2 * i * ps as u64, BufFlags::LAZY)
                .unwrap();
        }
        let mut captured = pp.capture(&source).unwrap();
        let mut dest = ServeDest::for_captured(&captured).unwrap();
        let order = shuffled(n, ps as u64);
        let mut page = vec![0u8; ps];

        let mut k = 0;
        g.bench_function(BenchmarkId::new("lookup/ours", n), |b| {
            b.iter(|| {
                k = (k + 1) % order.len();
                black_box(captured.find(order[k]))
            })
        });
        g.bench_function(BenchmarkId::new("lookup/linear (CRIU)", n), |b| {
            b.iter(|| {
                k = (k + 1) % order.len();
                black_box(linear_find(&captured, order[k], ps))
            })
        });
        g.bench_function(BenchmarkId::new("read+drain/ours", n), |b| {
            b.iter(|| {
                k = (k + 1) % order.len();
                let mut s = captured
                    .serve(&mut dest, order[k], 1, BufFlags::LAZY)
                    .unwrap();
                s.read_into(&mut page).unwrap();
            })
        });

        // The bare calls over pipes laid out the same way (256 pages each), with the
        // position of every page known beforehand.
        // The size of the pipes the pages are in (the first buf is the empty one every page
        // pipe starts with, in a pipe of its own).
        let per_pipe = captured
            .page_pipe()
            .bufs()
            .map(|b| b.capacity)
            .max()
            .unwrap() as usize;
        let mut pipes = Vec::new();
        for chunk in (0..n as usize).collect::<Vec<_>>().chunks(per_pipe) {
            let p = pipe().unwrap();
            page_pipe_sys::set_pipe_capacity(&p.write, per_pipe * ps).unwrap();
            let pages: Vec<&[u8]> = chunk.iter().map(|&i| &mem[2 * i * ps..][..ps]).collect();
            // SAFETY: `p.write` is a pipe's write end; no GIFT; `mem` outlives the pipes.
            unsafe { vmsplice_all(&p.write, &pages, SpliceFlags::NONBLOCK) }.unwrap();
            pipes.push(p);
        }
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let d = pipe().unwrap();
        page_pipe_sys::set_pipe_capacity(&d.write, per_pipe * ps).unwrap();
        let pos: Vec<(usize, usize)> = order
            .iter()
            .map(|a| {
                let i = ((a - BASE) / (2 * ps as u64)) as usize;
                (i / per_pipe, i % per_pipe)
            })
            .collect();
        let bare = |p: &page_pipe_sys::Pipe, skip: usize, page: &mut [u8]| {
            tee_exact(&p.read, &d.write, (skip + 1) * ps, SpliceFlags::NONBLOCK).unwrap();
            if skip > 0 {
                splice_exact(&d.read, None, &null, None, skip * ps, SpliceFlags::empty()).unwrap();
            }
            read_exact(&d.read, page).unwrap();
        };
        g.bench_function(
            BenchmarkId::new("read+drain/bare tee+splice+read", n),
            |b| {
                b.iter(|| {
                    k = (k + 1) % pos.len();
                    let (pi, skip) = pos[k];
                    bare(&pipes[pi], skip, &mut page);
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("read+drain/linear lookup (CRIU)", n),
            |b| {
                b.iter(|| {
                    k = (k + 1) % pos.len();
                    let (pipe_id, _) = linear_find(&captured, order[k], ps).unwrap();
                    black_box(pipe_id);
                    let (pi, skip) = pos[k];
                    bare(&pipes[pi], skip, &mut page);
                })
            },
        );
        drop((pipes, d));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
