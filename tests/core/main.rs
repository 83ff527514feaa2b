//! The page pipe against its pure model: random operation sequences over the fake backend
//! with injected failures and over real pipes, every observable compared after every step.

use std::sync::atomic::Ordering;

use page_pipe::testing::{Config, FakeKernel, FakePipes, Op, check_sequence};
use page_pipe::{BufFlags, KernelPipes, PagePipe, PipeBackend, Progress};
use page_pipe_sys::PipeLimits;
use page_pipe_tests::strategies::{config, fake_kernel, op};
use page_pipe_tests::{alone, open_fds};
use proptest::prelude::*;

const BASE: u64 = 0x7f00_0000_0000;

proptest! {
    #![proptest_config(page_pipe_tests::proptest_config(2000, "core"))]

    /// Over the fake backend, with failures injected at chosen pipe calls: the page pipe
    /// equals the model after every step, its invariants hold, and every fake pipe it
    /// made is closed once it is dropped.
    #[test]
    fn fake_backend_matches_the_model(
        cfg in config(fake_kernel()),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let fake = FakePipes::new(cfg.kernel.clone());
        let open = fake.open_counter();
        check_sequence(&cfg, fake, &ops, BASE).map_err(TestCaseError::fail)?;
        prop_assert_eq!(open.load(Ordering::Relaxed), 0, "fake pipes left open");
    }
}

fn real_config() -> impl Strategy<Value = Config> {
    let limits = *PipeLimits::get().unwrap();
    config(Just(FakeKernel::like(&limits)))
}

proptest! {
    #![proptest_config(page_pipe_tests::proptest_config(300, "core"))]

    /// Over real pipes: the kernel's answers are those the model predicts from the limits
    /// in force.
    #[test]
    fn real_pipes_match_the_model(
        cfg in real_config(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let backend = KernelPipes::new().unwrap();
        check_sequence(&cfg, backend, &ops, BASE).map_err(TestCaseError::fail)?;
    }
}

/// Bulk adds and page-by-page adds leave equal page pipes, over real pipes, with the
/// kernel's real growth; and no file descriptor outlives the page pipes.
#[test]
fn bulk_equals_page_by_page_over_real_pipes_and_closes_every_pipe() {
    if !alone("bulk_equals_page_by_page_over_real_pipes_and_closes_every_pipe") {
        return;
    }
    let before = open_fds();
    let ps = page_pipe_sys::page_size().get() as u64;
    let pattern: Vec<(u64, u64, BufFlags)> = (0..40)
        .map(|i| {
            let flags = if i % 7 == 3 {
                BufFlags::LAZY
            } else {
                BufFlags::empty()
            };
            (i * 1000 * ps, 1 + (i * 37) % 700, flags)
        })
        .collect();
    let mut bulk = PagePipe::builder().iov_budget(1 << 16).build().unwrap();
    let mut single = PagePipe::builder().iov_budget(1 << 16).build().unwrap();
    for &(addr, n, flags) in &pattern {
        bulk.add_pages(addr, n, flags).unwrap();
        for p in 0..n {
            single.add_page(addr + p * ps, flags).unwrap();
        }
    }
    let view = |pp: &PagePipe| {
        pp.bufs()
            .map(|b| (b.flags, b.runs.to_vec(), b.pipe_off, b.capacity, b.pipe))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&bulk), view(&single));
    assert_eq!(bulk.stats(), single.stats());
    assert!(open_fds() >= before + 2 * bulk.open_pipes());
    drop((bulk, single));
    assert_eq!(open_fds(), before, "file descriptors leaked");
}

