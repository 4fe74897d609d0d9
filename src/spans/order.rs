//! Key order beyond the forward links: the record containing an arbitrary key (for updates
//! that do not start on an existing boundary) and a record's predecessor (for coalescing).
//! Record ids are kept in key order, cut into chunks of at most `CAP`; a `BTreeMap` maps each
//! chunk's fence (a key no greater than any key in the chunk and greater than every key
//! before it) to the chunk. Only fences copy keys, so this costs about 7 bytes per span. The
//! first fence is the empty key, so every key has a chunk. A fence stays valid when its
//! chunk's first record goes away, so removals never rewrite fences.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included, Unbounded};

use super::key::Key;
use super::Rec;

const CAP: usize = if cfg!(test) { 4 } else { 32 };
/// A chunk this small is merged into its successor when both fit in 3/4 of a chunk.
const SMALL: usize = CAP / 4;

pub(super) struct Order {
    chunks: Vec<Vec<u32>>,
    free_chunks: Vec<u32>,
    fences: BTreeMap<Key, u32>,
}

impl Order {
    pub(super) fn new() -> Self {
        Order {
            chunks: vec![Vec::with_capacity(CAP)],
            free_chunks: Vec::new(),
            fences: BTreeMap::from([(Key::default(), 0)]),
        }
    }

    /// The record with the greatest start `<= key`.
    pub(super) fn find(&self, recs: &[Rec], key: &[u8]) -> Option<u32> {
        let (fence, chunk) = self.chunk_of(key);
        let ids = &self.chunks[chunk as usize];
        match ids.partition_point(|&id| recs[id as usize].key.as_bytes() <= key) {
            0 => self.last_before(fence),
            n => Some(ids[n - 1]),
        }
    }

    /// The record before `id` in key order.
    pub(super) fn prev(&self, recs: &[Rec], id: u32) -> Option<u32> {
        let (fence, chunk) = self.chunk_of(recs[id as usize].key.as_bytes());
        match self.chunks[chunk as usize].iter().position(|&i| i == id).expect("record in its chunk") {
            0 => self.last_before(fence),
            pos => Some(self.chunks[chunk as usize][pos - 1]),
        }
    }

    /// The last record of the chunks before `fence`. Only the first chunk may be empty, and
    /// nothing precedes it.
    fn last_before(&self, fence: &[u8]) -> Option<u32> {
        let before = self.fences.range::<[u8], _>((Unbounded, Excluded(fence))).next_back();
        before.and_then(|(_, &chunk)| self.chunks[chunk as usize].last().copied())
    }

    /// Adds `id` right after `pred` (NIL: at the very beginning) in key order.
    pub(super) fn insert(&mut self, recs: &[Rec], pred: u32, id: u32) {
        let (_, chunk) = self.chunk_of(recs[id as usize].key.as_bytes());
        let ids = &mut self.chunks[chunk as usize];
        // `pred` is in this chunk, or ends the previous one and `id` goes first here.
        let mut pos = ids.iter().position(|&i| i == pred).map_or(0, |p| p + 1);
        let (mut target, mut split) = (chunk, None);
        if ids.len() == CAP {
            // Appending (the usual way of growing) leaves the full chunk full.
            let right = ids.split_off(if pos == CAP { CAP } else { CAP / 2 });
            let left_len = ids.len();
            let new = self.new_chunk(right);
            if pos > left_len || left_len == CAP {
                pos -= left_len;
                target = new;
            }
            split = Some(new);
        }
        self.chunks[target as usize].insert(pos, id);
        if let Some(new) = split {
            let first = self.chunks[new as usize][0];
            self.fences.insert(recs[first as usize].key.clone(), new);
        }
    }

    /// Renames every id after the records moved.
    pub(super) fn remap(&mut self, map: impl Fn(u32) -> u32) {
        for id in self.chunks.iter_mut().flatten() {
            *id = map(*id);
        }
    }

