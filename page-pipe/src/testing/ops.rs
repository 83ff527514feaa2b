//! Operation sequences run on a page pipe and its model side by side, the way the
//! property tests and the fuzz target drive them.

use super::model::{Model, check_invariants, compare};
use crate::backend::PipeBackend;
use crate::mode::{IovStore, Mode};
use crate::page_pipe::{AddError, Outcome, PagePipe, Progress};
use crate::types::{BufFlags, HoleFlags, Run};

use super::Config;

/// One operation of a test sequence. Addresses are relative: each add starts `gap` pages
/// after the end of the last page or hole added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `add_pages(next + gap, n, LAZY if lazy)`.
    Pages {
        /// Pages skipped before the first.
        gap: u64,
        /// Pages.
        n: u64,
        /// With [`BufFlags::LAZY`].
        lazy: bool,
    },
    /// `add_holes(next + gap, n, PARENT if parent)`.
    Holes {
        /// Pages skipped before the first.
        gap: u64,
        /// Pages.
        n: u64,
        /// With [`HoleFlags::PARENT`].
        parent: bool,
    },
    /// Release the `nth` live buf (modulo their number).
    Release {
        /// Which.
        nth: usize,
    },
    /// Re-init (chunk mode; a no-op otherwise).
    Reinit,
    /// Capture and dump (keeping the books only; no bytes move), the dump failing after
    /// `ok` present entries if `ok` is given; then, in chunk mode, re-init as
    /// [`Captured::reinit`](crate::Captured::reinit) does: bufs whose pages are still in
    /// their pipes are released first.
    Drain {
        /// Present entries the dump takes before it fails (`None`: it does not fail).
        ok: Option<usize>,
    },
    /// Add a page `off` bytes past the next address (an unaligned address when `off` is
    /// not a multiple of the page size).
    Unaligned {
        /// Bytes.
        off: u64,
    },
    /// Add a page `back` pages below the next address.
    Backwards {
        /// Pages.
        back: u64,
    },
}

impl Op {
    /// Decodes one operation from the front of `data`, consuming what it used; `None`
    /// when `data` is empty. Every byte string decodes to some sequence.
    pub fn decode(data: &mut &[u8]) -> Option<Op> {
        let (&tag, rest) = data.split_first()?;
        *data = rest;
        let mut byte = || {
            let (&b, rest) = data.split_first().unwrap_or((&0, &[]));
            *data = rest;
            b
        };
        Some(match tag % 16 {
            0..=6 => Op::Pages {
                gap: u64::from(byte() % 4),
                n: u64::from(byte()) % 64 + 1,
                lazy: tag & 0x10 != 0,
            },
            7..=10 => Op::Holes {
                gap: u64::from(byte() % 3),
                n: u64::from(byte()) % 16 + 1,
                parent: tag & 0x10 == 0,
            },
            11 | 12 => Op::Release {
                nth: usize::from(byte()),
            },
            13 if tag & 0x20 != 0 => Op::Drain {
                ok: (tag & 0x40 != 0).then(|| usize::from(byte() % 8)),
            },
            13 => Op::Reinit,
            14 => Op::Unaligned {
                off: u64::from(byte()) * 17 + 1,
            },
            _ => Op::Backwards {
                back: u64::from(byte() % 8) + 1,
            },
        })
    }
}

/// Builds a page pipe over `backend` and a model as `cfg` says, checks that both build or
/// fail alike, and runs `ops` on both ([`run_ops`]) from address `base`. The page pipe is
/// dropped before this returns.
///
/// # Errors
/// A description of the first difference.
pub fn check_sequence<B: PipeBackend>(
    cfg: &Config,
    backend: B,
    ops: &[Op],
    base: u64,
) -> Result<(), String> {
    let mut storage = vec![Run::EMPTY; if cfg.caller_iovs { cfg.budget } else { 0 }];
    let model = Model::new(cfg.clone());
    let mut b = PagePipe::builder().lazy_pages(cfg.lazy_pages);
    if let Some(m) = cfg.max_pipe_pages {
        b = b.max_pipe_pages(m);
    }
    if let Some(n) = cfg.initial_pipe_pages {
        b = b.initial_pipe_pages(n);
    }
    match (cfg.chunk, cfg.caller_iovs) {
        (false, false) => go(
            b.iov_budget(cfg.budget).build_with(backend),
            model,
            ops,
            base,
        ),
        (false, true) => go(
            b.iov_storage(&mut storage).build_with(backend),
            model,
            ops,
            base,
        ),
        (true, false) => go(
            b.chunk_mode().iov_budget(cfg.budget).build_with(backend),
            model,
            ops,
            base,
        ),
        (true, true) => go(
            b.chunk_mode().iov_storage(&mut storage).build_with(backend),
            model,
            ops,
            base,
        ),
    }
}

