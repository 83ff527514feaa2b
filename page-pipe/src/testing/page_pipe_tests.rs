//! Unit tests of the page pipe's rules over fake pipes.

use page_pipe_sys::Errno;

use super::{FakeKernel, FakePipes};
use crate::mode::{ChunkMode, IovStore, Mode, SinglePass};
use crate::page_pipe::{AddError, PagePipe, PipeId, Progress, UnknownBuf};
use crate::types::{BufFlags, HoleFlags, Run};
use crate::{CallerIovs, OwnIovs, PageFlags, PipeBackend};

const PS: u64 = 4096;

fn fake() -> FakePipes {
    FakePipes::new(FakeKernel::new(PS as usize))
}

fn single(budget: usize) -> PagePipe<SinglePass, OwnIovs, FakePipes> {
    PagePipe::builder()
        .iov_budget(budget)
        .build_with(fake())
        .unwrap()
}

fn chunked(budget: usize) -> PagePipe<ChunkMode, OwnIovs, FakePipes> {
    PagePipe::builder()
        .chunk_mode()
        .iov_budget(budget)
        .build_with(fake())
        .unwrap()
}

fn runs(pp: &PagePipe<impl Mode, impl IovStore, impl PipeBackend>) -> Vec<Vec<(u64, u64)>> {
    pp.bufs()
        .map(|b| b.runs.iter().map(|r| (r.vaddr / PS, r.pages)).collect())
        .collect()
}

#[test]
fn seed_layout_prints_in_seed_notation() {
    let mut pp = single(16);
    let base = 0x10_0000;
    let at = |n: u64| base + n * PS;
    // The seed's first example: 03:3, 0B:6, 18:4, all present.
    pp.add_pages(at(0x03), 3, BufFlags::empty()).unwrap();
    pp.add_pages(at(0x0B), 6, BufFlags::empty()).unwrap();
    pp.add_pages(at(0x18), 4, BufFlags::empty()).unwrap();
    assert_eq!(pp.notation(base).to_string(), "03:3,0B:6,18:4");
    assert_eq!(runs(&pp), vec![vec![(0x103, 3), (0x10B, 6), (0x118, 4)]]);
}

#[test]
fn page_by_page_coalesces_into_the_last_run() {
    let mut pp = single(4);
    for p in 0..10 {
        pp.add_page(p * PS, BufFlags::empty()).unwrap();
    }
    pp.add_page(20 * PS, BufFlags::empty()).unwrap();
    assert_eq!(runs(&pp), vec![vec![(0, 10), (20, 1)]]);
    assert_eq!(pp.runs_used(), 2);
}

#[test]
fn a_flag_change_starts_a_new_buf_sharing_the_pipe() {
    let mut pp = single(8);
    pp.add_pages(0, 3, BufFlags::empty()).unwrap();
    pp.add_pages(3 * PS, 2, BufFlags::LAZY).unwrap();
    pp.add_pages(5 * PS, 1, BufFlags::empty()).unwrap();
    let b: Vec<_> = pp
        .bufs()
        .map(|b| (b.flags, b.pipe, b.pipe_off, b.pages))
        .collect();
    // Lazy pages off: both kinds share pipe 0, back to back.
    assert_eq!(
        b,
        vec![
            (BufFlags::empty(), PipeId(0), 0, 3),
            (BufFlags::LAZY, PipeId(0), 3, 2),
            (BufFlags::empty(), PipeId(0), 5, 1),
        ]
    );
    assert_eq!(pp.notation(0).to_string(), "00:3,03:2:L,05:1");
}

#[test]
fn lazy_pages_keep_lazy_bufs_on_pipes_of_their_own() {
    let mut pp = PagePipe::builder()
        .iov_budget(8)
        .lazy_pages(true)
        .build_with(fake())
        .unwrap();
    pp.add_pages(0, 3, BufFlags::empty()).unwrap();
    pp.add_pages(3 * PS, 2, BufFlags::LAZY).unwrap();
    pp.add_pages(5 * PS, 1, BufFlags::empty()).unwrap();
    pp.add_pages(6 * PS, 1, BufFlags::LAZY).unwrap();
    let b: Vec<_> = pp.bufs().map(|b| (b.pipe, b.pipe_off)).collect();
    assert_eq!(
        b,
        vec![
            (PipeId(0), 0),
            (PipeId(1), 0),
            (PipeId(0), 3),
            (PipeId(1), 2)
        ]
    );
}

