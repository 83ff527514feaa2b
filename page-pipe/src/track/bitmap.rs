//! Dirty bitmaps (one bit per page, `u64` words, least significant bit first, as KVM's
//! dirty log) and the plans made from them.
//!
//! The tracker keeps its own sets in this format too, so every dirty set, from the kernel
//! or from outside, becomes a plan through [`push_spans`].

use std::fmt;

use crate::snapshot::Span;
use crate::types::{BufFlags, HoleFlags};

/// Why a dirty log could not be turned into a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirtyLogError {
    /// The log has fewer bits than the region has pages.
    ShortLog {
        /// The region's address.
        addr: u64,
        /// The region's pages.
        pages: u64,
        /// The log's words.
        words: usize,
    },
    /// The region's address is not a multiple of the page size.
    Unaligned {
        /// The address.
        addr: u64,
        /// The page size.
        page_size: usize,
    },
    /// The page size is not a power of two.
    PageSize {
        /// The page size.
        page_size: usize,
    },
    /// The region passes the end of the address space.
    Overflow {
        /// The address.
        addr: u64,
        /// The pages.
        pages: u64,
    },
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogError::ShortLog { addr, pages, words } => write!(
                f,
                "dirty log of region {addr:#x}: {words} words hold {} bits, the region has {pages} pages",
                *words as u128 * 64
            ),
            DirtyLogError::Unaligned { addr, page_size } => write!(
                f,
                "dirty log region {addr:#x} is not aligned to its {page_size}-byte pages"
            ),
            DirtyLogError::PageSize { page_size } => {
                write!(f, "page size {page_size} is not a power of two")
            }
            DirtyLogError::Overflow { addr, pages } => write!(
                f,
                "dirty log region of {pages} pages from {addr:#x} passes the end of the address space"
            ),
        }
    }
}

impl std::error::Error for DirtyLogError {}

/// Turns a KVM-style dirty log into a snapshot plan: pages whose bit is set become
/// [`Span::Pages`] (empty [`BufFlags`]), the others [`Span::Hole`] with
/// [`HoleFlags::PARENT`] (their contents are in the parent snapshot); spans in address
/// order, each as long as possible.
///
/// The log has one bit per page, `u64` words, least significant bit first: bit `i % 64`
/// of word `i / 64` is page `i` of the region, which starts at `addr` and has `pages`
/// pages of `page_size` bytes. Bits past `pages` are ignored. The log is read word by
/// word, with zero and all-ones words skipped whole and runs inside a word found with
/// `trailing_zeros`, so the cost is per word and per run, not per page (measured by
/// `cargo bench -p page-pipe --bench track`).
///
/// ```
/// use page_pipe::snapshot::Span;
/// use page_pipe::track::plan_from_dirty_log;
/// use page_pipe::{BufFlags, HoleFlags};
/// // Pages 1, 2 and 64 of a 70-page region are dirty.
/// let log = [0b110u64, 1];
/// let plan = plan_from_dirty_log(&log, 0x10_0000, 70, 4096)?;
/// assert_eq!(plan, [
///     Span::Hole { addr: 0x10_0000, pages: 1, flags: HoleFlags::PARENT },
///     Span::Pages { addr: 0x10_1000, pages: 2, flags: BufFlags::empty() },
///     Span::Hole { addr: 0x10_3000, pages: 61, flags: HoleFlags::PARENT },
///     Span::Pages { addr: 0x14_0000, pages: 1, flags: BufFlags::empty() },
///     Span::Hole { addr: 0x14_1000, pages: 5, flags: HoleFlags::PARENT },
/// ]);
/// # Ok::<(), page_pipe::track::DirtyLogError>(())
/// ```
///
/// # Errors
/// [`DirtyLogError`] when the log is shorter than `pages` bits, `addr` is not aligned,
/// `page_size` is not a power of two, or the region overflows.
pub fn plan_from_dirty_log(
    log: &[u64],
    addr: u64,
    pages: u64,
    page_size: usize,
) -> Result<Vec<Span>, DirtyLogError> {
    let mut out = Vec::new();
    extend_plan_from_dirty_log(&mut out, log, addr, pages, page_size)?;
    Ok(out)
}