fn go<M: Mode, I: IovStore, B: PipeBackend>(
    built: Result<PagePipe<M, I, B>, crate::BuildError>,
    model: Result<Model, AddError>,
    ops: &[Op],
    base: u64,
) -> Result<(), String> {
    use crate::BuildError;
    match (built, model) {
        (Ok(mut pp), Ok(mut model)) => run_ops(&mut pp, &mut model, ops, base),
        (Err(BuildError::MakePipe(e)), Err(AddError::MakePipe { errno, .. })) if e == errno => {
            Ok(())
        }
        (
            Err(BuildError::PipeLimit { capacity, expected }),
            Err(AddError::PipeLimit {
                capacity: c,
                expected: x,
                ..
            }),
        ) if (capacity, expected) == (c, x) => Ok(()),
        (r, m) => Err(format!(
            "build differs: real {:?}, model {:?}",
            r.map(|_| ()),
            m.map(|_| ())
        )),
    }
}

fn progress(o: Outcome) -> Progress {
    match o {
        Outcome::Done => Progress::Done,
        Outcome::Full { added } => Progress::Full { added },
    }
}

/// Applies `ops` to the page pipe and to the model, starting at address `base`, and
/// compares results, observables ([`compare`]) and invariants ([`check_invariants`])
/// after every step.
///
/// # Errors
/// A description of the step and the first difference.
pub fn run_ops<M: Mode, I: IovStore, B: PipeBackend>(
    pp: &mut PagePipe<M, I, B>,
    model: &mut Model,
    ops: &[Op],
    base: u64,
) -> Result<(), String> {
    let ps = pp.page_size() as u64;
    compare(pp, model)
        .and_then(|()| check_invariants(pp))
        .map_err(|e| format!("at start: {e}"))?;
    for (step, op) in ops.iter().enumerate() {
        let next = pp.next_addr().unwrap_or(base);
        let (real, want) = match *op {
            Op::Pages { gap, n, lazy } => {
                let Some(addr) = next.checked_add(gap * ps) else {
                    continue;
                };
                let flags = if lazy {
                    BufFlags::LAZY
                } else {
                    BufFlags::empty()
                };
                (
                    pp.add_run(addr, n, flags).map(progress),
                    model.add_pages(addr, n, flags),
                )
            }
            Op::Holes { gap, n, parent } => {
                let Some(addr) = next.checked_add(gap * ps) else {
                    continue;
                };
                let flags = if parent {
                    HoleFlags::PARENT
                } else {
                    HoleFlags::empty()
                };
                (
                    pp.add_holes(addr, n, flags).map(|()| Progress::Done),
                    model.add_holes(addr, n, flags).map(|()| Progress::Done),
                )
            }
            Op::Release { nth } => {
                let ids: Vec<_> = pp.bufs().map(|b| b.id).collect();
                let want = model.release_nth(nth);
                let real = (!ids.is_empty()).then(|| {
                    let k = nth % ids.len();
                    pp.release_buf(ids[k]).map(|()| k)
                });
                match (real, want) {
                    (None, None) => {}
                    (Some(Ok(k)), Some(w)) if k == w => {}
                    (r, w) => {
                        return Err(format!(
                            "step {step} {op:?}: release real {r:?} model {w:?}"
                        ));
                    }
                }
                (Ok(Progress::Done), Ok(Progress::Done))
            }
            Op::Reinit => {
                if M::CHUNK {
                    pp.reinit_for_tests();
                    model.reinit();
                }
                (Ok(Progress::Done), Ok(Progress::Done))
            }
            Op::Drain { ok } => {
                let wrote = pp.drain_for_tests(ok);
                let want = model.drain(ok, M::CHUNK);
                if wrote != want {
                    return Err(format!(
                        "step {step} {op:?}: the dump wrote\n real  {wrote:?}\n model {want:?}"
                    ));
                }
                (Ok(Progress::Done), Ok(Progress::Done))
            }
            Op::Unaligned { off } => {
                let Some(addr) = next.checked_add(off) else {
                    continue;
                };
                (
                    pp.add_run(addr, 1, BufFlags::empty()).map(progress),
                    model.add_pages(addr, 1, BufFlags::empty()),
                )
            }
            Op::Backwards { back } => {
                let Some(addr) = next.checked_sub(back * ps) else {
                    continue;
                };
                (
                    pp.add_run(addr, 1, BufFlags::empty()).map(progress),
                    model.add_pages(addr, 1, BufFlags::empty()),
                )
            }
        };
        if real != want {
            return Err(format!("step {step} {op:?}: real {real:?}, model {want:?}"));
        }
        compare(pp, model)
            .and_then(|()| check_invariants(pp))
            .map_err(|e| format!("after step {step} {op:?}: {e}"))?;
    }
    Ok(())
}
