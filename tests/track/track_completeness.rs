//! Completeness as a property, in both modes: for random write patterns over several
//! threads, every page written between two takes is in the plan of the second (and,
//! tracking being exact at page granularity, nothing else is); with takes racing the
//! writers, every written page is in some plan.
//!
//! (This file's name makes its proptest regressions file `track_completeness.txt`.)

use std::collections::BTreeSet;

use page_pipe::track::TrackRegion;
use proptest::prelude::*;

use super::{ADDR, anon, assert_covers, pages_in, ps, start};

const PAGES: usize = 512;

/// Rounds; in each, the pages each of 1–4 threads writes.
fn rounds() -> impl Strategy<Value = Vec<Vec<Vec<u16>>>> {
    let thread = proptest::collection::vec(0..PAGES as u16, 0..40);
    let round = proptest::collection::vec(thread, 1..=4);
    proptest::collection::vec(round, 1..5)
}

/// Writes one byte of each page of `pages` at `base`, thread `t` at offset `t` of the page
/// (so no two threads write the same byte).
fn write_pages(base: usize, t: usize, pages: &[u16]) {
    let ps = ps();
    for &p in pages {
        let at = (base + p as usize * ps + t) as *mut u8;
        // SAFETY: - `at` lies in the test's mapping, alive for the whole scope;
        // - each thread writes its own byte of a page, and no reference to the mapping's
        //   bytes is live while the threads run, so nothing races.
        unsafe { at.write_volatile(t as u8 + 1) };
    }
}

fn exact_plans(sync: bool, prefill: usize, rounds: &[Vec<Vec<u16>>]) -> Result<(), TestCaseError> {
    let mut m = anon(PAGES);
    m[..prefill * ps()].fill(7);
    let Some(mut t) = start("exact_plans", &[TrackRegion::of(ADDR, &m[..])], sync) else {
        return Ok(());
    };
    let base = m.as_mut_ptr() as usize;
    // Pages no snapshot has: never populated before tracking, not written since.
    let mut never: BTreeSet<u64> = (prefill as u64..PAGES as u64).collect();
    for round in rounds {
        std::thread::scope(|s| {
            for (i, pages) in round.iter().enumerate() {
                s.spawn(move || write_pages(base, i, pages));
            }
        });
        let plan = t.take().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let written: BTreeSet<u64> = round.iter().flatten().map(|&p| p as u64).collect();
        never.retain(|p| !written.contains(p));
        assert_covers(&plan, ADDR, PAGES as u64, &never);
        prop_assert_eq!(
            pages_in(&plan, ADDR, PAGES as u64),
            written,
            "sync: {}",
            sync
        );
    }
    Ok(())
}

fn racing_takes(sync: bool, writes: &[Vec<u16>], takes: usize) -> Result<(), TestCaseError> {
    let mut m = anon(PAGES);
    let Some(mut t) = start("racing_takes", &[TrackRegion::of(ADDR, &m[..])], sync) else {
        return Ok(());
    };
    let base = m.as_mut_ptr() as usize;
    let mut seen = BTreeSet::new();
    std::thread::scope(|s| -> Result<(), TestCaseError> {
        for (i, pages) in writes.iter().enumerate() {
            s.spawn(move || write_pages(base, i, pages));
        }
        for _ in 0..takes {
            let plan = t.take().map_err(|e| TestCaseError::fail(e.to_string()))?;
            seen.extend(pages_in(&plan, ADDR, PAGES as u64));
        }
        Ok(())
    })?;
    let plan = t.take().map_err(|e| TestCaseError::fail(e.to_string()))?;
    seen.extend(pages_in(&plan, ADDR, PAGES as u64));
    let written: BTreeSet<u64> = writes.iter().flatten().map(|&p| p as u64).collect();
    prop_assert_eq!(seen, written, "sync: {}", sync);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Asynchronous mode (WP_ASYNC + PAGEMAP_SCAN): the plan holds exactly the pages
    /// written since the last take.
    #[test]
    fn async_plans_hold_exactly_the_written_pages(
        prefill in 0..=PAGES,
        rounds in rounds(),
    ) {
        exact_plans(false, prefill, &rounds)?;
    }

    /// Synchronous fallback (forced): the same.
    #[test]
    fn sync_plans_hold_exactly_the_written_pages(
        prefill in 0..=PAGES,
        rounds in rounds(),
    ) {
        exact_plans(true, prefill, &rounds)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Takes while writers run: no write falls between a report and its re-protection,
    /// in either mode.
    #[test]
    fn takes_racing_writers_lose_no_write(
        sync in any::<bool>(),
        writes in proptest::collection::vec(proptest::collection::vec(0..PAGES as u16, 0..200), 1..=3),
        takes in 1usize..8,
    ) {
        racing_takes(sync, &writes, takes)?;
    }
}