/// [`plan_from_dirty_log`] appending to `out` (for plans over several regions, or to
/// reuse `out`'s allocation). Returns the number of dirty pages.
///
/// ```
/// use page_pipe::track::extend_plan_from_dirty_log;
/// let mut plan = Vec::new();
/// // Two regions, each with its own log.
/// let dirty = extend_plan_from_dirty_log(&mut plan, &[1], 0x0, 8, 4096)?
///     + extend_plan_from_dirty_log(&mut plan, &[!0], 0x10_0000, 8, 4096)?;
/// assert_eq!((dirty, plan.len()), (9, 3));
/// # Ok::<(), page_pipe::track::DirtyLogError>(())
/// ```
///
/// # Errors
/// As [`plan_from_dirty_log`]; `out` is unchanged then.
pub fn extend_plan_from_dirty_log(
    out: &mut Vec<Span>,
    log: &[u64],
    addr: u64,
    pages: u64,
    page_size: usize,
) -> Result<u64, DirtyLogError> {
    if !page_size.is_power_of_two() {
        return Err(DirtyLogError::PageSize { page_size });
    }
    if !addr.is_multiple_of(page_size as u64) {
        return Err(DirtyLogError::Unaligned { addr, page_size });
    }
    if (log.len() as u128) * 64 < pages as u128 {
        return Err(DirtyLogError::ShortLog {
            addr,
            pages,
            words: log.len(),
        });
    }
    if (pages as u128) * (page_size as u128) + addr as u128 > u64::MAX as u128 {
        return Err(DirtyLogError::Overflow { addr, pages });
    }
    Ok(push_spans(
        out,
        log,
        addr,
        pages,
        page_size as u64,
        BufFlags::empty(),
        HoleFlags::PARENT,
    ))
}

/// Calls `f(start, end, set)` for each maximal run of pages `[start, end)` of the first
/// `pages` bits of `words` whose bits are all `set`, in order. The caller checks that
/// `words` holds `pages` bits.
#[inline]
pub(crate) fn for_each_run(words: &[u64], pages: u64, f: impl FnMut(u64, u64, bool)) {
    for_each_run_in(words, 0, pages, f);
}

/// [`for_each_run`] over bits `[from, to)` only.
#[inline]
pub(crate) fn for_each_run_in(
    words: &[u64],
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, u64, bool),
) {
    if from >= to {
        return;
    }
    let mut run_start = from;
    let mut run_set = words[(from / 64) as usize] >> (from % 64) & 1 == 1;
    let mut at = from;
    while at < to {
        let base = at & !63;
        let off = (at - base) as u32;
        // Bits of this word still in range, from `off`.
        let avail = (to - base).min(64) as u32 - off;
        let rest = words[(base / 64) as usize] >> off;
        // How many bits from `off` are of the current run's kind (a word all of that
        // kind, zero or all ones, is passed over whole).
        let same = if run_set {
            (!rest).trailing_zeros()
        } else {
            rest.trailing_zeros()
        };
        if same >= avail {
            at += avail as u64;
            continue;
        }
        at += same as u64;
        f(run_start, at, run_set);
        run_start = at;
        run_set = !run_set;
    }
    f(run_start, to, run_set);
}