#[test]
fn pipes_grow_by_doubling_to_the_cap_then_a_new_pipe_is_made() {
    let mut pp = single(8);
    // The fake grants up to 256 pages (1 MiB), as pipe-max-size does here.
    pp.add_pages(0, 256, BufFlags::empty()).unwrap();
    assert_eq!(pp.stats().resizes, 4, "16 -> 32 -> 64 -> 128 -> 256");
    assert_eq!(pp.stats().pipes_made, 1);
    pp.add_page(256 * PS, BufFlags::empty()).unwrap();
    let b: Vec<_> = pp.bufs().map(|b| (b.pipe, b.capacity, b.pages)).collect();
    assert_eq!(b, vec![(PipeId(0), 256, 256), (PipeId(1), 16, 1)]);
    // The cap is min(PIPE_MAX_SIZE, what the kernel grants): no refused call was made.
    assert_eq!(pp.stats().resizes_refused, 0);
    assert_eq!(pp.backend().kernel().resizes(), 4);
    // The run continues across bufs: two runs, contiguous, in different bufs.
    assert_eq!(runs(&pp), vec![vec![(0, 256)], vec![(256, 1)]]);
}

#[test]
fn a_refused_size_is_not_asked_for_again() {
    let mut k = FakeKernel::new(PS as usize);
    k.fail_resize.insert(1); // 32 -> 64 refused once
    let mut pp = PagePipe::builder()
        .iov_budget(8)
        .build_with(FakePipes::new(k))
        .unwrap();
    pp.add_pages(0, 100, BufFlags::empty()).unwrap();
    let caps: Vec<_> = pp.bufs().map(|b| (b.capacity, b.pages)).collect();
    // Every pipe stops at 32 pages; 64 is never asked for again.
    assert_eq!(caps, vec![(32, 32), (32, 32), (32, 32), (16, 4)]);
    assert_eq!(pp.stats().resizes_refused, 1);
    assert_eq!(pp.backend().kernel().resizes(), 2 + 2);
}

#[test]
fn chunk_mode_is_full_at_eight_pipes_and_reuses_them_after_reinit() {
    let mut pp = chunked(64);
    let p = pp.add_pages(0, 10_000, BufFlags::empty()).unwrap();
    assert_eq!(p, Progress::Full { added: 8 * 256 });
    assert_eq!(pp.open_pipes(), 8);
    assert_eq!(pp.next_addr(), Some(8 * 256 * PS));
    // Adding more is still full, and changes nothing.
    assert_eq!(
        pp.add_page(8 * 256 * PS, BufFlags::empty()).unwrap(),
        Progress::Full { added: 0 }
    );
    pp.reinit();
    assert_eq!(pp.free_bufs(), 7);
    assert_eq!(pp.runs_used(), 0);
    // CRIU takes the most recently freed buf first: the last pipe of the chunk.
    assert_eq!(pp.bufs().next().unwrap().pipe, PipeId(7));
    let p = pp
        .add_pages(8 * 256 * PS, 10_000, BufFlags::empty())
        .unwrap();
    assert_eq!(p, Progress::Full { added: 8 * 256 });
    assert_eq!(pp.stats().pipes_made, 8, "no new pipe after re-init");
    let order: Vec<u64> = pp.bufs().map(|b| b.pipe.0).collect();
    assert_eq!(order, vec![7, 6, 5, 4, 3, 2, 1, 0]);
}

#[test]
fn chunk_mode_never_shares_pipes() {
    let mut pp = chunked(64);
    assert_eq!(pp.add_pages(0, 2, BufFlags::empty()), Ok(Progress::Done));
    assert_eq!(pp.add_pages(2 * PS, 2, BufFlags::LAZY), Ok(Progress::Done));
    let pipes: Vec<_> = pp.bufs().map(|b| b.pipe).collect();
    assert_eq!(pipes, vec![PipeId(0), PipeId(1)]);
}

#[test]
fn bad_addresses_are_errors_that_change_nothing() {
    let mut pp = single(8);
    pp.add_pages(10 * PS, 2, BufFlags::empty()).unwrap();
    let before = format!("{pp:?}");
    assert_eq!(
        pp.add_page(12 * PS + 1, BufFlags::empty()),
        Err(AddError::Unaligned {
            addr: 12 * PS + 1,
            page_size: PS as usize
        })
    );
    assert_eq!(
        pp.add_page(11 * PS, BufFlags::empty()),
        Err(AddError::OutOfOrder {
            addr: 11 * PS,
            min: 12 * PS
        })
    );
    assert_eq!(
        pp.add_hole(11 * PS, HoleFlags::PARENT),
        Err(AddError::OutOfOrder {
            addr: 11 * PS,
            min: 12 * PS
        })
    );
    let top = u64::MAX - PS + 1;
    assert_eq!(
        pp.add_pages(top, 2, BufFlags::empty()),
        Err(AddError::Overflow {
            addr: top,
            pages: 2
        })
    );
    assert_eq!(format!("{pp:?}"), before);
    let msg = AddError::OutOfOrder {
        addr: 0x1000,
        min: 0x3000,
    }
    .to_string();
    assert!(msg.contains("0x1000") && msg.contains("0x3000"), "{msg}");
}