/// Chunk mode over real pipes captures any amount with at most 8 pipes open.
#[test]
fn chunk_mode_over_real_pipes_stays_within_eight_pipes() {
    if !alone("chunk_mode_over_real_pipes_stays_within_eight_pipes") {
        return;
    }
    let before = open_fds();
    let ps = page_pipe_sys::page_size().get() as u64;
    let mut pp = PagePipe::builder()
        .chunk_mode()
        .iov_budget(64)
        .build()
        .unwrap();
    let total = 100_000u64;
    let (mut addr, mut left, mut chunks) = (BASE, total, 0);
    // What a full chunk holds: 8 pipes as the kernel grew them (it may round the cap up).
    let mut per_chunk = None;
    while left > 0 {
        match pp.add_pages(addr, left, BufFlags::empty()).unwrap() {
            Progress::Done => left = 0,
            Progress::Full { added } => {
                let cap: u64 = pp.bufs().map(|b| b.capacity).sum();
                assert_eq!(pp.bufs().count(), 8);
                assert_eq!(
                    added,
                    *per_chunk.get_or_insert(cap),
                    "every chunk fills 8 pipes"
                );
                addr += added * ps;
                left -= added;
                chunks += 1;
                assert!(pp.open_pipes() <= 8);
                assert!(open_fds() <= before + 16);
                pp.reinit();
            }
        }
    }
    assert_eq!(pp.stats().pages, total);
    // Each chunk fills 8 pipes; the last chunk is not full.
    assert_eq!(chunks, total.div_ceil(per_chunk.unwrap()) - 1);
    assert!(pp.stats().pipes_made <= 8);
    drop(pp);
    assert_eq!(open_fds(), before);
}

/// The operation decoder used by the fuzz target turns any bytes into operations.
#[test]
fn decoded_sequences_run_against_the_model() {
    let mut data: &[u8] = &[
        0x31, 9, 2, 0x05, 7, 3, 0, 200, 0x13, 0x0B, 1, 0x0D, 0x0E, 4, 0x0F,
    ];
    let cfg = Config::decode(&mut data);
    let mut ops = Vec::new();
    while let Some(op) = Op::decode(&mut data) {
        ops.push(op);
    }
    assert!(!ops.is_empty());
    check_sequence(&cfg, FakePipes::new(cfg.kernel.clone()), &ops, BASE).unwrap();
}

/// A pipe pool hands pipes from one page pipe to the next, grown, and keeps only empty
/// pipes up to its maximum; nothing outlives the pool.
#[test]
fn pooled_pipes_are_reused_empty_and_bounded() {
    if !alone("pooled_pipes_are_reused_empty_and_bounded") {
        return;
    }
    let before = open_fds();
    let pool = page_pipe::PipePool::new(3);
    let backend = || {
        KernelPipes::new()
            .unwrap()
            .with_pool(std::sync::Arc::clone(&pool))
    };
    // Pipes of at most 64 pages, whatever the machine grants.
    let cap = 64u64.min(backend().max_grant_pages());
    let mut pp = PagePipe::builder()
        .iov_budget(64)
        .max_pipe_pages(cap)
        .build_with(backend())
        .unwrap();
    pp.add_pages(BASE, 5 * cap, BufFlags::empty()).unwrap();
    assert_eq!(pp.open_pipes(), 5);
    drop(pp);
    assert_eq!(pool.len(), 3, "the pool keeps at most its maximum");
    assert_eq!(open_fds(), before + 6);
    // The next page pipe starts with a pooled pipe, already grown.
    let mut pp = PagePipe::builder()
        .iov_budget(64)
        .max_pipe_pages(cap)
        .build_with(backend())
        .unwrap();
    pp.add_pages(BASE, cap, BufFlags::empty()).unwrap();
    assert_eq!(pp.stats().resizes, 0);
    assert_eq!(pp.bufs().next().unwrap().capacity, cap);
    assert_eq!(pool.len(), 2);
    drop(pp);
    // A pipe with data in it is closed, not pooled.
    pool.clear();
    let mut k = backend();
    let (pipe, cap) = k.make_pipe().unwrap();
    page_pipe_sys::write_exact(&pipe.write, &[1u8; 10]).unwrap();
    k.release_pipe(pipe, cap, false);
    assert!(pool.is_empty());
    assert_eq!(open_fds(), before);
}