/// Appends the spans of a bitmap over `pages` pages from `addr`: set bits as
/// [`Span::Pages`] with `flags`, clear ones as [`Span::Hole`] with `hole_flags`. Returns
/// the number of set bits. The caller checks the arguments.
pub(crate) fn push_spans(
    out: &mut Vec<Span>,
    words: &[u64],
    addr: u64,
    pages: u64,
    page_size: u64,
    flags: BufFlags,
    hole_flags: HoleFlags,
) -> u64 {
    let mut set = 0;
    for_each_run(words, pages, |start, end, is_set| {
        let (a, n) = (addr + start * page_size, end - start);
        if is_set {
            set += n;
            out.push(Span::Pages {
                addr: a,
                pages: n,
                flags,
            });
        } else {
            out.push(Span::Hole {
                addr: a,
                pages: n,
                flags: hole_flags,
            });
        }
    });
    set
}

/// Appends the plan of an incremental snapshot over `pages` pages from `addr`: pages set
/// in `written` as [`Span::Pages`]; of the others, those set in `untouched` (never
/// captured: no snapshot of the chain has them, they read as zeros) as holes without
/// flags, the rest as [`HoleFlags::PARENT`] holes. `written` and `untouched` must not
/// share a bit. Returns the number of written pages.
pub(crate) fn push_plan(
    out: &mut Vec<Span>,
    written: &[u64],
    untouched: Option<&[u64]>,
    addr: u64,
    pages: u64,
    page_size: u64,
) -> u64 {
    let Some(untouched) = untouched else {
        return push_spans(
            out,
            written,
            addr,
            pages,
            page_size,
            BufFlags::empty(),
            HoleFlags::PARENT,
        );
    };
    let mut set = 0;
    for_each_run(written, pages, |start, end, is_set| {
        if is_set {
            set += end - start;
            out.push(Span::Pages {
                addr: addr + start * page_size,
                pages: end - start,
                flags: BufFlags::empty(),
            });
            return;
        }
        for_each_run_in(untouched, start, end, |s, e, never| {
            out.push(Span::Hole {
                addr: addr + s * page_size,
                pages: e - s,
                flags: if never {
                    HoleFlags::empty()
                } else {
                    HoleFlags::PARENT
                },
            });
        });
    });
    set
}

/// A bitmap of `pages` bits, all clear.
pub(crate) fn new_bitmap(pages: u64) -> Vec<u64> {
    vec![0; pages.div_ceil(64) as usize]
}

/// Sets bits `[from, to)`.
pub(crate) fn set_range(words: &mut [u64], from: u64, to: u64) {
    if from >= to {
        return;
    }
    let (fw, lw) = ((from / 64) as usize, ((to - 1) / 64) as usize);
    let head = !0u64 << (from % 64);
    let tail = !0u64 >> (63 - (to - 1) % 64);
    if fw == lw {
        words[fw] |= head & tail;
        return;
    }
    words[fw] |= head;
    for w in &mut words[fw + 1..lw] {
        *w = !0;
    }
    words[lw] |= tail;
}