#[test]
fn the_fast_paths_check_the_end_of_the_address_space() {
    let mut pp = single(8);
    let top = u64::MAX - PS + 1; // the last page
    pp.add_page(top - 2 * PS, BufFlags::empty()).unwrap();
    // Extending the last run, then a new run, up to the last page: fine.
    pp.add_page(top - PS, BufFlags::empty()).unwrap();
    // A page whose end is 2^64 cannot be added, whichever path looks at it.
    assert_eq!(
        pp.add_page(top, BufFlags::empty()),
        Err(AddError::Overflow {
            addr: top,
            pages: 1
        })
    );
    let mut pp = single(8);
    pp.add_page(top - 4 * PS, BufFlags::empty()).unwrap();
    assert_eq!(
        pp.add_page(top, BufFlags::empty()),
        Err(AddError::Overflow {
            addr: top,
            pages: 1
        })
    );
    assert_eq!(pp.next_addr(), Some(top - 3 * PS));
}

#[test]
fn an_exhausted_budget_stops_with_the_pages_that_went_in() {
    let mut pp = single(2);
    pp.add_page(0, BufFlags::empty()).unwrap();
    pp.add_page(2 * PS, BufFlags::empty()).unwrap();
    // Extending the last run needs no budget.
    pp.add_pages(3 * PS, 5, BufFlags::empty()).unwrap();
    let err = pp.add_pages(10 * PS, 1, BufFlags::empty()).unwrap_err();
    assert_eq!(
        err,
        AddError::IovBudget {
            addr: 10 * PS,
            budget: 2,
            added: 0
        }
    );
    // A flag change needs a new buf, hence a run: refused before any pipe is made.
    let made = pp.stats().pipes_made;
    let err = pp.add_pages(8 * PS, 3, BufFlags::LAZY).unwrap_err();
    assert_eq!(err.added(), 0);
    assert_eq!(pp.stats().pipes_made, made);
    assert_eq!(pp.stats().pages, 7);
    assert!(err.to_string().contains("budget"));
}