    /// Removes `id`, whose record still holds its key.
    pub(super) fn remove(&mut self, recs: &[Rec], id: u32) {
        let key = recs[id as usize].key.as_bytes();
        let (_, chunk) = self.chunk_of(key);
        let ids = &mut self.chunks[chunk as usize];
        ids.remove(ids.iter().position(|&i| i == id).expect("record in its chunk"));
        let len = ids.len();
        if len > SMALL {
            return;
        }
        // The chunk went small: drop it if empty (never the first, whose fence is the empty
        // key), or take in its successor if both fit.
        let fence = Key::new(self.chunk_of(key).0);
        let next = self.fences.range::<Key, _>((Excluded(&fence), Unbounded)).next().map(|(f, &c)| (f.clone(), c));
        if len == 0 && !fence.as_bytes().is_empty() {
            self.fences.remove(&fence);
            self.free_chunks.push(chunk);
        } else if let Some((next_fence, next)) =
            next.filter(|&(_, next)| len + self.chunks[next as usize].len() <= CAP * 3 / 4)
        {
            let moved = std::mem::take(&mut self.chunks[next as usize]);
            self.chunks[chunk as usize].extend(moved);
            self.fences.remove(&next_fence);
            self.free_chunks.push(next);
        }
    }

    /// The chunk whose keys may include `key`, with its fence.
    fn chunk_of(&self, key: &[u8]) -> (&[u8], u32) {
        let (fence, &chunk) =
            self.fences.range::<[u8], _>((Unbounded, Included(key))).next_back().expect("the empty fence");
        (fence.as_bytes(), chunk)
    }

    fn new_chunk(&mut self, mut ids: Vec<u32>) -> u32 {
        ids.reserve_exact(CAP - ids.len());
        match self.free_chunks.pop() {
            Some(chunk) => {
                self.chunks[chunk as usize] = ids;
                chunk
            }
            None => {
                self.chunks.push(ids);
                (self.chunks.len() - 1) as u32
            }
        }
    }

    /// The key order of records `ids`, already sorted by key, in chunks filled to 3/4 (so
    /// that the inserts after a bulk build do not split every chunk at once).
    pub(super) fn from_sorted(recs: &[Rec], ids: &[u32]) -> Self {
        if ids.is_empty() {
            return Order::new();
        }
        let mut order = Order { chunks: Vec::new(), free_chunks: Vec::new(), fences: BTreeMap::new() };
        for (i, chunk) in ids.chunks(CAP * 3 / 4).enumerate() {
            let fence = if i == 0 { Key::default() } else { recs[chunk[0] as usize].key.clone() };
            order.fences.insert(fence, order.chunks.len() as u32);
            let mut ids = Vec::with_capacity(CAP);
            ids.extend_from_slice(chunk);
            order.chunks.push(ids);
        }
        order
    }

    /// Every record id, in key order.
    pub(super) fn in_key_order(&self) -> impl Iterator<Item = u32> + '_ {
        self.fences.values().flat_map(|&chunk| self.chunks[chunk as usize].iter().copied())
    }

    #[cfg(test)]
    pub(super) fn check(&self, recs: &[Rec], live_in_order: &[u32]) {
        let mut concat = Vec::new();
        let mut prev_fence: Option<&Key> = None;
        for (fence, &chunk) in &self.fences {
            let ids = &self.chunks[chunk as usize];
            assert!(ids.len() <= CAP, "chunk overflow");
            match prev_fence {
                None => assert!(fence.as_bytes().is_empty(), "first fence is empty"),
                Some(_) => assert!(!ids.is_empty(), "only the first chunk may be empty"),
            }
            if let Some(&first) = ids.first() {
                assert!(*fence <= recs[first as usize].key, "fence above its chunk");
            }
            if let Some(&last) = concat.last() {
                assert!(recs[last as usize].key < *fence, "fence below the previous chunk");
            }
            concat.extend_from_slice(ids);
            prev_fence = Some(fence);
        }
        assert_eq!(concat, live_in_order, "chunks follow key order");
        for (i, &id) in live_in_order.iter().enumerate() {
            assert_eq!(self.find(recs, recs[id as usize].key.as_bytes()), Some(id), "find by key");
            assert_eq!(self.prev(recs, id), i.checked_sub(1).map(|i| live_in_order[i]), "prev");
        }
    }
}