/// Whether bit `i` is set.
#[cfg(test)]
pub(crate) fn test_bit(words: &[u64], i: u64) -> bool {
    words[(i / 64) as usize] >> (i % 64) & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::spans_from;
    use proptest::prelude::*;

    const PS: usize = 4096;

    fn bits() -> impl Strategy<Value = (Vec<u64>, u64)> {
        (1u64..700).prop_flat_map(|pages| {
            let words = pages.div_ceil(64) as usize;
            let word = prop_oneof![Just(0u64), Just(!0u64), any::<u64>(), 0u64..16];
            (
                proptest::collection::vec(word, words..=words + 1),
                Just(pages),
            )
        })
    }

    proptest! {
        /// The plan equals the per-page one `spans_from` makes from the same bits.
        #[test]
        fn plan_matches_the_per_page_model((log, pages) in bits(), base in 0u64..1000) {
            let addr = base * PS as u64;
            let plan = plan_from_dirty_log(&log, addr, pages, PS).unwrap();
            let model: Vec<Span> = spans_from(
                addr, pages, PS, |i| test_bit(&log, i), BufFlags::empty(), HoleFlags::PARENT,
            ).collect();
            prop_assert_eq!(plan, model);
        }

        /// Runs over a sub-range are the per-bit runs of that range.
        #[test]
        fn runs_in_a_range_match_the_bits((log, pages) in bits(), a in 0u64..700, b in 0u64..700) {
            let (from, to) = (a.min(b) % (pages + 1), a.max(b) % (pages + 1));
            let mut got = Vec::new();
            for_each_run_in(&log, from, to, |s, e, set| got.push((s, e, set)));
            let mut want: Vec<(u64, u64, bool)> = Vec::new();
            for i in from..to {
                let set = test_bit(&log, i);
                match want.last_mut() {
                    Some(last) if last.2 == set => last.1 = i + 1,
                    _ => want.push((i, i + 1, set)),
                }
            }
            prop_assert_eq!(got, want);
        }

        /// Three kinds of pages: written, never captured, in the parent.
        #[test]
        fn plans_split_holes_by_whether_the_parent_has_them(
            (written, pages) in bits(),
            never in proptest::collection::vec(any::<u64>(), 12),
        ) {
            let untouched: Vec<u64> = never.iter().zip(written.iter().chain(std::iter::repeat(&0)))
                .map(|(n, w)| n & !w).collect();
            let mut plan = Vec::new();
            let set = push_plan(&mut plan, &written, Some(&untouched), 0, pages, PS as u64);
            let kind = |i: u64| if test_bit(&written, i) { 0 } else if test_bit(&untouched, i) { 1 } else { 2 };
            let mut want = Vec::new();
            let mut i = 0;
            while i < pages {
                let (k, start) = (kind(i), i);
                while i < pages && kind(i) == k { i += 1; }
                let (addr, n) = (start * PS as u64, i - start);
                want.push(match k {
                    0 => Span::Pages { addr, pages: n, flags: BufFlags::empty() },
                    1 => Span::Hole { addr, pages: n, flags: HoleFlags::empty() },
                    _ => Span::Hole { addr, pages: n, flags: HoleFlags::PARENT },
                });
            }
            prop_assert_eq!(plan, want);
            prop_assert_eq!(set, (0..pages).filter(|&i| test_bit(&written, i)).count() as u64);
        }

        /// `set_range` sets exactly the bits of the range.
        #[test]
        fn set_range_sets_exactly_the_range(pages in 1u64..400, a in 0u64..400, b in 0u64..400) {
            let (from, to) = (a.min(b) % pages, (a.max(b) % pages) + 1);
            let mut w = new_bitmap(pages);
            set_range(&mut w, from, to);
            for i in 0..pages {
                prop_assert_eq!(test_bit(&w, i), (from..to).contains(&i), "bit {}", i);
            }
        }
    }

    #[test]
    fn bad_logs_are_refused() {
        assert_eq!(
            plan_from_dirty_log(&[0], 0, 65, PS),
            Err(DirtyLogError::ShortLog {
                addr: 0,
                pages: 65,
                words: 1
            })
        );
        assert!(matches!(
            plan_from_dirty_log(&[0], 1, 1, PS),
            Err(DirtyLogError::Unaligned { .. })
        ));
        assert!(matches!(
            plan_from_dirty_log(&[0], 0, 1, 3000),
            Err(DirtyLogError::PageSize { .. })
        ));
        assert!(matches!(
            plan_from_dirty_log(&[0], u64::MAX - 4095, 2, PS),
            Err(DirtyLogError::Overflow { .. })
        ));
        // As for a `Source`, the end address must fit in a u64.
        assert!(matches!(
            plan_from_dirty_log(&[1], u64::MAX - 4095, 1, PS),
            Err(DirtyLogError::Overflow { .. })
        ));
        assert_eq!(
            plan_from_dirty_log(&[1], u64::MAX - 8191, 1, PS)
                .unwrap()
                .len(),
            1
        );
        assert!(plan_from_dirty_log(&[], 0, 0, PS).unwrap().is_empty());
    }
}