#[test]
fn a_refused_pipe_is_an_error_with_progress_and_the_page_pipe_goes_on() {
    let mut k = FakeKernel::new(PS as usize);
    k.max_pages = 16;
    k.fail_make.insert(1);
    let counter;
    let mut pp = {
        let fake = FakePipes::new(k);
        counter = fake.open_counter();
        PagePipe::builder().iov_budget(8).build_with(fake).unwrap()
    };
    let err = pp.add_pages(0, 20, BufFlags::empty()).unwrap_err();
    assert_eq!(
        err,
        AddError::MakePipe {
            addr: 16 * PS,
            errno: Errno::MFILE,
            added: 16
        }
    );
    assert!(err.to_string().contains("RLIMIT_NOFILE"));
    // The next try gets a pipe and carries on where it stopped.
    pp.add_pages(16 * PS, 4, BufFlags::empty()).unwrap();
    assert_eq!(pp.stats().pages, 20);
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 2);
    drop(pp);
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn tiny_pipes_past_the_soft_limit_are_an_error_naming_it() {
    let mut k = FakeKernel::new(PS as usize);
    k.max_pages = 16;
    k.tiny_after = Some(2);
    let mut pp = PagePipe::builder()
        .iov_budget(8)
        .build_with(FakePipes::new(k))
        .unwrap();
    let err = pp.add_pages(0, 100, BufFlags::empty()).unwrap_err();
    assert_eq!(
        err,
        AddError::PipeLimit {
            addr: 32 * PS,
            capacity: 2,
            expected: 16,
            added: 32
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("pipe-user-pages-soft") && msg.contains("chunk mode"),
        "{msg}"
    );
    assert_eq!(pp.open_pipes(), 2);
}

#[test]
fn holes_coalesce_only_with_equal_flags() {
    let mut pp = single(8);
    pp.add_holes(0, 2, HoleFlags::PARENT).unwrap();
    pp.add_hole(2 * PS, HoleFlags::PARENT).unwrap();
    pp.add_hole(3 * PS, HoleFlags::empty()).unwrap();
    pp.add_hole(5 * PS, HoleFlags::empty()).unwrap();
    let h: Vec<_> = pp
        .holes()
        .iter()
        .map(|h| (h.vaddr / PS, h.pages, h.flags))
        .collect();
    assert_eq!(
        h,
        vec![
            (0, 3, HoleFlags::PARENT),
            (3, 1, HoleFlags::empty()),
            (5, 1, HoleFlags::empty())
        ]
    );
    assert_eq!(pp.to_string(), "00:3:P,03:1:-,05:1:-");
    assert_eq!(pp.stats().holes, 3);
    assert_eq!(pp.stats().hole_pages, 5);
}

#[test]
fn a_shared_pipe_closes_with_its_last_buf() {
    let fake = fake();
    let counter = fake.open_counter();
    let mut pp = PagePipe::builder().iov_budget(8).build_with(fake).unwrap();
    pp.add_pages(0, 2, BufFlags::empty()).unwrap();
    pp.add_pages(2 * PS, 2, BufFlags::LAZY).unwrap();
    let ids: Vec<_> = pp.bufs().map(|b| b.id).collect();
    pp.release_buf(ids[0]).unwrap();
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(pp.release_buf(ids[0]), Err(UnknownBuf(ids[0])));
    pp.release_buf(ids[1]).unwrap();
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(pp.open_pipes(), 0);
    // Adding after all bufs are gone makes a new buf and pipe.
    pp.add_page(10 * PS, BufFlags::empty()).unwrap();
    assert_eq!(pp.open_pipes(), 1);
    assert_eq!(pp.bufs().next().unwrap().pipe, PipeId(1));
}

#[test]
fn caller_storage_holds_the_runs() {
    let mut storage = [Run::EMPTY; 3];
    {
        let mut pp: PagePipe<SinglePass, CallerIovs<'_>, FakePipes> = PagePipe::builder()
            .iov_storage(&mut storage)
            .build_with(fake())
            .unwrap();
        assert_eq!(pp.iov_budget(), 3);
        pp.add_pages(0, 2, BufFlags::empty()).unwrap();
        pp.add_pages(4 * PS, 2, BufFlags::empty()).unwrap();
        pp.add_pages(8 * PS, 2, BufFlags::empty()).unwrap();
        assert!(matches!(
            pp.add_page(11 * PS, BufFlags::empty()),
            Err(AddError::IovBudget { .. })
        ));
    }
    assert_eq!(storage[2], Run::new(8 * PS, 2));
}

#[test]
fn zero_budget_is_a_build_error() {
    let r = PagePipe::builder().iov_budget(0).build_with(fake());
    assert_eq!(r.unwrap_err(), crate::BuildError::ZeroBudget);
    let mut k = FakeKernel::new(PS as usize);
    k.fail_make.insert(0);
    let r = PagePipe::builder()
        .iov_budget(1)
        .build_with(FakePipes::new(k));
    assert_eq!(r.unwrap_err(), crate::BuildError::MakePipe(Errno::MFILE));
}

#[test]
fn entries_interleave_holes_and_runs_across_bufs() {
    let mut pp = single(16);
    pp.add_holes(0, 1, HoleFlags::PARENT).unwrap();
    pp.add_pages(PS, 2, BufFlags::empty()).unwrap();
    pp.add_holes(3 * PS, 1, HoleFlags::PARENT).unwrap();
    pp.add_pages(4 * PS, 1, BufFlags::LAZY).unwrap();
    pp.add_holes(5 * PS, 2, HoleFlags::empty()).unwrap();
    let kinds: Vec<_> = pp
        .entries()
        .map(|e| (e.vaddr / PS, e.pages, !e.flags.contains(PageFlags::PRESENT)))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, 1, true),
            (1, 2, false),
            (3, 1, true),
            (4, 1, false),
            (5, 2, true)
        ]
    );
}

#[test]
fn what_the_crate_docs_say_is_send_and_sync_is() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<PagePipe>();
    send::<PagePipe<ChunkMode, CallerIovs<'static>, FakePipes>>();
    send::<crate::Captured<'static>>();
    send::<crate::Captured<'static, ChunkMode, CallerIovs<'static>>>();
    send::<crate::ServeDest>();
    send::<crate::image::ImageWriter>();
    send::<crate::image::Image>();
    sync::<crate::image::Image>();
    send::<crate::Source<'static>>();
    sync::<crate::Source<'static>>();
    send::<std::sync::Arc<crate::PipePool>>();
}
