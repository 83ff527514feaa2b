//! What a background snapshot shares with the fault handler, under the tracker's lock:
//! the pages the dump still needs, those it is reading, and the copies saved aside (see
//! [`live`](super::live) for the ordering). A leaf of both.
//!
//! It holds one `unsafe` block, the volatile copy of a page a writer came to first; the
//! promise it rests on is [`Tracker::live`](super::Tracker::live)'s (the regions stay
//! mapped until the snapshot ends).
#![allow(unsafe_code)]

use std::collections::HashMap;

/// The pages a background snapshot still needs, and the copies saved aside for it:
/// shared with the fault handler under the tracker's lock.
#[derive(Debug)]
pub(super) struct LiveState {
    /// Per region (tracker order): pages the dump needs and has not taken.
    pub(super) pending: Vec<Vec<u64>>,
    /// Per region: pages the dump is reading from memory.
    pub(super) reading: Vec<Vec<u64>>,
    /// Copies of pending pages a writer came to first, by (region, page).
    pub(super) saved: HashMap<(usize, u64), Box<[u8]>>,
    /// Buffers to copy into, and how many exist.
    pub(super) free: Vec<Box<[u8]>>,
    pub(super) allocated: u64,
    pub(super) max: u64,
    pub(super) waits: u64,
    pub(super) stalls: u64,
    pub(super) saved_total: u64,
    pub(super) peak: u64,
}

pub(super) fn bit(bits: &[u64], p: u64) -> bool {
    bits[(p / 64) as usize] & (1 << (p % 64)) != 0
}

pub(super) fn set(bits: &mut [u64], p: u64, on: bool) {
    let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
    if on {
        bits[w] |= b;
    } else {
        bits[w] &= !b;
    }
}

impl LiveState {
    /// Whether the dump is reading any of pages `first..end` of region `r`.
    pub(super) fn reading(&self, r: usize, first: u64, end: u64) -> bool {
        (first..end).any(|p| bit(&self.reading[r], p))
    }

    /// How many of pages `first..end` of region `r` the dump still needs.
    pub(super) fn needed(&self, r: usize, first: u64, end: u64) -> u64 {
        (first..end).filter(|&p| bit(&self.pending[r], p)).count() as u64
    }

    /// Whether `n` more copies may be made now.
    pub(super) fn room_for(&self, n: u64) -> bool {
        self.free.len() as u64 + (self.max - self.allocated) >= n
    }

    /// Clears page `p` of region `r` from the pending set; whether it was there.
    pub(super) fn take_pending(&mut self, r: usize, p: u64) -> bool {
        let was = bit(&self.pending[r], p);
        set(&mut self.pending[r], p, false);
        was
    }

    /// A buffer of `len` bytes to copy a page into (there is room: see `room_for`).
    pub(super) fn buffer(&mut self, len: usize) -> Box<[u8]> {
        self.free.pop().unwrap_or_else(|| {
            self.allocated += 1;
            vec![0u8; len].into_boxed_slice()
        })
    }

    /// Keeps the copy of page `p` of region `r` for the dump.
    pub(super) fn keep(&mut self, r: usize, p: u64, buf: Box<[u8]>) {
        self.saved.insert((r, p), buf);
        self.saved_total += 1;
        // Held: saved here, or taken by the dump for the entry it writes.
        self.peak = self.peak.max(self.allocated - self.free.len() as u64);
    }
}

/// Copies the page at host address `host` into `buf` (a page long), with volatile loads.
pub(super) fn save_page(host: usize, buf: &mut [u8]) {
    // SAFETY:
    // - the page is in a region of a tracker running a live snapshot, which stays mapped
    //   until the snapshot ends (`Tracker::live`'s contract), so `buf.len()` bytes at
    //   `host` are readable;
    // - `buf` is a buffer of ours, not the tracked memory.
    unsafe { page_pipe_sys::copy_from_raw(buf, host as *const u8) }
}
