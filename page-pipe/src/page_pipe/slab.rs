//! The pipes of a page pipe: a slab of slots, each with its capacity, its users and what
//! sits in it.
//!
//! A slot is the one owner of a pipe's state (invariant 7 of DESIGN.md): its user count is
//! the number of bufs (live or free) on the pipe, and the pipe closes with its last user;
//! after a capture, `filled` pages went in and `consumed` came out from the front, so
//! `consumed..filled` is what the pipe holds. A transfer that failed half way leaves the
//! slot `lost`: nobody knows where its front is, and nothing is served from it again.

/// One open pipe.
#[derive(Debug)]
pub(crate) struct Slot<P> {
    pipe: P,
    capacity: u64,
    users: u32,
    serial: u64,
    filled: u64,
    consumed: u64,
    lost: bool,
}

impl<P> Slot<P> {
    pub(crate) fn pipe(&self) -> &P {
        &self.pipe
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn serial(&self) -> u64 {
        self.serial
    }

    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub(crate) fn users(&self) -> u32 {
        self.users
    }

    /// Pages taken from the front of the pipe since the capture.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Whether a failed transfer left the pipe's front unknown.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost
    }

    /// Whether pages the capture put in are still in the pipe.
    pub(crate) fn holds_pages(&self) -> bool {
        self.consumed < self.filled
    }
}

/// The slab: slots by index, reused once their pipe closes.
#[derive(Debug)]
pub(crate) struct PipeSlab<P> {
    slots: Vec<Option<Slot<P>>>,
    vacant: Vec<usize>,
    open: usize,
    made: u64,
}

impl<P> PipeSlab<P> {
    pub(crate) fn new() -> Self {
        Self {
            slots: Vec::new(),
            vacant: Vec::new(),
            open: 0,
            made: 0,
        }
    }

    /// Takes a new pipe with one user; returns its slot.
    pub(crate) fn insert(&mut self, pipe: P, capacity: u64) -> usize {
        let slot = Slot {
            pipe,
            capacity,
            users: 1,
            serial: self.made,
            filled: 0,
            consumed: 0,
            lost: false,
        };
        self.made += 1;
        self.open += 1;
        match self.vacant.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// The pipe in `slot`, which a live or free buf uses (so it is open).
    pub(crate) fn get(&self, slot: usize) -> &Slot<P> {
        self.slots[slot]
            .as_ref()
            .expect("a pipe with users is open")
    }

    fn get_mut(&mut self, slot: usize) -> &mut Slot<P> {
        self.slots[slot]
            .as_mut()
            .expect("a pipe with users is open")
    }

    /// The pipe in `slot`, if it is open.
    pub(crate) fn try_get(&self, slot: usize) -> Option<&Slot<P>> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub(crate) fn set_capacity(&mut self, slot: usize, capacity: u64) {
        self.get_mut(slot).capacity = capacity;
    }

    /// One more buf uses the pipe in `slot`.
    pub(crate) fn add_user(&mut self, slot: usize) {
        self.get_mut(slot).users += 1;
    }

    /// One buf stops using the pipe in `slot`; with its last user the slot is vacated and
    /// the pipe handed back, to close or pool.
    pub(crate) fn remove_user(&mut self, slot: usize) -> Option<Slot<P>> {
        let s = self.get_mut(slot);
        s.users -= 1;
        if s.users > 0 {
            return None;
        }
        self.vacant.push(slot);
        self.open -= 1;
        self.slots[slot].take()
    }

    /// Pipes open now.
    pub(crate) fn open(&self) -> usize {
        self.open
    }

    /// The open slots, with their index.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &Slot<P>)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// A capture is about to put `filled[slot]` pages into each pipe (slots beyond the
    /// slice: none). Any earlier accounting is forgotten.
    pub(crate) fn begin_capture(&mut self, filled: &[u64]) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(s) = s {
                s.filled = filled.get(i).copied().unwrap_or(0);
                s.consumed = 0;
                s.lost = false;
            }
        }
    }

    /// `pages` pages were taken from the front of the pipe in `slot`.
    pub(crate) fn consume(&mut self, slot: usize, pages: u64) {
        let s = self.get_mut(slot);
        s.consumed += pages;
        debug_assert!(s.consumed <= s.filled);
    }

    /// A transfer from the pipe in `slot` failed part way: its front is unknown.
    pub(crate) fn lose(&mut self, slot: usize) {
        self.get_mut(slot).lost = true;
    }

    /// A transfer from the pipe in `slot` that [`lose`](Self::lose) marked before it
    /// started ended well: its front is known again.
    pub(crate) fn regain(&mut self, slot: usize) {
        self.get_mut(slot).lost = false;
    }

    /// After a re-init: the pipes are empty and hold nothing of the next capture yet.
    pub(crate) fn reset(&mut self) {
        for s in self.slots.iter_mut().flatten() {
            s.filled = 0;
            s.consumed = 0;
            s.lost = false;
        }
    }

    /// Every open pipe, taken out, with whether it was never filled.
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = (P, u64, bool)> + '_ {
        self.open = 0;
        self.vacant.clear();
        self.slots.drain(..).flatten().map(|s| {
            let unused = s.filled == 0;
            (s.pipe, s.capacity, unused)
        })
    }
}

impl<P> Slot<P> {
    /// The pipe, its capacity, and whether it was never filled: what a backend takes
    /// back.
    pub(crate) fn into_parts(self) -> (P, u64, bool) {
        let unused = self.filled == 0;
        (self.pipe, self.capacity, unused)
    }
}
