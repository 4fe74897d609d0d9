//! The value index: an indexed 8-ary min-heap of the ids of tracked records, ordered by
//! (ts, start key). Each record stores its heap position, so raising a record's ts finds its
//! entry without a search; 7/8 of an 8-ary heap are leaves, so most raises touch nothing but
//! the record itself. Entries are bare ids (4 bytes): the ts is read from the records.
//!
//! A raise to a ts above most others sinks its entry to the bottom: ~log8(n) levels, each
//! reading 8 scattered records. When a batch raises a large share of the entries (a flush
//! of every region of a store, a poll of every region), the heap is instead left unordered
//! while the batch runs ([`TsHeap::defer`]) and rebuilt once at its end
//! ([`TsHeap::restore`], Floyd's bottom-up heapify): about one record read per entry in
//! all, instead of ~8 per level per raise.

use super::mem::{grow_push, prefetch};
use super::{Rec, NIL};

const ARITY: usize = 8;

/// How many heap entries ahead [`TsHeap::restore`] asks for the child records it will
/// compare: enough to cover a memory read with the sifts of the entries in between.
const RESTORE_AHEAD: usize = 4;

#[derive(Default)]
pub(super) struct TsHeap {
    ids: Vec<u32>,
    /// Set by [`TsHeap::defer`]: entries are in no order until [`TsHeap::restore`], and
    /// the positions of entries are the only thing kept up to date.
    deferred: bool,
}

impl TsHeap {
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The entry at `pos`; the heap must be in order (not deferred).
    pub(super) fn id(&self, pos: usize) -> u32 {
        assert!(!self.deferred, "heap read while its order is deferred");
        self.ids[pos]
    }

    /// Positions of the children of `pos`.
    pub(super) fn children(&self, pos: usize) -> std::ops::Range<usize> {
        let first = (pos * ARITY + 1).min(self.ids.len());
        first..(first + ARITY).min(self.ids.len())
    }

    pub(super) fn push(&mut self, recs: &mut [Rec], id: u32) {
        grow_push(&mut self.ids, id);
        self.put(recs, self.ids.len() - 1, id);
        if !self.deferred {
            self.sift_up(recs, self.ids.len() - 1, id);
        }
    }

    pub(super) fn remove(&mut self, recs: &mut [Rec], id: u32) {
        let pos = recs[id as usize].heap_pos as usize;
        recs[id as usize].heap_pos = NIL;
        let last = self.ids.pop().expect("a tracked record is in the heap");
        if pos < self.ids.len() {
            self.put(recs, pos, last);
            if !self.deferred {
                // The moved entry may belong above or below its new place.
                let pos = self.sift_up(recs, pos, last);
                self.sift_down(recs, pos, last);
            }
        }
    }

    /// Stops ordering entries: raises, pushes and removals only keep positions up to date
    /// until [`TsHeap::restore`]. Nothing may read the order meanwhile.
    pub(super) fn defer(&mut self) {
        self.deferred = true;
    }

    /// Puts the entries back in heap order after [`TsHeap::defer`], in O(n): each parent,
    /// from the last one up to the root, sifted down into children already in order.
    pub(super) fn restore(&mut self, recs: &mut [Rec]) {
        if !std::mem::take(&mut self.deferred) || self.ids.len() < 2 {
            return;
        }
        let last_parent = (self.ids.len() - 2) / ARITY;
        for pos in (0..=last_parent).rev() {
            // The children's records are scattered: ask for those of a parent a few steps on.
            if let Some(ahead) = pos.checked_sub(RESTORE_AHEAD) {
                for &child in &self.ids[self.children(ahead)] {
                    prefetch(&recs[child as usize]);
                }
            }
            self.sift_down(recs, pos, self.ids[pos]);
        }
    }

    /// Renames every entry after the records moved.
    pub(super) fn remap(&mut self, map: impl Fn(u32) -> u32) {
        for id in &mut self.ids {
            *id = map(*id);
        }
    }

    /// Re-sorts `id` after its record's ts went up.
    pub(super) fn raise(&mut self, recs: &mut [Rec], id: u32) {
        if !self.deferred {
            self.sift_down(recs, recs[id as usize].heap_pos as usize, id);
        }
    }

    /// Prefetches what raising record `id` (if it is one) would read first: its children's
    /// heap entries, or with `records`, their records.
    pub(super) fn prefetch_children(&self, recs: &[Rec], id: u32, records: bool) {
        let Some(rec) = recs.get(id as usize) else { return };
        if rec.heap_pos == NIL {
            return;
        }
        let children = self.children(rec.heap_pos as usize);
        if records {
            for &child in &self.ids[children] {
                if let Some(rec) = recs.get(child as usize) {
                    prefetch(rec);
                }
            }
        } else if let Some(ids) = self.ids.get(children) {
            if !ids.is_empty() {
                prefetch(ids);
            }
        }
    }

    // The sifts move `moving`, which is at `start`, and write the heap only if it moves: a
    // raise at a leaf reads and writes nothing here.

    fn sift_up(&mut self, recs: &mut [Rec], start: usize, moving: u32) -> usize {
        let mut pos = start;
        while pos > 0 {
            let parent = (pos - 1) / ARITY;
            if !less(recs, moving, self.ids[parent]) {
                break;
            }
            self.put(recs, pos, self.ids[parent]);
            pos = parent;
        }
        if pos != start {
            self.put(recs, pos, moving);
        }
        pos
    }

    fn sift_down(&mut self, recs: &mut [Rec], start: usize, moving: u32) {
        let mut pos = start;
        loop {
            let smallest = self.children(pos).reduce(|a, b| if less(recs, self.ids[b], self.ids[a]) { b } else { a });
            match smallest {
                Some(child) if less(recs, self.ids[child], moving) => {
                    self.put(recs, pos, self.ids[child]);
                    pos = child;
                }
                _ => break,
            }
        }
        if pos != start {
            self.put(recs, pos, moving);
        }
    }

    fn put(&mut self, recs: &mut [Rec], pos: usize, id: u32) {
        self.ids[pos] = id;
        recs[id as usize].heap_pos = pos as u32;
    }

    #[cfg(test)]
    pub(super) fn check(&self, recs: &[Rec], tracked: &[u32]) {
        assert!(!self.deferred, "heap order restored");
        assert_eq!(self.ids.len(), tracked.len(), "heap size");
        for (pos, &id) in self.ids.iter().enumerate() {
            assert_eq!(recs[id as usize].heap_pos as usize, pos, "heap position");
            for child in self.children(pos) {
                assert!(!less(recs, self.ids[child], id), "heap order");
            }
        }
    }
}

/// The heap order: ts, then start key (keys of tracked records are distinct).
fn less(recs: &[Rec], a: u32, b: u32) -> bool {
    let (a, b) = (&recs[a as usize], &recs[b as usize]);
    a.ts < b.ts || (a.ts == b.ts && a.key < b.key)
}
