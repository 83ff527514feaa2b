//! What serving keeps per captured page pipe: each run's place in its buf, each buf's
//! place among the captured pages, and which pages were served at least once (so that a
//! server knows when a buf is done). A leaf of [`capture`](crate::capture), which holds
//! it, and [`serve`](crate::serve), which fills it.

use crate::backend::PipeBackend;
use crate::mode::{IovStore, Mode};
use crate::page_pipe::PagePipe;

/// Per-run and per-buf facts for serving, made on the first serve.
#[derive(Debug, Default)]
pub(crate) struct ServeIndex {
    /// Page offset of each run in its buf.
    pub(crate) run_off: Vec<u64>,
    /// Index, among all captured pages, of each buf's first page.
    pub(crate) buf_base: Vec<u64>,
    /// Pages of each buf not served yet.
    pub(crate) buf_left: Vec<u64>,
    /// One bit per captured page: served at least once.
    pub(crate) served: Vec<u64>,
}

impl ServeIndex {
    pub(crate) fn new<M: Mode, I: IovStore, B: PipeBackend>(pp: &PagePipe<M, I, B>) -> Self {
        let runs = pp.runs();
        let n = pp.buf_count();
        let mut ix = ServeIndex {
            run_off: vec![0; runs.len()],
            buf_base: vec![0; n],
            buf_left: vec![0; n],
            served: Vec::new(),
        };
        let mut base = 0;
        for bi in 0..n {
            let b = pp.buf_info(bi);
            ix.buf_base[bi] = base;
            ix.buf_left[bi] = b.pages;
            let mut off = 0;
            let range = b.first_run..b.first_run + b.nr_runs;
            for (slot, r) in ix.run_off[range.clone()].iter_mut().zip(&runs[range]) {
                *slot = off;
                off += r.pages();
            }
            base += b.pages;
        }
        ix.served = vec![0; base.div_ceil(64) as usize];
        ix
    }
}
