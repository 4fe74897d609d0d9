//! The value index: an indexed 8-ary min-heap of the ids of tracked records, ordered by
//! (ts, start key). Each record stores its heap position, so raising a record's ts finds its
//! entry without a search; 7/8 of an 8-ary heap are leaves, so most raises touch nothing but
//! the record itself. Entries are bare ids (4 bytes): the ts is read from the records.

use super::mem::{grow_push, prefetch};
use super::{Rec, NIL};

const ARITY: usize = 8;

#[derive(Default)]
pub(super) struct TsHeap {
    ids: Vec<u32>,
}

impl TsHeap {
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn id(&self, pos: usize) -> u32 {
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
        self.sift_up(recs, self.ids.len() - 1, id);
    }

    pub(super) fn remove(&mut self, recs: &mut [Rec], id: u32) {
        let pos = recs[id as usize].heap_pos as usize;
        recs[id as usize].heap_pos = NIL;
        let last = self.ids.pop().expect("a tracked record is in the heap");
        if pos < self.ids.len() {
            self.put(recs, pos, last);
            // The moved entry may belong above or below its new place.
            let pos = self.sift_up(recs, pos, last);
            self.sift_down(recs, pos, last);
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
        self.sift_down(recs, recs[id as usize].heap_pos as usize, id);
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
